//! Behaviour the docs promise, driven over real HTTP: a gateway in this
//! process on 127.0.0.1 port 0, with fake upstreams that misbehave on cue.
//! One gateway serves every test in this binary and is never stopped
//! (stopping in-process pingora servers can abort the test process; see
//! shared/reference/pingora.md §5.4). nextest runs each test in a process of
//! its own, so each gets a fresh gateway; under `cargo test` they share one,
//! and every test uses backends and request ids of its own.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Capture, post};

const KEY: &str = "key-promises-0123456789";
const BODY: &str = r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":4}"#;

struct Env {
    gw: SocketAddr,
    capture: Capture,
    reuse: DropsReused,
    /// Lets the lock-step upstream send its next event.
    next_event: Mutex<Sender<()>>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(start)
}

fn start() -> Env {
    let capture = Capture::start();
    let reuse = DropsReused::start();
    let (next_event, events_allowed) = channel();
    let lockstep = lockstep_sse(events_allowed);
    // Removed when `start` returns: the config (its key files) is read
    // before the gateway serves.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("k.key"), KEY).expect("write");
    let yaml = format!(
        r#"
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
backends:
  - name: capture
    url: http://{capture}
  - name: reuse
    url: http://{reuse}
  - name: lockstep
    url: http://{lockstep}
subscriptions:
  - name: team
    primary_key: {{file: k.key}}
apis:
  - name: plain
    path: /plain/openai
    backends: [capture]
  - name: metric
    path: /metric/openai
    backends: [capture]
    policies:
      - emit_token_metric: {{dimensions: [api]}}
  - name: tokens
    path: /tokens/openai
    backends: [capture]
    policies:
      - token_limit: {{counter_key: subscription, tokens_per_minute: 10000000}}
  - name: reuse
    path: /reuse/openai
    backends: [reuse]
  - name: lockstep
    path: /lockstep/openai
    backends: [lockstep]
"#,
        capture = capture.addr,
        reuse = reuse.addr,
    );
    // Returns once the listeners accept connections.
    let listeners = common::serve_in_process(&yaml, dir.path());
    Env {
        gw: listeners.data,
        capture,
        reuse,
        next_event: Mutex::new(next_event),
    }
}

/// Read one HTTP/1.1 request (head and `Content-Length` body); `None` at end
/// of stream. Returns the value of `x-test-id`.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut id = String::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        if k.eq_ignore_ascii_case("x-test-id") {
            id = v.trim().to_string();
        } else if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(id)
}

/// One request as [`DropsReused`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempt {
    id: String,
    /// Which connection (in accept order) it came on.
    conn: usize,
    /// Its position on that connection (1 for the first request).
    nth: usize,
    answered: bool,
}

/// An upstream that answers the first request on each connection (200,
/// keep-alive) and, when a second request arrives on the same connection,
/// reads it and closes the connection without answering: a pooled
/// connection the server gave up on just as it was reused.
#[derive(Debug, Clone)]
struct DropsReused {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Attempt>>>,
}

