//! Regression: a claim whose reply was lost and which the client resent must be answered
//! `Acquired`, not `AlreadyClaimed`.
//!
//! The Redis Cluster client retries a command when its connection breaks. If the first
//! `SET key token NX PX ttl` landed and only its reply was lost, the resend finds the key held —
//! by our own token. A store that answers that as `AlreadyClaimed` turns one trigger into a
//! duplicate of itself: nothing is dispatched, and every later trigger is a duplicate too until
//! the TTL ends. The claim protocol must recognise its own token and answer `Acquired`.
//!
//! Both tests fail on the claim protocol that answers `nil` from `SET NX` as `AlreadyClaimed`
//! whoever holds the key, and pass once a claim that finds its own token is `Acquired`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::RedisServer;
use common::fault_proxy::{FaultProxy, Mode};
use tower_idempotency::RedisStore;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore, Record};

const TTL: Duration = Duration::from_secs(60);

/// A one-node Redis Cluster that announces the proxy's port, so the cluster client, which
/// connects to whatever `CLUSTER SLOTS` names, sends every command through the proxy.
#[cfg(feature = "redis-cluster")]
fn one_node_cluster_behind_proxy() -> (RedisServer, FaultProxy) {
    let server = RedisServer::start_with(&[
        "--cluster-enabled",
        "yes",
        // Relative to the server's own temporary `--dir`, removed when the server is dropped.
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "1000",
        "--cluster-announce-ip",
        "127.0.0.1",
    ]);
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port())));
    let port = proxy.addr().port().to_string();
    assert_eq!(server.cli(&["CONFIG", "SET", "cluster-announce-port", &port]), "OK");
    assert_eq!(server.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]), "OK");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
        assert!(
            Instant::now() < deadline,
            "the one-node cluster did not reach cluster_state:ok"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let slots = server.cli(&["CLUSTER", "SLOTS"]);
    assert!(
        slots.contains(&port),
        "CLUSTER SLOTS must name the proxy's port {port}:\n{slots}"
    );
    (server, proxy)
}

#[cfg(feature = "redis-cluster")]
#[tokio::test]
async fn cluster_resend_of_a_landed_claim_is_acquired() {
    let (server, proxy) = one_node_cluster_behind_proxy();
    let store = RedisStore::cluster_builder([proxy.url()])
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect to the one-node cluster through the proxy");
    let token = ClaimToken::from_string("resend-token");

    proxy.set_mode(Mode::LoseNextReply);
    let outcome = IdempotencyStore::claim(&store, "k", &token, TTL).await;

    assert_eq!(
        proxy.replies_lost(),
        1,
        "the proxy must have lost the reply to the first SET"
    );
    assert_eq!(
        Record::parse(server.cli(&["GET", "k"]).as_bytes()).token(),
        token.as_str(),
        "the first SET landed: Redis holds our record"
    );
    assert!(
        matches!(outcome, Ok(ClaimOutcome::Acquired)),
        "the client resent our own claim after reconnecting ({} connections accepted by the proxy); \
         finding our own token must be Acquired, got {outcome:?}",
        proxy.accepted()
    );
}

#[tokio::test]
async fn claiming_again_with_the_same_token_is_acquired() {
    let server = RedisServer::start();
    let conn = common::raw_conn(&server).await;
    let store = RedisStore::from_connection(conn);
    let token = ClaimToken::from_string("resend-token");

    let first = IdempotencyStore::claim(&store, "k", &token, TTL).await;
    assert!(matches!(first, Ok(ClaimOutcome::Acquired)), "{first:?}");
    // What a client that resends a command whose reply it lost does.
    let resend = IdempotencyStore::claim(&store, "k", &token, TTL).await;
    assert!(
        matches!(resend, Ok(ClaimOutcome::Acquired)),
        "a resend of our own claim must be Acquired, got {resend:?}"
    );
    // Someone else is still a duplicate.
    let other = IdempotencyStore::claim(&store, "k", &ClaimToken::from_string("other"), TTL).await;
    assert!(matches!(other, Ok(ClaimOutcome::AlreadyClaimed)), "{other:?}");
    assert_eq!(
        Record::parse(server.cli(&["GET", "k"]).as_bytes()).token(),
        token.as_str()
    );
}
