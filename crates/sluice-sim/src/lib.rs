//! An in-process Azure OpenAI simulator.
//!
//! One [`Simulator`] instance plays one Azure OpenAI resource in one region. It speaks HTTP/1.1
//! on a local socket and answers the data-plane routes that matter for a gateway
//! (`chat/completions`, legacy `completions`, `embeddings`, both the classic
//! `/openai/deployments/{name}/...` and the `/openai/v1/...` forms) with Azure-shaped bodies,
//! headers, SSE streams, per-deployment token/request rate limits and injectable faults.
//!
//! Per region it also keeps the resource-style APIs, under both `/openai/v1/...` and
//! `/openai/...`: the Responses API (`responses`, JSON or SSE, stored responses,
//! `previous_response_id` chains, `input_items`), `files` (multipart uploads), `batches`
//! (recorded, never run) and `models`. What a region stores is its own, bounded to the newest
//! 10,000 objects of each kind.
//!
//! Audio and images are answered under `/openai/v1/...` (the deployment named by the `model`
//! field) and `/openai/deployments/{name}/...`: `audio/transcriptions` and
//! `audio/translations` (multipart; deterministic text and token usage), `audio/speech` (a
//! generated WAV, MP3 or PCM body) and `images/generations` / `images/edits` (real 8x8 PNGs).
//! Realtime sessions run over WebSocket at `GET /openai/v1/realtime?model=...` (GA event
//! names) and `GET /openai/realtime?api-version=...&deployment=...` (preview names); the key
//! may also come as an `api-key` query parameter there, and faults answer in place of the 101.
//! A client event `{"type":"sim.pad","bytes":N}` makes a session send one audio delta of about
//! `N` base64 characters, and `response.sim_deltas` in `response.create` sets how many text
//! deltas a response has. [`SimHandle::realtime_sessions`] counts open sessions (at most
//! 10,000 per region by default, see [`SimHandle::set_max_realtime_sessions`]).
//!
//! Faults can be injected three ways: [`SimHandle::set_fault`]; a per-request header
//! `x-sim-fault: <form>` (optionally limited to the simulators named in
//! `x-sim-fault-region: name[,name]`); or the control endpoint `POST /_sim/fault` with
//! `{"fault":"status=503","times":2}` (`{"fault":null}` clears). `GET /_sim/stats` returns
//! `{"requests":N,"realtime_sessions":open,"realtime_sessions_total":accepted}` and `GET /` is
//! a plain-text health check. See [`parse_fault`] for the textual forms. A streamed request
//! with `x-sim-stream-fail: response.failed` or `error` (also filtered by
//! `x-sim-fault-region`) keeps its 200 status but fails after two deltas; on a realtime
//! handshake the header makes every response of the session fail that way.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use sluice_sim::{Fault, RegionConfig, Simulator};
//! let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), RegionConfig::new("eastus")).await?;
//! sim.set_fault(Fault::Status(503), Some(1));
//! println!("simulator at {}", sim.url());
//! sim.shutdown();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

mod audio;
mod body;
mod encode;
mod images;
pub mod limiter;
mod multipart;
mod realtime;
mod resources;
mod responses;
mod routes;
mod server;
mod store;
mod synth;

pub use limiter::{Admission, RateLimiter, Throttle, ThrottleKind};
pub use server::{SimHandle, Simulator};
pub use sluice_base::Secret;

/// Configuration of one simulated region (one Azure OpenAI resource).
#[derive(Clone, Debug)]
pub struct RegionConfig {
    /// Short name, e.g. `eastus`. Matched against the `x-sim-fault-region` request header.
    pub name: String,
    /// Value of the `x-ms-region` response header, e.g. `East US`.
    pub display_region: String,
    /// When set, every `/openai` request must carry `api-key` equal to it (or
    /// `Authorization: Bearer <key>`), otherwise 401. Prints redacted.
    pub api_key: Option<Secret>,
    /// Simulated model latency.
    pub latency: Latency,
    /// Default tokens-per-minute limit for every deployment; `None` = unlimited.
    pub default_tokens_per_minute: Option<u64>,
    /// Optional per-deployment overrides. Any deployment name is accepted.
    pub deployments: HashMap<String, DeploymentConfig>,
    /// Completion length (in words = tokens) when the request has no `max_tokens`.
    pub completion_tokens: u32,
    /// Embedding vector length when the request has no `dimensions`.
    pub embedding_dimensions: usize,
}

