//! An in-process limit store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::store::{Acquire, LimitStore};
use crate::StoreError;
use crate::store::ClaimToken;

/// Holders kept in this process's memory, with the semantics of the Redis store: at most
/// `limit` live holders per key, lease expiry, idempotent acquire, renewal that never revives an
/// expired lease, owner-checked release.
///
/// **It does not limit across processes**: each process has its own map, which is the gap this
/// limit exists to close. Use it for tests and for services that truly run as one process.
///
/// Time is read from `tokio::time`, so tests may pause and advance it.
///
/// ```
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::limit::{ConcurrencyLimitLayer, MemoryLimitStore};
///
/// let layer = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |job: &String| {
///     IdempotencyKey::new(job).map(Some)
/// })
/// .with_limit(2);
/// # let _ = layer;
/// ```
#[derive(Debug, Default)]
pub struct MemoryLimitStore {
    keys: Mutex<Keys>,
}

#[derive(Debug, Default)]
struct Keys {
    map: HashMap<String, HashMap<ClaimToken, Instant>>,
    /// Size after the last sweep of keys whose holders all expired; sweeping when the map
    /// doubles keeps the amortised cost per acquire constant.
    swept_len: usize,
}

impl MemoryLimitStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of live holders of `key`.
    pub fn holders(&self, key: &str) -> usize {
        let now = Instant::now();
        self.lock()
            .map
            .get(key)
            .map_or(0, |holders| holders.values().filter(|exp| **exp > now).count())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        // Every update is a single insert or remove: a poisoned lock leaves nothing half-done.
        self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn expiry(now: Instant, lease: Duration) -> Instant {
    now.checked_add(lease)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl LimitStore for MemoryLimitStore {
    async fn acquire(
        &self,
        key: &str,
        holder: &ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> Result<Acquire, StoreError> {
        let now = Instant::now();
        let mut keys = self.lock();
        if keys.map.len() > 1024 && keys.map.len() >= 2 * keys.swept_len {
            keys.map.retain(|_, holders| holders.values().any(|exp| *exp > now));
            keys.swept_len = keys.map.len();
        }
        let holders = keys.map.entry(key.to_owned()).or_default();
        holders.retain(|_, exp| *exp > now);
        if holders.contains_key(holder) || holders.len() < limit {
            holders.insert(holder.clone(), expiry(now, lease));
            return Ok(Acquire::Granted);
        }
        let earliest = holders.values().min().copied().unwrap_or(now);
        Ok(Acquire::AtCapacity {
            retry_after: earliest.saturating_duration_since(now).max(Duration::from_millis(1)),
        })
    }

    async fn renew(&self, key: &str, holder: &ClaimToken, lease: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut keys = self.lock();
        match keys.map.get_mut(key).and_then(|holders| holders.get_mut(holder)) {
            Some(exp) if *exp > now => {
                *exp = expiry(now, lease);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, key: &str, holder: &ClaimToken) -> Result<bool, StoreError> {
        let mut keys = self.lock();
        let Some(holders) = keys.map.get_mut(key) else {
            return Ok(false);
        };
        let removed = holders.remove(holder).is_some();
        if holders.is_empty() {
            keys.map.remove(key);
        }
        Ok(removed)
    }
}
