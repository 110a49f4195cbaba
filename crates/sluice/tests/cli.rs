//! The `sluice` binary as users run it: `check`, `run` and `sim` as child
//! processes on 127.0.0.1 with free ports, stopped by PID.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Proc, addr_of, post, spawn_sluice, wait_connect};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn spawn_until(args: &[&str], dir: &Path, prefix: &str) -> (Proc, String) {
    spawn_sluice(BIN, args, dir, &[], prefix)
}

const GOOD: &str = r#"
server:
  listen: 127.0.0.1:0
  threads: 1
simulators:
  - name: eastus
    region: East US
    api_key: {file: backend.key}
  - name: westus
    region: West US
    api_key: {file: backend.key}
backends:
  - name: eastus
    simulator: eastus
    api_key: {file: backend.key}
  - name: westus
    simulator: westus
    api_key: {file: backend.key}
subscriptions:
  - name: team-a
    primary_key: {file: team-a.key}
apis:
  - name: azure-openai
    path: /openai
    backends: [eastus, westus]
"#;

fn good_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("gateway.yaml"), GOOD).expect("write");
    std::fs::write(dir.path().join("backend.key"), "sim-backend-key\n").expect("write");
    std::fs::write(dir.path().join("team-a.key"), "team-a-key\n").expect("write");
    dir
}

#[test]
fn check_accepts_a_good_config_and_the_repo_default() {
    let dir = good_dir();
    let out = Command::new(BIN)
        .args(["check", "-c", "gateway.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(BIN)
        .args(["check", "-c", "gateway.yaml"])
        .current_dir(&repo)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_compose_config_is_valid() {
    // docker-compose.yml mounts demo/keys beside it, as the repository root has them.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(repo.join("deploy/compose/gateway.yaml")).expect("read");
    let cfg = sluice_config::load_str(&text, "deploy/compose/gateway.yaml", &repo)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.backends.len(), 3);
    let compose = std::fs::read_to_string(repo.join("docker-compose.yml")).expect("read");
    for b in &cfg.backends {
        assert!(
            compose.contains(&format!("sim-{}:", b.name)),
            "service for {}",
            b.name
        );
    }
}

#[test]
fn check_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = r#"
server:
  listen: nowhere
  colour: blue
backends:
  - name: a
    url: ftp://x
    bogus: 1
  - name: a
    simulator: missing
subscriptions:
  - name: s
    primary_key: {env: SLUICE_TEST_SURELY_UNSET_VAR}
apis:
  - name: api
    path: /openai
    backends: [a, nope]
    subscription:
      header_names: ["bad header"]
"#;
    std::fs::write(dir.path().join("bad.yaml"), yaml).expect("write");
    let out = Command::new(BIN)
        .args(["check", "-c", "bad.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "server.colour",
        "backends[0].bogus",
        "server.listen",
        "backends[0].url",
        "backends[1].name",
        "backends[1].simulator",
        "SLUICE_TEST_SURELY_UNSET_VAR",
        "apis[0].backends[1]",
        "apis[0].subscription.header_names[0]",
    ] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
    assert!(err.contains("bad.yaml:4:"), "line numbers:\n{err}");
}

#[test]
fn run_with_a_bad_config_exits_2_before_listening() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bad.yaml"), "apis: []\nunknown: 1\n").expect("write");
    let out = Command::new(BIN)
        .args(["run", "-c", "bad.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown"));
}

#[test]
fn run_serves_simulated_regions_and_stops_on_sigint() {
    let dir = good_dir();
    let (proc, url) = spawn_until(
        &["run", "-c", "gateway.yaml"],
        dir.path(),
        "sluice: listening on",
    );
    let gw = addr_of(&url);
    wait_connect(gw);
    let mut regions = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = post(
            gw,
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            &[("api-key", "team-a-key")],
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ms-stream"), Some("False"));
        regions.insert(r.header("x-ms-region").expect("region").to_string());
    }
    assert_eq!(
        regions.len(),
        2,
        "round robin over both regions: {regions:?}"
    );
    let mut proc = proc;
    Command::new("kill")
        .args(["-INT", &proc.0.id().to_string()])
        .status()
        .expect("kill");
    // A hang detector, not a speed check: a loaded machine gets a minute.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut exited = false;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = proc.0.try_wait() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(exited, "sluice did not stop on SIGINT");
}

#[test]
fn sim_subcommand_serves_azure_openai() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_proc, url) = spawn_until(
        &[
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--region",
            "westus",
            "--display-region",
            "West US",
        ],
        dir.path(),
        "sluice sim: region westus listening on",
    );
    let addr = addr_of(&url);
    let r = post(
        addr,
        "/openai/deployments/x/chat/completions?api-version=2024-10-21",
        &[],
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ms-region"), Some("West US"));
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
}

/// `sluice bare-proxy` (the benchmarks' floor) forwards requests and streams
/// unchanged (a slow stream, as `sluice-load`'s `streams` scenario asks for).
#[test]
fn bare_proxy_forwards_to_its_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_sim, url) = spawn_until(
        &["sim", "--listen", "127.0.0.1:0", "--region", "eastus"],
        dir.path(),
        "sluice sim: region eastus listening on",
    );
    let sim = addr_of(&url);
    let (_proxy, line) = spawn_until(
        &[
            "bare-proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &sim.to_string(),
            "--threads",
            "1",
        ],
        dir.path(),
        "sluice bare-proxy: listening on",
    );
    let (url, upstream) = line.split_once(" -> ").expect("banner names the upstream");
    assert_eq!(upstream, sim.to_string());
    let proxy = addr_of(url);
    wait_connect(proxy);
    let path = "/openai/deployments/x/chat/completions?api-version=2024-10-21";
    let r = post(
        proxy,
        path,
        &[],
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    // No gateway logic: no x-ms-stream tag is added.
    assert_eq!(r.header("x-ms-stream"), None);
    let r = post(
        proxy,
        path,
        &[("x-sim-per-token-ms", "40")],
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(text.contains("data: [DONE]"), "{text}");
    // The role chunk (empty content) and the five tokens.
    assert_eq!(
        text.matches("\"delta\":{\"content\":\"").count(),
        6,
        "{text}"
    );
}

#[test]
fn run_on_a_busy_port_exits_1_with_a_message() {
    let dir = good_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let yaml = GOOD.replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    std::fs::write(dir.path().join("busy.yaml"), yaml).expect("write");
    let out = Command::new(BIN)
        .args(["run", "-c", "busy.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{port}")));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}
