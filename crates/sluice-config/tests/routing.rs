//! Region routing keys: backend regions and circuit breakers, pools, and an
//! API's pool, deployment pools and failover settings.

use std::path::Path;
use std::time::Duration;

use sluice_config::{BreakerRule, Config, Failover, Pool, PoolMember, Problem, load_str};

fn load(text: &str) -> Result<Config, Vec<Problem>> {
    load_str(text, "gateway.yaml", Path::new("/etc/sluice")).map_err(|e| e.problems)
}

fn problems(text: &str) -> Vec<Problem> {
    match load(text) {
        Ok(_) => panic!("expected problems"),
        Err(p) => p,
    }
}

fn message<'a>(problems: &'a [Problem], path: &str) -> &'a str {
    problems
        .iter()
        .find(|p| p.path == path)
        .map(|p| p.message.as_str())
        .unwrap_or_else(|| panic!("no problem at {path}: {problems:#?}"))
}

const BACKENDS: &str = "
simulators:
  - name: east
    region: East US
backends:
  - name: east
    simulator: east
  - name: west
    url: https://west.example.com
  - name: ptu
    url: https://ptu.example.com
    region: Sweden Central
";

#[test]
fn shorthand_backends_become_a_pool_of_equal_weights() {
    let cfg = load(&format!(
        "{BACKENDS}apis:\n  - name: a\n    path: /openai\n    backends: [east, west]\n"
    ))
    .unwrap();
    let api = &cfg.apis[0];
    assert_eq!(api.pool, "api/a");
    assert_eq!(api.backends, ["east", "west"]);
    assert_eq!(api.failover, Failover::default());
    assert_eq!(api.failover.timeout, Duration::from_secs(120));
    assert_eq!(api.failover.when_exhausted, 429);
    assert_eq!(
        cfg.pools,
        [Pool {
            name: "api/a".into(),
            members: vec![
                PoolMember {
                    backend: "east".into(),
                    priority: 1,
                    weight: 1
                },
                PoolMember {
                    backend: "west".into(),
                    priority: 1,
                    weight: 1
                },
            ],
            steering: true,
            headroom_max_age: Duration::from_secs(60),
        }]
    );
    // Regions: the simulator's, the name, or as configured.
    let regions: Vec<&str> = cfg.backends.iter().map(|b| b.region.as_str()).collect();
    assert_eq!(regions, ["East US", "west", "Sweden Central"]);
    // Breakers: the defaults.
    assert_eq!(cfg.backends[0].breaker_rules, BreakerRule::defaults());
    assert_eq!(cfg.server.body_buffer_bytes, 256 * 1024 * 1024);
}

#[test]
fn pools_with_priorities_weights_and_deployment_pools() {
    let cfg = load(&format!(
        "{BACKENDS}server:\n  body_buffer_bytes: 1000\n\
pools:
  - name: global
    steering: false
    headroom_max_age_seconds: 30
    backends:
      - {{backend: ptu, priority: 0}}
      - {{backend: east, priority: 2, weight: 3}}
      - {{backend: west, priority: 2}}
  - name: embed
    backends: [{{backend: west}}]
apis:
  - name: a
    path: /openai
    pool: global
    deployment_pools: {{text-embedding-3-small: embed}}
    failover: {{max_attempts: 2, timeout_ms: 5000, when_exhausted: 503}}
"
    ))
    .unwrap();
    assert_eq!(cfg.server.body_buffer_bytes, 1000);
    let api = &cfg.apis[0];
    assert_eq!(api.pool, "global");
    assert_eq!(api.backends, ["ptu", "east", "west"]);
    assert_eq!(api.deployment_pools["text-embedding-3-small"], "embed");
    assert_eq!(
        api.failover,
        Failover {
            max_attempts: Some(2),
            timeout: Duration::from_millis(5000),
            when_exhausted: 503
        }
    );
    let global = &cfg.pools[0];
    assert!(!global.steering);
    assert_eq!(global.headroom_max_age, Duration::from_secs(30));
    let members: Vec<(&str, u32, u32)> = global
        .members
        .iter()
        .map(|m| (m.backend.as_str(), m.priority, m.weight))
        .collect();
    assert_eq!(members, [("ptu", 0, 1), ("east", 2, 3), ("west", 2, 1)]);
    assert_eq!(cfg.pools.len(), 2, "no implicit pool for an API naming one");
}

