//! The Realtime scenario: WebSocket sessions relayed frame by frame. Each
//! session asks the simulator for one audio-sized delta at a time
//! (`sim.pad`) and waits for it: frames per second, the round trip of each,
//! and (from the caller) the proxy's CPU per frame. Idle sessions measure the
//! memory an open socket costs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The handshake path (the v1 form).
pub const REALTIME_PATH: &str = "/openai/v1/realtime?model=gpt-4o-realtime-preview";

/// One audio delta's size: 100 ms of 24 kHz 16-bit mono PCM, base64-encoded.
pub const PAD_BYTES: usize = 6400;

/// How long one round trip may take before the phase counts an error.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<TcpStream>;

/// Open one session and read its `session.created`.
pub async fn open(addr: SocketAddr, key: &str) -> Result<Ws> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut req = format!("ws://{addr}{REALTIME_PATH}").into_client_request()?;
    req.headers_mut().insert("api-key", key.parse()?);
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream)
        .await
        .context("WebSocket handshake")?;
    if resp.status().as_u16() != 101 {
        bail!("handshake answered {}", resp.status());
    }
    match tokio::time::timeout(FRAME_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.contains("session.created") => Ok(ws),
        other => bail!("no session.created: {other:?}"),
    }
}

/// Open `n` sessions, a few at a time.
pub async fn open_all(addr: SocketAddr, key: &str, n: usize) -> Result<Vec<Ws>> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let opened = futures_util::future::join_all(chunk.iter().map(|_| open(addr, key))).await;
        for s in opened {
            out.push(s?);
        }
    }
    Ok(out)
}

/// What one phase measured.
#[derive(Debug, Default)]
pub struct WsResult {
    /// Frames received (one per round trip).
    pub frames: u64,
    pub errors: u64,
    /// Round trip of each frame, µs.
    pub rtt_us: Vec<u64>,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

/// Each session sends `sim.pad` and waits for its delta, back to back, for
/// `duration`. Sessions that fail are dropped (and counted).
pub async fn run_phase(sessions: Vec<Ws>, duration: Duration) -> (Vec<Ws>, WsResult) {
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|ws| tokio::spawn(drive(ws, deadline)))
        .collect();
    let mut result = WsResult::default();
    let mut kept = Vec::new();
    for t in tasks {
        match t.await {
            Ok((ws, r)) => {
                result.frames += r.frames;
                result.errors += r.errors;
                result.rtt_us.extend(r.rtt_us);
                if result.first_error.is_none() {
                    result.first_error = r.first_error;
                }
                kept.extend(ws);
            }
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    result.elapsed = start.elapsed();
    (kept, result)
}

async fn drive(mut ws: Ws, deadline: Instant) -> (Option<Ws>, WsResult) {
    let mut r = WsResult::default();
    let ask = format!(r#"{{"type":"sim.pad","bytes":{PAD_BYTES}}}"#);
    while Instant::now() < deadline {
        let sent = Instant::now();
        if let Err(e) = ws.send(Message::text(ask.clone())).await {
            r.errors += 1;
            r.first_error = Some(format!("send: {e}"));
            return (None, r);
        }
        match tokio::time::timeout(FRAME_TIMEOUT, next_delta(&mut ws)).await {
            Ok(Ok(())) => {
                r.frames += 1;
                r.rtt_us
                    .push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            Ok(Err(e)) => {
                r.errors += 1;
                r.first_error = Some(e.to_string());
                return (None, r);
            }
            Err(_) => {
                r.errors += 1;
                r.first_error = Some("no delta within 10 s".into());
                return (None, r);
            }
        }
    }
    (Some(ws), r)
}

/// Read until the audio delta `sim.pad` asked for.
async fn next_delta(ws: &mut Ws) -> Result<()> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if t.len() >= PAD_BYTES && t.contains("output_audio.delta") {
                    return Ok(());
                }
            }
            Some(Ok(Message::Close(c))) => bail!("closed: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("receive: {e}"),
            None => bail!("the connection ended"),
        }
    }
}

/// Close every session cleanly.
pub async fn close_all(sessions: Vec<Ws>) {
    for mut ws in sessions {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
}
