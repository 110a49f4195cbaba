//! Shared test fixtures: an identity provider on 127.0.0.1, the test-only keys, a fake clock, token minting.
#![allow(dead_code)] // each test binary uses a different part

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::RsaPrivateKey;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
pub use sluice_auth::ManualClock;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const AUDIENCE: &str = "api://sluice-gateway";
pub const AUDIENCE_GUID: &str = "6f1a1e0b-0000-4000-8000-00000000aaaa";
pub const APP: &str = "0c1d2e3f-1111-4222-8333-444455556666";
pub const OTHER_APP: &str = "99999999-1111-4222-8333-444455556666";
/// The fake clock's wall time at start.
pub const NOW: u64 = 1_700_000_000;

pub fn issuer_v2() -> String {
    format!("https://login.microsoftonline.com/{TENANT}/v2.0")
}

pub fn issuer_v1() -> String {
    format!("https://sts.windows.net/{TENANT}/")
}

/// A test-only RSA key (see tests/fixtures/README.md) as a signing key and as a JWK.
pub struct TestKey {
    pub encoding: EncodingKey,
    n: String,
    e: String,
}

impl TestKey {
    pub fn load(file: &str) -> Self {
        let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        let pem = std::fs::read_to_string(&path).expect("fixture key");
        let key = RsaPrivateKey::from_pkcs1_pem(&pem).expect("PKCS#1 PEM");
        let der = key.to_pkcs1_der().expect("DER");
        TestKey {
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            n: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            e: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        }
    }

    /// The public JWK, shaped like Entra ID's (no `alg`).
    pub fn jwk(&self, kid: &str) -> Value {
        json!({"kty": "RSA", "use": "sig", "kid": kid, "x5t": kid, "n": self.n, "e": self.e, "x5c": ["AAAA"]})
    }

    /// The public JWK with an explicit `alg`.
    pub fn jwk_with_alg(&self, kid: &str, alg: &str) -> Value {
        json!({"kty": "RSA", "use": "sig", "kid": kid, "alg": alg, "n": self.n, "e": self.e})
    }

    /// A token signed with this key, with `kid` (if any) and `alg` in the header.
    pub fn sign(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

pub struct Keys {
    pub a: TestKey,
    pub b: TestKey,
    pub other: TestKey,
    pub short: TestKey,
}

pub fn keys() -> &'static Keys {
    static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Keys {
        a: TestKey::load("test_only_signing_a.pem"),
        b: TestKey::load("test_only_signing_b.pem"),
        other: TestKey::load("test_only_other.pem"),
        short: TestKey::load("test_only_short_1024.pem"),
    })
}

/// Claims of a valid v2 app-only token at the fake clock's start.
pub fn v2_claims() -> Value {
    json!({
        "aud": AUDIENCE,
        "iss": issuer_v2(),
        "iat": NOW - 60,
        "nbf": NOW - 60,
        "exp": NOW + 3600,
        "azp": APP,
        "azpacr": "1",
        "oid": "oid-123",
        "sub": "sub-123",
        "tid": TENANT,
        "roles": ["Gateway.Use", "Chat.Write"],
        "ver": "2.0",
        "team": "blue",
        "tier": 3
    })
}

/// Claims of a valid v1 token.
pub fn v1_claims() -> Value {
    json!({
        "aud": [AUDIENCE_GUID, "https://someone.else"],
        "iss": issuer_v1(),
        "iat": NOW - 60,
        "nbf": NOW - 60,
        "exp": NOW + 3600,
        "appid": APP,
        "appidacr": "1",
        "oid": "oid-456",
        "sub": "sub-456",
        "tid": TENANT,
        "ver": "1.0"
    })
}

