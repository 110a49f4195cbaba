//! WorkloadIdentity (AKS federated token file) against a fake Entra token endpoint on 127.0.0.1, reached through an
//! injected transport. Settings are passed explicitly, so no environment variable is needed.

mod common;

use common::{FakeServer, Recorded, RedirectToLocal, Reply, handler, manual_clock};
use serde_json::json;
use sluice_identity::{CredentialConfig, ProviderOptions, TokenProvider};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const TENANT: &str = "tenant-for-workload";
const CLIENT_ID: &str = "workload-client";

fn token_endpoint() -> common::Handler {
    let issued = Arc::new(AtomicU64::new(0));
    handler(move |request: Recorded| {
        let issued = issued.clone();
        async move {
            if request.form_value("client_assertion").is_none() {
                return Reply::json(
                    400,
                    json!({"error": "invalid_request", "error_description": "no assertion"}),
                );
            }
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            Reply::json(
                200,
                json!({"token_type": "Bearer", "expires_in": 3600, "access_token": format!("wi-token-{n}")}),
            )
        }
    })
}

#[tokio::test]
async fn the_federated_token_is_exchanged_and_reread_on_refresh() {
    let fake = FakeServer::start(token_endpoint());
    let redirect = RedirectToLocal::new(fake.port);
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, "service-account-token-1").expect("write token file");
    let config = CredentialConfig::WorkloadIdentity {
        client_id: Some(CLIENT_ID.into()),
        tenant_id: Some(TENANT.into()),
        token_file: Some(token_file.clone()),
    };
    let clock = manual_clock();
    let options = ProviderOptions {
        transport: Some(redirect.transport()),
        ..ProviderOptions::default()
    };
    let provider = TokenProvider::with_clock(config, options, clock.clone()).expect("provider");
    assert_eq!(provider.kind(), "workload_identity");
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "wi-token-1"
    );
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "wi-token-1"
    );

    let first = &fake.requests()[0];
    assert_eq!(first.path, format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(first.form_value("client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        first.form_value("grant_type").as_deref(),
        Some("client_credentials")
    );
    assert_eq!(
        first.form_value("scope").as_deref(),
        Some("https://cognitiveservices.azure.com/.default")
    );
    assert_eq!(
        first.form_value("client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(
        first.form_value("client_assertion").as_deref(),
        Some("service-account-token-1")
    );

    // Kubernetes rotates the projected token; the refresh sends the new one.
    std::fs::write(&token_file, "service-account-token-2").expect("rotate token file");
    clock.advance(Duration::from_secs(54 * 60));
    provider.token().await.expect("token");
    clock.advance(Duration::from_secs(5 * 60 + 40));
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "wi-token-2"
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].form_value("client_assertion").as_deref(),
        Some("service-account-token-2")
    );
}

#[tokio::test]
async fn a_rejected_assertion_is_an_error_naming_workload_identity() {
    let fake = FakeServer::start(handler(|_request: Recorded| async {
        Reply::json(
            400,
            json!({"error": "invalid_client", "error_description": "AADSTS70021: No matching federated identity record found.", "error_codes": [70021]}),
        )
    }));
    let redirect = RedirectToLocal::new(fake.port);
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln")
        .expect("write token file");
    let config = CredentialConfig::WorkloadIdentity {
        client_id: Some(CLIENT_ID.into()),
        tenant_id: Some(TENANT.into()),
        token_file: Some(token_file),
    };
    let options = ProviderOptions {
        transport: Some(redirect.transport()),
        ..ProviderOptions::default()
    };
    let provider = TokenProvider::new(config, options).expect("provider");
    let error = provider.token().await.expect_err("rejected");
    assert_eq!(error.kind, "workload_identity");
    assert!(error.message.contains("AADSTS70021"), "{error}");
    assert!(!error.message.contains("eyJhbGciOiJSUzI1NiJ9"), "{error}");
}
