//! [`LimitStore`] for [`RedisStore`]: one sorted set per limited key, two Lua scripts and a
//! `ZREM`. See [the module docs](super) for the layout.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;

use super::store::{Acquire, LimitStore};
use crate::store::{ClaimToken, bounded, ttl_millis};
use crate::{RedisStore, StoreError};

static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("scripts/acquire.lua")));
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("scripts/renew.lua")));

/// The acquire script's source, for tools and benchmarks that send it themselves.
pub const ACQUIRE_SCRIPT: &str = include_str!("scripts/acquire.lua");
/// The renew script's source.
pub const RENEW_SCRIPT: &str = include_str!("scripts/renew.lua");

/// Holders of limited keys in Redis, shared by every process that talks to the same server
/// (or cluster: every command touches one key). Each call is one round trip, bounded by the
/// store's timeout.
impl<C> LimitStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn acquire(
        &self,
        key: &str,
        holder: &ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> Result<Acquire, StoreError> {
        let mut conn = self.connection();
        let mut invocation = ACQUIRE.key(key);
        invocation.arg(holder.as_str()).arg(limit).arg(ttl_millis(lease));
        let reply: Vec<i64> = bounded(self.timeout(), "limit_acquire", invocation.invoke_async(&mut conn)).await?;
        match reply.as_slice() {
            [1, _] => Ok(Acquire::Granted),
            [0, ms] => Ok(Acquire::AtCapacity {
                retry_after: Duration::from_millis(u64::try_from(*ms).unwrap_or(0).max(1)),
            }),
            other => Err(StoreError::UnexpectedReply {
                operation: "limit_acquire",
                reply: format!("{other:?}"),
            }),
        }
    }

    async fn renew(&self, key: &str, holder: &ClaimToken, lease: Duration) -> Result<bool, StoreError> {
        let mut conn = self.connection();
        let mut invocation = RENEW.key(key);
        invocation.arg(holder.as_str()).arg(ttl_millis(lease));
        let renewed: i64 = bounded(self.timeout(), "limit_renew", invocation.invoke_async(&mut conn)).await?;
        Ok(renewed == 1)
    }

    async fn release(&self, key: &str, holder: &ClaimToken) -> Result<bool, StoreError> {
        let mut conn = self.connection();
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(key).arg(holder.as_str());
        let removed: i64 = bounded(self.timeout(), "limit_release", cmd.query_async(&mut conn)).await?;
        Ok(removed == 1)
    }

    fn max_lease(&self) -> Duration {
        // Scores are doubles: milliseconds stay exact below 2^53, i.e. for some 285 000 years
        // from the epoch. A hundred years of lease is far inside that.
        Duration::from_secs(100 * 365 * 24 * 3600)
    }
}
