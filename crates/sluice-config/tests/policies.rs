//! The management listener, backend credentials, API authentication and
//! policies: resolution, defaults, semantic rules and unknown keys.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::HeaderName;
use sluice_config::{
    ApiAuth, CallLimit, Config, ConfigErrors, CounterKey, Credential, Dimension, EmitTokenMetric,
    JwtKeys, Policy, Problem, QuotaPeriod, TokenLimit, ValidateJwt, load_str_with_env,
};

const CLIENT_SECRET: &str = "cs-SENTINEL-4b1d";

fn env(name: &str) -> Option<String> {
    match name {
        "SP_SECRET" => Some(CLIENT_SECRET.to_string()),
        "TEAM_KEY" => Some("team-key-value".to_string()),
        _ => None,
    }
}

fn load_in(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
    load_str_with_env(text, "gateway.yaml", base, &env)
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    load_in(text, Path::new("/etc/sluice"))
}

fn problems(text: &str) -> Vec<Problem> {
    match load(text) {
        Ok(_) => panic!("expected problems"),
        Err(errors) => errors.problems,
    }
}

fn find<'a>(problems: &'a [Problem], path: &str) -> &'a Problem {
    problems
        .iter()
        .find(|p| p.path == path)
        .unwrap_or_else(|| panic!("no problem at {path}: {problems:#?}"))
}

fn paths(problems: &[Problem]) -> BTreeSet<String> {
    problems.iter().map(|p| p.path.clone()).collect()
}

