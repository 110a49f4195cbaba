//! The management listener: `/metrics` (Prometheus text format) and
//! `/health`, open to scrapers and probes, and the operator endpoints,
//! `/backends` (each backend's breaker, headroom and in-flight count), which
//! need `Authorization: Bearer` with an operator token; on its own address,
//! apart from the data plane.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::Encoder;
use sha2::{Digest, Sha256};
use sluice_policy::error::GatewayError;
use subtle::ConstantTimeEq;

use sluice_auth::JwtError;
use sluice_trace::store::Lookup;
use sluice_trace::summary::{SummaryFilter, summary_json};

use crate::state::GatewayState;

/// The trace viewer: a static page, its script and its style.
const VIEWER_HTML: &str = include_str!("../assets/viewer.html");
const VIEWER_JS: &str = include_str!("../assets/viewer.js");
const VIEWER_CSS: &str = include_str!("../assets/viewer.css");

/// The viewer's Content-Security-Policy: only its own script, style and
/// API calls; nothing inline, nothing framed.
const VIEWER_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How long `listTrace` waits for a trace whose request is still running.
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers management requests.
#[derive(Debug)]
pub struct ManagementApp {
    state: Arc<GatewayState>,
    /// SHA-256 digests of the operator tokens (`operator_tokens`).
    operators: Vec<[u8; 32]>,
}

impl ManagementApp {
    pub fn new(state: Arc<GatewayState>) -> Self {
        let operators = state
            .operator_tokens
            .iter()
            .map(|t| digest(t.expose()))
            .collect();
        ManagementApp { state, operators }
    }

    /// Whether the request carries `Authorization: Bearer <an operator
    /// token>`. Digests are compared in constant time, and every token is
    /// compared, so timing says nothing about which (if any) matched.
    fn is_operator(&self, token: &str) -> bool {
        let d = digest(token);
        self.operators
            .iter()
            .fold(subtle::Choice::from(0), |found, op| found | op.ct_eq(&d))
            .into()
    }

    /// Who may use the operator endpoints: a configured operator token, or
    /// (with `server.management.entra_id`) an Entra ID token that passes
    /// `validate_jwt`'s checks and carries the required roles.
    async fn access(&self, req: &pingora::http::RequestHeader) -> Access {
        let header = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(token) = header
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
        else {
            return Access::Unauthorized(if header.is_some() {
                "The Authorization header must be 'Bearer <token>'."
            } else if self.operators.is_empty() && self.state.operator_jwt.is_none() {
                "Operator endpoints are closed: no operator token is configured (server.management.operator_tokens)."
            } else {
                "An operator token is required: send Authorization: Bearer <token>."
            });
        };
        if self.is_operator(token) {
            return Access::Granted;
        }
        let Some(validator) = &self.state.operator_jwt else {
            return Access::Unauthorized("The operator token is not valid.");
        };
        match validator.validate(header).await {
            Ok(_) => Access::Granted,
            Err(e @ (JwtError::MissingRole | JwtError::AppNotAllowed)) => {
                Access::Forbidden(e.message())
            }
            Err(JwtError::KeysUnavailable) => Access::Unavailable,
            Err(JwtError::Malformed) => Access::Unauthorized("The operator token is not valid."),
            Err(e) => Access::Unauthorized(e.message()),
        }
    }
}

