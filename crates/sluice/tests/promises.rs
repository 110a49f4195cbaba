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
    management: SocketAddr,
    capture: Capture,
    halves: Halves,
    refuses: Refuses,
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
    let halves = Halves::start();
    let refuses = Refuses::start();
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
  - name: halves
    url: http://{halves}
  - name: refuses
    url: http://{refuses}
pools:
  - name: refuses-first
    backends:
      - {{backend: refuses, priority: 1}}
      - {{backend: capture, priority: 2}}
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
  - name: halves
    path: /halves/openai
    backends: [halves]
  - name: slowupload
    path: /slowupload/openai
    pool: refuses-first
    failover: {{timeout_ms: 500, max_attempts: 2}}
    policies:
      - token_limit: {{counter_key: subscription, tokens_per_minute: 10000000}}
"#,
        capture = capture.addr,
        reuse = reuse.addr,
        halves = halves.addr,
        refuses = refuses.addr,
    );
    // Returns once the listeners accept connections.
    let listeners = common::serve_in_process(&yaml, dir.path());
    Env {
        gw: listeners.data,
        management: listeners.management.expect("management listener"),
        capture,
        halves,
        refuses,
        reuse,
        next_event: Mutex::new(next_event),
    }
}

/// Read one HTTP/1.1 request head; `None` at end of stream. Returns the
/// value of `x-test-id` and the `Content-Length`.
fn read_head(r: &mut BufReader<TcpStream>) -> Option<(String, usize)> {
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
    Some((id, len))
}

/// Read one HTTP/1.1 request (head and `Content-Length` body); `None` at end
/// of stream. Returns the value of `x-test-id`.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<String> {
    let (id, len) = read_head(r)?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(id)
}

