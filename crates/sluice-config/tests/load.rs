//! End-to-end tests of loading, validation and resolution.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sluice_config::{
    BackendTarget, BackendUrl, Config, ConfigErrors, Counters, IpNet, Problem, SimDeployment,
    Timeouts, load_file, load_str_with_env,
};

fn env_from(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

fn load(text: &str, vars: &'static [(&'static str, &'static str)]) -> Result<Config, ConfigErrors> {
    load_str_with_env(
        text,
        "gateway.yaml",
        Path::new("/nonexistent"),
        &env_from(vars),
    )
}

fn problems(text: &str) -> Vec<Problem> {
    match load(text, &[("K1", "key-one"), ("K2", "key-two")]) {
        Ok(_) => panic!("expected problems"),
        Err(errors) => errors.problems,
    }
}

fn paths(problems: &[Problem]) -> BTreeSet<String> {
    problems.iter().map(|p| p.path.clone()).collect()
}

fn find<'a>(problems: &'a [Problem], path: &str) -> &'a Problem {
    problems
        .iter()
        .find(|p| p.path == path)
        .unwrap_or_else(|| panic!("no problem at {path}: {problems:#?}"))
}

const MINIMAL: &str = "\
backends:
  - name: b
    url: https://myres.openai.azure.com
apis:
  - name: a
    path: /openai
    backends: [b]
";

