//! `RedisStore` over TLS against a real `redis-server --tls-port`, with a CA, server and client
//! certificates this test generates (rcgen): a trusted private CA, an untrusted one, and mutual
//! TLS. Built only with a TLS feature; skipped, with the reason printed, when the local
//! redis-server was built without TLS support.
#![cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]

mod common;
#[path = "common/tls_pki.rs"]
mod tls_pki;

use std::time::Duration;

use common::RedisServer;
use tls_pki::{Pki, start_tls_server};
use tower_idempotency::RedisStore;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};

const TTL: Duration = Duration::from_secs(60);

async fn claim_duplicate_release(store: &RedisStore) {
    let mine = ClaimToken::generate();
    assert_eq!(
        store.claim("tls:job", &mine, TTL).await.unwrap(),
        ClaimOutcome::Acquired
    );
    assert_eq!(
        store.claim("tls:job", &ClaimToken::generate(), TTL).await.unwrap(),
        ClaimOutcome::AlreadyClaimed
    );
    let info = store.inspect("tls:job").await.unwrap().expect("claimed");
    assert_eq!(info.owner.as_deref(), Some(mine.as_str()));
    assert!(store.release("tls:job", &mine).await.unwrap());
    assert_eq!(store.inspect("tls:job").await.unwrap(), None);
}

#[tokio::test]
async fn a_store_trusting_the_private_ca_claims_and_releases_over_tls() {
    require_tls!();
    let pki = Pki::generate("trusted");
    let (_server, port) = start_tls_server(&pki, false);
    let store = RedisStore::builder(format!("rediss://127.0.0.1:{port}"))
        .timeout(Duration::from_secs(2))
        .tls_root_certificate(pki.ca_pem.clone())
        .connect()
        .await
        .expect("TLS connect with the CA trusted");
    claim_duplicate_release(&store).await;
    assert!(
        !format!("{store:?}").contains("BEGIN"),
        "no certificate in Debug output"
    );
}

#[tokio::test]
async fn a_server_certificate_from_an_untrusted_ca_is_refused_when_connecting() {
    require_tls!();
    let pki = Pki::generate("server");
    let other = Pki::generate("other");
    let (_server, port) = start_tls_server(&pki, false);
    let err = RedisStore::builder(format!("rediss://127.0.0.1:{port}"))
        .timeout(Duration::from_secs(2))
        .tls_root_certificate(other.ca_pem.clone())
        .connect()
        .await
        .expect_err("a certificate from an untrusted CA must be refused");
    assert_eq!(err.to_string(), "redis error during `connect`", "{err:?}");
    // The system roots do not know the test CA either.
    RedisStore::builder(format!("rediss://127.0.0.1:{port}"))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect_err("the test CA is not a system root");
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    require_tls!();
    let pki = Pki::generate("mtls");
    let (_server, port) = start_tls_server(&pki, true);
    let url = format!("rediss://127.0.0.1:{port}");

    let without = RedisStore::builder(url.as_str())
        .timeout(Duration::from_secs(2))
        .tls_root_certificate(pki.ca_pem.clone())
        .connect()
        .await;
    assert!(
        without.is_err(),
        "a server with tls-auth-clients yes refuses a client without certificate"
    );

    let builder = RedisStore::builder(url.as_str())
        .timeout(Duration::from_secs(2))
        .tls_root_certificate(pki.ca_pem.clone())
        .tls_client_certificate(pki.client_cert_pem.clone(), pki.client_key_pem.clone());
    let shown = format!("{builder:?}");
    assert!(
        !shown.contains("PRIVATE KEY"),
        "the client key stays out of Debug: {shown}"
    );
    let store = builder.connect().await.expect("mutual TLS connect");
    claim_duplicate_release(&store).await;
}

#[tokio::test]
async fn certificates_with_a_plain_redis_url_are_refused_before_connecting() {
    let pki = Pki::generate("plain");
    let err = RedisStore::builder("redis://127.0.0.1:1")
        .tls_root_certificate(pki.ca_pem.clone())
        .connect()
        .await
        .expect_err("TLS settings need rediss://");
    let source = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(source.contains("rediss://"), "{err:?}");
}

