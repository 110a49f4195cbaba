//! The validator end to end: a fake tenant on 127.0.0.1 serves the OpenID configuration and the key set; tokens
//! are signed with the test-only fixture keys; time is a fake clock.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use sluice_auth::{Fetch, HttpFetch, JwtError, JwtSettings, JwtValidator, KeysSource};

const INTERVAL: Duration = Duration::from_secs(30);
const SKEW: Duration = Duration::from_secs(300);

fn settings(source: KeysSource) -> JwtSettings {
    JwtSettings {
        keys_source: source,
        issuers: vec![issuer_v2(), issuer_v1()],
        audiences: vec![AUDIENCE.into(), AUDIENCE_GUID.into()],
        client_application_ids: vec![],
        required_roles: vec![],
        clock_skew: SKEW,
        refetch_min_interval: INTERVAL,
    }
}

fn http() -> Arc<dyn Fetch> {
    Arc::new(HttpFetch::new(Duration::from_secs(10)).expect("client"))
}

struct Env {
    idp: Arc<Idp>,
    clock: Arc<ManualClock>,
    v: Arc<JwtValidator>,
}

/// A tenant publishing `key-a`, and a validator reading its OpenID configuration.
async fn env() -> Env {
    env_with(|s| s).await
}

async fn env_with(tune: impl FnOnce(JwtSettings) -> JwtSettings) -> Env {
    let idp = Idp::start(vec![keys().a.jwk("key-a")]).await;
    let clock = fake_clock();
    let s = tune(settings(KeysSource::OpenIdConfiguration(idp.config_url())));
    let v = Arc::new(JwtValidator::with_clock(s, http(), clock.clone()));
    Env { idp, clock, v }
}

fn token_a(claims: &serde_json::Value) -> String {
    keys().a.sign(Algorithm::RS256, Some("key-a"), claims)
}

/// Validates a token that must be refused; checks that neither the error's text nor its Debug output contains
/// the token or any of its parts.
async fn refused(v: &JwtValidator, token: &str) -> JwtError {
    let err = v
        .validate(Some(&bearer(token)))
        .await
        .expect_err("the token must be refused");
    assert_no_token_in(&err, token);
    err
}

fn assert_no_token_in(err: &JwtError, token: &str) {
    let text = err.to_string();
    let debug = format!("{err:?}");
    for part in std::iter::once(token).chain(token.split('.')) {
        if part.len() >= 4 {
            assert!(!text.contains(part), "{text:?} contains part of the token");
            assert!(
                !debug.contains(part),
                "{debug:?} contains part of the token"
            );
        }
    }
}

#[tokio::test]
async fn v2_token_with_a_string_audience_is_accepted() {
    let e = env().await;
    let token = token_a(&v2_claims());
    let caller = e.v.validate(Some(&bearer(&token))).await.expect("valid");
    assert_eq!(caller.subject.as_deref(), Some("sub-123"));
    assert_eq!(caller.app_id.as_deref(), Some(APP));
    assert_eq!(caller.object_id.as_deref(), Some("oid-123"));
    assert_eq!(caller.tenant_id.as_deref(), Some(TENANT));
    assert_eq!(caller.identity(), Some(APP));
    assert_eq!(caller.claim_str("team").as_deref(), Some("blue"));
    assert_eq!(caller.claim_str("tier").as_deref(), Some("3"));
    assert_eq!(caller.claims.get("ver"), Some(&json!("2.0")));
    assert_eq!((e.idp.config_hits(), e.idp.jwks_hits()), (1, 1));

    // Cached: no more fetches, whatever the scheme's case.
    let again =
        e.v.validate(Some(&format!("bearer {token}")))
            .await
            .expect("valid");
    assert_eq!(again, caller);
    assert_eq!((e.idp.config_hits(), e.idp.jwks_hits()), (1, 1));
}

#[tokio::test]
async fn v1_token_with_an_audience_array_is_accepted() {
    let e = env().await;
    let caller =
        e.v.validate(Some(&bearer(&token_a(&v1_claims()))))
            .await
            .expect("valid");
    assert_eq!(caller.app_id.as_deref(), Some(APP));
    assert_eq!(caller.subject.as_deref(), Some("sub-456"));
    assert_eq!(caller.object_id.as_deref(), Some("oid-456"));
    assert_eq!(caller.tenant_id.as_deref(), Some(TENANT));

    // A v2 delegated token without appid/azp: the identity is the subject.
    let user = with(v2_claims(), json!({"azp": null}));
    let caller =
        e.v.validate(Some(&bearer(&token_a(&user))))
            .await
            .expect("valid");
    assert_eq!(caller.app_id, None);
    assert_eq!(caller.identity(), Some("sub-123"));
}

