//! The store conformance cases: the semantics the layer relies on, run against every store
//! (memory, single Redis, Redis Cluster). Included with
//! `#[path = "common/conformance.rs"] mod conformance;` by the test files that run it; each
//! provides its own harness constructors and invokes `conformance!`.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

pub use futures::future::BoxFuture;

pub const TTL: Duration = Duration::from_millis(400);
/// How long completed records are kept in these cases: longer than the lease.
pub const RETENTION: Duration = Duration::from_secs(5);

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
    use tower_idempotency::store::{ClaimOutcome, ClaimReply, ClaimToken, IdempotencyStore, RecordState};
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

    /// A duplicate learns the record: in progress with the lease left, then completed with the
    /// stored outcome once the owner completes it.
    pub async fn duplicate_sees_in_progress_then_completed_with_outcome<S: IdempotencyStore>(h: Harness<S>) {
        let (owner, other) = (ClaimToken::generate(), ClaimToken::generate());
        assert_eq!(
            h.store.claim_record("k", &owner, TTL).await.unwrap(),
            ClaimReply::Acquired
        );
        let ClaimReply::Held(record) = h.store.claim_record("k", &other, TTL).await.unwrap() else {
            panic!("a second claim must be held")
        };
        assert_eq!(record.owner(), owner.as_str());
        match record.state() {
            RecordState::InProgress { lease_left: Some(left) } => assert!(*left <= TTL, "{left:?}"),
            state => panic!("expected in progress with a lease, got {state:?}"),
        }
        assert!(
            h.store
                .complete("k", &owner, Some(b"{\"id\":1}"), RETENTION)
                .await
                .unwrap(),
            "the owner completes its record"
        );
        let ClaimReply::Held(record) = h.store.claim_record("k", &other, TTL).await.unwrap() else {
            panic!("a completed record is held")
        };
        assert_eq!(
            record.state(),
            &RecordState::Completed {
                outcome: Some(b"{\"id\":1}".to_vec())
            }
        );
        // The retention, not the lease, bounds it: still there after the lease would have ended.
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        assert!(
            matches!(h.store.claim_record("k", &other, TTL).await.unwrap(), ClaimReply::Held(r) if r.state().is_completed()),
            "kept for the retention, longer than the lease"
        );
    }

    /// Completing, renewing and releasing are owner-checked; a completed record is never turned
    /// back into a lease, and a retry of the owner itself is told it completed.
    pub async fn record_transitions_are_owner_checked<S: IdempotencyStore>(h: Harness<S>) {
        let (owner, other) = (ClaimToken::from_owner("m-1"), ClaimToken::generate());
        assert_eq!(
            h.store.claim_record("k", &owner, TTL).await.unwrap(),
            ClaimReply::Acquired
        );
        assert!(
            !h.store.complete("k", &other, None, RETENTION).await.unwrap(),
            "not the owner"
        );
        assert!(!h.store.release("k", &other).await.unwrap());
        assert!(h.store.complete("k", &owner, None, RETENTION).await.unwrap());
        assert!(
            !h.store.renew("k", &owner, TTL).await.unwrap(),
            "a completed record is not renewed"
        );
        let ClaimReply::Held(record) = h.store.claim_record("k", &owner, TTL).await.unwrap() else {
            panic!("the owner's own retry after completion is a duplicate, not a second run")
        };
        assert_eq!(record.state(), &RecordState::Completed { outcome: None });
        assert!(
            h.store.complete("k", &owner, Some(b"x"), RETENTION).await.unwrap(),
            "completing twice is idempotent"
        );
    }

    /// A fingerprint rides with the record, so a duplicate can compare payloads.
    pub async fn record_keeps_the_request_fingerprint<S: IdempotencyStore>(h: Harness<S>) {
        let owner = ClaimToken::generate().with_fingerprint("9f86d081").unwrap();
        assert_eq!(
            h.store.claim_record("k", &owner, TTL).await.unwrap(),
            ClaimReply::Acquired
        );
        let ClaimReply::Held(record) = h.store.claim_record("k", &ClaimToken::generate(), TTL).await.unwrap() else {
            panic!("held")
        };
        assert_eq!(record.fingerprint(), Some("9f86d081"));
        assert!(
            h.store.renew("k", &owner, TTL).await.unwrap(),
            "renewal keeps the token with its fingerprint"
        );
        assert!(h.store.complete("k", &owner, None, RETENTION).await.unwrap());
        let ClaimReply::Held(record) = h.store.claim_record("k", &ClaimToken::generate(), TTL).await.unwrap() else {
            panic!("held")
        };
        assert_eq!(record.fingerprint(), Some("9f86d081"));
    }

    /// A completion that finds the key free (the lease ran out) or held by another owner leaves
    /// it as it is.
    pub async fn complete_after_the_lease_ran_out_changes_nothing<S: IdempotencyStore>(h: Harness<S>) {
        let (a, b) = (ClaimToken::generate(), ClaimToken::generate());
        assert_eq!(
            h.store.claim_record("k", &a, Duration::from_millis(100)).await.unwrap(),
            ClaimReply::Acquired
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!h.store.complete("k", &a, None, RETENTION).await.unwrap());
        assert!(!(h.exists)("k".into()).await, "a free key stays free");
        assert_eq!(h.store.claim_record("k", &b, TTL).await.unwrap(), ClaimReply::Acquired);
        assert!(
            !h.store.complete("k", &a, None, RETENTION).await.unwrap(),
            "b's claim is left alone"
        );
        assert!(
            matches!(h.store.claim_record("k", &a, TTL).await.unwrap(), ClaimReply::Held(r) if r.state().is_in_progress() && r.owner() == b.as_str())
        );
    }

    /// An override takes a completed record over too: a person asks for a fresh run.
    pub async fn take_over_replaces_a_completed_record<S: IdempotencyStore>(h: Harness<S>) {
        let (a, person) = (ClaimToken::generate(), ClaimToken::generate());
        assert_eq!(h.store.claim_record("k", &a, TTL).await.unwrap(), ClaimReply::Acquired);
        assert!(h.store.complete("k", &a, None, RETENTION).await.unwrap());
        assert!(h.store.take_over("k", &person, TTL).await.unwrap());
        assert!(
            matches!(h.store.claim_record("k", &a, TTL).await.unwrap(), ClaimReply::Held(r) if r.state().is_in_progress() && r.owner() == person.as_str())
        );
        assert!(h.store.release("k", &person).await.unwrap());
    }

    /// Fencing tokens increase with every acquisition of a key and ride with its record
    /// through renewal and completion.
    pub async fn fencing_tokens_increase_across_holders<S: IdempotencyStore>(h: Harness<S>) {
        let (a, b) = (ClaimToken::generate(), ClaimToken::generate());
        let (reply, first) = h.store.claim_fenced("k", &a, TTL).await.unwrap();
        assert_eq!(reply, ClaimReply::Acquired);
        let first = first.expect("a fencing token");
        let (reply, none) = h.store.claim_fenced("k", &b, TTL).await.unwrap();
        assert!(
            matches!(&reply, ClaimReply::Held(r) if r.fencing_token() == Some(first)),
            "{reply:?}"
        );
        assert_eq!(none, None);
        assert!(h.store.renew("k", &a, TTL).await.unwrap());
        assert!(
            h.store
                .complete("k", &a, None, Duration::from_millis(50))
                .await
                .unwrap()
        );
        let ClaimReply::Held(record) = h.store.claim_record("k", &b, TTL).await.unwrap() else {
            panic!("completed record")
        };
        assert_eq!(
            record.fencing_token(),
            Some(first),
            "kept through renewal and completion"
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
        let (reply, second) = h.store.claim_fenced("k", &b, TTL).await.unwrap();
        assert_eq!(reply, ClaimReply::Acquired);
        assert!(second.expect("a fencing token") > first, "{second:?} > {first}");
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
            async fn duplicate_sees_in_progress_then_completed_with_outcome() {
                cases::duplicate_sees_in_progress_then_completed_with_outcome($harness).await
            }
            #[tokio::test]
            async fn record_transitions_are_owner_checked() {
                cases::record_transitions_are_owner_checked($harness).await
            }
            #[tokio::test]
            async fn record_keeps_the_request_fingerprint() {
                cases::record_keeps_the_request_fingerprint($harness).await
            }
            #[tokio::test]
            async fn complete_after_the_lease_ran_out_changes_nothing() {
                cases::complete_after_the_lease_ran_out_changes_nothing($harness).await
            }
            #[tokio::test]
            async fn take_over_replaces_a_completed_record() {
                cases::take_over_replaces_a_completed_record($harness).await
            }
            #[tokio::test]
            async fn fencing_tokens_increase_across_holders() {
                cases::fencing_tokens_increase_across_holders($harness).await
            }
            #[tokio::test]
            async fn namespace_is_applied() {
                cases::namespace_is_applied($harness).await
            }
        }
    };
}
