//! What the gateway configures: which credential a backend uses, and the scope and transport of its tokens.

use sluice_base::Secret;
use std::path::PathBuf;

/// The scope Sluice asks for when none is configured: Azure OpenAI / Azure AI services.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// Which Entra ID credential a backend's tokens come from.
///
/// `Debug` never prints the client secret (it is a [`Secret`]).
#[derive(Debug, Clone)]
pub enum CredentialConfig {
    /// A managed identity: the App Service / Container Apps endpoint when `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`
    /// are set, otherwise the VM / AKS instance metadata service (IMDS). `client_id: None` is the system-assigned
    /// identity; `Some(id)` selects a user-assigned identity by its client id.
    ManagedIdentity {
        /// The client id of a user-assigned identity, or `None` for the system-assigned one.
        client_id: Option<String>,
    },
    /// AKS workload identity: a Kubernetes service-account token exchanged for an Entra ID token.
    /// Each `None` falls back to `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and `AZURE_FEDERATED_TOKEN_FILE`.
    WorkloadIdentity {
        /// The client id of the Entra application or user-assigned identity.
        client_id: Option<String>,
        /// The tenant id.
        tenant_id: Option<String>,
        /// The projected service-account token file.
        token_file: Option<PathBuf>,
    },
    /// A service principal with a client secret.
    ClientSecret {
        /// The tenant id.
        tenant_id: String,
        /// The application (client) id.
        client_id: String,
        /// The resolved secret value. Never logged or printed.
        secret: Secret,
        /// An https authority host other than `https://login.microsoftonline.com` (sovereign clouds).
        authority_host: Option<String>,
    },
    /// The signed-in Azure CLI (`az account get-access-token`), for development.
    AzureCli,
}

impl CredentialConfig {
    /// A short name for logs, metrics and error messages:
    /// `managed_identity`, `workload_identity`, `client_secret` or `azure_cli`.
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialConfig::ManagedIdentity { .. } => "managed_identity",
            CredentialConfig::WorkloadIdentity { .. } => "workload_identity",
            CredentialConfig::ClientSecret { .. } => "client_secret",
            CredentialConfig::AzureCli => "azure_cli",
        }
    }
}

/// How a [`TokenProvider`](crate::TokenProvider) asks for tokens.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// The scope of the tokens, e.g. [`DEFAULT_SCOPE`]. Managed identity turns it into a resource by dropping a
    /// trailing `/.default`.
    pub scope: String,
    /// The HTTP transport of the credentials that make HTTP calls (managed identity, workload identity, client
    /// secret); `None` is azure_core's default reqwest client, created once per provider. Tests inject a client
    /// that redirects requests to a fake on 127.0.0.1. Ignored by `AzureCli`.
    pub transport: Option<azure_core::http::Transport>,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        ProviderOptions {
            scope: DEFAULT_SCOPE.to_string(),
            transport: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_secret() {
        let config = CredentialConfig::ClientSecret {
            tenant_id: "tenant-1".into(),
            client_id: "app-1".into(),
            secret: "very-secret-value".into(),
            authority_host: None,
        };
        let printed = format!("{config:?} {config:#?}");
        assert!(!printed.contains("very-secret-value"), "{printed}");
        assert!(
            printed.contains("tenant-1")
                && printed.contains("app-1")
                && printed.contains("<redacted>")
        );
    }

    #[test]
    fn kinds() {
        assert_eq!(
            CredentialConfig::ManagedIdentity { client_id: None }.kind(),
            "managed_identity"
        );
        let wi = CredentialConfig::WorkloadIdentity {
            client_id: None,
            tenant_id: None,
            token_file: None,
        };
        assert_eq!(wi.kind(), "workload_identity");
        assert_eq!(CredentialConfig::AzureCli.kind(), "azure_cli");
        assert_eq!(format!("{:?}", CredentialConfig::AzureCli), "AzureCli");
    }

    #[test]
    fn default_options_use_the_cognitive_services_scope() {
        let options = ProviderOptions::default();
        assert_eq!(
            options.scope,
            "https://cognitiveservices.azure.com/.default"
        );
        assert!(options.transport.is_none());
    }
}
