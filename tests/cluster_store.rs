//! `RedisStore` over a real local Redis Cluster (three primaries, no replicas): the store
//! conformance cases, a race between independent clients, and a dead primary whose keys fail
//! closed within the bound while keys on the other primaries keep working.
#![cfg(feature = "redis-cluster")]

mod common;
#[macro_use]
#[path = "common/conformance.rs"]
mod conformance;
mod faults_support;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use common::redis_cluster::RedisCluster;
use conformance::{Harness, cases};
use faults_support::{Dispatches, Outcome, Record, key_of, timed_call};
use futures::FutureExt;
use redis::cluster_async::ClusterConnection;
use tokio::time::Instant;
use tower::Layer;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
use tower_idempotency::{DefaultClassifier, IdempotencyLayer, RedisStore, Settle};

const TIMEOUT: Duration = Duration::from_millis(300);
/// What a call may take beyond `TIMEOUT` on a loaded 2-core CI machine, debug build.
const MARGIN: Duration = Duration::from_millis(200);

async fn cluster_store(cluster: &RedisCluster) -> RedisStore<ClusterConnection> {
    RedisStore::cluster_builder(cluster.urls())
        .timeout(TIMEOUT)
        .connect()
        .await
        .expect("connect to the test cluster")
}

/// Runs the conformance cases against one store, each under its own key prefix, so the cases can
/// share one cluster (starting a cluster per case would cost seconds each).
struct Prefixed<S> {
    inner: S,
    prefix: String,
}

