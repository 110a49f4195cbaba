//! ClientSecret against a fake Entra token endpoint on 127.0.0.1, reached through an injected transport (the
//! credential only accepts https authority hosts, so the transport rewrites the URL).

mod common;

use common::{FakeServer, JWT_LIKE, Recorded, RedirectToLocal, Reply, handler, manual_clock};
use serde_json::json;
use sluice_identity::{CredentialConfig, ProviderOptions, TokenProvider};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const TENANT: &str = "00000000-0000-0000-0000-0000000000aa";
const CLIENT_ID: &str = "sluice-backend-app";
const SECRET: &str = "client-secret-value~with.special&chars=";

/// Entra v2 token endpoint: checks the client credentials grant and answers with `sp-token-<n>` for an hour.
/// A wrong secret gets Entra's error, which (like some real endpoints) echoes what it received.
fn token_endpoint() -> common::Handler {
    let issued = Arc::new(AtomicU64::new(0));
    handler(move |request: Recorded| {
        let issued = issued.clone();
        async move {
            if request.method != "POST" || !request.path.ends_with("/oauth2/v2.0/token") {
                return Reply::json(404, json!({"error": "not_found"}));
            }
            if request.form_value("client_secret").as_deref() != Some(SECRET) {
                let received = request.form_value("client_secret").unwrap_or_default();
                return Reply::json(
                    401,
                    json!({
                        "error": "invalid_client",
                        "error_description": format!("AADSTS7000215: Invalid client secret provided ({received}; {JWT_LIKE})."),
                        "error_codes": [7000215],
                    }),
                );
            }
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            Reply::json(
                200,
                json!({"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600, "access_token": format!("sp-token-{n}")}),
            )
        }
    })
}

fn config(secret: &str, authority_host: Option<&str>) -> CredentialConfig {
    CredentialConfig::ClientSecret {
        tenant_id: TENANT.into(),
        client_id: CLIENT_ID.into(),
        secret: secret.into(),
        authority_host: authority_host.map(str::to_string),
    }
}

#[tokio::test]
async fn client_credentials_grant_gets_a_token_and_caches_it() {
    let fake = FakeServer::start(token_endpoint());
    let redirect = RedirectToLocal::new(fake.port);
    let options = ProviderOptions {
        transport: Some(redirect.transport()),
        ..ProviderOptions::default()
    };
    let provider = TokenProvider::new(config(SECRET, None), options).expect("provider");
    assert_eq!(provider.kind(), "client_secret");
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "sp-token-1"
    );
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "sp-token-1"
    );
    assert_eq!(provider.fetch_count(), 1);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(
        request.form_value("grant_type").as_deref(),
        Some("client_credentials")
    );
    assert_eq!(request.form_value("client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        request.form_value("scope").as_deref(),
        Some("https://cognitiveservices.azure.com/.default")
    );
    // Compared, never printed.
    assert!(
        request.form_value("client_secret").as_deref() == Some(SECRET),
        "the client secret was not sent"
    );
    assert_eq!(
        redirect.hosts(),
        vec!["https://login.microsoftonline.com".to_string()]
    );
}

#[tokio::test]
async fn a_custom_authority_host_and_scope_are_used() {
    let fake = FakeServer::start(token_endpoint());
    let redirect = RedirectToLocal::new(fake.port);
    let options = ProviderOptions {
        scope: "api://my-backend/.default".into(),
        transport: Some(redirect.transport()),
    };
    let provider = TokenProvider::new(
        config(SECRET, Some("https://login.microsoftonline.us")),
        options,
    )
    .expect("provider");
    provider.token().await.expect("token");
    assert_eq!(
        redirect.hosts(),
        vec!["https://login.microsoftonline.us".to_string()]
    );
    assert_eq!(
        fake.requests()[0].form_value("scope").as_deref(),
        Some("api://my-backend/.default")
    );
}

#[tokio::test]
async fn an_early_refresh_reaches_the_token_endpoint() {
    let fake = FakeServer::start(token_endpoint());
    let redirect = RedirectToLocal::new(fake.port);
    let clock = manual_clock();
    let options = ProviderOptions {
        transport: Some(redirect.transport()),
        ..ProviderOptions::default()
    };
    let provider =
        TokenProvider::with_clock(config(SECRET, None), options, clock.clone()).expect("provider");
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "sp-token-1"
    );
    // 54 minutes into a 1-hour token Sluice refreshes, while azure_identity's own cache would still answer.
    clock.advance(Duration::from_secs(54 * 60));
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "sp-token-1"
    );
    clock.advance(Duration::from_secs(5 * 60 + 40));
    assert_eq!(
        provider.token().await.expect("token").expose(),
        "sp-token-2"
    );
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(provider.fetch_count(), 2);
}

#[tokio::test]
async fn a_rejected_secret_is_an_error_that_does_not_contain_it() {
    let fake = FakeServer::start(token_endpoint());
    let redirect = RedirectToLocal::new(fake.port);
    let options = ProviderOptions {
        transport: Some(redirect.transport()),
        ..ProviderOptions::default()
    };
    let wrong = "wrong-secret-0123456789";
    let provider = TokenProvider::new(config(wrong, None), options).expect("provider");
    let error = provider.token().await.expect_err("rejected");
    assert_eq!(error.kind, "client_secret");
    let text = error.to_string();
    assert!(
        text.starts_with("could not obtain an Entra ID token with client_secret: "),
        "{text}"
    );
    assert!(
        text.contains("AADSTS7000215"),
        "Entra's reason is kept: {text}"
    );
    assert!(!text.contains(wrong), "the secret leaked into the error");
    assert!(!text.contains(JWT_LIKE), "a token leaked into the error");
    assert!(
        !format!("{provider:?}").contains(wrong),
        "the secret leaked into Debug"
    );
}
