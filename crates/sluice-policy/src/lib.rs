//! Sluice's policies, free of any server framework.
//!
//! Everything here takes plain values (header maps, URIs, body bytes, the
//! per-request [`RequestContext`]) so that each piece is unit-tested without a
//! server. Only `sluice-proxy` drives these from pingora's hooks.

pub mod affinity;
pub mod body_edit;
pub mod budget;
pub mod context;
pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod realtime;
pub mod route;
pub mod selection;
pub mod stream_tag;
pub mod subscription;

pub use context::{BodyMode, RequestContext};
pub use error::GatewayError;
pub use metrics::TokenMetrics;
pub use pipeline::{ApiPipeline, InboundRequest, Shared, jwt_validator};
pub use route::{ApiRouter, MatchedApi};
pub use selection::{After, Attempt, BackendSelector, Routing};
pub use stream_tag::{StreamProbe, stream_flag};
pub use subscription::{KeyError, SubscriptionIndex, SubscriptionMatch};