#[tokio::test]
async fn wrong_audience_and_wrong_issuer_are_refused() {
    let e = env().await;
    let cases = [
        (json!({"aud": "api://another-app"}), JwtError::WrongAudience),
        (json!({"aud": ["x", "y"]}), JwtError::WrongAudience),
        (json!({"aud": null}), JwtError::WrongAudience),
        (
            json!({"iss": "https://login.microsoftonline.com/another-tenant/v2.0"}),
            JwtError::WrongIssuer,
        ),
        (json!({"iss": null}), JwtError::WrongIssuer),
    ];
    for (change, expected) in cases {
        let token = token_a(&with(v2_claims(), change.clone()));
        assert_eq!(refused(&e.v, &token).await, expected, "{change}");
    }
}

#[tokio::test]
async fn expiry_and_not_before_honour_the_skew() {
    let e = env().await;
    let now = NOW as i64;
    let skew = SKEW.as_secs() as i64;

    let within = token_a(&with(v2_claims(), json!({"exp": now - skew + 10})));
    e.v.validate(Some(&bearer(&within)))
        .await
        .expect("expired within the skew");
    let beyond = token_a(&with(v2_claims(), json!({"exp": now - skew - 10})));
    assert_eq!(refused(&e.v, &beyond).await, JwtError::Expired);

    let soon = token_a(&with(v2_claims(), json!({"nbf": now + skew - 10})));
    e.v.validate(Some(&bearer(&soon)))
        .await
        .expect("not before, within the skew");
    let later = token_a(&with(v2_claims(), json!({"nbf": now + skew + 10})));
    assert_eq!(refused(&e.v, &later).await, JwtError::NotYetValid);

    // The same token expires as the clock moves.
    let token = token_a(&v2_claims());
    e.v.validate(Some(&bearer(&token)))
        .await
        .expect("valid now");
    e.clock
        .advance(Duration::from_secs(3600) + SKEW + Duration::from_secs(1));
    assert_eq!(refused(&e.v, &token).await, JwtError::Expired);

    // `exp` is required.
    let no_exp = token_a(&with(v2_claims(), json!({"exp": null})));
    assert_eq!(refused(&e.v, &no_exp).await, JwtError::Malformed);
}

#[tokio::test]
async fn a_bad_signature_is_refused() {
    let e = env().await;
    // Signed by another key, claiming the tenant's kid.
    let forged = keys()
        .other
        .sign(Algorithm::RS256, Some("key-a"), &v2_claims());
    assert_eq!(refused(&e.v, &forged).await, JwtError::BadSignature);

    // A genuine token whose payload was swapped.
    let genuine = token_a(&v2_claims());
    let parts: Vec<&str> = genuine.split('.').collect();
    let payload =
        URL_SAFE_NO_PAD.encode(with(v2_claims(), json!({"roles": ["Admin"]})).to_string());
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert_eq!(refused(&e.v, &tampered).await, JwtError::BadSignature);

    // No signature at all.
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    assert_eq!(refused(&e.v, &stripped).await, JwtError::BadSignature);
    assert_eq!(e.idp.jwks_hits(), 1);
}

#[tokio::test]
async fn an_unknown_kid_triggers_a_paced_refetch_then_is_refused() {
    let e = env().await;
    e.v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("valid");
    assert_eq!(e.idp.jwks_hits(), 1);

    let stranger = keys().b.sign(Algorithm::RS256, Some("key-x"), &v2_claims());
    // Right after the first fetch, a refetch is not yet allowed.
    assert_eq!(refused(&e.v, &stranger).await, JwtError::UnknownKey);
    assert_eq!(e.idp.jwks_hits(), 1);

    e.clock.advance(INTERVAL + Duration::from_secs(1));
    assert_eq!(refused(&e.v, &stranger).await, JwtError::UnknownKey);
    assert_eq!(
        (e.idp.config_hits(), e.idp.jwks_hits()),
        (2, 2),
        "one refetch"
    );

    // Two more unknown-kid tokens in a row: no further refetch within the interval.
    let another = keys().b.sign(Algorithm::RS256, Some("key-y"), &v2_claims());
    assert_eq!(refused(&e.v, &stranger).await, JwtError::UnknownKey);
    assert_eq!(refused(&e.v, &another).await, JwtError::UnknownKey);
    assert_eq!(e.idp.jwks_hits(), 2);

    e.clock.advance(INTERVAL);
    assert_eq!(refused(&e.v, &another).await, JwtError::UnknownKey);
    assert_eq!(e.idp.jwks_hits(), 3);

    // The known key kept working throughout.
    e.v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("valid");
    assert_eq!(e.idp.jwks_hits(), 3);
}

