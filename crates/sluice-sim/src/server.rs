//! The HTTP server: accept loop, connection handling, routing and the Azure OpenAI handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tracing::debug;
use uuid::Uuid;

use crate::body::SimBody;
use crate::limiter::{Admission, RateLimiter, Throttle, ThrottleKind};
use crate::routes::{Endpoint, parse_endpoint};
use crate::store::Stores;
use crate::{Fault, RegionConfig, parse_fault};
use crate::{audio, images, realtime, resources, responses, synth};
use sluice_base::{Clock, SystemClock};

const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
const SYSTEM_FINGERPRINT: &str = "fp_sluicesim01";
const ACCESS_DENIED: &str = "Access denied due to invalid subscription key or wrong API endpoint. \
Make sure to provide a valid key for an active subscription and use a correct regional API \
endpoint for your resource.";

/// Namespace for starting simulators.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Bind `addr` (e.g. `127.0.0.1:0`) and serve on the current tokio runtime (spawned
    /// tasks). Returns once the socket is listening.
    pub async fn start(addr: SocketAddr, cfg: RegionConfig) -> std::io::Result<SimHandle> {
        // A deep accept queue: load tests open thousands of streams at once.
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        serve(listener, cfg)
    }

    /// Same as [`Simulator::start`], with an already bound std listener.
    pub async fn start_with_listener(
        l: std::net::TcpListener,
        cfg: RegionConfig,
    ) -> std::io::Result<SimHandle> {
        l.set_nonblocking(true)?;
        let listener = TcpListener::from_std(l)?;
        serve(listener, cfg)
    }
}

fn serve(listener: TcpListener, cfg: RegionConfig) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let (shutdown, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg,
        addr,
        fault: Mutex::new(None),
        requests: AtomicU64::new(0),
        last_headers: Mutex::new(None),
        limiters: Mutex::new(HashMap::new()),
        stores: Stores::new(),
        started_at: SystemClock.unix_now().as_secs(),
        shutdown,
        realtime_limit: AtomicUsize::new(realtime::DEFAULT_MAX_SESSIONS),
        realtime_active: AtomicUsize::new(0),
        realtime_total: AtomicU64::new(0),
    });
    debug!(region = %shared.cfg.name, %addr, "simulator listening");
    tokio::spawn(accept_loop(listener, shared.clone()));
    Ok(SimHandle { shared })
}

struct ArmedFault {
    fault: Fault,
    remaining: Option<u32>,
}

pub(crate) struct Shared {
    pub(crate) cfg: RegionConfig,
    addr: SocketAddr,
    fault: Mutex<Option<ArmedFault>>,
    requests: AtomicU64,
    last_headers: Mutex<Option<HeaderMap>>,
    limiters: Mutex<HashMap<String, RateLimiter>>,
    /// Stored responses, files and batches: only what this region created.
    pub(crate) stores: Stores,
    /// Unix seconds when the simulator started (the models' `created`).
    pub(crate) started_at: u64,
    shutdown: watch::Sender<bool>,
    /// Most realtime sessions open at once.
    pub(crate) realtime_limit: AtomicUsize,
    /// Realtime sessions open now.
    pub(crate) realtime_active: AtomicUsize,
    /// Realtime sessions accepted (101 answered) since the start.
    pub(crate) realtime_total: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn set_fault(&self, fault: Fault, times: Option<u32>) {
        let armed = match times {
            Some(0) => None,
            _ => Some(ArmedFault {
                fault,
                remaining: times,
            }),
        };
        *lock(&self.fault) = armed;
    }

    /// Consume one use of the handle/control-endpoint fault, if any.
    fn take_fault(&self) -> Option<Fault> {
        let mut guard = lock(&self.fault);
        let armed = guard.as_mut()?;
        let fault = armed.fault.clone();
        match &mut armed.remaining {
            None => {}
            Some(n) if *n <= 1 => *guard = None,
            Some(n) => *n -= 1,
        }
        Some(fault)
    }

    /// A receiver of the shutdown signal (see [`stopped`]).
    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn current_fault(&self) -> Option<(Fault, Option<u32>)> {
        lock(&self.fault)
            .as_ref()
            .map(|a| (a.fault.clone(), a.remaining))
    }
}

/// A handle to a running simulator. Cheap to clone.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("region", &self.shared.cfg.name)
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The configuration this simulator runs with.
    pub fn config(&self) -> &RegionConfig {
        &self.shared.cfg
    }

    /// Apply `fault` to the next `times` `/openai` requests (`None` = until cleared).
    /// Replaces any fault set before. `Some(0)` clears.
    pub fn set_fault(&self, fault: Fault, times: Option<u32>) {
        debug!(region = %self.shared.cfg.name, %fault, ?times, "fault set");
        self.shared.set_fault(fault, times);
    }

    /// Remove the fault set by [`SimHandle::set_fault`] or the control endpoint.
    pub fn clear_fault(&self) {
        *lock(&self.shared.fault) = None;
    }

    /// Number of `/openai` requests received (whatever their outcome).
    pub fn requests_seen(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Realtime (WebSocket) sessions open now.
    pub fn realtime_sessions(&self) -> usize {
        self.shared.realtime_active.load(Ordering::SeqCst)
    }

    /// Realtime sessions accepted (answered 101) since the simulator started.
    pub fn realtime_sessions_total(&self) -> u64 {
        self.shared.realtime_total.load(Ordering::SeqCst)
    }

    /// Bound the realtime sessions open at once (default 10,000); a handshake beyond it is
    /// answered 429. Sessions already open are not closed.
    pub fn set_max_realtime_sessions(&self, max: usize) {
        self.shared.realtime_limit.store(max, Ordering::SeqCst);
    }

    /// Headers of the last `/openai` request.
    pub fn last_request_headers(&self) -> Option<HeaderMap> {
        lock(&self.shared.last_headers).clone()
    }

    /// Stop accepting connections, close the open ones and end the serve loop.
    pub fn shutdown(&self) {
        debug!(region = %self.shared.cfg.name, "simulator shutting down");
        self.shared.shutdown.send_replace(true);
    }
}

