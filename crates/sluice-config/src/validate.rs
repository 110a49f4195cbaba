//! Semantic validation, secret resolution and building the resolved config.
//!
//! Everything is checked in one pass and every problem is recorded; values
//! that fail a check are replaced by placeholders so the pass can continue.
//! The built [`Config`] is only returned when no problem was recorded.

mod backend_auth;
mod policies;
mod routing;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::lines::{index_path, key_path};
use crate::parse::{KnownNames, Parsed};
use crate::problems::Problems;
use crate::raw::{
    RawAffinity, RawApi, RawApiSubscription, RawBackend, RawCounters, RawSecret, RawServer,
    RawSimulator, RawSubscription, RawTimeouts, RawTracing,
};
use crate::types::{
    DEFAULT_BODY_BUFFER_BYTES, DEFAULT_MAX_LABEL_VALUES, DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
    FIXED_CREDENTIAL_HEADERS, MAX_AFFINITY_TTL_SECONDS, MAX_PURGE_INTERVAL_SECONDS,
    MAX_SHUTDOWN_TIMEOUT_SECONDS,
};
use crate::{
    AffinitySettings, Api, Backend, BackendTarget, BackendUrl, Config, Counters, Management,
    Secret, Server, SimDeployment, SimulatorRegion, Subscription, SubscriptionSettings, Timeouts,
    Tracing,
};

pub(crate) const DEFAULT_SERVICE_NAME: &str = "sluice";
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub(crate) const DEFAULT_SIMULATOR_LISTEN: &str = "127.0.0.1:0";
pub(crate) const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// `apis[].websocket_idle_seconds`: ten minutes.
pub(crate) const DEFAULT_WEBSOCKET_IDLE_SECONDS: u64 = 600;
pub(crate) const MAX_THREADS: u64 = 256;
pub(crate) const DEFAULT_COMPLETION_TOKENS: u64 = 24;
pub(crate) const DEFAULT_EMBEDDING_DIMENSIONS: u64 = 1536;
pub(crate) const MAX_EMBEDDING_DIMENSIONS: u64 = 8192;

/// Validates `parsed`, resolves its secrets and builds the config. The result
/// is meaningful only if `problems` is still empty afterwards.
pub(crate) fn build(
    parsed: Parsed,
    problems: &mut Problems<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    base_dir: &Path,
) -> Config {
    let Parsed {
        raw,
        poisoned,
        names,
    } = parsed;
    let redacted = raw
        .server
        .as_ref()
        .and_then(|s| s.management.as_ref())
        .and_then(|m| m.tracing.as_ref())
        .and_then(|t| t.redact_headers.as_deref());
    let credentials = credential_headers(raw.apis.as_deref(), redacted);
    let mut cx = Cx {
        problems,
        poisoned: &poisoned,
        names: &names,
        credentials: &credentials,
        env,
        base_dir,
    };

    let service_name = match raw.service_name {
        Some(name) => {
            if name.trim().is_empty() {
                cx.err("service_name", "must not be empty");
            }
            name
        }
        None => DEFAULT_SERVICE_NAME.to_string(),
    };
    let server = cx.server(raw.server.unwrap_or_default());
    let simulators = cx.simulators(raw.simulators, &server);
    let backends = cx.backends(raw.backends, &server, &simulators);
    let subscriptions = cx.subscriptions(raw.subscriptions);
    let mut pools = cx.pools(raw.pools);
    let apis = cx.apis(raw.apis, &server, &mut pools);
    if server.management.is_none() {
        for (i, api) in apis.iter().enumerate() {
            for (j, p) in api.policies.iter().enumerate() {
                if matches!(p, crate::Policy::EmitTokenMetric(_)) {
                    cx.err(
                        format!("apis[{i}].policies[{j}].emit_token_metric"),
                        "token metrics are served on the management listener: set server.management.listen",
                    );
                }
            }
        }
    }
    Config {
        service_name,
        server,
        simulators,
        backends,
        subscriptions,
        pools,
        apis,
    }
}

/// Request headers that carry a credential, each with where it was
/// configured (`None` for the fixed ones): the same set as
/// [`Config::credential_headers`], read from the raw file so that an API can
/// be checked against the subscription headers of APIs after it.
type CredentialHeaders = HashMap<HeaderName, Option<String>>;

fn credential_headers(
    apis: Option<&[Option<RawApi>]>,
    redacted: Option<&[Option<String>]>,
) -> CredentialHeaders {
    let mut out: CredentialHeaders = FIXED_CREDENTIAL_HEADERS
        .iter()
        .map(|name| (HeaderName::from_static(name), None))
        .collect();
    for (i, api) in apis.unwrap_or_default().iter().enumerate() {
        let Some(names) = api
            .as_ref()
            .and_then(|api| api.subscription.as_ref())
            .and_then(|subscription| subscription.header_names.as_ref())
        else {
            continue;
        };
        for (k, name) in names.iter().enumerate() {
            if let Some(Ok(name)) = name.as_ref().map(|n| HeaderName::from_bytes(n.as_bytes())) {
                out.entry(name)
                    .or_insert_with(|| Some(format!("apis[{i}].subscription.header_names[{k}]")));
            }
        }
    }
    // Headers the operator marked secret for traces are secret everywhere.
    for (k, name) in redacted.unwrap_or_default().iter().enumerate() {
        if let Some(Ok(name)) = name.as_ref().map(|n| HeaderName::from_bytes(n.as_bytes())) {
            out.entry(name)
                .or_insert_with(|| Some(format!("server.management.tracing.redact_headers[{k}]")));
        }
    }
    out
}

