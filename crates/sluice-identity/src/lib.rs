//! Entra ID tokens for Sluice's backends (APIM's `authentication-managed-identity`) through azure_identity,
//! cached and refreshed.
//!
//! A [`TokenProvider`] per backend obtains tokens for one scope (by default
//! `https://cognitiveservices.azure.com/.default`) with the configured credential — managed identity, workload
//! identity, a client secret or the Azure CLI — caches them, refreshes them before they expire with at most one
//! fetch in flight, and hands the proxy the bearer token. See [`TokenProvider`] for the exact
//! refresh policy. Errors name the credential type and never contain a token or secret.

mod config;
mod credential;
mod error;
mod provider;

pub use config::{CredentialConfig, DEFAULT_SCOPE, ProviderOptions};
pub use error::IdentityError;
pub use sluice_base::{Clock, ManualClock, Secret, SystemClock};

use std::fmt;
use std::sync::Arc;

/// Tokens for one backend: cached, refreshed before expiry, one fetch at a time.
///
/// # Refresh policy
///
/// For a token of lifetime `L` (from when it was fetched to its `expires_on`):
///
/// - From `min(max(5 min, L / 10), L / 2)` before expiry on, the next call starts a refresh in the background and
///   still returns the current token; other calls keep getting the current token while the refresh runs.
/// - In its last `min(30 s, L / 4)` a token is not handed out any more; callers wait for a new one.
/// - Callers without a usable token all wait for the same single fetch and share its result.
/// - A failed refresh keeps the current token in use and is retried 10 seconds later. A fetch gives up after 30
///   seconds. Transient HTTP failures are retried twice within a fetch (about 200 ms, then 400 ms), except by the
///   IMDS managed identity, which keeps azure_identity's own IMDS retry policy (bounded by the 30 seconds).
///
/// azure_identity's credentials cache tokens themselves and only refresh them in their last 5 minutes, so each
/// fetch here uses a newly built credential: a refresh always reaches the identity endpoint.
///
/// Fetches run as tokio tasks: [`token`](Self::token) must be called inside a tokio runtime.
pub struct TokenProvider {
    inner: Arc<provider::Inner>,
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider")
            .field("cache", &self.inner)
            .finish()
    }
}

impl TokenProvider {
    /// A provider for `config`, checked by building its azure_identity credential once (no network I/O; workload
    /// identity reads its token file). Fails on an empty scope or on settings the credential refuses, such as an
    /// invalid tenant id or an `http://` authority host.
    pub fn new(
        config: CredentialConfig,
        options: ProviderOptions,
    ) -> Result<Arc<Self>, IdentityError> {
        Self::with_clock(config, options, Arc::new(SystemClock))
    }

    /// Like [`new`](Self::new), with the clock refresh decisions are made against (tests use a [`ManualClock`]).
    /// Token expiry is absolute (unix time from the identity endpoint), so only the wall clock is read.
    pub fn with_clock(
        config: CredentialConfig,
        options: ProviderOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, IdentityError> {
        let kind = config.kind();
        let fetcher = credential::AzureFetcher::new(config, options.scope, options.transport)?;
        let inner = provider::Inner::new(kind, Box::new(fetcher), clock, provider::FETCH_TIMEOUT);
        Ok(Arc::new(TokenProvider { inner }))
    }

    /// A valid bearer token (without the `Bearer ` prefix), from the cache or fetched.
    pub async fn token(&self) -> Result<Secret, IdentityError> {
        self.inner.token().await
    }

    /// The credential type, as [`CredentialConfig::kind`].
    pub fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// How many fetches from the identity endpoint (or `az`) were started, successful or not. For tests and
    /// metrics; retries inside one fetch are not counted.
    pub fn fetch_count(&self) -> u64 {
        self.inner.fetch_count()
    }
}
