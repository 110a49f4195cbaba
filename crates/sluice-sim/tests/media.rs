//! Audio (transcriptions, translations, speech) and images (generations, edits) over HTTP,
//! and large multipart uploads.

mod common;

use std::io::Read as _;

use base64::Engine as _;
use common::*;
use http::StatusCode;
use serde_json::{Value, json};
use sluice_sim::RegionConfig;

const TRANSCRIBE: &str = "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21";
const TRANSCRIBE_V1: &str = "/openai/v1/audio/transcriptions";
const TRANSLATE: &str = "/openai/deployments/whisper/audio/translations?api-version=2024-10-21";
const SPEECH: &str = "/openai/deployments/tts/audio/speech?api-version=2025-03-01-preview";
const SPEECH_V1: &str = "/openai/v1/audio/speech";
const GENERATE: &str =
    "/openai/deployments/gpt-image-1/images/generations?api-version=2025-04-01-preview";
const EDIT_V1: &str = "/openai/v1/images/edits";

fn region() -> RegionConfig {
    RegionConfig::new("swedencentral")
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[tokio::test]
async fn transcription_json_text_and_verbose() {
    let sim = start(region()).await;
    let audio = vec![7u8; 64_000];
    let (ct, body) = multipart_form(&[
        ("file", Some("hello.wav"), &audio),
        ("prompt", None, b"canal words"),
        ("language", None, b"nl"),
    ]);
    let r = send(sim.addr(), Call::post_raw(TRANSCRIBE, &ct, body.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.assert_azure_headers("Sweden Central");
    let v = r.json();
    let text = v["text"].as_str().unwrap().to_string();
    assert_eq!(text.split(' ').count(), 4, "{text}");
    assert!(text.ends_with('.'));
    let u = &v["usage"];
    assert_eq!(u["type"], "tokens");
    assert_eq!(n(&u["input_token_details"]["audio_tokens"]), 20); // 64,000 / 3,200
    assert!(n(&u["input_token_details"]["text_tokens"]) > 0);
    assert_eq!(
        n(&u["input_tokens"]),
        n(&u["input_token_details"]["audio_tokens"]) + n(&u["input_token_details"]["text_tokens"])
    );
    assert!(n(&u["output_tokens"]) > 0);
    assert_eq!(
        n(&u["total_tokens"]),
        n(&u["input_tokens"]) + n(&u["output_tokens"])
    );

    // The same upload gives the same text.
    let again = send(sim.addr(), Call::post_raw(TRANSCRIBE, &ct, body))
        .await
        .json();
    assert_eq!(again["text"], text.as_str());

    let (ct, body) = multipart_form(&[
        ("file", Some("hello.wav"), &audio),
        ("response_format", None, b"text"),
    ]);
    let r = send(sim.addr(), Call::post_raw(TRANSCRIBE, &ct, body)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(std::str::from_utf8(&r.body).unwrap(), format!("{text}\n"));

    let (ct, body) = multipart_form(&[
        ("file", Some("hello.wav"), &audio),
        ("model", None, b"gpt-4o-transcribe"),
        ("response_format", None, b"verbose_json"),
    ]);
    let r = send(sim.addr(), Call::post_raw(TRANSCRIBE_V1, &ct, body)).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["task"], "transcribe");
    assert_eq!(v["duration"], 2.0);
    assert_eq!(v["segments"][0]["text"], v["text"]);

    let (ct, body) = multipart_form(&[("file", Some("hello.wav"), &audio)]);
    let r = send(sim.addr(), Call::post_raw(TRANSLATE, &ct, body)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["text"].as_str().unwrap().ends_with('.'));
}

#[tokio::test]
async fn transcription_errors_are_400() {
    let sim = start(region()).await;
    let (ct, body) = multipart_form(&[("prompt", None, b"no file here")]);
    let r = send(sim.addr(), Call::post_raw(TRANSCRIBE, &ct, body)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.assert_azure_headers("Sweden Central");
    let v = r.json();
    assert_eq!(v["error"]["param"], "file");
    assert_eq!(v["error"]["code"], "missing_required_parameter");

    // v1 needs the model field.
    let (ct, body) = multipart_form(&[("file", Some("a.wav"), b"RIFF")]);
    let r = send(sim.addr(), Call::post_raw(TRANSCRIBE_V1, &ct, body)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "model");

    let (ct, body) = multipart_form(&[
        ("file", Some("a.wav"), b"RIFF"),
        ("response_format", None, b"docx"),
    ]);
    let r = send(sim.addr(), Call::post_raw(TRANSCRIBE, &ct, body)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "response_format");

    let r = send(sim.addr(), Call::post(TRANSCRIBE, json!({"file": "x"}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// `(format tag, channels, sample rate, bits, data)` of a canonical WAV file.
fn parse_wav(b: &[u8]) -> (u16, u16, u32, u16, &[u8]) {
    assert_eq!(&b[0..4], b"RIFF");
    assert_eq!(
        u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
        b.len() - 8
    );
    assert_eq!(&b[8..12], b"WAVE");
    assert_eq!(&b[12..16], b"fmt ");
    assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 16);
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let rate = u32::from_le_bytes(b[24..28].try_into().unwrap());
    let byte_rate = u32::from_le_bytes(b[28..32].try_into().unwrap());
    assert_eq!(
        byte_rate,
        rate * u32::from(u16_at(22)) * u32::from(u16_at(34)) / 8
    );
    assert_eq!(&b[36..40], b"data");
    let len = u32::from_le_bytes(b[40..44].try_into().unwrap()) as usize;
    assert_eq!(len, b.len() - 44);
    (u16_at(20), u16_at(22), rate, u16_at(34), &b[44..])
}

#[tokio::test]
async fn speech_answers_wav_mp3_and_pcm() {
    let sim = start(region()).await;
    let input = "The lock gate opens and water flows."; // 36 characters: 360 ms
    let r = send(
        sim.addr(),
        Call::post(
            SPEECH,
            json!({"input": input, "voice": "alloy", "response_format": "wav"}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    r.assert_azure_headers("Sweden Central");
    assert_eq!(r.header("content-type"), Some("audio/wav"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    let (format, channels, rate, bits, data) = parse_wav(&r.body);
    assert_eq!((format, channels, rate, bits), (1, 1, 24_000, 16));
    assert_eq!(data.len(), 360 * 24 * 2);
    assert!(data.iter().any(|b| *b != 0), "a tone, not silence");

    // Longer input, longer audio.
    let long = "x".repeat(360);
    let r = send(
        sim.addr(),
        Call::post(
            SPEECH_V1,
            json!({"model": "tts-1", "input": long, "response_format": "wav"}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(parse_wav(&r.body).4.len(), 3_600 * 24 * 2);

    // MP3 is the default.
    let r = send(
        sim.addr(),
        Call::post(SPEECH, json!({"input": input, "voice": "nova"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("audio/mpeg"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert_eq!(r.body.len() % 384, 0);
    for frame in r.body.chunks(384) {
        assert_eq!(frame[..2], [0xFF, 0xFB], "MPEG-1 Layer III frame sync");
    }

    let r = send(
        sim.addr(),
        Call::post(SPEECH, json!({"input": input, "response_format": "pcm"})),
    )
    .await;
    assert_eq!(r.header("content-type"), Some("audio/pcm"));
    assert_eq!(r.body.len(), 360 * 24 * 2);

    for (body, param) in [
        (json!({"voice": "alloy"}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": "x".repeat(4097)}), "input"),
        (
            json!({"input": "hi", "response_format": "ogg"}),
            "response_format",
        ),
        (json!({"input": "hi", "speed": 9}), "speed"),
    ] {
        let r = send(sim.addr(), Call::post(SPEECH, body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let r = send(sim.addr(), Call::post(SPEECH_V1, json!({"input": "hi"}))).await;
    assert_eq!(r.json()["error"]["param"], "model");
}

/// Checks a PNG end to end (signature, chunk CRCs, IHDR, inflated IDAT size) and returns its
/// `(width, height)`.
fn check_png(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let mut pos = 8;
    let mut ihdr = None;
    let mut idat = Vec::new();
    let mut kinds = Vec::new();
    while pos < png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &png[pos + 4..pos + 8];
        let data = &png[pos + 8..pos + 8 + len];
        let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
        let mut h = crc32fast::Hasher::new();
        h.update(kind);
        h.update(data);
        assert_eq!(
            h.finalize(),
            crc,
            "CRC of {}",
            String::from_utf8_lossy(kind)
        );
        match kind {
            b"IHDR" => ihdr = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        kinds.push(String::from_utf8_lossy(kind).into_owned());
        pos += 12 + len;
    }
    assert_eq!(kinds.first().map(String::as_str), Some("IHDR"));
    assert_eq!(kinds.last().map(String::as_str), Some("IEND"));
    let ihdr = ihdr.unwrap();
    let w = u32::from_be_bytes(ihdr[0..4].try_into().unwrap());
    let h = u32::from_be_bytes(ihdr[4..8].try_into().unwrap());
    assert_eq!(&ihdr[8..], [8, 2, 0, 0, 0], "8-bit RGB");
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(idat.as_slice())
        .read_to_end(&mut raw)
        .expect("IDAT inflates");
    assert_eq!(raw.len() as u32, h * (1 + 3 * w));
    (w, h)
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

#[tokio::test]
async fn images_generate_valid_pngs() {
    let sim = start(region()).await;
    let r = send(
        sim.addr(),
        Call::post(
            GENERATE,
            json!({"prompt": "a lock on a quiet canal", "n": 2, "size": "1024x1024", "quality": "low"}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.assert_azure_headers("Sweden Central");
    let v = r.json();
    assert!(v["created"].as_u64().is_some());
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let pngs: Vec<Vec<u8>> = data
        .iter()
        .map(|d| b64(d["b64_json"].as_str().unwrap()))
        .collect();
    for png in &pngs {
        assert_eq!(check_png(png), (8, 8));
    }
    assert_ne!(pngs[0], pngs[1]);
    assert_eq!(data[0]["revised_prompt"], "a lock on a quiet canal");
    let u = &v["usage"];
    assert_eq!(n(&u["output_tokens"]), 2 * 272);
    assert!(n(&u["input_tokens"]) > 0);
    assert_eq!(
        n(&u["total_tokens"]),
        n(&u["input_tokens"]) + n(&u["output_tokens"])
    );

    let r = send(
        sim.addr(),
        Call::post(
            "/openai/v1/images/generations",
            json!({"model": "gpt-image-1", "prompt": "x", "response_format": "url"}),
        ),
    )
    .await;
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let png = b64(url.strip_prefix("data:image/png;base64,").unwrap());
    check_png(&png);

    for body in [
        json!({"n": 1}),
        json!({"prompt": "x", "n": 0}),
        json!({"prompt": "x", "size": "huge"}),
    ] {
        let r = send(sim.addr(), Call::post(GENERATE, body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test]
async fn images_edit_from_multipart() {
    let sim = start(region()).await;
    let source = b"\x89PNG\r\n\x1a\n pretend image bytes \x00\xff";
    let (ct, body) = multipart_form(&[
        ("model", None, b"gpt-image-1"),
        ("image[]", Some("a.png"), source),
        ("image[]", Some("b.png"), source),
        ("mask", Some("mask.png"), source),
        ("prompt", None, b"add a heron"),
    ]);
    let r = send(sim.addr(), Call::post_raw(EDIT_V1, &ct, body)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        check_png(&b64(v["data"][0]["b64_json"].as_str().unwrap())),
        (8, 8)
    );
    let u = &v["usage"];
    assert_eq!(n(&u["input_tokens_details"]["image_tokens"]), 2 * 85);
    assert_eq!(
        n(&u["input_tokens"]),
        n(&u["input_tokens_details"]["image_tokens"])
            + n(&u["input_tokens_details"]["text_tokens"])
    );

    let (ct, body) = multipart_form(&[
        ("image", Some("a.png"), source),
        ("prompt", None, b"x"),
        ("n", None, b"3"),
    ]);
    let r = send(
        sim.addr(),
        Call::post_raw(
            "/openai/deployments/gpt-image-1/images/edits?api-version=2025-04-01-preview",
            &ct,
            body,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 3);

    let (ct, body) = multipart_form(&[("model", None, b"m"), ("prompt", None, b"x")]);
    let r = send(sim.addr(), Call::post_raw(EDIT_V1, &ct, body)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "image");
    let (ct, body) = multipart_form(&[("model", None, b"m"), ("image", Some("a.png"), source)]);
    let r = send(sim.addr(), Call::post_raw(EDIT_V1, &ct, body)).await;
    assert_eq!(r.json()["error"]["param"], "prompt");
}

#[tokio::test]
async fn a_26_mib_upload_is_accepted_and_files_round_trip() {
    let sim = start(region()).await;
    // Every byte value, CRLFs and dashes included, over 26 MiB.
    let content: Vec<u8> = (0..26 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (ct, body) = multipart_form(&[
        ("file", Some("long.wav"), &content),
        ("response_format", None, b"json"),
    ]);
    assert!(body.len() > 26 * 1024 * 1024);
    let r = send(sim.addr(), Call::post_raw(TRANSCRIBE, &ct, body)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(
        n(&v["usage"]["input_token_details"]["audio_tokens"]),
        (26 * 1024 * 1024u64).div_ceil(3_200)
    );

    let (ct, body) = multipart_upload("assistants", "blob.bin", &content);
    let r = send(sim.addr(), Call::post_raw("/openai/v1/files", &ct, body)).await;
    assert_eq!(r.status, StatusCode::OK);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/openai/v1/files/{id}/content");
    let r = send(sim.addr(), Call::get(&path)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert!(r.body.as_ref() == content.as_slice(), "bytes round-trip");
}

#[tokio::test]
async fn media_endpoints_check_the_key_and_faults() {
    let mut cfg = region();
    cfg.api_key = Some("media-key".into());
    let sim = start(cfg).await;
    let r = send(sim.addr(), Call::post(SPEECH, json!({"input": "hi"}))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(
        sim.addr(),
        Call::post(SPEECH, json!({"input": "hi"}))
            .header("api-key", "media-key")
            .header("x-sim-fault", "status=503"),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = send(
        sim.addr(),
        Call::post(GENERATE, json!({"prompt": "hi"})).header("api-key", "media-key"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}