struct Cx<'c, 'p> {
    problems: &'c mut Problems<'p>,
    poisoned: &'c HashSet<String>,
    names: &'c KnownNames,
    credentials: &'c CredentialHeaders,
    env: &'c dyn Fn(&str) -> Option<String>,
    base_dir: &'c Path,
}

impl Cx<'_, '_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(path, message);
    }

    /// `value`, or a "required" problem unless the value was removed because
    /// of a type error already reported.
    fn required<T>(&mut self, value: Option<T>, path: &str) -> Option<T> {
        if value.is_none() && !self.poisoned.contains(path) {
            self.err(path, "is required");
        }
        value
    }

    /// The present entries of a list, with their index and path. Empty
    /// (`- ` or `- ~`) entries are problems.
    fn entries<T>(
        &mut self,
        list: Option<Vec<Option<T>>>,
        list_path: &str,
    ) -> Vec<(usize, String, T)> {
        let mut out = Vec::new();
        for (i, item) in list.unwrap_or_default().into_iter().enumerate() {
            let path = index_path(list_path, i);
            match item {
                Some(item) => out.push((i, path, item)),
                None => {
                    if !self.poisoned.contains(&path) {
                        self.err(path, "empty entry");
                    }
                }
            }
        }
        out
    }

    /// Checks a required, unique name. `seen` maps names to the index of
    /// their first use.
    fn name(
        &mut self,
        raw: Option<String>,
        entry_path: &str,
        index: usize,
        seen: &mut HashMap<String, usize>,
        rule: NameRule,
    ) -> String {
        let path = key_path(entry_path, "name");
        let Some(name) = self.required(raw, &path) else {
            return String::new();
        };
        if let Err(message) = rule.check(&name) {
            self.err(&path, message);
        } else if let Some(first) = seen.get(&name) {
            let list = entry_path.split('[').next().unwrap_or_default();
            self.err(
                &path,
                format!("duplicate name '{name}' (already used by {list}[{first}])"),
            );
        } else {
            seen.insert(name.clone(), index);
        }
        name
    }

    fn listen(&mut self, raw: Option<String>, path: &str, default: &str) -> SocketAddr {
        let fallback = || default.parse().expect("default listen address parses");
        match raw {
            None => fallback(),
            Some(text) => match text.trim().parse() {
                Ok(addr) => addr,
                Err(_) => {
                    self.err(
                        path,
                        format!(
                            "'{text}' is not an IP:PORT address such as 127.0.0.1:8080 or [::]:8080 \
                             (host names are not resolved)"
                        ),
                    );
                    fallback()
                }
            },
        }
    }

    /// A number in `min..=max`, or `default` when absent.
    fn in_range(
        &mut self,
        value: Option<u64>,
        path: &str,
        min: u64,
        max: u64,
        default: u64,
    ) -> u64 {
        match value {
            None => default,
            Some(v) if v < min || v > max => {
                let message = if max == u64::MAX {
                    format!("must be at least {min}")
                } else {
                    format!("must be between {min} and {max}")
                };
                self.err(path, message);
                default
            }
            Some(v) => v,
        }
    }

    /// `server.management.tracing`.
    fn tracing(&mut self, raw: Option<RawTracing>) -> Tracing {
        let raw = raw.unwrap_or_default();
        let d = Tracing::default();
        let path = |k: &str| key_path("server.management.tracing", k);
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let max_traces = self.in_range(raw.max_traces, &path("max_traces"), 1, 100_000, 1000);
        let max_bytes = self.in_range(
            raw.max_bytes,
            &path("max_bytes"),
            64 * 1024,
            u64::MAX,
            d.max_bytes as u64,
        );
        let ttl = self.in_range(raw.ttl_seconds, &path("ttl_seconds"), 60, 86_400, 3600);
        let body_bytes = self.in_range(raw.body_bytes, &path("body_bytes"), 0, 1024 * 1024, 0);
        let summaries = self.in_range(raw.summaries, &path("summaries"), 0, 1_000_000, 10_000);
        // A trace holds up to two bodies; one that can never fit the store
        // would be dropped every time.
        let room = 2 * body_bytes + 64 * 1024;
        if max_bytes < room {
            self.err(
                path("max_bytes"),
                format!(
                    "must be at least {room} (twice body_bytes plus 64 KiB): a trace holds up to two bodies"
                ),
            );
        }
        let names = self.string_list(raw.redact_headers, &path("redact_headers"), false);
        let mut redact_headers = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let at = format!("{}[{i}]", path("redact_headers"));
            if let Some(h) = self.header_name(n, &at) {
                redact_headers.push(h);
            }
        }
        Tracing {
            max_traces: size(max_traces),
            max_bytes: size(max_bytes),
            ttl: Duration::from_secs(ttl),
            body_bytes: size(body_bytes),
            redact_headers,
            summaries: size(summaries),
        }
    }

    fn positive(&mut self, value: Option<u64>, path: &str, default: u64) -> u64 {
        self.in_range(value, path, 1, u64::MAX, default)
    }

    /// `base` with the fields present in `raw` replaced.
    fn timeouts(&mut self, raw: Option<RawTimeouts>, path: &str, base: Timeouts) -> Timeouts {
        let raw = raw.unwrap_or_default();
        // A value that fails the check is reported and replaced by the base.
        let mut ms = |value: Option<u64>, key: &str| -> Option<Duration> {
            let value = value?;
            let checked = self.positive(Some(value), &key_path(path, key), 0);
            (checked != 0).then(|| Duration::from_millis(checked))
        };
        Timeouts {
            connect: ms(raw.connect_ms, "connect_ms").unwrap_or(base.connect),
            read: ms(raw.read_ms, "read_ms").unwrap_or(base.read),
            write: ms(raw.write_ms, "write_ms").unwrap_or(base.write),
        }
    }

    /// `apis[].models`: deployment names, each non-empty and listed once.
    fn models(&mut self, raw: Option<Vec<Option<String>>>, list_path: &str) -> Vec<String> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (j, item_path, name) in self.entries(raw, list_path) {
            if name.trim().is_empty() || name.len() > 256 || name.contains(['/', '?', '#']) {
                self.err(
                    &item_path,
                    "must be a deployment name: 1 to 256 characters, without '/', '?' or '#'",
                );
                continue;
            }
            if let Some(first) = seen.get(&name) {
                self.err(
                    &item_path,
                    format!("'{name}' is listed twice (also at {list_path}[{first}])"),
                );
                continue;
            }
            seen.insert(name.clone(), j);
            out.push(name);
        }
        out
    }

    /// `server.trusted_proxies`: IP addresses (a `/32` or `/128`) and CIDR
    /// networks, each listed once.
    fn trusted_proxies(&mut self, raw: Option<Vec<Option<String>>>) -> Vec<IpNet> {
        let list_path = "server.trusted_proxies";
        let mut seen: HashMap<IpNet, usize> = HashMap::new();
        let mut out = Vec::new();
        for (j, item_path, text) in self.entries(raw, list_path) {
            let net = match parse_ip_net(&text) {
                Ok(net) => net,
                Err(message) => {
                    self.err(&item_path, message);
                    continue;
                }
            };
            if let Some(first) = seen.get(&net) {
                self.err(
                    &item_path,
                    format!("'{text}' is listed twice (also at {list_path}[{first}])"),
                );
                continue;
            }
            seen.insert(net, j);
            out.push(net);
        }
        out
    }

    /// `server.counters`.
    fn affinity(&mut self, raw: Option<RawAffinity>) -> AffinitySettings {
        let raw = raw.unwrap_or_default();
        let default = AffinitySettings::default();
        let max_ids = self.positive(raw.max_ids, "server.affinity.max_ids", default.max_ids);
        let ttl = self.in_range(
            raw.ttl_seconds,
            "server.affinity.ttl_seconds",
            1,
            MAX_AFFINITY_TTL_SECONDS,
            default.ttl.as_secs(),
        );
        AffinitySettings {
            max_ids,
            ttl: Duration::from_secs(ttl),
        }
    }

    fn counters(&mut self, raw: Option<RawCounters>) -> Counters {
        let raw = raw.unwrap_or_default();
        let default = Counters::default();
        let max_keys = self.positive(raw.max_keys, "server.counters.max_keys", default.max_keys);
        let purge = self.in_range(
            raw.purge_interval_seconds,
            "server.counters.purge_interval_seconds",
            1,
            MAX_PURGE_INTERVAL_SECONDS,
            default.purge_interval.as_secs(),
        );
        Counters {
            max_keys,
            purge_interval: Duration::from_secs(purge),
        }
    }

    /// Resolves `{env: NAME}` / `{file: PATH}`. Messages name the variable or
    /// the file, never the value.
    fn secret(&mut self, raw: RawSecret, path: &str) -> Option<Secret> {
        match (raw.env, raw.file) {
            (Some(_), Some(_)) => {
                self.err(path, "set exactly one of 'env' or 'file', not both");
                None
            }
            (None, None) => {
                let env_path = key_path(path, "env");
                let file_path = key_path(path, "file");
                if !self.poisoned.contains(&env_path) && !self.poisoned.contains(&file_path) {
                    self.err(
                        path,
                        "a secret needs one of 'env: VARIABLE' or 'file: PATH'",
                    );
                }
                None
            }
            (Some(var), None) => {
                let var_path = key_path(path, "env");
                if var.trim().is_empty() {
                    self.err(var_path, "must name an environment variable");
                    return None;
                }
                match (self.env)(&var) {
                    None => {
                        self.err(var_path, format!("environment variable '{var}' is not set"));
                        None
                    }
                    Some(value) if value.trim().is_empty() => {
                        self.err(var_path, format!("environment variable '{var}' is empty"));
                        None
                    }
                    Some(value) => Some(Secret::new(value.trim())),
                }
            }
            (None, Some(file)) => {
                let file_path = key_path(path, "file");
                if file.trim().is_empty() {
                    self.err(file_path, "must name a file");
                    return None;
                }
                let full = self.base_dir.join(&file);
                match std::fs::read_to_string(&full) {
                    Err(err) => {
                        let shown = if Path::new(&file).is_absolute() {
                            format!("'{file}'")
                        } else {
                            format!("'{file}' (resolved to '{}')", full.display())
                        };
                        self.err(file_path, format!("cannot read secret file {shown}: {err}"));
                        None
                    }
                    Ok(text) if text.trim().is_empty() => {
                        self.err(file_path, format!("secret file '{file}' is empty"));
                        None
                    }
                    Ok(text) => Some(Secret::new(text.trim())),
                }
            }
        }
    }

    fn optional_secret(&mut self, raw: Option<RawSecret>, path: &str) -> Option<Secret> {
        raw.and_then(|raw| self.secret(raw, path))
    }

    fn server(&mut self, raw: RawServer) -> Server {
        let default_threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(MAX_THREADS as usize);
        let threads = self.in_range(
            raw.threads,
            "server.threads",
            1,
            MAX_THREADS,
            default_threads as u64,
        );
        let listen = self.listen(raw.listen, "server.listen", DEFAULT_LISTEN);
        let management = raw.management.map(|management| {
            let path = "server.management.listen";
            let addr = match self.required(management.listen, path) {
                Some(text) => self.listen(Some(text), path, DEFAULT_SIMULATOR_LISTEN),
                None => DEFAULT_SIMULATOR_LISTEN
                    .parse()
                    .expect("default listen address parses"),
            };
            if addr.port() != 0 && addr == listen {
                self.err(
                    path,
                    "address already used by server.listen; the management listener needs its own",
                );
            }
            let max_label_values = self.positive(
                management.max_label_values,
                "server.management.max_label_values",
                DEFAULT_MAX_LABEL_VALUES,
            );
            let tokens_path = "server.management.operator_tokens";
            let mut operator_tokens = Vec::new();
            for (_, tpath, raw) in self.entries(management.operator_tokens, tokens_path) {
                if let Some(token) = self.secret(raw, &tpath) {
                    if token.expose().len() < 16 {
                        self.err(&tpath, "an operator token must be at least 16 characters");
                    }
                    operator_tokens.push(token);
                }
            }
            let key_path = "server.management.debug_signing_key";
            let debug_signing_key = self.optional_secret(management.debug_signing_key, key_path);
            if debug_signing_key
                .as_ref()
                .is_some_and(|k| k.expose().len() < 32)
            {
                self.err(key_path, "the signing key must be at least 32 characters");
            }
            let entra_id = management.entra_id.map(|raw| {
                let path = "server.management.entra_id";
                let roles_missing = raw.required_roles.as_ref().is_none_or(Vec::is_empty);
                let v = self.validate_jwt(raw, path);
                if roles_missing {
                    self.err(
                        "server.management.entra_id.required_roles",
                        "list at least one role: an operator token must carry it",
                    );
                }
                v
            });
            let tracing = self.tracing(management.tracing);
            Management {
                listen: addr,
                max_label_values: usize::try_from(max_label_values).unwrap_or(usize::MAX),
                operator_tokens,
                debug_signing_key,
                entra_id,
                tracing,
            }
        });
        let trusted_proxies = self.trusted_proxies(raw.trusted_proxies);
        let counters = self.counters(raw.counters);
        let affinity = self.affinity(raw.affinity);
        let shutdown_timeout = self.in_range(
            raw.shutdown_timeout_seconds,
            "server.shutdown_timeout_seconds",
            0,
            MAX_SHUTDOWN_TIMEOUT_SECONDS,
            DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
        );
        Server {
            listen,
            management,
            trusted_proxies,
            counters,
            affinity,
            shutdown_timeout: Duration::from_secs(shutdown_timeout),
            body_buffer_bytes: self.in_range(
                raw.body_buffer_bytes,
                "server.body_buffer_bytes",
                0,
                u64::MAX,
                DEFAULT_BODY_BUFFER_BYTES,
            ),
            threads: threads as usize,
            max_request_body_bytes: self.positive(
                raw.max_request_body_bytes,
                "server.max_request_body_bytes",
                DEFAULT_MAX_REQUEST_BODY_BYTES,
            ),
            timeouts: self.timeouts(raw.timeouts, "server.timeouts", Timeouts::default()),
        }
    }

    fn simulators(
        &mut self,
        list: Option<Vec<Option<RawSimulator>>>,
        server: &Server,
    ) -> Vec<SimulatorRegion> {
        let mut seen = HashMap::new();
        let mut listens: HashMap<SocketAddr, String> = HashMap::new();
        if server.listen.port() != 0 {
            listens.insert(server.listen, "server.listen".to_string());
        }
        if let Some(management) = &server.management
            && management.listen.port() != 0
        {
            listens
                .entry(management.listen)
                .or_insert_with(|| "server.management.listen".to_string());
        }
        let mut out = Vec::new();
        for (i, path, raw) in self.entries(list, "simulators") {
            let name = self.name(raw.name, &path, i, &mut seen, NameRule::Lowercase);
            let listen_path = key_path(&path, "listen");
            let listen = self.listen(raw.listen, &listen_path, DEFAULT_SIMULATOR_LISTEN);
            if listen.port() != 0 {
                if let Some(other) = listens.get(&listen) {
                    self.err(&listen_path, format!("address already used by {other}"));
                } else {
                    listens.insert(listen, listen_path);
                }
            }
            let region_path = key_path(&path, "region");
            let region = match self.required(raw.region, &region_path) {
                Some(region) => {
                    if region.trim().is_empty() {
                        self.err(&region_path, "must not be empty");
                    } else if region.trim() != region || HeaderValue::from_str(&region).is_err() {
                        self.err(
                            &region_path,
                            "must be printable text without surrounding spaces (it is sent as x-ms-region)",
                        );
                    }
                    region
                }
                None => String::new(),
            };
            let api_key = self.optional_secret(raw.api_key, &key_path(&path, "api_key"));
            let ms = |v: Option<u64>| Duration::from_millis(v.unwrap_or(0));
            let tokens_per_minute = raw
                .tokens_per_minute
                .map(|tpm| self.positive(Some(tpm), &key_path(&path, "tokens_per_minute"), 1));
            let completion_tokens = self.in_range(
                raw.completion_tokens,
                &key_path(&path, "completion_tokens"),
                1,
                u64::from(u32::MAX),
                DEFAULT_COMPLETION_TOKENS,
            );
            let embedding_dimensions = self.in_range(
                raw.embedding_dimensions,
                &key_path(&path, "embedding_dimensions"),
                1,
                MAX_EMBEDDING_DIMENSIONS,
                DEFAULT_EMBEDDING_DIMENSIONS,
            );
            let deployments_path = key_path(&path, "deployments");
            let mut deployments = BTreeMap::new();
            for (deployment, settings) in raw.deployments.unwrap_or_default() {
                let dpath = key_path(&deployments_path, &deployment);
                if let Err(message) = NameRule::Deployment.check(&deployment) {
                    self.err(&dpath, message);
                }
                let settings = settings.unwrap_or_default();
                if settings.model.as_ref().is_some_and(|m| m.trim().is_empty()) {
                    self.err(key_path(&dpath, "model"), "must not be empty");
                }
                let tokens_per_minute = settings
                    .tokens_per_minute
                    .map(|tpm| self.positive(Some(tpm), &key_path(&dpath, "tokens_per_minute"), 1));
                deployments.insert(
                    deployment,
                    SimDeployment {
                        model: settings.model,
                        tokens_per_minute,
                    },
                );
            }
            out.push(SimulatorRegion {
                name,
                listen,
                region,
                api_key,
                time_to_first_token: ms(raw.time_to_first_token_ms),
                per_token: ms(raw.per_token_ms),
                embeddings_latency: ms(raw.embeddings_ms),
                tokens_per_minute,
                completion_tokens: completion_tokens as u32,
                embedding_dimensions: embedding_dimensions as usize,
                deployments,
            });
        }
        out
    }

    fn backends(
        &mut self,
        list: Option<Vec<Option<RawBackend>>>,
        server: &Server,
        simulators: &[SimulatorRegion],
    ) -> Vec<Backend> {
        self.non_empty_list(list.as_ref().map(Vec::len), "backends", "backend");
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, path, raw) in self.entries(list, "backends") {
            let name = self.name(raw.name, &path, i, &mut seen, NameRule::Identifier);
            let url_path = key_path(&path, "url");
            let sim_path = key_path(&path, "simulator");
            let placeholder = BackendTarget::Simulator(String::new());
            let target = match (raw.url, raw.simulator) {
                (Some(_), Some(_)) => {
                    self.err(&path, "set exactly one of 'url' or 'simulator', not both");
                    placeholder
                }
                (None, None) => {
                    if !self.poisoned.contains(&url_path) && !self.poisoned.contains(&sim_path) {
                        self.err(&path, "one of 'url' or 'simulator' is required");
                    }
                    placeholder
                }
                (Some(url), None) => match parse_backend_url(&url) {
                    Ok(url) => BackendTarget::Url(url),
                    Err(message) => {
                        self.err(&url_path, message);
                        placeholder
                    }
                },
                (None, Some(sim)) => {
                    if !self.names.simulators.contains(&sim) {
                        self.err(
                            &sim_path,
                            format!("unknown simulator '{sim}' (not in simulators)"),
                        );
                    }
                    BackendTarget::Simulator(sim)
                }
            };
            let has_api_key = raw.api_key.is_some();
            let api_key = self.optional_secret(raw.api_key, &key_path(&path, "api_key"));
            let auth = self.backend_auth(raw.auth, &path, has_api_key);
            let deployments_path = key_path(&path, "deployments");
            let deployments = raw.deployments.unwrap_or_default();
            for (client_name, backend_name) in &deployments {
                let dpath = key_path(&deployments_path, client_name);
                if let Err(message) = NameRule::Deployment.check(client_name) {
                    self.err(&dpath, message);
                } else if let Err(message) = NameRule::Deployment.check(backend_name) {
                    self.err(&dpath, message);
                }
            }
            let timeouts =
                self.timeouts(raw.timeouts, &key_path(&path, "timeouts"), server.timeouts);
            let region = match raw.region {
                Some(r) if r.trim().is_empty() => {
                    self.err(key_path(&path, "region"), "must not be empty");
                    r
                }
                Some(r) => r,
                None => match &target {
                    BackendTarget::Simulator(sim) => simulators
                        .iter()
                        .find(|s| &s.name == sim)
                        .map(|s| s.region.clone())
                        .unwrap_or_else(|| name.clone()),
                    BackendTarget::Url(_) => name.clone(),
                },
            };
            let breaker_rules = self.breaker_rules(raw.circuit_breaker, &path);
            out.push(Backend {
                name,
                target,
                api_key,
                deployments,
                timeouts,
                auth,
                region,
                breaker_rules,
            });
        }
        out
    }

    fn subscriptions(&mut self, list: Option<Vec<Option<RawSubscription>>>) -> Vec<Subscription> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        // Key value -> (path, subscription name) of its first use.
        let mut keys: HashMap<String, (String, String)> = HashMap::new();
        for (i, path, raw) in self.entries(list, "subscriptions") {
            let name = self.name(raw.name, &path, i, &mut seen, NameRule::Identifier);
            let primary_path = key_path(&path, "primary_key");
            let primary_key = self
                .required(raw.primary_key, &primary_path)
                .and_then(|raw| self.secret(raw, &primary_path));
            let secondary_path = key_path(&path, "secondary_key");
            let secondary_key = self.optional_secret(raw.secondary_key, &secondary_path);
            for (key, key_path) in [
                (&primary_key, &primary_path),
                (&secondary_key, &secondary_path),
            ] {
                let Some(key) = key else { continue };
                match keys.get(key.expose()) {
                    Some((first_path, first_name)) => self.err(
                        key_path,
                        format!(
                            "same key value as {first_path} (subscription '{first_name}'); \
                             every subscription key must be unique"
                        ),
                    ),
                    None => {
                        keys.insert(key.expose().to_string(), (key_path.clone(), name.clone()));
                    }
                }
            }
            let active = match raw.state.as_deref() {
                None | Some("active") => true,
                Some("suspended") => false,
                Some(other) => {
                    self.err(
                        key_path(&path, "state"),
                        format!("'{other}' is not a state; use 'active' or 'suspended'"),
                    );
                    true
                }
            };
            let apis = raw.apis.map(|apis| {
                let apis_path = key_path(&path, "apis");
                let mut listed: HashMap<String, usize> = HashMap::new();
                let mut names = Vec::new();
                for (j, item_path, api) in self.entries(Some(apis), &apis_path) {
                    if !self.names.apis.contains(&api) {
                        self.err(&item_path, format!("unknown API '{api}' (not in apis)"));
                    } else if let Some(first) = listed.get(&api) {
                        self.err(
                            &item_path,
                            format!("API '{api}' is listed twice (also at {apis_path}[{first}])"),
                        );
                    } else {
                        listed.insert(api.clone(), j);
                    }
                    names.push(api);
                }
                names
            });
            out.push(Subscription {
                name,
                primary_key: primary_key.unwrap_or_else(|| Secret::new("")),
                secondary_key,
                active,
                apis,
            });
        }
        out
    }

    fn apis(
        &mut self,
        list: Option<Vec<Option<RawApi>>>,
        server: &Server,
        pools: &mut Vec<crate::Pool>,
    ) -> Vec<Api> {
        self.non_empty_list(list.as_ref().map(Vec::len), "apis", "API");
        let mut seen = HashMap::new();
        let mut paths: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, path, raw) in self.entries(list, "apis") {
            let name = self.name(raw.name, &path, i, &mut seen, NameRule::Identifier);
            let api_path_path = key_path(&path, "path");
            let api_path = self.required(raw.path, &api_path_path);
            if let Some(api_path) = &api_path {
                if let Err(message) = check_api_path(api_path) {
                    self.err(&api_path_path, message);
                } else if let Some(first) = paths.get(api_path) {
                    self.err(
                        &api_path_path,
                        format!("duplicate path '{api_path}' (already used by apis[{first}])"),
                    );
                } else {
                    paths.insert(api_path.clone(), i);
                }
            }
            let api_path = api_path.unwrap_or_default();
            let routing = self.api_routing(
                routing::RawApiRouting {
                    backends: raw.backends,
                    pool: raw.pool,
                    deployment_pools: raw.deployment_pools,
                    failover: raw.failover,
                },
                &path,
                &name,
                pools,
            );
            let max_request_body_bytes = self.positive(
                raw.max_request_body_bytes,
                &key_path(&path, "max_request_body_bytes"),
                server.max_request_body_bytes,
            );
            let websocket_idle = std::time::Duration::from_secs(self.in_range(
                raw.websocket_idle_seconds,
                &key_path(&path, "websocket_idle_seconds"),
                1,
                86_400,
                DEFAULT_WEBSOCKET_IDLE_SECONDS,
            ));
            let subscription =
                self.subscription_settings(raw.subscription, &key_path(&path, "subscription"));
            let auth = self.api_auth(raw.auth, &key_path(&path, "auth"));
            let models = self.models(raw.models, &key_path(&path, "models"));
            let policies = self.policies(raw.policies, &path, auth, &subscription);
            out.push(Api {
                name,
                path: api_path,
                backends: routing.backends,
                pool: routing.pool,
                deployment_pools: routing.deployment_pools,
                models,
                failover: routing.failover,
                subscription,
                max_request_body_bytes,
                websocket_idle,
                auth,
                policies,
            });
        }
        out
    }

    fn subscription_settings(
        &mut self,
        raw: Option<RawApiSubscription>,
        path: &str,
    ) -> SubscriptionSettings {
        let raw = raw.unwrap_or_default();
        let mut settings = SubscriptionSettings::default();
        if let Some(required) = raw.required {
            settings.required = required;
        }
        let headers_path = key_path(path, "header_names");
        match raw.header_names {
            None => {}
            Some(list) if list.is_empty() => {
                self.err(&headers_path, "must list at least one header name")
            }
            Some(list) => {
                settings.header_names.clear();
                let mut listed: HashMap<HeaderName, usize> = HashMap::new();
                for (j, item_path, header) in self.entries(Some(list), &headers_path) {
                    match HeaderName::from_bytes(header.as_bytes()) {
                        Err(_) => self.err(
                            &item_path,
                            format!("'{header}' is not a valid HTTP header name"),
                        ),
                        Ok(name) => {
                            if let Some(first) = listed.get(&name) {
                                self.err(
                                    &item_path,
                                    format!("header '{header}' is listed twice (also at {headers_path}[{first}])"),
                                );
                            } else {
                                listed.insert(name.clone(), j);
                                if settings.header_names.is_empty() {
                                    settings.challenge_name = header.to_string();
                                }
                                settings.header_names.push(name);
                            }
                        }
                    }
                }
            }
        }
        if let Some(query_name) = raw.query_name {
            if query_name.is_empty() || !query_name.bytes().all(is_unreserved) {
                self.err(
                    key_path(path, "query_name"),
                    "must be non-empty and use only letters, digits, '-', '.', '_' or '~'",
                );
            }
            settings.query_name = query_name;
        }
        settings
    }

    /// Reports a missing or empty required list.
    fn non_empty_list(&mut self, len: Option<usize>, path: &str, what: &str) {
        match len {
            Some(0) => self.err(path, format!("at least one {what} is required")),
            None if !self.poisoned.contains(path) => {
                self.err(path, format!("at least one {what} is required"))
            }
            _ => {}
        }
    }
}

