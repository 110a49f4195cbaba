//! Request and token limit counters for Sluice: the store interface (reserve, then reconcile), the in-memory store, and
//! the limiter arithmetic.
//!
//! These counters sit behind three policies:
//! - `rate_limit` (APIM's `rate-limit-by-key`): calls per sliding window ([`Window::Sliding`]);
//! - `quota` (APIM's `quota-by-key`): calls per fixed, epoch-aligned window ([`Window::Fixed`]);
//! - `token_limit` (APIM's `azure-openai-token-limit`): tokens per minute ([`Window::Sliding`] of 60 s) and an optional
//!   token quota per calendar period ([`Window::Calendar`]).
//!
//! A policy talks to a [`CounterStore`]: it [`reserve`](CounterStore::reserve)s what it expects to use before the request
//! is forwarded (a call, or the estimated prompt tokens), and [`reconcile`](CounterStore::reconcile)s the reservation
//! once the real amount is known (the response's `usage`). [`MemoryStore`] is the in-process store; a shared store
//! (Redis) can implement the same trait without the policies changing.
//!
//! Counter keys are chosen by clients (a header, a claim, the client address), so the state they create is bounded:
//! - [`client_key`] turns a client's value into a fixed-size key (a truncated SHA-256, the same in every process and
//!   on every machine, so replicas sharing a store agree on it);
//! - [`MemoryStore`] holds at most a fixed number of counters ([`MemoryStore::with_max_keys`], 1,000,000 by
//!   default): at the cap a new key evicts the least recently used counter, counted by [`MemoryStore::evictions`];
//! - idle counters are dropped by [`MemoryStore::purge_expired`], which is never run on the request path: the
//!   embedding process calls it periodically from a background task.
//!
//! Time comes from a [`Clock`] (its wall clock, [`Clock::now_millis`]: milliseconds since the UNIX epoch) so that
//! tests drive it with a [`ManualClock`] and calendar periods agree across replicas.
//!
//! The message helpers ([`rate_limit_message`] and friends) produce APIM's texts for the 429/403 bodies.

mod key;
mod memory;
mod messages;
mod store;
mod window;

pub use key::client_key;
pub use memory::MemoryStore;
pub use messages::{
    call_quota_message, rate_limit_message, retry_after_secs, token_limit_message,
    token_quota_message,
};
pub use sluice_base::{Clock, ManualClock, SystemClock};
pub use store::{CounterStore, Exceeded, Reservation, Usage};
pub use window::{Limit, Period, Window};
