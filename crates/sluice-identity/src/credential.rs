//! Building azure_identity credentials from a [`CredentialConfig`] and fetching one token with them.
//!
//! azure_identity 1.0's HTTP credentials (managed identity, client secret, workload identity) keep their own token
//! cache and only go back to the identity endpoint when the cached token has 5 minutes or less left
//! (`azure_identity::cache::should_refresh`, a fixed window that `TokenRequestOptions` cannot change). Sluice
//! refreshes earlier than that, so every fetch builds a new credential, whose cache is empty: a fetch always reaches
//! the identity endpoint. Building a credential does no network I/O; the HTTP transport is shared across fetches, so
//! connections are still pooled.

use crate::config::CredentialConfig;
use crate::error::{IdentityError, describe};
use crate::provider::{Fetched, Fetcher};
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret as AzureSecret, TokenCredential};
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_core::time::Duration;
use azure_identity::{
    AzureCliCredential, ClientAssertionCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use sluice_base::Secret;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The App Service identity endpoint's shared secret, sent as `x-identity-header`; scrubbed from error messages.
const IDENTITY_HEADER_ENV: &str = "IDENTITY_HEADER";

/// Fetches tokens with azure_identity.
pub(crate) struct AzureFetcher {
    config: CredentialConfig,
    scope: String,
    /// Present for every credential except the Azure CLI.
    transport: Option<Transport>,
}

impl fmt::Debug for AzureFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureFetcher")
            .field("config", &self.config)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl AzureFetcher {
    /// Checks the configuration by building a credential once (no network I/O; workload identity reads its token
    /// file).
    pub(crate) fn new(
        config: CredentialConfig,
        scope: String,
        transport: Option<Transport>,
    ) -> Result<Self, IdentityError> {
        let kind = config.kind();
        if scope.trim().is_empty() {
            return Err(IdentityError::new(kind, "the token scope is empty", &[]));
        }
        let transport = match (&config, transport) {
            (CredentialConfig::AzureCli, _) => None,
            (_, Some(transport)) => Some(transport),
            (_, None) => Some(default_transport().map_err(|e| IdentityError::new(kind, e, &[]))?),
        };
        let fetcher = AzureFetcher {
            config,
            scope,
            transport,
        };
        fetcher.build()?;
        Ok(fetcher)
    }

    /// Values that must never appear in an error message.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let CredentialConfig::ClientSecret { secret, .. } = &self.config {
            secrets.push(secret.expose().to_string());
        }
        if let Ok(header) = std::env::var(IDENTITY_HEADER_ENV) {
            secrets.push(header);
        }
        secrets
    }

    fn error(&self, message: impl AsRef<str>) -> IdentityError {
        IdentityError::new(self.config.kind(), message, &self.secrets())
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            transport: self.transport.clone(),
            // azure_core's default retries up to 8 times over a minute; a request may be waiting on this fetch, so
            // retry transient failures briefly instead. (The IMDS credential replaces this with its own policy.)
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: Duration::milliseconds(200),
                max_retries: 2,
                max_total_elapsed: Duration::seconds(5),
                max_delay: Duration::seconds(2),
            }),
            ..ClientOptions::default()
        }
    }

    /// A new credential with an empty token cache.
    fn build(&self) -> Result<Arc<dyn TokenCredential>, IdentityError> {
        let built: azure_core::Result<Arc<dyn TokenCredential>> = match &self.config {
            CredentialConfig::ManagedIdentity { client_id } => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: self.client_options(),
                };
                ManagedIdentityCredential::new(Some(options)).map(|c| c as Arc<dyn TokenCredential>)
            }
            CredentialConfig::WorkloadIdentity {
                client_id,
                tenant_id,
                token_file,
            } => {
                let options = WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions {
                        client_options: self.client_options(),
                    },
                    client_id: client_id.clone(),
                    tenant_id: tenant_id.clone(),
                    token_file_path: token_file.clone(),
                };
                WorkloadIdentityCredential::new(Some(options))
                    .map(|c| c as Arc<dyn TokenCredential>)
            }
            CredentialConfig::ClientSecret {
                tenant_id,
                client_id,
                secret,
                authority_host,
            } => {
                let mut client_options = self.client_options();
                if let Some(host) = authority_host {
                    let mut cloud = CustomConfiguration::default();
                    cloud.authority_host = host.clone();
                    client_options.cloud = Some(Arc::new(CloudConfiguration::Custom(cloud)));
                }
                ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    AzureSecret::new(secret.expose().to_string()),
                    Some(ClientSecretCredentialOptions { client_options }),
                )
                .map(|c| c as Arc<dyn TokenCredential>)
            }
            CredentialConfig::AzureCli => {
                AzureCliCredential::new(None).map(|c| c as Arc<dyn TokenCredential>)
            }
        };
        built.map_err(|e| self.error(describe(&e)))
    }
}