/// Character rules for names.
#[derive(Debug, Clone, Copy)]
enum NameRule {
    /// Simulator names: `[a-z0-9_-]+`.
    Lowercase,
    /// Backend, subscription and API names: `[A-Za-z0-9._-]+`.
    Identifier,
    /// Deployment names (they appear in URL paths): `[A-Za-z0-9._-]+`.
    Deployment,
}

impl NameRule {
    fn check(self, name: &str) -> Result<(), String> {
        let (ok, allowed): (fn(u8) -> bool, &str) = match self {
            NameRule::Lowercase => (
                |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_',
                "lowercase letters, digits, '-' and '_'",
            ),
            NameRule::Identifier | NameRule::Deployment => (
                |b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'),
                "letters, digits, '-', '_' and '.'",
            ),
        };
        if name.is_empty() {
            Err("must not be empty".to_string())
        } else if !name.bytes().all(ok) {
            Err(format!("'{name}' may only contain {allowed}"))
        } else {
            Ok(())
        }
    }
}

/// An IP address (becomes a `/32` or `/128`) or a CIDR network whose host
/// bits are zero (`10.0.0.0/8`, `fd00::/8`).
fn parse_ip_net(text: &str) -> Result<IpNet, String> {
    const SHAPE: &str = "an IP address or CIDR network such as 10.0.0.0/8, 127.0.0.1 or ::1";
    let trimmed = text.trim();
    if trimmed.contains('/') {
        let net: IpNet = trimmed
            .parse()
            .map_err(|_| format!("'{text}' is not {SHAPE}"))?;
        if net.trunc() != net {
            return Err(format!(
                "'{text}' has bits set after the prefix length: write the network as {} \
                 (or {} for this address alone)",
                net.trunc(),
                IpNet::from(net.addr())
            ));
        }
        Ok(net)
    } else {
        let addr: IpAddr = trimmed
            .parse()
            .map_err(|_| format!("'{text}' is not {SHAPE} (host names are not resolved)"))?;
        Ok(IpNet::from(addr))
    }
}

