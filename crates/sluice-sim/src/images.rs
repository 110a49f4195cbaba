//! Images: generations (JSON) and edits (`multipart/form-data`).
//!
//! Every image is a real 8x8 RGB PNG whose colours follow from the prompt and the image's
//! index, whatever `size` asks for (the answer echoes the size asked). `b64_json` (the
//! default) carries the PNG in base64; `url` answers a `data:image/png;base64,...` URL, since
//! the simulator hosts nothing. Usage follows the gpt-image models: the prompt's text tokens
//! plus 85 tokens per input image in, a fixed count per image out by `quality` (low 272,
//! medium and the default 1056, high 4160).

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use serde_json::{Value, json};
use sluice_base::{Clock, SystemClock};

use crate::audio::{bad_request, deployment_of, form_parts, json_media_request, missing};
use crate::body::SimBody;
use crate::encode;
use crate::multipart;
use crate::server::{
    Shared, add_ratelimit_headers, admit, deployment_settings, json_response, query_param,
};
use crate::synth;

/// Width and height of every generated image.
pub(crate) const IMAGE_SIDE: u32 = 8;
/// Input tokens per image given to an edit.
const INPUT_IMAGE_TOKENS: u64 = 85;
/// Most images per request.
const MAX_IMAGES: u64 = 10;

/// A validated image request.
#[derive(Debug)]
struct ImageRequest {
    deployment: String,
    prompt: String,
    n: u64,
    size: String,
    quality: String,
    data_url: bool,
    input_images: u64,
}

/// Output tokens of one image at `quality`.
fn tokens_per_image(quality: &str) -> u64 {
    match quality {
        "low" => 272,
        "high" | "hd" => 4_160,
        _ => 1_056,
    }
}

/// The 8x8 PNG for image `index` of `prompt`: a two-colour gradient seeded by both.
pub(crate) fn image_png(prompt: &str, index: u64) -> Vec<u8> {
    let seed = synth::fnv1a(prompt.as_bytes()) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let a = seed.to_le_bytes();
    let b = seed.rotate_left(29).to_le_bytes();
    let side = IMAGE_SIDE.max(2) - 1;
    encode::png_rgb(IMAGE_SIDE, IMAGE_SIDE, |x, y| {
        let t = (x + y) * 255 / (2 * side);
        let mix = |from: u8, to: u8| {
            let (from, to) = (u32::from(from), u32::from(to));
            ((from * (255 - t) + to * t) / 255) as u8
        };
        [mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2])]
    })
}

/// `n`, `size`, `quality` and `response_format`, read by `get` from a JSON body or a form.
fn options<'a>(
    get: impl Fn(&str) -> Option<OptionValue<'a>>,
) -> Result<(u64, String, String, bool), Box<Response<SimBody>>> {
    let invalid = |m: &str, p: &str| Box::new(bad_request(m, Some(p)));
    let n = match get("n") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_IMAGES).contains(&n) => n,
            _ => {
                return Err(invalid(
                    &format!("Invalid value for 'n': expected an integer from 1 to {MAX_IMAGES}."),
                    "n",
                ));
            }
        },
    };
    let string = |key: &str, default: &str| match get(key) {
        None => Ok(default.to_string()),
        Some(OptionValue::Text(s)) => Ok(s.to_string()),
        Some(OptionValue::Json(Value::String(s))) => Ok(s.clone()),
        Some(_) => Err(invalid(
            &format!("Invalid type for '{key}': expected a string."),
            key,
        )),
    };
    let size = string("size", "1024x1024")?;
    let valid_size = size == "auto"
        || size.split_once('x').is_some_and(|(w, h)| {
            [w, h]
                .iter()
                .all(|d| !d.is_empty() && d.len() <= 5 && d.bytes().all(|b| b.is_ascii_digit()))
        });
    if !valid_size {
        return Err(invalid(
            &format!("Invalid value for 'size': '{size}'. Expected 'auto' or WIDTHxHEIGHT."),
            "size",
        ));
    }
    let quality = string("quality", "auto")?;
    if !["auto", "low", "medium", "high", "standard", "hd"].contains(&quality.as_str()) {
        return Err(invalid(
            &format!(
                "Invalid value for 'quality': '{quality}'. Supported values are: 'low', \
                 'medium', 'high', 'auto', 'standard' and 'hd'."
            ),
            "quality",
        ));
    }
    let data_url = match string("response_format", "b64_json")?.as_str() {
        "b64_json" => false,
        "url" => true,
        other => {
            return Err(invalid(
                &format!(
                    "Invalid value for 'response_format': '{other}'. Supported values are: \
                     'b64_json' and 'url'."
                ),
                "response_format",
            ));
        }
    };
    Ok((n, size, quality, data_url))
}

/// A request option: a JSON value (generations) or a form field's text (edits).
#[derive(Clone, Copy, Debug)]
enum OptionValue<'a> {
    Json(&'a Value),
    Text(&'a str),
}

impl OptionValue<'_> {
    fn as_u64(self) -> Option<u64> {
        match self {
            OptionValue::Json(v) => v.as_u64(),
            OptionValue::Text(t) => t.parse().ok(),
        }
    }
}