#[tokio::test]
async fn a_key_rotated_in_is_found_by_a_refetch() {
    let e = env().await;
    e.v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("valid");
    e.idp
        .set_keys(vec![keys().a.jwk("key-a"), keys().b.jwk("key-b")]);

    let rotated = keys().b.sign(Algorithm::RS256, Some("key-b"), &v2_claims());
    // Within the interval the new key is not fetched yet.
    assert_eq!(refused(&e.v, &rotated).await, JwtError::UnknownKey);
    e.clock.advance(INTERVAL);
    let caller =
        e.v.validate(Some(&bearer(&rotated)))
            .await
            .expect("new key");
    assert_eq!(caller.app_id.as_deref(), Some(APP));
    assert_eq!(e.idp.jwks_hits(), 2);
    e.v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("old key");
    e.v.validate(Some(&bearer(&rotated)))
        .await
        .expect("new key, cached");
    assert_eq!(e.idp.jwks_hits(), 2);
}

#[tokio::test]
async fn concurrent_cold_validations_share_one_fetch() {
    // No pacing at all: only the sharing keeps this to one fetch.
    let e = env_with(|s| JwtSettings {
        refetch_min_interval: Duration::ZERO,
        ..s
    })
    .await;
    let gate = e.idp.hold_jwks();
    let token = token_a(&v2_claims());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let v = Arc::clone(&e.v);
            let token = token.clone();
            tokio::spawn(async move { v.validate(Some(&bearer(&token))).await })
        })
        .collect();
    e.idp.wait_for_jwks_hits(1).await;
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1000);
    for t in tasks {
        t.await.expect("task").expect("valid");
    }
    assert_eq!((e.idp.config_hits(), e.idp.jwks_hits()), (1, 1));
}

#[tokio::test]
async fn concurrent_misses_on_a_rotated_key_share_one_refetch() {
    // No pacing at all: only the sharing keeps this to one refetch.
    let e = env_with(|s| JwtSettings {
        refetch_min_interval: Duration::ZERO,
        ..s
    })
    .await;
    e.v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("valid");
    e.idp
        .set_keys(vec![keys().a.jwk("key-a"), keys().b.jwk("key-b")]);
    let gate = e.idp.hold_jwks();
    let rotated = keys().b.sign(Algorithm::RS256, Some("key-b"), &v2_claims());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let v = Arc::clone(&e.v);
            let token = rotated.clone();
            tokio::spawn(async move { v.validate(Some(&bearer(&token))).await })
        })
        .collect();
    e.idp.wait_for_jwks_hits(2).await;
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1000);
    for t in tasks {
        t.await.expect("task").expect("valid");
    }
    assert_eq!(e.idp.jwks_hits(), 2);
}

#[tokio::test]
async fn none_and_hmac_algorithms_are_refused_without_fetching() {
    let e = env().await;
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"key-a"}"#);
    let payload = URL_SAFE_NO_PAD.encode(v2_claims().to_string());
    let none = format!("{header}.{payload}.");
    assert_eq!(refused(&e.v, &none).await, JwtError::UnsupportedAlgorithm);

    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("key-a".into());
    let secret = EncodingKey::from_secret(b"guessable");
    let hmac = jsonwebtoken::encode(&hs, &v2_claims(), &secret).expect("sign");
    assert_eq!(refused(&e.v, &hmac).await, JwtError::UnsupportedAlgorithm);
    assert_eq!((e.idp.config_hits(), e.idp.jwks_hits()), (0, 0));

    // RS384 with a key whose JWK does not say RS384.
    let rs384 = keys().a.sign(Algorithm::RS384, Some("key-a"), &v2_claims());
    assert_eq!(refused(&e.v, &rs384).await, JwtError::UnsupportedAlgorithm);
}

