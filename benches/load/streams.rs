//! The `streams` scenario: many slow SSE streams open at once, each on its
//! own connection, as a gateway sees them in production (a model producing
//! a token every few hundred milliseconds). It reports what one open stream
//! costs in resident memory and what a whole stream costs in CPU.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::{self, EndMarker, RequestSpec};
use crate::procs::ProcGroup;

/// How long opening all the streams may take before the run gives up
/// waiting and measures what is open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// What one target's streams cost.
#[derive(Debug, Default)]
pub struct StreamsResult {
    /// Streams that delivered their first event.
    pub opened: usize,
    /// Streams read to their end marker.
    pub completed: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// The group's resident memory before the first stream (KiB).
    pub rss_before_kib: u64,
    /// The highest resident memory sampled while every stream was open (KiB).
    pub rss_open_kib: u64,
    /// Time to the first event of each stream, µs, sorted.
    pub ttfb_us: Vec<u64>,
    /// The group's CPU ticks from the first connection to the last stream's end.
    pub cpu_ticks: Option<u64>,
    /// How long opening all the streams took.
    pub ramp: Duration,
}

struct Opened {
    count: AtomicUsize,
    failed: AtomicUsize,
    notify: Notify,
}

/// Open `n` streams of `spec` on `addr`, one connection each; once all have
/// delivered their first event, sample the group's RSS for `hold`, then read
/// every stream to its end.
pub async fn run(
    addr: SocketAddr,
    spec: Arc<RequestSpec>,
    n: usize,
    group: Option<ProcGroup>,
    hold: Duration,
) -> Result<StreamsResult> {
    let mut out = StreamsResult {
        rss_before_kib: group.map_or(0, |g| g.rss_kib()),
        ..StreamsResult::default()
    };
    let cpu_before = group.map(|g| g.cpu_ticks());
    let opened = Arc::new(Opened {
        count: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        notify: Notify::new(),
    });
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(one_stream(addr, spec.clone(), opened.clone())))
        .collect();
    // Every stream open (or failed), or the time is up.
    let deadline = start + OPEN_TIMEOUT;
    loop {
        let notified = opened.notify.notified();
        let done = opened.count.load(Ordering::Acquire) + opened.failed.load(Ordering::Acquire);
        if done >= n || Instant::now() >= deadline {
            break;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
    out.ramp = start.elapsed();
    out.opened = opened.count.load(Ordering::Acquire);
    // Sample while they are all open: the streams are much longer than this.
    if let Some(g) = group {
        let until = Instant::now() + hold;
        while Instant::now() < until {
            out.rss_open_kib = out.rss_open_kib.max(g.rss_kib());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for t in tasks {
        match t.await {
            Ok((Some(ttfb), None)) => {
                out.completed += 1;
                out.ttfb_us.push(ttfb);
            }
            Ok((_, problem)) => {
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = problem;
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out.cpu_ticks = match (cpu_before, group.map(|g| g.cpu_ticks())) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    out.ttfb_us.sort_unstable();
    Ok(out)
}

/// One stream on its own connection: (time to the first event in µs, why it
/// failed if it did).
async fn one_stream(
    addr: SocketAddr,
    spec: Arc<RequestSpec>,
    opened: Arc<Opened>,
) -> (Option<u64>, Option<String>) {
    let mut signalled = false;
    let result = async {
        let mut sender = client::connect(addr).await?;
        let t0 = Instant::now();
        let resp = sender.send_request(spec.request()?).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut end = EndMarker::new(spec.stream_end);
        let mut len = 0usize;
        let mut ttfb = None;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data()
                && !data.is_empty()
            {
                if ttfb.is_none() {
                    ttfb = Some(t0.elapsed().as_micros() as u64);
                    opened.count.fetch_add(1, Ordering::AcqRel);
                    opened.notify.notify_one();
                    signalled = true;
                }
                len += data.len();
                end.feed(&data);
            }
        }
        anyhow::Ok((ttfb, end.problem(status, len)))
    }
    .await;
    if !signalled {
        opened.failed.fetch_add(1, Ordering::AcqRel);
        opened.notify.notify_one();
    }
    match result {
        Ok((ttfb, problem)) => (ttfb, problem),
        Err(e) => (None, Some(format!("{e:#}"))),
    }
}