/// Resolves once shutdown was requested (or the sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "set_nodelay failed");
                    }
                    tokio::spawn(serve_connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: back off briefly instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    debug!(region = %shared.cfg.name, "accept loop ended");
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    // Notified by a `close` fault: the connection is dropped without a response.
    let kill = Arc::new(Notify::new());
    let svc = {
        let shared = shared.clone();
        let kill = kill.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let kill = kill.clone();
            async move { Ok::<_, Infallible>(handle(shared, kill, req).await) }
        })
    };
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    // Upgrades hand the socket to a realtime session task, which watches shutdown itself.
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let mut shutdown = shared.shutdown.subscribe();
    tokio::select! {
        biased;
        _ = stopped(&mut shutdown) => debug!(%peer, "closing connection (shutdown)"),
        _ = kill.notified() => debug!(%peer, "closing connection (fault)"),
        res = conn => {
            if let Err(e) = res {
                debug!(%peer, error = %e, "connection ended with error");
            }
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    kill: Arc<Notify>,
    req: Request<Incoming>,
) -> Response<SimBody> {
    let client_request_id = req.headers().get("x-ms-client-request-id").cloned();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = route(&shared, &kill, req).await;
    let status = resp.status();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&shared.cfg.display_region) {
        h.insert("x-ms-region", v);
    }
    // Azure sends a fresh GUID in each.
    for name in ["apim-request-id", "x-request-id"] {
        if let Ok(v) = HeaderValue::from_str(&Uuid::new_v4().to_string()) {
            h.insert(name, v);
        }
    }
    if let Some(v) = client_request_id {
        h.insert("x-ms-client-request-id", v);
    }
    add_azure_headers(h, &path, status, shared.started_at);
    debug!(region = %shared.cfg.name, %method, %path, status = resp.status().as_u16(), "response");
    resp
}

/// The headers Azure OpenAI puts on its answers besides the ones above: on
/// every answer its security headers, and on a model's answer (chat,
/// completions, embeddings, Responses) the content-filter mark, the model
/// session and the buffering hint. With them a simulated chat answer has 11
/// headers, near the dozen-odd of Azure's, which is what a gateway in front
/// of Azure parses and forwards.
fn add_azure_headers(h: &mut HeaderMap, path: &str, status: StatusCode, started_at: u64) {
    h.insert(
        "strict-transport-security",
        HeaderValue::from_static("max-age=31536000; includeSubDomains; preload"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if !status.is_success()
        || sluice_tokens::Operation::from_path(path) == sluice_tokens::Operation::Other
    {
        return;
    }
    h.insert("x-ms-rai-invoked", HeaderValue::from_static("true"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // Azure's reads `<host id>-<deployment time>`; one per simulator run.
    if let Ok(v) = HeaderValue::from_str(&format!("s1m0-{started_at}")) {
        h.insert("azureml-model-session", v);
    }
}

/// Collapse runs of `/` into one.
fn normalize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' {
            if !prev_slash {
                out.push(c);
            }
            prev_slash = true;
        } else {
            out.push(c);
            prev_slash = false;
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

async fn route(shared: &Arc<Shared>, kill: &Notify, req: Request<Incoming>) -> Response<SimBody> {
    let path = normalize_path(req.uri().path());
    let method = req.method().clone();
    if path == "/openai" || path.starts_with("/openai/") {
        return openai(shared, kill, req, &path).await;
    }
    match (method, path.as_str()) {
        (Method::GET | Method::HEAD, "/") => {
            let text = format!(
                "Sluice Azure OpenAI simulator ({}) is running\n",
                shared.cfg.display_region
            );
            let mut resp = Response::new(SimBody::full(text));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
        (Method::GET, "/_sim/stats") => json_response(
            StatusCode::OK,
            &json!({
                "requests": shared.requests.load(Ordering::SeqCst),
                "realtime_sessions": shared.realtime_active.load(Ordering::SeqCst),
                "realtime_sessions_total": shared.realtime_total.load(Ordering::SeqCst),
            }),
        ),
        (Method::GET, "/_sim/fault") => {
            let body = match shared.current_fault() {
                Some((f, times)) => json!({ "fault": f.to_string(), "times": times }),
                None => json!({ "fault": null, "times": null }),
            };
            json_response(StatusCode::OK, &body)
        }
        (Method::POST, "/_sim/fault") => control_fault(shared, req).await,
        _ => not_found(),
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, Box<Response<SimBody>>> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            debug!(error = %e, "reading request body failed");
            let resp = if e.is::<http_body_util::LengthLimitError>() {
                azure_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    "The request body is too large.",
                )
            } else {
                bad_request("The request body could not be read.")
            };
            Err(Box::new(resp))
        }
    }
}

async fn control_fault(shared: &Shared, req: Request<Incoming>) -> Response<SimBody> {
    let bytes = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return bad_request(&format!("Invalid JSON body: {e}")),
    };
    let times = match v.get("times") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_u64() {
            Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            None => return bad_request("'times' must be a non-negative integer or null."),
        },
    };
    match v.get("fault") {
        None => bad_request("'fault' is required (a fault string, or null to clear)."),
        Some(Value::Null) => {
            *lock(&shared.fault) = None;
            debug!(region = %shared.cfg.name, "fault cleared via control endpoint");
            json_response(StatusCode::OK, &json!({ "fault": null, "times": null }))
        }
        Some(Value::String(s)) => match parse_fault(s) {
            Ok(f) => {
                debug!(region = %shared.cfg.name, fault = %f, ?times, "fault set via control endpoint");
                let body = json!({ "fault": f.to_string(), "times": times });
                shared.set_fault(f, times);
                json_response(StatusCode::OK, &body)
            }
            Err(msg) => bad_request(&msg),
        },
        Some(_) => bad_request("'fault' must be a string or null."),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Chat,
    Completions,
    Embeddings,
}

impl Op {
    fn operation_name(self) -> &'static str {
        match self {
            Op::Chat => "ChatCompletions_Create",
            Op::Completions => "Completions_Create",
            Op::Embeddings => "Embeddings_Create",
        }
    }
}

/// `(operation, deployment from the path)`; the deployment is `None` for the v1 routes.
fn parse_route(path: &str) -> Option<(Op, Option<String>)> {
    let rest = path.strip_prefix("/openai/")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segs: Vec<&str> = rest.split('/').collect();
    match segs.as_slice() {
        ["deployments", d, "chat", "completions"] => Some((Op::Chat, Some((*d).to_string()))),
        ["deployments", d, "completions"] => Some((Op::Completions, Some((*d).to_string()))),
        ["deployments", d, "embeddings"] => Some((Op::Embeddings, Some((*d).to_string()))),
        ["v1", "chat", "completions"] => Some((Op::Chat, None)),
        ["v1", "completions"] => Some((Op::Completions, None)),
        ["v1", "embeddings"] => Some((Op::Embeddings, None)),
        _ => None,
    }
}

pub(crate) fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Whether the fault headers of a request are meant for this region: true without an
/// `x-sim-fault-region` header, else when the header names it.
fn fault_targets_region(headers: &HeaderMap, cfg: &RegionConfig) -> bool {
    let Some(regions) = headers.get("x-sim-fault-region") else {
        return true;
    };
    regions
        .to_str()
        .unwrap_or("")
        .split(',')
        .any(|r| r.trim().eq_ignore_ascii_case(&cfg.name))
}

/// The per-request fault from `x-sim-fault`, honouring `x-sim-fault-region`.
fn header_fault(headers: &HeaderMap, cfg: &RegionConfig) -> Result<Option<Fault>, String> {
    let Some(raw) = headers.get("x-sim-fault") else {
        return Ok(None);
    };
    if !fault_targets_region(headers, cfg) {
        return Ok(None);
    }
    let text = raw
        .to_str()
        .map_err(|_| "x-sim-fault header is not valid text".to_string())?;
    parse_fault(text).map(Some)
}

/// How a stream is made to fail part-way (HTTP status still 200), from `x-sim-stream-fail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamFail {
    /// Responses: a `response.failed` event. Chat/completions: the error event.
    ResponseFailed,
    /// Responses: an `error` event. Chat/completions: `data: {"error":{...}}`.
    Error,
}

