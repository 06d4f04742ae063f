//! Coalescing (`IdempotencyLayer::with_coalescing(true)`) shares one Redis round trip among
//! concurrent callers of the same key. These tests pin that it never lets two of them dispatch:
//! bursts of callers on a few keys, round after round, while the leader (the caller whose claim
//! the others wait for) is dropped before it is polled, dropped after one poll, or aborted at a
//! random point, and followers are aborted too; and a burst while Redis hangs.

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, RedisStore};

/// A request: the key to claim, and which caller sends it.
#[derive(Clone, Debug)]
struct Req {
    key: String,
    caller: usize,
}

/// Which callers the inner service dispatched, per key.
#[derive(Clone, Default)]
struct Dispatches(Arc<Mutex<HashMap<String, Vec<usize>>>>);

impl Dispatches {
    fn record(&self, req: &Req) {
        self.0
            .lock()
            .unwrap()
            .entry(req.key.clone())
            .or_default()
            .push(req.caller);
    }
    fn of(&self, key: &str) -> Vec<usize> {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never fails")]
struct Never;

fn key_of(req: &Req) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(&req.key).map(Some)
}

type Svc = tower_idempotency::Idempotency<
    tower::util::BoxCloneService<Req, (), Never>,
    fn(&Req) -> Result<Option<IdempotencyKey>, KeyError>,
>;

/// The layer with coalescing, over a job that records its dispatch and then takes a couple of
/// milliseconds (so aborts can land while it runs).
async fn coalescing_service(server: &RedisServer, timeout: Duration, dispatches: Dispatches) -> Svc {
    let store = RedisStore::builder(server.url())
        .timeout(timeout)
        .connect()
        .await
        .expect("connect to the test's redis-server");
    let inner = tower::service_fn(move |req: Req| {
        dispatches.record(&req);
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<(), Never>(())
        }
    });
    IdempotencyLayer::new(store, key_of as fn(&Req) -> _)
        .with_ttl(Duration::from_secs(60))
        .with_coalescing(true)
        .layer(tower::util::BoxCloneService::new(inner))
}

type Outcome = (usize, Result<(), IdempotencyError<Never>>);
type CallFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Makes the call (which joins the coalescer: the first caller of a key leads) without polling it.
async fn start_call(svc: &mut Svc, key: &str, caller: usize) -> CallFuture {
    let ready = svc.ready().await.expect("the layer is always ready");
    let call = ready.call(Req {
        key: key.to_string(),
        caller,
    });
    Box::pin(async move { (caller, call.await) })
}

/// `cmdstat_set` calls since the last `CONFIG RESETSTAT`.
fn set_calls(server: &RedisServer) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

