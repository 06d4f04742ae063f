//! The layer's behaviour against a real Redis: duplicates, blocked releases, errors, fail
//! closed/open, shadow mode, extraction results, and what happens when a caller goes away.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::{Calls, RedisServer};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{
    DefaultClassifier, IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, RedisStore, Settle,
    StoreErrorPolicy,
};

#[derive(Clone, Debug)]
struct Job {
    key: Option<&'static str>,
    /// What the inner service answers.
    answer: Answer,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Dispatched,
    Blocked,
    Fail,
    Slow,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Dispatched,
    Blocked,
}

#[derive(Debug, thiserror::Error)]
#[error("job failed")]
struct JobFailed;

fn job(key: &'static str, answer: Answer) -> Job {
    Job { key: Some(key), answer }
}

fn extract(job: &Job) -> Result<Option<IdempotencyKey>, KeyError> {
    job.key.map(IdempotencyKey::new).transpose()
}

/// An inner service that counts its calls and answers as the job says.
fn worker(calls: Calls) -> impl Service<Job, Response = Outcome, Error = JobFailed, Future = impl Send> + Clone {
    tower::service_fn(move |job: Job| {
        calls.hit();
        async move {
            match job.answer {
                Answer::Dispatched => Ok(Outcome::Dispatched),
                Answer::Blocked => Ok(Outcome::Blocked),
                Answer::Fail => Err(JobFailed),
                Answer::Slow => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(Outcome::Dispatched)
                }
            }
        }
    })
}

/// Releases on a blocked outcome, keeps otherwise.
fn release_when_blocked(result: &Result<Outcome, JobFailed>) -> Settle {
    match result {
        Ok(Outcome::Blocked) => Settle::Release,
        _ => Settle::Keep,
    }
}

async fn redis_layer(server: &RedisServer) -> IdempotencyLayer<fn(&Job) -> Result<Option<IdempotencyKey>, KeyError>> {
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect to test redis");
    IdempotencyLayer::new(store, extract as fn(&Job) -> _).with_namespace("test:")
}

async fn exists(server: &RedisServer, key: &str) -> bool {
    let mut conn = common::raw_conn(server).await;
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut conn)
        .await
        .unwrap()
        == 1
}

