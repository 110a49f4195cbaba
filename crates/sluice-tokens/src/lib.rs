//! Token counting for Sluice: prompt estimates with a real tokenizer, and usage read from Azure
//! OpenAI responses and streams.
//!
//! * Before forwarding, [`estimate_request`] reads a request body and estimates its prompt tokens
//!   with OpenAI's BPE for the model family ([`encoding_for_model`], [`count_text`]).
//! * While the response streams back, a [`UsageScanner`] is fed every body chunk and, at the end,
//!   yields the actual [`Usage`]: the JSON body's `usage`, a stream's usage chunk, or — for a
//!   stream without one — the prompt estimate plus the streamed content counted token by token.
//!   It also notes the id of the object the call created ([`UsageScanner::object_id`]) and a
//!   failure reported inside a stream after its 200 status ([`UsageScanner::failure`]).
//! * When the gateway itself asked a chat stream for its usage chunk, a [`UsageChunkFilter`]
//!   removes that chunk before the stream reaches the client.
//! * For a relayed Realtime API WebSocket, a [`realtime::RealtimeScanner`] reads the frames as
//!   they pass and reports `response.created`, `response.done` (with its usage), `error` and
//!   close events, skipping audio without copying it.
//! * For multipart uploads (audio transcriptions, image edits), [`multipart::find_field`] reads
//!   a form field such as `model` from the start of the body.
//!
//! Chat completions, legacy completions, embeddings and the Responses API are understood
//! ([`Operation`]).
//!
//! The vocabularies are compiled into the binary (tiktoken-rs embeds them); nothing is fetched at
//! run time. Each vocabulary is parsed once, on first use, into a compact count-only table (about
//! a second for o200k in a debug build, a few hundred milliseconds optimised); call [`preload`]
//! at start-up to keep that off the first request, for the encodings the configuration uses.

mod chat_body;
mod count;
mod estimate;
mod filter;
mod json_walk;
mod lenient;
mod memo;
pub mod multipart;
pub mod realtime;
mod usage;
mod vocab;

pub use estimate::{RequestEstimate, estimate_request};
pub use filter::UsageChunkFilter;
pub use json_walk::{TopMember, top_members};
pub use usage::{StreamFailure, StreamFailureKind, Usage, UsageScanner, UsageSource};

/// The kind of Azure OpenAI call, which decides how a request body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `.../chat/completions`
    ChatCompletions,
    /// `.../completions` (legacy text completions)
    Completions,
    /// `.../embeddings`
    Embeddings,
    /// `.../responses` (the Responses API's create call; `responses/{id}` and its sub-paths are
    /// [`Operation::Other`]).
    Responses,
    /// Anything else: no prompt estimate.
    Other,
}

impl Operation {
    /// Classifies the path after the API prefix, e.g. `/deployments/{d}/chat/completions` or
    /// `/v1/embeddings`, by its last segments (ASCII case-insensitive; a query string or trailing
    /// slash is ignored).
    pub fn from_path(rest: &str) -> Operation {
        // Byte scans: `str::split` and `trim_end_matches` with a `char`
        // cost several times as much on these short paths.
        let bytes = rest.as_bytes();
        let mut end = memchr::memchr(b'?', bytes).unwrap_or(bytes.len());
        while end > 0 && bytes[end - 1] == b'/' {
            end -= 1;
        }
        // `?` and `/` are ASCII: `end` is a character boundary.
        let path = &rest[..end];
        if ends_with_segments(path, "chat/completions") {
            Operation::ChatCompletions
        } else if ends_with_segments(path, "completions") {
            Operation::Completions
        } else if ends_with_segments(path, "embeddings") {
            Operation::Embeddings
        } else if ends_with_segments(path, "responses") {
            Operation::Responses
        } else {
            Operation::Other
        }
    }
}

/// `path` ends with `suffix`, and the suffix starts at a segment boundary.
fn ends_with_segments(path: &str, suffix: &str) -> bool {
    let (p, s) = (path.as_bytes(), suffix.as_bytes());
    if p.len() < s.len() || !p[p.len() - s.len()..].eq_ignore_ascii_case(s) {
        return false;
    }
    p.len() == s.len() || p[p.len() - s.len() - 1] == b'/'
}

/// An OpenAI BPE vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the o-series; the default for unknown names.
    O200kBase,
    /// GPT-4 (not 4o), GPT-3.5 Turbo, the text-embedding models.
    Cl100kBase,
}

/// Name prefixes of o200k models that would otherwise match a cl100k prefix below.
const O200K_BEFORE_CL100K: &[&str] = &[
    "gpt-4o", "gpt4o", "gpt-4.1", "gpt4.1", "gpt-41", "gpt41", "gpt-4.5", "gpt4.5", "gpt-45",
    "gpt45",
];
/// Name prefixes of cl100k models.
const CL100K: &[&str] = &[
    "gpt-4",
    "gpt4",
    "gpt-35",
    "gpt35",
    "gpt-3.5",
    "gpt3.5",
    "text-embedding",
    "davinci-002",
    "babbage-002",
];

