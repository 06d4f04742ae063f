//! Regression tests for the paths where the crate's promises broke (issue "Trust": at most one
//! dispatch across processes, no decision without a bound, no job lost). One test per path,
//! named after it; Redis paths run against a real `redis-server` the test starts.

mod common;
mod faults_support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::RedisServer;
use faults_support::scripted::{Fault, ScriptedStore};
use faults_support::{Dispatches, LogCapture, key_of};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
use tower_idempotency::{
    ConfigError, IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, RedisStore, Settle,
    StoreError, StoreErrorPolicy,
};

/// Path 1: `let a = svc.call(k); let b = svc.call(k); b.await` hung — the leader's store call
/// only ran when the leader was polled, and the follower's wait had no bound.
#[tokio::test]
async fn coalescing_follower_decides_when_the_leader_is_never_polled() {
    let dispatches = Dispatches::default();
    let layer = IdempotencyLayer::new(MemoryStore::new(), key_of)
        .with_coalescing(true)
        .build()
        .expect("valid settings");
    let mut svc = layer.layer(dispatches.service());
    let a = svc.ready().await.unwrap().call("k".to_owned());
    let b = svc.ready().await.unwrap().call("k".to_owned());
    let b = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("the follower decided without the leader being polled");
    assert!(b.is_ok(), "the follower drove the claim and dispatched: {b:?}");
    let a = tokio::time::timeout(Duration::from_secs(5), a)
        .await
        .expect("leader decides");
    assert!(matches!(a, Err(IdempotencyError::Duplicate { .. })), "{a:?}");
    assert_eq!(dispatches.total(), 1);
}

/// Path 1, with a slow store: a follower decides within the store's own bound plus a margin,
/// whoever polls what.
#[tokio::test]
async fn coalescing_follower_decides_within_the_store_bound_whoever_polls() {
    const STORE_BOUND: Duration = Duration::from_millis(300);
    let store = ScriptedStore::new(MemoryStore::new()).claims([Fault::TimeoutBeforeApply(STORE_BOUND)]);
    let layer = IdempotencyLayer::new(store, key_of)
        .with_coalescing(true)
        .build()
        .expect("valid settings");
    let mut svc = layer.layer(Dispatches::default().service());
    let _leader_never_polled = svc.ready().await.unwrap().call("slow".to_owned());
    let started = Instant::now();
    let follower = svc.ready().await.unwrap().call("slow".to_owned()).await;
    let took = started.elapsed();
    assert!(
        follower.as_ref().is_err_and(IdempotencyError::is_store_unavailable),
        "{follower:?}"
    );
    assert!(took < STORE_BOUND + Duration::from_secs(1), "decided after {took:?}");
}

/// Path 2: 8 concurrent callers, the first claim times out, fail-open: 2 dispatches without
/// coalescing, 8 with it (every follower copied the error and failed open).
#[tokio::test]
async fn coalescing_under_fail_open_never_dispatches_more_than_without() {
    async fn burst(coalesce: bool) -> usize {
        let store =
            ScriptedStore::new(MemoryStore::new()).claims([Fault::TimeoutBeforeApply(Duration::from_millis(50))]);
        let dispatches = Dispatches::default();
        let layer = IdempotencyLayer::new(store, key_of)
            .with_coalescing(coalesce)
            .with_store_error_policy(StoreErrorPolicy::FailOpen)
            .build()
            .expect("valid settings");
        let svc = layer.layer(dispatches.service());
        let calls = (0..8).map(|_| svc.clone().oneshot("burst".to_owned()));
        for result in futures::future::join_all(calls).await {
            assert!(
                result.is_ok() || result.as_ref().is_err_and(IdempotencyError::is_duplicate),
                "{result:?}"
            );
        }
        dispatches.total()
    }
    let without = burst(false).await;
    let with = burst(true).await;
    assert_eq!(without, 2, "the timed-out caller fails open, one other caller acquires");
    assert!(
        with <= without,
        "coalescing dispatched {with} times, without it {without}"
    );
    assert_eq!(with, 1, "one store answer, one dispatch");
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Dispatched,
    Blocked,
}