#[tokio::test]
async fn other_rsa_algorithms_only_when_the_jwk_says_so() {
    let e = env().await;
    e.idp.set_keys(vec![
        keys().a.jwk("key-a"),
        keys().b.jwk_with_alg("key-ps", "PS256"),
        keys().other.jwk_with_alg("key-384", "RS384"),
    ]);
    let ps = keys()
        .b
        .sign(Algorithm::PS256, Some("key-ps"), &v2_claims());
    e.v.validate(Some(&bearer(&ps))).await.expect("PS256 key");
    let rs384 = keys()
        .other
        .sign(Algorithm::RS384, Some("key-384"), &v2_claims());
    e.v.validate(Some(&bearer(&rs384)))
        .await
        .expect("RS384 key");
    let rs256 = keys()
        .b
        .sign(Algorithm::RS256, Some("key-ps"), &v2_claims());
    assert_eq!(refused(&e.v, &rs256).await, JwtError::UnsupportedAlgorithm);
}

#[tokio::test]
async fn missing_and_malformed_credentials() {
    let e = env().await;
    assert_eq!(e.v.validate(None).await, Err(JwtError::Missing));
    assert_eq!(e.v.validate(Some("")).await, Err(JwtError::Missing));
    assert_eq!(e.v.validate(Some("Bearer ")).await, Err(JwtError::Missing));
    let token = token_a(&v2_claims());
    for value in [
        format!("Basic {token}"),
        token.clone(),
        "Bearer abc".to_owned(),
        "Bearer a.b".to_owned(),
        "Bearer a.b.c".to_owned(),
        format!("Bearer {token}.extra.part"),
        format!("Bearer {token} trailing"),
    ] {
        let err = e.v.validate(Some(&value)).await.expect_err("malformed");
        assert_eq!(err, JwtError::Malformed, "{value}");
        assert_no_token_in(&err, &token);
    }
    assert_eq!(e.idp.jwks_hits(), 0, "nothing fetched for malformed input");

    // Validly signed, but the payload is not a claims object.
    let text = keys()
        .a
        .sign(Algorithm::RS256, Some("key-a"), &json!("not claims"));
    assert_eq!(refused(&e.v, &text).await, JwtError::Malformed);
    let list = keys()
        .a
        .sign(Algorithm::RS256, Some("key-a"), &json!([1, 2]));
    assert_eq!(refused(&e.v, &list).await, JwtError::Malformed);
    let bad_exp = token_a(&with(v2_claims(), json!({"exp": "tomorrow"})));
    assert_eq!(refused(&e.v, &bad_exp).await, JwtError::Malformed);
}

#[tokio::test]
async fn client_applications_and_roles() {
    let e = env_with(|s| JwtSettings {
        client_application_ids: vec![APP.to_uppercase()],
        required_roles: vec!["Gateway.Use".into(), "Chat.Write".into()],
        ..s
    })
    .await;
    e.v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("azp allowed, roles present");
    let v1 = with(v1_claims(), json!({"roles": ["Chat.Write", "Gateway.Use"]}));
    e.v.validate(Some(&bearer(&token_a(&v1))))
        .await
        .expect("appid allowed");

    let other = with(v2_claims(), json!({"azp": OTHER_APP}));
    assert_eq!(
        refused(&e.v, &token_a(&other)).await,
        JwtError::AppNotAllowed
    );
    let none = with(v2_claims(), json!({"azp": null}));
    assert_eq!(
        refused(&e.v, &token_a(&none)).await,
        JwtError::AppNotAllowed
    );
    let v1_other = with(v1, json!({"appid": OTHER_APP}));
    assert_eq!(
        refused(&e.v, &token_a(&v1_other)).await,
        JwtError::AppNotAllowed
    );

    let one_role = with(v2_claims(), json!({"roles": ["Gateway.Use"]}));
    assert_eq!(
        refused(&e.v, &token_a(&one_role)).await,
        JwtError::MissingRole
    );
    let no_roles = with(v2_claims(), json!({"roles": null}));
    assert_eq!(
        refused(&e.v, &token_a(&no_roles)).await,
        JwtError::MissingRole
    );
}

#[tokio::test]
async fn keys_unavailable_at_first_use_then_recovery() {
    let e = env().await;
    e.idp.set_up(false);
    let token = token_a(&v2_claims());
    assert_eq!(refused(&e.v, &token).await, JwtError::KeysUnavailable);
    assert_eq!(e.idp.config_hits(), 1);
    // Failed attempts are paced too.
    assert_eq!(refused(&e.v, &token).await, JwtError::KeysUnavailable);
    assert_eq!(e.idp.config_hits(), 1);

    e.idp.set_up(true);
    e.clock.advance(Duration::from_secs(5));
    e.v.validate(Some(&bearer(&token)))
        .await
        .expect("recovered");
    assert_eq!((e.idp.config_hits(), e.idp.jwks_hits()), (2, 1));
}

