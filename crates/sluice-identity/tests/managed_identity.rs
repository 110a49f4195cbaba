//! ManagedIdentity through the App Service protocol (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`) against a fake
//! identity endpoint on plain http://127.0.0.1.
//!
//! The credential reads those environment variables, which are process-wide, so this binary holds exactly one test
//! and changes the environment only while no runtime (and so no other thread) is running.

mod common;

use common::{FakeServer, JWT_LIKE, Recorded, Reply, handler, manual_clock, unix_now};
use serde_json::json;
use sluice_identity::{CredentialConfig, ProviderOptions, TokenProvider};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

const HEADER_SECRET: &str = "fake-identity-header-s3cr3t";
const SHORT: &str = "https://short.example";
const HOURLY: &str = "https://hourly.example";
const GATED: &str = "https://gated.example";
const FAILING: &str = "https://failing.example";
const CONCURRENT: &str = "https://concurrent.example";

/// Sets a variable while no other thread runs (see the module docs).
#[allow(unsafe_code)]
fn set_env(name: &str, value: &str) {
    // SAFETY: this binary's only test calls this before creating a runtime or after dropping it, so no other thread
    // reads or writes the environment at the same time.
    unsafe { std::env::set_var(name, value) }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn options(resource: &str) -> ProviderOptions {
    ProviderOptions {
        scope: format!("{resource}/.default"),
        transport: None,
    }
}

fn for_resource(resource: &'static str) -> impl Fn(&Recorded) -> bool {
    move |r| r.query("resource") == Some(resource)
}

/// The fake App Service identity endpoint: tokens `mi-<n>-<identity>`; 2-minute tokens for [`SHORT`] and [`GATED`],
/// 1-hour tokens otherwise; a 500 for [`FAILING`]; requests for [`GATED`] after its first wait for `gate`.
fn identity_endpoint(gate: Arc<Semaphore>) -> common::Handler {
    let issued = Arc::new(AtomicU64::new(0));
    let gated_seen = Arc::new(AtomicU64::new(0));
    handler(move |request: Recorded| {
        let issued = issued.clone();
        let gated_seen = gated_seen.clone();
        let gate = gate.clone();
        async move {
            if request.path != "/msi/token" || request.method != "GET" {
                return Reply::json(404, json!({"error": "not found"}));
            }
            if request.header("x-identity-header") != Some(HEADER_SECRET) {
                return Reply::json(401, json!({"error": "bad x-identity-header"}));
            }
            let resource = request.query("resource").unwrap_or_default().to_string();
            if resource == FAILING {
                // An unhelpful endpoint that echoes secrets: none of this may reach an error message.
                return Reply {
                    status: 500,
                    body: format!(
                        "internal failure; header={HEADER_SECRET}; last token={JWT_LIKE}"
                    ),
                };
            }
            if resource == GATED && gated_seen.fetch_add(1, Ordering::SeqCst) > 0 {
                gate.acquire().await.expect("gate").forget();
            }
            let lifetime = if resource == SHORT || resource == GATED {
                120
            } else {
                3600
            };
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            let identity = request.query("client_id").unwrap_or("system").to_string();
            Reply::json(
                200,
                json!({
                    "access_token": format!("mi-{n}-{identity}"),
                    "expires_on": (unix_now() + lifetime).to_string(),
                    "resource": resource,
                    "token_type": "Bearer",
                }),
            )
        }
    })
}

#[test]
fn managed_identity_against_a_fake_app_service_endpoint() {
    let listener = FakeServer::bind();
    let port = listener.local_addr().unwrap().port();
    set_env(
        "IDENTITY_ENDPOINT",
        &format!("http://127.0.0.1:{port}/msi/token"),
    );
    set_env("IDENTITY_HEADER", HEADER_SECRET);

    runtime().block_on(async move {
        let gate = Arc::new(Semaphore::new(0));
        let fake = FakeServer::serve(listener, identity_endpoint(gate.clone()));
        system_assigned_token_is_fetched_once_and_cached(&fake).await;
        user_assigned_identity_sends_its_client_id(&fake).await;
        a_refresh_reaches_the_endpoint_despite_azure_identitys_own_cache(&fake).await;
        a_token_near_expiry_is_refreshed_while_callers_keep_the_old_one(&fake, &gate).await;
        fifty_concurrent_callers_with_an_empty_cache_cause_one_fetch(&fake).await;
        an_endpoint_failure_is_an_error_naming_the_credential_without_secrets(&fake).await;
    });

    // Nothing listens on this port any more: the endpoint is down.
    let closed_port = FakeServer::bind().local_addr().unwrap().port();
    set_env(
        "IDENTITY_ENDPOINT",
        &format!("http://127.0.0.1:{closed_port}/msi/token"),
    );
    runtime().block_on(an_unreachable_endpoint_is_an_error());
}

async fn system_assigned_token_is_fetched_once_and_cached(fake: &FakeServer) {
    let provider = TokenProvider::new(
        CredentialConfig::ManagedIdentity { client_id: None },
        ProviderOptions::default(),
    )
    .expect("provider");
    assert_eq!(provider.kind(), "managed_identity");
    assert_eq!(provider.fetch_count(), 0, "new() does no I/O");
    let first = provider.token().await.expect("token").expose().to_owned();
    assert!(
        first.starts_with("mi-") && first.ends_with("-system"),
        "{first}"
    );
    let second = provider.token().await.expect("token").expose().to_owned();
    assert_eq!(first, second);
    assert_eq!(provider.fetch_count(), 1);

    let seen: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(for_resource("https://cognitiveservices.azure.com"))
        .collect();
    assert_eq!(seen.len(), 1, "one request for two calls");
    let request = &seen[0];
    assert_eq!(request.query("api-version"), Some("2019-08-01"));
    assert_eq!(request.query("client_id"), None);
    assert_eq!(request.header("metadata"), Some("true"));
}

async fn user_assigned_identity_sends_its_client_id(fake: &FakeServer) {
    let config = CredentialConfig::ManagedIdentity {
        client_id: Some("uai-client-1".into()),
    };
    let provider = TokenProvider::new(config, options(HOURLY)).expect("provider");
    let token = provider.token().await.expect("token").expose().to_owned();
    assert!(token.ends_with("-uai-client-1"), "{token}");
    let seen: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(for_resource(HOURLY))
        .collect();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].query("client_id"), Some("uai-client-1"));
}

