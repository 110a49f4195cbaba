//! Audio: transcriptions and translations of an uploaded file, and speech.
//!
//! Transcriptions and translations take `multipart/form-data` (`file`, `model` on v1, optional
//! `response_format`, `prompt`, `language`, `temperature`). The "recognised" text is a
//! sentence of generated words, picked deterministically from the file's name and size (one
//! word per 16,000 bytes, 3 to 200 words), so the same upload always gives the same answer.
//! Usage is reported in the token form of the gpt-4o transcribe models: the prompt's text
//! tokens and one audio token per 3,200 bytes of file in, the text's tokens out.
//!
//! Speech takes JSON (`model` on v1, `input`, `voice`, `response_format`, `speed`) and answers
//! 10 ms of audio per input character (at least 100 ms): a 440 Hz tone as WAV or raw PCM16 at
//! 24 kHz, or silent MP3 frames.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderValue, Response, StatusCode};
use serde_json::{Value, json};

use crate::body::SimBody;
use crate::encode;
use crate::multipart;
use crate::server::{
    Shared, add_ratelimit_headers, admit, deployment_settings, json_object_body, json_response,
    oai_error, query_param,
};
use crate::synth;

/// Bytes of uploaded audio per input audio token (100 ms of 16 kHz mono PCM16).
const AUDIO_BYTES_PER_TOKEN: usize = 3_200;
/// Bytes per second assumed when a duration is reported (16 kHz mono PCM16).
const AUDIO_BYTES_PER_SECOND: f64 = 32_000.0;
/// Bytes of upload per recognised word.
const BYTES_PER_WORD: usize = 16_000;
/// Fewest and most recognised words.
const MIN_WORDS: u64 = 3;
const MAX_WORDS: u64 = 200;
/// Longest speech `input`, in characters (the service's limit).
const MAX_SPEECH_INPUT: usize = 4_096;
/// Milliseconds of speech per input character, and the least speech answered.
const SPEECH_MS_PER_CHAR: f64 = 10.0;
const MIN_SPEECH_MS: f64 = 100.0;

/// Transcribe (keep the language) or translate (into English).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AudioTask {
    Transcribe,
    Translate,
}

impl AudioTask {
    fn operation(self) -> &'static str {
        match self {
            AudioTask::Transcribe => "AudioTranscriptions_Create",
            AudioTask::Translate => "AudioTranslations_Create",
        }
    }

    fn name(self) -> &'static str {
        match self {
            AudioTask::Transcribe => "transcribe",
            AudioTask::Translate => "translate",
        }
    }
}

pub(crate) fn bad_request(message: &str, param: Option<&str>) -> Response<SimBody> {
    oai_error(StatusCode::BAD_REQUEST, message, param, None)
}

pub(crate) fn missing(param: &str) -> Response<SimBody> {
    oai_error(
        StatusCode::BAD_REQUEST,
        &format!("Missing required parameter: '{param}'."),
        Some(param),
        Some("missing_required_parameter"),
    )
}

/// The deployment of a media request: from the path (`/openai/deployments/{d}/...`), else
/// from the `model` field (v1); a 400 when neither names one.
pub(crate) fn deployment_of(
    path_deployment: Option<String>,
    model_field: Option<&str>,
) -> Result<String, Box<Response<SimBody>>> {
    match path_deployment {
        Some(d) => Ok(d),
        None => match model_field {
            Some(m) if !m.is_empty() => Ok(m.to_string()),
            _ => Err(Box::new(missing("model"))),
        },
    }
}

/// A JSON media request's object body and its deployment (path, else the
/// body's `model`), or the 400 to answer.
pub(crate) fn json_media_request(
    path_deployment: Option<String>,
    bytes: &[u8],
) -> Result<(Value, String), Box<Response<SimBody>>> {
    let body = json_object_body(bytes)?;
    let deployment = deployment_of(path_deployment, body.get("model").and_then(Value::as_str))?;
    Ok((body, deployment))
}

/// The parts of a `multipart/form-data` request, or the 400 for anything else.
pub(crate) fn form_parts(
    parts: &Parts,
    body: &[u8],
) -> Result<Vec<multipart::Part>, Box<Response<SimBody>>> {
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    multipart::parse_form(content_type, body).map_err(|m| Box::new(bad_request(&m, None)))
}

