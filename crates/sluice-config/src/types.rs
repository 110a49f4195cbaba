//! The validated, resolved configuration handed to the rest of Sluice.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

use crate::Secret;

/// Request headers that always carry a credential, lowercase. With the
/// subscription key headers of every API they make up
/// [`Config::credential_headers`].
pub const FIXED_CREDENTIAL_HEADERS: [&str; 6] = [
    "api-key",
    "authorization",
    "proxy-authorization",
    "cookie",
    "ocp-apim-subscription-key",
    "apim-debug-authorization",
];

/// [`FIXED_CREDENTIAL_HEADERS`] followed by `subscription_headers`, each
/// once, in that order.
pub(crate) fn credential_headers<'a>(
    subscription_headers: impl IntoIterator<Item = &'a HeaderName>,
) -> Vec<HeaderName> {
    let mut out: Vec<HeaderName> = FIXED_CREDENTIAL_HEADERS
        .iter()
        .map(|name| HeaderName::from_static(name))
        .collect();
    for name in subscription_headers {
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    out
}

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
    /// Backend pools: the `pools` entries in file order, then one pool per
    /// API that lists `backends:` instead of naming a pool (named
    /// `api/<api name>`, one priority group of equal weights).
    pub pools: Vec<Pool>,
    /// APIs, in file order.
    pub apis: Vec<Api>,
}

impl Config {
    /// The deployment names API `api` lists at `GET /models`: its `models`
    /// when set; otherwise every name the configuration routes for it, sorted
    /// and each once: the `deployment_pools` keys, the client names its
    /// backends rename (`backends[].deployments`), and the deployments of
    /// the simulators behind it.
    pub fn api_models(&self, api: &Api) -> Vec<String> {
        if !api.models.is_empty() {
            return api.models.clone();
        }
        let mut names: std::collections::BTreeSet<&str> =
            api.deployment_pools.keys().map(String::as_str).collect();
        for backend in self
            .backends
            .iter()
            .filter(|b| api.backends.contains(&b.name))
        {
            names.extend(backend.deployments.keys().map(String::as_str));
            if let BackendTarget::Simulator(sim) = &backend.target {
                let sims = self.simulators.iter().filter(|s| &s.name == sim);
                names.extend(sims.flat_map(|s| s.deployments.keys().map(String::as_str)));
            }
        }
        names.into_iter().map(str::to_string).collect()
    }

    /// Every request header that carries a client credential: the fixed
    /// [`FIXED_CREDENTIAL_HEADERS`] (`api-key`, `authorization`,
    /// `proxy-authorization`, `cookie`, `ocp-apim-subscription-key`,
    /// `apim-debug-authorization`) then each subscription key header
    /// configured on any API (`apis[].subscription.header_names`), each once.
    /// `HeaderName`s are lowercase, so comparing with `==` ignores case.
    ///
    /// Validation refuses these as `header:` counter keys and metric
    /// dimensions; the proxy removes them before forwarding. The list is
    /// small: compute it once at start-up, not per request.
    pub fn credential_headers(&self) -> Vec<HeaderName> {
        credential_headers(
            self.apis
                .iter()
                .flat_map(|api| api.subscription.header_names.iter()),
        )
    }
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
    /// The management listener (`/metrics`, `/health`); `None` = not started.
    pub management: Option<Management>,
    /// Peers whose `X-Forwarded-For` is believed (`server.trusted_proxies`);
    /// empty = none, the TCP peer is always the client. A bare address is a
    /// `/32` or `/128`. The client IP is the right-most `X-Forwarded-For`
    /// address that is not itself in this list, and only when the TCP peer
    /// is in it.
    pub trusted_proxies: Vec<IpNet>,
    /// The in-memory counter store of the limits.
    pub counters: Counters,
    /// The map of backend-owned objects to their backend.
    pub affinity: AffinitySettings,
    /// On SIGTERM: how long in-flight requests (open streams included) may
    /// run after the listeners stop accepting; 0..=3600 s, default 60 s.
    pub shutdown_timeout: Duration,
    /// Memory all request bodies held for replay (failover) may use
    /// together; a body that does not fit is forwarded without replay.
    /// Default 256 MiB.
    pub body_buffer_bytes: u64,
}