/// The message sent in a simulated in-stream failure.
pub(crate) const STREAM_FAIL_MESSAGE: &str = "The server had an error while processing your \
request. Sorry about that! (simulated stream failure)";

/// The in-stream failure asked for by `x-sim-stream-fail` (`response.failed` or `error`),
/// honouring `x-sim-fault-region`.
fn header_stream_fail(
    headers: &HeaderMap,
    cfg: &RegionConfig,
) -> Result<Option<StreamFail>, String> {
    let Some(raw) = headers.get("x-sim-stream-fail") else {
        return Ok(None);
    };
    if !fault_targets_region(headers, cfg) {
        return Ok(None);
    }
    let text = raw.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match text.as_str() {
        "response.failed" => Ok(Some(StreamFail::ResponseFailed)),
        "error" => Ok(Some(StreamFail::Error)),
        _ => Err(format!(
            "unknown x-sim-stream-fail value {text:?}; expected response.failed or error"
        )),
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    if let Some(v) = headers.get("api-key") {
        return constant_time_eq(v.as_bytes(), key.as_bytes());
    }
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            return constant_time_eq(&v[7..], key.as_bytes());
        }
    }
    false
}

async fn openai(
    shared: &Arc<Shared>,
    kill: &Notify,
    mut req: Request<Incoming>,
    path: &str,
) -> Response<SimBody> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    *lock(&shared.last_headers) = Some(req.headers().clone());
    let endpoint = parse_endpoint(req.method(), path);
    let on_upgrade =
        matches!(endpoint, Some(Endpoint::Realtime { .. })).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let bytes = match read_body(body).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };

    let fault = match header_fault(&parts.headers, &shared.cfg) {
        Ok(Some(f)) => Some(f),
        Ok(None) => shared.take_fault(),
        Err(msg) => return bad_request(&msg),
    };
    let stream_fail = match header_stream_fail(&parts.headers, &shared.cfg) {
        Ok(f) => f,
        Err(msg) => return bad_request(&msg),
    };
    if let Some(fault) = fault {
        debug!(region = %shared.cfg.name, %fault, "injecting fault");
        match fault {
            Fault::Status(code) => return status_fault(code),
            Fault::Hang => std::future::pending::<()>().await,
            Fault::Close => {
                kill.notify_one();
                std::future::pending::<()>().await;
            }
            Fault::SlowFirstByte(d) => tokio::time::sleep(d).await,
            Fault::Throttle(d) => return throttle_fault(d),
        }
    }

    if let Some(key) = &shared.cfg.api_key {
        let realtime = matches!(endpoint, Some(Endpoint::Realtime { .. }));
        let ok = authorized(&parts.headers, key.expose())
            || (realtime && realtime::query_key_matches(parts.uri.query(), key.expose()));
        if !ok {
            return azure_error(StatusCode::UNAUTHORIZED, "401", ACCESS_DENIED);
        }
    }

    if let Some(Endpoint::Realtime { ga }) = endpoint {
        return realtime::accept(shared, ga, &parts, on_upgrade, stream_fail);
    }
    if let Some(endpoint) = endpoint {
        return resource_endpoint(shared, endpoint, &parts, bytes, stream_fail).await;
    }

    if parts.method != Method::POST {
        return not_found();
    }
    let Some((op, path_deployment)) = parse_route(path) else {
        return not_found();
    };

    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad_request("The request body must be a JSON object."),
        Err(e) => {
            return bad_request(&format!(
                "We could not parse the JSON body of your request. ({e})"
            ));
        }
    };

    let deployment = match path_deployment {
        Some(d) => d,
        None => match body.get("model").and_then(Value::as_str) {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => return bad_request("Missing required parameter: 'model'."),
        },
    };
    let (model, tpm) = deployment_settings(&shared.cfg, &deployment);

    let plan = match plan_request(op, &body, &bytes, &deployment, &shared.cfg) {
        Ok(p) => p,
        Err(msg) => return bad_request(&msg),
    };

    let api_version = query_param(parts.uri.query(), "api-version").unwrap_or("unknown");
    let cost = plan.prompt_tokens + plan.completion_tokens;
    let admission = match admit(
        shared,
        &deployment,
        tpm,
        cost,
        op.operation_name(),
        api_version,
    ) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };

    let ctx = GenContext {
        op,
        model,
        plan,
        latency: latency_for(&parts.headers, shared.cfg.latency),
        created: SystemClock.unix_now().as_secs(),
        stream_fail,
    };
    let mut resp = match op {
        Op::Embeddings => embeddings_response(&ctx).await,
        Op::Chat | Op::Completions if ctx.plan.stream => stream_response(ctx),
        Op::Chat | Op::Completions => completion_response(&ctx).await,
    };
    if let Some(a) = admission {
        add_ratelimit_headers(resp.headers_mut(), &a);
    }
    resp
}

