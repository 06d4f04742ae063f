//! The store conformance cases: the semantics the layer relies on, run against every store
//! (memory, single Redis, Redis Cluster). Included with
//! `#[path = "common/conformance.rs"] mod conformance;` by the test files that run it; each
//! provides its own harness constructors and invokes `conformance!`.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

pub use futures::future::BoxFuture;

pub const TTL: Duration = Duration::from_millis(400);

/// A store under test, plus a way to look at raw keys behind its back.
pub struct Harness<S> {
    pub store: Arc<S>,
    pub exists: Box<dyn Fn(String) -> BoxFuture<'static, bool> + Send + Sync>,
    /// Whatever must live as long as the store (a server, a cluster).
    pub guard: Option<Box<dyn std::any::Any + Send>>,
}

pub mod cases {
    use super::*;
    use tower::ServiceExt;
    use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
    use tower_idempotency::{IdempotencyKey, IdempotencyLayer};

    pub async fn first_claim_acquires<S: IdempotencyStore>(h: Harness<S>) {
        let t = ClaimToken::generate();
        assert_eq!(h.store.claim("k1", &t, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert!((h.exists)("k1".into()).await);
    }

    pub async fn duplicate_is_refused<S: IdempotencyStore>(h: Harness<S>) {
        let (a, b) = (ClaimToken::generate(), ClaimToken::generate());
        assert_eq!(h.store.claim("k", &a, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert_eq!(h.store.claim("k", &b, TTL).await.unwrap(), ClaimOutcome::AlreadyClaimed);
        assert_eq!(
            h.store.claim("k", &ClaimToken::generate(), TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed
        );
    }

    /// A claim that finds its own token (a resent command whose first copy landed, a retry
    /// under a stable owner identity) is ours: `Acquired`, never a duplicate of itself.
    pub async fn claim_is_idempotent_per_owner<S: IdempotencyStore>(h: Harness<S>) {
        let (mine, other) = (ClaimToken::from_owner("1700000000000-0"), ClaimToken::generate());
        assert_eq!(h.store.claim("k", &mine, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert_eq!(
            h.store.claim("k", &mine, TTL).await.unwrap(),
            ClaimOutcome::Acquired,
            "a resend of our own claim is told it holds the key"
        );
        assert_eq!(
            h.store.claim("k", &other, TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed
        );
        assert!(h.store.release("k", &mine).await.unwrap(), "the claim is still ours");
        assert_eq!(h.store.claim("k", &other, TTL).await.unwrap(), ClaimOutcome::Acquired);
        assert_eq!(
            h.store.claim("k", &mine, TTL).await.unwrap(),
            ClaimOutcome::AlreadyClaimed,
            "once another owner holds it, our token is a duplicate"
        );
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

#[allow(unused_macros)] // used by some of the files that include this one
macro_rules! conformance {
    ($suite:ident, $harness:expr) => {
        mod $suite {
            use super::*;
            use $crate::conformance::cases;
            #[tokio::test]
            async fn first_claim_acquires() {
                cases::first_claim_acquires($harness).await
            }
            #[tokio::test]
            async fn duplicate_is_refused() {
                cases::duplicate_is_refused($harness).await
            }
            #[tokio::test]
            async fn claim_is_idempotent_per_owner() {
                cases::claim_is_idempotent_per_owner($harness).await
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