/// A response with a binary body of the given content type.
pub(crate) fn binary_response(content_type: &'static str, bytes: Vec<u8>) -> Response<SimBody> {
    let len = bytes.len();
    let mut resp = Response::new(SimBody::full(bytes));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// Charge `cost` tokens; the finished 429 when the deployment's limiter refuses.
fn charge(
    shared: &Shared,
    deployment: &str,
    cost: u64,
    operation: &str,
    query: Option<&str>,
) -> Result<Option<crate::Admission>, Box<Response<SimBody>>> {
    let (_, tpm) = deployment_settings(&shared.cfg, deployment);
    let api_version = query_param(query, "api-version").unwrap_or("unknown");
    admit(shared, deployment, tpm, cost, operation, api_version)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextFormat {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

fn text_format(value: Option<&str>) -> Result<TextFormat, Box<Response<SimBody>>> {
    Ok(match value {
        None | Some("json") => TextFormat::Json,
        Some("text") => TextFormat::Text,
        Some("verbose_json") => TextFormat::VerboseJson,
        Some("srt") => TextFormat::Srt,
        Some("vtt") => TextFormat::Vtt,
        Some(other) => {
            return Err(Box::new(bad_request(
                &format!(
                    "Invalid value for 'response_format': '{other}'. Supported values are: \
                     'json', 'text', 'srt', 'verbose_json' and 'vtt'."
                ),
                Some("response_format"),
            )));
        }
    })
}

/// The recognised sentence for an upload: deterministic in the file's name, size and task.
fn recognised_text(task: AudioTask, filename: &str, len: usize) -> String {
    let mut seed_input = Vec::with_capacity(filename.len() + 9);
    seed_input.extend_from_slice(filename.as_bytes());
    seed_input.extend_from_slice(&(len as u64).to_le_bytes());
    seed_input.push(task as u8);
    let words = ((len / BYTES_PER_WORD) as u64).clamp(MIN_WORDS, MAX_WORDS);
    synth::sentence(synth::fnv1a(&seed_input), words)
}

/// `hh:mm:ss` plus milliseconds after `separator` (`,` for SRT, `.` for WebVTT).
fn timestamp(seconds: f64, separator: char) -> String {
    let ms = (seconds * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{separator}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// `POST .../audio/transcriptions` and `.../audio/translations`.
pub(crate) fn transcribe(
    shared: &Arc<Shared>,
    task: AudioTask,
    path_deployment: Option<String>,
    parts: &Parts,
    body: Bytes,
) -> Response<SimBody> {
    let form = match form_parts(parts, &body) {
        Ok(f) => f,
        Err(resp) => return *resp,
    };
    let field = |name: &str| multipart::field(&form, &body, name);
    let deployment = match deployment_of(path_deployment, field("model")) {
        Ok(d) => d,
        Err(resp) => return *resp,
    };
    let Some(file) = form.iter().find(|p| p.name == "file") else {
        return missing("file");
    };
    if file.data.is_empty() {
        return oai_error(
            StatusCode::BAD_REQUEST,
            "The audio file is empty.",
            Some("file"),
            Some("invalid_value"),
        );
    }
    let format = match text_format(field("response_format")) {
        Ok(f) => f,
        Err(resp) => return *resp,
    };
    let len = file.data.len();
    let filename = file.filename.as_deref().unwrap_or("file");
    let text = recognised_text(task, filename, len);

    let encoding = sluice_tokens::encoding_for_model(&deployment);
    let prompt_tokens =
        field("prompt").map_or(0, |p| u64::from(sluice_tokens::count_text(encoding, p)));
    let audio_tokens = len.div_ceil(AUDIO_BYTES_PER_TOKEN).max(1) as u64;
    let output_tokens = u64::from(sluice_tokens::count_text(encoding, &text)).max(1);
    let input_tokens = prompt_tokens + audio_tokens;
    let admission = match charge(
        shared,
        &deployment,
        input_tokens + output_tokens,
        task.operation(),
        parts.uri.query(),
    ) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };

    let usage = json!({
        "type": "tokens",
        "input_tokens": input_tokens,
        "input_token_details": { "text_tokens": prompt_tokens, "audio_tokens": audio_tokens },
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    });
    let duration = ((len as f64 / AUDIO_BYTES_PER_SECOND) * 100.0).round() / 100.0;
    let language = match task {
        AudioTask::Translate => "english".to_string(),
        AudioTask::Transcribe => field("language").unwrap_or("english").to_string(),
    };
    let mut resp = match format {
        TextFormat::Json => json_response(StatusCode::OK, &json!({ "text": text, "usage": usage })),
        TextFormat::VerboseJson => json_response(
            StatusCode::OK,
            &json!({
                "task": task.name(),
                "language": language,
                "duration": duration,
                "text": text,
                "segments": [{
                    "id": 0,
                    "seek": 0,
                    "start": 0.0,
                    "end": duration,
                    "text": text,
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": -0.2,
                    "compression_ratio": 1.0,
                    "no_speech_prob": 0.01,
                }],
                "usage": usage,
            }),
        ),
        TextFormat::Text => text_response("text/plain; charset=utf-8", format!("{text}\n")),
        TextFormat::Srt => text_response(
            "text/plain; charset=utf-8",
            format!(
                "1\n{} --> {}\n{text}\n\n",
                timestamp(0.0, ','),
                timestamp(duration, ',')
            ),
        ),
        TextFormat::Vtt => text_response(
            "text/vtt; charset=utf-8",
            format!(
                "WEBVTT\n\n{} --> {}\n{text}\n\n",
                timestamp(0.0, '.'),
                timestamp(duration, '.')
            ),
        ),
    };
    if let Some(a) = admission {
        add_ratelimit_headers(resp.headers_mut(), &a);
    }
    // Which deployment served it (a gateway renames deployments per backend).
    if let Ok(v) = HeaderValue::from_str(&deployment) {
        resp.headers_mut().insert("x-sim-deployment", v);
    }
    resp
}

fn text_response(content_type: &'static str, text: String) -> Response<SimBody> {
    let mut resp = Response::new(SimBody::full(text));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The audio format asked of speech.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpeechFormat {
    Mp3,
    Wav,
    Pcm,
}

/// Milliseconds of speech for `chars` input characters at `speed`.
fn speech_ms(chars: usize, speed: f64) -> f64 {
    (chars as f64 * SPEECH_MS_PER_CHAR).max(MIN_SPEECH_MS) / speed
}

/// The audio bytes and content type of speech lasting `ms` milliseconds.
fn speech_audio(format: SpeechFormat, ms: f64) -> (&'static str, Vec<u8>) {
    let rate = encode::SPEECH_SAMPLE_RATE;
    let samples = (ms * f64::from(rate) / 1000.0).round() as usize;
    match format {
        SpeechFormat::Wav => (
            "audio/wav",
            encode::wav(&encode::pcm16_tone(samples, rate), rate),
        ),
        SpeechFormat::Pcm => ("audio/pcm", encode::pcm16_tone(samples, rate)),
        SpeechFormat::Mp3 => {
            let frames = (ms / encode::MP3_FRAME_MS as f64).ceil().max(1.0) as usize;
            ("audio/mpeg", encode::mp3_silence(frames))
        }
    }
}

/// `POST .../audio/speech`.
pub(crate) fn speech(
    shared: &Arc<Shared>,
    path_deployment: Option<String>,
    parts: &Parts,
    bytes: &[u8],
) -> Response<SimBody> {
    let (body, deployment) = match json_media_request(path_deployment, bytes) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let input = match body.get("input") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        None | Some(Value::Null) | Some(Value::String(_)) => return missing("input"),
        Some(_) => {
            return bad_request(
                "Invalid type for 'input': expected a string.",
                Some("input"),
            );
        }
    };
    let chars = input.chars().count();
    if chars > MAX_SPEECH_INPUT {
        return oai_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Invalid 'input': string too long. Expected a string with maximum length \
                 {MAX_SPEECH_INPUT}, but got a string with length {chars} instead."
            ),
            Some("input"),
            Some("string_above_max_length"),
        );
    }
    match body.get("voice") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(_) => {
            return bad_request(
                "Invalid type for 'voice': expected a string.",
                Some("voice"),
            );
        }
    }
    let format = match body.get("response_format") {
        None | Some(Value::Null) => SpeechFormat::Mp3,
        Some(Value::String(f)) => match f.as_str() {
            "mp3" => SpeechFormat::Mp3,
            "wav" => SpeechFormat::Wav,
            "pcm" => SpeechFormat::Pcm,
            "opus" | "aac" | "flac" => {
                return bad_request(
                    &format!(
                        "The simulator does not produce '{f}' audio; use 'mp3', 'wav' or 'pcm'."
                    ),
                    Some("response_format"),
                );
            }
            other => {
                return bad_request(
                    &format!(
                        "Invalid value for 'response_format': '{other}'. Supported values are: \
                         'mp3', 'opus', 'aac', 'flac', 'wav' and 'pcm'."
                    ),
                    Some("response_format"),
                );
            }
        },
        Some(_) => {
            return bad_request(
                "Invalid type for 'response_format': expected a string.",
                Some("response_format"),
            );
        }
    };
    let speed = match body.get("speed") {
        None | Some(Value::Null) => 1.0,
        Some(v) => match v.as_f64() {
            Some(s) if (0.25..=4.0).contains(&s) => s,
            _ => {
                return bad_request(
                    "Invalid value for 'speed': expected a number between 0.25 and 4.0.",
                    Some("speed"),
                );
            }
        },
    };
    let encoding = sluice_tokens::encoding_for_model(&deployment);
    let tokens = u64::from(sluice_tokens::count_text(encoding, input)).max(1);
    let admission = match charge(
        shared,
        &deployment,
        tokens,
        "AudioSpeech_Create",
        parts.uri.query(),
    ) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let (content_type, audio) = speech_audio(format, speech_ms(chars, speed));
    let mut resp = binary_response(content_type, audio);
    if let Some(a) = admission {
        add_ratelimit_headers(resp.headers_mut(), &a);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognised_text_is_deterministic_and_sized() {
        let a = recognised_text(AudioTask::Transcribe, "a.wav", 1000);
        assert_eq!(a, recognised_text(AudioTask::Transcribe, "a.wav", 1000));
        assert_eq!(a.split(' ').count(), 3);
        assert!(a.ends_with('.'));
        assert!(a.starts_with(|c: char| c.is_ascii_uppercase()), "{a}");
        let long = recognised_text(AudioTask::Transcribe, "a.wav", 10 * BYTES_PER_WORD);
        assert_eq!(long.split(' ').count(), 10);
        let huge = recognised_text(AudioTask::Transcribe, "a.wav", 100_000_000);
        assert_eq!(huge.split(' ').count(), MAX_WORDS as usize);
        assert_ne!(
            recognised_text(AudioTask::Transcribe, "a.wav", 1000),
            recognised_text(AudioTask::Transcribe, "b.wav", 1000),
        );
    }

    #[test]
    fn subtitle_timestamps() {
        assert_eq!(timestamp(0.0, ','), "00:00:00,000");
        assert_eq!(timestamp(3_725.5, '.'), "01:02:05.500");
    }

    #[test]
    fn response_formats_parse() {
        assert_eq!(text_format(None).unwrap(), TextFormat::Json);
        assert_eq!(text_format(Some("text")).unwrap(), TextFormat::Text);
        assert_eq!(
            text_format(Some("verbose_json")).unwrap(),
            TextFormat::VerboseJson
        );
        assert!(text_format(Some("xml")).is_err());
    }

    #[test]
    fn speech_lengths_follow_the_input() {
        assert_eq!(speech_ms(1, 1.0), 100.0);
        assert_eq!(speech_ms(50, 1.0), 500.0);
        assert_eq!(speech_ms(50, 2.0), 250.0);
        let (ct, wav) = speech_audio(SpeechFormat::Wav, 500.0);
        assert_eq!(ct, "audio/wav");
        assert_eq!(wav.len(), 44 + 12_000 * 2);
        let (ct, pcm) = speech_audio(SpeechFormat::Pcm, 100.0);
        assert_eq!((ct, pcm.len()), ("audio/pcm", 4_800));
        let (ct, mp3) = speech_audio(SpeechFormat::Mp3, 100.0);
        assert_eq!(ct, "audio/mpeg");
        assert_eq!(mp3.len(), 5 * encode::MP3_FRAME_BYTES);
    }
}
