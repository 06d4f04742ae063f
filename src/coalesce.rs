//! In-process coalescing of concurrent claims on the same key.
//!
//! Under a webhook burst for one pull request, every request would otherwise send its own
//! `SET NX` and all but one would get `nil`. Instead the first caller (the leader) sends the
//! claim and the others (followers) wait for its answer: whatever it is, a follower never
//! dispatches — the leader's success makes them duplicates, the leader's store error makes them
//! fail the same way. If the leader is dropped before it hears back, followers claim for
//! themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::store::{ClaimOutcome, StoreError};

type Answer = Option<Result<ClaimOutcome, StoreError>>;

#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    inflight: Mutex<Inflight>,
}

#[derive(Debug, Default)]
struct Inflight {
    map: HashMap<Arc<str>, Entry>,
    next_id: u64,
}

/// One leader's claim in flight. The channel is made only when a first follower arrives, so a
/// key nobody else asks for costs a map insert and remove, not a channel.
#[derive(Debug)]
struct Entry {
    leader: u64,
    tx: Option<watch::Sender<Answer>>,
}

pub(crate) enum Role {
    Leader(LeaderGuard),
    Follower(watch::Receiver<Answer>),
}

/// Held by the leader; publishes its answer and removes the in-flight entry (also on drop).
pub(crate) struct LeaderGuard {
    coalescer: Arc<Coalescer>,
    key: Arc<str>,
    id: u64,
}

impl Coalescer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn join(self: &Arc<Self>, key: &Arc<str>) -> Role {
        let mut inflight = self.lock();
        if let Some(entry) = inflight.map.get_mut(key) {
            let tx = entry.tx.get_or_insert_with(|| watch::channel(None).0);
            return Role::Follower(tx.subscribe());
        }
        inflight.next_id = inflight.next_id.wrapping_add(1);
        let id = inflight.next_id;
        inflight.map.insert(key.clone(), Entry { leader: id, tx: None });
        Role::Leader(LeaderGuard {
            coalescer: self.clone(),
            key: key.clone(),
            id,
        })
    }

    #[cfg(test)]
    pub(crate) fn inflight(&self) -> usize {
        self.lock().map.len()
    }
}

impl LeaderGuard {
    pub(crate) fn publish(self, answer: &Result<ClaimOutcome, StoreError>) {
        // Remove first so a caller arriving after this point goes to the store (and finds our
        // claim there) instead of reading a stale answer.
        if let Some(tx) = self.remove() {
            tx.send_replace(Some(answer.clone()));
        }
    }

    /// Removes our entry; returns the followers' channel, if any followed.
    fn remove(&self) -> Option<watch::Sender<Answer>> {
        let mut inflight = self.coalescer.lock();
        match inflight.map.get(&self.key) {
            Some(entry) if entry.leader == self.id => inflight.map.remove(&self.key).and_then(|e| e.tx),
            _ => None,
        }
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        // Dropping the sender (after the lock is released) tells followers no answer is coming.
        drop(self.remove());
    }
}

/// What a follower learned: `None` when the leader went away without an answer.
pub(crate) async fn follow(mut rx: watch::Receiver<Answer>) -> Option<Result<ClaimOutcome, StoreError>> {
    let answer = rx.wait_for(Option::is_some).await.ok()?;
    match answer.as_ref()? {
        // The leader's claim (or someone else's) holds the key: a follower is a duplicate.
        Ok(_) => Some(Ok(ClaimOutcome::AlreadyClaimed)),
        Err(e) => Some(Err(e.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_never_acquire_and_entries_are_removed() {
        let c = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("k");
        let Role::Leader(leader) = c.join(&key) else {
            panic!("first caller leads")
        };
        let Role::Follower(rx) = c.join(&key) else {
            panic!("second caller follows")
        };
        assert_eq!(c.inflight(), 1);
        leader.publish(&Ok(ClaimOutcome::Acquired));
        assert_eq!(c.inflight(), 0, "a caller after the answer goes to the store");
        assert_eq!(
            follow(rx).await.map(|r| r.ok()),
            Some(Some(ClaimOutcome::AlreadyClaimed))
        );
    }

    #[tokio::test]
    async fn followers_share_the_leaders_store_error() {
        let c = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("k");
        let Role::Leader(leader) = c.join(&key) else { panic!() };
        let Role::Follower(rx) = c.join(&key) else { panic!() };
        let err = StoreError::Timeout {
            operation: "claim",
            after: std::time::Duration::from_millis(1),
        };
        leader.publish(&Err(err));
        assert!(matches!(follow(rx).await, Some(Err(StoreError::Timeout { .. }))));
    }

    #[tokio::test]
    async fn followers_learn_when_the_leader_goes_away() {
        let c = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("k");
        let leader = c.join(&key);
        let Role::Follower(rx) = c.join(&key) else { panic!() };
        drop(leader);
        assert_eq!(c.inflight(), 0);
        assert!(follow(rx).await.is_none(), "no answer: the follower claims for itself");
    }
}
