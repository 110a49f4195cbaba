//! The gateway's immutable runtime state, compiled once from the config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use sluice_policy::budget::BodyBudget;
use std::time::Duration;

use sluice_config::{Api, Backend, BackendTarget, Config, Credential, Policy};
use sluice_identity::{CredentialConfig, ProviderOptions, TokenProvider};
use sluice_limits::{MemoryStore, SystemClock};
use sluice_policy::{
    ApiPipeline, ApiRouter, BackendSelector, Shared, SubscriptionIndex, TokenMetrics,
};
use tokio::sync::RwLock;
use tokio::time::Instant;

/// Where a backend lives and how to reach it.
#[derive(Debug)]
pub struct BackendRuntime {
    pub name: String,
    /// Region label (`x-ms-region` when the backend sends none), shared
    /// with each request that reads it (a count, not a copy).
    pub region: Arc<str>,
    pub tls: bool,
    /// Host name for SNI and the `Host` header.
    pub host: String,
    pub port: u16,
    /// `Host` header value (`host` or `host:port` when the port is not the default).
    pub host_header: String,
    /// The same, built once as a header value (cloned, never copied, per request).
    pub host_value: Option<http::HeaderValue>,
    /// `region` as a ready header value; `None` when it cannot be one.
    pub region_header: Option<http::HeaderValue>,
    pub base_path: String,
    /// The backend's api-key as a ready header value, marked sensitive so
    /// that header dumps print `Sensitive` instead of the key.
    pub api_key: Option<http::HeaderValue>,
    pub deployments: HashMap<String, String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// Gets Entra ID tokens for this backend (`auth:`), if configured.
    pub token_provider: Option<Arc<TokenProvider>>,
    /// Fixed address (IP literals and simulators), else resolved through DNS with a TTL.
    fixed: Option<SocketAddr>,
    /// Looks up `host` when there is no fixed address ([`SystemResolver`]).
    resolver: Arc<dyn Resolve>,
    /// How long an answer from `resolver` is used ([`DNS_TTL`]).
    dns_ttl: Duration,
    /// The last answer, IPv4 first, and when it expires.
    resolved: RwLock<Option<Resolved>>,
    /// Index (modulo the answer's length) of the address in use.
    next_addr: AtomicUsize,
}

/// How long a DNS answer for a backend host is reused.
const DNS_TTL: Duration = Duration::from_secs(30);

/// Looks up the addresses of a backend host: DNS in production
/// ([`SystemResolver`]), a fake in tests.
#[async_trait::async_trait]
pub(crate) trait Resolve: std::fmt::Debug + Send + Sync {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver (`getaddrinfo`, through `tokio::net::lookup_host`).
#[derive(Debug)]
pub(crate) struct SystemResolver;

#[async_trait::async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// A backend host's resolved addresses (never empty) and when they expire.
#[derive(Debug)]
struct Resolved {
    addrs: Vec<SocketAddr>,
    expires: Instant,
}

impl BackendRuntime {
    fn new(b: &Backend, sims: &HashMap<String, SocketAddr>) -> Result<Self, BuildError> {
        let (tls, host, port, base_path, fixed) = match &b.target {
            BackendTarget::Simulator(name) => {
                let addr = sims.get(name).ok_or_else(|| {
                    BuildError(format!(
                        "backend '{}' names simulator '{name}', which is not running",
                        b.name
                    ))
                })?;
                (
                    false,
                    addr.ip().to_string(),
                    addr.port(),
                    String::new(),
                    Some(*addr),
                )
            }
            BackendTarget::Url(u) => {
                let fixed = u
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, u.port));
                (u.tls, u.host.clone(), u.port, u.base_path.clone(), fixed)
            }
        };
        let token_provider = match &b.auth {
            None => None,
            Some(auth) => {
                let config = match &auth.credential {
                    Credential::ManagedIdentity { client_id } => {
                        CredentialConfig::ManagedIdentity {
                            client_id: client_id.clone(),
                        }
                    }
                    Credential::WorkloadIdentity {
                        client_id,
                        tenant_id,
                        token_file,
                    } => CredentialConfig::WorkloadIdentity {
                        client_id: client_id.clone(),
                        tenant_id: tenant_id.clone(),
                        token_file: token_file.clone(),
                    },
                    Credential::ClientSecret {
                        tenant_id,
                        client_id,
                        secret,
                        authority_host,
                    } => CredentialConfig::ClientSecret {
                        tenant_id: tenant_id.clone(),
                        client_id: client_id.clone(),
                        secret: secret.clone(),
                        authority_host: authority_host.clone(),
                    },
                    Credential::AzureCli => CredentialConfig::AzureCli,
                };
                let options = ProviderOptions {
                    scope: auth.scope.clone(),
                    transport: None,
                };
                Some(
                    TokenProvider::new(config, options)
                        .map_err(|e| BuildError(format!("backend '{}': {e}", b.name)))?,
                )
            }
        };
        let default_port = if tls { 443 } else { 80 };
        let host_header = if port == default_port {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        Ok(BackendRuntime {
            name: b.name.clone(),
            region: Arc::from(b.region.as_str()),
            tls,
            host,
            port,
            host_value: http::HeaderValue::from_str(&host_header).ok(),
            region_header: http::HeaderValue::from_str(&b.region).ok(),
            host_header,
            base_path,
            api_key: b
                .api_key
                .as_ref()
                .map(|k| {
                    let mut v = http::HeaderValue::from_str(k.expose()).map_err(|_| {
                        BuildError(format!(
                            "backend '{}': the api_key is not a valid header value",
                            b.name
                        ))
                    })?;
                    v.set_sensitive(true);
                    Ok(v)
                })
                .transpose()?,
            deployments: b
                .deployments
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            connect_timeout: b.timeouts.connect,
            read_timeout: b.timeouts.read,
            write_timeout: b.timeouts.write,
            token_provider,
            fixed,
            resolver: Arc::new(SystemResolver),
            dns_ttl: DNS_TTL,
            resolved: RwLock::new(None),
            next_addr: AtomicUsize::new(0),
        })
    }