#[tokio::test]
async fn duplicate_is_short_circuited_without_calling_inner() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server).await.layer(worker(calls.clone()));

    assert_eq!(
        svc.clone().oneshot(job("k", Answer::Dispatched)).await.unwrap(),
        Outcome::Dispatched
    );
    let err = svc.clone().oneshot(job("k", Answer::Dispatched)).await.unwrap_err();
    assert!(
        matches!(&err, IdempotencyError::Duplicate { key, .. } if key.as_str() == "k"),
        "{err:?}"
    );
    assert_eq!(calls.get(), 1, "the duplicate never reached the inner service");
    // A different key is independent.
    assert_eq!(
        svc.oneshot(job("other", Answer::Dispatched)).await.unwrap(),
        Outcome::Dispatched
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn blocked_outcome_releases_the_claim() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server)
        .await
        .with_classifier(release_when_blocked)
        .layer(worker(calls.clone()));

    assert_eq!(
        svc.clone().oneshot(job("k", Answer::Blocked)).await.unwrap(),
        Outcome::Blocked
    );
    assert!(
        !exists(&server, "test:k").await,
        "a blocked dispatch leaves no claim behind"
    );
    // The next trigger may dispatch, and that one keeps its claim.
    assert_eq!(
        svc.clone().oneshot(job("k", Answer::Dispatched)).await.unwrap(),
        Outcome::Dispatched
    );
    assert!(exists(&server, "test:k").await);
    assert!(
        svc.oneshot(job("k", Answer::Dispatched))
            .await
            .unwrap_err()
            .is_duplicate()
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn inner_error_keeps_the_claim_by_default() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server).await.layer(worker(calls.clone()));

    let err = svc.clone().oneshot(job("k", Answer::Fail)).await.unwrap_err();
    assert!(matches!(err, IdempotencyError::Inner(JobFailed)));
    assert!(
        err.to_string().contains(&JobFailed.to_string()),
        "the inner error shows through Display: {err}"
    );
    assert!(
        svc.oneshot(job("k", Answer::Dispatched))
            .await
            .unwrap_err()
            .is_duplicate()
    );
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn inner_error_releases_when_configured() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server)
        .await
        .with_classifier(DefaultClassifier::new().on_error(Settle::Release))
        .layer(worker(calls.clone()));

    assert!(matches!(
        svc.clone().oneshot(job("k", Answer::Fail)).await,
        Err(IdempotencyError::Inner(_))
    ));
    assert!(!exists(&server, "test:k").await);
    assert_eq!(
        svc.oneshot(job("k", Answer::Dispatched)).await.unwrap(),
        Outcome::Dispatched
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn invalid_key_is_rejected_without_calling_inner() {
    let calls = Calls::default();
    let layer = IdempotencyLayer::new(MemoryStore::new(), extract as fn(&Job) -> _);
    let svc = layer.layer(worker(calls.clone()));
    let err = svc.oneshot(job("bad\nkey", Answer::Dispatched)).await.unwrap_err();
    match &err {
        IdempotencyError::InvalidKey { source } => {
            assert_eq!(
                source.downcast_ref::<KeyError>(),
                Some(&KeyError::ControlCharacter { index: 3 })
            )
        }
        other => panic!("expected InvalidKey, got {other:?}"),
    }
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn none_key_passes_through_unclaimed() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let calls = Calls::default();
    let svc = IdempotencyLayer::new(store.clone(), extract as fn(&Job) -> _).layer(worker(calls.clone()));
    for _ in 0..3 {
        let unkeyed = Job {
            key: None,
            answer: Answer::Dispatched,
        };
        assert_eq!(svc.clone().oneshot(unkeyed).await.unwrap(), Outcome::Dispatched);
    }
    assert_eq!(calls.get(), 3, "every unkeyed call dispatches");
    assert!(store.is_empty(), "and none takes a claim");
}

#[tokio::test]
async fn shadow_mode_dispatches_duplicates_but_still_claims() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server)
        .await
        .with_shadow_mode(true)
        .layer(worker(calls.clone()));
    for _ in 0..3 {
        assert_eq!(
            svc.clone().oneshot(job("k", Answer::Dispatched)).await.unwrap(),
            Outcome::Dispatched
        );
    }
    assert_eq!(calls.get(), 3, "shadow mode short-circuits nothing");
    assert!(
        exists(&server, "test:k").await,
        "but it takes real claims, so switching it off is safe"
    );
}

#[tokio::test]
async fn shadow_mode_dispatches_when_the_store_is_down() {
    let mut server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server)
        .await
        .with_shadow_mode(true)
        .layer(worker(calls.clone()));
    server.kill();
    assert_eq!(
        svc.oneshot(job("k", Answer::Dispatched)).await.unwrap(),
        Outcome::Dispatched
    );
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn store_down_fails_open_when_configured() {
    let mut server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server)
        .await
        .with_store_error_policy(StoreErrorPolicy::FailOpen)
        .layer(worker(calls.clone()));
    server.kill();
    for _ in 0..2 {
        assert_eq!(
            svc.clone().oneshot(job("k", Answer::Dispatched)).await.unwrap(),
            Outcome::Dispatched
        );
    }
    assert_eq!(
        calls.get(),
        2,
        "fail open dispatches every call while the store is down"
    );
}

#[test]
fn store_down_fails_closed_logs_and_reports_to_sentry() {
    let mut server = RedisServer::start();
    let calls = Calls::default();
    let mut outcome = None;
    let events = sentry::test::with_captured_events(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let svc = redis_layer(&server).await.layer(worker(calls.clone()));
            server.kill();
            let started = std::time::Instant::now();
            let result = svc.oneshot(job("k", Answer::Dispatched)).await;
            outcome = Some((result, started.elapsed()));
        });
    });
    let (result, elapsed) = outcome.unwrap();
    let err = result.unwrap_err();
    assert!(err.is_store_unavailable(), "{err:?}");
    assert_eq!(err.key().map(|k| k.as_str()), Some("k"));
    let source = std::error::Error::source(&err).expect("the store error is the source");
    assert!(
        source.to_string().contains("redis") || source.to_string().contains("answer"),
        "{source}"
    );
    assert_eq!(calls.get(), 0, "fail closed: nothing dispatched");
    assert!(elapsed < Duration::from_secs(1), "decided in {elapsed:?}");

    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert!(
        event.tags.contains_key("idempotency_store_down"),
        "tags: {:?}",
        event.tags
    );
    let ctx = format!("{:?}", event.contexts.get("idempotency"));
    assert!(ctx.contains("test:k"), "the key is in the event's context: {ctx}");
}

