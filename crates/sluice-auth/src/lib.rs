//! Entra ID JWT validation for Sluice: the gateway's counterpart of APIM's
//! `validate-azure-ad-token` and `validate-jwt` policies.
//!
//! A [`JwtValidator`] checks the bearer token a caller sends in `Authorization`:
//!
//! - the signature (RS256; RS384, RS512 or PS256 only when the key's JWK names that algorithm; never `none` or HMAC)
//!   against the tenant's signing keys, loaded from an OpenID configuration document (its `jwks_uri`) or a JWKS URL;
//! - `exp` and `nbf`, with a configurable clock skew;
//! - the issuer and the audience, each against a list;
//! - optionally the client application (`appid` in v1 tokens, `azp` in v2 tokens) and required `roles`.
//!
//! Keys are fetched lazily (or at startup with [`JwtValidator::prefetch`]) and cached. A token whose `kid` is not
//! cached triggers a refetch, at most one per [`JwtSettings::refetch_min_interval`], and concurrent misses share
//! one fetch. Keys older than a day are refreshed in the background while the cached ones keep being used.
//!
//! Each failure is a [`JwtError`] whose text is the message for APIM's 401 body; no error text, log line or
//! `Debug` output ever contains the token.

mod accepted;
mod caller;
mod error;
mod fetch;
mod keys;
mod token;
mod validator;

pub use caller::Caller;
pub use error::JwtError;
pub use fetch::{Fetch, HttpFetch};
pub use sluice_base::{Clock, ManualClock, SystemClock};
pub use validator::JwtValidator;

use std::time::Duration;

/// What a [`JwtValidator`] accepts: where the signing keys come from and which claims a token must carry.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Where the signing keys are published.
    pub keys_source: KeysSource,
    /// Accepted `iss` values, compared exactly (e.g. `https://login.microsoftonline.com/{tenant}/v2.0` and the v1
    /// form `https://sts.windows.net/{tenant}/`). Empty means the issuer is not checked: configuration should
    /// always give at least one.
    pub issuers: Vec<String>,
    /// Accepted audiences, compared exactly; the token's `aud` (a string or an array) must contain one of them.
    /// Empty means the audience is not checked: configuration should always give at least one.
    pub audiences: Vec<String>,
    /// Allowed client applications: the token's `appid` (v1) or, without it, `azp` (v2) must be one of these,
    /// compared ignoring ASCII case (they are GUIDs). Empty means any application.
    pub client_application_ids: Vec<String>,
    /// Roles the token's `roles` claim must all contain, compared exactly. Empty means none.
    pub required_roles: Vec<String>,
    /// Tolerance for `exp` and `nbf` against this host's clock.
    pub clock_skew: Duration,
    /// Least time between two fetches of the keys (an unknown `kid` only triggers a refetch after this much time
    /// since the last attempt). The usual value is [`JwtSettings::DEFAULT_REFETCH_MIN_INTERVAL`].
    pub refetch_min_interval: Duration,
}

impl JwtSettings {
    /// The usual least time between two key fetches: 30 seconds.
    pub const DEFAULT_REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(30);
    /// The usual clock skew: 5 minutes, as Entra ID's own libraries allow.
    pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);
}

/// Where a [`JwtValidator`] loads the signing keys from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeysSource {
    /// An OpenID Connect discovery document (e.g.
    /// `https://login.microsoftonline.com/{tenant}/v2.0/.well-known/openid-configuration`); its `jwks_uri` is
    /// fetched next, on every refresh.
    OpenIdConfiguration(String),
    /// A JSON Web Key Set URL (e.g. `https://login.microsoftonline.com/{tenant}/discovery/v2.0/keys`).
    Jwks(String),
}
