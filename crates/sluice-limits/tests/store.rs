//! The memory store through the `CounterStore` trait, as the policies use it: concurrency on a multi-threaded
//! runtime, the reserve → refuse → wait Retry-After → succeed cycle with APIM's messages, and the bounds on
//! client-driven state (the cap with its evictions, and purging beside the requests).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_limits::{
    Clock, CounterStore, Exceeded, Limit, ManualClock, MemoryStore, Period, SystemClock, Usage,
    Window, client_key, rate_limit_message, retry_after_secs, token_limit_message,
    token_quota_message,
};

const T0: u64 = 1_700_000_040_000;

fn store() -> (Arc<ManualClock>, Arc<dyn CounterStore>) {
    let clock = Arc::new(ManualClock::from_millis(T0));
    let store: Arc<dyn CounterStore> = Arc::new(MemoryStore::new(clock.clone()));
    (clock, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_on_one_key_never_exceed_the_limit() {
    let (_clock, store) = store();
    let limit = Limit::new(1_000, Window::Sliding(Duration::from_secs(60)));
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (store, limit, admitted) = (store.clone(), limit.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                if store.reserve("shared", &limit, 1).await.is_ok() {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task finished");
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    assert_eq!(store.peek("shared", &limit).await.used, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserve_and_reconcile_keep_exact_totals_on_many_keys() {
    let (_clock, store) = store();
    let tpm = Limit::new(10_000, Window::Sliding(Duration::from_secs(60)));
    let quota = Limit::new(1_000_000, Window::Calendar(Period::Monthly));
    let keys: Vec<String> = (0..8).map(|i| format!("team-{i}")).collect();
    // Per key: the sum of the actual amounts of admitted requests.
    let charged: Arc<Vec<AtomicU64>> =
        Arc::new((0..keys.len()).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for worker in 0..16u64 {
        let (store, tpm, quota, keys, charged) = (
            store.clone(),
            tpm.clone(),
            quota.clone(),
            keys.clone(),
            charged.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let k = usize::try_from((worker + i) % 8).unwrap_or(0);
                // Reserve an estimate of 100, then charge the real usage (37..=162).
                let actual = 37 + (worker * 31 + i * 17) % 126;
                let Ok(tokens) = store.reserve(&keys[k], &tpm, 100).await else {
                    continue;
                };
                let Ok(calls) = store.reserve(&keys[k], &quota, 100).await else {
                    store.reconcile(&tokens, 0).await;
                    continue;
                };
                tokio::task::yield_now().await;
                store.reconcile(&tokens, actual).await;
                store.reconcile(&calls, actual).await;
                charged[k].fetch_add(actual, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task finished");
    }
    for (k, key) in keys.iter().enumerate() {
        let expected = charged[k].load(Ordering::Relaxed);
        assert!(expected > 0);
        assert_eq!(store.peek(key, &tpm).await.used, expected, "{key}");
        assert_eq!(store.peek(key, &quota).await.used, expected, "{key}");
    }
}

#[tokio::test]
async fn a_refused_caller_that_waits_retry_after_gets_in() {
    let (clock, store) = store();
    let limit = Limit::new(5, Window::Sliding(Duration::from_secs(60)));
    for i in 0..5 {
        clock.advance(Duration::from_millis(1_234));
        store
            .reserve("sub-1", &limit, 1)
            .await
            .unwrap_or_else(|e| panic!("call {i} refused: {e:?}"));
    }
    clock.advance(Duration::from_millis(10_000));
    let refused = store
        .reserve("sub-1", &limit, 1)
        .await
        .expect_err("sixth call refused");
    assert_eq!(refused.used, 5);
    // The header and the message say the same whole number of seconds, rounded up.
    // The first call (at +1.234 s) expires at +61.234 s; it is now +16.170 s.
    assert_eq!(refused.retry_after, Duration::from_millis(45_064));
    let secs = retry_after_secs(refused.retry_after);
    assert_eq!(secs, 46);
    assert_eq!(
        rate_limit_message(refused.retry_after),
        "Rate limit is exceeded. Try again in 46 seconds."
    );
    // A client honouring the header gets in.
    clock.advance(Duration::from_secs(secs));
    store
        .reserve("sub-1", &limit, 1)
        .await
        .expect("admitted after Retry-After");
}

#[tokio::test]
async fn token_limit_flow_estimate_then_usage() {
    let (clock, store) = store();
    let tpm = Limit::new(1_000, Window::Sliding(Duration::from_secs(60)));
    let daily = Limit::new(1_500, Window::Calendar(Period::Daily));
    // Estimated prompt 300; the response reports 900 in total.
    let reservation = store.reserve("app", &tpm, 300).await.expect("fits");
    assert_eq!(reservation.remaining(), 700);
    store.reconcile(&reservation, 900).await;
    assert_eq!(
        store.peek("app", &tpm).await,
        Usage {
            used: 900,
            remaining: 100,
            retry_after: None
        }
    );
    // A 200-token prompt does not fit in the remaining 100 until the first call's tokens expire.
    clock.advance(Duration::from_secs(20));
    let Exceeded { retry_after, .. } = store.reserve("app", &tpm, 200).await.expect_err("over");
    assert_eq!(retry_after, Duration::from_secs(40));
    assert_eq!(
        token_limit_message(retry_after),
        "Token limit is exceeded. Try again in 40 seconds."
    );
    // The quota counts the same usage until the end of the UTC day.
    let q = store.reserve("app", &daily, 0).await.expect("fits");
    store.reconcile(&q, 1_500).await;
    let over = store
        .reserve("app", &daily, 0)
        .await
        .expect_err("quota spent");
    let day_ms = 86_400_000;
    assert_eq!(
        over.retry_after,
        Duration::from_millis(day_ms - (T0 + 20_000) % day_ms)
    );
    assert!(
        token_quota_message(over.retry_after)
            .starts_with("Token quota is exceeded. Try again in 1 hours, 45 minutes and ")
    );
}

#[tokio::test]
async fn system_clock_store_works() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = MemoryStore::new(clock);
    // Sliding, so that no window boundary can fall between the steps.
    let limit = Limit::new(2, Window::Sliding(Duration::from_secs(3_600)));
    let first = store.reserve("k", &limit, 1).await.expect("fits");
    store.reconcile(&first, 2).await;
    let refused = store.reserve("k", &limit, 1).await.expect_err("full");
    assert!(refused.retry_after <= Duration::from_secs(3_600));
    assert_eq!(store.purge_expired(), 0);
    assert_eq!(store.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_new_keys_never_exceed_the_cap() {
    let clock = Arc::new(ManualClock::from_millis(T0));
    let store = Arc::new(MemoryStore::with_max_keys(clock, 3_000));
    let limit = Limit::new(5, Window::Sliding(Duration::from_secs(60)));
    let mut tasks = Vec::new();
    for worker in 0..16u64 {
        let (store, limit) = (store.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..1_000u64 {
                // Distinct keys, each reconciled (some of them after their counter was evicted).
                let key = client_key("calls", "ip", format!("{worker}.{i}").as_bytes());
                let r = store
                    .reserve(&key, &limit, 1)
                    .await
                    .expect("a new key fits");
                if i % 3 == 0 {
                    tokio::task::yield_now().await;
                }
                store.reconcile(&r, 2).await;
                assert!(store.len() <= 3_000);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task finished");
    }
    assert!(store.len() <= 3_000);
    // Every new key was inserted once; all but those still held were evicted.
    assert_eq!(
        store.evictions(),
        16_000 - u64::try_from(store.len()).unwrap_or(0)
    );
    assert!(store.len() > 2_000, "shards fill up to their share");
    assert_eq!(store.purge_expired(), 0);
}

#[tokio::test]
async fn purge_off_the_request_path_keeps_live_reservations_reconcilable() {
    let (clock, _) = store();
    let store = MemoryStore::with_max_keys(clock.clone(), 10);
    let tpm = Limit::new(1_000, Window::Sliding(Duration::from_secs(60)));
    // A streamed request that reserved nothing up front, and one that reserved its prompt.
    let zero = store.reserve("a", &tpm, 0).await.expect("fits");
    let prompt = store.reserve("b", &tpm, 100).await.expect("fits");
    clock.advance(Duration::from_secs(30));
    // The background purge runs meanwhile: "a" holds nothing live, "b" does.
    assert_eq!(store.purge_expired(), 1);
    assert_eq!(store.len(), 1);
    store.reconcile(&zero, 400).await;
    store.reconcile(&prompt, 700).await;
    assert_eq!(store.peek("a", &tpm).await.used, 400);
    assert_eq!(store.peek("b", &tpm).await.used, 700);
    assert_eq!(store.evictions(), 0);
}
