use std::time::Duration;
use sluice_sim::*;
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn manual_serve() {
    let mut cfg = RegionConfig::new("eastus");
    cfg.api_key = Some("k".into());
    cfg.latency.per_token = Duration::from_millis(20);
    cfg.default_tokens_per_minute = Some(100_000);
    let h = Simulator::start("127.0.0.1:0".parse().unwrap(), cfg).await.unwrap();
    std::fs::write("/tmp/simcheck/url", h.url()).unwrap();
    tokio::time::sleep(Duration::from_secs(90)).await;
}