/// Picks the vocabulary for a model or deployment name (deployments are often named after their
/// model, so both `gpt-35-turbo` and `gpt-3.5-turbo` are understood). ASCII case-insensitive; an
/// `ft:` prefix or a `provider/` prefix is ignored; any name containing `embedding` is cl100k
/// (every OpenAI embedding model is). Unknown names get o200k, the current models' vocabulary.
pub fn encoding_for_model(model: &str) -> Encoding {
    // Lowercased only when it has capitals (names rarely do): no copy per call.
    let trimmed = model.trim();
    let lower = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    };
    let name = lower.rsplit('/').next().unwrap_or(&lower);
    let name = name.strip_prefix("ft:").unwrap_or(name);
    if O200K_BEFORE_CL100K.iter().any(|p| name.starts_with(p)) {
        Encoding::O200kBase
    } else if CL100K.iter().any(|p| name.starts_with(p)) || name.contains("embedding") {
        Encoding::Cl100kBase
    } else {
        Encoding::O200kBase
    }
}

/// Counts the tokens of `text` (special-token strings such as `<|endoftext|>` count as ordinary
/// text), saturating at `u32::MAX`. Exact for ordinary text; see the crate docs on long runs.
pub fn count_text(encoding: Encoding, text: &str) -> u32 {
    u32::try_from(count::count(encoding, text)).unwrap_or(u32::MAX)
}

/// Builds `encoding`'s tokenizer now (it is otherwise built on first use and shared after).
pub fn preload(encoding: Encoding) {
    count::vocab(encoding);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_from_paths() {
        use Operation::*;
        let cases = [
            ("/deployments/gpt-4o/chat/completions", ChatCompletions),
            ("/v1/chat/completions", ChatCompletions),
            (
                "/deployments/x/chat/completions?api-version=2024-10-21",
                ChatCompletions,
            ),
            (
                "/deployments/x/extensions/chat/completions",
                ChatCompletions,
            ),
            ("/deployments/x/Chat/Completions/", ChatCompletions),
            ("chat/completions", ChatCompletions),
            ("/deployments/davinci/completions", Completions),
            ("/v1/completions", Completions),
            ("/deployments/embed/embeddings", Embeddings),
            ("/v1/embeddings?x=1", Embeddings),
            ("/v1/embeddings//?x=/", Embeddings),
            ("/v1/embeddings?x=/chat/completions", Embeddings),
            ("///", Other),
            ("/v1/responses", Responses),
            ("/responses", Responses),
            ("responses", Responses),
            ("/openai/v1/responses", Responses),
            ("/openai/v1/Responses/?api-version=preview", Responses),
            (
                "/openai/responses?api-version=2025-04-01-preview",
                Responses,
            ),
            ("/v1/responses/resp_123", Other),
            ("/v1/responses/resp_123/input_items", Other),
            ("/responses/resp_123/cancel", Other),
            ("/v1/myresponses", Other),
            ("/deployments/x/images/generations", Other),
            ("/deployments/x/audio/transcriptions", Other),
            ("/v1/models", Other),
            ("/v1/mycompletions", Other),
            ("/v1/chat-completions", Other),
            ("", Other),
            ("/", Other),
        ];
        for (path, op) in cases {
            assert_eq!(Operation::from_path(path), op, "{path}");
        }
    }

    #[test]
    fn encodings_for_models() {
        use Encoding::*;
        let cases = [
            ("gpt-4o", O200kBase),
            ("gpt-4o-mini", O200kBase),
            ("gpt-4o-2024-08-06", O200kBase),
            ("GPT-4o", O200kBase),
            ("gpt4o-deployment", O200kBase),
            ("chatgpt-4o-latest", O200kBase),
            ("gpt-4.1", O200kBase),
            ("gpt-4.1-nano", O200kBase),
            ("gpt-41-mini", O200kBase),
            ("gpt-4.5-preview", O200kBase),
            ("gpt-5", O200kBase),
            ("gpt-5-mini", O200kBase),
            ("gpt-5.1-codex", O200kBase),
            ("o1", O200kBase),
            ("o1-mini", O200kBase),
            ("o3-mini", O200kBase),
            ("o4-mini", O200kBase),
            ("gpt-oss-120b", O200kBase),
            ("gpt-4", Cl100kBase),
            ("gpt-4-32k", Cl100kBase),
            ("gpt-4-0613", Cl100kBase),
            ("gpt-4-1106-preview", Cl100kBase),
            ("gpt-4-turbo", Cl100kBase),
            ("gpt-4-turbo-2024-04-09", Cl100kBase),
            ("gpt4", Cl100kBase),
            ("gpt-35-turbo", Cl100kBase),
            ("gpt-35-turbo-16k", Cl100kBase),
            ("gpt-35-turbo-instruct", Cl100kBase),
            ("gpt-3.5-turbo", Cl100kBase),
            ("gpt-3.5-turbo-0125", Cl100kBase),
            ("gpt35turbo", Cl100kBase),
            ("text-embedding-ada-002", Cl100kBase),
            ("text-embedding-3-small", Cl100kBase),
            ("text-embedding-3-large", Cl100kBase),
            ("my-embedding-deployment", Cl100kBase),
            ("davinci-002", Cl100kBase),
            ("ft:gpt-35-turbo:org::id", Cl100kBase),
            ("azure/gpt-4", Cl100kBase),
            ("chat", O200kBase),
            ("", O200kBase),
            ("some-unknown-model", O200kBase),
        ];
        for (name, enc) in cases {
            assert_eq!(encoding_for_model(name), enc, "{name}");
        }
    }

    #[test]
    fn count_text_known_values() {
        preload(Encoding::O200kBase);
        preload(Encoding::Cl100kBase);
        assert_eq!(count_text(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::O200kBase, ""), 0);
        // Special-token text is counted as ordinary text, never as one special token.
        assert!(count_text(Encoding::Cl100kBase, "<|endoftext|>") > 1);
    }
}