    /// An address to connect to: fixed, or from a cached DNS answer
    /// (refreshed after [`DNS_TTL`]). The same address is used until a
    /// connection to it fails (IPv4 answers first); a new, different answer
    /// starts again from its first address.
    ///
    /// When the answer has expired and looking the host up again fails (or
    /// finds nothing), the previous answer is kept for another TTL: a DNS
    /// outage does not take down a backend whose addresses still work, and
    /// a backend whose addresses stopped working fails on connect anyway.
    /// Without a previous answer the lookup's error is returned. Callers
    /// that find the answer expired wait for one lookup rather than each
    /// making their own. A lookup that outlasts its caller's connect budget
    /// is abandoned (the caller gets a timeout, the stale answer is not
    /// used) and the next caller looks the host up again.
    /// The backend's address when it is fixed (an IP literal or a
    /// simulator): known without a lookup or a timer.
    pub fn fixed_address(&self) -> Option<SocketAddr> {
        self.fixed
    }

    pub async fn address(&self) -> std::io::Result<SocketAddr> {
        if let Some(a) = self.fixed {
            return Ok(a);
        }
        {
            let cached = self.resolved.read().await;
            if let Some(r) = cached.as_ref()
                && Instant::now() < r.expires
            {
                return Ok(self.pick(&r.addrs));
            }
        }
        let mut cached = self.resolved.write().await;
        // Another caller may have looked it up while this one waited.
        if let Some(r) = cached.as_ref()
            && Instant::now() < r.expires
        {
            return Ok(self.pick(&r.addrs));
        }
        match self.lookup().await {
            Ok(addrs) => {
                if cached.as_ref().is_none_or(|r| r.addrs != addrs) {
                    self.next_addr.store(0, Ordering::Relaxed);
                }
                let a = self.pick(&addrs);
                *cached = Some(Resolved {
                    addrs,
                    expires: Instant::now() + self.dns_ttl,
                });
                Ok(a)
            }
            Err(e) => match cached.as_mut() {
                Some(stale) => {
                    tracing::warn!(
                        backend = %self.name,
                        host = %self.host,
                        error = %e,
                        "cannot resolve the backend host again; keeping its previous addresses"
                    );
                    stale.expires = Instant::now() + self.dns_ttl;
                    Ok(self.pick(&stale.addrs))
                }
                None => Err(e),
            },
        }
    }

