//! The management listener: `/metrics` (Prometheus text format),
//! `/health` and `/backends` (each backend's breaker, headroom and
//! in-flight count), on its own address, apart from the data plane.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::Encoder;
use sluice_policy::error::GatewayError;

use crate::state::GatewayState;

/// Answers management requests.
#[derive(Debug)]
pub struct ManagementApp {
    state: Arc<GatewayState>,
}

impl ManagementApp {
    pub fn new(state: Arc<GatewayState>) -> Self {
        ManagementApp { state }
    }
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