/// RFC 3986 unreserved characters.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// An API path: `/openai` or `/seg/.../openai`, segments of unreserved
/// characters.
fn check_api_path(path: &str) -> Result<(), String> {
    const SHAPE: &str =
        "must start with '/' and end with '/openai', e.g. /openai or /team-a/openai";
    if !path.starts_with('/') || !path.ends_with("/openai") {
        return Err(format!("'{path}' {SHAPE}"));
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(format!("'{path}' has an empty, '.' or '..' segment"));
        }
        if !segment.bytes().all(is_unreserved) {
            return Err(format!(
                "'{path}' may only contain letters, digits, '-', '.', '_', '~' between slashes"
            ));
        }
    }
    Ok(())
}

/// Checks an absolute `http[s]://host[:port][/path][?query]` URL (the query
/// only when `allow_query`) and returns whether it is https. Messages do not
/// repeat the URL.
fn check_http_url(url: &str, allow_query: bool) -> Result<bool, String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".to_string());
    }
    let (base, query) = match url.split_once('?') {
        Some((base, query)) if allow_query => (base, Some(query)),
        _ => (url, None),
    };
    if let Some(query) = query {
        if query.contains('#') {
            return Err("must not contain a fragment ('#...')".to_string());
        }
        let query_ok = query
            .bytes()
            .all(|b| is_unreserved(b) || is_sub_delim_or_path(b) || b == b'?');
        if !query_ok {
            return Err("has characters that are not allowed in a URL query".to_string());
        }
    }
    match parse_backend_url(base) {
        Ok(url) => Ok(url.tls),
        Err(message) if message.starts_with("must be an absolute URL") => {
            Err("must be an absolute http:// or https:// URL".to_string())
        }
        Err(message) if message.starts_with("must not contain user info") => {
            Err("must not contain user info ('user@')".to_string())
        }
        Err(message) => Err(message),
    }
}

