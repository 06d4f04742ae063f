//! A store that grants every claim and remembers nothing: isolates the layer's own machinery
//! (key, token, futures, state machine) from any store's data structure. Shared by both benches.

use std::time::Duration;

use tower_idempotency::StoreError;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};

pub struct GrantAll;

impl IdempotencyStore for GrantAll {
    async fn claim(&self, _key: &str, _token: &ClaimToken, _ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        Ok(ClaimOutcome::Acquired)
    }
    async fn release(&self, _key: &str, _token: &ClaimToken) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn renew(&self, _key: &str, _token: &ClaimToken, _ttl: Duration) -> Result<bool, StoreError> {
        Ok(true)
    }
}
