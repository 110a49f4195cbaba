//! The load core: persistent HTTP/1.1 connections, an open-loop schedule (latency measured
//! from each request's scheduled time, so a stalled target cannot hide its queueing), and a
//! closed-loop "max" mode.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A single request is abandoned (and counted as an error) after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A slot first reached by a free connection more than this after its scheduled time is late.
const LATE_SLACK: Duration = Duration::from_millis(1);

pub type Sender = SendRequest<Full<Bytes>>;

/// What every request of one (scenario, target) looks like.
#[derive(Debug)]
pub struct RequestSpec {
    pub path: String,
    pub host: String,
    /// Prints redacted.
    pub api_key: sluice_sim::Secret,
    pub body: Bytes,
    /// SSE: the body must hold this marker of a complete stream
    /// (`[DONE]` for chat, `event: response.completed` for Responses).
    pub stream_end: Option<&'static [u8]>,
    /// A debug credential sent as `Apim-Debug-Authorization` (traced requests).
    pub debug_token: Option<String>,
    /// More request headers (e.g. the simulator's `x-sim-per-token-ms`).
    pub extra_headers: Vec<(&'static str, String)>,
    /// Makes every body different: each request's number replaces
    /// [`UNIQUE_MARK`] in `body` (the user's message of `--unique-prompts`).
    pub numbered: Option<std::sync::atomic::AtomicU64>,
}

/// Where a numbered body gets its request's number.
pub const UNIQUE_MARK: &str = "#N#";

impl RequestSpec {
    /// The request, ready to send.
    pub fn request(&self) -> Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&self.path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("api-key", self.api_key.expose());
        if let Some(t) = &self.debug_token {
            req = req.header("apim-debug-authorization", t.as_str());
        }
        for (name, value) in &self.extra_headers {
            req = req.header(*name, value.as_str());
        }
        let body = match &self.numbered {
            Some(counter) => numbered_body(
                &self.body,
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ),
            None => self.body.clone(),
        };
        Ok(req.body(Full::new(body))?)
    }
}

/// `body` with its first [`UNIQUE_MARK`] replaced by `n`.
pub fn numbered_body(body: &[u8], n: u64) -> Bytes {
    let Some(at) = memchr::memmem::find(body, UNIQUE_MARK.as_bytes()) else {
        return Bytes::copy_from_slice(body);
    };
    let n = n.to_string();
    let mut out = Vec::with_capacity(body.len() + n.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(n.as_bytes());
    out.extend_from_slice(&body[at + UNIQUE_MARK.len()..]);
    Bytes::from(out)
}

/// How a phase drives load.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Open loop at this many requests per second in total.
    Rate(f64),
    /// Closed loop: every connection sends back to back.
    Max,
}

/// What one phase measured.
#[derive(Debug, Default)]
pub struct PhaseResult {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub late: u64,
    /// Latency of each successful request, µs (to the last body byte).
    pub latency_us: Vec<u64>,
    /// Time to the first body byte of each successful request, µs.
    pub ttfb_us: Vec<u64>,
    /// From the phase start to the last completion.
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl PhaseResult {
    fn merge(&mut self, o: PhaseResult) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.errors += o.errors;
        self.late += o.late;
        self.latency_us.extend(o.latency_us);
        self.ttfb_us.extend(o.ttfb_us);
        self.elapsed = self.elapsed.max(o.elapsed);
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn error(&mut self, msg: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(msg());
        }
    }
}

/// One keep-alive HTTP/1.1 connection (TCP_NODELAY).
pub async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// `n` connections, opened concurrently.
pub async fn connect_all(addr: SocketAddr, n: usize) -> Result<Vec<Option<Sender>>> {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(connect(addr))).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(Some(t.await??));
    }
    Ok(out)
}

