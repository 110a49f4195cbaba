//! Per-request state shared by the steps of one request.
//!
//! Policies keep nothing per request in `self`: it all lives here. Each field
//! says which step writes it and which read it.

use std::time::Instant;

use crate::stream_tag::StreamProbe;
use crate::subscription::SubscriptionMatch;

/// How the request body is being inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyMode {
    /// Not decided yet, or the request has no body.
    #[default]
    None,
    /// Read whole before routing (small bodies): it can be replayed.
    Preread,
    /// Streamed to the backend and scanned as it passes.
    Streamed,
}

#[derive(Debug)]
pub struct RequestContext {
    /// When the gateway received the request. Written at creation; read for timing.
    pub started: Instant,
    /// Index of the matched API. Written by routing; read by every later step.
    pub api: Option<usize>,
    /// Byte offset in the request path where the part after the API prefix starts.
    /// Written by routing; read when building the upstream path.
    pub rest_offset: usize,
    /// The caller's subscription. Written by the subscription step; read by
    /// limits and metrics (later issues) and logging.
    pub subscription: Option<SubscriptionMatch>,
    /// Written by the body step; read by the body filter and the retry logic.
    pub body_mode: BodyMode,
    /// Bytes of request body seen so far. Written by the body step / body filter.
    pub body_len: u64,
    /// Scans a streamed body for its `stream` field as it passes (O(1) state).
    /// Written and read by the body filter.
    pub body_probe: StreamProbe,
    /// The request body's `stream` flag. Written by the body step (preread) or at
    /// the end of a streamed body; read by the response step (`x-ms-stream`).
    pub stream: bool,
    /// Index of the backend chosen. Written by backend selection; read by the
    /// upstream request step and error mapping.
    pub backend: Option<usize>,
}

impl Default for RequestContext {
    fn default() -> Self {
        RequestContext {
            started: Instant::now(),
            api: None,
            rest_offset: 0,
            subscription: None,
            body_mode: BodyMode::None,
            body_len: 0,
            body_probe: StreamProbe::default(),
            stream: false,
            backend: None,
        }
    }
}