#[test]
fn minimal_config_gets_defaults() {
    let config = load(MINIMAL, &[]).unwrap();
    assert_eq!(config.service_name, "sluice");
    assert_eq!(
        config.server.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert!(config.server.threads >= 1 && config.server.threads <= 256);
    assert_eq!(config.server.max_request_body_bytes, 4 * 1024 * 1024);
    assert_eq!(config.server.timeouts.connect, Duration::from_secs(5));
    assert_eq!(config.server.timeouts.read, Duration::from_secs(300));
    assert_eq!(config.server.timeouts.write, Duration::from_secs(60));
    assert_eq!(config.server.timeouts, Timeouts::default());
    assert!(config.server.trusted_proxies.is_empty());
    assert_eq!(config.server.counters.max_keys, 1_000_000);
    assert_eq!(
        config.server.counters.purge_interval,
        Duration::from_secs(10)
    );
    assert_eq!(config.server.counters, Counters::default());
    assert_eq!(config.server.shutdown_timeout, Duration::from_secs(60));
    assert!(config.server.management.is_none());
    assert!(config.simulators.is_empty());
    assert!(config.subscriptions.is_empty());
    let backend = &config.backends[0];
    assert_eq!(
        backend.target,
        BackendTarget::Url(BackendUrl {
            tls: true,
            host: "myres.openai.azure.com".into(),
            port: 443,
            base_path: String::new(),
        })
    );
    assert!(backend.api_key.is_none());
    assert!(backend.deployments.is_empty());
    assert_eq!(backend.timeouts, config.server.timeouts);
    let api = &config.apis[0];
    assert_eq!(api.max_request_body_bytes, 4 * 1024 * 1024);
    assert_eq!(api.websocket_idle, std::time::Duration::from_secs(600));
    assert!(api.subscription.required);
    let headers: Vec<&str> = api
        .subscription
        .header_names
        .iter()
        .map(|h| h.as_str())
        .collect();
    assert_eq!(headers, ["api-key", "ocp-apim-subscription-key"]);
    assert_eq!(api.subscription.query_name, "subscription-key");
}

const FULL: &str = "\
service_name: contoso-gw
server:
  listen: 0.0.0.0:9090
  threads: 4
  max_request_body_bytes: 2097152
  timeouts: { connect_ms: 1000, read_ms: 2000, write_ms: 3000 }
  trusted_proxies: [10.0.0.0/8, 127.0.0.1, '::1', 'fd00::/8']
  counters: { max_keys: 5000, purge_interval_seconds: 3600 }
  shutdown_timeout_seconds: 0
  management: { listen: 127.0.0.1:0, max_label_values: 1 }
simulators:
  - name: eastus
    listen: 127.0.0.1:0
    region: East US
    api_key: {file: keys/backend.key}
    time_to_first_token_ms: 50
    per_token_ms: 5
    embeddings_ms: 7
    tokens_per_minute: 100000
    completion_tokens: 12
    embedding_dimensions: 256
    deployments:
      gpt-4o: { model: gpt-4o-2024-08-06, tokens_per_minute: 5000 }
      text-embedding-3-small:
  - name: westus
    region: West US
backends:
  - name: eastus
    simulator: eastus
    api_key: {file: keys/backend.key}
  - name: swedencentral
    url: https://sweden.openai.azure.com:8443/base/
    api_key: {env: FULL_SWEDEN_KEY}
    deployments: { gpt-4o: gpt-4o-prod }
    timeouts: { read_ms: 60000 }
subscriptions:
  - name: team-a
    primary_key: {file: keys/team-a.primary}
    secondary_key: {env: FULL_TEAM_A_SECONDARY}
    state: active
    apis: [azure-openai]
  - name: team-b
    primary_key: {env: FULL_TEAM_B_PRIMARY}
    state: suspended
apis:
  - name: azure-openai
    path: /openai
    backends: [eastus, swedencentral]
    max_request_body_bytes: 1048576
    websocket_idle_seconds: 30
    subscription:
      required: false
      header_names: [X-Key, Ocp-Apim-Subscription-Key]
      query_name: key
  - name: team-b
    path: /team-b/openai
    backends: [swedencentral]
";

#[test]
fn full_config_resolves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/backend.key"), "  backend-secret\n").unwrap();
    std::fs::write(dir.path().join("keys/team-a.primary"), "team-a-primary\n").unwrap();
    let env = env_from(&[
        ("FULL_SWEDEN_KEY", "sweden-key"),
        ("FULL_TEAM_A_SECONDARY", " team-a-secondary "),
        ("FULL_TEAM_B_PRIMARY", "team-b-primary"),
    ]);
    let config = load_str_with_env(FULL, "gateway.yaml", dir.path(), &env).unwrap();

    assert_eq!(config.service_name, "contoso-gw");
    assert_eq!(
        config.server.listen,
        "0.0.0.0:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.server.threads, 4);
    assert_eq!(config.server.max_request_body_bytes, 2 * 1024 * 1024);
    assert_eq!(config.server.timeouts.connect, Duration::from_millis(1000));
    assert_eq!(config.server.timeouts.read, Duration::from_millis(2000));
    assert_eq!(config.server.timeouts.write, Duration::from_millis(3000));
    let proxies: Vec<String> = config
        .server
        .trusted_proxies
        .iter()
        .map(IpNet::to_string)
        .collect();
    assert_eq!(
        proxies,
        ["10.0.0.0/8", "127.0.0.1/32", "::1/128", "fd00::/8"]
    );
    assert!(
        config.server.trusted_proxies[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap())
    );
    assert_eq!(
        config.server.counters,
        Counters {
            max_keys: 5000,
            purge_interval: Duration::from_secs(3600)
        }
    );
    assert_eq!(config.server.shutdown_timeout, Duration::ZERO);
    assert_eq!(
        config.server.management.as_ref().unwrap().max_label_values,
        1
    );

    let [east, west] = &config.simulators[..] else {
        panic!("two simulators expected")
    };
    assert_eq!(east.name, "eastus");
    assert_eq!(east.listen, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    assert_eq!(east.region, "East US");
    assert_eq!(east.api_key.as_ref().unwrap().expose(), "backend-secret");
    assert_eq!(east.time_to_first_token, Duration::from_millis(50));
    assert_eq!(east.per_token, Duration::from_millis(5));
    assert_eq!(east.embeddings_latency, Duration::from_millis(7));
    assert_eq!(east.tokens_per_minute, Some(100_000));
    assert_eq!(east.completion_tokens, 12);
    assert_eq!(east.embedding_dimensions, 256);
    assert_eq!(
        east.deployments["gpt-4o"],
        SimDeployment {
            model: Some("gpt-4o-2024-08-06".into()),
            tokens_per_minute: Some(5000)
        }
    );
    assert_eq!(
        east.deployments["text-embedding-3-small"],
        SimDeployment::default()
    );
    assert_eq!(west.listen, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    assert!(west.api_key.is_none());
    assert_eq!(west.time_to_first_token, Duration::ZERO);
    assert_eq!(west.tokens_per_minute, None);
    assert_eq!(west.completion_tokens, 24);
    assert_eq!(west.embedding_dimensions, 1536);
    assert!(west.deployments.is_empty());

    let [b_east, b_sweden] = &config.backends[..] else {
        panic!("two backends expected")
    };
    assert_eq!(b_east.target, BackendTarget::Simulator("eastus".into()));
    assert_eq!(b_east.api_key.as_ref().unwrap().expose(), "backend-secret");
    assert_eq!(b_east.timeouts, config.server.timeouts);
    assert_eq!(
        b_sweden.target,
        BackendTarget::Url(BackendUrl {
            tls: true,
            host: "sweden.openai.azure.com".into(),
            port: 8443,
            base_path: "/base".into(),
        })
    );
    assert_eq!(b_sweden.api_key.as_ref().unwrap().expose(), "sweden-key");
    assert_eq!(b_sweden.deployments["gpt-4o"], "gpt-4o-prod");
    assert_eq!(b_sweden.timeouts.connect, Duration::from_millis(1000));
    assert_eq!(b_sweden.timeouts.read, Duration::from_millis(60000));
    assert_eq!(b_sweden.timeouts.write, Duration::from_millis(3000));

    let [team_a, team_b] = &config.subscriptions[..] else {
        panic!("two subscriptions expected")
    };
    assert_eq!(team_a.name, "team-a");
    assert_eq!(team_a.primary_key.expose(), "team-a-primary");
    assert_eq!(
        team_a.secondary_key.as_ref().unwrap().expose(),
        "team-a-secondary"
    );
    assert!(team_a.active);
    assert_eq!(
        team_a.apis.as_deref(),
        Some(&["azure-openai".to_string()][..])
    );
    assert_eq!(team_b.primary_key.expose(), "team-b-primary");
    assert!(team_b.secondary_key.is_none());
    assert!(!team_b.active);
    assert_eq!(team_b.apis, None);

    let [api, api_b] = &config.apis[..] else {
        panic!("two APIs expected")
    };
    assert_eq!(api.name, "azure-openai");
    assert_eq!(api.path, "/openai");
    assert_eq!(api.backends, ["eastus", "swedencentral"]);
    assert_eq!(api.max_request_body_bytes, 1024 * 1024);
    assert_eq!(api.websocket_idle, std::time::Duration::from_secs(30));
    assert!(!api.subscription.required);
    let headers: Vec<&str> = api
        .subscription
        .header_names
        .iter()
        .map(|h| h.as_str())
        .collect();
    assert_eq!(headers, ["x-key", "ocp-apim-subscription-key"]);
    assert_eq!(api.subscription.query_name, "key");
    assert_eq!(api_b.path, "/team-b/openai");
    assert_eq!(api_b.max_request_body_bytes, 2 * 1024 * 1024);
    assert_eq!(api_b.websocket_idle, std::time::Duration::from_secs(600));
    assert!(api_b.subscription.required);

    // Nothing secret in the Debug output of the whole config.
    let debug = format!("{config:?}");
    for secret in [
        "backend-secret",
        "sweden-key",
        "team-a-primary",
        "team-a-secondary",
        "team-b-primary",
    ] {
        assert!(!debug.contains(secret), "{secret} leaked in Debug");
    }
}

#[test]
fn load_file_resolves_secret_files_next_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/team.key"), "from-file\n").unwrap();
    let text = format!(
        "{MINIMAL}subscriptions:\n  - name: team\n    primary_key: {{file: keys/team.key}}\n"
    );
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, text).unwrap();
    let config = load_file(&path).unwrap();
    assert_eq!(config.subscriptions[0].primary_key.expose(), "from-file");

    let missing = load_file(&dir.path().join("nope.yaml")).unwrap_err();
    assert_eq!(missing.problems.len(), 1);
    assert!(
        missing
            .to_string()
            .contains("cannot read the configuration file")
    );
}

#[test]
fn unknown_keys_at_every_level_are_all_reported() {
    let text = "\
service_name: x
bogus_top: 1
server:
  listn: 127.0.0.1:1
  timeouts:
    connect_ms: 5
    conect: 1
simulators:
  - name: sim
    region: R
    colour: blue
    api_key: {env: K1, value: nope}
    deployments:
      gpt-4o:
        model: m
        modle: n
backends:
  - name: b
    simulator: sim
    weight: 3
    timeouts:
      read_ms: 5
      reed_ms: 5
subscriptions:
  - name: s
    primary_key: {env: K2}
    tier: gold
apis:
  - name: a
    path: /openai
    backends: [b]
    routing: []
    subscription:
      header: api-key
";
    let found = problems(text);
    let expected = [
        ("bogus_top", 2),
        ("server.listn", 4),
        ("server.timeouts.conect", 7),
        ("simulators[0].colour", 11),
        ("simulators[0].api_key.value", 12),
        ("simulators[0].deployments.gpt-4o.modle", 16),
        ("backends[0].weight", 20),
        ("backends[0].timeouts.reed_ms", 23),
        ("subscriptions[0].tier", 27),
        ("apis[0].routing", 32),
        ("apis[0].subscription.header", 34),
    ];
    for (path, line) in expected {
        let problem = find(&found, path);
        assert_eq!(problem.line, Some(line), "line of {path}");
        assert!(problem.message.starts_with("unknown key"), "{problem:?}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    assert_eq!(
        find(&found, "server.listn").message,
        "unknown key 'listn' (did you mean 'listen'?)"
    );
    assert!(
        find(&found, "bogus_top")
            .message
            .contains("expected one of: service_name, server,")
    );
}

#[test]
fn many_semantic_problems_are_reported_together() {
    let text = "\
service_name: ''
server:
  listen: localhost:8080
  threads: 0
  max_request_body_bytes: 0
  timeouts: {connect_ms: 0}
simulators:
  - name: Sim
    region: R
    completion_tokens: 0
    embedding_dimensions: 9000
  - name: sim2
    region: R
  - name: sim2
    region: R
    listen: nope
    tokens_per_minute: 0
  -
backends:
  - name: both
    url: https://x.example
    simulator: sim2
  - name: neither
  - name: badurl
    url: ftp://x.example
  - name: query
    url: https://x.example/?a=1
  - name: dangling
    simulator: nowhere
  - name: both
    url: https://x.example
    deployments: {'bad name': x}
subscriptions:
  - name: s1
    primary_key: {env: K1}
    state: paused
    apis: [ghost]
  - name: s1
    primary_key: {env: K1}
  - name: s3
apis:
  - name: a
    path: /openai
    backends: [both, ghost, both]
    subscription:
      header_names: [api-key, 'bad header']
      query_name: 'a b'
  - name: a2
    path: /openai
    backends: []
    max_request_body_bytes: 0
    websocket_idle_seconds: 0
  - name: a3
    path: /openai/
    backends: [neither]
    subscription: {header_names: []}
  - name: a4
";
    let found = problems(text);
    let expected: BTreeSet<String> = [
        "service_name",
        "server.listen",
        "server.threads",
        "server.max_request_body_bytes",
        "server.timeouts.connect_ms",
        "simulators[0].name",
        "simulators[0].completion_tokens",
        "simulators[0].embedding_dimensions",
        "simulators[2].name",
        "simulators[2].listen",
        "simulators[2].tokens_per_minute",
        "simulators[3]",
        "backends[0]",
        "backends[1]",
        "backends[2].url",
        "backends[3].url",
        "backends[4].simulator",
        "backends[5].name",
        "backends[5].deployments.bad name",
        "subscriptions[0].state",
        "subscriptions[0].apis[0]",
        "subscriptions[1].name",
        "subscriptions[1].primary_key",
        "subscriptions[2].primary_key",
        "apis[0].backends[1]",
        "apis[0].backends[2]",
        "apis[0].subscription.header_names[1]",
        "apis[0].subscription.query_name",
        "apis[1].path",
        "apis[1].backends",
        "apis[1].max_request_body_bytes",
        "apis[1].websocket_idle_seconds",
        "apis[2].path",
        "apis[2].subscription.header_names",
        "apis[3].path",
        "apis[3].backends",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths(&found), expected, "{found:#?}");

    assert_eq!(find(&found, "server.threads").line, Some(4));
    assert_eq!(find(&found, "simulators[3]").line, Some(18));
    assert_eq!(find(&found, "backends[1]").line, Some(23));
    assert_eq!(find(&found, "apis[3].path").line, Some(57));
    assert!(
        find(&found, "simulators[2].name")
            .message
            .contains("simulators[1]")
    );
    assert!(
        find(&found, "backends[5].name")
            .message
            .contains("backends[0]")
    );
    assert!(find(&found, "apis[1].path").message.contains("apis[0]"));
    assert_eq!(
        find(&found, "apis[0].backends[1]").message,
        "unknown backend 'ghost' (not in backends)"
    );
    // Duplicate keys name subscriptions, never the key.
    let dup = find(&found, "subscriptions[1].primary_key");
    assert!(dup.message.contains("subscriptions[0].primary_key") && dup.message.contains("'s1'"));
    assert!(!dup.message.contains("key-one"));
    // Sorted by line.
    let lines: Vec<usize> = found.iter().filter_map(|p| p.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn missing_top_level_sections() {
    let found = problems("service_name: x\n");
    assert_eq!(
        found,
        [
            Problem {
                path: "backends".into(),
                line: None,
                message: "at least one backend is required".into()
            },
            Problem {
                path: "apis".into(),
                line: None,
                message: "at least one API is required".into()
            },
        ]
    );
    assert_eq!(paths(&problems("")), paths(&found));
}

#[test]
fn type_errors_give_path_and_line_and_do_not_hide_others() {
    let text = "\
server:
  threads: many
  timeouts: {read_ms: -5}
backends:
  - name: b
    url: [not, a, string]
  - name: c
    url: https://c.example
    deployments: {gpt-4o: {x: 1}}
apis:
  - name: a
    path: /openai
    backends: [b, {c: 1}]
    subscription: {required: maybe, header_names: api-key}
  - just a string
  - name: a
    path: /openai
    backends: [c]
    bogus: 1
";
    let found = problems(text);
    let at = |path: &str| find(&found, path);
    assert_eq!(at("server.threads").line, Some(2));
    assert_eq!(
        at("server.threads").message,
        "invalid type: string \"many\", expected a non-negative integer"
    );
    assert_eq!(at("server.timeouts.read_ms").line, Some(3));
    assert_eq!(at("backends[0].url").line, Some(6));
    assert_eq!(at("backends[1].deployments.gpt-4o").line, Some(9));
    assert_eq!(at("apis[0].backends[1]").line, Some(13));
    assert_eq!(at("apis[0].subscription.required").line, Some(14));
    assert_eq!(at("apis[0].subscription.header_names").line, Some(14));
    assert_eq!(at("apis[1]").line, Some(15));
    assert_eq!(at("apis[2].name").line, Some(16));
    assert_eq!(at("apis[2].path").line, Some(17));
    assert_eq!(at("apis[2].bogus").line, Some(19));
    // A removed value is not also reported as missing.
    assert_eq!(
        paths(&found),
        [
            "server.threads",
            "server.timeouts.read_ms",
            "backends[0].url",
            "backends[1].deployments.gpt-4o",
            "apis[0].backends[1]",
            "apis[0].subscription.required",
            "apis[0].subscription.header_names",
            "apis[1]",
            "apis[2].name",
            "apis[2].path",
            "apis[2].bogus",
        ]
        .into_iter()
        .map(String::from)
        .collect::<BTreeSet<_>>(),
        "{found:#?}"
    );
}

#[test]
fn syntax_errors_have_a_line() {
    let found = problems("server:\n  listen: [1\nbackends: x\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].line.is_some());
    assert_eq!(found[0].path, "");
    let found = problems("- a\n- b\n");
    assert_eq!(found.len(), 1);
    assert!(found[0].message.contains("mapping"));
    let found = problems("a: 1\na: 2\n");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].line, Some(2));
    assert_eq!(found[0].path, "a");
}

#[test]
fn anchors_and_merge_keys_work() {
    let text = "\
x-timeouts: &t {connect_ms: 10, read_ms: 20}
backends:
  - name: b
    url: https://b.example
    timeouts: *t
apis:
  - name: a
    path: /openai
    backends: [b]
";
    // The helper key is unknown, as is every key not in the schema.
    let found = problems(text);
    assert_eq!(paths(&found), ["x-timeouts".to_string()].into());
    let text = "\
backends:
  - &base
    name: b
    url: https://b.example
  - <<: *base
    name: c
apis:
  - {name: a, path: /openai, backends: [b, c]}
";
    let config = load(text, &[]).unwrap();
    assert_eq!(config.backends[1].name, "c");
    assert_eq!(config.backends[1].target, config.backends[0].target);
}

#[test]
fn the_repository_gateway_yaml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gateway.yaml");
    let config = load_file(&path).unwrap_or_else(|errors| panic!("{errors}"));
    assert!(!config.apis.is_empty());
    assert_eq!(config.simulators.len(), 3);
    assert_eq!(config.backends.len(), 3);
}

#[test]
fn the_first_header_name_is_kept_as_written_for_the_challenge() {
    let text = "backends: [{name: b, url: 'http://127.0.0.1:1'}]\n\
                apis:\n  - name: a\n    path: /openai\n    backends: [b]\n    subscription: {header_names: [Ocp-Apim-Subscription-Key, api-key]}\n";
    let cfg = load(text, &[]).unwrap_or_else(|e| panic!("{e}"));
    let s = &cfg.apis[0].subscription;
    assert_eq!(s.challenge_name, "Ocp-Apim-Subscription-Key");
    assert_eq!(s.header_names[0].as_str(), "ocp-apim-subscription-key");
    let text = "backends: [{name: b, url: 'http://127.0.0.1:1'}]\napis: [{name: a, path: /openai, backends: [b]}]\n";
    assert_eq!(
        load(text, &[]).unwrap_or_else(|e| panic!("{e}")).apis[0]
            .subscription
            .challenge_name,
        "api-key"
    );
}

#[test]
fn backend_timeouts_can_set_what_the_server_leaves_unset() {
    let text = "\
backends:
  - name: b
    url: https://b.example
    timeouts: { write_ms: 30000 }
  - name: c
    url: https://c.example
apis:
  - {name: a, path: /openai, backends: [b, c]}
";
    let config = load(text, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.backends[0].timeouts,
        Timeouts {
            write: Duration::from_secs(30),
            ..Timeouts::default()
        }
    );
    assert_eq!(config.backends[1].timeouts, Timeouts::default());
}

#[test]
fn trusted_proxies_in_block_form_and_empty() {
    let text = format!(
        "server:\n  trusted_proxies:\n    - 192.168.0.0/16\n    - ::1\n    - 2001:db8::/32\n{MINIMAL}"
    );
    let config = load(&text, &[]).unwrap_or_else(|e| panic!("{e}"));
    let proxies: Vec<String> = config
        .server
        .trusted_proxies
        .iter()
        .map(IpNet::to_string)
        .collect();
    assert_eq!(proxies, ["192.168.0.0/16", "::1/128", "2001:db8::/32"]);
    // In flow style an IPv6 address starting with ':' must be quoted (YAML
    // syntax); the docs say so.
    let config = load(
        &format!("server: {{trusted_proxies: ['::1', 10.0.0.0/8]}}\n{MINIMAL}"),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.trusted_proxies.len(), 2);
    let found = problems(&format!("server: {{trusted_proxies: [::1]}}\n{MINIMAL}"));
    assert_eq!(found.len(), 1, "{found:#?}");
    let config = load(&format!("server: {{trusted_proxies: []}}\n{MINIMAL}"), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.server.trusted_proxies.is_empty());
    // `counters:` with no value means all defaults.
    let config =
        load(&format!("server:\n  counters:\n{MINIMAL}"), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.counters, Counters::default());
}

#[test]
fn new_server_settings_are_checked_together() {
    let text = "\
server:
  timeouts: { read_ms: 0, write_ms: 0 }
  trusted_proxies:
    - 10.0.0.0/8
    - localhost
    - 10.0.0.1/8
    - 10.0.0.0/33
    - 10.0.0.0/8
    -
  counters: { max_keys: 0, purge_interval_seconds: 3601 }
  shutdown_timeout_seconds: 3601
  management: { listen: 127.0.0.1:0, max_label_values: 0 }
backends:
  - name: b
    url: https://b.example
    timeouts: { read_ms: 0, write_ms: 0, connect_ms: 0 }
apis:
  - {name: a, path: /openai, backends: [b]}
";
    let found = problems(text);
    let expected = [
        ("server.timeouts.read_ms", 2),
        ("server.timeouts.write_ms", 2),
        ("server.trusted_proxies[1]", 5),
        ("server.trusted_proxies[2]", 6),
        ("server.trusted_proxies[3]", 7),
        ("server.trusted_proxies[4]", 8),
        ("server.trusted_proxies[5]", 9),
        ("server.counters.max_keys", 10),
        ("server.counters.purge_interval_seconds", 10),
        ("server.shutdown_timeout_seconds", 11),
        ("server.management.max_label_values", 12),
        ("backends[0].timeouts.read_ms", 16),
        ("backends[0].timeouts.write_ms", 16),
        ("backends[0].timeouts.connect_ms", 16),
    ];
    for (path, line) in expected {
        assert_eq!(find(&found, path).line, Some(line), "line of {path}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert_eq!(at("server.timeouts.read_ms"), "must be at least 1");
    assert_eq!(at("backends[0].timeouts.write_ms"), "must be at least 1");
    assert!(
        at("server.trusted_proxies[1]").contains("'localhost' is not an IP address or CIDR"),
        "{}",
        at("server.trusted_proxies[1]")
    );
    assert!(at("server.trusted_proxies[2]").contains("10.0.0.0/8"));
    assert!(at("server.trusted_proxies[3]").contains("not an IP address or CIDR"));
    assert_eq!(
        at("server.trusted_proxies[4]"),
        "'10.0.0.0/8' is listed twice (also at server.trusted_proxies[0])"
    );
    assert_eq!(at("server.trusted_proxies[5]"), "empty entry");
    assert_eq!(at("server.counters.max_keys"), "must be at least 1");
    assert_eq!(
        at("server.counters.purge_interval_seconds"),
        "must be between 1 and 3600"
    );
    assert_eq!(
        at("server.shutdown_timeout_seconds"),
        "must be between 0 and 3600"
    );
    assert_eq!(
        at("server.management.max_label_values"),
        "must be at least 1"
    );

    let found = problems(&format!(
        "server:\n  counters: {{purge_interval_seconds: 0}}\n{MINIMAL}"
    ));
    assert_eq!(
        paths(&found),
        ["server.counters.purge_interval_seconds".to_string()].into()
    );
}

#[test]
fn new_server_settings_type_errors_and_unknown_keys() {
    let text = "\
server:
  trusted_proxies: 10.0.0.0/8
  counters: { max_keys: -1, purge_every: 5 }
  shutdown_timeout_seconds: soon
  timeouts: { first_byte_ms: 5, read_ms: [1] }
  management: { listen: 127.0.0.1:0, max_label_value: 5 }
backends:
  - name: b
    url: https://b.example
    timeouts: { raed_ms: 1 }
apis:
  - {name: a, path: /openai, backends: [b]}
";
    let found = problems(text);
    let expected = [
        ("server.trusted_proxies", 2),
        ("server.counters.max_keys", 3),
        ("server.counters.purge_every", 3),
        ("server.shutdown_timeout_seconds", 4),
        ("server.timeouts.first_byte_ms", 5),
        ("server.timeouts.read_ms", 5),
        ("server.management.max_label_value", 6),
        ("backends[0].timeouts.raed_ms", 10),
    ];
    for (path, line) in expected {
        assert_eq!(find(&found, path).line, Some(line), "line of {path}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert!(at("server.trusted_proxies").contains("expected a sequence"));
    assert!(at("server.counters.max_keys").contains("expected a non-negative integer"));
    assert_eq!(
        at("server.counters.purge_every"),
        "unknown key 'purge_every' (expected one of: max_keys, purge_interval_seconds)"
    );
    assert_eq!(
        at("server.timeouts.first_byte_ms"),
        "unknown key 'first_byte_ms' (expected one of: connect_ms, read_ms, write_ms)"
    );
    assert_eq!(
        at("server.management.max_label_value"),
        "unknown key 'max_label_value' (did you mean 'max_label_values'?)"
    );
    assert_eq!(
        at("backends[0].timeouts.raed_ms"),
        "unknown key 'raed_ms' (did you mean 'read_ms'?)"
    );
}

#[test]
fn affinity_and_models_are_checked() {
    let text = "\
server:
  affinity: { max_ids: 0, ttl_seconds: 31536001 }
backends:
  - name: b
    url: https://b.example
    deployments: { gpt-4o: gpt-4o-b }
apis:
  - name: a
    path: /openai
    backends: [b]
    models:
      - gpt-4o
      - ''
      - a/b
      - gpt-4o
      -
";
    let found = problems(text);
    let expected = [
        ("server.affinity.max_ids", 2),
        ("server.affinity.ttl_seconds", 2),
        ("apis[0].models[1]", 13),
        ("apis[0].models[2]", 14),
        ("apis[0].models[3]", 15),
        ("apis[0].models[4]", 16),
    ];
    for (path, line) in expected {
        assert_eq!(find(&found, path).line, Some(line), "line of {path}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    let at = |path: &str| find(&found, path).message.clone();
    assert_eq!(at("server.affinity.max_ids"), "must be at least 1");
    assert_eq!(
        at("server.affinity.ttl_seconds"),
        "must be between 1 and 31536000"
    );
    assert!(at("apis[0].models[1]").contains("deployment name"));
    assert!(at("apis[0].models[2]").contains("without '/'"));
    assert_eq!(
        at("apis[0].models[3]"),
        "'gpt-4o' is listed twice (also at apis[0].models[0])"
    );
    assert_eq!(at("apis[0].models[4]"), "empty entry");
}

#[test]
fn affinity_defaults_and_the_models_an_api_lists() {
    let dir = std::env::temp_dir();
    let text = "\
simulators:
  - name: s
    region: Somewhere
    deployments: { sim-only: {model: m} }
backends:
  - {name: b, url: 'https://b.example', deployments: {gpt-4o: gpt-4o-b}}
  - {name: s, simulator: s}
  - {name: other, url: 'https://o.example', deployments: {elsewhere: e}}
pools:
  - {name: emb, backends: [{backend: b}]}
apis:
  - {name: a, path: /openai, backends: [b, s], deployment_pools: {text-embedding-3-small: emb}}
  - {name: listed, path: /x/openai, backends: [b], models: [z, a]}
";
    let cfg = sluice_config::load_str(text, "t.yaml", &dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.server.affinity,
        sluice_config::AffinitySettings::default()
    );
    assert_eq!(cfg.server.affinity.max_ids, 100_000);
    assert_eq!(cfg.server.affinity.ttl.as_secs(), 30 * 24 * 3600);
    assert_eq!(
        cfg.api_models(&cfg.apis[0]),
        ["gpt-4o", "sim-only", "text-embedding-3-small"]
    );
    assert_eq!(
        cfg.api_models(&cfg.apis[1]),
        ["z", "a"],
        "as listed, in order"
    );
    let cfg = sluice_config::load_str(
        "server: {affinity: {max_ids: 7, ttl_seconds: 60}}\nbackends: [{name: b, url: 'https://b.example'}]\napis: [{name: a, path: /openai, backends: [b]}]\n",
        "t.yaml",
        &dir,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.server.affinity.max_ids, 7);
    assert_eq!(cfg.server.affinity.ttl.as_secs(), 60);
    assert!(cfg.api_models(&cfg.apis[0]).is_empty());
}
