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