#[tokio::test]
async fn cached_keys_survive_a_later_outage() {
    let e = env().await;
    let token = token_a(&v2_claims());
    e.v.validate(Some(&bearer(&token))).await.expect("valid");
    e.idp.set_up(false);
    e.clock.advance(INTERVAL);
    e.v.validate(Some(&bearer(&token)))
        .await
        .expect("cached key");

    // A refetch during the outage fails and keeps the cached keys.
    let stranger = keys().b.sign(Algorithm::RS256, Some("key-x"), &v2_claims());
    assert_eq!(refused(&e.v, &stranger).await, JwtError::UnknownKey);
    assert_eq!(e.idp.config_hits(), 2);
    e.v.validate(Some(&bearer(&token)))
        .await
        .expect("still the cached key");
}

#[tokio::test]
async fn a_jwks_url_works_without_openid_configuration() {
    let idp = Idp::start(vec![keys().a.jwk("key-a")]).await;
    let v = JwtValidator::with_clock(
        settings(KeysSource::Jwks(idp.jwks_url())),
        http(),
        fake_clock(),
    );
    v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("valid");
    assert_eq!((idp.config_hits(), idp.jwks_hits()), (0, 1));
}

#[tokio::test]
async fn prefetch_warms_the_cache_and_reports_failure() {
    let e = env().await;
    e.v.prefetch().await.expect("prefetch");
    assert_eq!(e.idp.jwks_hits(), 1);
    e.v.validate(Some(&bearer(&token_a(&v2_claims()))))
        .await
        .expect("valid");
    assert_eq!(e.idp.jwks_hits(), 1);
    // Paced, but keys are cached: fine.
    e.v.prefetch().await.expect("prefetch");
    assert_eq!(e.idp.jwks_hits(), 1);

    let down = env().await;
    down.idp.set_up(false);
    assert_eq!(down.v.prefetch().await, Err(JwtError::KeysUnavailable));
    assert_eq!(
        down.v.prefetch().await,
        Err(JwtError::KeysUnavailable),
        "paced, nothing cached"
    );
    assert_eq!(down.idp.config_hits(), 1);
}

#[tokio::test]
async fn stale_keys_are_refreshed_in_the_background() {
    let e = env().await;
    let old = token_a(&v2_claims());
    e.v.validate(Some(&bearer(&old))).await.expect("valid");
    e.idp.set_keys(vec![keys().b.jwk("key-b")]);

    e.clock.advance(Duration::from_secs(24 * 3600 + 1));
    let fresh_claims = with(v2_claims(), json!({"exp": NOW + 48 * 3600}));
    let old = token_a(&fresh_claims);
    // The stale keys still serve this request; a refresh starts behind it.
    e.v.validate(Some(&bearer(&old)))
        .await
        .expect("stale keys still used");
    e.idp.wait_for_jwks_hits(2).await;

    let new = keys()
        .b
        .sign(Algorithm::RS256, Some("key-b"), &fresh_claims);
    e.v.validate(Some(&bearer(&new)))
        .await
        .expect("refreshed keys");
    assert_eq!(e.idp.jwks_hits(), 2);
    // key-a was retired by the refresh.
    assert_eq!(refused(&e.v, &old).await, JwtError::UnknownKey);
}

#[tokio::test]
async fn short_keys_are_ignored_and_tokens_without_kid_try_each_key() {
    let e = env().await;
    e.idp
        .set_keys(vec![keys().short.jwk("key-short"), keys().a.jwk("key-a")]);
    // aws-lc refuses to sign with a 1024-bit key, so this token's signature is
    // a placeholder: what matters is that the short key is not even loaded
    // (UnknownKey, where a loaded key would give BadSignature).
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"key-short"}"#);
    let payload = URL_SAFE_NO_PAD.encode(v2_claims().to_string());
    let weak = format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode([7u8; 128]));
    assert_eq!(refused(&e.v, &weak).await, JwtError::UnknownKey);

    let no_kid = keys().a.sign(Algorithm::RS256, None, &v2_claims());
    e.v.validate(Some(&bearer(&no_kid)))
        .await
        .expect("found without kid");
    let forged = keys().other.sign(Algorithm::RS256, None, &v2_claims());
    assert_eq!(refused(&e.v, &forged).await, JwtError::BadSignature);
}
