//! The gateway's immutable runtime state, compiled once from the config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_config::{Api, Backend, BackendTarget, Config, Credential, Policy, Secret};
use sluice_identity::{CredentialConfig, ProviderOptions, TokenProvider};
use sluice_limits::{MemoryStore, SystemClock};
use sluice_policy::{ApiPipeline, ApiRouter, Shared, SubscriptionIndex, TokenMetrics};
use tokio::sync::RwLock;

/// Where a backend lives and how to reach it.
#[derive(Debug)]
pub struct BackendRuntime {
    pub name: String,
    pub tls: bool,
    /// Host name for SNI and the `Host` header.
    pub host: String,
    pub port: u16,
    /// `Host` header value (`host` or `host:port` when the port is not the default).
    pub host_header: String,
    pub base_path: String,
    pub api_key: Option<Secret>,
    pub deployments: HashMap<String, String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// Gets Entra ID tokens for this backend (`auth:`), if configured.
    pub token_provider: Option<Arc<TokenProvider>>,
    /// Fixed address (IP literals and simulators), else resolved through DNS with a TTL.
    fixed: Option<SocketAddr>,
    resolved: RwLock<Option<(Instant, Vec<SocketAddr>)>>,
    next_addr: AtomicUsize,
}

/// How long a DNS answer for a backend host is reused.
const DNS_TTL: Duration = Duration::from_secs(30);

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
                        secret: secret.expose().to_string(),
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
            tls,
            host,
            port,
            host_header,
            base_path,
            api_key: b.api_key.clone(),
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
            resolved: RwLock::new(None),
            next_addr: AtomicUsize::new(0),
        })
    }

    /// An address to connect to: fixed, or from a cached DNS answer
    /// (refreshed after [`DNS_TTL`]). The same address is used until a
    /// connection to it fails (IPv4 answers first).
    pub async fn address(&self) -> std::io::Result<SocketAddr> {
        if let Some(a) = self.fixed {
            return Ok(a);
        }
        {
            let cached = self.resolved.read().await;
            if let Some((at, addrs)) = cached.as_ref()
                && at.elapsed() < DNS_TTL
                && !addrs.is_empty()
            {
                return Ok(self.pick(addrs));
            }
        }
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        addrs.sort_by_key(|a| a.is_ipv6());
        if addrs.is_empty() {
            return Err(std::io::Error::other(format!(
                "no address for {}",
                self.host
            )));
        }
        let a = self.pick(&addrs);
        *self.resolved.write().await = Some((Instant::now(), addrs));
        Ok(a)
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

/// An API with its backends resolved to indices.
#[derive(Debug)]
pub struct ApiRuntime {
    pub config: Api,
    pub backends: Vec<usize>,
    next: AtomicUsize,
}

impl ApiRuntime {
    /// The next backend, round robin.
    pub fn next_backend(&self) -> usize {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.backends[i % self.backends.len()]
    }
}

/// Everything the gateway needs to serve requests.
#[derive(Debug)]
pub struct GatewayState {
    pub service_name: String,
    pub apis: Vec<ApiRuntime>,
    pub backends: Vec<BackendRuntime>,
    pub router: ApiRouter,
    /// Each API's compiled policies, by API index.
    pub pipelines: Vec<ApiPipeline>,
    /// What the pipelines share: subscriptions, the counter store, metrics.
    pub shared: Shared,
    /// Metrics served on the management listener.
    pub registry: prometheus::Registry,
    /// Header names that carry client credentials (every API's subscription
    /// header names plus the usual ones); all are removed before forwarding.
    pub credential_headers: Vec<http::HeaderName>,
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

impl GatewayState {
    /// `sims` maps simulator names to the addresses they listen on.
    pub fn new(cfg: &Config, sims: &HashMap<String, SocketAddr>) -> Result<Arc<Self>, BuildError> {
        let backends = cfg
            .backends
            .iter()
            .map(|b| BackendRuntime::new(b, sims))
            .collect::<Result<Vec<_>, _>>()?;
        let index_of: HashMap<&str, usize> = cfg
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.as_str(), i))
            .collect();
        let mut apis = Vec::with_capacity(cfg.apis.len());
        for a in &cfg.apis {
            let ids = a
                .backends
                .iter()
                .map(|n| {
                    index_of.get(n.as_str()).copied().ok_or_else(|| {
                        BuildError(format!("api '{}' names unknown backend '{n}'", a.name))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if ids.is_empty() {
                return Err(BuildError(format!("api '{}' has no backends", a.name)));
            }
            apis.push(ApiRuntime {
                config: a.clone(),
                backends: ids,
                next: AtomicUsize::new(0),
            });
        }
        let mut credential_headers = vec![
            http::HeaderName::from_static("api-key"),
            http::HeaderName::from_static("ocp-apim-subscription-key"),
            http::header::AUTHORIZATION,
        ];
        for a in &cfg.apis {
            for h in &a.subscription.header_names {
                if !credential_headers.contains(h) {
                    credential_headers.push(h.clone());
                }
            }
        }
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
            Some(Arc::new(
                TokenMetrics::new(&registry, &dimensions)
                    .map_err(|e| BuildError(format!("token metrics: {e}")))?,
            ))
        } else {
            None
        };
        let fetch: Arc<dyn sluice_auth::Fetch> = Arc::new(
            sluice_auth::HttpFetch::new(Duration::from_secs(10))
                .map_err(|e| BuildError(format!("JWT key fetcher: {e}")))?,
        );
        let pipelines = cfg
            .apis
            .iter()
            .map(|a| ApiPipeline::new(a, fetch.clone()))
            .collect();
        let shared = Shared {
            subscriptions: Arc::new(SubscriptionIndex::new(&cfg.subscriptions)),
            store: Arc::new(MemoryStore::new(Arc::new(SystemClock))),
            metrics,
        };
        Ok(Arc::new(GatewayState {
            service_name: cfg.service_name.clone(),
            router: ApiRouter::new(&cfg.apis),
            pipelines,
            shared,
            registry,
            apis,
            backends,
            credential_headers,
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
    fn round_robin_over_an_apis_backends() {
        let cfg = config(YAML);
        let sims = HashMap::from([("sim".to_string(), "127.0.0.1:4321".parse().unwrap())]);
        let st = GatewayState::new(&cfg, &sims).unwrap();
        let picks: Vec<usize> = (0..6).map(|_| st.apis[0].next_backend()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
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
            .map(|(_, a)| a.len())
            .unwrap();
        let next = b.address().await.unwrap();
        assert_eq!(next == first, n == 1);
    }
}