#[test]
fn circuit_breaker_rules() {
    let cfg = load(&format!(
        "{BACKENDS}  - name: custom
    url: https://c.example.com
    circuit_breaker:
      rules:
        - name: busy
          status_codes: [429, '500-503']
          errors: [connection, timeout]
          count: 2
          interval_seconds: 30
          trip_duration_seconds: 7
          accept_retry_after: false
          max_retry_after_seconds: 9
  - name: never
    url: https://n.example.com
    circuit_breaker: {{rules: []}}
apis:\n  - name: a\n    path: /openai\n    backends: [custom, never]\n"
    ))
    .unwrap();
    let custom = cfg.backends.iter().find(|b| b.name == "custom").unwrap();
    assert_eq!(
        custom.breaker_rules,
        [BreakerRule {
            name: "busy".into(),
            statuses: vec![429..=429, 500..=503],
            connection_errors: true,
            timeouts: true,
            count: 2,
            interval: Duration::from_secs(30),
            trip_duration: Duration::from_secs(7),
            accept_retry_after: false,
            max_retry_after: Duration::from_secs(9),
        }]
    );
    let never = cfg.backends.iter().find(|b| b.name == "never").unwrap();
    assert!(never.breaker_rules.is_empty());
}

#[test]
fn every_routing_problem_is_reported_with_its_path() {
    let found = problems(&format!(
        "{BACKENDS}  - name: bad
    url: https://b.example.com
    region: ''
    circuit_breaker:
      rules:
        - name: r
          status_codes: [99, '5xx', '599-500']
          errors: [dns]
          count: 0
          interval_seconds: 0
          trip_duration_seconds: 0
          max_retry_after_seconds: 0
        - name: empty
        - {{name: r, status_codes: [500]}}
      extra: 1
pools:
  - name: p
    backends:
      - {{backend: nope}}
      - {{backend: east, priority: 101, weight: 0}}
      - {{backend: east}}
      - {{priority: 1}}
    headroom_max_age_seconds: 0
    colour: blue
  - name: empty
    backends: []
  - name: p
    backends: [{{backend: west}}]
apis:
  - name: a
    path: /openai
    pool: missing
    backends: [east]
  - name: b
    path: /b/openai
  - name: c
    path: /c/openai
    pool: p
    deployment_pools: {{gpt-4o: nowhere}}
    failover: {{max_attempts: 0, timeout_ms: 0, when_exhausted: 500, retries: 2}}
  - name: d
    path: /d/openai
    backends: [nope, east, east]
"
    ));
    let r = "backends[3].circuit_breaker.rules";
    assert_eq!(message(&found, "backends[3].region"), "must not be empty");
    assert!(message(&found, &format!("{r}[0].status_codes[0]")).contains("not an HTTP status"));
    assert!(
        message(&found, &format!("{r}[0].status_codes[1]")).contains("not a status or a range")
    );
    assert!(message(&found, &format!("{r}[0].status_codes[2]")).contains("range is empty"));
    assert!(message(&found, &format!("{r}[0].errors[0]")).contains("'connection' or 'timeout'"));
    for key in [
        "count",
        "interval_seconds",
        "trip_duration_seconds",
        "max_retry_after_seconds",
    ] {
        assert!(
            message(&found, &format!("{r}[0].{key}")).contains("between"),
            "{key}"
        );
    }
    assert!(message(&found, &format!("{r}[1]")).contains("matches nothing"));
    assert!(message(&found, &format!("{r}[2].name")).contains("duplicate name"));
    assert!(message(&found, "backends[3].circuit_breaker.extra").contains("unknown key"));
    assert!(message(&found, "pools[0].backends[0].backend").contains("unknown backend 'nope'"));
    assert!(message(&found, "pools[0].backends[1].priority").contains("between 0 and 100"));
    assert!(message(&found, "pools[0].backends[1].weight").contains("between 1 and 1000"));
    assert!(message(&found, "pools[0].backends[2].backend").contains("listed twice"));
    assert_eq!(
        message(&found, "pools[0].backends[3].backend"),
        "is required"
    );
    assert!(message(&found, "pools[0].headroom_max_age_seconds").contains("between 1 and 3600"));
    assert!(message(&found, "pools[0].colour").contains("unknown key"));
    assert!(message(&found, "pools[1].backends").contains("at least one backend"));
    assert!(message(&found, "pools[2].name").contains("duplicate name"));
    assert!(message(&found, "apis[0]").contains("either 'pool' or 'backends'"));
    assert!(message(&found, "apis[1].backends").contains("is required"));
    assert!(message(&found, "apis[2].deployment_pools.gpt-4o").contains("unknown pool 'nowhere'"));
    assert!(message(&found, "apis[2].failover.max_attempts").contains("between 1 and 30"));
    assert!(message(&found, "apis[2].failover.timeout_ms").contains("between"));
    assert!(message(&found, "apis[2].failover.when_exhausted").contains("use 429 or 503"));
    assert!(message(&found, "apis[2].failover.retries").contains("unknown key"));
    assert!(message(&found, "apis[3].backends[0]").contains("unknown backend 'nope'"));
    assert!(message(&found, "apis[3].backends[2]").contains("listed twice"));
}