/// Default of `Server::body_buffer_bytes`.
pub(crate) const DEFAULT_BODY_BUFFER_BYTES: u64 = 256 * 1024 * 1024;

/// Default of `Server::shutdown_timeout`, in seconds.
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: u64 = 60;
/// Upper bound of `server.shutdown_timeout_seconds`.
pub(crate) const MAX_SHUTDOWN_TIMEOUT_SECONDS: u64 = 3600;

/// The in-memory counter store behind `rate_limit`, `quota` and
/// `token_limit` (`server.counters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Most counters held at once (at least 1); at the cap the least
    /// recently used one is dropped (`sluice_counter_evictions_total`).
    pub max_keys: u64,
    /// How often idle counters are purged, 1..=3600 s.
    pub purge_interval: Duration,
}

/// Which backend owns each object created through the gateway (responses,
/// files, batches, ...): `server.affinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffinitySettings {
    /// Most ids remembered at once (at least 1); at the cap the oldest go.
    pub max_ids: u64,
    /// How long an id is remembered after it was learnt, 1 s to 365 days.
    pub ttl: Duration,
}

/// Upper bound of `server.affinity.ttl_seconds` (365 days).
pub(crate) const MAX_AFFINITY_TTL_SECONDS: u64 = 365 * 24 * 3600;

impl Default for AffinitySettings {
    /// 100,000 ids for 30 days (the time Azure keeps a stored response).
    fn default() -> Self {
        AffinitySettings {
            max_ids: 100_000,
            ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Upper bound of `server.counters.purge_interval_seconds`.
pub(crate) const MAX_PURGE_INTERVAL_SECONDS: u64 = 3600;

impl Default for Counters {
    /// 1,000,000 keys, purged every 10 s.
    fn default() -> Self {
        Counters {
            max_keys: 1_000_000,
            purge_interval: Duration::from_secs(10),
        }
    }
}

/// The management listener, bound separately from the data plane.
#[derive(Debug, Clone)]
pub struct Management {
    /// Address to bind; port 0 picks a free port. Never equal to a non-zero
    /// `server.listen` or simulator address.
    pub listen: SocketAddr,
    /// Distinct values kept per metric for a label fed by client input
    /// (`header:*`, `client_ip`, `identity`, `deployment`); later new values
    /// are reported as `other`. At least 1, default 1000.
    pub max_label_values: usize,
    /// Bearer tokens that open the operator endpoints (everything but
    /// `/metrics` and `/health`); none configured = those stay closed.
    pub operator_tokens: Vec<Secret>,
    /// Signs debug credentials (`listDebugCredentials`); the same key on
    /// every replica lets each accept the others' credentials. `None` = a
    /// random key made at start.
    pub debug_signing_key: Option<Secret>,
    /// Entra ID tokens that open the operator endpoints too, checked as
    /// `validate_jwt` checks them; at least one required role. `None` = only
    /// `operator_tokens`.
    pub entra_id: Option<ValidateJwt>,
    /// Request traces and request summaries.
    pub tracing: Tracing,
}

/// `server.management.tracing`: what traced requests keep, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracing {
    /// Most finished traces kept (1..=100000, default 1000); the oldest go first.
    pub max_traces: usize,
    /// Most memory the kept traces use together (default 64 MiB).
    pub max_bytes: usize,
    /// How long a trace is kept after its request ended (60..=86400 s, default 3600 s).
    pub ttl: Duration,
    /// Request and response bodies of traced requests are recorded up to this
    /// many bytes each (0..=1 MiB, default 0: not recorded).
    pub body_bytes: usize,
    /// Header names whose values are redacted in traces, on top of the
    /// credential headers (lowercase).
    pub redact_headers: Vec<http::HeaderName>,
    /// Request summaries kept in the ring for `GET /traces` (0..=1000000,
    /// default 10000; 0 = none kept).
    pub summaries: usize,
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            max_traces: 1000,
            max_bytes: 64 * 1024 * 1024,
            ttl: Duration::from_secs(3600),
            body_bytes: 0,
            redact_headers: Vec::new(),
            summaries: 10_000,
        }
    }
}