impl RegionConfig {
    /// A region with defaults: no key, zero latency, unlimited, 24 completion tokens,
    /// 1536-dimensional embeddings. `display_region` is derived from well-known Azure short
    /// names (`eastus` → `East US`), otherwise it is the name itself.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let display_region = display_name_for(&name);
        RegionConfig {
            name,
            display_region,
            api_key: None,
            latency: Latency::default(),
            default_tokens_per_minute: None,
            deployments: HashMap::new(),
            completion_tokens: 24,
            embedding_dimensions: 1536,
        }
    }
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig::new("local")
    }
}

fn display_name_for(name: &str) -> String {
    const KNOWN: &[(&str, &str)] = &[
        ("eastus", "East US"),
        ("eastus2", "East US 2"),
        ("westus", "West US"),
        ("westus2", "West US 2"),
        ("westus3", "West US 3"),
        ("centralus", "Central US"),
        ("northcentralus", "North Central US"),
        ("southcentralus", "South Central US"),
        ("canadaeast", "Canada East"),
        ("brazilsouth", "Brazil South"),
        ("swedencentral", "Sweden Central"),
        ("switzerlandnorth", "Switzerland North"),
        ("francecentral", "France Central"),
        ("germanywestcentral", "Germany West Central"),
        ("norwayeast", "Norway East"),
        ("polandcentral", "Poland Central"),
        ("uksouth", "UK South"),
        ("westeurope", "West Europe"),
        ("northeurope", "North Europe"),
        ("spaincentral", "Spain Central"),
        ("italynorth", "Italy North"),
        ("japaneast", "Japan East"),
        ("koreacentral", "Korea Central"),
        ("australiaeast", "Australia East"),
        ("southindia", "South India"),
        ("southafricanorth", "South Africa North"),
        ("uaenorth", "UAE North"),
    ];
    KNOWN
        .iter()
        .find(|(short, _)| short.eq_ignore_ascii_case(name))
        .map(|(_, display)| (*display).to_string())
        .unwrap_or_else(|| name.to_string())
}

/// Per-deployment overrides.
#[derive(Clone, Debug, Default)]
pub struct DeploymentConfig {
    /// Model name reported in responses; defaults to the deployment name.
    pub model: Option<String>,
    /// Tokens-per-minute limit; `None` falls back to [`RegionConfig::default_tokens_per_minute`].
    pub tokens_per_minute: Option<u64>,
}

/// Simulated latency. All zero by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Delay before the first generated token (non-stream: added to the total).
    pub time_to_first_token: Duration,
    /// Delay before each generated token.
    pub per_token: Duration,
    /// Delay before an embeddings response.
    pub embeddings: Duration,
}

/// An injected failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Reply with this status and an Azure-shaped error body.
    Status(u16),
    /// Accept the request and never answer (until the client leaves or the server shuts down).
    Hang,
    /// Close the TCP connection without answering.
    Close,
    /// Wait this long before sending the response head, then answer normally.
    SlowFirstByte(Duration),
    /// Answer 429 asking the caller to wait this long (`retry-after-ms`,
    /// and `retry-after` in whole seconds, rounded up).
    Throttle(Duration),
}

impl fmt::Display for Fault {
    /// The textual form accepted by [`parse_fault`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Status(code) => write!(f, "status={code}"),
            Fault::Hang => f.write_str("hang"),
            Fault::Close => f.write_str("close"),
            Fault::SlowFirstByte(d) => write!(f, "slow-first-byte={}", d.as_millis()),
            Fault::Throttle(d) => write!(f, "throttle={}", d.as_millis()),
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_fault(s)
    }
}