/// A free port whose cluster bus port (port + 10000) is a valid port too.
#[cfg(all(feature = "redis-cluster", feature = "tls-rustls"))]
fn free_cluster_port() -> u16 {
    loop {
        let port = tls_pki::free_port();
        if port < 55_000 {
            return port;
        }
    }
}

/// Three primaries whose clients and cluster bus speak TLS only (`tls-cluster yes`; the plain
/// ports are kept for the harness's readiness check), joined over TLS, `cluster_state:ok`.
#[cfg(all(feature = "redis-cluster", feature = "tls-rustls"))]
fn start_tls_cluster(pki: &Pki) -> (Vec<RedisServer>, Vec<u16>) {
    let (cert, key, ca) = (pki.file("server.crt"), pki.file("server.key"), pki.file("ca.crt"));
    let mut nodes = Vec::new();
    let mut tls_ports = Vec::new();
    for _ in 0..3 {
        let tls_port = free_cluster_port().to_string();
        nodes.push(RedisServer::start_with(&[
            "--tls-port",
            &tls_port,
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "1000",
            "--cluster-require-full-coverage",
            "no",
        ]));
        tls_ports.push(tls_port.parse().unwrap());
    }
    let addrs: Vec<String> = tls_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    // `redis-cli --cluster create` waits for the join forever when nodes cannot reach each other
    // over TLS: bound it.
    let mut create = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert", &ca, "--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = create.try_wait().expect("redis-cli") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = create.kill();
            let out = create.wait_with_output().expect("redis-cli");
            panic!(
                "redis-cli --tls --cluster create did not finish in 30 s:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = create.wait_with_output().expect("redis-cli");
    assert!(
        status.success(),
        "redis-cli --tls --cluster create failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !nodes
        .iter()
        .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "TLS cluster did not reach cluster_state:ok"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (nodes, tls_ports)
}

#[cfg(all(feature = "redis-cluster", feature = "tls-rustls"))]
#[tokio::test]
async fn a_cluster_store_trusting_the_private_ca_claims_lists_and_releases_over_tls() {
    require_tls!();
    let pki = Pki::generate("cluster");
    let (nodes, tls_ports) = start_tls_cluster(&pki);
    let urls: Vec<String> = tls_ports.iter().map(|p| format!("rediss://127.0.0.1:{p}")).collect();

    let store = RedisStore::cluster_builder(urls.clone())
        .timeout(Duration::from_secs(2))
        .tls_root_certificate(pki.ca_pem.clone())
        .connect()
        .await
        .expect("TLS cluster connect with the CA trusted");
    let mut tokens = Vec::new();
    for i in 0..12 {
        let key = format!("tls-cluster:job-{i}");
        let token = ClaimToken::generate();
        assert_eq!(store.claim(&key, &token, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert_eq!(
            store.claim(&key, &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed
        );
        tokens.push((key, token));
    }
    // The keys spread over the primaries, and `list` finds them on every one.
    for node in &nodes {
        assert_ne!(node.cli(&["DBSIZE"]), "0", "12 keys should reach every primary");
    }
    assert_eq!(store.list("tls-cluster:", 100).await.unwrap().len(), 12);
    for (key, token) in &tokens {
        assert!(store.release(key, token).await.unwrap());
    }
    assert!(store.list("tls-cluster:", 100).await.unwrap().is_empty());

    let other = Pki::generate("other");
    RedisStore::cluster_builder(urls)
        .timeout(Duration::from_secs(2))
        .tls_root_certificate(other.ca_pem.clone())
        .connect()
        .await
        .expect_err("a cluster whose certificates come from an untrusted CA is refused");
}

#[cfg(feature = "tls-rustls")]
#[tokio::test]
async fn an_insecure_url_does_not_turn_off_certificate_checks_with_rustls() {
    require_tls!();
    let pki = Pki::generate("insecure");
    let (_server, port) = start_tls_server(&pki, false);
    // The server's CA is not trusted: only skipping verification would let this connect.
    let err = RedisStore::builder(format!("rediss://127.0.0.1:{port}/#insecure"))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect_err("#insecure must not skip verification");
    let source = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        source.contains("insecure"),
        "refused as insecure, not by chance: {err:?}"
    );
}
