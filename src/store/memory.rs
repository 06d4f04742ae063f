//! An in-process claim store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{ClaimOutcome, ClaimReply, ClaimToken, IdempotencyStore, Record, StoreError};

/// Claims kept in this process's memory, with the same semantics as
/// [`RedisStore`](crate::RedisStore): TTL expiry and token-checked release and renewal.
///
/// **It does not deduplicate across processes.** Each process has its own map, which is exactly
/// the failure this crate exists to prevent; use it for tests, and for services that truly run as
/// one process.
///
/// Time is read from `tokio::time`, so tests may pause and advance it.
///
/// ```
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &String| {
///     IdempotencyKey::new(job).map(Some)
/// });
/// # let _ = layer;
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    claims: Mutex<Claims>,
}

#[derive(Debug, Default)]
struct Claims {
    map: HashMap<String, Entry>,
    /// Follow-ups recorded per key, with their expiry.
    follow_ups: HashMap<String, (Vec<u8>, Instant)>,
    /// Size after the last sweep of expired entries; sweeping when the map doubles keeps the
    /// amortised cost per claim constant.
    swept_len: usize,
}

/// One record: in progress until `completed` is set (with its stored outcome, if any).
#[derive(Debug)]
struct Entry {
    token: ClaimToken,
    expires: Instant,
    completed: Option<Option<Vec<u8>>>,
    fence: Option<u64>,
}

impl Entry {
    fn record(&self, now: Instant) -> Record {
        match &self.completed {
            Some(outcome) => Record::completed(&self.token, outcome.clone()),
            None => Record::in_progress(&self.token, Some(self.expires.saturating_duration_since(now))),
        }
        .with_fencing_token(self.fence)
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `key` is currently claimed (by anyone).
    pub fn contains(&self, key: &str) -> bool {
        let now = Instant::now();
        self.lock().map.get(key).is_some_and(|e| e.expires > now)
    }

    /// Number of live claims.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().map.values().filter(|e| e.expires > now).count()
    }

    /// Whether there are no live claims.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn claim_with(&self, key: &str, token: &ClaimToken, ttl: Duration, fenced: bool) -> (ClaimReply, Option<u64>) {
        static FENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let now = Instant::now();
        let mut claims = self.lock();
        if let Some(entry) = claims.map.get(key)
            && entry.expires > now
        {
            // Our own lease: a resend or a retry of the same job, not a duplicate of ourselves.
            return if entry.completed.is_none() && entry.token == *token {
                (ClaimReply::Acquired, entry.fence)
            } else {
                (ClaimReply::Held(entry.record(now)), None)
            };
        }
        let entry = Entry {
            token: token.clone(),
            expires: expiry(now, ttl),
            completed: None,
            fence: fenced.then(|| FENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        };
        let fence = entry.fence;
        claims.map.insert(key.to_owned(), entry);
        if claims.map.len() > 1024 && claims.map.len() >= 2 * claims.swept_len {
            claims.map.retain(|_, e| e.expires > now);
            claims.swept_len = claims.map.len();
        }
        (ClaimReply::Acquired, fence)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        // A panic while holding this lock cannot leave the map inconsistent (every update is a
        // single insert or remove), so a poisoned lock is safe to keep using.
        self.claims.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `now + ttl`, saturating far in the future instead of overflowing (the layer refuses TTLs over
/// [`IdempotencyStore::max_ttl`] anyway).
fn expiry(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        Ok(match self.claim_record(key, token, ttl).await? {
            ClaimReply::Acquired => ClaimOutcome::Acquired,
            ClaimReply::Held(_) => ClaimOutcome::AlreadyClaimed,
        })
    }

    async fn claim_record(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimReply, StoreError> {
        Ok(self.claim_with(key, token, ttl, false).0)
    }

    async fn claim_fenced(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(ClaimReply, Option<u64>), StoreError> {
        Ok(self.claim_with(key, token, ttl, true))
    }

    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: Option<&[u8]>,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        match claims.map.get_mut(key) {
            Some(entry) if entry.expires > now => {
                if entry.token != *token {
                    return Ok(false);
                }
                if entry.completed.is_none() {
                    entry.expires = expiry(now, retention);
                    entry.completed = Some(outcome.map(<[u8]>::to_vec));
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn record_follow_up(&self, key: &str, payload: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let expires = expiry(Instant::now(), ttl);
        self.lock()
            .follow_ups
            .insert(key.to_owned(), (payload.to_vec(), expires));
        Ok(())
    }

    async fn take_follow_up(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .follow_ups
            .remove(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(payload, _)| payload))
    }

    async fn reopen(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        let ours_or_free = match claims.map.get(key) {
            Some(entry) if entry.expires > now => entry.completed.is_some() && entry.token == *token,
            _ => true,
        };
        if ours_or_free {
            let entry = Entry {
                token: token.clone(),
                expires: expiry(now, ttl),
                completed: None,
                fence: None,
            };
            claims.map.insert(key.to_owned(), entry);
        }
        Ok(ours_or_free)
    }

    async fn take_over(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        match claims.map.get_mut(key) {
            Some(entry) if entry.expires > now => {
                *entry = Entry {
                    token: token.clone(),
                    expires: expiry(now, ttl),
                    completed: None,
                    fence: None,
                };
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        match claims.map.get(key) {
            Some(entry) if entry.token == *token && entry.expires > now => {
                claims.map.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn renew(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        match claims.map.get_mut(key) {
            Some(entry) if entry.token == *token && entry.completed.is_none() && entry.expires > now => {
                entry.expires = expiry(now, ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