    /// Look the host up: IPv4 first, never empty.
    async fn lookup(&self) -> std::io::Result<Vec<SocketAddr>> {
        let mut addrs = self.resolver.resolve(&self.host, self.port).await?;
        addrs.sort_by_key(SocketAddr::is_ipv6);
        if addrs.is_empty() {
            return Err(std::io::Error::other(format!(
                "no address for {}",
                self.host
            )));
        }
        Ok(addrs)
    }

    fn pick(&self, addrs: &[SocketAddr]) -> SocketAddr {
        addrs[self.next_addr.load(Ordering::Relaxed) % addrs.len()]
    }

    /// A connection failed: move on to the next resolved address.
    pub fn connect_failed(&self) {
        if self.fixed.is_none() {
            self.next_addr.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An API at run time: its compiled policies (which hold its config).
#[derive(Debug)]
pub struct ApiRuntime {
    /// The API's policies, compiled.
    pub pipeline: ApiPipeline,
    /// What `GET /models` lists.
    pub models: crate::models::ModelList,
    /// Whether the backend an API call goes to depends on the deployment it
    /// names (`deployment_pools`, or a backend that renames deployments):
    /// then a v1 body must be read for its `model` before routing.
    pub routes_by_model: bool,
}

impl ApiRuntime {
    /// The API's configuration.
    pub fn config(&self) -> &Api {
        self.pipeline.api()
    }
}

/// Everything the gateway needs to serve requests.
#[derive(Debug)]
pub struct GatewayState {
    pub service_name: String,
    pub apis: Vec<ApiRuntime>,
    pub backends: Vec<BackendRuntime>,
    pub router: ApiRouter,
    /// What the pipelines share: subscriptions, the counter store, metrics.
    pub shared: Shared,
    /// The in-memory counter store behind `shared.store` (purged and
    /// measured by the gateway's background task).
    pub counters: Arc<MemoryStore>,
    /// How often idle counters are purged.
    pub purge_interval: Duration,
    /// `sluice_counter_evictions_total`, kept in step with the store.
    pub counter_evictions: prometheus::IntCounter,
    /// `sluice_counters`: counters held by the store.
    pub counter_count: prometheus::IntGauge,
    /// Peers whose `X-Forwarded-For` is believed (`server.trusted_proxies`).
    pub trusted_proxies: Vec<sluice_config::IpNet>,
    /// Serializes [`GatewayState::sync_counter_metrics`].
    metrics_sync: std::sync::Mutex<()>,
    /// Requests being served now (a graceful shutdown waits for zero).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Metrics served on the management listener.
    pub registry: prometheus::Registry,
    /// Header names that carry client credentials (every API's subscription
    /// header names plus the usual ones); all are removed before forwarding.
    pub(crate) credential_headers: Vec<http::HeaderName>,
    /// The lengths of those names and of `Expect`, which the same walk over
    /// a request's names looks for.
    pub(crate) credential_lengths: crate::heads::NameLengths,
    /// Chooses the backend of every attempt (pools, breakers, steering).
    pub selector: BackendSelector,
    /// Tokens that open the management listener's operator endpoints.
    pub operator_tokens: Vec<sluice_config::Secret>,
    /// pingora's runtime and listener settings.
    pub tuning: crate::server::Tuning,
    /// Signs and checks debug credentials.
    pub debug_key: sluice_trace::credentials::DebugKey,
    /// API names, by index (debug credentials name their API).
    pub api_names: Vec<String>,
    /// Memory for request bodies held for replay.
    pub body_budget: Arc<BodyBudget>,
    /// `sluice_body_replay_skipped_total`: bodies forwarded without replay
    /// because the budget was spent.
    pub replay_skipped: prometheus::IntCounter,
    /// `sluice_body_buffer_bytes`: bytes of request bodies held now.
    pub body_buffer_gauge: prometheus::IntGauge,
    /// Connects to backends for attempts the gateway runs itself (bodies
    /// larger than pingora's retry buffer).
    pub connector: BackendConnector,
    /// Trace store, request summaries and how traces are written.
    pub traces: crate::traces::Traces,
    /// Checks Entra ID operator tokens (`server.management.entra_id`).
    pub operator_jwt: Option<Arc<sluice_auth::JwtValidator>>,
    /// Which backend owns each object clients created (responses, files...).
    pub affinity: Arc<dyn sluice_policy::affinity::AffinityStore>,
    /// The in-process map behind `affinity` (swept and measured by the
    /// background task).
    pub affinity_memory: Arc<sluice_policy::affinity::MemoryAffinity>,
    /// `sluice_affinity_total{result}`: calls naming a backend-owned object
    /// (`pinned`, `found`, `not_found`) and ids `learned` and `forgotten`.
    pub affinity_total: prometheus::IntCounterVec,
    /// `sluice_affinity_ids`: ids remembered now.
    pub affinity_ids: prometheus::IntGauge,
    /// `sluice_stream_failures_total{api,backend,kind}`: streams that failed
    /// after their 200 (`error`, `failed`, `incomplete`).
    pub stream_failures: prometheus::IntCounterVec,
    /// `sluice_websockets_open{api}`: relayed WebSocket (Realtime) sessions
    /// open now.
    pub websockets_open: prometheus::IntGaugeVec,
    /// `sluice_websocket_sessions_total{api,end}`: relayed WebSocket
    /// sessions that ended (`closed`, or `token_limit` when the gateway
    /// closed one that spent its token limit).
    pub websocket_sessions: prometheus::IntCounterVec,
    /// `sluice_websocket_unreadable_total{api,kind}`: sessions whose frames
    /// could not be read (`protocol_error`) and events too large to read
    /// (`oversized`).
    pub websocket_unreadable: prometheus::IntCounterVec,
}

/// pingora's HTTP connector (it has no `Debug` of its own).
pub struct BackendConnector(pub pingora::connectors::http::Connector);

impl std::fmt::Debug for BackendConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendConnector")
    }
}

impl std::ops::Deref for BackendConnector {
    type Target = pingora::connectors::http::Connector;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The config cannot be turned into a running gateway (a simulator that did not start).
#[derive(Debug)]
pub struct BuildError(pub String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

/// Peers are compared in canonical form (an IPv4-mapped IPv6 peer as IPv4),
/// so an IPv4-mapped entry (`::ffff:10.0.0.0/104`) becomes its IPv4 network.
fn canonical_net(net: &sluice_config::IpNet) -> sluice_config::IpNet {
    match net {
        sluice_config::IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) if v6.prefix_len() >= 96 => ipnet_v4(v4, v6.prefix_len() - 96).unwrap_or(*net),
            _ => *net,
        },
        sluice_config::IpNet::V4(_) => *net,
    }
}

fn ipnet_v4(addr: std::net::Ipv4Addr, prefix: u8) -> Option<sluice_config::IpNet> {
    format!("{addr}/{prefix}").parse().ok()
}

impl GatewayState {
    /// Bring the counter-store metrics up to date (before a scrape, and after
    /// each purge).
    pub fn sync_counter_metrics(&self) {
        // The purge task and a scrape may sync at once: one at a time, so
        // the same evictions are never added twice.
        let _one = self
            .metrics_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let evicted = self.counters.evictions();
        let reported = self.counter_evictions.get();
        if evicted > reported {
            self.counter_evictions.inc_by(evicted - reported);
        }
        self.counter_count
            .set(i64::try_from(self.counters.len()).unwrap_or(i64::MAX));
        self.affinity_ids
            .set(i64::try_from(self.affinity_memory.len()).unwrap_or(i64::MAX));
    }

