//! Metrics through the `metrics` facade (checked with a debugging recorder) and the observer
//! hook: outcome counters, store latency, hold time, pending background work — labelled by layer
//! name and outcome, never by key.
#![cfg(feature = "metrics")]

mod faults_support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faults_support::key_of;
use faults_support::scripted::{Fault, ScriptedStore};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{Layer, ServiceExt};
use tower_idempotency::observe::{Observer, Outcome};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Settle};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One metric the recorder saw: name, labels, value.
type Seen = (String, Vec<(String, String)>, DebugValue);

/// Every metric the recorder saw.
fn snapshot(recorder: &metrics_util::debugging::Snapshotter) -> Vec<Seen> {
    recorder
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect()
}

fn find<'a>(metrics: &'a [Seen], name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    metrics
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|(_, _, v)| v)
}

#[test]
fn outcomes_store_latency_hold_time_and_background_work_are_recorded_by_layer_never_by_key() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            // The first claim's reply is lost: fail closed, and a background cleanup.
            let store = ScriptedStore::new(MemoryStore::new()).claims([Fault::TimeoutAfterApply(Duration::ZERO)]);
            let layer = IdempotencyLayer::new(store, key_of)
                .with_name("review")
                .with_ttl(Duration::from_millis(300))
                .with_classifier(|r: &Result<(), Infallible>| match r {
                    Ok(()) => Settle::Keep,
                    Err(_) => Settle::Release,
                })
                .build()
                .expect("valid settings");
            let svc = layer.layer(tower::service_fn(|_: String| async { Ok::<_, Infallible>(()) }));
            assert!(
                svc.clone().oneshot("secret-key-1".into()).await.is_err(),
                "failed closed"
            );
            assert!(svc.clone().oneshot("secret-key-2".into()).await.is_ok());
            assert!(svc.clone().oneshot("secret-key-2".into()).await.is_err(), "duplicate");
            assert!(svc.clone().oneshot("secret-key-3".into()).await.is_ok());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while layer.background_tasks() > 0 {
                assert!(tokio::time::Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    });
    let metrics = snapshot(&snapshotter);
    let outcome = |o: &str| find(&metrics, "idempotency.outcomes", &[("layer", "review"), ("outcome", o)]);
    assert_eq!(outcome("claimed"), Some(&DebugValue::Counter(2)), "{metrics:#?}");
    assert_eq!(
        outcome("duplicate_completed"),
        Some(&DebugValue::Counter(1)),
        "the first call completed its record"
    );
    assert_eq!(outcome("completed"), Some(&DebugValue::Counter(2)));
    assert_eq!(outcome("failed_closed"), Some(&DebugValue::Counter(1)));
    let claims = find(
        &metrics,
        "idempotency.store.duration",
        &[("layer", "review"), ("operation", "claim"), ("result", "ok")],
    );
    assert!(
        matches!(claims, Some(DebugValue::Histogram(v)) if v.len() == 3),
        "{claims:?}"
    );
    let failed = find(
        &metrics,
        "idempotency.store.duration",
        &[("operation", "claim"), ("result", "error")],
    );
    assert!(
        matches!(failed, Some(DebugValue::Histogram(v)) if v.len() == 1),
        "{failed:?}"
    );
    let holds = find(&metrics, "idempotency.hold.duration", &[("layer", "review")]);
    assert!(
        matches!(holds, Some(DebugValue::Histogram(v)) if v.len() == 2),
        "{holds:?}"
    );
    let cleanups = find(&metrics, "idempotency.store.duration", &[("operation", "cleanup")]);
    assert!(
        matches!(cleanups, Some(DebugValue::Histogram(v)) if !v.is_empty()),
        "{cleanups:?}"
    );
    assert!(
        matches!(find(&metrics, "idempotency.background.pending", &[("layer", "review")]), Some(DebugValue::Gauge(g)) if g.0 == 0.0),
        "pending work drained"
    );
    for (name, labels, _) in &metrics {
        assert!(
            labels.iter().all(|(_, v)| !v.contains("secret-key")),
            "{name} is labelled with a key: {labels:?}"
        );
    }
}

#[derive(Default)]
struct Recorded(Mutex<Vec<(String, Outcome)>>);

impl Observer for Recorded {
    fn outcome(&self, layer: &str, outcome: Outcome) {
        self.0.lock().unwrap().push((layer.to_owned(), outcome));
    }
}

#[test]
fn an_observer_sees_every_outcome_with_the_layer_name() {
    let seen = Arc::new(Recorded::default());
    runtime().block_on(async {
        let layer = IdempotencyLayer::new(MemoryStore::new(), key_of)
            .with_name("queue")
            .with_observer(seen.clone())
            .with_override(|job: &String| job.starts_with("again").then(|| "request-1".to_owned()))
            .build()
            .expect("valid settings");
        let svc = layer.layer(tower::service_fn(|_: String| async { Ok::<_, Infallible>(()) }));
        assert!(svc.clone().oneshot("k".into()).await.is_ok());
        assert!(svc.clone().oneshot("k".into()).await.is_err());
    });
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            ("queue".to_owned(), Outcome::Claimed),
            ("queue".to_owned(), Outcome::Completed),
            ("queue".to_owned(), Outcome::DuplicateCompleted)
        ]
    );
}