#[test]
fn an_unknown_pool_is_named() {
    let found = problems(&format!(
        "{BACKENDS}apis:\n  - name: a\n    path: /openai\n    pool: ghost\n"
    ));
    assert_eq!(
        message(&found, "apis[0].pool"),
        "unknown pool 'ghost' (not in pools)"
    );
}

#[test]
fn the_worked_example_in_the_routing_docs_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("docs/routing.md")).unwrap();
    let start = doc.find("```yaml\n").expect("yaml block") + "```yaml\n".len();
    let example = &doc[start..start + doc[start..].find("```").expect("block end")];
    let cfg = load_str(example, "routing.md", &root).unwrap_or_else(|e| panic!("{e}"));
    let api = &cfg.apis[0];
    assert_eq!(api.pool, "chat");
    assert_eq!(api.deployment_pools["text-embedding-3-large"], "embeddings");
    assert_eq!(api.failover.max_attempts, Some(3));
    let chat = cfg.pools.iter().find(|p| p.name == "chat").unwrap();
    assert_eq!(chat.members.len(), 3);
    let sweden = cfg
        .backends
        .iter()
        .find(|b| b.name == "paygo-sweden")
        .unwrap();
    assert_eq!(sweden.breaker_rules.len(), 2);
    assert_eq!(sweden.deployments["gpt-4o"], "gpt-4o-prod-swc");
}

#[test]
fn the_embedded_default_routes_through_a_pool() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cfg =
        sluice_config::load_file(&root.join("gateway.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.apis[0].pool, "global");
    assert_eq!(cfg.pools[0].members.len(), 3);
}

#[test]
fn operator_tokens_open_the_management_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("op.token"), "operator-token-0123456789\n").unwrap();
    let text = format!(
        "server:\n  management:\n    listen: 127.0.0.1:0\n    operator_tokens: [{{file: op.token}}]\n{BACKENDS}apis:\n  - name: a\n    path: /openai\n    backends: [east]\n"
    );
    let cfg = load_str(&text, "gateway.yaml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let m = cfg.server.management.unwrap();
    assert_eq!(m.operator_tokens.len(), 1);
    assert_eq!(m.operator_tokens[0].expose(), "operator-token-0123456789");
    std::fs::write(dir.path().join("short.token"), "short").unwrap();
    let text = text.replace("[{file: op.token}]", "[{file: short.token}, ~]");
    let found = load_str(&text, "gateway.yaml", dir.path())
        .unwrap_err()
        .problems;
    assert!(
        message(&found, "server.management.operator_tokens[0]").contains("at least 16"),
        "{found:?}"
    );
    assert_eq!(
        message(&found, "server.management.operator_tokens[1]"),
        "empty entry"
    );
    // The token's value never appears in a problem.
    assert!(found.iter().all(|p| !p.message.contains("short")));
}

#[test]
fn a_debug_signing_key_must_be_long_enough() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k"), "too-short").unwrap();
    let text = format!(
        "server:\n  management:\n    listen: 127.0.0.1:0\n    debug_signing_key: {{file: k}}\n{BACKENDS}apis:\n  - name: a\n    path: /openai\n    backends: [east]\n"
    );
    let found = load_str(&text, "gateway.yaml", dir.path())
        .unwrap_err()
        .problems;
    assert!(message(&found, "server.management.debug_signing_key").contains("at least 32"));
    std::fs::write(dir.path().join("k"), "a-signing-key-long-enough-0123456789").unwrap();
    let cfg = load_str(&text, "gateway.yaml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.server.management.unwrap().debug_signing_key.is_some());
}

