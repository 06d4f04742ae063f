//! Coalescing (`IdempotencyLayer::with_coalescing(true)`) shares one Redis round trip among
//! concurrent callers of the same key. These tests pin that it never lets two of them dispatch:
//! bursts of callers on a few keys, round after round, while the leader (the caller whose claim
//! the others wait for) is dropped before it is polled, dropped in the middle of its claim, or
//! aborted at a random point, and followers are aborted too; and a burst while Redis hangs.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, RedisStore};

/// A request: the key to claim.
type Req = String;

/// Every dispatch the inner service saw, per key.
#[derive(Clone, Default)]
struct Dispatches(Arc<Mutex<HashMap<String, usize>>>);

impl Dispatches {
    fn record(&self, key: &str) {
        *self.0.lock().unwrap().entry(key.to_string()).or_default() += 1;
    }
    fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never fails")]
struct Never;

fn key_of(req: &Req) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(req).map(Some)
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
    let inner = tower::service_fn(move |key: Req| {
        dispatches.record(&key);
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

type CallFuture = Pin<Box<dyn Future<Output = Result<(), IdempotencyError<Never>>> + Send>>;

async fn start_call(svc: &mut Svc, key: &str) -> CallFuture {
    let ready = svc.ready().await.expect("the layer is always ready");
    Box::pin(ready.call(key.to_string()))
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
    /// Nobody goes away: one claim sent, one dispatch, everyone else a duplicate.
    Intact,
    /// Each key's leader is dropped before it is ever polled (its claim never leaves).
    LeaderDroppedUnpolled,
    /// Each key's leader is polled once (its claim is on the wire) and then dropped.
    LeaderDroppedMidClaim,
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
    let rounds = [
        Round::Intact,
        Round::LeaderDroppedUnpolled,
        Round::LeaderDroppedMidClaim,
        Round::RandomAborts,
    ];

    for round in 0..32usize {
        let kind = rounds[round % rounds.len()];
        let key_count = 1 + round % 3;
        let keys: Vec<String> = (0..key_count).map(|k| format!("burst:{round}:{k}")).collect();
        server.cli(&["CONFIG", "RESETSTAT"]);

        // Create every caller's future before any is polled: the first per key is its leader,
        // all later ones join it as followers. Interleave the keys.
        let mut leaders: Vec<CallFuture> = Vec::new();
        let mut followers: Vec<CallFuture> = Vec::new();
        for i in 0..CALLERS_PER_KEY * key_count {
            let fut = start_call(&mut svc, &keys[i % key_count]).await;
            if i < key_count {
                leaders.push(fut);
            } else {
                followers.push(fut);
            }
        }

        let mut outcomes = Vec::new();
        match kind {
            Round::Intact => {
                let tasks: Vec<_> = leaders.into_iter().chain(followers).map(tokio::spawn).collect();
                for t in tasks {
                    outcomes.push(t.await.expect("caller task"));
                }
            }
            Round::LeaderDroppedUnpolled | Round::LeaderDroppedMidClaim => {
                let tasks: Vec<_> = followers.into_iter().map(tokio::spawn).collect();
                for mut leader in leaders {
                    if kind == Round::LeaderDroppedMidClaim {
                        assert!(
                            futures::poll!(leader.as_mut()).is_pending(),
                            "a claim over the network cannot be answered on its first poll"
                        );
                    }
                    drop(leader);
                }
                for t in tasks {
                    outcomes.push(t.await.expect("caller task"));
                }
            }
            Round::RandomAborts => {
                let mut tasks = Vec::new();
                for (i, fut) in leaders.into_iter().chain(followers).enumerate() {
                    let is_leader = i < key_count;
                    let abort_after = (is_leader || rng.next(4) == 0).then(|| rng.next(6));
                    tasks.push((tokio::spawn(fut), abort_after));
                }
                // Abort the chosen tasks after a random number of scheduler yields.
                for step in 0..6 {
                    for (task, abort_after) in &tasks {
                        if *abort_after == Some(step) {
                            task.abort();
                        }
                    }
                    tokio::task::yield_now().await;
                }
                for (task, abort_after) in tasks {
                    match task.await {
                        Ok(outcome) => outcomes.push(outcome),
                        Err(e) if e.is_cancelled() => {
                            assert!(abort_after.is_some(), "only aborted tasks are cancelled");
                        }
                        Err(e) => panic!("caller task panicked: {e}"),
                    }
                }
            }
        }

        // No caller may have failed for any reason but "duplicate".
        let ok = outcomes.iter().filter(|o| o.is_ok()).count();
        for o in &outcomes {
            if let Err(e) = o {
                assert!(e.is_duplicate(), "round {round} ({kind:?}): unexpected error {e:?}");
            }
        }

        // Background cleanups of dropped claims settle within a few hundred milliseconds.
        let settle_deadline = Instant::now() + Duration::from_secs(5);
        for key in &keys {
            let n = dispatches.of(key);
            assert!(n <= 1, "round {round} ({kind:?}): key {key} was dispatched {n} times");
            match kind {
                Round::Intact | Round::LeaderDroppedUnpolled => {
                    assert_eq!(
                        n, 1,
                        "round {round} ({kind:?}): key {key} must be dispatched exactly once"
                    );
                }
                Round::LeaderDroppedMidClaim | Round::RandomAborts => {}
            }
            if n == 1 {
                // The dispatcher's claim is kept for its TTL.
                assert!(
                    exists(&server, key),
                    "round {round} ({kind:?}): dispatched key {key} lost its claim"
                );
            } else {
                // Nobody dispatched only because a dropped caller's claim landed; the dropped
                // caller's cleanup must remove it, so the key is not blocked for the whole TTL.
                while exists(&server, key) {
                    assert!(
                        Instant::now() < settle_deadline,
                        "round {round} ({kind:?}): key {key} has no dispatch but stays claimed"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let total: usize = keys.iter().map(|k| dispatches.of(k)).sum();
        if kind == Round::RandomAborts {
            // A task aborted while its job ran dispatched without returning Ok.
            assert!(
                ok <= total,
                "round {round} ({kind:?}): {ok} Ok answers but {total} dispatches"
            );
        } else {
            assert_eq!(
                ok, total,
                "round {round} ({kind:?}): every Ok is a dispatch, and vice versa"
            );
        }

        if kind == Round::Intact {
            // Coalescing is real: one SET per key for the whole burst, not one per caller.
            assert_eq!(
                set_calls(&server),
                key_count as u64,
                "round {round}: {} callers on {key_count} keys should send {key_count} SETs",
                CALLERS_PER_KEY * key_count
            );
            assert_eq!(ok, key_count);
            assert_eq!(outcomes.len(), CALLERS_PER_KEY * key_count);
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
    let mut futures = Vec::new();
    for _ in 0..32 {
        futures.push(start_call(&mut svc, key).await);
    }
    let outcomes: Vec<_> = futures::future::join_all(futures).await;
    server.thaw();
    assert_eq!(outcomes.len(), 32);
    for o in &outcomes {
        match o {
            Err(e) => assert!(
                e.is_store_unavailable(),
                "expected a fail-closed store error, got {e:?}"
            ),
            Ok(()) => panic!("a caller dispatched while the store could not answer"),
        }
    }
    assert_eq!(dispatches.of(key), 0);

    // The leader's SET was queued while Redis hung and lands after the thaw; its cleanup
    // removes it. Then a new burst dispatches exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut futures = Vec::new();
        for _ in 0..32 {
            futures.push(start_call(&mut svc, key).await);
        }
        let outcomes = futures::future::join_all(futures).await;
        let ok = outcomes.iter().filter(|o| o.is_ok()).count();
        assert!(ok <= 1, "{ok} callers dispatched in one burst");
        assert_eq!(dispatches.of(key), ok);
        if ok == 1 {
            for o in outcomes.iter().filter_map(|o| o.as_ref().err()) {
                assert!(o.is_duplicate(), "{o:?}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key stayed blocked after Redis came back: {:?}",
            outcomes.iter().find_map(|o| o.as_ref().err())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