/// `POST .../images/generations` (JSON: `prompt`, `n`, `size`, `quality`, `response_format`).
pub(crate) fn generate(
    shared: &Arc<Shared>,
    path_deployment: Option<String>,
    parts: &Parts,
    bytes: &[u8],
) -> Response<SimBody> {
    let (body, deployment) = match json_media_request(path_deployment, bytes) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let prompt = match body.get("prompt") {
        Some(Value::String(p)) if !p.is_empty() => p.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => return missing("prompt"),
        Some(_) => {
            return bad_request(
                "Invalid type for 'prompt': expected a string.",
                Some("prompt"),
            );
        }
    };
    let (n, size, quality, data_url) =
        match options(|k| body.get(k).filter(|v| !v.is_null()).map(OptionValue::Json)) {
            Ok(o) => o,
            Err(resp) => return *resp,
        };
    let req = ImageRequest {
        deployment,
        prompt,
        n,
        size,
        quality,
        data_url,
        input_images: 0,
    };
    answer(shared, &req, parts, "ImageGenerations_Create")
}

/// `POST .../images/edits` (multipart: `image` or `image[]`, repeatable; `prompt`; optional
/// `mask`, `n`, `size`, `quality`, `response_format`; `model` on v1).
pub(crate) fn edit(
    shared: &Arc<Shared>,
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
    let images = form
        .iter()
        .filter(|p| (p.name == "image" || p.name == "image[]") && !p.data.is_empty())
        .count() as u64;
    if images == 0 {
        return missing("image");
    }
    let Some(prompt) = field("prompt") else {
        return missing("prompt");
    };
    let (n, size, quality, data_url) = match options(|k| field(k).map(OptionValue::Text)) {
        Ok(o) => o,
        Err(resp) => return *resp,
    };
    let req = ImageRequest {
        deployment,
        prompt: prompt.to_string(),
        n,
        size,
        quality,
        data_url,
        input_images: images,
    };
    answer(shared, &req, parts, "ImageEdits_Create")
}

fn answer(
    shared: &Arc<Shared>,
    req: &ImageRequest,
    parts: &Parts,
    operation: &str,
) -> Response<SimBody> {
    let encoding = sluice_tokens::encoding_for_model(&req.deployment);
    let text_tokens = u64::from(sluice_tokens::count_text(encoding, &req.prompt)).max(1);
    let image_tokens = req.input_images * INPUT_IMAGE_TOKENS;
    let input_tokens = text_tokens + image_tokens;
    let output_tokens = req.n * tokens_per_image(&req.quality);
    let (_, tpm) = deployment_settings(&shared.cfg, &req.deployment);
    let api_version = query_param(parts.uri.query(), "api-version").unwrap_or("unknown");
    let admission = match admit(
        shared,
        &req.deployment,
        tpm,
        input_tokens + output_tokens,
        operation,
        api_version,
    ) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<Value> = (0..req.n)
        .map(|i| {
            let png = b64.encode(image_png(&req.prompt, i));
            if req.data_url {
                json!({ "url": format!("data:image/png;base64,{png}"), "revised_prompt": req.prompt })
            } else {
                json!({ "b64_json": png, "revised_prompt": req.prompt })
            }
        })
        .collect();
    let body = json!({
        "created": SystemClock.unix_now().as_secs(),
        "data": data,
        "background": "opaque",
        "output_format": "png",
        "quality": req.quality,
        "size": req.size,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": { "text_tokens": text_tokens, "image_tokens": image_tokens },
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    });
    let mut resp = json_response(StatusCode::OK, &body);
    if let Some(a) = admission {
        add_ratelimit_headers(resp.headers_mut(), &a);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_differ_by_prompt_and_index_and_are_stable() {
        let a = image_png("a lighthouse", 0);
        assert_eq!(a, image_png("a lighthouse", 0));
        assert_ne!(a, image_png("a lighthouse", 1));
        assert_ne!(a, image_png("a canal", 0));
        assert_eq!(&a[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&a[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes(a[16..20].try_into().unwrap()),
            IMAGE_SIDE
        );
    }

    #[test]
    fn options_validate() {
        let body = json!({"n": 2, "size": "512x256", "quality": "low", "response_format": "url"});
        let get = |k: &str| body.get(k).map(OptionValue::Json);
        let (n, size, quality, url) = options(get).unwrap();
        assert_eq!(
            (n, size.as_str(), quality.as_str(), url),
            (2, "512x256", "low", true)
        );
        for bad in [
            json!({"n": 0}),
            json!({"n": 11}),
            json!({"n": "2"}),
            json!({"size": "big"}),
            json!({"size": "10x"}),
            json!({"quality": "ultra"}),
            json!({"response_format": "png"}),
            json!({"size": 5}),
        ] {
            assert!(
                options(|k| bad.get(k).map(OptionValue::Json)).is_err(),
                "{bad}"
            );
        }
        let (n, ..) = options(|k| (k == "n").then_some(OptionValue::Text("3"))).unwrap();
        assert_eq!(n, 3);
        assert_eq!(tokens_per_image("high"), 4_160);
        assert_eq!(tokens_per_image("auto"), 1_056);
    }
}