/// RFC 3986 sub-delimiters plus `/`, `%`, `:` and `@`: what a URL path (or
/// query) may hold besides unreserved characters.
fn is_sub_delim_or_path(b: u8) -> bool {
    matches!(
        b,
        b'/' | b'%'
            | b'!'
            | b'$'
            | b'&'
            | b'\''
            | b'('
            | b')'
            | b'*'
            | b'+'
            | b','
            | b';'
            | b'='
            | b':'
            | b'@'
    )
}

/// Parses `http[s]://host[:port][/base/path]`. Error messages do not repeat
/// the URL (it could carry credentials).
fn parse_backend_url(url: &str) -> Result<BackendUrl, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("must be an absolute URL such as https://myres.openai.azure.com".to_string());
    };
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        _ => return Err("scheme must be http or https".to_string()),
    };
    if rest.contains('#') {
        return Err("must not contain a fragment ('#...')".to_string());
    }
    if rest.contains('?') {
        return Err("must not contain a query string ('?...')".to_string());
    }
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(
            "must not contain user info ('user@'); use api_key for credentials".to_string(),
        );
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((inner, after)) = bracketed.split_once(']') else {
            return Err("has an unterminated '[' in the host".to_string());
        };
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address in brackets".to_string());
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("has text after the IPv6 address")?,
            ),
        };
        (format!("[{}]", inner.to_ascii_lowercase()), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_ascii_lowercase(), Some(port)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_string());
    }
    let host_ok = host.starts_with('[')
        || host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !host_ok || host.starts_with('.') || host.starts_with('-') || host.contains("..") {
        return Err("has an invalid host name".to_string());
    }
    let port = match port {
        None => {
            if tls {
                443
            } else {
                80
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port != 0 && p.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err("has an invalid port (expected 1-65535)".to_string()),
        },
    };
    let base_path = path.trim_end_matches('/');
    let path_ok = base_path
        .bytes()
        .all(|b| is_unreserved(b) || is_sub_delim_or_path(b));
    if !path_ok {
        return Err("has characters that are not allowed in a URL path".to_string());
    }
    if base_path.contains("//") {
        return Err("has an empty segment ('//') in its path".to_string());
    }
    Ok(BackendUrl {
        tls,
        host,
        port,
        base_path: base_path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(tls: bool, host: &str, port: u16, base_path: &str) -> BackendUrl {
        BackendUrl {
            tls,
            host: host.into(),
            port,
            base_path: base_path.into(),
        }
    }

    #[test]
    fn backend_urls() {
        assert_eq!(
            parse_backend_url("https://myres.openai.azure.com").unwrap(),
            url(true, "myres.openai.azure.com", 443, "")
        );
        assert_eq!(
            parse_backend_url("https://MyRes.openai.azure.com/").unwrap(),
            url(true, "myres.openai.azure.com", 443, "")
        );
        assert_eq!(
            parse_backend_url("http://127.0.0.1:9000/x/y/").unwrap(),
            url(false, "127.0.0.1", 9000, "/x/y")
        );
        assert_eq!(
            parse_backend_url("HTTP://[::1]:8081").unwrap(),
            url(false, "[::1]", 8081, "")
        );
        assert_eq!(
            parse_backend_url("http://h").unwrap(),
            url(false, "h", 80, "")
        );
        for bad in [
            "ftp://host",
            "myres.openai.azure.com",
            "https://",
            "https://:443",
            "https://host:0",
            "https://host:99999",
            "https://host:abc",
            "https://host:+80",
            "https://host/path?x=1",
            "https://host/#frag",
            "https://user:pw@host",
            "https://ho st",
            "https://host/a b",
            "https://host//a",
            "https://[::1",
            "https://[zz]",
        ] {
            assert!(parse_backend_url(bad).is_err(), "{bad} should be rejected");
        }
        let message = parse_backend_url("https://user:hunter2@host").unwrap_err();
        assert!(!message.contains("hunter2"));
    }

    #[test]
    fn http_urls() {
        assert_eq!(
            check_http_url(
                "https://login.example/t/v2.0/.well-known/openid-configuration?appid=a&x=1",
                true
            ),
            Ok(true)
        );
        assert_eq!(
            check_http_url("http://127.0.0.1:8081/keys", true),
            Ok(false)
        );
        assert_eq!(check_http_url("https://login.example", false), Ok(true));
        for (bad, allow_query) in [
            ("https://login.example/?a=1", false),
            ("https://login.example/?a=1#f", true),
            ("https://login.example/?a=<b>", true),
            ("https://login.example/a b", true),
            ("login.example", true),
            ("ftp://login.example", true),
            ("https://", true),
        ] {
            assert!(check_http_url(bad, allow_query).is_err(), "{bad}");
        }
        let message = check_http_url("https://u:hunter2@login.example", true).unwrap_err();
        assert!(
            !message.contains("hunter2") && !message.contains("api_key"),
            "{message}"
        );
    }

    #[test]
    fn api_paths() {
        for good in ["/openai", "/team-a/openai", "/a/b.c/openai"] {
            assert!(check_api_path(good).is_ok(), "{good}");
        }
        for bad in [
            "openai",
            "/openai/",
            "/",
            "/x",
            "//openai",
            "/a b/openai",
            "/../openai",
            "/OpenAI",
        ] {
            assert!(check_api_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ip_nets() {
        let net = |s: &str| parse_ip_net(s).map(|n| n.to_string());
        assert_eq!(net("10.0.0.0/8").unwrap(), "10.0.0.0/8");
        assert_eq!(net(" 127.0.0.1 ").unwrap(), "127.0.0.1/32");
        assert_eq!(net("::1").unwrap(), "::1/128");
        assert_eq!(net("fd00::/8").unwrap(), "fd00::/8");
        assert_eq!(net("0.0.0.0/0").unwrap(), "0.0.0.0/0");
        let message = net("10.0.0.1/8").unwrap_err();
        assert!(
            message.contains("10.0.0.0/8") && message.contains("10.0.0.1/32"),
            "{message}"
        );
        for bad in [
            "",
            "localhost",
            "10.0.0.0/33",
            "10.0.0/8",
            "[::1]",
            "10.0.0.1:80",
            "::1/129",
        ] {
            assert!(parse_ip_net(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(NameRule::Lowercase.check("east-us_2").is_ok());
        assert!(NameRule::Lowercase.check("EastUS").is_err());
        assert!(NameRule::Identifier.check("Team.A-1_x").is_ok());
        assert!(NameRule::Identifier.check("team a").is_err());
        assert!(NameRule::Identifier.check("").is_err());
        assert!(NameRule::Deployment.check("gpt-4.1-mini").is_ok());
        assert!(NameRule::Deployment.check("a/b").is_err());
    }
}
