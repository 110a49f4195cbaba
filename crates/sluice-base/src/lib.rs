//! Small types every Sluice crate shares, with no dependencies of their own.
//!
//! - [`Secret`]: a key, token or password that never prints (`Debug` and `Display` show `<redacted>`).
//! - [`Clock`]: the one time source of the crates that decide by time (JWT validation, token refresh, limits), with
//!   [`SystemClock`] for production and [`ManualClock`] for tests.

mod clock;
mod secret;

pub use clock::{Clock, ManualClock, SystemClock};
pub use secret::Secret;
