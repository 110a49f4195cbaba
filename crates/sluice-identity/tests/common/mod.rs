//! Shared by the integration tests: a fake HTTP identity endpoint on 127.0.0.1, a transport that redirects
//! azure_identity's requests to it, and a manual clock.
#![allow(dead_code)] // each test binary uses a different part

use azure_core::http::{AsyncRawResponse, HttpClient, Request, Url};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use sluice_identity::ManualClock;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as an `application/x-www-form-urlencoded` form.
    pub fn form(&self) -> Vec<(String, String)> {
        let url = Url::parse(&format!("http://form.invalid/?{}", self.body)).expect("form body");
        url.query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    pub fn form_value(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// The fake's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Reply {
            status,
            body: body.to_string(),
        }
    }
}

pub type Handler =
    Arc<dyn Fn(Recorded) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Recorded) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    Arc::new(move |request| Box::pin(f(request)))
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request and answers with a handler.
#[derive(Debug, Clone)]
pub struct FakeServer {
    pub port: u16,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeServer {
    /// A listener on 127.0.0.1:0, bound before any runtime exists (for tests that must export the address first).
    pub fn bind() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
    }

    /// Binds and serves on the current tokio runtime.
    pub fn start(handler: Handler) -> FakeServer {
        Self::serve(Self::bind(), handler)
    }

    /// Serves `listener` on the current tokio runtime. Ready as soon as this returns: the socket is listening.
    pub fn serve(listener: std::net::TcpListener, handler: Handler) -> FakeServer {
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        let recorded = recorded.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let url = Url::parse(&format!("http://fake.invalid{}", parts.uri))
                                .expect("uri");
                            let request = Recorded {
                                method: parts.method.to_string(),
                                path: url.path().to_string(),
                                query: url
                                    .query_pairs()
                                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                                    .collect(),
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.to_string(), v.to_str().unwrap_or_default().to_string())
                                    })
                                    .collect(),
                                body: String::from_utf8_lossy(&body).into_owned(),
                            };
                            recorded.lock().unwrap().push(request.clone());
                            let reply = handler(request).await;
                            let response = hyper::Response::builder()
                                .status(reply.status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(reply.body)))
                                .expect("response");
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        FakeServer { port, requests }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self, matching: impl Fn(&Recorded) -> bool) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matching(r))
            .count()
    }
}

/// An azure_core transport that sends every request to 127.0.0.1:`port` over plain HTTP, keeping the path and
/// query, and remembers the URLs azure_identity asked for.
#[derive(Debug)]
pub struct RedirectToLocal {
    port: u16,
    inner: Arc<dyn HttpClient>,
    pub original_urls: Mutex<Vec<Url>>,
}

impl RedirectToLocal {
    pub fn new(port: u16) -> Arc<Self> {
        Arc::new(RedirectToLocal {
            port,
            inner: azure_core::http::new_http_client(None),
            original_urls: Mutex::new(Vec::new()),
        })
    }

    pub fn transport(self: &Arc<Self>) -> azure_core::http::Transport {
        azure_core::http::Transport::new(self.clone())
    }

    pub fn hosts(&self) -> Vec<String> {
        self.original_urls
            .lock()
            .unwrap()
            .iter()
            .map(|u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or_default()))
            .collect()
    }
}

#[async_trait::async_trait]
impl HttpClient for RedirectToLocal {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        self.original_urls
            .lock()
            .unwrap()
            .push(request.url().clone());
        let mut local = request.clone();
        let url = local.url_mut();
        url.set_scheme("http").expect("scheme");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.port)).expect("port");
        self.inner.execute_request(&local).await
    }
}

/// A clock that starts at the real time (the fake stamps tokens with it) and only moves when told.
pub fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::starting_now())
}

/// The real time in unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A JWT-shaped string, to prove such text never reaches an error message.
pub const JWT_LIKE: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsZWFrIn0.c2lnbmF0dXJl";