/// Path 3: a blocked job whose release failed was logged at `warn` and its claim stayed for
/// the whole TTL; the stream worker met its own stale claim on retry and acked it as a
/// duplicate — nothing ever ran it. Now the caller is told (`ReleaseFailed`: do not ack), the
/// release is retried in the background, and the job's retry dispatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_job_whose_release_fails_is_retried_and_not_lost() {
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(200))
        .connect()
        .await
        .expect("connect");
    let layer = IdempotencyLayer::new(store, key_of)
        .with_ttl(Duration::from_secs(60))
        .with_classifier(|r: &Result<Job, Infallible>| match r {
            Ok(Job::Blocked) => Settle::Release,
            _ => Settle::Keep,
        })
        .build()
        .expect("valid settings");
    let pid = server.pid();
    let blocked_while_redis_hangs = layer.layer(tower::service_fn(move |_: String| async move {
        // The capacity gate says "not now"; Redis stops answering before the release.
        signal(pid, "STOP");
        Ok::<_, Infallible>(Job::Blocked)
    }));
    let result = blocked_while_redis_hangs.oneshot("pr:1:abc".to_owned()).await;
    assert!(
        matches!(result, Err(IdempotencyError::ReleaseFailed { ref key, .. }) if key.as_str() == "pr:1:abc"),
        "the caller must learn that the claim still stands: {result:?}"
    );
    assert_eq!(layer.background_tasks(), 1, "the release is retried in the background");
    signal(pid, "CONT");

    // The background release goes through once Redis answers; then the job's retry runs it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while layer.background_tasks() > 0 || server.cli(&["EXISTS", "pr:1:abc"]) == "1" {
        assert!(Instant::now() < deadline, "the failed release was never retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retry = layer
        .layer(tower::service_fn(|_: String| async {
            Ok::<_, Infallible>(Job::Dispatched)
        }))
        .oneshot("pr:1:abc".to_owned())
        .await;
    assert_eq!(retry.ok(), Some(Job::Dispatched), "the retried job dispatches");
}

/// Path 3, for a queue consumer with a stable owner identity (the message id): its retry finds
/// its own stale claim and dispatches, instead of acking it as a duplicate.
#[tokio::test]
async fn retry_of_the_same_job_under_its_owner_identity_is_not_a_duplicate_of_itself() {
    #[derive(Clone)]
    struct Msg {
        id: &'static str,
        key: &'static str,
    }
    let store = ScriptedStore::new(MemoryStore::new()).releases([Fault::Refused]);
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(store, |m: &Msg| -> Result<_, KeyError> {
        IdempotencyKey::new(m.key).map(Some)
    })
    .with_owner(|m: &Msg| Some(m.id.to_owned()))
    .with_classifier(|r: &Result<Job, Infallible>| match r {
        Ok(Job::Blocked) => Settle::Release,
        _ => Settle::Keep,
    })
    .build()
    .expect("valid settings");
    let r = runs.clone();
    let svc = layer.layer(tower::service_fn(move |_: Msg| {
        let n = r.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(if n == 0 { Job::Blocked } else { Job::Dispatched }) }
    }));
    let msg = Msg {
        id: "1700000000000-0",
        key: "pr:2:def",
    };
    let first = svc.clone().oneshot(msg.clone()).await;
    assert!(
        first.as_ref().is_err_and(IdempotencyError::is_release_failed),
        "{first:?}"
    );
    // The message is redelivered at once, while its claim still stands.
    let retry = svc.clone().oneshot(msg.clone()).await;
    assert_eq!(
        retry.ok(),
        Some(Job::Dispatched),
        "the same job is recognised as the claim's owner"
    );
    let other = svc
        .oneshot(Msg {
            id: "1700000000001-0",
            key: "pr:2:def",
        })
        .await;
    assert!(other.as_ref().is_err_and(IdempotencyError::is_duplicate), "{other:?}");
}

/// Path 4: the cluster client resends a request after a dropped connection; if the first
/// `SET NX` landed, the resend got `nil`, read as "already claimed": nobody dispatched. A claim
/// that finds its own token is now `Acquired`. (The proxy-level reproduction over a real
/// cluster connection is in tests/regression_cluster_resend_own_claim.rs.)
#[tokio::test]
async fn resent_claim_that_finds_its_own_token_is_acquired_not_duplicate() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.expect("connect");
    let token = ClaimToken::generate();
    let ttl = Duration::from_secs(60);
    assert_eq!(
        store.claim("pr:3:aaa", &token, ttl).await.unwrap(),
        ClaimOutcome::Acquired
    );
    assert_eq!(
        store.claim("pr:3:aaa", &token, ttl).await.unwrap(),
        ClaimOutcome::Acquired,
        "the resend is ours"
    );
    assert_eq!(
        store.claim("pr:3:aaa", &ClaimToken::generate(), ttl).await.unwrap(),
        ClaimOutcome::AlreadyClaimed
    );
}

