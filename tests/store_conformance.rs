//! One conformance suite, run against every store: the semantics the layer relies on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use tower::ServiceExt;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore, RedisStore};

const TTL: Duration = Duration::from_millis(400);

/// A store under test, plus a way to look at raw keys behind its back.
struct Harness<S> {
    store: Arc<S>,
    exists: Box<dyn Fn(String) -> futures::future::BoxFuture<'static, bool> + Send + Sync>,
    _server: Option<RedisServer>,
}

fn memory() -> Harness<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let s = store.clone();
    Harness {
        store,
        exists: Box::new(move |k| {
            let found = s.contains(&k);
            Box::pin(async move { found })
        }),
        _server: None,
    }
}

async fn redis() -> Harness<RedisStore> {
    let server = RedisServer::start();
    let store = Arc::new(RedisStore::connect(server.url()).await.expect("connect to test redis"));
    let conn = store.connection();
    Harness {
        store,
        exists: Box::new(move |k| {
            let mut conn = conn.clone();
            Box::pin(async move {
                redis::cmd("EXISTS")
                    .arg(k)
                    .query_async::<i64>(&mut conn)
                    .await
                    .expect("EXISTS")
                    == 1
            })
        }),
        _server: Some(server),
    }
}

mod cases {
    use super::*;

    pub async fn first_claim_acquires<S: IdempotencyStore>(h: Harness<S>) {
        let t = ClaimToken::generate();
        assert_eq!(h.store.claim("k1", &t, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert!((h.exists)("k1".into()).await);
    }

    pub async fn duplicate_is_refused<S: IdempotencyStore>(h: Harness<S>) {
        let (a, b) = (ClaimToken::generate(), ClaimToken::generate());
        assert_eq!(h.store.claim("k", &a, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert_eq!(h.store.claim("k", &b, TTL).await.unwrap(), ClaimOutcome::AlreadyClaimed);
        // Not even the owner's token claims twice: a claim is a claim.
        assert_eq!(h.store.claim("k", &a, TTL).await.unwrap(), ClaimOutcome::AlreadyClaimed);
    }

    pub async fn keys_are_independent<S: IdempotencyStore>(h: Harness<S>) {
        assert_eq!(
            h.store.claim("a", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::Acquired
        );
        assert_eq!(
            h.store.claim("b", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::Acquired
        );
        assert_eq!(
            h.store.claim("a", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed
        );
    }

    pub async fn reclaim_possible_after_ttl_not_before<S: IdempotencyStore>(h: Harness<S>) {
        assert_eq!(
            h.store.claim("k", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::Acquired
        );
        tokio::time::sleep(TTL / 2).await;
        assert_eq!(
            h.store.claim("k", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed
        );
        tokio::time::sleep(TTL / 2 + Duration::from_millis(150)).await;
        assert_eq!(
            h.store.claim("k", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::Acquired
        );
    }

    pub async fn release_frees_the_key<S: IdempotencyStore>(h: Harness<S>) {
        let t = ClaimToken::generate();
        assert_eq!(h.store.claim("k", &t, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert!(h.store.release("k", &t).await.unwrap());
        assert!(!(h.exists)("k".into()).await);
        assert!(
            !h.store.release("k", &t).await.unwrap(),
            "second release deletes nothing"
        );
        assert_eq!(
            h.store.claim("k", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::Acquired
        );
    }

    pub async fn stale_release_keeps_new_owners_claim<S: IdempotencyStore>(h: Harness<S>) {
        let (old, new) = (ClaimToken::generate(), ClaimToken::generate());
        assert_eq!(
            h.store.claim("k", &old, Duration::from_millis(100)).await.unwrap(),
            ClaimOutcome::Acquired
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // our claim expired ...
        assert_eq!(h.store.claim("k", &new, TTL).await.unwrap(), ClaimOutcome::Acquired); // ... someone else claimed
        assert!(
            !h.store.release("k", &old).await.unwrap(),
            "a stale token must not delete"
        );
        assert!(
            !h.store.renew("k", &old, TTL).await.unwrap(),
            "a stale token must not renew"
        );
        assert!((h.exists)("k".into()).await);
        assert_eq!(
            h.store.claim("k", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed
        );
    }

    pub async fn renew_extends_only_our_claim<S: IdempotencyStore>(h: Harness<S>) {
        let t = ClaimToken::generate();
        assert_eq!(
            h.store.claim("k", &t, Duration::from_millis(300)).await.unwrap(),
            ClaimOutcome::Acquired
        );
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert!(h.store.renew("k", &t, Duration::from_millis(300)).await.unwrap());
        }
        // 450 ms after the claim, well past its original 300 ms TTL, it is still held.
        assert_eq!(
            h.store.claim("k", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed
        );
        assert!(!h.store.renew("other", &t, TTL).await.unwrap());
    }

    pub async fn namespace_is_applied<S: IdempotencyStore>(h: Harness<S>) {
        let layer = IdempotencyLayer::new(h.store.clone(), |k: &&'static str| IdempotencyKey::new(k).map(Some))
            .with_namespace("ns:");
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_: &'static str| async { Ok::<_, std::convert::Infallible>(()) });
        svc.oneshot("job-1").await.unwrap();
        assert!((h.exists)("ns:job-1".into()).await, "namespaced key present");
        assert!(!(h.exists)("job-1".into()).await, "bare key absent");
    }
}

macro_rules! conformance {
    ($suite:ident, $harness:expr) => {
        mod $suite {
            use super::*;
            #[tokio::test]
            async fn first_claim_acquires() {
                cases::first_claim_acquires($harness).await
            }
            #[tokio::test]
            async fn duplicate_is_refused() {
                cases::duplicate_is_refused($harness).await
            }
            #[tokio::test]
            async fn keys_are_independent() {
                cases::keys_are_independent($harness).await
            }
            #[tokio::test]
            async fn reclaim_possible_after_ttl_not_before() {
                cases::reclaim_possible_after_ttl_not_before($harness).await
            }
            #[tokio::test]
            async fn release_frees_the_key() {
                cases::release_frees_the_key($harness).await
            }
            #[tokio::test]
            async fn stale_release_keeps_new_owners_claim() {
                cases::stale_release_keeps_new_owners_claim($harness).await
            }
            #[tokio::test]
            async fn renew_extends_only_our_claim() {
                cases::renew_extends_only_our_claim($harness).await
            }
            #[tokio::test]
            async fn namespace_is_applied() {
                cases::namespace_is_applied($harness).await
            }
        }
    };
}

conformance!(memory_store, memory());
conformance!(redis_store, redis().await);