/// Run one phase over the given connections (one task each); returns them for the next phase.
/// A connection that failed is replaced by a fresh one before its next request.
pub async fn run_phase(
    addr: SocketAddr,
    conns: Vec<Option<Sender>>,
    spec: Arc<RequestSpec>,
    mode: Mode,
    duration: Duration,
) -> Result<(Vec<Option<Sender>>, PhaseResult)> {
    if conns.is_empty() {
        bail!("no connections");
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let workers: Vec<_> = conns
        .into_iter()
        .map(|conn| {
            let spec = spec.clone();
            let next = next.clone();
            tokio::spawn(worker(addr, conn, spec, mode, next, start, end))
        })
        .collect();
    let mut conns = Vec::with_capacity(workers.len());
    let mut total = PhaseResult::default();
    for w in workers {
        let (conn, r) = w.await?;
        conns.push(conn);
        total.merge(r);
    }
    Ok((conns, total))
}

async fn worker(
    addr: SocketAddr,
    mut conn: Option<Sender>,
    spec: Arc<RequestSpec>,
    mode: Mode,
    next: Arc<AtomicU64>,
    start: Instant,
    end: Instant,
) -> (Option<Sender>, PhaseResult) {
    let mut r = PhaseResult::default();
    loop {
        // When this request was already due (open loop), its latency counts from then.
        let scheduled = match mode {
            Mode::Rate(rate) => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                if at >= end {
                    break;
                }
                let now = Instant::now();
                if now > at + LATE_SLACK {
                    r.late += 1;
                }
                if now >= at {
                    // Already due: the wait for a free connection is part of its latency.
                    Some(at)
                } else {
                    // Idle until the slot: the timer's wake-up lag (up to ~1 ms in tokio)
                    // belongs to the harness, not to the target, so measure from the wake-up.
                    tokio::time::sleep_until(at).await;
                    None
                }
            }
            Mode::Max => {
                if Instant::now() >= end {
                    break;
                }
                None
            }
        };
        // A connection that is ready to take a request.
        let mut sender = match conn.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    r.sent += 1;
                    r.error(|| format!("connect: {e:#}"));
                    // Do not spin on a dead target in max mode.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if sender.ready().await.is_err() {
            // The server closed an idle connection: reconnect, not an error of this request.
            match connect(addr).await {
                Ok(s) => sender = s,
                Err(e) => {
                    r.sent += 1;
                    r.error(|| format!("reconnect: {e:#}"));
                    continue;
                }
            }
        }
        let t0 = scheduled.unwrap_or_else(Instant::now);
        r.sent += 1;
        match tokio::time::timeout(REQUEST_TIMEOUT, one_request(&mut sender, &spec)).await {
            Ok(Ok(done)) => {
                if let Some(problem) = done.problem {
                    r.error(|| problem);
                } else {
                    r.ok += 1;
                    r.latency_us
                        .push(micros(done.last.saturating_duration_since(t0)));
                    r.ttfb_us
                        .push(micros(done.first.saturating_duration_since(t0)));
                    r.elapsed = r.elapsed.max(done.last.saturating_duration_since(start));
                }
                conn = Some(sender);
            }
            Ok(Err(e)) => r.error(|| format!("transport: {e:#}")),
            Err(_) => r.error(|| format!("timeout after {REQUEST_TIMEOUT:?}")),
        }
    }
    (conn, r)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

struct Done {
    first: Instant,
    last: Instant,
    /// Why the response does not count as a success.
    problem: Option<String>,
}

async fn one_request(sender: &mut Sender, spec: &RequestSpec) -> Result<Done> {
    let resp = sender.send_request(spec.request()?).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first = None;
    let mut len = 0usize;
    let mut end = EndMarker::new(spec.stream_end);
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            first.get_or_insert_with(Instant::now);
            len += data.len();
            end.feed(&data);
        }
    }
    let last = Instant::now();
    let problem = end.problem(status, len);
    Ok(Done {
        first: first.unwrap_or(last),
        last,
        problem,
    })
}

/// Looks for the end marker of an SSE stream across frame boundaries (the
/// last bytes of the previous frame are searched with each new one).
pub struct EndMarker {
    marker: &'static [u8],
    ended: bool,
    tail: Vec<u8>,
}

impl EndMarker {
    pub fn new(marker: Option<&'static [u8]>) -> Self {
        let marker = marker.unwrap_or_default();
        EndMarker {
            marker,
            ended: marker.is_empty(),
            tail: Vec::new(),
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        if self.ended {
            return;
        }
        self.tail.extend_from_slice(data);
        self.ended = memchr::memmem::find(&self.tail, self.marker).is_some();
        let keep = self.marker.len().saturating_sub(1);
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }

    /// Why a response with this status and `len` body bytes does not count
    /// as a success, if it does not.
    pub fn problem(&self, status: hyper::StatusCode, len: usize) -> Option<String> {
        if !status.is_success() {
            Some(format!("HTTP {status}"))
        } else if len == 0 {
            Some("empty body".to_string())
        } else if !self.ended {
            Some(format!(
                "SSE stream ended without {}",
                String::from_utf8_lossy(self.marker)
            ))
        } else {
            None
        }
    }
}

/// Percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::{UNIQUE_MARK, numbered_body, percentile};

    #[test]
    fn numbered_bodies_differ_by_their_number() {
        let body = format!("{{\"q\":\"ask {UNIQUE_MARK}\"}}");
        assert_eq!(&numbered_body(body.as_bytes(), 0)[..], br#"{"q":"ask 0"}"#);
        assert_eq!(
            &numbered_body(body.as_bytes(), 417)[..],
            br#"{"q":"ask 417"}"#
        );
        assert_eq!(&numbered_body(b"no mark", 3)[..], b"no mark");
    }

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&[7], 90.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