/// The region's latency, with `x-sim-per-token-ms: N` (0..=60000) taking
/// the place of its per-token delay for this request: how load tests hold
/// many slow streams open against a simulator that is otherwise fast.
fn latency_for(headers: &http::HeaderMap, region: crate::Latency) -> crate::Latency {
    let per_token = headers
        .get("x-sim-per-token-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms <= 60_000);
    match per_token {
        Some(ms) => crate::Latency {
            per_token: Duration::from_millis(ms),
            ..region
        },
        None => region,
    }
}

/// Dispatch one of the resource endpoints (Responses, files, batches, models).
async fn resource_endpoint(
    shared: &Arc<Shared>,
    endpoint: Endpoint,
    parts: &http::request::Parts,
    bytes: Bytes,
    stream_fail: Option<StreamFail>,
) -> Response<SimBody> {
    let query = parts.uri.query();
    match endpoint {
        Endpoint::CreateResponse => responses::create(shared, query, &bytes, stream_fail).await,
        Endpoint::GetResponse(id) => responses::get(shared, &id),
        Endpoint::DeleteResponse(id) => responses::delete(shared, &id),
        Endpoint::ResponseInputItems(id) => responses::input_items(shared, &id, query),
        Endpoint::UploadFile => resources::upload_file(shared, &parts.headers, bytes),
        Endpoint::ListFiles => resources::list_files(shared, query),
        Endpoint::GetFile(id) => resources::get_file(shared, &id),
        Endpoint::FileContent(id) => resources::file_content(shared, &id),
        Endpoint::DeleteFile(id) => resources::delete_file(shared, &id),
        Endpoint::CreateBatch => resources::create_batch(shared, &bytes),
        Endpoint::ListBatches => resources::list_batches(shared, query),
        Endpoint::GetBatch(id) => resources::get_batch(shared, &id),
        Endpoint::CancelBatch(id) => resources::cancel_batch(shared, &id),
        Endpoint::ListModels => resources::list_models(shared),
        Endpoint::GetModel(id) => resources::get_model(shared, &id),
        Endpoint::Transcription(d) => {
            audio::transcribe(shared, audio::AudioTask::Transcribe, d, parts, bytes)
        }
        Endpoint::Translation(d) => {
            audio::transcribe(shared, audio::AudioTask::Translate, d, parts, bytes)
        }
        Endpoint::Speech(d) => audio::speech(shared, d, parts, &bytes),
        Endpoint::ImageGeneration(d) => images::generate(shared, d, parts, &bytes),
        Endpoint::ImageEdit(d) => images::edit(shared, d, parts, bytes),
        // Answered before the resource endpoints (it needs the upgrade).
        Endpoint::Realtime { .. } => not_found(),
    }
}

/// The model name reported for a deployment and its tokens-per-minute limit.
pub(crate) fn deployment_settings(cfg: &RegionConfig, deployment: &str) -> (String, Option<u64>) {
    let dep_cfg = cfg.deployments.get(deployment);
    let model = dep_cfg
        .and_then(|d| d.model.clone())
        .unwrap_or_else(|| deployment.to_string());
    let tpm = dep_cfg
        .and_then(|d| d.tokens_per_minute)
        .or(cfg.default_tokens_per_minute);
    (model, tpm)
}

/// Charge `cost` tokens to the deployment's limiter when it has a limit (`tpm`). A refusal is
/// returned as the finished 429 answer; `operation` and `api_version` go into its message.
pub(crate) fn admit(
    shared: &Shared,
    deployment: &str,
    tpm: Option<u64>,
    cost: u64,
    operation: &str,
    api_version: &str,
) -> Result<Option<Admission>, Box<Response<SimBody>>> {
    let Some(tpm) = tpm else {
        return Ok(None);
    };
    let outcome = lock(&shared.limiters)
        .entry(deployment.to_string())
        .or_insert_with(|| RateLimiter::new(tpm))
        .try_acquire(SystemClock.monotonic(), cost);
    match outcome {
        Ok(a) => Ok(Some(a)),
        Err(t) => {
            debug!(region = %shared.cfg.name, %deployment, ?t, "throttled");
            Err(Box::new(throttled(operation, api_version, &t)))
        }
    }
}

/// What a validated request asks for.
#[derive(Clone, Debug)]
struct Plan {
    prompt_tokens: u64,
    /// Completion tokens to generate (0 for embeddings).
    completion_tokens: u64,
    finish_reason: &'static str,
    stream: bool,
    include_usage: bool,
    /// Embeddings: `(tokens, seed)` per input.
    /// Seeds of the embedding vectors, one per input.
    inputs: Vec<u64>,
    dimensions: usize,
    base64: bool,
}

fn optional_u64(body: &Value, key: &str) -> Result<Option<u64>, String> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("Invalid value for '{key}': expected a non-negative integer.")),
    }
}