#[test]
fn sentry_tag_is_configurable() {
    let mut server = RedisServer::start();
    let events = sentry::test::with_captured_events(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let svc = redis_layer(&server)
                .await
                .with_sentry_tag("dedup_down")
                .layer(worker(Calls::default()));
            server.kill();
            assert!(
                svc.oneshot(job("k", Answer::Dispatched))
                    .await
                    .unwrap_err()
                    .is_store_unavailable()
            );
        });
    });
    assert_eq!(events.len(), 1);
    assert!(events[0].tags.contains_key("dedup_down"), "{:?}", events[0].tags);
}

#[tokio::test]
async fn dropped_while_claiming_releases_the_claim() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server).await.layer(worker(calls.clone()));
    // Freeze Redis so the claim is in flight when the caller gives up.
    server.freeze();
    let fut = svc.clone().oneshot(job("k", Answer::Dispatched));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), fut).await.is_err(),
        "still claiming"
    );
    server.thaw();
    // The SET lands when Redis resumes; the background release removes it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while exists(&server, "test:k").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "claim of a dropped caller still blocks the key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(calls.get(), 0);
    assert_eq!(
        svc.oneshot(job("k", Answer::Dispatched)).await.unwrap(),
        Outcome::Dispatched
    );
}

#[tokio::test]
async fn dropped_while_running_keeps_the_claim() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server).await.layer(worker(calls.clone()));
    let fut = svc.clone().oneshot(job("k", Answer::Slow));
    assert!(tokio::time::timeout(Duration::from_millis(200), fut).await.is_err());
    assert_eq!(calls.get(), 1, "the inner service was running");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        exists(&server, "test:k").await,
        "its claim is kept: the job may have had its effect"
    );
    assert!(
        svc.oneshot(job("k", Answer::Dispatched))
            .await
            .unwrap_err()
            .is_duplicate()
    );
}

#[tokio::test]
async fn phantom_claim_from_a_timed_out_reply_does_not_block_the_key() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = redis_layer(&server).await.layer(worker(calls.clone())); // 300 ms timeout, 300 s TTL
    server.freeze();
    let started = std::time::Instant::now();
    let err = svc.clone().oneshot(job("k", Answer::Dispatched)).await.unwrap_err();
    assert!(err.is_store_unavailable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "bounded by the timeout: {:?}",
        started.elapsed()
    );
    server.thaw();
    // The SET was queued in the frozen server and lands now, with a 300 s TTL. Cleanup must
    // remove it well before that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match svc.clone().oneshot(job("k", Answer::Dispatched)).await {
            Ok(Outcome::Dispatched) => break,
            Ok(other) => panic!("{other:?}"),
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "key still blocked: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn concurrent_callers_in_one_process_dispatch_once() {
    let server = RedisServer::start();
    let calls = Calls::default();
    for coalesce in [false, true] {
        let svc = redis_layer(&server)
            .await
            .with_namespace(if coalesce { "c:" } else { "n:" })
            .with_coalescing(coalesce)
            .layer(worker(calls.clone()));
        let before = calls.get();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let mut svc = svc.clone();
            let key: &'static str = ["a", "b", "c", "d"][i % 4];
            tasks.push(tokio::spawn(async move {
                svc.ready().await.unwrap().call(job(key, Answer::Dispatched)).await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert!(e.is_duplicate(), "{e:?}"),
            }
        }
        assert_eq!(ok, 4, "coalesce={coalesce}: one dispatch per key");
        assert_eq!(calls.get() - before, 4);
    }
}

/// Keep the type checker honest about `Infallible` inner services (as axum handlers are).
#[tokio::test]
async fn infallible_inner_service_works() {
    let layer = IdempotencyLayer::new(MemoryStore::new(), extract as fn(&Job) -> _);
    let svc = layer.layer(tower::service_fn(|_: Job| async { Ok::<_, Infallible>(()) }));
    svc.clone().oneshot(job("k", Answer::Dispatched)).await.unwrap();
    assert!(
        svc.oneshot(job("k", Answer::Dispatched))
            .await
            .unwrap_err()
            .is_duplicate()
    );
}
