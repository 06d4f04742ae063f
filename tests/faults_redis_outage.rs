//! Redis outages under load, against a real `redis-server`: killed, frozen (`SIGSTOP`), and
//! restarted empty. Each test pins a time bound and zero double dispatch.
//!
//! Timings are printed (`cargo test --all-features --test faults_redis_outage -- --nocapture`)
//! so the bounds in docs/RELIABILITY.md can be re-measured.

mod common;
mod faults_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::RedisServer;
use faults_support::{
    Dispatches, Load, LogCapture, Outcome, assert_no_double_dispatch, command_calls, current_thread_runtime, key_of,
    slowest, timed_call,
};
use tokio::time::Instant;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, RedisStore};

/// The store's bound on every Redis call in these tests.
const TIMEOUT: Duration = Duration::from_millis(300);
/// What a call may take beyond `TIMEOUT`: scheduling on a loaded 2-core CI machine, debug build.
const MARGIN: Duration = Duration::from_millis(200);
/// Long enough that a key blocked "for the whole TTL" could not pass for a cleaned-up one.
const TTL: Duration = Duration::from_secs(30);

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .timeout(TIMEOUT)
        .connect()
        .await
        .expect("connect to test redis")
}

/// Runs a blocking server operation (kill, restart) off the runtime thread, so the callers'
/// latencies measure the layer and not the test harness.
async fn with_server(server: &Arc<Mutex<RedisServer>>, op: fn(&mut RedisServer)) {
    let server = server.clone();
    tokio::task::spawn_blocking(move || op(&mut server.lock().unwrap()))
        .await
        .expect("server operation panicked");
}

#[derive(Debug, Default)]
struct KilledRun {
    records: Vec<faults_support::Record>,
    kill_began: Duration,
    killed_at: Duration,
    restart_began: Duration,
    restarted_at: Duration,
    dispatches: Dispatches,
}

#[test]
fn redis_killed_under_load_fails_closed_within_bound_and_recovers_after_restart() {
    let logs = LogCapture::global();
    let mut run = KilledRun::default();
    let events = sentry::test::with_captured_events(|| {
        current_thread_runtime().block_on(async {
            let server = RedisServer::start();
            let store = store(&server).await;
            let server = Arc::new(Mutex::new(server));
            let layer = IdempotencyLayer::new(store, key_of)
                .with_ttl(TTL)
                .with_namespace("faults:");
            run.dispatches = Dispatches::default();
            let svc = layer.layer(run.dispatches.service());

            let load = Load::start(svc, 8, "killed");
            tokio::time::sleep(Duration::from_millis(500)).await;
            run.kill_began = load.now();
            with_server(&server, RedisServer::kill).await;
            run.killed_at = load.now();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            run.restart_began = load.now();
            with_server(&server, RedisServer::restart).await;
            run.restarted_at = load.now();
            tokio::time::sleep(Duration::from_millis(3000)).await;
            run.records = load.stop().await;
        })
    });

    let records = &run.records;
    let before: Vec<_> = records.iter().filter(|r| r.finished() < run.kill_began).collect();
    let outage: Vec<_> = records
        .iter()
        .filter(|r| r.started >= run.killed_at && r.finished() <= run.restart_began)
        .collect();
    let recovered_at = records
        .iter()
        .filter(|r| r.started >= run.restarted_at && r.outcome == Outcome::Dispatched)
        .map(|r| r.finished())
        .min()
        .expect("no call dispatched after Redis came back");
    let recovery = recovered_at - run.restarted_at;
    let after: Vec<_> = records
        .iter()
        .filter(|r| r.started >= run.restarted_at + Duration::from_secs(2))
        .collect();
    let worst = slowest(records).expect("no calls recorded");
    let worst_outage = outage.iter().map(|r| r.took).max().unwrap_or_default();
    eprintln!(
        "killed: {} calls ({} before, {} during the outage, {} after recovery); slowest call {:?} ({:?}); \
         slowest during the outage {:?}; first dispatch {:?} after the restart; {} Sentry events",
        records.len(),
        before.len(),
        outage.len(),
        after.len(),
        worst.took,
        worst.outcome,
        worst_outage,
        recovery,
        events.len()
    );

    // Healthy before the kill.
    assert!(
        before.len() >= 20,
        "the load driver barely ran before the kill: {}",
        before.len()
    );
    assert!(
        before
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Dispatched | Outcome::Duplicate)),
        "calls before the kill must be decided by Redis: {:?}",
        before
            .iter()
            .filter(|r| !matches!(r.outcome, Outcome::Dispatched | Outcome::Duplicate))
            .collect::<Vec<_>>()
    );
    // Every call decided within the bound, including those in flight at the kill and restart.
    for r in records {
        assert!(
            r.took <= TIMEOUT + MARGIN,
            "a call took {:?} (> {:?} + {:?}): {r:?}",
            r.took,
            TIMEOUT,
            MARGIN
        );
    }
    // During the outage: fail closed, the inner service is not called.
    assert!(outage.len() >= 20, "too few calls during the outage: {}", outage.len());
    for r in &outage {
        assert!(
            r.outcome.is_unavailable(),
            "a call during the outage was not failed closed: {r:?}"
        );
        assert_eq!(
            run.dispatches.of(&r.key),
            0,
            "inner service called during the outage: {r:?}"
        );
    }
    // Zero double dispatch over the whole run (every key was triggered twice at once).
    assert_no_double_dispatch(records, &run.dispatches);
    // The same layer instance claims again within 2 s of Redis coming back, and keeps working.
    assert!(
        recovery <= Duration::from_secs(2),
        "claims resumed only {recovery:?} after the restart"
    );
    assert!(after.len() >= 20, "too few calls after recovery: {}", after.len());
    assert!(
        after
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Dispatched | Outcome::Duplicate)),
        "calls after recovery must be decided by Redis again"
    );
    // Logged at error, and reported — rate limited: one event per error kind, not one per call.
    assert!(
        !logs.lines("ERROR", "key=killed-", "failing closed").is_empty(),
        "fail-closed store errors must be logged at error"
    );
    assert!(!events.is_empty(), "the outage must be reported to Sentry");
    let kinds: std::collections::HashSet<_> = events
        .iter()
        .filter_map(|e| e.tags.get("idempotency_store_down").cloned())
        .collect();
    assert_eq!(
        kinds.len(),
        events.len(),
        "one Sentry event per error kind per interval, got {events:#?}"
    );
}