/// `base` with `changes` merged in (a null value removes the claim).
pub fn with(base: Value, changes: Value) -> Value {
    let (Value::Object(mut map), Value::Object(changes)) = (base, changes) else {
        panic!("claims are objects");
    };
    for (k, v) in changes {
        if v.is_null() {
            map.remove(&k);
        } else {
            map.insert(k, v);
        }
    }
    Value::Object(map)
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A clock the test moves by hand; its wall clock starts at [`NOW`].
pub fn fake_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Duration::from_secs(NOW)))
}

/// A fake Entra ID tenant on 127.0.0.1: the OpenID configuration and the key set, with hit counters.
#[derive(Debug)]
pub struct Idp {
    pub addr: SocketAddr,
    keys: Mutex<Vec<Value>>,
    up: std::sync::atomic::AtomicBool,
    config_hits: AtomicUsize,
    jwks_hits: AtomicUsize,
    hit: Notify,
    /// When set, key-set responses each wait for one permit.
    hold: Mutex<Option<Arc<Semaphore>>>,
}

impl Idp {
    pub async fn start(keys: Vec<Value>) -> Arc<Idp> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let idp = Arc::new(Idp {
            addr: listener.local_addr().expect("addr"),
            keys: Mutex::new(keys),
            up: std::sync::atomic::AtomicBool::new(true),
            config_hits: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
            hit: Notify::new(),
            hold: Mutex::new(None),
        });
        let server = Arc::clone(&idp);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let idp = Arc::clone(&server);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let idp = Arc::clone(&idp);
                        async move { Ok::<_, Infallible>(idp.handle(req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        idp
    }

    pub fn config_url(&self) -> String {
        format!(
            "http://{}/{TENANT}/v2.0/.well-known/openid-configuration",
            self.addr
        )
    }

    pub fn jwks_url(&self) -> String {
        format!("http://{}/{TENANT}/discovery/v2.0/keys", self.addr)
    }

    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.keys.lock().expect("keys") = keys;
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    pub fn config_hits(&self) -> usize {
        self.config_hits.load(Ordering::SeqCst)
    }

    pub fn jwks_hits(&self) -> usize {
        self.jwks_hits.load(Ordering::SeqCst)
    }

    /// From now on, each key-set response waits for a permit from the returned semaphore.
    pub fn hold_jwks(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.hold.lock().expect("hold") = Some(Arc::clone(&gate));
        gate
    }

    /// Waits until the key set has been requested at least `n` times (a guard, not a timing: 60 s).
    pub async fn wait_for_jwks_hits(&self, n: usize) {
        let wait = async {
            loop {
                let notified = self.hit.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.jwks_hits() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("the key set was not requested");
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        if path.ends_with("/.well-known/openid-configuration") {
            self.config_hits.fetch_add(1, Ordering::SeqCst);
            self.hit.notify_waiters();
            if !self.up.load(Ordering::SeqCst) {
                return respond(StatusCode::SERVICE_UNAVAILABLE, "down".into());
            }
            let doc = json!({
                "issuer": issuer_v2(),
                "token_endpoint": format!("http://{}/{TENANT}/oauth2/v2.0/token", self.addr),
                "jwks_uri": self.jwks_url(),
                "id_token_signing_alg_values_supported": ["RS256"],
            });
            return respond(StatusCode::OK, doc.to_string());
        }
        if path.ends_with("/discovery/v2.0/keys") {
            self.jwks_hits.fetch_add(1, Ordering::SeqCst);
            self.hit.notify_waiters();
            let gate = self.hold.lock().expect("hold").clone();
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate").forget();
            }
            if !self.up.load(Ordering::SeqCst) {
                return respond(StatusCode::SERVICE_UNAVAILABLE, "down".into());
            }
            let keys = self.keys.lock().expect("keys").clone();
            return respond(StatusCode::OK, json!({ "keys": keys }).to_string());
        }
        if path == "/big" {
            return respond(StatusCode::OK, "x".repeat(2 * 1024 * 1024));
        }
        if path == "/teapot" {
            return respond(StatusCode::IM_A_TEAPOT, "no".into());
        }
        respond(StatusCode::NOT_FOUND, "not found".into())
    }
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