/// Whether a management request may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Granted,
    /// No valid credential: 401.
    Unauthorized(&'static str),
    /// A valid Entra ID token without the operator role: 403.
    Forbidden(&'static str),
    /// Entra ID keys cannot be fetched: 503.
    Unavailable,
}

/// `{prefix}/gateways/{gateway}/{action}`: any prefix, so APIM's own URLs
/// (`/subscriptions/.../service/{name}/gateways/managed/...`) work as they are.
fn is_gateway_action(path: &str, action: &str) -> bool {
    let mut segments = path.trim_end_matches('/').rsplit('/');
    segments.next() == Some(action)
        && segments.next().is_some_and(|g| !g.is_empty())
        && segments.next() == Some("gateways")
}

/// An error in the management API's shape.
fn management_error(status: u16, code: &str, message: &str) -> Response<Vec<u8>> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    reply(
        status,
        "application/json",
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// The most request body a management call may send.
const MANAGEMENT_BODY_LIMIT: usize = 64 * 1024;

async fn read_body(session: &mut ServerSession) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = session.read_request_body().await {
        body.extend_from_slice(&chunk);
        if body.len() > MANAGEMENT_BODY_LIMIT {
            return None;
        }
    }
    Some(body)
}

impl ManagementApp {
    /// APIM's `listDebugCredentials`: `{credentialsExpireAfter, apiId,
    /// purposes}` -> `{"token": ...}`, a credential that lets requests to
    /// that API be traced until it expires.
    async fn list_debug_credentials(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let bad = |m: &str| management_error(400, "ValidationError", m);
        let Some(body) = read_body(session).await else {
            return bad("The request body is too large.");
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return bad("The request body must be a JSON object.");
        };
        let Some(api_id) = v.get("apiId").and_then(|a| a.as_str()) else {
            return bad("'apiId' is required: the API's id, e.g. /apis/azure-openai.");
        };
        // The last segment names the API, so a full APIM resource id works.
        let api = api_id
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("");
        if !self.state.api_names.iter().any(|n| n == api) {
            return management_error(404, "NotFound", &format!("API '{api}' was not found."));
        }
        match v.get("purposes").and_then(|p| p.as_array()) {
            Some(p)
                if !p.is_empty()
                    && p.iter().all(|x| {
                        x.as_str() == Some(sluice_trace::credentials::PURPOSE_TRACING)
                    }) => {}
            _ => return bad("'purposes' is required and may only hold \"tracing\"."),
        }
        let lifetime = match v.get("credentialsExpireAfter") {
            None | Some(serde_json::Value::Null) => sluice_trace::credentials::MAX_LIFETIME,
            Some(serde_json::Value::String(s)) => {
                match sluice_trace::credentials::parse_iso_duration(s) {
                    Some(d) if !d.is_zero() && d <= sluice_trace::credentials::MAX_LIFETIME => d,
                    _ => {
                        return bad(
                            "'credentialsExpireAfter' must be an ISO-8601 duration of at most PT1H.",
                        );
                    }
                }
            }
            Some(_) => return bad("'credentialsExpireAfter' must be a string such as PT1H."),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let token = self.state.debug_key.issue(api, lifetime, now);
        reply(
            200,
            "application/json",
            serde_json::to_vec(&serde_json::json!({ "token": token })).unwrap_or_default(),
        )
    }
}

impl ManagementApp {
    /// APIM's `listTrace`: `{"traceId": ...}` -> the trace.
    async fn list_trace(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let bad = |m: &str| management_error(400, "ValidationError", m);
        let Some(body) = read_body(session).await else {
            return bad("The request body is too large.");
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return bad("The request body must be a JSON object with 'traceId'.");
        };
        match v.get("traceId").and_then(|t| t.as_str()) {
            Some(id) if !id.trim().is_empty() => self.trace_by_id(id.trim()).await,
            _ => bad("'traceId' is required: the value of the Apim-Trace-Id response header."),
        }
    }

    /// The trace with this id, built now from what its request recorded.
    async fn trace_by_id(&self, id: &str) -> Response<Vec<u8>> {
        let traces = &self.state.traces;
        let lookup = traces
            .store
            .get_waiting(id, PENDING_WAIT, || traces.now())
            .await;
        match lookup {
            Lookup::Found(rec) => {
                let trace = rec.to_trace(&self.state.service_name, id);
                reply(
                    200,
                    "application/json",
                    serde_json::to_vec(&trace).unwrap_or_default(),
                )
            }
            Lookup::Pending => management_error(
                409,
                "TraceInProgress",
                &format!(
                    "The request traced as '{id}' is still running; its trace is complete when its response ends. Ask again then."
                ),
            ),
            Lookup::Unknown => management_error(
                404,
                "NotFound",
                &format!(
                    "Trace '{id}' was not found: it may never have existed, or it expired, was evicted from the trace store, or was larger than tracing.max_bytes allows."
                ),
            ),
        }
    }

    /// `GET /traces?...`: recent request summaries, newest first.
    fn summaries(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let filter = match SummaryFilter::parse(query, std::time::SystemTime::now()) {
            Ok(f) => f,
            Err(m) => return management_error(400, "ValidationError", &m),
        };
        let traces = &self.state.traces;
        let list: Vec<serde_json::Value> =
            traces.ring.list(&filter).iter().map(summary_json).collect();
        let stats = traces.store.stats();
        let body = serde_json::json!({
            "summaries": list,
            "ringCapacity": traces.ring.capacity(),
            "store": {
                "traces": stats.traces,
                "bytes": stats.bytes,
                "pending": stats.pending,
                "evicted": stats.evicted,
                "rejected": stats.rejected,
            },
        });
        reply(
            200,
            "application/json",
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }
}

/// The viewer file a path names: (content type, text).
fn viewer_asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/viewer" | "/viewer/" => Some(("text/html; charset=utf-8", VIEWER_HTML)),
        "/viewer/app.js" => Some(("text/javascript; charset=utf-8", VIEWER_JS)),
        "/viewer/app.css" => Some(("text/css; charset=utf-8", VIEWER_CSS)),
        p => p
            .strip_prefix("/viewer/traces/")
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(|_| ("text/html; charset=utf-8", VIEWER_HTML)),
    }
}

/// A viewer file, with its strict Content-Security-Policy.
fn viewer_reply(content_type: &str, text: &str) -> Response<Vec<u8>> {
    let mut r = reply(200, content_type, text.as_bytes().to_vec());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(VIEWER_CSP),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        http::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// 401 in the management API's error shape, with a Bearer challenge.
fn unauthorized(message: &str) -> Response<Vec<u8>> {
    let body = serde_json::json!({ "error": { "code": "Unauthorized", "message": message } });
    let mut r = reply(
        401,
        "application/json",
        serde_json::to_vec(&body).unwrap_or_default(),
    );
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"sluice-management\""),
    );
    r
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for ManagementApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let get = req.method == http::Method::GET;
        if get && let Some((content_type, text)) = viewer_asset(req.uri.path()) {
            // The page holds no data: it asks for a token and sends it.
            return viewer_reply(content_type, text);
        }
        if get && req.uri.path() == "/favicon.ico" {
            // Browsers ask for it on their own; answered without a token.
            return reply(404, "application/json", GatewayError::not_found().body());
        }
        let open = matches!(req.uri.path(), "/metrics" | "/health");
        if !open {
            // A subscription key never opens these endpoints.
            match self.access(req).await {
                Access::Granted => {}
                Access::Unauthorized(m) => return unauthorized(m),
                Access::Forbidden(m) => {
                    return management_error(
                        403,
                        "Forbidden",
                        &format!(
                            "{m} Operators need every role in server.management.entra_id.required_roles."
                        ),
                    );
                }
                Access::Unavailable => {
                    return management_error(
                        503,
                        "ServiceUnavailable",
                        "Entra ID signing keys are unavailable; try again shortly.",
                    );
                }
            }
        }
        let req = session.req_header();
        let path = req.uri.path().to_string();
        if req.method == http::Method::POST && is_gateway_action(&path, "listDebugCredentials") {
            return self.list_debug_credentials(session).await;
        }
        if req.method == http::Method::POST && is_gateway_action(&path, "listTrace") {
            return self.list_trace(session).await;
        }
        if get && (path == "/traces" || path == "/traces/") {
            return self.summaries(req.uri.query());
        }
        if get && let Some(id) = path.strip_prefix("/traces/") {
            return self.trace_by_id(id).await;
        }
        let req = session.req_header();
        match req.uri.path() {
            "/metrics" if get => {
                self.state.sync_metrics();
                let mut out = Vec::new();
                let encoder = prometheus::TextEncoder::new();
                if encoder
                    .encode(&self.state.registry.gather(), &mut out)
                    .is_err()
                {
                    let e = GatewayError::new(500, "Internal server error");
                    return reply(500, "application/json", e.body());
                }
                reply(200, encoder.format_type(), out)
            }
            "/health" if get => reply(200, "text/plain; charset=utf-8", b"ok\n".to_vec()),
            "/backends" if get => {
                let body = serde_json::json!({ "backends": self.state.selector.statuses() });
                reply(
                    200,
                    "application/json",
                    serde_json::to_vec_pretty(&body).unwrap_or_default(),
                )
            }
            _ => reply(404, "application/json", GatewayError::not_found().body()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewer_paths() {
        assert_eq!(
            viewer_asset("/viewer").map(|a| a.0),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(
            viewer_asset("/viewer/").map(|a| a.0),
            Some("text/html; charset=utf-8")
        );
        assert!(viewer_asset("/viewer/traces/abc").is_some());
        assert_eq!(
            viewer_asset("/viewer/app.js").map(|a| a.0),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(
            viewer_asset("/viewer/app.css").map(|a| a.0),
            Some("text/css; charset=utf-8")
        );
        assert!(viewer_asset("/viewer/traces/").is_none());
        assert!(viewer_asset("/viewer/other").is_none());
        assert!(viewer_asset("/viewerx").is_none());
        assert!(viewer_asset("/traces").is_none());
    }

    #[test]
    fn gateway_actions_take_any_prefix() {
        assert!(is_gateway_action(
            "/gateways/managed/listDebugCredentials",
            "listDebugCredentials"
        ));
        assert!(is_gateway_action(
            "/subscriptions/s/resourceGroups/r/providers/Microsoft.ApiManagement/service/x/gateways/managed/listDebugCredentials",
            "listDebugCredentials"
        ));
        assert!(is_gateway_action("/gateways/gw1/listTrace/", "listTrace"));
        assert!(!is_gateway_action("/gateways//listTrace", "listTrace"));
        assert!(!is_gateway_action(
            "/gateway/managed/listTrace",
            "listTrace"
        ));
        assert!(!is_gateway_action("/listTrace", "listTrace"));
        assert!(!is_gateway_action(
            "/gateways/managed/listTrace",
            "listDebugCredentials"
        ));
    }
}