/// Path 5: a leader dropped after its `SET` landed (the HTTP client disconnected): followers
/// claimed for themselves, got `nil` (the leader's claim) and all answered duplicate, while the
/// leader's cleanup deleted the claim. Nobody dispatched.
#[tokio::test]
async fn leader_dropped_after_its_claim_landed_hands_the_claim_to_a_follower() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.expect("connect");
    let dispatches = Dispatches::default();
    let layer = IdempotencyLayer::new(store, key_of)
        .with_coalescing(true)
        .build()
        .expect("valid settings");
    let mut svc = layer.layer(dispatches.service());
    let mut leader = Box::pin(svc.ready().await.unwrap().call("pr:5:abc".to_owned()));
    assert!(futures::poll!(leader.as_mut()).is_pending(), "the claim is on the wire");
    // The SET lands in Redis; its reply waits for whoever polls next.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.cli(&["EXISTS", "pr:5:abc"]) != "1" {
        assert!(Instant::now() < deadline, "the claim never landed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Followers join the leader's claim (`call` runs now, unlike a lazy `oneshot`).
    let mut followers = Vec::new();
    for _ in 0..4 {
        followers.push(svc.ready().await.unwrap().call("pr:5:abc".to_owned()));
    }
    drop(leader);
    let answers = futures::future::join_all(followers).await;
    let dispatched = answers.iter().filter(|r| r.is_ok()).count();
    assert_eq!(dispatched, 1, "one follower takes the landed claim over: {answers:?}");
    assert_eq!(dispatches.total(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.cli(&["EXISTS", "pr:5:abc"]),
        "1",
        "the dispatcher's claim is kept"
    );
    assert_eq!(
        layer.background_tasks(),
        0,
        "nothing to clean up: the claim has a holder"
    );
}

/// Path 6: phantom cleanup gave up after two "absent" answers ~50 ms apart; a `SET` landing
/// later (through another connection, or resent) blocked the key for the whole TTL. Now a
/// possibly landed claim is watched for 10 s after the store first answers, and removed within
/// about a second of landing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phantom_claim_landing_after_the_first_cleanup_check_is_removed_within_the_bound() {
    let server = RedisServer::start();
    let redis = RedisStore::connect(server.url()).await.expect("connect");
    // The claim's reply is lost before it reached Redis; the command is "still in flight".
    let store = Arc::new(ScriptedStore::new(redis).claims([Fault::TimeoutBeforeApply(Duration::ZERO)]));
    let layer = IdempotencyLayer::new(store.clone(), key_of)
        .with_ttl(Duration::from_secs(120))
        .build()
        .expect("valid settings");
    let result = layer
        .layer(Dispatches::default().service())
        .oneshot("pr:6:abc".to_owned())
        .await;
    assert!(
        result.as_ref().is_err_and(IdempotencyError::is_store_unavailable),
        "{result:?}"
    );
    let token = store.tokens.lock().unwrap()[0].clone();

    // Wait for the cleanup's first check ("not there"), then land the phantom through a
    // different connection, as a buffered or resent SET would.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.release_calls() == 0 {
        assert!(Instant::now() < deadline, "no cleanup was started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let landed = server.cli(&["SET", "pr:6:abc", token.as_str(), "NX", "PX", "120000"]);
    assert_eq!(landed, "OK");
    let landed_at = Instant::now();
    while server.cli(&["EXISTS", "pr:6:abc"]) == "1" {
        // The bound is one check interval (1 s) plus a round trip; the margin is for a busy CI.
        assert!(
            landed_at.elapsed() < Duration::from_secs(4),
            "a late phantom blocked the key for {:?}",
            landed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "phantom landed after the first check was removed {:?} later",
        landed_at.elapsed()
    );
}

/// Path 7: every refused connection counted as "may have applied" and spawned a cleanup task
/// retrying for up to the TTL: 200 refused claims left 201 live tasks.
#[tokio::test]
async fn refused_claims_during_an_outage_leave_no_background_work() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // A bound long enough that, even on a loaded machine, every call ends with the refusal
    // (after the connection's own retries) and not with our timeout, which may have applied.
    let store = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
        .expect("lazy store");
    let layer = IdempotencyLayer::new(store, key_of).build().expect("valid settings");
    let svc = layer.layer(Dispatches::default().service());
    let calls = (0..200).map(|i| svc.clone().oneshot(format!("refused-{i}")));
    for result in futures::future::join_all(calls).await {
        let Err(IdempotencyError::StoreUnavailable { source, .. }) = &result else {
            panic!("{result:?}")
        };
        assert!(
            !source.may_have_applied(),
            "a refused connection carried nothing: {source}"
        );
    }
    assert_eq!(layer.background_tasks(), 0);
}

/// Path 7, the other half: claims that may have landed are looked after by one owner, one job
/// per key, each ending by its deadline.
#[tokio::test]
async fn background_cleanups_are_one_per_key_and_end_by_their_deadline() {
    let store = ScriptedStore::new(MemoryStore::new())
        .claims(std::iter::repeat_n(Fault::TimeoutAfterApply(Duration::ZERO), 50));
    let ttl = Duration::from_millis(500);
    let layer = IdempotencyLayer::new(store, key_of)
        .with_ttl(ttl)
        .build()
        .expect("valid settings");
    let svc = layer.layer(Dispatches::default().service());
    // 50 lost replies over 5 keys.
    let calls = (0..50).map(|i| svc.clone().oneshot(format!("lost-{}", i % 5)));
    futures::future::join_all(calls).await;
    let pending = layer.background_tasks();
    assert!(pending <= 50, "{pending}");
    let deadline = Instant::now() + ttl + Duration::from_secs(3);
    while layer.background_tasks() > 0 {
        assert!(Instant::now() < deadline, "background work outlived its deadline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path 8: under fail-open (or shadow mode) the cleanup of a timed-out claim deleted the claim
/// that protected the job dispatched anyway; the next trigger dispatched again.
#[tokio::test]
async fn fail_open_dispatch_keeps_the_claim_that_may_have_landed() {
    for shadow in [false, true] {
        let store =
            ScriptedStore::new(MemoryStore::new()).claims([Fault::TimeoutAfterApply(Duration::from_millis(20))]);
        let dispatches = Dispatches::default();
        let layer = IdempotencyLayer::new(store, key_of)
            .with_store_error_policy(StoreErrorPolicy::FailOpen)
            .with_shadow_mode(shadow)
            .build()
            .expect("valid settings");
        let svc = layer.layer(dispatches.service());
        assert!(svc.clone().oneshot("pr:8:abc".to_owned()).await.is_ok(), "failed open");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(layer.background_tasks(), 0, "no cleanup of the protecting claim");
        let next = svc.oneshot("pr:8:abc".to_owned()).await;
        if shadow {
            assert!(next.is_ok(), "shadow mode dispatches everything");
        } else {
            assert!(next.as_ref().is_err_and(IdempotencyError::is_duplicate), "{next:?}");
            assert_eq!(dispatches.total(), 1, "the landed claim protects the job that ran");
        }
    }
}

/// Path 9: `with_ttl(Duration::ZERO)` turned deduplication off, `with_ttl(Duration::MAX)`
/// panicked inside the call, a zero renewal busy-looped, a renewal ≥ the TTL lost claims, and
/// `timeout * 4` could overflow. All are refused when built, with what to change.
#[tokio::test]
async fn settings_that_cannot_work_are_refused_when_the_layer_is_built() {
    let layer = || IdempotencyLayer::new(MemoryStore::new(), key_of);
    let ttl = Duration::from_secs(30);
    let refused = |l: Result<_, ConfigError>| l.map(|_| ()).unwrap_err();
    assert_eq!(refused(layer().with_ttl(Duration::ZERO).build()), ConfigError::ZeroTtl);
    assert!(matches!(
        refused(layer().with_ttl(Duration::MAX).build()),
        ConfigError::TtlTooLong { .. }
    ));
    let zero = refused(layer().with_ttl(ttl).with_renewal(Duration::ZERO).build());
    assert!(zero.to_string().contains("with_renewal"), "{zero}");
    let slow = refused(layer().with_ttl(ttl).with_renewal(ttl).build());
    assert!(
        matches!(slow, ConfigError::RenewalNotBelowTtl { suggested, .. } if suggested == Duration::from_secs(10)),
        "{slow}"
    );
    assert_eq!(
        refused(layer().with_max_hold(Duration::ZERO).build()),
        ConfigError::ZeroMaxHold
    );

    // Used without `build()`, invalid settings refuse every call: no silent dispatch, no panic.
    let dispatches = Dispatches::default();
    for bad in [Duration::ZERO, Duration::MAX] {
        let svc = layer().with_ttl(bad).layer(dispatches.service());
        let result = svc.oneshot("k".to_owned()).await;
        assert!(
            matches!(result, Err(IdempotencyError::Misconfigured { .. })),
            "{result:?}"
        );
    }
    assert_eq!(dispatches.total(), 0);

    // Store timeouts: zero or absurd are refused when the store is built, without a panic.
    for timeout in [Duration::ZERO, Duration::MAX] {
        let err = RedisStore::builder("redis://127.0.0.1:1")
            .timeout(timeout)
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidSetting { setting: "timeout", .. }),
            "{err}"
        );
    }
}

/// Path 10: renewal had no upper bound, so a hung job kept its key claimed forever. After the
/// maximum hold, renewal stops and the claim expires normally.
#[tokio::test(start_paused = true)]
async fn renewal_stops_at_the_max_hold_and_the_claim_expires() {
    let ttl = Duration::from_millis(300);
    let layer = IdempotencyLayer::new(MemoryStore::new(), key_of)
        .with_ttl(ttl)
        .with_renewal(Duration::from_millis(100))
        .with_max_hold(Duration::from_secs(1))
        .build()
        .expect("valid settings");
    let hung = layer.layer(Dispatches::default().service_taking(Duration::from_secs(3600)));
    let job = tokio::spawn(hung.oneshot("pr:10:abc".to_owned()));
    let second = layer.layer(Dispatches::default().service());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = second.clone().oneshot("pr:10:abc".to_owned()).await;
    assert!(
        during.is_err_and(|e| e.is_duplicate()),
        "renewed while under the max hold"
    );
    // Past the max hold plus one TTL, the claim has expired.
    tokio::time::sleep(Duration::from_secs(1) + ttl).await;
    let after = second.oneshot("pr:10:abc".to_owned()).await;
    assert!(after.is_ok(), "the hung job no longer holds its key: {after:?}");
    job.abort();
}

/// Path 11: futures dropped before they sent anything still cost store calls: 10 followers
/// dropped before being polled made 20 release round trips.
#[tokio::test]
async fn futures_dropped_before_sending_anything_cost_no_store_calls() {
    let store = Arc::new(ScriptedStore::new(MemoryStore::new()));
    let layer = IdempotencyLayer::new(store.clone(), key_of)
        .with_coalescing(true)
        .build()
        .expect("valid settings");
    let mut svc = layer.layer(Dispatches::default().service());
    let leader = svc.ready().await.unwrap().call("pr:11:abc".to_owned());
    let followers: Vec<_> = (0..10).map(|_| svc.call("pr:11:abc".to_owned())).collect();
    drop(followers);
    assert!(leader.await.is_ok());
    let never_polled = svc.call("pr:11:other".to_owned());
    drop(never_polled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.claim_calls(), 1, "one claim for the one caller that was polled");
    assert_eq!(
        store.release_calls(),
        0,
        "nothing was sent by the others, nothing to release"
    );
    assert_eq!(layer.background_tasks(), 0);
}

/// Path 12: a successful claim was logged only at debug. Claimed, duplicate and released are
/// at `info` with `key` and `outcome` fields; store errors at `error` with the source chain.
#[tokio::test]
async fn claimed_duplicate_and_released_are_logged_at_info_with_key_and_outcome() {
    let logs = LogCapture::global();
    let layer = IdempotencyLayer::new(MemoryStore::new(), key_of)
        .with_classifier(|r: &Result<(), Infallible>| if r.is_ok() { Settle::Release } else { Settle::Keep })
        .build()
        .expect("valid settings");
    let svc = layer.layer(Dispatches::default().service());
    let key = "log-trust-12";
    assert!(svc.clone().oneshot(key.to_owned()).await.is_ok());
    let keep = IdempotencyLayer::new(MemoryStore::new(), key_of)
        .build()
        .expect("valid");
    let kept = keep.layer(Dispatches::default().service());
    assert!(kept.clone().oneshot(format!("{key}-dup")).await.is_ok());
    assert!(kept.oneshot(format!("{key}-dup")).await.is_err());
    // The event carries `key` itself (not only through its span): the key appears twice.
    let with_key_field = |needle: &str, k: &str| {
        logs.lines("INFO", k, needle)
            .into_iter()
            .any(|l| l.matches(&format!("key={k}")).count() >= 2)
    };
    assert!(with_key_field("outcome=\"claimed\"", key), "{}", logs.text());
    assert!(with_key_field("outcome=\"released\"", key), "{}", logs.text());
    assert!(
        with_key_field("outcome=\"duplicate\"", &format!("{key}-dup")),
        "{}",
        logs.text()
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .connect_lazy()
        .expect("lazy store");
    let down = IdempotencyLayer::new(dead, key_of).build().expect("valid");
    let result = down
        .layer(Dispatches::default().service())
        .oneshot(format!("{key}-down"))
        .await;
    assert!(result.is_err());
    let errors = logs.lines("ERROR", &format!("{key}-down"), "outcome=\"store_unavailable\"");
    assert!(
        errors.iter().any(|l| l.to_lowercase().contains("refused")),
        "the error line shows the source chain: {errors:?}"
    );
}
