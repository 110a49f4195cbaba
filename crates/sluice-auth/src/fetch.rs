//! Fetching the OpenID configuration and the JWKS.

use std::time::Duration;

/// Largest document accepted (Entra ID's key set is about 10 KiB).
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Fetches a document over HTTP(S). [`HttpFetch`] is the real one; tests may substitute their own.
#[async_trait::async_trait]
pub trait Fetch: Send + Sync + std::fmt::Debug {
    /// The body of a successful (2xx) `GET url`, or a one-line reason for the failure (logged by the validator).
    async fn get(&self, url: &str) -> Result<Vec<u8>, String>;
}

/// [`Fetch`] over reqwest: TLS verified against the system's roots, a timeout for the whole request, redirects
/// followed, bodies over 1 MiB refused. Plain `http://` is allowed (for local identity providers and tests).
#[derive(Debug, Clone)]
pub struct HttpFetch {
    client: reqwest::Client,
}

impl HttpFetch {
    /// A fetcher whose requests each give up after `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self { client })
    }
}

#[async_trait::async_trait]
impl Fetch for HttpFetch {
    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(format!("document larger than {MAX_DOCUMENT_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(format!("document larger than {MAX_DOCUMENT_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A reqwest error with its causes, on one line.
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
