//! The least-privilege Redis user recommended in SECURITY.md, against a real `redis-server`: the
//! store works under exactly that user, the user can do nothing else, and a user without the
//! permissions fails closed with a clear error.
//!
//! The ACL rule is read from SECURITY.md itself, so the documentation cannot drift from what is
//! tested.

mod common;
mod faults_support;

use std::time::Duration;

use common::RedisServer;
use faults_support::{Dispatches, Outcome, key_of, timed_call};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_idempotency::{DefaultClassifier, IdempotencyError, IdempotencyLayer, RedisStore, Settle};

const NAMESPACE: &str = "review-dispatch:";
const USER: &str = "tower-idempotency";
const PASSWORD: &str = "test-only-password";

/// The `ACL SETUSER …` line from SECURITY.md, with the placeholder password replaced.
fn recommended_acl() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/SECURITY.md")).expect("SECURITY.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with("ACL SETUSER "))
        .expect("SECURITY.md has an `ACL SETUSER` line");
    assert!(
        line.contains(&format!("~{NAMESPACE}*")),
        "the documented rule is for {NAMESPACE}"
    );
    line.split_whitespace()
        .map(|w| {
            if w == ">CHANGE-ME" {
                format!(">{PASSWORD}")
            } else {
                w.to_owned()
            }
        })
        .collect()
}

fn create_user(server: &RedisServer, acl: &[String]) {
    let args: Vec<&str> = acl.iter().map(String::as_str).collect();
    assert_eq!(server.cli(&args), "OK", "ACL SETUSER {acl:?}");
}

fn url_as(server: &RedisServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}", server.port())
}

async fn store_as(server: &RedisServer, user: &str) -> RedisStore {
    RedisStore::builder(url_as(server, user, PASSWORD))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect as the ACL user")
}

/// The error and its whole `source()` chain, as an operator would read it in the logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test]
async fn store_works_under_exactly_the_recommended_acl_user() {
    let server = RedisServer::start();
    create_user(&server, &recommended_acl());
    let store = store_as(&server, USER).await;
    let dispatches = Dispatches::default();
    let keep = IdempotencyLayer::new(store.clone(), key_of)
        .with_namespace(NAMESPACE)
        .layer(dispatches.service());
    let blocked = IdempotencyLayer::new(store.clone(), key_of)
        .with_namespace(NAMESPACE)
        .with_classifier(DefaultClassifier::new().on_success(Settle::Release))
        .layer(dispatches.service());
    let renewing = IdempotencyLayer::new(store.clone(), key_of)
        .with_namespace(NAMESPACE)
        .with_ttl(Duration::from_millis(300))
        .with_renewal(Duration::from_millis(100))
        .layer(dispatches.service_taking(Duration::from_millis(800)));
    let origin = Instant::now();

    // Claim and duplicate: SET NX PX.
    assert_eq!(
        timed_call(keep.clone(), "o/r:1:abcdef1".into(), origin).await.outcome,
        Outcome::Dispatched
    );
    assert_eq!(
        timed_call(keep.clone(), "o/r:1:abcdef1".into(), origin).await.outcome,
        Outcome::Duplicate
    );
    // Blocked release: EVALSHA (first use: NOSCRIPT → SCRIPT LOAD → EVALSHA), GET and DEL inside.
    assert_eq!(
        timed_call(blocked.clone(), "o/r:2:abcdef1".into(), origin)
            .await
            .outcome,
        Outcome::Dispatched
    );
    assert_eq!(
        server.cli(&["EXISTS", "review-dispatch:o/r:2:abcdef1"]),
        "0",
        "released"
    );
    // Renewal of a job longer than its TTL: EVALSHA, GET and PEXPIRE inside.
    let long = tokio::spawn(timed_call(renewing.clone(), "o/r:3:abcdef1".into(), origin));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        timed_call(renewing.clone(), "o/r:3:abcdef1".into(), origin)
            .await
            .outcome,
        Outcome::Duplicate,
        "renewal kept the claim past its 300 ms TTL"
    );
    assert_eq!(long.await.unwrap().outcome, Outcome::Dispatched);
    // After a script flush (as after a Redis restart), the scripts are reloaded under the same user.
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert_eq!(
        timed_call(blocked, "o/r:4:abcdef1".into(), origin).await.outcome,
        Outcome::Dispatched
    );
    assert_eq!(
        server.cli(&["EXISTS", "review-dispatch:o/r:4:abcdef1"]),
        "0",
        "released after NOSCRIPT"
    );

    // `ACL LOG` lists every refusal. The only one allowed is `CLIENT SETINFO`, which the client
    // sends on connect and ignores (Redis 7.2+; older servers do not know the command).
    let log = server.cli(&["ACL", "LOG"]);
    let lines: Vec<&str> = log.lines().collect();
    let refused: Vec<&str> = lines
        .windows(2)
        .filter(|w| w[0] == "object")
        .map(|w| w[1])
        .filter(|object| *object != "client|setinfo")
        .collect();
    assert!(
        refused.is_empty(),
        "the store needed something the recommended ACL refuses: {refused:?}\n{log}"
    );
    assert_eq!(dispatches.total(), 4);

    // And nothing else: no keys outside the namespace, no dangerous commands.
    let mut conn = store.connection();
    let refusals = [
        redis::cmd("GET").arg("other:key").clone(),
        redis::cmd("SET").arg("other:key").arg("x").clone(),
        redis::cmd("DEL").arg("other:key").clone(),
        redis::cmd("KEYS").arg("*").clone(),
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("CONFIG").arg("GET").arg("*").clone(),
        redis::cmd("EVAL").arg("return 1").arg(0).clone(),
        redis::cmd("SCRIPT").arg("FLUSH").clone(),
        redis::cmd("SUBSCRIBE").arg("c").clone(),
    ];
    for cmd in refusals {
        let err = cmd
            .query_async::<redis::Value>(&mut conn)
            .await
            .expect_err("the ACL user must not be allowed this");
        assert!(
            err.to_string().to_lowercase().contains("noperm"),
            "expected NOPERM for {:?}, got {err}",
            String::from_utf8_lossy(&cmd.get_packed_command())
        );
    }
}