/// Default of `Management::max_label_values`.
pub(crate) const DEFAULT_MAX_LABEL_VALUES: u64 = 1000;

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// One budget for reaching the backend: DNS resolution, obtaining the
    /// backend's Entra ID token, TCP connect and TLS handshake together.
    pub connect: Duration,
    /// Idle time allowed between two reads from the backend (not a total).
    pub read: Duration,
    /// Sending the request upstream (each write).
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
    /// Entra ID credential whose bearer token is sent upstream; never set
    /// together with `api_key`.
    pub auth: Option<BackendAuth>,
    /// Region label (metrics, `/backends`); default: the simulator's
    /// region, else the backend's name.
    pub region: String,
    /// Circuit-breaker rules (`circuit_breaker.rules`); the defaults when
    /// the key is absent, none when it is an empty list.
    pub breaker_rules: Vec<BreakerRule>,
}

/// One circuit-breaker rule of a backend (`circuit_breaker.rules[]`): the
/// routing crate's own type, so that what is configured is what runs.
pub use sluice_routing::BreakerRule;

/// A pool of backends (`pools[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Unique name; `api/<api name>` for an API's `backends:` shorthand.
    pub name: String,
    /// Members in the configured order.
    pub members: Vec<PoolMember>,
    /// Skip a backend whose last rate-limit headers say the request will
    /// not fit, when another can take it (default true).
    pub steering: bool,
    /// How long a backend's rate-limit reading counts at most, 1..=3600 s
    /// (default 60 s); it stops counting earlier at its own reset time.
    pub headroom_max_age: Duration,
}

/// One backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMember {
    /// A `Config::backends` name.
    pub backend: String,
    /// Lower goes first, 0..=100 (default 1).
    pub priority: u32,
    /// Share within its priority group, 1..=1000 (default 1).
    pub weight: u32,
}

/// How an API retries a call on another backend (`apis[].failover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failover {
    /// Most backends tried for one request, 1..=30; default: every member
    /// of the pool once.
    pub max_attempts: Option<u32>,
    /// No new attempt starts once this much time has passed since the
    /// request arrived, and connecting is cut to what is left (default 120 s).
    pub timeout: Duration,
    /// Status of the gateway's answer when every backend is resting: 429
    /// (default, with the smallest Retry-After) or 503 (APIM's shape).
    pub when_exhausted: u16,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            max_attempts: None,
            timeout: Duration::from_secs(120),
            when_exhausted: 429,
        }
    }
}

/// How a backend obtains an Entra ID token (`backends[].auth`).
#[derive(Debug, Clone)]
pub struct BackendAuth {
    /// Where the token comes from.
    pub credential: Credential,
    /// Scope requested; default `https://cognitiveservices.azure.com/.default`.
    pub scope: String,
}

/// An Entra ID credential. `Debug` never shows the client secret.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Managed identity: system-assigned, or user-assigned when `client_id`
    /// is set.
    ManagedIdentity {
        /// Client id of a user-assigned identity.
        client_id: Option<String>,
    },
    /// AKS workload identity (federated token file). Unset fields fall back
    /// to `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`.
    WorkloadIdentity {
        /// Application (client) id.
        client_id: Option<String>,
        /// Directory (tenant) id.
        tenant_id: Option<String>,
        /// Federated token file, already joined to the config file's
        /// directory when written relative.
        token_file: Option<std::path::PathBuf>,
    },
    /// Service principal with a client secret.
    ClientSecret {
        /// Directory (tenant) id or domain.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The client secret.
        secret: Secret,
        /// Authority host override (always `https://...`); `None` = public cloud.
        authority_host: Option<String>,
    },
    /// The signed-in Azure CLI (`az account get-access-token`), for development.
    AzureCli,
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
    /// The backends this API can reach: the members of its pools, each
    /// once, in order (each names a `Config::backends` entry).
    pub backends: Vec<String>,
    /// The pool requests go to (a `Config::pools` name).
    pub pool: String,
    /// Client deployment name -> the pool for that deployment.
    pub deployment_pools: BTreeMap<String, String>,
    /// Deployment names `GET /models` lists (`apis[].models`); empty: the
    /// names the configuration routes (see `Config::api_models`).
    pub models: Vec<String>,
    /// Retrying on another backend.
    pub failover: Failover,
    /// How clients present subscription keys.
    pub subscription: SubscriptionSettings,
    /// Body size limit for this API (`server.max_request_body_bytes` if unset).
    pub max_request_body_bytes: u64,
    /// A relayed WebSocket (Realtime) session is closed when either side
    /// sends nothing for this long (`apis[].websocket_idle_seconds`).
    pub websocket_idle: std::time::Duration,
    /// What callers must present: a subscription key, a JWT, or either.
    pub auth: ApiAuth,
    /// Inbound policies, in the configured order.
    pub policies: Vec<Policy>,
}