fn header(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

/// One backend and one API whose extra lines (indented for the API
/// mapping) are appended.
/// One API with `extra` appended to it, and no server section.
fn api_no_server(extra: &str) -> String {
    format!(
        "backends:\n  - name: b\n    url: https://b.example\napis:\n  - name: a\n    path: /openai\n    backends: [b]\n{extra}"
    )
}

/// One API with `extra` appended to it; a management listener is configured
/// (at the end, so line numbers in the API stay put) since token metrics need one.
fn api_with(extra: &str) -> String {
    format!(
        "backends:\n  - name: b\n    url: https://b.example\napis:\n  - name: a\n    path: /openai\n    backends: [b]\n{extra}\
         server:\n  management: {{ listen: 127.0.0.1:0 }}\n"
    )
}

const FULL: &str = "\
server:
  listen: 127.0.0.1:8080
  management:
    listen: 127.0.0.1:9090
    max_label_values: 250
backends:
  - name: mi
    url: https://mi.example
    auth:
      managed_identity: { client_id: 11111111-2222-3333-4444-555555555555 }
  - name: mi-system
    url: https://mi2.example
    auth:
      managed_identity:
  - name: wi
    url: https://wi.example
    auth:
      workload_identity:
        client_id: wi-client
        tenant_id: contoso.onmicrosoft.com
        token_file: tokens/azure-identity-token
      scope: api://custom/.default
  - name: wi-env
    url: https://wi2.example
    auth:
      workload_identity: {}
  - name: sp
    url: https://sp.example
    auth:
      client_secret:
        tenant_id: tenant-1
        client_id: client-1
        secret: { env: SP_SECRET }
        authority_host: https://login.example.com
  - name: dev
    url: https://dev.example
    auth:
      azure_cli: {}
apis:
  - name: keyed
    path: /openai
    backends: [mi, mi-system, wi, wi-env, sp, dev]
    policies:
      - rate_limit: { calls: 100, renewal_period_seconds: 60, counter_key: subscription }
      - quota: { calls: 10000, renewal_period_seconds: 3600, counter_key: 'header:X-Team' }
      - token_limit:
          counter_key: identity
          tokens_per_minute: 10000
          token_quota: 1000000
          token_quota_period: daily
          estimate_prompt_tokens: false
          default_completion_tokens: 4096
          retry_after_header_name: X-Retry-In
          remaining_tokens_header_name: x-ratelimit-remaining-tokens-sluice
          remaining_quota_tokens_header_name: x-quota-remaining
          tokens_consumed_header_name: x-tokens-consumed
      - emit_token_metric:
          dimensions: [subscription, api, deployment, backend, backend_region, client_ip, identity, 'header:x-user-id']
  - name: entra
    path: /entra/openai
    backends: [mi]
    auth: jwt
    policies:
      - validate_jwt:
          openid_config_url: https://login.microsoftonline.com/tenant-1/v2.0/.well-known/openid-configuration?appid=abc
          issuers: [https://login.microsoftonline.com/tenant-1/v2.0]
          audiences: [https://cognitiveservices.azure.com, api://sluice]
          client_application_ids: [app-1, app-2]
          required_roles: [Gateway.Use]
          clock_skew_seconds: 0
      - rate_limit: { calls: 5, renewal_period_seconds: 300, counter_key: 'claim:oid' }
      - token_limit: { counter_key: client_ip, token_quota: 50, token_quota_period: yearly, consumed_tokens_header_name: x-consumed }
  - name: either
    path: /either/openai
    backends: [sp]
    auth: key_or_jwt
    policies:
      - validate_jwt:
          jwks_url: http://127.0.0.1:8081/keys
          issuers: [iss]
          audiences: [aud]
      - token_limit: { counter_key: identity, tokens_per_minute: 1 }
";

#[test]
fn full_example_resolves() {
    let config = load(FULL).unwrap_or_else(|e| panic!("{e}"));
    let management = config.server.management.as_ref().unwrap();
    assert_eq!(
        management.listen,
        "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(management.max_label_values, 250);
    assert!(management.operator_tokens.is_empty());

    let auth = |i: usize| config.backends[i].auth.as_ref().expect("auth set");
    const COGNITIVE: &str = "https://cognitiveservices.azure.com/.default";
    assert!(matches!(
        &auth(0).credential,
        Credential::ManagedIdentity { client_id: Some(id) } if id == "11111111-2222-3333-4444-555555555555"
    ));
    assert_eq!(auth(0).scope, COGNITIVE);
    assert!(matches!(
        &auth(1).credential,
        Credential::ManagedIdentity { client_id: None }
    ));
    match &auth(2).credential {
        Credential::WorkloadIdentity {
            client_id,
            tenant_id,
            token_file,
        } => {
            assert_eq!(client_id.as_deref(), Some("wi-client"));
            assert_eq!(tenant_id.as_deref(), Some("contoso.onmicrosoft.com"));
            assert_eq!(
                token_file.as_deref(),
                Some(Path::new("/etc/sluice/tokens/azure-identity-token"))
            );
        }
        other => panic!("workload identity expected, got {other:?}"),
    }
    assert_eq!(auth(2).scope, "api://custom/.default");
    assert!(matches!(
        &auth(3).credential,
        Credential::WorkloadIdentity {
            client_id: None,
            tenant_id: None,
            token_file: None
        }
    ));
    match &auth(4).credential {
        Credential::ClientSecret {
            tenant_id,
            client_id,
            secret,
            authority_host,
        } => {
            assert_eq!(tenant_id, "tenant-1");
            assert_eq!(client_id, "client-1");
            assert_eq!(secret.expose(), CLIENT_SECRET);
            assert_eq!(authority_host.as_deref(), Some("https://login.example.com"));
        }
        other => panic!("client secret expected, got {other:?}"),
    }
    assert!(matches!(auth(5).credential, Credential::AzureCli));
    assert_eq!(auth(5).scope, COGNITIVE);
    assert!(config.backends.iter().all(|b| b.api_key.is_none()));

    let keyed = &config.apis[0];
    assert_eq!(keyed.auth, ApiAuth::Key);
    let [rate, quota, tokens, metric] = &keyed.policies[..] else {
        panic!("four policies expected: {:?}", keyed.policies)
    };
    assert!(matches!(rate, Policy::RateLimit(l) if *l == CallLimit {
        calls: 100,
        renewal_period: Duration::from_secs(60),
        counter_key: CounterKey::Subscription,
    }));
    assert!(matches!(quota, Policy::Quota(l) if *l == CallLimit {
        calls: 10000,
        renewal_period: Duration::from_secs(3600),
        counter_key: CounterKey::Header(header("x-team")),
    }));
    let Policy::TokenLimit(tokens) = tokens else {
        panic!("token_limit expected")
    };
    assert_eq!(
        *tokens,
        TokenLimit {
            counter_key: CounterKey::Identity,
            tokens_per_minute: Some(10_000),
            token_quota: Some((1_000_000, QuotaPeriod::Daily)),
            estimate_prompt_tokens: false,
            default_completion_tokens: 4096,
            retry_after_header_name: header("x-retry-in"),
            remaining_tokens_header_name: Some(header("x-ratelimit-remaining-tokens-sluice")),
            remaining_quota_tokens_header_name: Some(header("x-quota-remaining")),
            tokens_consumed_header_name: Some(header("x-tokens-consumed")),
        }
    );
    let Policy::EmitTokenMetric(metric) = metric else {
        panic!("emit_token_metric expected")
    };
    assert_eq!(
        *metric,
        EmitTokenMetric {
            dimensions: vec![
                Dimension::Subscription,
                Dimension::Api,
                Dimension::Deployment,
                Dimension::Backend,
                Dimension::BackendRegion,
                Dimension::ClientIp,
                Dimension::Identity,
                Dimension::Header(header("x-user-id")),
            ]
        }
    );
    let labels: Vec<String> = metric.dimensions.iter().map(Dimension::label).collect();
    assert_eq!(
        labels,
        [
            "subscription",
            "api",
            "deployment",
            "backend",
            "backend_region",
            "client_ip",
            "identity",
            "header_x_user_id"
        ]
    );

    let entra = &config.apis[1];
    assert_eq!(entra.auth, ApiAuth::Jwt);
    let [jwt, rate, tokens] = &entra.policies[..] else {
        panic!("three policies expected")
    };
    assert!(matches!(jwt, Policy::ValidateJwt(v) if *v == ValidateJwt {
        keys: JwtKeys::OpenIdConfiguration(
            "https://login.microsoftonline.com/tenant-1/v2.0/.well-known/openid-configuration?appid=abc".into()
        ),
        issuers: vec!["https://login.microsoftonline.com/tenant-1/v2.0".into()],
        audiences: vec!["https://cognitiveservices.azure.com".into(), "api://sluice".into()],
        client_application_ids: vec!["app-1".into(), "app-2".into()],
        required_roles: vec!["Gateway.Use".into()],
        clock_skew: Duration::ZERO,
    }));
    assert!(
        matches!(rate, Policy::RateLimit(l) if l.counter_key == CounterKey::Claim("oid".into())
        && l.renewal_period == Duration::from_secs(300))
    );
    let Policy::TokenLimit(tokens) = tokens else {
        panic!("token_limit expected")
    };
    assert_eq!(tokens.counter_key, CounterKey::ClientIp);
    assert_eq!(tokens.tokens_per_minute, None);
    assert_eq!(tokens.token_quota, Some((50, QuotaPeriod::Yearly)));
    // The 2024 spelling lands in the same field.
    assert_eq!(
        tokens.tokens_consumed_header_name,
        Some(header("x-consumed"))
    );

    let either = &config.apis[2];
    assert_eq!(either.auth, ApiAuth::KeyOrJwt);
    assert!(matches!(&either.policies[0], Policy::ValidateJwt(v)
        if v.keys == JwtKeys::Jwks("http://127.0.0.1:8081/keys".into())
            && v.client_application_ids.is_empty()
            && v.required_roles.is_empty()
            && v.clock_skew == Duration::from_secs(60)));

    let debug = format!("{config:?}");
    assert!(!debug.contains("SENTINEL"), "client secret leaked in Debug");
}

#[test]
fn defaults() {
    let config = load(&api_with("")).unwrap_or_else(|e| panic!("{e}"));
    let management = config.server.management.as_ref().unwrap();
    assert_eq!(management.listen, "127.0.0.1:0".parse().unwrap());
    assert_eq!(management.max_label_values, 1000);
    assert!(config.backends[0].auth.is_none());
    assert_eq!(config.apis[0].auth, ApiAuth::Key);
    assert!(config.apis[0].policies.is_empty());

    let text = api_with(
        "    policies:\n\
         \x20     - token_limit: { counter_key: subscription, tokens_per_minute: 5 }\n\
         \x20     - emit_token_metric:\n",
    );
    let config = load(&text).unwrap_or_else(|e| panic!("{e}"));
    let [Policy::TokenLimit(tokens), Policy::EmitTokenMetric(metric)] =
        &config.apis[0].policies[..]
    else {
        panic!("{:?}", config.apis[0].policies)
    };
    assert!(tokens.estimate_prompt_tokens);
    assert_eq!(tokens.default_completion_tokens, 1024);
    assert_eq!(tokens.retry_after_header_name, http::header::RETRY_AFTER);
    assert_eq!(tokens.remaining_tokens_header_name, None);
    assert_eq!(tokens.remaining_quota_tokens_header_name, None);
    assert_eq!(tokens.tokens_consumed_header_name, None);
    assert_eq!(tokens.token_quota, None);
    assert_eq!(
        metric.dimensions,
        [
            Dimension::Subscription,
            Dimension::Api,
            Dimension::Deployment,
            Dimension::BackendRegion
        ]
    );

    // An empty dimension list is allowed (unlabelled totals); port 0 may
    // repeat; `azure_cli:` without a value is the Azure CLI credential.
    let text = "\
server:
  listen: 127.0.0.1:0
  management: { listen: 127.0.0.1:0 }
backends:
  - name: b
    url: https://b.example
    auth:
      azure_cli:
apis:
  - name: a
    path: /openai
    backends: [b]
    policies:
      - emit_token_metric: { dimensions: [] }
";
    let config = load(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.server.management.unwrap().listen,
        "127.0.0.1:0".parse::<SocketAddr>().unwrap()
    );
    let auth = config.backends[0].auth.as_ref().unwrap();
    assert!(matches!(auth.credential, Credential::AzureCli));
    assert_eq!(auth.scope, "https://cognitiveservices.azure.com/.default");
    assert!(matches!(&config.apis[0].policies[..],
        [Policy::EmitTokenMetric(m)] if m.dimensions.is_empty()));
}

#[test]
fn management_listener_problems() {
    let found = problems(&format!(
        "server:\n  listen: 127.0.0.1:8080\n  management: {{ listen: 127.0.0.1:8080 }}\n{}",
        api_no_server("")
    ));
    let p = find(&found, "server.management.listen");
    assert_eq!(p.line, Some(3));
    assert!(p.message.contains("server.listen"), "{p:?}");

    let found = problems(&format!(
        "server:\n  management:\n    listen: localhost:9090\n{}",
        api_no_server("")
    ));
    assert_eq!(find(&found, "server.management.listen").line, Some(3));
    assert!(
        find(&found, "server.management.listen")
            .message
            .contains("not an IP:PORT")
    );

    let found = problems(&format!(
        "server:\n  management: {{}}\n{}",
        api_no_server("")
    ));
    assert_eq!(
        find(&found, "server.management.listen").message,
        "is required"
    );
    assert_eq!(find(&found, "server.management.listen").line, Some(2));

    // A simulator on the management address is a clash too.
    let text = "\
server:
  management: { listen: 127.0.0.1:9090 }
simulators:
  - name: s
    region: R
    listen: 127.0.0.1:9090
backends:
  - name: b
    simulator: s
apis:
  - {name: a, path: /openai, backends: [b]}
";
    let found = problems(text);
    assert_eq!(paths(&found), ["simulators[0].listen".to_string()].into());
    assert!(found[0].message.contains("server.management.listen"));
}

#[test]
fn backend_auth_problems() {
    let text = "\
backends:
  - name: both
    url: https://b.example
    api_key: { env: TEAM_KEY }
    auth: { azure_cli: {} }
  - name: none
    url: https://b.example
    auth: { scope: x }
  - name: two
    url: https://b.example
    auth:
      managed_identity: {}
      azure_cli: {}
  - name: sp
    url: https://b.example
    auth:
      client_secret: { authority_host: 'http://login.example.com' }
      scope: ''
  - name: sp2
    url: https://b.example
    auth:
      client_secret:
        tenant_id: 'bad tenant'
        client_id: ''
        secret: { env: NOT_SET }
        authority_host: login.example.com
  - name: ids
    url: https://b.example
    auth:
      workload_identity: { client_id: 'a/b', token_file: '' }
apis:
  - {name: a, path: /openai, backends: [both]}
";
    let found = problems(text);
    let expected: BTreeSet<String> = [
        "backends[0].auth",
        "backends[1].auth",
        "backends[2].auth",
        "backends[3].auth.client_secret.tenant_id",
        "backends[3].auth.client_secret.client_id",
        "backends[3].auth.client_secret.secret",
        "backends[3].auth.client_secret.authority_host",
        "backends[3].auth.scope",
        "backends[4].auth.client_secret.tenant_id",
        "backends[4].auth.client_secret.client_id",
        "backends[4].auth.client_secret.secret.env",
        "backends[4].auth.client_secret.authority_host",
        "backends[5].auth.workload_identity.client_id",
        "backends[5].auth.workload_identity.token_file",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths(&found), expected, "{found:#?}");
    assert!(
        find(&found, "backends[0].auth")
            .message
            .contains("'auth' or 'api_key', not both")
    );
    assert_eq!(find(&found, "backends[0].auth").line, Some(5));
    assert!(
        find(&found, "backends[1].auth")
            .message
            .contains("needs exactly one credential: managed_identity, workload_identity, client_secret, azure_cli")
    );
    assert_eq!(
        find(&found, "backends[2].auth").message,
        "set exactly one credential, found managed_identity and azure_cli"
    );
    assert!(
        find(&found, "backends[3].auth.client_secret.authority_host")
            .message
            .contains("https://")
    );
    assert_eq!(
        find(&found, "backends[3].auth.client_secret.secret").message,
        "is required"
    );
    assert_eq!(
        find(&found, "backends[3].auth.client_secret.secret").line,
        Some(17)
    );
    assert!(
        find(&found, "backends[4].auth.client_secret.authority_host")
            .message
            .contains("absolute")
    );
    assert_eq!(
        find(&found, "backends[4].auth.client_secret.tenant_id").line,
        Some(23)
    );
}

#[test]
fn api_auth_needs_validate_jwt() {
    for mode in ["jwt", "key_or_jwt"] {
        let found = problems(&api_with(&format!("    auth: {mode}\n")));
        assert_eq!(paths(&found), ["apis[0].auth".to_string()].into());
        assert_eq!(found[0].line, Some(8));
        assert!(found[0].message.contains("validate_jwt"), "{:?}", found[0]);
    }
    let found = problems(&api_with("    auth: oauth\n"));
    assert!(
        find(&found, "apis[0].auth")
            .message
            .contains("key, jwt or key_or_jwt")
    );
}

const JWT: &str = "      - validate_jwt: { jwks_url: 'https://login.example/keys', issuers: [i], audiences: [a] }\n";

#[test]
fn validate_jwt_problems() {
    let text = api_with(&format!(
        "    auth: jwt\n    policies:\n{JWT}{JWT}\
         \x20     - validate_jwt:\n\
         \x20         openid_config_url: https://a.example/x\n\
         \x20         jwks_url: https://a.example/y\n\
         \x20         issuers: []\n\
         \x20         audiences: [ok, '', ok]\n\
         \x20         clock_skew_seconds: 601\n\
         \x20     - validate_jwt: {{ jwks_url: 'ftp://x', client_application_ids: [' x'] }}\n\
         \x20     - validate_jwt: {{ openid_config_url: 'https://a.example/#f', issuers: [i], audiences: [a] }}\n\
         \x20     - validate_jwt: {{ issuers: [i], audiences: [a] }}\n"
    ));
    let found = problems(&text);
    let expected: BTreeSet<String> = [
        "apis[0].policies[1]",
        "apis[0].policies[2]",
        "apis[0].policies[2].validate_jwt",
        "apis[0].policies[2].validate_jwt.issuers",
        "apis[0].policies[2].validate_jwt.audiences[1]",
        "apis[0].policies[2].validate_jwt.audiences[2]",
        "apis[0].policies[2].validate_jwt.clock_skew_seconds",
        "apis[0].policies[3]",
        "apis[0].policies[3].validate_jwt.jwks_url",
        "apis[0].policies[3].validate_jwt.issuers",
        "apis[0].policies[3].validate_jwt.audiences",
        "apis[0].policies[3].validate_jwt.client_application_ids[0]",
        "apis[0].policies[4]",
        "apis[0].policies[4].validate_jwt.openid_config_url",
        "apis[0].policies[5]",
        "apis[0].policies[5].validate_jwt",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths(&found), expected, "{found:#?}");
    let dup = find(&found, "apis[0].policies[1]");
    assert_eq!(
        dup.message,
        "validate_jwt may appear only once per API (first at apis[0].policies[0])"
    );
    assert_eq!(dup.line, Some(11));
    assert!(
        find(&found, "apis[0].policies[2].validate_jwt")
            .message
            .contains("not both")
    );
    assert!(
        find(&found, "apis[0].policies[5].validate_jwt")
            .message
            .contains("is required")
    );
    assert_eq!(
        find(
            &found,
            "apis[0].policies[2].validate_jwt.clock_skew_seconds"
        )
        .message,
        "must be between 0 and 600"
    );
    assert_eq!(
        find(
            &found,
            "apis[0].policies[2].validate_jwt.clock_skew_seconds"
        )
        .line,
        Some(17)
    );
}

#[test]
fn call_limit_problems() {
    let text = api_with(
        "    policies:\n\
         \x20     - rate_limit: { calls: 0, renewal_period_seconds: 301, counter_key: client_ip }\n\
         \x20     - rate_limit: { renewal_period_seconds: 0, counter_key: 'header:bad header' }\n\
         \x20     - quota: { calls: 1, renewal_period_seconds: 59, counter_key: ip }\n\
         \x20     - quota: { calls: 1, renewal_period_seconds: 60, counter_key: 'claim:' }\n\
         \x20     - rate_limit: { calls: 1 }\n",
    );
    let found = problems(&text);
    let expected: BTreeSet<String> = [
        "apis[0].policies[0].rate_limit.calls",
        "apis[0].policies[0].rate_limit.renewal_period_seconds",
        "apis[0].policies[1].rate_limit.calls",
        "apis[0].policies[1].rate_limit.renewal_period_seconds",
        "apis[0].policies[1].rate_limit.counter_key",
        "apis[0].policies[2].quota.renewal_period_seconds",
        "apis[0].policies[2].quota.counter_key",
        "apis[0].policies[3].quota.counter_key",
        "apis[0].policies[4].rate_limit.renewal_period_seconds",
        "apis[0].policies[4].rate_limit.counter_key",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths(&found), expected, "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert_eq!(
        at("apis[0].policies[0].rate_limit.calls"),
        "must be at least 1"
    );
    assert_eq!(
        at("apis[0].policies[0].rate_limit.renewal_period_seconds"),
        "must be between 1 and 300"
    );
    assert_eq!(
        at("apis[0].policies[2].quota.renewal_period_seconds"),
        "must be at least 60"
    );
    assert!(
        at("apis[0].policies[1].rate_limit.counter_key").contains("not a valid HTTP header name")
    );
    assert!(at("apis[0].policies[2].quota.counter_key").contains("'ip' is not a counter key"));
    assert!(at("apis[0].policies[3].quota.counter_key").contains("claim name"));
    assert_eq!(at("apis[0].policies[1].rate_limit.calls"), "is required");
    assert_eq!(
        find(&found, "apis[0].policies[4].rate_limit.counter_key").line,
        Some(13)
    );
}

#[test]
fn token_limit_problems() {
    let text = api_with(
        "    policies:\n\
         \x20     - token_limit: { counter_key: client_ip }\n\
         \x20     - token_limit: { counter_key: client_ip, token_quota: 5 }\n\
         \x20     - token_limit: { counter_key: client_ip, token_quota_period: daily }\n\
         \x20     - token_limit: { counter_key: client_ip, token_quota: 0, token_quota_period: Daily, tokens_per_minute: 0 }\n\
         \x20     - token_limit:\n\
         \x20         counter_key: client_ip\n\
         \x20         tokens_per_minute: 1\n\
         \x20         retry_after_header_name: 'bad name'\n\
         \x20         remaining_tokens_header_name: x-same\n\
         \x20         remaining_quota_tokens_header_name: X-Same\n\
         \x20         tokens_consumed_header_name: x-a\n\
         \x20         consumed_tokens_header_name: x-b\n\
         \x20     - token_limit: { tokens_per_minute: 1 }\n",
    );
    let found = problems(&text);
    let expected: BTreeSet<String> = [
        "apis[0].policies[0].token_limit",
        "apis[0].policies[1].token_limit.token_quota_period",
        "apis[0].policies[2].token_limit.token_quota",
        "apis[0].policies[3].token_limit.token_quota",
        "apis[0].policies[3].token_limit.token_quota_period",
        "apis[0].policies[3].token_limit.tokens_per_minute",
        "apis[0].policies[4].token_limit.retry_after_header_name",
        "apis[0].policies[4].token_limit.remaining_quota_tokens_header_name",
        "apis[0].policies[4].token_limit.consumed_tokens_header_name",
        "apis[0].policies[5].token_limit.counter_key",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths(&found), expected, "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert!(at("apis[0].policies[0].token_limit").contains("tokens_per_minute"));
    assert_eq!(
        at("apis[0].policies[1].token_limit.token_quota_period"),
        "is required when token_quota is set"
    );
    assert_eq!(
        at("apis[0].policies[2].token_limit.token_quota"),
        "is required when token_quota_period is set"
    );
    assert!(
        at("apis[0].policies[3].token_limit.token_quota_period")
            .contains("'Daily' is not a quota period")
    );
    assert!(
        at("apis[0].policies[4].token_limit.remaining_quota_tokens_header_name")
            .contains("remaining_tokens_header_name")
    );
    assert!(at("apis[0].policies[4].token_limit.consumed_tokens_header_name").contains("not both"));
    assert_eq!(
        find(
            &found,
            "apis[0].policies[4].token_limit.consumed_tokens_header_name"
        )
        .line,
        Some(20)
    );
    assert_eq!(
        at("apis[0].policies[5].token_limit.counter_key"),
        "is required"
    );
}

#[test]
fn emit_token_metric_problems() {
    let text = api_with(
        "    policies:\n\
         \x20     - emit_token_metric: { dimensions: [api, region, api, 'header:x-a', 'header:X-A', 'header:', 'header:x.a'] }\n\
         \x20     - emit_token_metric:\n\
         \x20         dimensions: [subscription, api, deployment, backend, backend_region, client_ip, identity, 'header:a', 'header:b', 'header:c', 'header:d']\n",
    );
    let found = problems(&text);
    let expected: BTreeSet<String> = [
        "apis[0].policies[0].emit_token_metric.dimensions[1]",
        "apis[0].policies[0].emit_token_metric.dimensions[2]",
        "apis[0].policies[0].emit_token_metric.dimensions[4]",
        "apis[0].policies[0].emit_token_metric.dimensions[5]",
        "apis[0].policies[0].emit_token_metric.dimensions[6]",
        "apis[0].policies[1]",
        "apis[0].policies[1].emit_token_metric.dimensions",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths(&found), expected, "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert!(
        at("apis[0].policies[0].emit_token_metric.dimensions[1]")
            .contains("'region' is not a dimension")
    );
    assert!(
        at("apis[0].policies[0].emit_token_metric.dimensions[2]")
            .contains("repeats apis[0].policies[0].emit_token_metric.dimensions[0]")
    );
    assert!(at("apis[0].policies[0].emit_token_metric.dimensions[6]").contains("header_x_a"));
    assert!(at("apis[0].policies[1]").contains("only once"));
    assert_eq!(
        at("apis[0].policies[1].emit_token_metric.dimensions"),
        "at most 10 dimensions are allowed, found 11"
    );
    assert_eq!(
        find(&found, "apis[0].policies[1].emit_token_metric.dimensions").line,
        Some(11)
    );
}

#[test]
fn counter_keys_must_be_backed_by_earlier_steps() {
    // Subscription keys need auth: key with a required subscription.
    for extra in [
        "    subscription: { required: false }\n",
        "    auth: jwt\n",
        "    auth: key_or_jwt\n",
    ] {
        let text = api_with(&format!(
            "{extra}    policies:\n{JWT}      - rate_limit: {{ calls: 1, renewal_period_seconds: 1, counter_key: subscription }}\n"
        ));
        let found = problems(&text);
        assert_eq!(
            paths(&found),
            ["apis[0].policies[1].rate_limit.counter_key".to_string()].into(),
            "{extra}: {found:#?}"
        );
        assert!(found[0].message.starts_with(
            "a limit keyed by subscription needs callers to present a subscription key"
        ));
        assert_eq!(found[0].line, Some(11));
    }

    // A claim needs validate_jwt earlier in the list; the message gives the order.
    let text = api_with(&format!(
        "    policies:\n\
         \x20     - quota: {{ calls: 1, renewal_period_seconds: 60, counter_key: 'claim:oid' }}\n{JWT}"
    ));
    let found = problems(&text);
    assert_eq!(
        paths(&found),
        ["apis[0].policies[0].quota.counter_key".to_string()].into()
    );
    assert!(
        found[0].message.contains("apis[0].policies[1]")
            && found[0].message.contains("apis[0].policies[0]")
            && found[0].message.contains("earlier"),
        "{:?}",
        found[0]
    );
    // Even with auth: jwt, the claim key follows the list order.
    let text = api_with(
        "    auth: jwt\n    policies:\n\
         \x20     - token_limit: { counter_key: 'claim:oid', tokens_per_minute: 5 }\n",
    );
    let found = problems(&text);
    assert!(paths(&found).contains("apis[0].policies[0].token_limit.counter_key"));
    assert!(paths(&found).contains("apis[0].auth"));
    let text = api_with(
        "    policies:\n      - rate_limit: { calls: 1, renewal_period_seconds: 1, counter_key: 'claim:oid' }\n",
    );
    let found = problems(&text);
    assert!(
        found[0]
            .message
            .contains("add a validate_jwt entry earlier")
    );

    // Identity needs an identified caller.
    let identity = "      - token_limit: { counter_key: identity, tokens_per_minute: 5 }\n";
    let found = problems(&api_with(&format!(
        "    subscription: {{ required: false }}\n    policies:\n{identity}{JWT}"
    )));
    assert_eq!(
        paths(&found),
        ["apis[0].policies[0].token_limit.counter_key".to_string()].into()
    );
    assert!(found[0].message.contains("identified before this entry"));
    // With auth: jwt or key_or_jwt, token callers are known only after validate_jwt.
    for auth in ["jwt", "key_or_jwt"] {
        let found = problems(&api_with(&format!(
            "    auth: {auth}\n    policies:\n{identity}{JWT}"
        )));
        assert!(
            paths(&found).contains("apis[0].policies[0].token_limit.counter_key"),
            "{auth}: {found:#?}"
        );
    }
    // A claim key under key_or_jwt would put every key caller in one counter.
    let found = problems(&api_with(&format!(
        "    auth: key_or_jwt\n    policies:\n{JWT}      - rate_limit: {{ calls: 1, renewal_period_seconds: 1, counter_key: 'claim:oid' }}\n"
    )));
    assert!(
        found
            .iter()
            .any(|p| p.message.contains("cannot be used with auth: key_or_jwt")),
        "{found:#?}"
    );
    // ... which any of these provides.
    for extra in [
        String::new(),
        format!("    auth: jwt\n    policies:\n{JWT}{identity}"),
        format!("    auth: key_or_jwt\n    policies:\n{JWT}{identity}"),
        format!("    subscription: {{ required: false }}\n    policies:\n{JWT}{identity}"),
    ] {
        let text = if extra.is_empty() {
            api_with(&format!("    policies:\n{identity}"))
        } else {
            api_with(&extra)
        };
        load(&text).unwrap_or_else(|e| panic!("{text}\n{e}"));
    }
    // The subscription dimension is fine anywhere.
    let text = api_with(&format!(
        "    auth: jwt\n    policies:\n      - emit_token_metric: {{ dimensions: [subscription, identity] }}\n{JWT}"
    ));
    load(&text).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn policy_entries_hold_exactly_one_policy() {
    let text = api_with(
        "    policies:\n\
         \x20     - rate_limit: { calls: 1, renewal_period_seconds: 1, counter_key: client_ip }\n\
         \x20       quota: { calls: 1, renewal_period_seconds: 60, counter_key: client_ip }\n\
         \x20     - {}\n\
         \x20     -\n\
         \x20     - rate_limt: { calls: 1 }\n\
         \x20     - rate_limit\n\
         \x20     - quota: { calls: many, renewal_period_seconds: 60, counter_key: client_ip }\n",
    );
    let found = problems(&text);
    let expected: BTreeSet<String> = [
        "apis[0].policies[0]",
        "apis[0].policies[1]",
        "apis[0].policies[2]",
        "apis[0].policies[3]",
        "apis[0].policies[3].rate_limt",
        "apis[0].policies[4]",
        "apis[0].policies[5].quota.calls",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths(&found), expected, "{found:#?}");
    let two = find(&found, "apis[0].policies[0]");
    assert_eq!(two.line, Some(9));
    assert!(
        two.message.contains("found rate_limit and quota"),
        "{two:?}"
    );
    let none = find(&found, "apis[0].policies[1]");
    assert_eq!(none.line, Some(11));
    assert_eq!(
        none.message,
        "a policy entry needs exactly one of: validate_jwt, rate_limit, quota, token_limit, emit_token_metric"
    );
    assert_eq!(find(&found, "apis[0].policies[2]").message, "empty entry");
    assert_eq!(
        find(&found, "apis[0].policies[3].rate_limt").message,
        "unknown key 'rate_limt' (did you mean 'rate_limit'?)"
    );
    assert!(
        find(&found, "apis[0].policies[4]")
            .message
            .contains("expected a mapping")
    );
    assert_eq!(
        find(&found, "apis[0].policies[5].quota.calls").line,
        Some(15)
    );
}

#[test]
fn unknown_keys_in_every_new_mapping() {
    let text = "\
server:
  management:
    listen: 127.0.0.1:9090
    lisen: 1
backends:
  - name: mi
    url: https://b.example
    auth:
      managed_identity: { client_id: x, object_id: y }
      audience: z
  - name: wi
    url: https://b.example
    auth:
      workload_identity: { token_path: /t }
  - name: sp
    url: https://b.example
    auth:
      client_secret:
        tenant_id: t
        client_id: c
        secret: { env: SP_SECRET, value: nope }
        client_secret: nope
  - name: cli
    url: https://b.example
    auth:
      azure_cli: { subscription: s }
apis:
  - name: a
    path: /openai
    backends: [mi]
    auth: jwt
    policies:
      - validate_jwt: { jwks_url: 'https://k.example', issuers: [i], audiences: [a], tenant: t }
      - rate_limit: { cals: 1, renewal_period_seconds: 1, counter_key: client_ip }
      - quota: { calls: 1, renewal_period: 60, renewal_period_seconds: 60, counter_key: client_ip }
      - token_limit: { counter_key: client_ip, tokens_per_minute: 1, tpm: 2 }
      - emit_token_metric: { dimensions: [api], namespace: x }
";
    let found = problems(text);
    let expected = [
        ("server.management.lisen", 4),
        ("backends[0].auth.managed_identity.object_id", 9),
        ("backends[0].auth.audience", 10),
        ("backends[1].auth.workload_identity.token_path", 14),
        ("backends[2].auth.client_secret.secret.value", 21),
        ("backends[2].auth.client_secret.client_secret", 22),
        ("backends[3].auth.azure_cli.subscription", 26),
        ("apis[0].policies[0].validate_jwt.tenant", 33),
        ("apis[0].policies[1].rate_limit.cals", 34),
        ("apis[0].policies[2].quota.renewal_period", 35),
        ("apis[0].policies[3].token_limit.tpm", 36),
        ("apis[0].policies[4].emit_token_metric.namespace", 37),
    ];
    for (path, line) in expected {
        let problem = find(&found, path);
        assert_eq!(problem.line, Some(line), "line of {path}");
        assert!(problem.message.starts_with("unknown key"), "{problem:?}");
    }
    // The misspelt key leaves `calls` missing: the one other problem.
    assert_eq!(
        find(&found, "apis[0].policies[1].rate_limit.calls").message,
        "is required"
    );
    assert_eq!(found.len(), expected.len() + 1, "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert_eq!(
        at("apis[0].policies[1].rate_limit.cals"),
        "unknown key 'cals' (did you mean 'calls'?)"
    );
    assert_eq!(
        at("server.management.lisen"),
        "unknown key 'lisen' (did you mean 'listen'?)"
    );
    assert!(
        at("backends[2].auth.client_secret.secret.value").contains("expected one of: env, file")
    );
    assert!(at("backends[3].auth.azure_cli.subscription").contains("azure_cli takes no settings"));
    assert!(at("backends[0].auth.audience").contains("managed_identity, workload_identity"));
}

#[test]
fn client_secret_never_appears_in_errors_or_debug() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sp.secret"), format!("{CLIENT_SECRET}\n")).unwrap();
    let text = format!(
        "\
backends:
  - name: a
    url: https://a.example
    auth:
      client_secret: {{ tenant_id: t, client_id: c, secret: {{ file: sp.secret }} }}
  - name: b
    url: https://b.example
    auth:
      client_secret: {{ tenant_id: t, client_id: c, secret: {CLIENT_SECRET} }}
  - name: c
    url: https://c.example
    api_key: {{ env: SP_SECRET }}
    auth:
      client_secret: {{ tenant_id: 'bad tenant', client_id: c, secret: {{ env: SP_SECRET }}, authority_host: 'http://{CLIENT_SECRET}@h' }}
apis:
  - {{name: x, path: /openai, backends: [a, b, c]}}
"
    );
    let errors = load_in(&text, dir.path()).expect_err("expected problems");
    let shown = format!("{errors}\n{errors:?}");
    assert!(!shown.contains("SENTINEL"), "{shown}");
    assert!(
        find(&errors.problems, "backends[1].auth.client_secret.secret")
            .message
            .contains("{env: VARIABLE} or {file: PATH}")
    );
    assert!(paths(&errors.problems).contains("backends[2].auth.client_secret.authority_host"));

    // Resolved: the value is reachable only through expose().
    let good = text
        .lines()
        .take(5)
        .chain(["apis:", "  - {name: x, path: /openai, backends: [a]}"])
        .collect::<Vec<_>>()
        .join("\n");
    let config = load_in(&good, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let credential = &config.backends[0].auth.as_ref().unwrap().credential;
    let debug = format!("{credential:?} {credential:#?} {config:?}");
    assert!(!debug.contains("SENTINEL"), "{debug}");
    assert!(debug.contains("<redacted>"));
    let Credential::ClientSecret { secret, .. } = credential else {
        panic!("client secret expected")
    };
    assert_eq!(secret.expose(), CLIENT_SECRET);
}

#[test]
fn the_documented_full_example_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let after = &doc[doc.find("## Full example").expect("full example section")..];
    let start = after.find("```yaml\n").expect("yaml block") + "```yaml\n".len();
    let example = &after[start..start + after[start..].find("```").expect("block end")];
    let env = |name: &str| match name {
        "AOAI_SWEDEN_KEY" | "TEAM_A_SECONDARY" => Some(format!("{name}-value")),
        "SLUICE_DEBUG_SIGNING_KEY" => Some("a-shared-signing-key-0123456789abcdef".to_string()),
        _ => None,
    };
    let config = load_str_with_env(example, "configuration.md", &root, &env)
        .unwrap_or_else(|e| panic!("{e}"));
    let management = config.server.management.as_ref().unwrap();
    assert!(management.entra_id.is_some() && management.debug_signing_key.is_some());
    assert_eq!(
        management.tracing.redact_headers[0].as_str(),
        "x-internal-secret"
    );
    assert!(config.backends.iter().any(|b| b.auth.is_some()));
    assert_eq!(config.apis[0].policies.len(), 3);
    assert_eq!(config.apis[1].auth, ApiAuth::Jwt);
}

#[test]
fn token_metrics_need_the_management_listener() {
    let text = "backends: [{name: b, url: 'https://b.example'}]\n\
                apis:\n  - name: a\n    path: /openai\n    backends: [b]\n    policies:\n      - emit_token_metric: {}\n";
    let found = problems(text);
    assert_eq!(
        paths(&found),
        ["apis[0].policies[0].emit_token_metric".to_string()].into()
    );
    assert!(found[0].message.contains("server.management.listen"));
}

#[test]
fn credential_headers_are_never_counter_keys_or_labels() {
    let text = "\
server:
  management: { listen: 127.0.0.1:0 }
backends:
  - name: b
    url: https://b.example
apis:
  - name: a
    path: /openai
    backends: [b]
    policies:
      - rate_limit: { calls: 1, renewal_period_seconds: 1, counter_key: 'header:Authorization' }
      - quota: { calls: 1, renewal_period_seconds: 60, counter_key: 'header:API-KEY' }
      - token_limit: { counter_key: 'header:x-team-key', tokens_per_minute: 1 }
      - rate_limit: { calls: 1, renewal_period_seconds: 1, counter_key: 'header:Ocp-Apim-Subscription-Key' }
      - quota: { calls: 1, renewal_period_seconds: 60, counter_key: 'header:proxy-authorization' }
      - token_limit: { counter_key: 'header:x-team', tokens_per_minute: 1 }
      - emit_token_metric:
          dimensions: [api, 'header:Cookie', 'header:apim-debug-authorization', 'header:X-Team-Key', 'header:x-user-id']
  - name: later
    path: /later/openai
    backends: [b]
    subscription: { header_names: [X-Team-Key] }
";
    let found = problems(text);
    let expected = [
        (
            "apis[0].policies[0].rate_limit.counter_key",
            11,
            "authorization",
        ),
        ("apis[0].policies[1].quota.counter_key", 12, "api-key"),
        (
            "apis[0].policies[2].token_limit.counter_key",
            13,
            "x-team-key",
        ),
        (
            "apis[0].policies[3].rate_limit.counter_key",
            14,
            "ocp-apim-subscription-key",
        ),
        (
            "apis[0].policies[4].quota.counter_key",
            15,
            "proxy-authorization",
        ),
        (
            "apis[0].policies[6].emit_token_metric.dimensions[1]",
            18,
            "cookie",
        ),
        (
            "apis[0].policies[6].emit_token_metric.dimensions[2]",
            18,
            "apim-debug-authorization",
        ),
        (
            "apis[0].policies[6].emit_token_metric.dimensions[3]",
            18,
            "x-team-key",
        ),
    ];
    for (path, line, header) in expected {
        let p = find(&found, path);
        assert_eq!(p.line, Some(line), "line of {path}");
        assert!(
            p.message
                .starts_with(&format!("header '{header}' carries a credential")),
            "{p:?}"
        );
        assert!(p.message.contains("must not be used as"), "{p:?}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert!(at("apis[0].policies[0].rate_limit.counter_key").contains("as a counter key"));
    assert!(
        at("apis[0].policies[6].emit_token_metric.dimensions[1]").contains("as a metric label")
    );
    // A configured subscription header says where it was configured.
    assert!(
        at("apis[0].policies[2].token_limit.counter_key")
            .contains("apis[1].subscription.header_names[0]")
    );
}

#[test]
fn credential_headers_of_a_config() {
    let text = "\
backends: [{name: b, url: 'https://b.example'}]
apis:
  - {name: a, path: /openai, backends: [b], subscription: {header_names: [X-Key, api-key]}}
  - {name: c, path: /c/openai, backends: [b], subscription: {header_names: [x-key, X-Other-Key]}}
  - name: d
    path: /d/openai
    backends: [b]
    policies:
      - rate_limit: { calls: 1, renewal_period_seconds: 1, counter_key: 'header:x-team' }
";
    let config = load(text).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = config
        .credential_headers()
        .iter()
        .map(|h| h.as_str().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "api-key",
            "authorization",
            "proxy-authorization",
            "cookie",
            "ocp-apim-subscription-key",
            "apim-debug-authorization",
            "x-key",
            "x-other-key",
        ]
    );
    assert_eq!(
        sluice_config::FIXED_CREDENTIAL_HEADERS.len(),
        6,
        "the fixed list"
    );
    let defaults = load(&api_with("")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        defaults.credential_headers().len(),
        sluice_config::FIXED_CREDENTIAL_HEADERS.len()
    );
}

#[test]
fn default_completion_tokens() {
    let config = load(&api_with(
        "    policies:\n\
         \x20     - token_limit: { counter_key: client_ip, tokens_per_minute: 5, default_completion_tokens: 0 }\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let [Policy::TokenLimit(tokens)] = &config.apis[0].policies[..] else {
        panic!("{:?}", config.apis[0].policies)
    };
    assert_eq!(tokens.default_completion_tokens, 0);

    let found = problems(&api_with(
        "    policies:\n\
         \x20     - token_limit: { counter_key: client_ip, tokens_per_minute: 5, default_completion_tokens: -1 }\n\
         \x20     - token_limit: { counter_key: client_ip, tokens_per_minute: 5, default_completion_tokens: lots }\n\
         \x20     - token_limit: { counter_key: client_ip, tokens_per_minute: 5, default_completion: 5 }\n",
    ));
    let expected = [
        (
            "apis[0].policies[0].token_limit.default_completion_tokens",
            9,
        ),
        (
            "apis[0].policies[1].token_limit.default_completion_tokens",
            10,
        ),
        ("apis[0].policies[2].token_limit.default_completion", 11),
    ];
    for (path, line) in expected {
        assert_eq!(find(&found, path).line, Some(line), "line of {path}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    assert!(
        find(
            &found,
            "apis[0].policies[0].token_limit.default_completion_tokens"
        )
        .message
        .contains("expected a non-negative integer")
    );
    assert!(
        find(&found, "apis[0].policies[2].token_limit.default_completion")
            .message
            .starts_with("unknown key")
    );
}
