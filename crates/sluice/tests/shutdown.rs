//! SIGTERM drains: the gateway stops accepting, lets an open SSE stream run
//! to its end, then exits 0 without sleeping out the rest of its grace
//! period. The gateway runs as a child process (the binary's own signal
//! handling is what is tested).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{addr_of, spawn_sluice, wait_connect};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

fn config(dir: &std::path::Path) {
    std::fs::write(dir.join("a.key"), "shutdown-team-key").expect("write");
    std::fs::write(
        dir.join("gateway.yaml"),
        r#"
server:
  listen: 127.0.0.1:0
  threads: 2
  shutdown_timeout_seconds: 600
simulators:
  - name: slow
    region: East US
    time_to_first_token_ms: 50
    per_token_ms: 60
    completion_tokens: 30
backends:
  - name: slow
    simulator: slow
subscriptions:
  - name: team-a
    primary_key: {file: a.key}
apis:
  - name: slow
    path: /openai
    backends: [slow]
"#,
    )
    .expect("write");
}

/// Start the gateway on the config above; returns it and its address.
fn start(dir: &std::path::Path) -> (common::Proc, std::net::SocketAddr) {
    config(dir);
    let (proc, url) = spawn_sluice(
        BIN,
        &["run", "-c", "gateway.yaml"],
        dir,
        &[],
        "sluice: listening on",
    );
    let gw = addr_of(&url);
    wait_connect(gw);
    (proc, gw)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Wait for the process to exit; `None` if it has not within `limit`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sigterm_lets_an_open_stream_finish_then_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, gw) = start(dir.path());

    let body = r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let mut s = TcpStream::connect(gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: shutdown-team-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    // Wait until the stream is flowing.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"delta\"") {
        let n = s.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("[DONE]"));

    signal(proc.0.id(), "-TERM");

    // New connections are refused once the listener has stopped...
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(gw).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... while the open stream runs to its end.
    s.read_to_end(&mut got).expect("the stream is not cut");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    // 30 words, each in its own event (the role event's content is empty).
    let deltas = text.matches("\"delta\":{\"content\":\"").count()
        - text.matches("\"delta\":{\"content\":\"\",").count();
    assert_eq!(deltas, 30, "every token arrived: {text}");

    // Nothing is in flight any more: the gateway exits well before its
    // 600 s grace period, with status 0.
    let status = wait_exit(&mut proc.0, Duration::from_secs(120)).expect("exited after draining");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_with_nothing_in_flight_exits_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, _) = start(dir.path());
    signal(proc.0.id(), "-TERM");
    let status = wait_exit(&mut proc.0, Duration::from_secs(120)).expect("exited");
    assert!(status.success(), "{status:?}");
}