/// azure_identity would keep returning its cached 1-hour token until its last 5 minutes; Sluice's refresh at 54
/// minutes must still reach the endpoint.
async fn a_refresh_reaches_the_endpoint_despite_azure_identitys_own_cache(fake: &FakeServer) {
    let clock = manual_clock();
    let config = CredentialConfig::ManagedIdentity {
        client_id: Some("refresh-test".into()),
    };
    let provider =
        TokenProvider::with_clock(config, options(HOURLY), clock.clone()).expect("provider");
    let before = fake.count(for_resource(HOURLY));
    let old = provider.token().await.expect("token").expose().to_owned();
    clock.advance(Duration::from_secs(55 * 60));
    // The refresh runs in the background; past the old token's last usable moment the caller waits for it.
    assert_eq!(provider.token().await.expect("token").expose(), old);
    assert_eq!(provider.fetch_count(), 2);
    clock.advance(Duration::from_secs(4 * 60 + 40));
    let new = provider.token().await.expect("token").expose().to_owned();
    assert_ne!(new, old);
    assert_eq!(fake.count(for_resource(HOURLY)) - before, 2);
    assert_eq!(provider.fetch_count(), 2);
}

async fn a_token_near_expiry_is_refreshed_while_callers_keep_the_old_one(
    fake: &FakeServer,
    gate: &Semaphore,
) {
    let clock = manual_clock();
    let config = CredentialConfig::ManagedIdentity { client_id: None };
    let provider =
        TokenProvider::with_clock(config, options(GATED), clock.clone()).expect("provider");
    // The endpoint issues 2-minute tokens: refreshed after 1 minute, not handed out in their last 30 seconds.
    let old = provider.token().await.expect("token").expose().to_owned();
    assert_eq!(
        provider.token().await.expect("token").expose(),
        old,
        "not refreshed right away"
    );
    assert_eq!(provider.fetch_count(), 1);

    clock.advance(Duration::from_secs(61));
    // This call starts the refresh, which the fake holds; everyone keeps getting the still-valid token.
    let mut calls = Vec::new();
    for _ in 0..20 {
        let provider = provider.clone();
        calls.push(tokio::spawn(async move { provider.token().await }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().expect("token").expose(), old);
    }
    assert_eq!(provider.fetch_count(), 2, "one refresh in flight");

    gate.add_permits(1);
    // Past the old token's usable time the caller joins the refresh in flight instead of starting another.
    clock.advance(Duration::from_secs(30));
    let new = provider.token().await.expect("token").expose().to_owned();
    assert_ne!(new, old);
    assert_eq!(provider.fetch_count(), 2);
    assert_eq!(fake.count(for_resource(GATED)), 2);
}

async fn fifty_concurrent_callers_with_an_empty_cache_cause_one_fetch(fake: &FakeServer) {
    let provider = TokenProvider::new(
        CredentialConfig::ManagedIdentity { client_id: None },
        options(CONCURRENT),
    )
    .expect("provider");
    let mut calls = Vec::new();
    for _ in 0..50 {
        let provider = provider.clone();
        calls.push(tokio::spawn(async move { provider.token().await }));
    }
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().expect("token").expose().to_owned());
    }
    assert!(tokens.iter().all(|t| *t == tokens[0]));
    assert_eq!(provider.fetch_count(), 1);
    assert_eq!(fake.count(for_resource(CONCURRENT)), 1);
}

async fn an_endpoint_failure_is_an_error_naming_the_credential_without_secrets(fake: &FakeServer) {
    let provider = TokenProvider::new(
        CredentialConfig::ManagedIdentity { client_id: None },
        options(FAILING),
    )
    .expect("provider");
    let error = provider.token().await.expect_err("the endpoint fails");
    assert_eq!(error.kind, "managed_identity");
    let text = error.to_string();
    assert!(
        text.starts_with("could not obtain an Entra ID token with managed_identity: "),
        "{text}"
    );
    assert!(
        text.contains("internal failure"),
        "the endpoint's reason is kept: {text}"
    );
    assert!(
        !text.contains(HEADER_SECRET),
        "the identity header leaked: {text}"
    );
    assert!(!text.contains(JWT_LIKE), "a token leaked: {text}");
    assert!(fake.count(for_resource(FAILING)) >= 1);
    // The next call tries again rather than caching the failure.
    provider.token().await.expect_err("still failing");
    assert_eq!(provider.fetch_count(), 2);
}

async fn an_unreachable_endpoint_is_an_error() {
    let provider = TokenProvider::new(
        CredentialConfig::ManagedIdentity { client_id: None },
        ProviderOptions::default(),
    )
    .expect("provider");
    let error = provider.token().await.expect_err("nothing listens");
    assert_eq!(error.kind, "managed_identity");
    assert!(error.to_string().contains("managed_identity"));
    assert!(!error.to_string().contains(HEADER_SECRET));
}