#[test]
fn redis_frozen_fails_closed_within_bound_and_late_phantom_claims_do_not_block_keys() {
    current_thread_runtime().block_on(async {
        let server = RedisServer::start();
        let store = store(&server).await;
        let layer = IdempotencyLayer::new(store, key_of)
            .with_ttl(TTL)
            .with_namespace("faults:");
        let dispatches = Dispatches::default();
        let svc = layer.layer(dispatches.service());
        let origin = Instant::now();
        // A connection outside the store under test, opened while Redis is healthy.
        let mut raw = common::raw_conn(&server).await;

        // Healthy: warms up the connection and loads the release script.
        let warm = timed_call(svc.clone(), "warm".into(), origin).await;
        assert_eq!(warm.outcome, Outcome::Dispatched);

        server.freeze();
        let frozen_at = Instant::now();
        let keys: Vec<String> = (0..20).map(|i| format!("frozen-{i}")).collect();
        let frozen_calls = futures::future::join_all(
            keys.iter()
                .flat_map(|k| [k.clone(), k.clone()])
                .map(|k| timed_call(svc.clone(), k, origin)),
        )
        .await;
        let frozen_decided = frozen_at.elapsed();
        let dispatched_while_frozen = dispatches.total() - 1;
        // Stay frozen a while: the cleanup of the possibly-landed claims keeps retrying.
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.thaw();
        let thawed_at = Instant::now();

        // The SETs sent while frozen land now. They must not keep the keys blocked for the TTL.
        let mut cleared_after = None;
        let mut present = usize::MAX;
        while thawed_at.elapsed() < Duration::from_secs(5) {
            let full: Vec<String> = keys.iter().map(|k| format!("faults:{k}")).collect();
            present = redis::cmd("EXISTS")
                .arg(&full)
                .query_async::<usize>(&mut raw)
                .await
                .expect("EXISTS after thaw");
            if present == 0 {
                cleared_after = Some(thawed_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut raw)
            .await
            .expect("INFO commandstats");
        let sets = command_calls(&info, "set");

        // Service resumes: each key that failed closed while frozen is dispatched once now.
        let resumed_at = Instant::now();
        let again = futures::future::join_all(
            keys.iter()
                .flat_map(|k| [k.clone(), k.clone()])
                .map(|k| timed_call(svc.clone(), k, origin)),
        )
        .await;
        let resumed_took = resumed_at.elapsed();

        let worst = frozen_calls.iter().map(|r| r.took).max().unwrap_or_default();
        eprintln!(
            "frozen: {} calls failed closed, slowest {:?}, all decided {:?} after SIGSTOP; \
             {} SETs executed by Redis; phantom claims gone {:?} after SIGCONT; re-trigger of all keys took {:?}",
            frozen_calls.len(),
            worst,
            frozen_decided,
            sets,
            cleared_after,
            resumed_took
        );

        for r in &frozen_calls {
            assert!(
                r.outcome.is_unavailable(),
                "a call while frozen was not failed closed: {r:?}"
            );
            assert!(
                r.took <= TIMEOUT + MARGIN,
                "a call while frozen took {:?}: {r:?}",
                r.took
            );
        }
        assert_eq!(dispatched_while_frozen, 0, "nothing may dispatch while Redis is frozen");
        // The phantom claims really landed: Redis executed the warm-up SET and the 40 frozen ones.
        assert!(
            sets > 40,
            "expected the frozen SETs to be executed after SIGCONT, INFO says {sets}"
        );
        let cleared = cleared_after
            .unwrap_or_else(|| panic!("{present} phantom claims still block their keys 5 s after SIGCONT"));
        assert!(
            cleared <= Duration::from_secs(2),
            "phantom claims cleared only {cleared:?} after SIGCONT"
        );
        for k in &keys {
            let outcomes: Vec<_> = again
                .iter()
                .filter(|r| &r.key == k)
                .map(|r| r.outcome.clone())
                .collect();
            assert!(
                outcomes.contains(&Outcome::Dispatched) && outcomes.contains(&Outcome::Duplicate),
                "after the thaw `{k}` must dispatch exactly once: {outcomes:?}"
            );
            assert_eq!(dispatches.of(k), 1, "`{k}` dispatched {} times", dispatches.of(k));
        }
        let all: Vec<_> = frozen_calls.iter().chain(&again).cloned().collect();
        assert_eq!(
            all.iter().filter(|r| r.outcome == Outcome::Dispatched).count(),
            keys.len()
        );
    });
}

/// Pins the documented caveat (docs/RELIABILITY.md, "Redis restarted empty"): claims live only in
/// Redis memory, so a Redis that restarts without persistence forgets them, and a trigger that
/// arrives again after the restart dispatches a second time. This test fails if that ever
/// changes, so the documentation can be updated with it.
#[test]
fn redis_restarted_empty_forgets_claims_so_a_repeated_trigger_dispatches_again() {
    current_thread_runtime().block_on(async {
        let mut server = RedisServer::start();
        let store = store(&server).await;
        let layer = IdempotencyLayer::new(store, key_of)
            .with_ttl(TTL)
            .with_namespace("faults:");
        let dispatches = Dispatches::default();
        let svc = layer.layer(dispatches.service());
        let origin = Instant::now();
        let key = "octo/repo:42:abcdef1".to_owned();

        assert_eq!(
            timed_call(svc.clone(), key.clone(), origin).await.outcome,
            Outcome::Dispatched
        );
        assert_eq!(
            timed_call(svc.clone(), key.clone(), origin).await.outcome,
            Outcome::Duplicate
        );

        server.restart();
        assert_eq!(server.cli(&["DBSIZE"]), "0", "the restarted Redis is empty");

        // The first call may meet the dead connection (fail closed); the layer reconnects by itself.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut outcome = Outcome::Other("not called".into());
        while Instant::now() < deadline {
            outcome = timed_call(svc.clone(), key.clone(), origin).await.outcome;
            if !outcome.is_unavailable() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(outcome, Outcome::Dispatched, "the claim was lost with the restart");
        assert_eq!(
            dispatches.of(&key),
            2,
            "the same trigger dispatched twice across an empty restart"
        );
        assert_eq!(timed_call(svc, key.clone(), origin).await.outcome, Outcome::Duplicate);
    });
}
