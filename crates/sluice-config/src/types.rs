//! The validated, resolved configuration handed to the rest of Sluice.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::Secret;

/// A fully validated configuration with defaults applied and secrets resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// Service name reported in traces (`serviceName`). Default `sluice`.
    pub service_name: String,
    /// Gateway listener and limits.
    pub server: Server,
    /// Simulated Azure OpenAI regions to start in-process.
    pub simulators: Vec<SimulatorRegion>,
    /// Upstreams, in file order.
    pub backends: Vec<Backend>,
    /// Subscriptions (client keys), in file order.
    pub subscriptions: Vec<Subscription>,
    /// APIs, in file order.
    pub apis: Vec<Api>,
}

/// The gateway listener.
#[derive(Debug, Clone)]
pub struct Server {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Worker threads, 1..=256.
    pub threads: usize,
    /// Largest accepted request body; larger bodies get 413.
    pub max_request_body_bytes: u64,
    /// Default upstream timeouts.
    pub timeouts: Timeouts,
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP/TLS connect.
    pub connect: Duration,
    /// Waiting for (each chunk of) the upstream response.
    pub read: Duration,
    /// Sending the request upstream.
    pub write: Duration,
}

impl Default for Timeouts {
    /// 5 s connect, 300 s read, 60 s write.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_millis(5_000),
            read: Duration::from_millis(300_000),
            write: Duration::from_millis(60_000),
        }
    }
}

/// One simulated Azure OpenAI region.
#[derive(Debug, Clone)]
pub struct SimulatorRegion {
    /// Unique name, `[a-z0-9_-]+`; backends refer to it.
    pub name: String,
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Value of the `x-ms-region` response header.
    pub region: String,
    /// If set, requests must carry this `api-key`.
    pub api_key: Option<Secret>,
    /// Delay before the first token (or before a non-streamed response).
    pub time_to_first_token: Duration,
    /// Delay per generated token.
    pub per_token: Duration,
    /// Latency of an embeddings call.
    pub embeddings_latency: Duration,
    /// Region-wide tokens-per-minute limit; `None` = unlimited.
    pub tokens_per_minute: Option<u64>,
    /// Completion tokens generated per response (> 0).
    pub completion_tokens: u32,
    /// Length of returned embedding vectors, 1..=8192.
    pub embedding_dimensions: usize,
    /// Deployments given their own model name or limit.
    pub deployments: BTreeMap<String, SimDeployment>,
}

/// A deployment served by a simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimDeployment {
    /// Model name reported in responses; `None` = not configured.
    pub model: Option<String>,
    /// Per-deployment tokens-per-minute limit; `None` = unlimited.
    pub tokens_per_minute: Option<u64>,
}

/// An upstream Azure OpenAI endpoint (real or simulated).
#[derive(Debug, Clone)]
pub struct Backend {
    /// Unique name; APIs refer to it.
    pub name: String,
    /// Where requests go.
    pub target: BackendTarget,
    /// Sent upstream as `api-key` when set.
    pub api_key: Option<Secret>,
    /// Client deployment name -> this backend's deployment name.
    pub deployments: BTreeMap<String, String>,
    /// `server.timeouts`, overridden per field.
    pub timeouts: Timeouts,
}

/// Where a backend sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendTarget {
    /// A real endpoint.
    Url(BackendUrl),
    /// The simulator with this name (always one of `Config::simulators`).
    Simulator(String),
}

/// A parsed backend URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    /// `https` (true) or `http` (false).
    pub tls: bool,
    /// Host name or IP address, lowercase; IPv6 addresses keep their brackets
    /// (`[::1]`) so that `format!("{host}:{port}")` is a valid authority.
    pub host: String,
    /// Explicit port, else 443 for https and 80 for http.
    pub port: u16,
    /// `""` or a path such as `/x/y` (no trailing slash), prefixed to every
    /// forwarded path.
    pub base_path: String,
}

/// A client subscription (a pair of keys).
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Unique name.
    pub name: String,
    /// Primary key.
    pub primary_key: Secret,
    /// Secondary key.
    pub secondary_key: Option<Secret>,
    /// `false` when `state: suspended`.
    pub active: bool,
    /// APIs this subscription may call; `None` = all APIs.
    pub apis: Option<Vec<String>>,
}

/// An API exposed by the gateway.
#[derive(Debug, Clone)]
pub struct Api {
    /// Unique name.
    pub name: String,
    /// Unique path prefix ending in `/openai`, e.g. `/openai` or `/team/openai`.
    pub path: String,
    /// Backend names, in the configured order (each names a `Config::backends` entry).
    pub backends: Vec<String>,
    /// How clients present subscription keys.
    pub subscription: SubscriptionSettings,
    /// Body size limit for this API (`server.max_request_body_bytes` if unset).
    pub max_request_body_bytes: u64,
}

/// Subscription-key settings of an API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSettings {
    /// Whether a valid subscription key is required.
    pub required: bool,
    /// Headers checked for the key, in order.
    pub header_names: Vec<http::HeaderName>,
    /// Query parameter checked when no header is present.
    pub query_name: String,
    /// The first header name as written in the config (`header_names` are
    /// lowercased by `http`); APIM echoes it in `WWW-Authenticate`.
    pub challenge_name: String,
}

impl Default for SubscriptionSettings {
    /// Required; headers `api-key` and `ocp-apim-subscription-key`; query `subscription-key`.
    fn default() -> Self {
        SubscriptionSettings {
            required: true,
            header_names: vec![
                http::HeaderName::from_static("api-key"),
                http::HeaderName::from_static("ocp-apim-subscription-key"),
            ],
            query_name: "subscription-key".to_string(),
            challenge_name: "api-key".to_string(),
        }
    }
}