/// An upstream on 127.0.0.1 port 0: each connection it accepts is served
/// on a thread of its own by `serve(n, reader, writer)` (`n`: the
/// connection's place in accept order). Returns its address.
fn upstream<F>(serve: F) -> SocketAddr
where
    F: Fn(usize, BufReader<TcpStream>, TcpStream) + Clone + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for (n, s) in l.incoming().flatten().enumerate() {
            let serve = serve.clone();
            std::thread::spawn(move || {
                s.set_nodelay(true).expect("nodelay");
                let w = s.try_clone().expect("clone");
                serve(n, BufReader::new(s), w);
            });
        }
    });
    addr
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
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let addr = upstream(move |conn, mut r, mut w| {
            let mut nth = 0;
            while let Some(id) = read_request(&mut r) {
                nth += 1;
                let answered = nth == 1;
                seen2.lock().expect("lock").push(Attempt {
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

/// Request bodies by `x-test-id`.
type Bodies = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An upstream that tells the test when the first bytes of a request body
/// have reached it, before the rest has, then reads the rest and answers
/// 200 with a chat completion whose id is `chatcmpl-<x-test-id>`.
#[derive(Debug, Clone)]
struct Halves {
    addr: SocketAddr,
    /// Told once per request, when some of its body (not all) has arrived.
    first_bytes: Arc<Mutex<Receiver<String>>>,
    /// Each request's whole body, by `x-test-id`.
    bodies: Bodies,
}

impl Halves {
    fn start() -> Self {
        let (tx, rx) = channel::<String>();
        let bodies: Bodies = Arc::new(Mutex::new(Vec::new()));
        let bodies2 = bodies.clone();
        let addr = upstream(move |_, mut r, mut w| {
            while let Some((id, len)) = read_head(&mut r) {
                // Whatever has come of the body so far (at least a
                // byte): the rest may not have been sent yet.
                let mut body = Vec::with_capacity(len);
                let got = r.fill_buf().map(<[u8]>::len).unwrap_or(0).min(len);
                if got == 0 {
                    return;
                }
                body.extend_from_slice(&r.buffer()[..got]);
                r.consume(got);
                if got < len {
                    let _ = tx.send(id.clone());
                }
                let mut rest = vec![0; len - got];
                if r.read_exact(&mut rest).is_err() {
                    return;
                }
                body.extend_from_slice(&rest);
                bodies2.lock().expect("lock").push((id.clone(), body));
                let payload =
                    format!(r#"{{"id":"chatcmpl-{id}","object":"chat.completion","choices":[]}}"#);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
                    payload.len()
                );
                if w.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        });
        Halves {
            addr,
            first_bytes: Arc::new(Mutex::new(rx)),
            bodies,
        }
    }

    fn body(&self, id: &str) -> Option<Vec<u8>> {
        let bodies = self.bodies.lock().expect("lock");
        bodies.iter().find(|(i, _)| i == id).map(|(_, b)| b.clone())
    }
}

/// An upstream that answers every request `503` (keep-alive) and counts
/// them by `x-test-id`.
#[derive(Debug, Clone)]
struct Refuses {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Refuses {
    fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let addr = upstream(move |_, mut r, mut w| {
            while let Some(id) = read_request(&mut r) {
                seen2.lock().expect("lock").push(id);
                let resp = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
                if w.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        });
        Refuses { addr, seen }
    }

    fn count(&self, id: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|i| *i == id)
            .count()
    }
}

/// Docs (routing.md, failover): the failover time runs from when the
/// request's body was read, for a body read before routing. A client that
/// takes longer than the whole failover time to upload still gets its second
/// attempt when the first backend answers 503. (The pause is the upload
/// under test, not a wait for readiness.)
#[test]
fn a_slow_upload_does_not_use_up_the_failover_time() {
    let e = env();
    let path = "/slowupload/openai/deployments/d/chat/completions?api-version=2024-10-21";
    let id = "slow-upload";
    let mut w = TcpStream::connect(e.gw).expect("connect");
    w.set_nodelay(true).expect("nodelay");
    w.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut r = BufReader::new(w.try_clone().expect("clone"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\napi-key: {KEY}\r\nx-test-id: {id}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        BODY.len()
    );
    let (first, rest) = BODY.split_at(10);
    w.write_all(head.as_bytes()).expect("head");
    w.write_all(first.as_bytes()).expect("first part");
    // Longer than the API's whole failover time (500 ms).
    std::thread::sleep(Duration::from_millis(800));
    w.write_all(rest.as_bytes()).expect("rest");
    let (status, _, _) = read_answer(&mut r);
    assert_eq!(status, 200, "the second backend answered");
    assert_eq!(e.refuses.count(id), 1, "the first backend was asked once");
    assert!(e.capture.find(id).is_some(), "the second backend was asked");
}

/// The value of `sluice_affinity_total{result="learned"}`.
fn learned(management: SocketAddr) -> f64 {
    common::metrics(management)
        .lines()
        .find(|l| l.starts_with("sluice_affinity_total{") && l.contains(r#"result="learned""#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Send `head` and `body` on a kept-alive connection and read the answer
/// (a `Content-Length` one): status, headers, body.
fn exchange(
    w: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    head: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    w.write_all(head.as_bytes()).expect("head");
    w.write_all(body).expect("body");
    read_answer(r)
}

fn read_answer(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .expect("a Content-Length answer");
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
    (status, headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Docs (architecture.md, "Request bodies"): with no policy that reads the
/// body, a small one passes to the backend as it arrives, not read whole
/// first; it is still read, once whole, for `x-ms-stream` and for a chat
/// completion's `store` (whose id is then learned for affinity). The first
/// body's first bytes reach the backend before the client has sent the
/// rest: a gateway that read it whole before routing would never let them.
/// The calls share one connection, so each is logged (and its id learned)
/// before the next is read: the count is exact when the last answer is in.
#[test]
fn a_small_body_passes_as_it_arrives_and_is_still_read_whole() {
    let e = env();
    let path = "/halves/openai/deployments/d/chat/completions?api-version=2024-10-21";
    let stored =
        r#"{"messages":[{"role":"user","content":"Hello there"}],"stream":true,"store":true}"#;
    let plain = r#"{"messages":[{"role":"user","content":"Hello"}],"stream":false}"#;
    let head = |id: &str, len: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\napi-key: {KEY}\r\nx-test-id: {id}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let before = learned(e.management);

    let mut w = TcpStream::connect(e.gw).expect("connect");
    w.set_nodelay(true).expect("nodelay");
    w.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut r = BufReader::new(w.try_clone().expect("clone"));

    // In two parts: the backend has the first while the rest is still here.
    let (first, rest) = stored.split_at(20);
    w.write_all(head("passed-halves", stored.len()).as_bytes())
        .expect("head");
    w.write_all(first.as_bytes()).expect("first part");
    let told = e
        .halves
        .first_bytes
        .lock()
        .expect("lock")
        .recv_timeout(Duration::from_secs(20))
        .expect("the first part reached the backend before the rest was sent");
    assert_eq!(told, "passed-halves");
    w.write_all(rest.as_bytes()).expect("rest");
    let (status, headers, _) = read_answer(&mut r);
    assert_eq!(status, 200);
    assert_eq!(
        e.halves.body("passed-halves").as_deref(),
        Some(stored.as_bytes())
    );
    // Read whole from pingora's buffer once its end came: a stream.
    assert_eq!(header(&headers, "x-ms-stream"), Some("True"));

    // In one piece (the usual case), not stored, then stored.
    let (status, headers, _) = exchange(
        &mut w,
        &mut r,
        &head("passed-plain", plain.len()),
        plain.as_bytes(),
    );
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ms-stream"), Some("False"));
    assert_eq!(
        e.halves.body("passed-plain").as_deref(),
        Some(plain.as_bytes())
    );
    let (status, headers, _) = exchange(
        &mut w,
        &mut r,
        &head("passed-whole", stored.len()),
        stored.as_bytes(),
    );
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ms-stream"), Some("True"));
    // One more call: the three before it have been logged.
    let (status, _, _) = exchange(
        &mut w,
        &mut r,
        &head("passed-last", plain.len()),
        plain.as_bytes(),
    );
    assert_eq!(status, 200);
    // The two stored chat completions taught their ids; the plain one not.
    assert_eq!(learned(e.management), before + 2.0);
}