/// How callers of an API authenticate (`apis[].auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiAuth {
    /// A subscription key (per `Api::subscription`).
    #[default]
    Key,
    /// An Entra ID bearer token, checked by the API's `validate_jwt` policy.
    Jwt,
    /// Either of the above.
    KeyOrJwt,
}

/// One entry of `apis[].policies`.
#[derive(Debug, Clone)]
pub enum Policy {
    /// Validate an Entra ID token (APIM validate-azure-ad-token / validate-jwt).
    ValidateJwt(ValidateJwt),
    /// Calls per sliding window per key (rate-limit-by-key); 429 when over.
    RateLimit(CallLimit),
    /// Calls per fixed period per key (quota-by-key); 403 when over.
    Quota(CallLimit),
    /// Tokens per minute and/or a token quota per key (azure-openai-token-limit).
    TokenLimit(TokenLimit),
    /// Prompt/completion/total token counters (azure-openai-emit-token-metric).
    EmitTokenMetric(EmitTokenMetric),
}

/// Settings of a `validate_jwt` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidateJwt {
    /// Where the signing keys come from.
    pub keys: JwtKeys,
    /// Accepted `iss` values (at least one).
    pub issuers: Vec<String>,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    /// Allowed `appid`/`azp` values; empty = any application.
    pub client_application_ids: Vec<String>,
    /// Roles that must all be in the `roles` claim; empty = none required.
    pub required_roles: Vec<String>,
    /// Leeway for `exp`/`nbf`, 0..=600 s; default 60 s.
    pub clock_skew: Duration,
}

/// Source of the signing keys for `validate_jwt` (an http(s) URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeys {
    /// An OpenID configuration document whose `jwks_uri` names the key set.
    OpenIdConfiguration(String),
    /// A JWKS document.
    Jwks(String),
}

/// What a limit counts per (`counter_key`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CounterKey {
    /// The caller's subscription.
    Subscription,
    /// The caller's identity: subscription, else the token's app/subject.
    Identity,
    /// The client IP address.
    ClientIp,
    /// The value of a request header.
    Header(http::HeaderName),
    /// The value of a claim of the validated JWT.
    Claim(String),
}

/// Settings of `rate_limit` and `quota`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallLimit {
    /// Calls allowed per period (at least 1).
    pub calls: u64,
    /// The window: 1..=300 s (sliding) for `rate_limit`, at least 60 s
    /// (fixed) for `quota`.
    pub renewal_period: Duration,
    /// What is counted.
    pub counter_key: CounterKey,
}