/// Validate a request and plan the answer. Prompt tokens are counted from the
/// raw body with the real tokenizer for the model family — the count the
/// gateway estimates — so the usage reported matches what it charges.
fn plan_request(
    op: Op,
    body: &Value,
    raw: &[u8],
    deployment: &str,
    cfg: &RegionConfig,
) -> Result<Plan, String> {
    let tok_op = match op {
        Op::Chat => sluice_tokens::Operation::ChatCompletions,
        Op::Completions => sluice_tokens::Operation::Completions,
        Op::Embeddings => sluice_tokens::Operation::Embeddings,
    };
    let mut plan = Plan {
        prompt_tokens: 0,
        completion_tokens: 0,
        finish_reason: "stop",
        stream: false,
        include_usage: false,
        inputs: Vec::new(),
        dimensions: cfg.embedding_dimensions,
        base64: false,
    };
    match op {
        Op::Chat | Op::Completions => {
            if op == Op::Chat {
                match body.get("messages") {
                    Some(Value::Array(m)) if !m.is_empty() => {}
                    Some(Value::Array(_)) => {
                        return Err("'messages' must contain at least one message.".into());
                    }
                    Some(_) => return Err("'messages' must be an array.".into()),
                    None => return Err("Missing required parameter: 'messages'.".into()),
                }
            } else {
                match body.get("prompt") {
                    Some(Value::String(_) | Value::Array(_)) => {}
                    Some(_) => return Err("'prompt' must be a string or an array.".into()),
                    None => return Err("Missing required parameter: 'prompt'.".into()),
                }
            }
            let max = match optional_u64(body, "max_completion_tokens")? {
                Some(m) => Some(m),
                None => optional_u64(body, "max_tokens")?,
            };
            match max {
                Some(m) => {
                    plan.completion_tokens = m.min(synth::MAX_COMPLETION_TOKENS);
                    plan.finish_reason = "length";
                }
                None => plan.completion_tokens = u64::from(cfg.completion_tokens),
            }
            plan.stream = match body.get("stream") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("'stream' must be a boolean.".into()),
            };
            plan.include_usage = plan.stream
                && body
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
        }
        Op::Embeddings => {
            let Some(input) = body.get("input") else {
                return Err("Missing required parameter: 'input'.".into());
            };
            plan.inputs = synth::embedding_inputs(input).ok_or_else(|| {
                "'input' must be a string, an array of strings, or an array of token arrays, \
                 and must not be empty."
                    .to_string()
            })?;
            if let Some(d) = optional_u64(body, "dimensions")? {
                if d == 0 || d > 16_384 {
                    return Err("'dimensions' must be between 1 and 16384.".into());
                }
                plan.dimensions = d as usize;
            }
            plan.base64 = match body.get("encoding_format") {
                None | Some(Value::Null) => false,
                Some(Value::String(s)) if s == "float" => false,
                Some(Value::String(s)) if s == "base64" => true,
                Some(_) => return Err("'encoding_format' must be 'float' or 'base64'.".into()),
            };
        }
    }
    let counted = sluice_tokens::estimate_request(tok_op, Some(deployment), raw).prompt_tokens;
    plan.prompt_tokens = u64::from(counted).max(1);
    Ok(plan)
}

struct GenContext {
    op: Op,
    model: String,
    plan: Plan,
    latency: crate::Latency,
    created: u64,
    /// Streams only: fail after two content chunks.
    stream_fail: Option<StreamFail>,
}

pub(crate) fn per_token_total(per_token: Duration, n: u64) -> Duration {
    per_token.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
    })
}

fn prompt_filter_results() -> Value {
    json!([{ "prompt_index": 0, "content_filter_results": {} }])
}

async fn completion_response(ctx: &GenContext) -> Response<SimBody> {
    let p = &ctx.plan;
    let delay = ctx
        .latency
        .time_to_first_token
        .saturating_add(per_token_total(ctx.latency.per_token, p.completion_tokens));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let text = synth::completion_text(p.completion_tokens);
    let body = if ctx.op == Op::Chat {
        json!({
            "choices": [{
                "content_filter_results": {},
                "finish_reason": p.finish_reason,
                "index": 0,
                "logprobs": null,
                "message": { "content": text, "refusal": null, "role": "assistant" },
            }],
            "created": ctx.created,
            "id": format!("chatcmpl-{}", synth::random_alnum(29)),
            "model": ctx.model,
            "object": "chat.completion",
            "prompt_filter_results": prompt_filter_results(),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage(p.prompt_tokens, p.completion_tokens),
        })
    } else {
        json!({
            "choices": [{
                "content_filter_results": {},
                "finish_reason": p.finish_reason,
                "index": 0,
                "logprobs": null,
                "text": text,
            }],
            "created": ctx.created,
            "id": format!("cmpl-{}", synth::random_alnum(29)),
            "model": ctx.model,
            "object": "text_completion",
            "prompt_filter_results": prompt_filter_results(),
            "usage": usage(p.prompt_tokens, p.completion_tokens),
        })
    };
    json_response(StatusCode::OK, &body)
}

async fn embeddings_response(ctx: &GenContext) -> Response<SimBody> {
    if !ctx.latency.embeddings.is_zero() {
        tokio::time::sleep(ctx.latency.embeddings).await;
    }
    let p = &ctx.plan;
    let data: Vec<Value> = p
        .inputs
        .iter()
        .enumerate()
        .map(|(i, seed)| {
            let v = synth::embedding_vector(*seed, p.dimensions);
            let embedding = if p.base64 {
                Value::String(synth::embedding_base64(&v))
            } else {
                json!(v)
            };
            json!({ "embedding": embedding, "index": i, "object": "embedding" })
        })
        .collect();
    let body = json!({
        "data": data,
        "model": ctx.model,
        "object": "list",
        "usage": { "prompt_tokens": p.prompt_tokens, "total_tokens": p.prompt_tokens },
    });
    json_response(StatusCode::OK, &body)
}

fn sse_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Stream state shared by every chunk of one response.
struct StreamMeta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    chat: bool,
}