impl<S: IdempotencyStore> IdempotencyStore for Prefixed<S> {
    async fn claim(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<ClaimOutcome, tower_idempotency::StoreError> {
        self.inner.claim(&format!("{}{key}", self.prefix), token, ttl).await
    }
    async fn release(&self, key: &str, token: &ClaimToken) -> Result<bool, tower_idempotency::StoreError> {
        self.inner.release(&format!("{}{key}", self.prefix), token).await
    }
    async fn renew(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, tower_idempotency::StoreError> {
        self.inner.renew(&format!("{}{key}", self.prefix), token, ttl).await
    }
    async fn claim_record(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<tower_idempotency::ClaimReply, tower_idempotency::StoreError> {
        self.inner
            .claim_record(&format!("{}{key}", self.prefix), token, ttl)
            .await
    }
    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: Option<&[u8]>,
        retention: Duration,
    ) -> Result<bool, tower_idempotency::StoreError> {
        self.inner
            .complete(&format!("{}{key}", self.prefix), token, outcome, retention)
            .await
    }
    async fn claim_fenced(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(tower_idempotency::ClaimReply, Option<u64>), tower_idempotency::StoreError> {
        self.inner
            .claim_fenced(&format!("{}{key}", self.prefix), token, ttl)
            .await
    }
    async fn take_over(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<bool, tower_idempotency::StoreError> {
        self.inner.take_over(&format!("{}{key}", self.prefix), token, ttl).await
    }
}

fn harness(store: &RedisStore<ClusterConnection>, case: &str) -> Harness<Prefixed<RedisStore<ClusterConnection>>> {
    let prefix = format!("{case}/");
    let conn = store.connection();
    let p = prefix.clone();
    Harness {
        store: Arc::new(Prefixed {
            inner: store.clone(),
            prefix,
        }),
        exists: Box::new(move |k| {
            let mut conn = conn.clone();
            let key = format!("{p}{k}");
            Box::pin(async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .expect("EXISTS")
                    == 1
            })
        }),
        guard: None,
    }
}

#[tokio::test]
async fn store_conformance_cases_pass_on_a_cluster() {
    let cluster = RedisCluster::start();
    let store = cluster_store(&cluster).await;
    let h = |case: &str| harness(&store, case);
    let runs: Vec<(&str, futures::future::LocalBoxFuture<'_, ()>)> = vec![
        ("first_claim_acquires", Box::pin(cases::first_claim_acquires(h("c1")))),
        ("duplicate_is_refused", Box::pin(cases::duplicate_is_refused(h("c2")))),
        ("keys_are_independent", Box::pin(cases::keys_are_independent(h("c3")))),
        (
            "reclaim_possible_after_ttl_not_before",
            Box::pin(cases::reclaim_possible_after_ttl_not_before(h("c4"))),
        ),
        ("release_frees_the_key", Box::pin(cases::release_frees_the_key(h("c5")))),
        (
            "stale_release_keeps_new_owners_claim",
            Box::pin(cases::stale_release_keeps_new_owners_claim(h("c6"))),
        ),
        (
            "renew_extends_only_our_claim",
            Box::pin(cases::renew_extends_only_our_claim(h("c7"))),
        ),
        ("namespace_is_applied", Box::pin(cases::namespace_is_applied(h("c8")))),
    ];
    // Concurrently, each case's panic caught and named.
    let results = futures::future::join_all(
        runs.into_iter()
            .map(|(name, run)| async move { (name, AssertUnwindSafe(run).catch_unwind().await.is_ok()) }),
    )
    .await;
    let failed: Vec<&str> = results
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect();
    assert!(failed.is_empty(), "conformance cases failed on the cluster: {failed:?}");
    // The cases' keys really spread over the cluster: more than one node holds some.
    let holders = (0..3)
        .filter(|&i| cluster.node(i).cli(&["DBSIZE"]).parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(holders >= 2, "the conformance keys all landed on one node");
}

/// Four independent clients (each its own cluster connection, layer and runtime on its own OS
/// thread, as separate processes would have) race for the same 100 keys, each key three times
/// per client at once: exactly one dispatch per key.
#[test]
fn independent_clients_racing_over_a_cluster_dispatch_each_key_once() {
    const CLIENTS: usize = 4;
    const KEYS: usize = 100;
    const COPIES: usize = 3;
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let dispatches = Dispatches::default();
    let barrier = Arc::new(std::sync::Barrier::new(CLIENTS));
    let started = std::time::Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (urls, dispatches, barrier) = (urls.clone(), dispatches.clone(), barrier.clone());
            std::thread::spawn(move || {
                let rt = faults_support::current_thread_runtime();
                rt.block_on(async move {
                    let store = RedisStore::cluster_builder(urls)
                        .timeout(Duration::from_secs(2))
                        .connect()
                        .await
                        .expect("connect");
                    let svc = IdempotencyLayer::new(store, key_of)
                        .with_namespace("race:")
                        .layer(dispatches.service());
                    barrier.wait();
                    let origin = Instant::now();
                    let calls = (0..KEYS)
                        .flat_map(|k| std::iter::repeat_n(k, COPIES))
                        .map(|k| timed_call(svc.clone(), format!("octo/repo:{k}:abcdef1"), origin));
                    futures::future::join_all(calls).await
                })
            })
        })
        .collect();
    let records: Vec<Record> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread panicked"))
        .collect();
    eprintln!(
        "cluster race: {} calls from {CLIENTS} clients over {KEYS} keys in {:?}",
        records.len(),
        started.elapsed()
    );

    for r in &records {
        assert!(
            matches!(r.outcome, Outcome::Dispatched | Outcome::Duplicate),
            "every call is decided by the cluster: {r:?}"
        );
    }
    let (key, most) = dispatches.max_per_key();
    assert_eq!(most, 1, "`{key}` was dispatched {most} times");
    assert_eq!(dispatches.total(), KEYS, "every key dispatched exactly once in total");
    assert_eq!(
        records.iter().filter(|r| r.outcome == Outcome::Dispatched).count(),
        KEYS
    );
    let holders = (0..3)
        .filter(|&i| cluster.node(i).cli(&["DBSIZE"]).parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert_eq!(holders, 3, "the race's keys spread over all three primaries");
}

#[test]
fn dead_primary_fails_its_keys_closed_within_bound_while_other_nodes_keep_working() {
    const DEAD: usize = 2;
    let mut cluster = RedisCluster::start();
    faults_support::current_thread_runtime().block_on(async {
        let store = cluster_store(&cluster).await;
        let dispatches = Dispatches::default();
        let keep = IdempotencyLayer::new(store.clone(), key_of).layer(dispatches.service());
        // A classifier that releases every claim: what a "blocked" outcome does.
        let blocked = IdempotencyLayer::new(store, key_of)
            .with_classifier(DefaultClassifier::new().on_success(Settle::Release))
            .layer(dispatches.service());
        let origin = Instant::now();

        // Keys per node, fresh for every round; the key is the full Redis key (no namespace).
        let rounds = 12;
        let dead_keys = cluster.keys_on(DEAD, "dead", rounds * 2);
        let live_keys: Vec<String> = [0, 1]
            .iter()
            .flat_map(|&n| cluster.keys_on(n, &format!("live{n}"), rounds * 2))
            .collect();
        let released_keys: Vec<String> = [0, 1]
            .iter()
            .flat_map(|&n| cluster.keys_on(n, &format!("blocked{n}"), rounds))
            .collect();

        // Healthy first: every node answers.
        let warm = timed_call(keep.clone(), cluster.keys_on(DEAD, "warm", 1).remove(0), origin).await;
        assert_eq!(warm.outcome, Outcome::Dispatched);

        cluster.kill(DEAD);
        let killed_at = origin.elapsed();
        let mut dead_records = Vec::new();
        let mut live_records = Vec::new();
        let mut blocked_records = Vec::new();
        // Rounds over ~2.5 s: before and after the cluster notices the failure (node timeout 1 s).
        for round in 0..rounds {
            let dead = dead_keys[round * 2..round * 2 + 2].iter();
            let live = live_keys.chunks(2).skip(round).step_by(rounds).flatten();
            let live_pairs: Vec<String> = live.flat_map(|k| [k.clone(), k.clone()]).collect();
            let rel: Vec<String> = released_keys.iter().skip(round).step_by(rounds).cloned().collect();
            let (d, l, b) = tokio::join!(
                futures::future::join_all(dead.map(|k| timed_call(keep.clone(), k.clone(), origin))),
                futures::future::join_all(live_pairs.into_iter().map(|k| timed_call(keep.clone(), k, origin))),
                futures::future::join_all(rel.into_iter().map(|k| timed_call(blocked.clone(), k, origin))),
            );
            dead_records.extend(d);
            live_records.extend(l);
            blocked_records.extend(b);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let all: Vec<&Record> = dead_records
            .iter()
            .chain(&live_records)
            .chain(&blocked_records)
            .collect();
        let slowest_dead = dead_records.iter().map(|r| r.took).max().unwrap_or_default();
        let slowest_live = live_records
            .iter()
            .chain(&blocked_records)
            .map(|r| r.took)
            .max()
            .unwrap_or_default();
        eprintln!(
            "cluster, primary {DEAD} killed at {killed_at:?}: {} calls on its slots (slowest {slowest_dead:?}), \
             {} on live primaries (slowest {slowest_live:?}), {} blocked-and-released",
            dead_records.len(),
            live_records.len(),
            blocked_records.len()
        );

        for r in &all {
            assert!(r.took <= TIMEOUT + MARGIN, "a call took {:?}: {r:?}", r.took);
        }
        for r in &dead_records {
            assert!(
                r.outcome.is_unavailable(),
                "a key on the dead primary was not failed closed: {r:?}"
            );
            assert_eq!(
                dispatches.of(&r.key),
                0,
                "inner called for a key on the dead primary: {r:?}"
            );
        }
        for pair in live_records.chunks(2) {
            let mut outcomes = [pair[0].outcome.clone(), pair[1].outcome.clone()];
            outcomes.sort_by_key(|o| format!("{o:?}"));
            assert_eq!(
                outcomes,
                [Outcome::Dispatched, Outcome::Duplicate],
                "a key on a live primary must keep working: {pair:?}"
            );
        }
        for r in &blocked_records {
            assert_eq!(r.outcome, Outcome::Dispatched, "{r:?}");
            let node = cluster.node(cluster.node_of(&r.key));
            assert_eq!(
                node.cli(&["EXISTS", &r.key]),
                "0",
                "a blocked job on a live primary must release its claim while another primary is dead: {r:?}"
            );
        }
        let (key, most) = dispatches.max_per_key();
        assert!(most <= 1, "`{key}` was dispatched {most} times");
    });
}
