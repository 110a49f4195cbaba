//! The wall clock that refresh decisions read, replaceable in tests.

use std::fmt;
use std::time::SystemTime;

/// The time a [`TokenProvider`](crate::TokenProvider) compares token expiry against. Token expiry is absolute
/// (unix time from the identity endpoint), so this is wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The real clock, [`SystemTime::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
