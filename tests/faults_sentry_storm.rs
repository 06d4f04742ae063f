//! A storm of identical store errors must not become a storm of identical Sentry events.
//!
//! Policy (src/report.rs, docs/RELIABILITY.md): every store error is logged; Sentry gets at most
//! one event per error kind per report interval (default 10 s), and the next event of that kind
//! carries `suppressed_since_last_event`, so the count is never lost.

mod faults_support;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use faults_support::{Dispatches, Outcome, current_thread_runtime, key_of, timed_call};
use sentry::protocol::{Context, Event, Value};
use tokio::time::Instant;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, RedisStore};

/// A URL where nothing listens: every call is refused at once, the same error every time.
fn dead_redis_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("redis://127.0.0.1:{port}")
}

fn idempotency_context(event: &Event<'static>) -> BTreeMap<String, Value> {
    match event.contexts.get("idempotency") {
        Some(Context::Other(map)) => map.clone().into_iter().collect(),
        other => panic!("event without the idempotency context: {other:?}"),
    }
}

fn kind_tag(event: &Event<'static>) -> String {
    event
        .tags
        .get("idempotency_store_down")
        .cloned()
        .unwrap_or_else(|| panic!("event without the store-down tag: {event:#?}"))
}

#[test]
fn store_error_storm_sends_one_event_per_kind_per_interval_with_suppressed_count() {
    const INTERVAL: Duration = Duration::from_secs(2);
    const STORM: usize = 300;
    let mut storm_kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut storm_took = Duration::ZERO;
    let mut dispatched = usize::MAX;
    let events = sentry::test::with_captured_events(|| {
        current_thread_runtime().block_on(async {
            let store = RedisStore::builder(dead_redis_url())
                .timeout(Duration::from_millis(300))
                .connect_lazy()
                .expect("a lazy store builds without Redis");
            let layer = IdempotencyLayer::new(store, key_of).with_report_interval(INTERVAL);
            let dispatches = Dispatches::default();
            let svc = layer.layer(dispatches.service());
            let origin = Instant::now();

            let storm =
                futures::future::join_all((0..STORM).map(|i| timed_call(svc.clone(), format!("storm-{i}"), origin)))
                    .await;
            storm_took = origin.elapsed();
            for r in &storm {
                match r.outcome {
                    Outcome::StoreUnavailable(kind) => *storm_kinds.entry(kind).or_default() += 1,
                    ref other => panic!("a call to a dead Redis did not fail closed: {other:?}"),
                }
            }
            // Past the interval, the next error of each kind is reported again, with the count.
            // Every storm event was sent before the storm ended, so one interval after its end
            // is past the interval of each, however late the first error came.
            tokio::time::sleep(INTERVAL + Duration::from_millis(100)).await;
            let after = timed_call(svc.clone(), "after-interval".into(), origin).await;
            assert!(after.outcome.is_unavailable());
            dispatched = dispatches.total();
        })
    });
    eprintln!(
        "storm: {STORM} fail-closed calls in {storm_took:?} ({storm_kinds:?}) produced {} Sentry events",
        events.len()
    );

    assert_eq!(dispatched, 0, "nothing may dispatch while the store is down");
    assert!(
        storm_took < INTERVAL,
        "the storm must fit in one report interval for this test to mean anything: {storm_took:?}"
    );
    // The storm: exactly one event per kind, the first of its kind, with nothing suppressed yet.
    let storm_events = &events[..storm_kinds.len()];
    let mut seen = BTreeMap::new();
    for e in storm_events {
        let kind = kind_tag(e);
        assert!(
            storm_kinds.contains_key(kind.as_str()),
            "event for a kind no call saw: {kind}"
        );
        assert_eq!(
            seen.insert(kind.clone(), ()),
            None,
            "two events of kind {kind} in one interval"
        );
        let ctx = idempotency_context(e);
        assert_eq!(ctx.get("suppressed_since_last_event"), Some(&Value::from(0u64)));
        assert_eq!(ctx.get("failed_closed"), Some(&Value::from(true)));
        assert!(
            ctx.get("key")
                .and_then(Value::as_str)
                .is_some_and(|k| k.starts_with("storm-")),
            "the event names the key: {ctx:?}"
        );
        assert_eq!(e.level, sentry::Level::Error);
    }
    // After the interval: one more event, carrying how many were suppressed in between.
    assert_eq!(
        events.len(),
        storm_kinds.len() + 1,
        "{STORM} identical errors must not produce {STORM} events: {events:#?}"
    );
    let last = events.last().expect("the post-interval event");
    let kind = kind_tag(last);
    let in_storm = storm_kinds.get(kind.as_str()).copied().unwrap_or(0);
    assert_eq!(
        idempotency_context(last).get("suppressed_since_last_event"),
        Some(&Value::from(in_storm.saturating_sub(1))),
        "the post-interval event counts every suppressed `{kind}` error"
    );
}

#[test]
fn zero_report_interval_reports_every_store_error() {
    let events = sentry::test::with_captured_events(|| {
        current_thread_runtime().block_on(async {
            let store = RedisStore::builder(dead_redis_url())
                .timeout(Duration::from_millis(300))
                .connect_lazy()
                .expect("lazy store");
            let layer = IdempotencyLayer::new(store, key_of).with_report_interval(Duration::ZERO);
            let svc = layer.layer(Dispatches::default().service());
            let origin = Instant::now();
            for i in 0..5 {
                assert!(
                    timed_call(svc.clone(), format!("k{i}"), origin)
                        .await
                        .outcome
                        .is_unavailable()
                );
            }
        })
    });
    assert_eq!(events.len(), 5, "with a zero interval every error is an event");
}

#[test]
fn sentry_tag_name_and_value_are_configurable() {
    let events = sentry::test::with_captured_events(|| {
        current_thread_runtime().block_on(async {
            let store = RedisStore::builder(dead_redis_url())
                .timeout(Duration::from_millis(300))
                .connect_lazy()
                .expect("lazy store");
            let layer = IdempotencyLayer::new(store, key_of)
                .with_sentry_tag("source")
                .with_sentry_tag_value("review_dedup_redis_down");
            let svc = layer.layer(Dispatches::default().service());
            let origin = Instant::now();
            assert!(timed_call(svc, "tagged".into(), origin).await.outcome.is_unavailable());
        })
    });
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].tags.get("source").map(String::as_str),
        Some("review_dedup_redis_down")
    );
    assert_eq!(
        events[0].tags.get("idempotency_error_kind").map(String::as_str),
        Some("connection_refused")
    );
}
