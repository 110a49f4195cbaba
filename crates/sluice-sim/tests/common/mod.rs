//! Shared helpers: start a simulator on 127.0.0.1:0 and talk to it with a hyper client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sluice_sim::{RegionConfig, SimHandle, Simulator};
use tokio::net::TcpStream;

pub async fn start(cfg: RegionConfig) -> SimHandle {
    Simulator::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .expect("simulator starts")
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the headers every simulator response carries.
    pub fn assert_azure_headers(&self, region: &str) {
        assert_eq!(self.header("x-ms-region"), Some(region), "{self:?}");
        for name in ["apim-request-id", "x-request-id"] {
            let id = self.header(name).expect(name);
            assert_eq!(id.len(), 36, "hyphenated {name}: {id}");
            let uuid = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{name} {id}: {e}"));
            assert_eq!(uuid.get_version_num(), 4, "{name}: {id}");
        }
    }
}

/// A simple request description.
pub struct Call<'a> {
    pub method: Method,
    pub path: &'a str,
    pub headers: Vec<(&'a str, String)>,
    pub body: Option<Value>,
    /// A non-JSON body with its content type (used instead of `body` when set).
    pub raw: Option<(String, Bytes)>,
}

impl<'a> Call<'a> {
    pub fn post(path: &'a str, body: Value) -> Self {
        Call {
            method: Method::POST,
            path,
            headers: Vec::new(),
            body: Some(body),
            raw: None,
        }
    }

    pub fn get(path: &'a str) -> Self {
        Call {
            method: Method::GET,
            path,
            headers: Vec::new(),
            body: None,
            raw: None,
        }
    }

    pub fn delete(path: &'a str) -> Self {
        Call {
            method: Method::DELETE,
            ..Call::get(path)
        }
    }

    /// A POST with a raw body of the given content type.
    pub fn post_raw(path: &'a str, content_type: &str, body: impl Into<Bytes>) -> Self {
        Call {
            method: Method::POST,
            raw: Some((content_type.to_string(), body.into())),
            ..Call::get(path)
        }
    }

    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn build(&self, addr: SocketAddr) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.path)
            .header("host", addr.to_string());
        for (k, v) in &self.headers {
            b = b.header(*k, v.as_str());
        }
        let body = match (&self.raw, &self.body) {
            (Some((content_type, bytes)), _) => {
                b = b.header("content-type", content_type.as_str());
                bytes.clone()
            }
            (None, Some(v)) => {
                b = b.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            (None, None) => Bytes::new(),
        };
        b.body(Full::new(body)).unwrap()
    }
}

async fn connect(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// Send one request on a fresh connection; errors are returned (fault tests need them).
pub async fn try_send(addr: SocketAddr, call: Call<'_>) -> Result<Reply, hyper::Error> {
    let mut sender = connect(addr).await;
    let resp = sender.send_request(call.build(addr)).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub async fn send(addr: SocketAddr, call: Call<'_>) -> Reply {
    try_send(addr, call).await.expect("request succeeds")
}

/// A streamed reply: every body frame with the instant it was read.
pub struct Streamed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub frames: Vec<(Instant, Bytes)>,
    pub sent_at: Instant,
}

impl Streamed {
    /// SSE `data:` payloads in order, each stamped with the arrival of the frame completing it.
    pub fn events(&self) -> Vec<(Instant, String)> {
        let mut out = Vec::new();
        let mut buf = String::new();
        for (at, frame) in &self.frames {
            buf.push_str(std::str::from_utf8(frame).expect("utf-8 SSE"));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let data = event
                    .trim_end()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                    .to_string();
                out.push((*at, data));
            }
        }
        assert!(buf.is_empty(), "trailing partial event: {buf:?}");
        out
    }

    /// Parsed JSON events (everything but the final `[DONE]`), plus whether `[DONE]` ended it.
    pub fn json_events(&self) -> (Vec<Value>, bool) {
        let events = self.events();
        let done = events.last().is_some_and(|(_, d)| d == "[DONE]");
        let json = events
            .iter()
            .filter(|(_, d)| d != "[DONE]")
            .map(|(_, d)| serde_json::from_str(d).expect("JSON event"))
            .collect();
        (json, done)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Named SSE events (`event: <name>\ndata: <json>\n\n`, as the Responses API sends),
    /// in order: `(event name, parsed data)`. Panics on any other framing.
    pub fn named_events(&self) -> Vec<(String, Value)> {
        let raw: Vec<u8> = self.frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
        let raw = String::from_utf8(raw).expect("utf-8 SSE");
        assert!(
            raw.is_empty() || raw.ends_with("\n\n"),
            "partial event: {raw:?}"
        );
        raw.split_terminator("\n\n")
            .map(|block| {
                let (event, data) = block
                    .split_once('\n')
                    .unwrap_or_else(|| panic!("not a named event: {block:?}"));
                let name = event
                    .strip_prefix("event: ")
                    .unwrap_or_else(|| panic!("no event line: {block:?}"));
                let data = data
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("no data line: {block:?}"));
                let v: Value = serde_json::from_str(data).expect("JSON data");
                (name.to_string(), v)
            })
            .collect()
    }
}

/// A `multipart/form-data` upload body with a `purpose` field and a `file` part; returns
/// `(content type, body)`.
pub fn multipart_upload(purpose: &str, filename: &str, content: &[u8]) -> (String, Bytes) {
    let boundary = "----sluice-test-boundary-7MA4YWxk";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary=\"{boundary}\""),
        Bytes::from(body),
    )
}

/// Send a request on a fresh connection and return the response with its
/// body unread.
pub async fn open(addr: SocketAddr, call: Call<'_>) -> http::Response<hyper::body::Incoming> {
    let mut sender = connect(addr).await;
    let resp = sender
        .send_request(call.build(addr))
        .await
        .expect("response head");
    // The connection task owns the socket; the sender is not needed again.
    drop(sender);
    resp
}

pub async fn send_streaming(addr: SocketAddr, call: Call<'_>) -> Streamed {
    let mut sender = connect(addr).await;
    let sent_at = Instant::now();
    let resp = sender
        .send_request(call.build(addr))
        .await
        .expect("response head");
    let (parts, mut body) = resp.into_parts();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Ok(data) = frame.into_data() {
            frames.push((Instant::now(), data));
        }
    }
    Streamed {
        status: parts.status,
        headers: parts.headers,
        frames,
        sent_at,
    }
}

pub const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
pub const COMPLETIONS: &str = "/openai/deployments/davinci/completions?api-version=2024-10-21";
pub const EMBEDDINGS: &str = "/openai/deployments/embed/embeddings?api-version=2024-10-21";

pub fn chat_body(content: &str) -> Value {
    serde_json::json!({ "messages": [{ "role": "user", "content": content }] })
}

/// A `multipart/form-data` body from `(name, filename, content)` parts (a filename makes the
/// part a file); returns `(content type, body)`.
pub fn multipart_form(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Bytes) {
    let boundary = "----sluice-form-boundary-Qx81Zr";
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(body),
    )
}