fn exists(server: &RedisServer, key: &str) -> bool {
    server.cli(&["EXISTS", key]) == "1"
}

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Round {
    /// Nobody goes away: one claim sent for the burst, driven by whichever caller polls first;
    /// exactly one caller dispatches, everyone else is a duplicate.
    Intact,
    /// Each key's leader is dropped before it is ever polled: the followers drive the shared
    /// claim themselves and exactly one of them dispatches.
    LeaderDroppedUnpolled,
    /// Each key's leader is polled once (its claim goes on the wire) and dropped. Usually the
    /// answer is not back yet and a follower takes the claim over; on a loaded machine the
    /// claim can be answered and the job started inside that one poll, and then the leader is
    /// the one dispatcher.
    LeaderDroppedAfterOnePoll,
    /// Leaders and about a quarter of the followers run as tasks aborted at random points.
    RandomAborts,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_of_one_key_never_both_dispatch_even_when_leaders_are_cancelled() {
    let server = RedisServer::start();
    let dispatches = Dispatches::default();
    // Generous: a timeout would fail a round closed and hide what this test looks at.
    let mut svc = coalescing_service(&server, Duration::from_secs(5), dispatches.clone()).await;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    const CALLERS_PER_KEY: usize = 48;
    let kinds = [
        Round::Intact,
        Round::LeaderDroppedUnpolled,
        Round::LeaderDroppedAfterOnePoll,
        Round::RandomAborts,
    ];

    for round in 0..32usize {
        let kind = kinds[round % kinds.len()];
        let key_count = 1 + round % 3;
        let keys: Vec<String> = (0..key_count).map(|k| format!("burst:{round}:{k}")).collect();
        let key_of_caller = |caller: usize| caller % key_count;
        server.cli(&["CONFIG", "RESETSTAT"]);

        // Create every caller's future before any is polled: caller k < key_count is the
        // leader of key k, every later caller joins its key's leader as a follower.
        let mut leaders: Vec<CallFuture> = Vec::new();
        let mut followers: Vec<CallFuture> = Vec::new();
        for caller in 0..CALLERS_PER_KEY * key_count {
            let fut = start_call(&mut svc, &keys[key_of_caller(caller)], caller).await;
            if caller < key_count {
                leaders.push(fut);
            } else {
                followers.push(fut);
            }
        }

        let mut outcomes: Vec<Outcome> = Vec::new();
        // Callers that were dropped or aborted, so never answered.
        let mut gone: HashSet<usize> = HashSet::new();
        match kind {
            Round::Intact => {
                let tasks: Vec<_> = leaders.into_iter().chain(followers).map(tokio::spawn).collect();
                for t in tasks {
                    outcomes.push(t.await.expect("caller task"));
                }
            }
            Round::LeaderDroppedUnpolled | Round::LeaderDroppedAfterOnePoll => {
                let tasks: Vec<_> = followers.into_iter().map(tokio::spawn).collect();
                for (leader, mut fut) in leaders.into_iter().enumerate() {
                    if kind == Round::LeaderDroppedAfterOnePoll
                        && let std::task::Poll::Ready(outcome) = futures::poll!(fut.as_mut())
                    {
                        // The followers (already running) drove the shared claim and one of
                        // them took it: the leader's one poll finds the answer, a duplicate. (A
                        // job that started runs 2 ms, so a dispatching leader is still pending.)
                        outcomes.push(outcome);
                        continue;
                    }
                    drop(fut);
                    gone.insert(leader);
                }
                for t in tasks {
                    outcomes.push(t.await.expect("caller task"));
                }
            }
            Round::RandomAborts => {
                let mut tasks = Vec::new();
                for (caller, fut) in leaders.into_iter().chain(followers).enumerate() {
                    let is_leader = caller < key_count;
                    let abort_after = (is_leader || rng.next(4) == 0).then(|| rng.next(6));
                    tasks.push((caller, tokio::spawn(fut), abort_after));
                }
                // Abort the chosen tasks after a random number of scheduler yields.
                for step in 0..6 {
                    for (_, task, abort_after) in &tasks {
                        if *abort_after == Some(step) {
                            task.abort();
                        }
                    }
                    tokio::task::yield_now().await;
                }
                for (caller, task, abort_after) in tasks {
                    match task.await {
                        Ok(outcome) => outcomes.push(outcome),
                        Err(e) if e.is_cancelled() => {
                            assert!(abort_after.is_some(), "only aborted tasks are cancelled");
                            gone.insert(caller);
                        }
                        Err(e) => panic!("caller task panicked: {e}"),
                    }
                }
            }
        }

        // Every answer is a dispatch or a duplicate; no caller failed for another reason.
        let mut answered_ok: Vec<HashSet<usize>> = vec![HashSet::new(); key_count];
        for (caller, result) in &outcomes {
            match result {
                Ok(()) => {
                    answered_ok[key_of_caller(*caller)].insert(*caller);
                }
                Err(e) => assert!(e.is_duplicate(), "round {round} ({kind:?}): caller {caller}: {e:?}"),
            }
        }
        assert_eq!(outcomes.len() + gone.len(), CALLERS_PER_KEY * key_count);

        let settle_deadline = Instant::now() + Duration::from_secs(5);
        for (k, key) in keys.iter().enumerate() {
            let dispatched = dispatches.of(key);
            let what = format!("round {round} ({kind:?}), key {key}: dispatched by {dispatched:?}");
            assert!(dispatched.len() <= 1, "{what}: more than one dispatch");
            // Whoever answered Ok dispatched, and a dispatcher that was not dropped answered Ok.
            let dispatchers: HashSet<usize> = dispatched.iter().copied().collect();
            let expected_ok: HashSet<usize> = dispatchers.difference(&gone).copied().collect();
            assert_eq!(answered_ok[k], expected_ok, "{what}: Ok answers vs dispatches");
            match kind {
                // Whoever polls drives the shared claim, so any one caller may be the dispatcher.
                Round::Intact => assert_eq!(dispatched.len(), 1, "{what}: exactly one caller dispatches"),
                Round::LeaderDroppedUnpolled => {
                    assert_eq!(dispatched.len(), 1, "{what}: exactly one follower dispatches");
                    assert_ne!(dispatched[0], k, "{what}: the unpolled leader cannot dispatch");
                }
                Round::LeaderDroppedAfterOnePoll | Round::RandomAborts => {}
            }
            if dispatched.len() == 1 {
                // The dispatcher's claim is kept for its TTL.
                assert!(exists(&server, key), "{what}: the dispatched key lost its claim");
            } else {
                // Nobody dispatched only because a dropped caller's claim landed; its
                // background cleanup must remove it, so the key is not blocked for the TTL.
                while exists(&server, key) {
                    assert!(
                        Instant::now() < settle_deadline,
                        "{what}: no dispatch but the key stays claimed"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }

        if kind == Round::Intact {
            // Coalescing is real: one claim per key for the whole burst, not one per caller —
            // plus the one `SET` inside the script that completes the dispatcher's record.
            assert_eq!(
                set_calls(&server),
                2 * key_count as u64,
                "round {round}: {} callers on {key_count} keys should send {key_count} claim SETs (and {key_count} completions)",
                CALLERS_PER_KEY * key_count
            );
        }
    }
}

/// Redis hangs during a burst: the leader's claim times out and every follower fails closed
/// with it. Nobody dispatches, the late-landing claim is cleaned up after Redis resumes, and
/// the next burst dispatches exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_while_redis_hangs_fails_closed_for_every_caller() {
    let server = RedisServer::start();
    let dispatches = Dispatches::default();
    let mut svc = coalescing_service(&server, Duration::from_millis(300), dispatches.clone()).await;
    let key = "burst:frozen";

    server.freeze();
    let mut calls = Vec::new();
    for caller in 0..32 {
        calls.push(start_call(&mut svc, key, caller).await);
    }
    let outcomes: Vec<Outcome> = futures::future::join_all(calls).await;
    server.thaw();
    assert_eq!(outcomes.len(), 32);
    for (caller, result) in &outcomes {
        match result {
            Err(e) => assert!(
                e.is_store_unavailable(),
                "caller {caller}: expected a fail-closed store error, got {e:?}"
            ),
            Ok(()) => panic!("caller {caller} dispatched while the store could not answer"),
        }
    }
    assert!(dispatches.of(key).is_empty());

    // The leader's SET was queued while Redis hung and lands after the thaw; its cleanup
    // removes it. Then a new burst dispatches exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    for burst in 1.. {
        let mut calls = Vec::new();
        for caller in 0..32 {
            calls.push(start_call(&mut svc, key, burst * 100 + caller).await);
        }
        let outcomes: Vec<Outcome> = futures::future::join_all(calls).await;
        let ok: Vec<usize> = outcomes.iter().filter(|(_, r)| r.is_ok()).map(|(c, _)| *c).collect();
        assert!(ok.len() <= 1, "callers {ok:?} all dispatched in one burst");
        assert_eq!(dispatches.of(key), ok, "Ok answers vs dispatches");
        if ok.len() == 1 {
            for (caller, result) in &outcomes {
                if let Err(e) = result {
                    assert!(e.is_duplicate(), "caller {caller}: {e:?}");
                }
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key stayed blocked after Redis came back: {:?}",
            outcomes.iter().find_map(|(_, r)| r.as_ref().err())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
