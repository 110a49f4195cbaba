//! ManagedIdentity through the VM / AKS instance metadata service (no IDENTITY_ENDPOINT in the environment): its
//! address 169.254.169.254 is fixed, so an injected transport redirects it to a fake on 127.0.0.1.

mod common;

use common::{FakeServer, Recorded, RedirectToLocal, Reply, handler, unix_now};
use serde_json::json;
use sluice_identity::{CredentialConfig, ProviderOptions, TokenProvider};

#[tokio::test]
async fn user_assigned_identity_through_imds() {
    assert!(
        std::env::var_os("IDENTITY_ENDPOINT").is_none()
            && std::env::var_os("MSI_ENDPOINT").is_none(),
        "this test needs an environment without IDENTITY_ENDPOINT / MSI_ENDPOINT"
    );
    let fake = FakeServer::start(handler(|request: Recorded| async move {
        Reply::json(
            200,
            json!({
                "access_token": format!("imds-token-{}", request.query("client_id").unwrap_or("system")),
                "expires_on": (unix_now() + 86_400).to_string(),
                "resource": request.query("resource").unwrap_or_default(),
                "token_type": "Bearer",
            }),
        )
    }));
    let redirect = RedirectToLocal::new(fake.port);
    let options = ProviderOptions {
        transport: Some(redirect.transport()),
        ..ProviderOptions::default()
    };
    let config = CredentialConfig::ManagedIdentity {
        client_id: Some("aks-kubelet-identity".into()),
    };
    let provider = TokenProvider::new(config, options).expect("provider");
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "imds-token-aks-kubelet-identity"
    );
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "imds-token-aks-kubelet-identity"
    );
    assert_eq!(provider.fetch_count(), 1);

    assert_eq!(redirect.hosts(), vec!["http://169.254.169.254".to_string()]);
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/metadata/identity/oauth2/token");
    assert_eq!(
        requests[0].query("resource"),
        Some("https://cognitiveservices.azure.com")
    );
    assert_eq!(requests[0].query("client_id"), Some("aks-kubelet-identity"));
    assert_eq!(requests[0].header("metadata"), Some("true"));
}
