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

use crate::state::GatewayState;

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
    fn is_operator(&self, req: &pingora::http::RequestHeader) -> bool {
        let Some(token) = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
        else {
            return false;
        };
        let d = digest(token);
        self.operators
            .iter()
            .fold(subtle::Choice::from(0), |found, op| found | op.ct_eq(&d))
            .into()
    }
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
        let open = matches!(req.uri.path(), "/metrics" | "/health");
        if !open && !self.is_operator(req) {
            // A subscription key never opens these endpoints.
            let message = if self.operators.is_empty() {
                "Operator endpoints are closed: no operator token is configured (server.management.operator_tokens)."
            } else if req.headers.contains_key(http::header::AUTHORIZATION) {
                "The operator token is not valid."
            } else {
                "An operator token is required: send Authorization: Bearer <token>."
            };
            return unauthorized(message);
        }
        let path = req.uri.path().to_string();
        if req.method == http::Method::POST && is_gateway_action(&path, "listDebugCredentials") {
            return self.list_debug_credentials(session).await;
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