    /// Bring every gauge read at scrape time up to date: the counter store,
    /// the routing state of each backend and the body buffer.
    pub fn sync_metrics(&self) {
        self.sync_counter_metrics();
        self.selector.sync_metrics();
        self.body_buffer_gauge
            .set(i64::try_from(self.body_budget.used()).unwrap_or(i64::MAX));
    }

    /// `sims` maps simulator names to the addresses they listen on.
    pub fn new(cfg: &Config, sims: &HashMap<String, SocketAddr>) -> Result<Arc<Self>, BuildError> {
        let backends = cfg
            .backends
            .iter()
            .map(|b| BackendRuntime::new(b, sims))
            .collect::<Result<Vec<_>, _>>()?;
        let credential_headers = cfg.credential_headers();
        let registry = prometheus::Registry::new();
        let dimensions: Vec<_> = cfg
            .apis
            .iter()
            .flat_map(|a| a.policies.iter())
            .filter_map(|p| match p {
                Policy::EmitTokenMetric(m) => Some(m.dimensions.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        let any_metric = cfg
            .apis
            .iter()
            .flat_map(|a| a.policies.iter())
            .any(|p| matches!(p, Policy::EmitTokenMetric(_)));
        let metrics = if any_metric {
            let max_label_values = cfg
                .server
                .management
                .as_ref()
                .map_or(1000, |m| m.max_label_values);
            Some(Arc::new(
                TokenMetrics::new(&registry, &dimensions, max_label_values)
                    .map_err(|e| BuildError(format!("token metrics: {e}")))?,
            ))
        } else {
            None
        };
        let fetch: Arc<dyn sluice_auth::Fetch> = Arc::new(
            sluice_auth::HttpFetch::new(Duration::from_secs(10))
                .map_err(|e| BuildError(format!("JWT key fetcher: {e}")))?,
        );
        let started_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let apis = cfg
            .apis
            .iter()
            .map(|a| ApiRuntime {
                pipeline: ApiPipeline::new(a, fetch.clone()),
                models: crate::models::ModelList::new(cfg.api_models(a), started_unix),
                routes_by_model: !a.deployment_pools.is_empty()
                    || cfg
                        .backends
                        .iter()
                        .any(|b| a.backends.contains(&b.name) && !b.deployments.is_empty()),
            })
            .collect();
        let selector = BackendSelector::new(cfg, Arc::new(SystemClock), &registry)
            .map_err(|e| BuildError(format!("routing: {e}")))?;
        let replay_skipped = prometheus::IntCounter::new(
            "sluice_body_replay_skipped_total",
            "Request bodies forwarded without the copy failover needs, because server.body_buffer_bytes was spent.",
        )
        .map_err(|e| BuildError(format!("body metrics: {e}")))?;
        let body_buffer_gauge = prometheus::IntGauge::new(
            "sluice_body_buffer_bytes",
            "Bytes of request bodies held for replay now.",
        )
        .map_err(|e| BuildError(format!("body metrics: {e}")))?;
        let counters = Arc::new(MemoryStore::with_max_keys(
            Arc::new(SystemClock),
            usize::try_from(cfg.server.counters.max_keys).unwrap_or(usize::MAX),
        ));
        let counter_evictions = prometheus::IntCounter::new(
            "sluice_counter_evictions_total",
            "Limit counters dropped because the store held server.counters.max_keys counters (the least recently used goes; its key starts afresh).",
        )
        .map_err(|e| BuildError(format!("counter metrics: {e}")))?;
        let counter_count = prometheus::IntGauge::new(
            "sluice_counters",
            "Limit counters held by the in-memory store.",
        )
        .map_err(|e| BuildError(format!("counter metrics: {e}")))?;
        let affinity_total = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sluice_affinity_total",
                "Calls naming an object a backend owns, by result: pinned (owner known), found (owner found by asking the backends), not_found (no backend has it); and ids learned and forgotten.",
            ),
            &["result"],
        )
        .map_err(|e| BuildError(format!("affinity metrics: {e}")))?;
        let affinity_ids = prometheus::IntGauge::new(
            "sluice_affinity_ids",
            "Ids of backend-owned objects whose backend is remembered now.",
        )
        .map_err(|e| BuildError(format!("affinity metrics: {e}")))?;
        let stream_failures = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sluice_stream_failures_total",
                "Streams that failed after their 200, by API, backend and kind (error: an error event; failed: response.failed; incomplete: response.incomplete).",
            ),
            &["api", "backend", "kind"],
        )
        .map_err(|e| BuildError(format!("stream metrics: {e}")))?;
        let websockets_open = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "sluice_websockets_open",
                "Relayed WebSocket (Realtime) sessions open now, by API.",
            ),
            &["api"],
        )
        .map_err(|e| BuildError(format!("websocket metrics: {e}")))?;
        let websocket_sessions = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sluice_websocket_sessions_total",
                "Relayed WebSocket (Realtime) sessions that ended, by API and how (closed: by either side or the idle timeout; token_limit: closed by the gateway when the caller's token limit was spent).",
            ),
            &["api", "end"],
        )
        .map_err(|e| BuildError(format!("websocket metrics: {e}")))?;
        let websocket_unreadable = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sluice_websocket_unreadable_total",
                "Realtime sessions whose frames could not be read (protocol_error), and events too large to read (oversized): their usage is not counted.",
            ),
            &["api", "kind"],
        )
        .map_err(|e| BuildError(format!("websocket metrics: {e}")))?;
        let affinity_memory = Arc::new(sluice_policy::affinity::MemoryAffinity::new(
            usize::try_from(cfg.server.affinity.max_ids).unwrap_or(usize::MAX),
            cfg.server.affinity.ttl,
            Arc::new(SystemClock),
        ));
        for m in [
            Box::new(counter_evictions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(affinity_total.clone()),
            Box::new(affinity_ids.clone()),
            Box::new(stream_failures.clone()),
            Box::new(websockets_open.clone()),
            Box::new(websocket_sessions.clone()),
            Box::new(websocket_unreadable.clone()),
            Box::new(counter_count.clone()),
            Box::new(replay_skipped.clone()),
            Box::new(body_buffer_gauge.clone()),
        ] {
            registry
                .register(m)
                .map_err(|e| BuildError(format!("counter metrics: {e}")))?;
        }
        let traces = crate::traces::Traces::new(cfg, &registry)
            .map_err(|e| BuildError(format!("traces: {e}")))?;
        let operator_jwt = cfg
            .server
            .management
            .as_ref()
            .and_then(|m| m.entra_id.as_ref())
            .map(|v| Arc::new(sluice_policy::jwt_validator(v, fetch.clone())));
        let shared = Shared {
            subscriptions: Arc::new(SubscriptionIndex::new(&cfg.subscriptions)),
            store: counters.clone(),
            metrics,
        };
        Ok(Arc::new(GatewayState {
            tuning: crate::server::Tuning::from_env(),
            service_name: cfg.service_name.clone(),
            router: ApiRouter::new(&cfg.apis),
            shared,
            counters,
            purge_interval: cfg.server.counters.purge_interval,
            counter_evictions,
            counter_count,
            trusted_proxies: cfg
                .server
                .trusted_proxies
                .iter()
                .map(canonical_net)
                .collect(),
            in_flight: Arc::default(),
            metrics_sync: std::sync::Mutex::new(()),
            registry,
            apis,
            backends,
            credential_lengths: crate::heads::NameLengths::of(
                credential_headers.iter().chain([&http::header::EXPECT]),
            ),
            credential_headers,
            selector,
            operator_tokens: cfg
                .server
                .management
                .as_ref()
                .map(|m| m.operator_tokens.clone())
                .unwrap_or_default(),
            debug_key: match cfg
                .server
                .management
                .as_ref()
                .and_then(|m| m.debug_signing_key.as_ref())
            {
                Some(k) => sluice_trace::credentials::DebugKey::new(k.expose().as_bytes()),
                None => {
                    let random: [u8; 32] = rand::random();
                    sluice_trace::credentials::DebugKey::new(&random)
                }
            },
            api_names: cfg.apis.iter().map(|a| a.name.clone()).collect(),
            body_budget: BodyBudget::new(cfg.server.body_buffer_bytes),
            replay_skipped,
            body_buffer_gauge,
            connector: BackendConnector(pingora::connectors::http::Connector::new(None)),
            traces,
            operator_jwt,
            affinity: affinity_memory.clone(),
            affinity_memory,
            affinity_total,
            affinity_ids,
            stream_failures,
            websockets_open,
            websocket_sessions,
            websocket_unreadable,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let dir = std::env::temp_dir();
        sluice_config::load_str(yaml, "test.yaml", &dir).unwrap_or_else(|e| panic!("{e}"))
    }

    const YAML: &str = r#"
simulators:
  - name: sim
    region: East US
backends:
  - name: sim
    simulator: sim
  - name: azure
    url: https://myres.openai.azure.com/base
  - name: ip
    url: http://127.0.0.1:9999
apis:
  - name: a
    path: /openai
    backends: [sim, azure, ip]
    subscription: { required: false, header_names: [x-key] }
"#;

    #[test]
    fn backends_resolve_targets_host_headers_and_credentials() {
        let cfg = config(YAML);
        let sims = HashMap::from([("sim".to_string(), "127.0.0.1:4321".parse().unwrap())]);
        let st = GatewayState::new(&cfg, &sims).unwrap();
        let sim = &st.backends[0];
        assert_eq!(
            (sim.tls, sim.host_header.as_str()),
            (false, "127.0.0.1:4321")
        );
        let az = &st.backends[1];
        assert_eq!((az.tls, az.port), (true, 443));
        assert_eq!(az.host_header, "myres.openai.azure.com");
        assert_eq!(az.base_path, "/base");
        assert_eq!(
            st.backends[2].fixed,
            Some("127.0.0.1:9999".parse().unwrap())
        );
        // The API's own key header is stripped as well as the usual ones.
        let names: Vec<&str> = st.credential_headers.iter().map(|h| h.as_str()).collect();
        assert!(names.contains(&"x-key") && names.contains(&"api-key"));
        assert!(names.contains(&"authorization") && names.contains(&"ocp-apim-subscription-key"));
    }

    #[test]
    fn a_simulator_that_did_not_start_is_an_error() {
        let cfg = config(YAML);
        let err = GatewayState::new(&cfg, &HashMap::new()).unwrap_err();
        assert!(err.0.contains("simulator 'sim'"), "{err}");
    }

    #[test]
    fn an_apis_backends_share_requests_evenly() {
        let cfg = config(YAML);
        let sims = HashMap::from([("sim".to_string(), "127.0.0.1:4321".parse().unwrap())]);
        let st = GatewayState::new(&cfg, &sims).unwrap();
        let picks: Vec<usize> = (0..6)
            .map(|_| {
                let mut ctx = sluice_policy::RequestContext {
                    api: Some(0),
                    ..Default::default()
                };
                st.selector
                    .begin(&mut ctx, 0, "POST", "/chat/completions", None);
                st.selector.next_backend(&mut ctx).unwrap()
            })
            .collect();
        let mut sorted = picks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 0, 1, 1, 2, 2], "{picks:?}");
    }

    #[tokio::test]
    async fn dns_answers_are_cached_and_sticky_until_a_connect_fails() {
        let cfg = config(
            "backends: [{name: l, url: 'http://localhost:8080'}]\napis: [{name: a, path: /openai, backends: [l]}]\n",
        );
        let st = GatewayState::new(&cfg, &HashMap::new()).unwrap();
        let b = &st.backends[0];
        let first = b.address().await.unwrap();
        assert!(first.ip().is_loopback());
        assert!(first.is_ipv4(), "IPv4 answers come first");
        assert_eq!(b.address().await.unwrap(), first);
        b.connect_failed();
        let n = b
            .resolved
            .read()
            .await
            .as_ref()
            .map(|r| r.addrs.len())
            .unwrap();
        let next = b.address().await.unwrap();
        assert_eq!(next == first, n == 1);
    }

    /// A resolver that gives its answers in order and counts the lookups.
    #[derive(Debug)]
    struct FakeDns {
        answers: std::sync::Mutex<std::collections::VecDeque<std::io::Result<Vec<SocketAddr>>>>,
        calls: AtomicUsize,
    }

    impl FakeDns {
        fn new(answers: Vec<std::io::Result<Vec<&str>>>) -> Arc<Self> {
            let answers = answers
                .into_iter()
                .map(|a| a.map(|v| v.iter().map(|s| s.parse().unwrap()).collect()))
                .collect();
            Arc::new(FakeDns {
                answers: std::sync::Mutex::new(answers),
                calls: AtomicUsize::new(0),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl Resolve for FakeDns {
        async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            assert_eq!((host, port), ("aoai.example", 8443));
            self.calls.fetch_add(1, Ordering::SeqCst);
            // A lookup takes a moment, so that callers can overlap.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.answers
                .lock()
                .unwrap()
                .pop_front()
                .expect("no lookup beyond the answers given")
        }
    }

    fn dns_error() -> std::io::Error {
        std::io::Error::other("SERVFAIL")
    }

    /// A backend named by host name, resolved by `dns` with the production TTL.
    fn named_backend(dns: &Arc<FakeDns>) -> BackendRuntime {
        let cfg = config(
            "backends: [{name: n, url: 'http://aoai.example:8443'}]\napis: [{name: a, path: /openai, backends: [n]}]\n",
        );
        let mut b = BackendRuntime::new(&cfg.backends[0], &HashMap::new()).unwrap();
        assert_eq!((b.fixed, b.dns_ttl), (None, DNS_TTL));
        b.resolver = dns.clone();
        b
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_reused_within_the_ttl() {
        let dns = FakeDns::new(vec![Ok(vec!["10.0.0.1:8443"])]);
        let b = named_backend(&dns);
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        tokio::time::advance(DNS_TTL - Duration::from_millis(10)).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        assert_eq!(dns.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_answer_is_looked_up_again_and_the_new_address_used() {
        let dns = FakeDns::new(vec![Ok(vec!["10.0.0.1:8443"]), Ok(vec!["10.0.0.2:8443"])]);
        let b = named_backend(&dns);
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        tokio::time::advance(DNS_TTL).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.2:8443"));
        assert_eq!(dns.calls(), 2);
        // The new answer has a TTL of its own.
        tokio::time::advance(DNS_TTL / 2).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.2:8443"));
        assert_eq!(dns.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_that_find_the_answer_expired_share_one_lookup() {
        let dns = FakeDns::new(vec![Ok(vec!["10.0.0.1:8443"]), Ok(vec!["10.0.0.2:8443"])]);
        let b = named_backend(&dns);
        b.address().await.unwrap();
        tokio::time::advance(DNS_TTL).await;
        let (x, y, z) = tokio::join!(b.address(), b.address(), b.address());
        assert_eq!(
            [x.unwrap(), y.unwrap(), z.unwrap()],
            [at("10.0.0.2:8443"); 3]
        );
        assert_eq!(dns.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_connect_moves_to_the_next_address() {
        let dns = FakeDns::new(vec![
            Ok(vec!["[fd00::1]:8443", "10.0.0.1:8443", "10.0.0.2:8443"]),
            // The same answer again: the address in use stays.
            Ok(vec!["[fd00::1]:8443", "10.0.0.1:8443", "10.0.0.2:8443"]),
            // A different answer: its first address.
            Ok(vec!["10.0.0.7:8443", "10.0.0.8:8443"]),
        ]);
        let b = named_backend(&dns);
        // IPv4 first, in the resolver's order; IPv6 after.
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        b.connect_failed();
        assert_eq!(b.address().await.unwrap(), at("10.0.0.2:8443"));
        b.connect_failed();
        assert_eq!(b.address().await.unwrap(), at("[fd00::1]:8443"));
        b.connect_failed();
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        b.connect_failed();
        assert_eq!(dns.calls(), 1);
        tokio::time::advance(DNS_TTL).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.2:8443"));
        tokio::time::advance(DNS_TTL).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.7:8443"));
        assert_eq!(dns.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_lookup_after_expiry_keeps_the_previous_answer_for_another_ttl() {
        let dns = FakeDns::new(vec![
            Ok(vec!["10.0.0.1:8443"]),
            Err(dns_error()),
            Ok(vec![]),
            Ok(vec!["10.0.0.2:8443"]),
        ]);
        let b = named_backend(&dns);
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        tokio::time::advance(DNS_TTL).await;
        // The lookup fails: the stale answer is used, and not looked up
        // again until another TTL has passed.
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        assert_eq!(dns.calls(), 2);
        tokio::time::advance(DNS_TTL - Duration::from_millis(10)).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        assert_eq!(dns.calls(), 2);
        // An empty answer counts as a failure too.
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        assert_eq!(dns.calls(), 3);
        // Once the host resolves again, its new address is used.
        tokio::time::advance(DNS_TTL).await;
        assert_eq!(b.address().await.unwrap(), at("10.0.0.2:8443"));
        assert_eq!(dns.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_lookup_is_an_error_and_is_retried_on_the_next_call() {
        let dns = FakeDns::new(vec![
            Err(dns_error()),
            Ok(vec![]),
            Ok(vec!["10.0.0.1:8443"]),
        ]);
        let b = named_backend(&dns);
        let e = b.address().await.unwrap_err();
        assert_eq!(e.to_string(), "SERVFAIL");
        let e = b.address().await.unwrap_err();
        assert_eq!(e.to_string(), "no address for aoai.example");
        assert_eq!(b.address().await.unwrap(), at("10.0.0.1:8443"));
        assert_eq!(dns.calls(), 3);
    }

    #[test]
    fn ipv4_mapped_trusted_proxies_match_canonical_peers() {
        let net = |s: &str| s.parse::<sluice_config::IpNet>().unwrap();
        assert_eq!(
            canonical_net(&net("::ffff:10.0.0.0/104")),
            net("10.0.0.0/8")
        );
        assert_eq!(
            canonical_net(&net("::ffff:10.1.2.3/128")),
            net("10.1.2.3/32")
        );
        assert_eq!(canonical_net(&net("2001:db8::/32")), net("2001:db8::/32"));
        assert_eq!(canonical_net(&net("10.0.0.0/8")), net("10.0.0.0/8"));
    }
}