/// Settings of `token_limit`. At least one of `tokens_per_minute` and
/// `token_quota` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimit {
    /// What is counted.
    pub counter_key: CounterKey,
    /// Tokens per minute (at least 1).
    pub tokens_per_minute: Option<u64>,
    /// Tokens per period (at least 1).
    pub token_quota: Option<(u64, QuotaPeriod)>,
    /// Estimate the prompt's tokens before forwarding (default true).
    pub estimate_prompt_tokens: bool,
    /// Completion tokens reserved at admission when the request sets none of
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens` (those,
    /// times `n`, are reserved otherwise); default 1024. The reservation is
    /// reconciled to the actual usage at the end of the exchange.
    pub default_completion_tokens: u64,
    /// Header carrying the seconds to wait on 429/403; default `Retry-After`.
    pub retry_after_header_name: http::HeaderName,
    /// Header for the remaining tokens of the minute, if wanted.
    pub remaining_tokens_header_name: Option<http::HeaderName>,
    /// Header for the remaining tokens of the quota period, if wanted.
    pub remaining_quota_tokens_header_name: Option<http::HeaderName>,
    /// Header for the tokens consumed by the request, if wanted.
    pub tokens_consumed_header_name: Option<http::HeaderName>,
}

/// A token quota period: a fixed window starting at the UTC time truncated
/// to the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaPeriod {
    /// One hour.
    Hourly,
    /// One day.
    Daily,
    /// One week.
    Weekly,
    /// One calendar month.
    Monthly,
    /// One calendar year.
    Yearly,
}

/// Settings of `emit_token_metric`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmitTokenMetric {
    /// Label dimensions, in order, unique, at most 10.
    pub dimensions: Vec<Dimension>,
}

/// A label of the token metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// Subscription name (`N/A` when the caller has none).
    Subscription,
    /// API name.
    Api,
    /// Deployment name from the request path.
    Deployment,
    /// Backend name.
    Backend,
    /// The backend's region (`x-ms-region`).
    BackendRegion,
    /// Client IP address.
    ClientIp,
    /// The caller's identity (as for [`CounterKey::Identity`]).
    Identity,
    /// The value of a request header.
    Header(http::HeaderName),
}

/// A header name's byte as it stands in a label: `[a-z0-9_]` kept, anything
/// else `_`.
fn label_byte(b: u8) -> u8 {
    if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' {
        b
    } else {
        b'_'
    }
}

impl Dimension {
    /// The Prometheus label name: `subscription`, `api`, `deployment`,
    /// `backend`, `backend_region`, `client_ip`, `identity`, or for a header
    /// `header_` + the lowercase name with every character other than
    /// `[a-z0-9_]` replaced by `_` (`x-user-id` -> `header_x_user_id`).
    pub fn label(&self) -> String {
        match self {
            Dimension::Subscription => "subscription".to_string(),
            Dimension::Api => "api".to_string(),
            Dimension::Deployment => "deployment".to_string(),
            Dimension::Backend => "backend".to_string(),
            Dimension::BackendRegion => "backend_region".to_string(),
            Dimension::ClientIp => "client_ip".to_string(),
            Dimension::Identity => "identity".to_string(),
            Dimension::Header(name) => {
                let mut label = String::from("header_");
                // Header names are ASCII: a byte is a character.
                label.extend(name.as_str().bytes().map(|b| char::from(label_byte(b))));
                label
            }
        }
    }

    /// Whether the two have the same [`label`](Self::label), compared
    /// without building either (token metrics look labels up per response).
    pub fn same_label(&self, other: &Dimension) -> bool {
        match (self, other) {
            (Dimension::Header(a), Dimension::Header(b)) => {
                let (a, b) = (a.as_str().as_bytes(), b.as_str().as_bytes());
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(&x, &y)| label_byte(x) == label_byte(y))
            }
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimension_labels() {
        assert_eq!(Dimension::BackendRegion.label(), "backend_region");
        let h = |n: &'static str| Dimension::Header(http::HeaderName::from_static(n));
        let all = [
            Dimension::Subscription,
            Dimension::Api,
            Dimension::Deployment,
            Dimension::Backend,
            Dimension::BackendRegion,
            Dimension::ClientIp,
            Dimension::Identity,
            h("x-a"),
            h("x_a"),
            h("x-b"),
            h("x-ab"),
            h("api"),
        ];
        for a in &all {
            for b in &all {
                assert_eq!(a.same_label(b), a.label() == b.label(), "{a:?} {b:?}");
            }
        }
        assert_eq!(Dimension::ClientIp.label(), "client_ip");
        assert_eq!(
            Dimension::Header(http::HeaderName::from_static("x-user-id")).label(),
            "header_x_user_id"
        );
        assert_eq!(
            Dimension::Header(http::HeaderName::from_bytes(b"X-Team.Name").unwrap()).label(),
            "header_x_team_name"
        );
    }

    #[test]
    fn credential_debug_hides_the_secret() {
        let credential = Credential::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: Secret::new("very-secret-value"),
            authority_host: None,
        };
        let debug = format!("{credential:?}");
        assert!(debug.contains("<redacted>") && !debug.contains("very-secret-value"));
    }
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
