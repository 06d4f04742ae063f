//! An in-process claim store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{ClaimOutcome, ClaimToken, IdempotencyStore, StoreError};

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
    map: HashMap<String, (ClaimToken, Instant)>,
    /// Size after the last sweep of expired entries; sweeping when the map doubles keeps the
    /// amortised cost per claim constant.
    swept_len: usize,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `key` is currently claimed (by anyone).
    pub fn contains(&self, key: &str) -> bool {
        let now = Instant::now();
        self.lock().map.get(key).is_some_and(|(_, exp)| *exp > now)
    }

    /// Number of live claims.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().map.values().filter(|(_, exp)| *exp > now).count()
    }

    /// Whether there are no live claims.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let now = Instant::now();
        let mut claims = self.lock();
        if let Some((holder, exp)) = claims.map.get(key)
            && *exp > now
        {
            // Our own token: a resend or a retry of the same job, not a duplicate of ourselves.
            return Ok(if holder == token {
                ClaimOutcome::Acquired
            } else {
                ClaimOutcome::AlreadyClaimed
            });
        }
        let expires = expiry(now, ttl);
        claims.map.insert(key.to_owned(), (token.clone(), expires));
        if claims.map.len() > 1024 && claims.map.len() >= 2 * claims.swept_len {
            claims.map.retain(|_, (_, exp)| *exp > now);
            claims.swept_len = claims.map.len();
        }
        Ok(ClaimOutcome::Acquired)
    }

    async fn take_over(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        match claims.map.get_mut(key) {
            Some((holder, exp)) if *exp > now => {
                *holder = token.clone();
                *exp = expiry(now, ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        match claims.map.get(key) {
            Some((owner, exp)) if owner == token && *exp > now => {
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
            Some((owner, exp)) if owner == token && *exp > now => {
                *exp = expiry(now, ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