impl StreamMeta {
    fn chunk(&self, choices: Value) -> Value {
        let mut v = if self.chat {
            json!({
                "choices": choices,
                "created": self.created,
                "id": self.id,
                "model": self.model,
                "object": "chat.completion.chunk",
                "system_fingerprint": SYSTEM_FINGERPRINT,
            })
        } else {
            json!({
                "choices": choices,
                "created": self.created,
                "id": self.id,
                "model": self.model,
                "object": "text_completion",
            })
        };
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// A one-choice chunk: `delta` for chat, `text` for legacy completions.
    fn choice(&self, piece: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            let delta = match (role, piece) {
                (true, _) => json!({ "content": "", "refusal": null, "role": "assistant" }),
                (false, Some(t)) => json!({ "content": t }),
                (false, None) => json!({}),
            };
            json!({
                "content_filter_results": {},
                "delta": delta,
                "finish_reason": finish,
                "index": 0,
                "logprobs": null,
            })
        } else {
            json!({
                "content_filter_results": {},
                "finish_reason": finish,
                "index": 0,
                "logprobs": null,
                "text": piece.unwrap_or(""),
            })
        };
        self.chunk(json!([choice]))
    }
}

fn stream_response(ctx: GenContext) -> Response<SimBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(produce_stream(ctx, tx));
    sse_response(rx)
}

/// A 200 `text/event-stream` answer whose events come from `rx`.
pub(crate) fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response<SimBody> {
    let mut resp = Response::new(SimBody::Stream(rx));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    resp
}

async fn produce_stream(ctx: GenContext, tx: mpsc::Sender<Bytes>) {
    let chat = ctx.op == Op::Chat;
    let p = &ctx.plan;
    let meta = StreamMeta {
        id: if chat {
            format!("chatcmpl-{}", synth::random_alnum(29))
        } else {
            format!("cmpl-{}", synth::random_alnum(29))
        },
        created: ctx.created,
        model: ctx.model.clone(),
        include_usage: p.include_usage,
        chat,
    };
    // Send fails only when the client went away: stop producing then.
    macro_rules! send {
        ($bytes:expr) => {
            if tx.send($bytes).await.is_err() {
                debug!("stream receiver gone; stopping");
                return;
            }
        };
    }

    // Azure's first event: empty id/model/object, created 0, only prompt filter results.
    send!(sse_event(&json!({
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": prompt_filter_results(),
    })));

    if !ctx.latency.time_to_first_token.is_zero() {
        tokio::time::sleep(ctx.latency.time_to_first_token).await;
    }
    if chat {
        send!(sse_event(&meta.choice(None, true, None)));
    }
    for i in 0..p.completion_tokens {
        if !ctx.latency.per_token.is_zero() {
            tokio::time::sleep(ctx.latency.per_token).await;
        }
        let w = synth::word(i);
        let piece = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        send!(sse_event(&meta.choice(Some(&piece), false, None)));
        if ctx.stream_fail.is_some() && i + 1 == 2 {
            break;
        }
    }
    if ctx.stream_fail.is_some() {
        // After two chunks (or all of them, when fewer): an error event, then the end of the
        // stream without `[DONE]`. Both x-sim-stream-fail values fail chat streams this way.
        debug!("failing the stream (x-sim-stream-fail)");
        send!(sse_event(&json!({
            "error": { "code": "server_error", "message": STREAM_FAIL_MESSAGE },
        })));
        return;
    }
    send!(sse_event(&meta.choice(None, false, Some(p.finish_reason))));
    if p.include_usage {
        let mut v = meta.chunk(json!([]));
        v["usage"] = usage(p.prompt_tokens, p.completion_tokens);
        send!(sse_event(&v));
    }
    send!(Bytes::from_static(b"data: [DONE]\n\n"));
}

pub(crate) fn add_ratelimit_headers(h: &mut HeaderMap, a: &Admission) {
    h.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from(a.limit_requests),
    );
    h.insert(
        "x-ratelimit-limit-tokens",
        HeaderValue::from(a.limit_tokens),
    );
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from(a.remaining_requests),
    );
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from(a.remaining_tokens),
    );
    // When the windows give room back, in whole seconds (rounded up).
    let secs = |d: Duration| HeaderValue::from(d.as_millis().div_ceil(1000) as u64);
    h.insert("x-ratelimit-reset-tokens", secs(a.reset_tokens));
    h.insert("x-ratelimit-reset-requests", secs(a.reset_requests));
}

fn throttled(operation: &str, api_version: &str, t: &Throttle) -> Response<SimBody> {
    let secs = t.retry_after_secs();
    let what = match t.kind {
        ThrottleKind::Tokens => "token rate limit",
        ThrottleKind::Requests => "call rate limit",
    };
    // Keep the echoed version printable.
    let version: String = api_version
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(40)
        .collect();
    let message = format!(
        "Requests to the {} Operation under Azure OpenAI API version {} have exceeded {} of \
         your current OpenAI S0 pricing tier. Please retry after {} second{}. Please go here: \
         https://aka.ms/oai/quotaincrease if you would like to further increase the default \
         rate limit.",
        operation,
        if version.is_empty() {
            "unknown"
        } else {
            &version
        },
        what,
        secs,
        if secs == 1 { "" } else { "s" },
    );
    let mut resp = azure_error(StatusCode::TOO_MANY_REQUESTS, "429", &message);
    let h = resp.headers_mut();
    h.insert("retry-after", HeaderValue::from(secs));
    h.insert("retry-after-ms", HeaderValue::from(t.retry_after_ms()));
    h.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from(t.limit_requests),
    );
    h.insert(
        "x-ratelimit-limit-tokens",
        HeaderValue::from(t.limit_tokens),
    );
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from(t.remaining_requests),
    );
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from(t.remaining_tokens),
    );
    let (reset, policy) = match t.kind {
        ThrottleKind::Tokens => ("x-ratelimit-reset-tokens", "DeploymentRatelimit-Token"),
        ThrottleKind::Requests => ("x-ratelimit-reset-requests", "DeploymentRatelimit-Call"),
    };
    h.insert(reset, HeaderValue::from(secs));
    h.insert("policy-id", HeaderValue::from_static(policy));
    resp
}

