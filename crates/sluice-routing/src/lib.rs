//! Backend selection for Sluice: which Azure OpenAI backend of a pool serves the next attempt of a request, and
//! whether a failed attempt may be tried again elsewhere.
//!
//! The crate holds no I/O and reads no clock. Every function that depends on time takes `now`, a reading of a
//! monotonic clock (`Clock::monotonic` from `sluice-base`), except [`retry_after_from`], which needs the wall clock
//! to turn an HTTP-date into a delay. The pieces:
//!
//! - [`Outcome`]: what an attempt at a backend came to (a status, or a connection-level failure);
//! - [`retry_after_from`] / [`parse_reset`]: how long a backend asked us to stay away, read from its headers;
//! - [`Breaker`]: one circuit breaker per backend, driven by [`BreakerRule`]s in the manner of APIM's
//!   circuit-breaker rules (closed, open for a rest, then half-open with a single probe);
//! - [`Headroom`]: the rate-limit room a backend last reported, so that a request it cannot fit is steered
//!   elsewhere before it is refused with a 429;
//! - [`Pool`] and [`select`]: members grouped by priority, smooth weighted round robin within a group, skipping
//!   backends that are resting, already tried, or (when the pool steers) short of room;
//! - [`call_kind`] / [`CallKind::may_fail_over`]: which failures may be retried on another backend without risking
//!   that an operation is carried out twice;
//! - [`creates`], [`owned_id_in_path`] / [`owned_ids_in_body`] and [`AffinityMap`]: object affinity. Stored
//!   responses, files, batches, vector stores, conversations, stored chat completions, fine-tuning jobs, assistants,
//!   threads and uploads ([`OwnedKind`]) exist only on the backend that created them; the gateway learns each new id
//!   from the answer to the call that created it and sends every later call naming that id to the same backend.
//!
//! State that worker threads share ([`Breaker`], [`Headroom`], a pool's round-robin counters, an [`AffinityMap`]'s
//! shards) sits behind `std::sync::Mutex`es held only for a few comparisons or a hash-map operation; a poisoned lock
//! is taken over as it is, since every update leaves the state consistent.

mod affinity;
mod breaker;
mod call;
mod headroom;
mod outcome;
mod pool;
mod retry_after;
mod select;

pub use affinity::{
    AffinityMap, MAX_ID_LEN, MAX_IDS_IN_BODY, OwnedKind, asks_to_store, creates, owned_id_in_path,
    owned_ids_in_body, plausible_id,
};
pub use breaker::{Admit, Breaker, BreakerRule, BreakerView, PROBE_LEASE, TripCause};
pub use call::{CallKind, call_kind, call_kind_with};
pub use headroom::{Fit, Headroom, HeadroomView};
pub use outcome::Outcome;
pub use pool::{BackendHealth, Member, Pool};
pub use retry_after::{parse_reset, retry_after_from};
pub use select::{Choice, Members, Need, candidates, select, swrr_pick};