impl DropsReused {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for (conn, s) in l.incoming().flatten().enumerate() {
                let seen = seen2.clone();
                std::thread::spawn(move || {
                    s.set_nodelay(true).expect("nodelay");
                    let mut w = s.try_clone().expect("clone");
                    let mut r = BufReader::new(s);
                    let mut nth = 0;
                    while let Some(id) = read_request(&mut r) {
                        nth += 1;
                        let answered = nth == 1;
                        seen.lock().expect("lock").push(Attempt {
                            id,
                            conn,
                            nth,
                            answered,
                        });
                        if !answered {
                            let _ = w.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        let body = br#"{"ok":true}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        if w.write_all(head.as_bytes()).is_err() || w.write_all(body).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        DropsReused { addr, seen }
    }

    fn attempts(&self, id: &str) -> Vec<Attempt> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.id == id)
            .cloned()
            .collect()
    }
}

/// An upstream that streams SSE events one at a time: it sends an event,
/// then waits for the test to allow the next one. A gateway that held back
/// any part of the stream would leave the client waiting for an event the
/// upstream cannot send yet.
fn lockstep_sse(allowed: Receiver<()>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        // One streaming request at a time: the events are paced by one channel.
        for s in l.incoming().flatten() {
            s.set_nodelay(true).expect("nodelay");
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            if read_request(&mut r).is_none() {
                continue;
            }
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n";
            if w.write_all(head.as_bytes()).is_err() {
                continue;
            }
            for i in 0..LOCKSTEP_EVENTS {
                let event = if i + 1 == LOCKSTEP_EVENTS {
                    "data: [DONE]\n\n".to_string()
                } else {
                    format!("data: {{\"event\":{i}}}\n\n")
                };
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                if w.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
                // The test allows the next event once it has seen this one.
                if i + 1 < LOCKSTEP_EVENTS && allowed.recv().is_err() {
                    return;
                }
            }
            let _ = w.write_all(b"0\r\n\r\n");
        }
    });
    addr
}

const LOCKSTEP_EVENTS: usize = 4;

/// Docs (operations.md, architecture.md): a failure on a reused pooled
/// upstream connection is retried with the same body while nothing has
/// reached the client. Without the retry (`error_while_proxy`'s
/// `decide_reuse`) the second call would get a 502.
#[test]
fn a_request_on_a_pooled_connection_the_backend_dropped_is_sent_again() {
    let e = env();
    let path = "/reuse/openai/deployments/d/chat/completions?api-version=2024-10-21";
    let r = post(e.gw, path, &[("api-key", KEY), ("x-test-id", "warm")], BODY);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        e.reuse.attempts("warm"),
        [Attempt {
            id: "warm".into(),
            conn: 0,
            nth: 1,
            answered: true
        }]
    );
    // The next call goes out on the pooled connection, which the backend
    // drops. Rarely the gateway has not yet returned the connection to its
    // pool when the next call arrives and opens a new one instead: then a
    // later call reuses one (a few are allowed for that).
    let mut dropped = None;
    for n in 0..5 {
        let id = format!("again-{n}");
        let r = post(e.gw, path, &[("api-key", KEY), ("x-test-id", &id)], BODY);
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.text(), r#"{"ok":true}"#);
        if e.reuse.attempts(&id).iter().any(|a| !a.answered) {
            dropped = Some(id);
            break;
        }
    }
    let id = dropped.expect("the gateway reused a pooled upstream connection");
    let attempts = e.reuse.attempts(&id);
    // Seen twice: dropped on the reused connection, then answered on a new
    // one (more than twice only if the retry also drew a pooled connection
    // from the rare case above).
    assert!(attempts.len() >= 2, "{attempts:?}");
    let (last, before) = attempts.split_last().expect("attempts");
    assert!(
        before.iter().all(|a| a.nth >= 2 && !a.answered),
        "{attempts:?}"
    );
    assert!(last.nth == 1 && last.answered, "{attempts:?}");
    assert!(before.iter().all(|a| a.conn != last.conn), "{attempts:?}");
}

/// Docs (architecture.md): `Accept-Encoding` is dropped when usage must be
/// read (`token_limit`, `emit_token_metric`), so the backend answers in
/// plain text the gateway can parse; otherwise it is forwarded untouched.
#[test]
fn accept_encoding_is_dropped_only_where_usage_is_read() {
    let e = env();
    for (api, id, want) in [
        ("plain", "ae-plain", Some("gzip, br")),
        ("metric", "ae-metric", None),
        ("tokens", "ae-tokens", None),
    ] {
        let r = post(
            e.gw,
            &format!("/{api}/openai/deployments/d/chat/completions?api-version=2024-10-21"),
            &[
                ("api-key", KEY),
                ("x-test-id", id),
                ("Accept-Encoding", "gzip, br"),
            ],
            BODY,
        );
        assert_eq!(r.status, 200, "{api}: {}", r.text());
        let seen = e.capture.find(id).expect("forwarded");
        assert_eq!(seen.header("accept-encoding"), want, "{api}");
        // Only that header: the body and the rest of the request are intact.
        assert_eq!(seen.body, BODY.as_bytes(), "{api}");
        assert_eq!(seen.header("content-type"), Some("application/json"));
    }
}

