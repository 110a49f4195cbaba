//! The real fetcher against a server on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Idp, keys};
use sluice_auth::{Fetch, HttpFetch};

#[tokio::test]
async fn fetches_documents_and_reports_failures() {
    let idp = Idp::start(vec![keys().a.jwk("key-a")]).await;
    let fetch = HttpFetch::new(Duration::from_secs(10)).expect("client");

    let body = fetch.get(&idp.jwks_url()).await.expect("key set");
    let doc: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(doc["keys"][0]["kid"], "key-a");

    let err = fetch
        .get(&format!("http://{}/teapot", idp.addr))
        .await
        .expect_err("418 is a failure");
    assert!(err.contains("418"), "{err}");

    let err = fetch
        .get(&format!("http://{}/big", idp.addr))
        .await
        .expect_err("too large");
    assert!(err.contains("larger than"), "{err}");

    idp.set_up(false);
    let err = fetch.get(&idp.jwks_url()).await.expect_err("503");
    assert!(err.contains("503"), "{err}");
}

#[tokio::test]
async fn connection_refused_is_an_error() {
    // A port that was just free: bind, note it, release it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let fetch = HttpFetch::new(Duration::from_secs(10)).expect("client");
    let err = fetch
        .get(&format!("http://127.0.0.1:{port}/keys"))
        .await
        .expect_err("nothing listens");
    assert!(!err.is_empty());
    let err = fetch.get("not a url").await.expect_err("bad URL");
    assert!(!err.is_empty());
}
