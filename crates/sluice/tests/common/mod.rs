//! Test helpers: a raw HTTP/1.1 client that timestamps every read, and a
//! capturing upstream that records exactly what the gateway forwards.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// (time since the request was sent, body bytes received in that read).
    pub reads: Vec<(Duration, Vec<u8>)>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    ContentLength,
    Chunked,
}

/// Send one request on a new connection and read the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    framing: Framing,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match framing {
        Framing::ContentLength => head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len())),
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n\r\n"),
    }
    s.write_all(head.as_bytes())?;
    match framing {
        Framing::ContentLength => s.write_all(body)?,
        Framing::Chunked => {
            for c in body.chunks(16 * 1024) {
                s.write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                s.write_all(c)?;
                s.write_all(b"\r\n")?;
            }
            s.write_all(b"0\r\n\r\n")?;
        }
    }
    let sent = Instant::now();
    read_response(s, sent)
}

/// The management listener's `/metrics` text.
pub fn metrics(management: SocketAddr) -> String {
    let r = request(
        management,
        "GET",
        "/metrics",
        &[],
        b"",
        Framing::ContentLength,
    )
    .expect("metrics");
    assert_eq!(r.status, 200);
    r.text()
}

/// POST JSON with Content-Length.
pub fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    request(
        addr,
        "POST",
        path,
        &h,
        body.as_bytes(),
        Framing::ContentLength,
    )
    .expect("request failed")
}

pub fn read_response(s: TcpStream, sent: Instant) -> std::io::Result<Resp> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.trim_end().splitn(3, ' ');
    let _version = parts.next();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut reads = Vec::new();
    // Read raw bytes as they come, timestamped; decode framing afterwards.
    let mut raw = Vec::new();
    let buffered = r.buffer().to_vec();
    if !buffered.is_empty() {
        reads.push((sent.elapsed(), buffered.clone()));
        raw.extend_from_slice(&buffered);
    }
    let mut s = r.into_inner();
    let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let len = get("content-length").and_then(|v| v.parse::<usize>().ok());
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(n) = len
            && raw.len() >= n
        {
            break;
        }
        if chunked && raw.ends_with(b"0\r\n\r\n") {
            break;
        }
        if len == Some(0) || status == 204 || status == 304 {
            break;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reads.push((sent.elapsed(), buf[..n].to_vec()));
        raw.extend_from_slice(&buf[..n]);
    }
    let body = if chunked { dechunk(&raw) } else { raw };
    Ok(Resp {
        status,
        reason,
        headers,
        body,
        reads,
    })
}

fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(end) = raw[i..].windows(2).position(|w| w == b"\r\n") {
        let size_line = std::str::from_utf8(&raw[i..i + end]).unwrap_or("0");
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        i += end + 2;
        if size == 0 || i + size > raw.len() {
            break;
        }
        out.extend_from_slice(&raw[i..i + size]);
        i += size + 2;
    }
    out
}

/// A request as the capturing upstream received it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Captured {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An upstream that records every request and answers 200 with a small JSON
/// body and Azure-like headers.
#[derive(Debug, Clone)]
pub struct Capture {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Captured>>>,
}

impl Capture {
    pub fn start() -> Capture {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let seen = seen2.clone();
                std::thread::spawn(move || serve_capture(conn, seen));
            }
        });
        Capture { addr, seen }
    }

    /// The request carrying `x-test-id: id`.
    pub fn find(&self, id: &str) -> Option<Captured> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .find(|c| c.header("x-test-id") == Some(id))
            .cloned()
    }
}

fn serve_capture(conn: TcpStream, seen: Arc<Mutex<Vec<Captured>>>) {
    let _ = conn.set_nodelay(true);
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut it = line.split_whitespace();
        let method = it.next().unwrap_or("").to_string();
        let target = it.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            if r.read_exact(&mut body).is_err() {
                return;
            }
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size = String::new();
                if r.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                if r.read_exact(&mut chunk).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        seen.lock().expect("lock").push(Captured {
            method,
            target,
            headers,
            body,
        });
        let payload = br#"{"ok":true}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nx-ms-region: Capture Region\r\napim-request-id: 0000-capture\r\nx-ratelimit-remaining-requests: 7\r\nx-ratelimit-remaining-tokens: 700\r\nretry-after-ms: 5\r\n\r\n",
            payload.len()
        );
        if w.write_all(resp.as_bytes()).is_err() || w.write_all(payload).is_err() {
            return;
        }
    }
}

/// A port nothing listens on (bound then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Split an SSE body into its `data:` payloads.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: ").map(str::to_string))
        })
        .collect()
}

/// A child process stopped by PID when dropped: SIGINT (pingora's fast
/// shutdown), then SIGKILL if it has not exited within 2 s.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the `sluice` binary with `args` in `dir` and wait (up to 60 s) for a
/// stdout line starting with `prefix`; returns the rest of that line.
pub fn spawn_sluice(
    bin: &str,
    args: &[&str],
    dir: &Path,
    env: &[(&str, &std::ffi::OsStr)],
    prefix: &str,
) -> (Proc, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("SSL_CERT_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn sluice");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&prefix) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let proc = Proc(child);
    let rest = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the process printed its ready line");
    (proc, rest)
}

/// Poll until `addr` accepts a connection (at most 10 s).
pub fn wait_connect(addr: SocketAddr) {
    for _ in 0..1000 {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{addr} never accepted");
}

/// `http://ADDR` to an address.
pub fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().expect("address")
}

/// A multi-threaded tokio runtime that lives as long as the test process
/// (for simulators and fakes that one gateway per test binary talks to).
pub fn leaked_runtime() -> &'static tokio::runtime::Runtime {
    Box::leak(Box::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    ))
}

/// Load `yaml` (relative paths from `dir`) and serve it in this process, in a
/// thread that is never stopped (stopping in-process pingora servers can
/// abort the test process: shared/reference/pingora.md §5.4). Returns once
/// the listeners accept connections.
pub fn serve_in_process(yaml: &str, dir: &Path) -> sluice_proxy::Listeners {
    let cfg = sluice_config::load_str(yaml, "test.yaml", dir).expect("config is valid");
    let state =
        sluice_proxy::GatewayState::new(&cfg, &std::collections::HashMap::new()).expect("state");
    let listen = sluice_proxy::Listeners {
        data: cfg.server.listen,
        management: cfg.server.management.as_ref().map(|m| m.listen),
    };
    let (listeners, _trigger, _thread) =
        sluice_proxy::spawn_in_thread(state, listen, cfg.server.threads).expect("gateway starts");
    listeners
}