/// Docs (architecture.md, DESIGN §3): SSE is relayed event by event as it
/// arrives, not buffered. The upstream sends each event only after the
/// client has received the one before, so a gateway that held anything back
/// would stall this test (the client's read timeout fails it); no timing is
/// measured.
#[test]
fn streamed_events_are_relayed_one_at_a_time() {
    let e = env();
    let next_event = e.next_event.lock().expect("lock");
    let mut s = TcpStream::connect(e.gw).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let body = r#"{"messages":[],"stream":true}"#;
    write!(
        s,
        "POST /lockstep/openai/deployments/d/chat/completions HTTP/1.1\r\nHost: x\r\napi-key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    for i in 0..LOCKSTEP_EVENTS {
        let want = if i + 1 == LOCKSTEP_EVENTS {
            "data: [DONE]\n\n".to_string()
        } else {
            format!("data: {{\"event\":{i}}}\n\n")
        };
        while !String::from_utf8_lossy(&raw).contains(&want) {
            let n = s.read(&mut buf).unwrap_or_else(|err| {
                panic!(
                    "event {i} never arrived ({err}); got so far: {}",
                    String::from_utf8_lossy(&raw)
                )
            });
            assert!(n > 0, "closed before event {i}");
            raw.extend_from_slice(&buf[..n]);
        }
        // The next event does not exist yet: nothing beyond this one.
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains(&format!("\"event\":{}", i + 1)), "{text}");
        if i + 1 < LOCKSTEP_EVENTS {
            next_event.send(()).expect("upstream waits");
        }
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: text/event-stream; charset=utf-8"),
        "{text}"
    );
    assert!(lower.contains("x-ms-stream: true"), "{text}");
}

/// The gateway edits both heads through `http`'s map (`heads.rs`): what
/// each side sees besides the edits is the head as it was sent, with header
/// names in `http`'s usual capitals (standard names) or lower case.
#[test]
fn head_edits_keep_the_rest_of_each_head() {
    let e = env();
    let r = post(
        e.gw,
        "/plain/openai/deployments/d/chat/completions?api-version=2024-10-21&x=%2F",
        &[
            ("api-key", KEY),
            ("x-test-id", "heads"),
            ("X-Client-Thing", "Kept As Sent"),
            ("X-Forwarded-For", "203.0.113.9"),
        ],
        BODY,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.reason, "OK");
    let seen = e.capture.find("heads").expect("forwarded");
    assert_eq!(seen.method, "POST");
    assert_eq!(
        seen.target,
        "/openai/deployments/d/chat/completions?api-version=2024-10-21&x=%2F"
    );
    assert_eq!(seen.header("x-client-thing"), Some("Kept As Sent"));
    assert_eq!(
        seen.header("host"),
        Some(e.capture.addr.to_string().as_str())
    );
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    // The client's key never goes on (this backend has no key of its own).
    assert_eq!(seen.header("api-key"), None);
    assert_eq!(seen.body, BODY.as_bytes());
    let names: Vec<&str> = seen.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"Host"), "{names:?}");
    assert!(names.contains(&"Content-Type"), "{names:?}");
    assert!(names.contains(&"x-client-thing"), "{names:?}");
    // The answer: the backend's headers, then the gateway's.
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    for name in [
        "Content-Type",
        "x-ms-region",
        "apim-request-id",
        "x-ms-stream",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert_eq!(r.header("x-ms-stream"), Some("False"));
    assert_eq!(r.header("x-ms-region"), Some("Capture Region"));
    assert_eq!(r.header("apim-request-id"), Some("0000-capture"));
    assert_eq!(r.text(), r#"{"ok":true}"#);
}