#[test]
fn tracing_settings_have_defaults_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "server:\n  management:\n    listen: 127.0.0.1:0\n{BACKENDS}apis:\n  - name: a\n    path: /openai\n    backends: [east]\n"
    );
    let cfg = load_str(&base, "gateway.yaml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let t = cfg.server.management.unwrap().tracing;
    assert_eq!(t, sluice_config::Tracing::default());
    assert_eq!(
        (t.max_traces, t.ttl.as_secs(), t.body_bytes, t.summaries),
        (1000, 3600, 0, 10_000)
    );
    let text = base.replace(
        "listen: 127.0.0.1:0\n",
        "listen: 127.0.0.1:0\n    tracing:\n      max_traces: 5\n      max_bytes: 1048576\n      ttl_seconds: 120\n      body_bytes: 512\n      redact_headers: [X-Secret]\n      summaries: 0\n",
    );
    let t = load_str(&text, "gateway.yaml", dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .server
        .management
        .unwrap()
        .tracing;
    assert_eq!(
        (
            t.max_traces,
            t.max_bytes,
            t.ttl.as_secs(),
            t.body_bytes,
            t.summaries
        ),
        (5, 1_048_576, 120, 512, 0)
    );
    assert_eq!(t.redact_headers[0].as_str(), "x-secret");
    let bad = base.replace(
        "listen: 127.0.0.1:0\n",
        "listen: 127.0.0.1:0\n    tracing:\n      max_traces: 0\n      max_bytes: 10\n      ttl_seconds: 5\n      body_bytes: 2000000\n      redact_headers: ['bad header', x, x]\n      summaries: 2000000\n      colour: red\n",
    );
    let found = load_str(&bad, "gateway.yaml", dir.path())
        .unwrap_err()
        .problems;
    for key in [
        "max_traces",
        "max_bytes",
        "ttl_seconds",
        "body_bytes",
        "summaries",
        "redact_headers[0]",
        "redact_headers[2]",
        "colour",
    ] {
        let path = format!("server.management.tracing.{key}");
        assert!(!message(&found, &path).is_empty(), "{path}: {found:?}");
    }
    // Bodies that could never fit the store.
    let small = base.replace(
        "listen: 127.0.0.1:0\n",
        "listen: 127.0.0.1:0\n    tracing: {max_bytes: 100000, body_bytes: 65536}\n",
    );
    let found = load_str(&small, "gateway.yaml", dir.path())
        .unwrap_err()
        .problems;
    assert!(
        message(&found, "server.management.tracing.max_bytes").contains("at least 196608"),
        "{found:?}"
    );
    // A header redacted from traces is a credential: never a metric label.
    let label = base
        .replace(
            "listen: 127.0.0.1:0\n",
            "listen: 127.0.0.1:0\n    tracing: {redact_headers: [x-team-secret]}\n",
        )
        .replace(
            "    backends: [east]\n",
            "    backends: [east]\n    policies:\n      - emit_token_metric: {dimensions: ['header:x-team-secret']}\n",
        );
    let found = load_str(&label, "gateway.yaml", dir.path())
        .unwrap_err()
        .problems;
    assert!(
        message(
            &found,
            "apis[0].policies[0].emit_token_metric.dimensions[0]"
        )
        .contains("redacted from traces"),
        "{found:?}"
    );
}

#[test]
fn entra_id_operators_need_a_role() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "server:\n  management:\n    listen: 127.0.0.1:0\n    entra_id:\n      jwks_url: https://login.example/keys\n      issuers: [https://sts.example/]\n      audiences: [api://sluice-ops]\nROLES{BACKENDS}apis:\n  - name: a\n    path: /openai\n    backends: [east]\n"
    );
    let found = load_str(&base.replace("ROLES", ""), "gateway.yaml", dir.path())
        .unwrap_err()
        .problems;
    assert!(
        message(&found, "server.management.entra_id.required_roles").contains("at least one"),
        "{found:?}"
    );
    let text = base.replace("ROLES", "      required_roles: [Sluice.Operator]\n");
    let cfg = load_str(&text, "gateway.yaml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let e = cfg.server.management.unwrap().entra_id.unwrap();
    assert_eq!(e.required_roles, ["Sluice.Operator"]);
    assert_eq!(e.audiences, ["api://sluice-ops"]);
    let found = load_str(
        &text.replace("      jwks_url: https://login.example/keys\n", ""),
        "gateway.yaml",
        dir.path(),
    )
    .unwrap_err()
    .problems;
    assert!(!message(&found, "server.management.entra_id").is_empty());
}