/// Parse the textual fault form used by the `x-sim-fault` header, the control endpoint and
/// the CLI: `status=503`, `hang`, `close`, `slow-first-byte=1500` (milliseconds; an `ms`
/// suffix is tolerated). Case-insensitive, surrounding whitespace ignored.
pub fn parse_fault(s: &str) -> Result<Fault, String> {
    let text = s.trim().to_ascii_lowercase();
    let (kind, arg) = match text.split_once('=') {
        Some((k, v)) => (k.trim(), Some(v.trim())),
        None => (text.as_str(), None),
    };
    match (kind, arg) {
        ("hang", None) => Ok(Fault::Hang),
        ("close", None) => Ok(Fault::Close),
        ("status", Some(v)) => {
            let code: u16 = v
                .parse()
                .map_err(|_| format!("invalid status code {v:?} in fault {s:?}"))?;
            if (200..=599).contains(&code) {
                Ok(Fault::Status(code))
            } else {
                Err(format!(
                    "status code {code} out of range 200..=599 in fault {s:?}"
                ))
            }
        }
        ("slow-first-byte" | "throttle", Some(v)) => {
            let digits = v.strip_suffix("ms").unwrap_or(v).trim();
            let ms: u64 = digits
                .parse()
                .map_err(|_| format!("invalid millisecond value {v:?} in fault {s:?}"))?;
            let d = Duration::from_millis(ms);
            Ok(if kind == "throttle" {
                Fault::Throttle(d)
            } else {
                Fault::SlowFirstByte(d)
            })
        }
        _ => Err(format!(
            "unknown fault {s:?}; expected status=<code>, hang, close, slow-first-byte=<ms> or throttle=<ms>"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_fault_forms() {
        assert_eq!(parse_fault("status=503"), Ok(Fault::Status(503)));
        assert_eq!(parse_fault(" Status = 429 "), Ok(Fault::Status(429)));
        assert_eq!(parse_fault("hang"), Ok(Fault::Hang));
        assert_eq!(parse_fault("CLOSE"), Ok(Fault::Close));
        assert_eq!(
            parse_fault("slow-first-byte=1500"),
            Ok(Fault::SlowFirstByte(Duration::from_millis(1500)))
        );
        assert_eq!(
            parse_fault("slow-first-byte=20ms"),
            Ok(Fault::SlowFirstByte(Duration::from_millis(20)))
        );
        assert_eq!(
            parse_fault("throttle=2500"),
            Ok(Fault::Throttle(Duration::from_millis(2500)))
        );
    }

    #[test]
    fn rejects_bad_fault_forms() {
        for bad in [
            "",
            "status",
            "status=",
            "status=abc",
            "status=99",
            "status=600",
            "status=70000",
            "hang=1",
            "slow-first-byte",
            "slow-first-byte=-1",
            "throttle",
            "throttle=x",
            "explode",
        ] {
            assert!(parse_fault(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        for f in [
            Fault::Status(500),
            Fault::Hang,
            Fault::Close,
            Fault::SlowFirstByte(Duration::from_millis(250)),
            Fault::Throttle(Duration::from_millis(1500)),
        ] {
            assert_eq!(parse_fault(&f.to_string()), Ok(f));
        }
    }

    #[test]
    fn region_defaults() {
        let c = RegionConfig::new("eastus");
        assert_eq!(c.display_region, "East US");
        assert_eq!(c.completion_tokens, 24);
        assert_eq!(c.embedding_dimensions, 1536);
        assert_eq!(RegionConfig::new("mars").display_region, "mars");
    }

    #[test]
    fn debug_never_prints_the_api_key() {
        let mut c = RegionConfig::new("eastus");
        c.api_key = Some("sim-key-sentinel".into());
        let printed = format!("{c:?}");
        assert!(!printed.contains("sentinel"), "{printed}");
        assert!(printed.contains("api_key: Some(<redacted>)"), "{printed}");
    }
}