#[tokio::test]
async fn layer_outside_the_users_namespace_fails_closed_with_noperm() {
    let server = RedisServer::start();
    create_user(&server, &recommended_acl());
    let dispatches = Dispatches::default();
    let svc = IdempotencyLayer::new(store_as(&server, USER).await, key_of)
        .with_namespace("some-other-namespace:")
        .layer(dispatches.service());

    let err = svc.oneshot("o/r:1:abcdef1".to_owned()).await.unwrap_err();
    let text = chain(&err);
    eprintln!("outside the namespace: {text}");
    let IdempotencyError::StoreUnavailable { source, .. } = &err else {
        panic!("expected a fail-closed store error, got {err:?}");
    };
    assert!(
        !source.may_have_applied(),
        "a refused command did not apply: no cleanup needed"
    );
    assert!(
        text.contains("failed closed") && text.contains("claim") && text.to_lowercase().contains("noperm"),
        "{text}"
    );
    assert_eq!(dispatches.total(), 0, "the inner service is not called");
    assert_eq!(server.cli(&["DBSIZE"]), "0");
}

#[tokio::test]
async fn user_without_the_permissions_fails_closed_with_a_clear_error() {
    let server = RedisServer::start();
    // Right key pattern, but only read access: the claim's SET is refused.
    let acl: Vec<String> = [
        "ACL",
        "SETUSER",
        "read-only",
        "on",
        &format!(">{PASSWORD}"),
        "resetkeys",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("~{NAMESPACE}*"), "-@all".into(), "+get".into()])
    .collect();
    create_user(&server, &acl);
    let dispatches = Dispatches::default();
    let svc = IdempotencyLayer::new(store_as(&server, "read-only").await, key_of)
        .with_namespace(NAMESPACE)
        .layer(dispatches.service());

    let err = svc.clone().oneshot("o/r:1:abcdef1".to_owned()).await.unwrap_err();
    let text = chain(&err);
    eprintln!("without SET: {text}");
    assert!(err.is_store_unavailable(), "{err:?}");
    assert!(
        text.to_lowercase().contains("noperm") && text.contains("'set'"),
        "the error names the refused command: {text}"
    );
    assert_eq!(dispatches.total(), 0);

    // A wrong password fails when the store is built, not on the first claim.
    let err = RedisStore::builder(url_as(&server, USER, "wrong"))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect_err("a wrong password must not connect");
    let text = chain(&err);
    eprintln!("wrong password: {text}");
    assert!(
        text.to_lowercase().contains("auth") || text.contains("WRONGPASS"),
        "the error says authentication failed: {text}"
    );
}