#[async_trait::async_trait]
impl Fetcher for AzureFetcher {
    async fn fetch(&self) -> Result<Fetched, IdentityError> {
        let credential = self.build()?;
        let token = credential
            .get_token(&[self.scope.as_str()], None)
            .await
            .map_err(|e| self.error(describe(&e)))?;
        let secret = token.token.secret();
        if secret.is_empty() {
            return Err(self.error("the identity endpoint returned an empty access token"));
        }
        Ok(Fetched {
            token: Secret::new(secret),
            expires_at: to_system_time(token.expires_on.unix_timestamp()),
        })
    }
}

/// An HTTP client like azure_core's default (same timeouts, no redirects), built without panicking.
fn default_transport() -> Result<Transport, String> {
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .read_timeout(std::time::Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            let mut text = format!("could not build the HTTP client: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                text.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            text
        })?;
    Ok(Transport::new(Arc::new(client)))
}

/// Unix seconds to a `SystemTime`; times before 1970 become the epoch (such a token is expired anyway).
fn to_system_time(unix_seconds: i64) -> SystemTime {
    u64::try_from(unix_seconds)
        .ok()
        .and_then(|secs| UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs)))
        .unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_convert() {
        assert_eq!(to_system_time(-5), UNIX_EPOCH);
        assert_eq!(
            to_system_time(10),
            UNIX_EPOCH + std::time::Duration::from_secs(10)
        );
    }

    #[test]
    fn empty_scope_is_rejected() {
        let err = AzureFetcher::new(CredentialConfig::AzureCli, "  ".into(), None).unwrap_err();
        assert_eq!(err.kind, "azure_cli");
        assert!(err.message.contains("scope"), "{err}");
    }

    #[test]
    fn invalid_client_secret_settings_fail_at_construction_without_the_secret() {
        let config = CredentialConfig::ClientSecret {
            tenant_id: "not a tenant!".into(),
            client_id: "app".into(),
            secret: "hunter2-secret".into(),
            authority_host: None,
        };
        let err = AzureFetcher::new(config, crate::DEFAULT_SCOPE.into(), None).unwrap_err();
        assert_eq!(err.kind, "client_secret");
        assert!(err.message.contains("tenant"), "{err}");
        assert!(!err.to_string().contains("hunter2-secret"));

        let http_authority = CredentialConfig::ClientSecret {
            tenant_id: "tenant".into(),
            client_id: "app".into(),
            secret: "hunter2-secret".into(),
            authority_host: Some("http://127.0.0.1:1".into()),
        };
        let err = AzureFetcher::new(http_authority, crate::DEFAULT_SCOPE.into(), None).unwrap_err();
        assert!(err.message.contains("HTTPS"), "{err}");
    }

    #[test]
    fn workload_identity_without_a_token_file_fails_at_construction() {
        let config = CredentialConfig::WorkloadIdentity {
            client_id: Some("app".into()),
            tenant_id: Some("tenant".into()),
            token_file: Some("/nonexistent/sluice/token".into()),
        };
        let err = AzureFetcher::new(config, crate::DEFAULT_SCOPE.into(), None).unwrap_err();
        assert_eq!(err.kind, "workload_identity");
        assert!(err.message.contains("federated token"), "{err}");
    }
}