fn status_fault(code: u16) -> Response<SimBody> {
    let status = match StatusCode::from_u16(code) {
        Ok(s) if code >= 200 => s,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let (code_str, message): (String, String) = match status.as_u16() {
        400 => ("BadRequest".into(), "The request is invalid.".into()),
        401 => ("401".into(), ACCESS_DENIED.into()),
        403 => ("Forbidden".into(), "Access is forbidden.".into()),
        404 => ("404".into(), "Resource not found".into()),
        408 => ("Timeout".into(), "The operation was timeout.".into()),
        429 => (
            "429".into(),
            "Rate limit is exceeded. Try again in 1 seconds.".into(),
        ),
        500 => (
            "InternalServerError".into(),
            "The server had an error while processing your request. Sorry about that!".into(),
        ),
        502 => ("BadGateway".into(), "Bad gateway.".into()),
        503 => (
            "ServiceUnavailable".into(),
            "The server is currently unable to handle the request.".into(),
        ),
        504 => ("GatewayTimeout".into(), "The operation was timeout.".into()),
        other => {
            let reason = status.canonical_reason().unwrap_or("Error");
            let code: String = reason.chars().filter(char::is_ascii_alphanumeric).collect();
            let code = if code.is_empty() {
                other.to_string()
            } else {
                code
            };
            (code, format!("{reason} (simulated fault)"))
        }
    };
    let mut resp = azure_error(status, &code_str, &message);
    if status == StatusCode::TOO_MANY_REQUESTS {
        let h = resp.headers_mut();
        h.insert("retry-after", HeaderValue::from_static("1"));
        h.insert("retry-after-ms", HeaderValue::from_static("1000"));
    }
    resp
}

/// A 429 from the `throttle=<ms>` fault: the wait in `retry-after-ms` and,
/// rounded up to whole seconds (at least 1), in `retry-after`.
fn throttle_fault(wait: Duration) -> Response<SimBody> {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    let secs = ms.div_ceil(1000).max(1);
    let mut resp = azure_error(
        StatusCode::TOO_MANY_REQUESTS,
        "429",
        &format!("Rate limit is exceeded. Try again in {secs} seconds. (simulated fault)"),
    );
    let h = resp.headers_mut();
    h.insert("retry-after", HeaderValue::from(secs));
    h.insert("retry-after-ms", HeaderValue::from(ms));
    resp
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<SimBody> {
    let mut resp = Response::new(SimBody::full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(crate) fn azure_error(status: StatusCode, code: &str, message: &str) -> Response<SimBody> {
    json_response(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    )
}

pub(crate) fn bad_request(message: &str) -> Response<SimBody> {
    azure_error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn not_found() -> Response<SimBody> {
    azure_error(StatusCode::NOT_FOUND, "404", "Resource not found")
}

/// An error in the OpenAI v1 shape, used by the resource endpoints (Responses, files,
/// batches, models): `{"error":{"message","type":"invalid_request_error","param","code"}}`.
pub(crate) fn oai_error(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<SimBody> {
    json_response(
        status,
        &json!({ "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        } }),
    )
}

/// 404 for an id this region does not hold, e.g. `Response with id 'x' not found.`
pub(crate) fn unknown_id(kind: &str, id: &str) -> Response<SimBody> {
    oai_error(
        StatusCode::NOT_FOUND,
        &format!("{kind} with id '{id}' not found."),
        None,
        None,
    )
}

/// Parse a request body that must be a JSON object (OpenAI-shaped 400 otherwise).
pub(crate) fn json_object_body(bytes: &[u8]) -> Result<Value, Box<Response<SimBody>>> {
    match serde_json::from_slice(bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(Box::new(oai_error(
            StatusCode::BAD_REQUEST,
            "The request body must be a JSON object.",
            None,
            None,
        ))),
        Err(e) => Err(Box::new(oai_error(
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request. ({e})"),
            None,
            None,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_token_header_overrides_the_region_delay() {
        let region = crate::Latency {
            time_to_first_token: Duration::from_millis(7),
            per_token: Duration::from_millis(3),
            ..crate::Latency::default()
        };
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-sim-per-token-ms", HeaderValue::from_str(v).unwrap());
            latency_for(&h, region)
        };
        let slow = with(" 250 ");
        assert_eq!(slow.per_token, Duration::from_millis(250));
        assert_eq!(slow.time_to_first_token, Duration::from_millis(7));
        assert_eq!(with("60000").per_token, Duration::from_secs(60));
        for bad in ["60001", "-1", "x", ""] {
            assert_eq!(with(bad).per_token, Duration::from_millis(3), "{bad:?}");
        }
        assert_eq!(
            latency_for(&HeaderMap::new(), region).per_token,
            region.per_token
        );
    }

    #[test]
    fn paths_normalise_and_route() {
        assert_eq!(
            normalize_path("//openai///deployments//x"),
            "/openai/deployments/x"
        );
        assert_eq!(normalize_path(""), "/");
        assert_eq!(
            parse_route("/openai/deployments/gpt/chat/completions"),
            Some((Op::Chat, Some("gpt".into())))
        );
        assert_eq!(
            parse_route("/openai/deployments/gpt/completions/"),
            Some((Op::Completions, Some("gpt".into())))
        );
        assert_eq!(
            parse_route("/openai/deployments/e/embeddings"),
            Some((Op::Embeddings, Some("e".into())))
        );
        assert_eq!(
            parse_route("/openai/v1/chat/completions"),
            Some((Op::Chat, None))
        );
        assert_eq!(
            parse_route("/openai/v1/embeddings"),
            Some((Op::Embeddings, None))
        );
        assert_eq!(
            parse_route("/openai/deployments/gpt/images/generations"),
            None
        );
        assert_eq!(parse_route("/openai/models"), None);
    }

    #[test]
    fn query_and_auth_helpers() {
        assert_eq!(
            query_param(Some("a=1&api-version=2024-10-21"), "api-version"),
            Some("2024-10-21")
        );
        assert_eq!(query_param(None, "api-version"), None);
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "k"));
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        assert!(authorized(&h, "k"));
        h.insert("api-key", HeaderValue::from_static("wrong"));
        assert!(!authorized(&h, "k"));
        h.insert("api-key", HeaderValue::from_static("k"));
        assert!(authorized(&h, "k"));
    }

    #[test]
    fn header_fault_respects_region() {
        let cfg = RegionConfig::new("eastus");
        let mut h = HeaderMap::new();
        assert_eq!(header_fault(&h, &cfg), Ok(None));
        h.insert("x-sim-fault", HeaderValue::from_static("status=500"));
        assert_eq!(header_fault(&h, &cfg), Ok(Some(Fault::Status(500))));
        h.insert("x-sim-fault-region", HeaderValue::from_static("westus"));
        assert_eq!(header_fault(&h, &cfg), Ok(None));
        h.insert(
            "x-sim-fault-region",
            HeaderValue::from_static("westus, EastUS"),
        );
        assert_eq!(header_fault(&h, &cfg), Ok(Some(Fault::Status(500))));
        h.insert("x-sim-fault", HeaderValue::from_static("bogus"));
        assert!(header_fault(&h, &cfg).is_err());
    }

    #[test]
    fn stream_fail_header_parses_and_respects_region() {
        let cfg = RegionConfig::new("eastus");
        let mut h = HeaderMap::new();
        assert_eq!(header_stream_fail(&h, &cfg), Ok(None));
        h.insert(
            "x-sim-stream-fail",
            HeaderValue::from_static("response.failed"),
        );
        assert_eq!(
            header_stream_fail(&h, &cfg),
            Ok(Some(StreamFail::ResponseFailed))
        );
        h.insert("x-sim-stream-fail", HeaderValue::from_static(" Error "));
        assert_eq!(header_stream_fail(&h, &cfg), Ok(Some(StreamFail::Error)));
        h.insert("x-sim-fault-region", HeaderValue::from_static("westus"));
        assert_eq!(header_stream_fail(&h, &cfg), Ok(None));
        h.insert(
            "x-sim-fault-region",
            HeaderValue::from_static("westus,eastus"),
        );
        assert_eq!(header_stream_fail(&h, &cfg), Ok(Some(StreamFail::Error)));
        h.insert("x-sim-stream-fail", HeaderValue::from_static("explode"));
        assert!(header_stream_fail(&h, &cfg).is_err());
    }

    /// `plan_request` on a JSON value, as the handler calls it on a body.
    fn plan(op: Op, body: &Value, cfg: &RegionConfig) -> Result<Plan, String> {
        let raw = serde_json::to_vec(body).expect("json");
        plan_request(op, body, &raw, "gpt-4o", cfg)
    }

    #[test]
    fn plans_validate_and_count() {
        let cfg = RegionConfig::new("x");
        let p = plan(
            Op::Chat,
            &json!({"messages":[{"role":"user","content":"abcd"}],"max_tokens":5}),
            &cfg,
        )
        .unwrap();
        assert_eq!(
            (p.prompt_tokens, p.completion_tokens, p.finish_reason),
            (8, 5, "length")
        );
        let p = plan(
            Op::Chat,
            &json!({"messages":[{"role":"user","content":"a"}]}),
            &cfg,
        )
        .unwrap();
        assert_eq!((p.completion_tokens, p.finish_reason), (24, "stop"));
        let p = plan(
            Op::Chat,
            &json!({"messages":[{"content":"a"}],"max_completion_tokens":99999,"max_tokens":1}),
            &cfg,
        )
        .unwrap();
        assert_eq!(p.completion_tokens, 4096);
        assert!(plan(Op::Chat, &json!({}), &cfg).is_err());
        assert!(plan(Op::Chat, &json!({"messages":[]}), &cfg).is_err());
        assert!(plan(Op::Chat, &json!({"messages":"hi"}), &cfg).is_err());
        assert!(plan(Op::Chat, &json!({"messages":[{}],"max_tokens":-1}), &cfg).is_err());
        assert!(plan(Op::Chat, &json!({"messages":[{}],"stream":"yes"}), &cfg).is_err());
        assert!(plan(Op::Completions, &json!({"messages":[{}]}), &cfg).is_err());
        assert!(plan(Op::Embeddings, &json!({"prompt":"x"}), &cfg).is_err());
        let p = plan(
            Op::Embeddings,
            &json!({"input":["abcd","abcdefgh"],"dimensions":8,"encoding_format":"base64"}),
            &cfg,
        )
        .unwrap();
        // cl100k: "abcd" and "abcdefgh" are one token each.
        assert_eq!((p.prompt_tokens, p.dimensions, p.base64), (2, 8, true));
        assert!(
            plan(
                Op::Embeddings,
                &json!({"input":"x","encoding_format":"hex"}),
                &cfg
            )
            .is_err()
        );
        assert!(plan(Op::Embeddings, &json!({"input":"x","dimensions":0}), &cfg).is_err());
    }

    #[test]
    fn status_fault_bodies() {
        for (code, expect) in [
            (503, "ServiceUnavailable"),
            (500, "InternalServerError"),
            (429, "429"),
            (418, "Imateapot"),
            (42, "InternalServerError"),
        ] {
            let r = status_fault(code);
            let SimBody::Full(Some(b)) = r.body() else {
                panic!("no body")
            };
            let v: Value = serde_json::from_slice(b).unwrap();
            assert_eq!(v["error"]["code"], expect, "code {code}");
        }
        let r = status_fault(429);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["retry-after-ms"], "1000");
        let r = throttle_fault(Duration::from_millis(2500));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()["retry-after-ms"], "2500");
        let r = throttle_fault(Duration::ZERO);
        assert_eq!(r.headers()["retry-after"], "1");
    }
}
