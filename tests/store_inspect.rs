//! The operator's view of `RedisStore` against a real local Redis: `inspect`, `list` (SCAN,
//! bounded, escaped prefix; every primary on a cluster), `wedged` and `force_release`.
#![cfg(feature = "redis")]

mod common;
mod faults_support;

use std::time::Duration;

use common::RedisServer;
use faults_support::LogCapture;
use tower_idempotency::RedisStore;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore, KeyState};

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to the test server")
}

fn keys_of(infos: &[tower_idempotency::store::KeyInfo]) -> Vec<String> {
    let mut keys: Vec<String> = infos.iter().map(|i| i.key.clone()).collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn inspect_reports_owner_and_time_left_of_a_claim_and_nothing_it_does_not_store() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let token = ClaimToken::generate();
    assert_eq!(
        store.claim("ns:job-1", &token, Duration::from_secs(60)).await.unwrap(),
        ClaimOutcome::Acquired
    );

    let info = store.inspect("ns:job-1").await.unwrap().expect("the claim exists");
    assert_eq!(info.key, "ns:job-1");
    assert_eq!(info.state, KeyState::Claimed);
    assert_eq!(info.owner.as_deref(), Some(token.as_str()));
    assert_eq!(info.owner_identity(), None);
    let left = info.time_left.expect("claims expire");
    assert!(
        left > Duration::from_secs(55) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    assert_eq!((info.age, info.fencing_token, info.outcome_size), (None, None, None));

    let owned = ClaimToken::from_owner("1700000000000-0");
    store.claim("ns:job-2", &owned, Duration::from_secs(60)).await.unwrap();
    let info = store.inspect("ns:job-2").await.unwrap().unwrap();
    assert_eq!(info.owner_identity(), Some("1700000000000-0"));
}

#[tokio::test]
async fn inspect_of_a_missing_or_released_key_is_none() {
    let server = RedisServer::start();
    let store = store(&server).await;
    assert_eq!(store.inspect("ns:never").await.unwrap(), None);
    let token = ClaimToken::generate();
    store.claim("ns:k", &token, Duration::from_secs(60)).await.unwrap();
    assert!(store.release("ns:k", &token).await.unwrap());
    assert_eq!(store.inspect("ns:k").await.unwrap(), None);
}

#[tokio::test]
async fn a_key_that_is_not_a_string_is_reported_as_not_a_claim_and_is_not_force_released() {
    let server = RedisServer::start();
    let store = store(&server).await;
    server.cli(&["HSET", "ns:foreign", "f", "v"]);

    let info = store.inspect("ns:foreign").await.unwrap().expect("exists");
    assert_eq!(info.state, KeyState::NotAClaim);
    assert_eq!(info.owner, None);
    assert_eq!(info.time_left, None, "no expiry");
    assert_eq!(store.list("ns:", 10).await.unwrap(), vec![info]);
    let wedged = store.wedged("ns:", Duration::from_secs(1), 10).await.unwrap();
    assert!(wedged.is_empty(), "not a claim, so not a wedged claim: {wedged:?}");

    let err = store.force_release("ns:foreign", "alice", "test").await.unwrap_err();
    assert!(
        std::error::Error::source(&err).is_some_and(|s| s.to_string().contains("WRONGTYPE")),
        "{err:?}"
    );
    assert_eq!(server.cli(&["EXISTS", "ns:foreign"]), "1");
}

#[tokio::test]
async fn list_returns_exactly_the_keys_under_the_prefix_with_glob_characters_taken_literally() {
    let server = RedisServer::start();
    let store = store(&server).await;
    for key in ["re*view:a", "re*view:b", "review:c", "re*viewX", "other:d"] {
        server.cli(&["SET", key, "0123456789abcdef-1", "PX", "60000"]);
    }
    assert_eq!(
        keys_of(&store.list("re*view:", 100).await.unwrap()),
        ["re*view:a", "re*view:b"]
    );
    assert_eq!(keys_of(&store.list("review:", 100).await.unwrap()), ["review:c"]);
    assert_eq!(store.list("nothing-here:", 100).await.unwrap(), vec![]);
}

#[tokio::test]
async fn list_stops_at_the_limit_on_a_namespace_larger_than_one_scan_page() {
    let server = RedisServer::start();
    let store = store(&server).await;
    // 1200 claims: more than one SCAN page (COUNT 500), set in one redis-cli call.
    let mut args: Vec<String> = vec!["MSET".into()];
    for i in 0..1200 {
        args.push(format!("big:{i}"));
        args.push(format!("owner:{i}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(server.cli(&args), "OK");

    assert_eq!(store.list("big:", 7).await.unwrap().len(), 7);
    let all = store.list("big:", 5000).await.unwrap();
    assert_eq!(all.len(), 1200, "every key once");
    assert!(
        all.iter()
            .all(|i| i.state == KeyState::Claimed && i.time_left.is_none())
    );
}

#[tokio::test]
async fn wedged_reports_claims_without_expiry_or_with_more_time_left_than_the_threshold() {
    let capture = LogCapture::global();
    let server = RedisServer::start();
    let store = store(&server).await;
    server.cli(&["SET", "w:forever", "owner:stuck"]);
    server.cli(&["SET", "w:long", "owner:long", "PX", "3600000"]);
    server.cli(&["SET", "w:normal", "owner:fine", "PX", "60000"]);

    let wedged = store.wedged("w:", Duration::from_secs(300), 100).await.unwrap();
    assert_eq!(keys_of(&wedged), ["w:forever", "w:long"]);
    let logged = capture.lines("WARN", "w:forever", "wedged idempotency claim");
    assert_eq!(logged.len(), 1, "{}", capture.text());
    assert!(logged[0].contains("owner:stuck"), "{}", logged[0]);
    assert!(capture.lines("WARN", "w:normal", "wedged").is_empty());
}

#[tokio::test]
async fn force_release_deletes_whoever_holds_the_claim_and_logs_who_why_and_owner_at_warn() {
    let capture = LogCapture::global();
    let server = RedisServer::start();
    let store = store(&server).await;
    let token = ClaimToken::generate();
    store.claim("fr:job", &token, Duration::from_secs(60)).await.unwrap();

    assert!(
        store
            .force_release("fr:job", "alice", "worker OOM-killed\nINC-1")
            .await
            .unwrap()
    );
    assert_eq!(store.inspect("fr:job").await.unwrap(), None);
    // The next claim by someone else dispatches.
    assert_eq!(
        store
            .claim("fr:job", &ClaimToken::generate(), Duration::from_secs(60))
            .await
            .unwrap(),
        ClaimOutcome::Acquired
    );
    // The original owner's token-checked release no longer touches the new claim.
    assert!(!store.release("fr:job", &token).await.unwrap());

    let logged = capture.lines("WARN", "fr:job", "force-released");
    assert_eq!(logged.len(), 1, "{}", capture.text());
    assert!(logged[0].contains("alice"), "{}", logged[0]);
    assert!(
        logged[0].contains(token.as_str()),
        "the freed owner is logged: {}",
        logged[0]
    );
    assert!(
        logged[0].contains(r"worker OOM-killed\nINC-1"),
        "reason escaped onto one line: {}",
        logged[0]
    );

    assert!(!store.force_release("fr:missing", "alice", "typo").await.unwrap());
}

#[cfg(feature = "redis-cluster")]
#[tokio::test]
async fn list_on_a_cluster_walks_every_primary() {
    use common::redis_cluster::RedisCluster;

    let cluster = RedisCluster::start();
    let store = RedisStore::cluster_builder(cluster.urls())
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to the test cluster");
    let mut expected = Vec::new();
    for node in 0..3 {
        for key in cluster.keys_on(node, "cl:job", 3) {
            let token = ClaimToken::generate();
            store.claim(&key, &token, Duration::from_secs(60)).await.unwrap();
            let info = store.inspect(&key).await.unwrap().expect("claimed");
            assert_eq!(info.owner.as_deref(), Some(token.as_str()));
            expected.push(key);
        }
    }
    expected.sort();
    cluster.cli(&["SET", "elsewhere", "x"]);

    assert_eq!(keys_of(&store.list("cl:", 100).await.unwrap()), expected);
    assert_eq!(store.list("cl:", 4).await.unwrap().len(), 4);
    assert!(store.force_release(&expected[0], "alice", "test").await.unwrap());
    assert_eq!(store.list("cl:", 100).await.unwrap().len(), 8);
}

/// `list` and `wedged` exist for the standalone and cluster connection types (compile-time).
#[allow(dead_code)]
fn every_connection_type_can_be_listed() {
    fn listable<C: tower_idempotency::store::ScanKeyspace>() {}
    listable::<redis::aio::ConnectionManager>();
    listable::<redis::aio::MultiplexedConnection>();
    #[cfg(feature = "redis-cluster")]
    listable::<redis::cluster_async::ClusterConnection>();
}

#[tokio::test]
async fn list_with_a_zero_limit_returns_nothing() {
    let server = RedisServer::start();
    let store = store(&server).await;
    server.cli(&["SET", "z:a", "owner:a"]);
    assert_eq!(store.list("z:", 0).await.unwrap(), vec![]);
    assert_eq!(store.list("z:", 1).await.unwrap().len(), 1);
}
