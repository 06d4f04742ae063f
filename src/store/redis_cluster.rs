//! `RedisStore` over a Redis Cluster: the path when one Redis is not enough.
//!
//! A claim touches exactly one key, so every store command (`SET NX PX`, and the release and
//! renewal scripts with their single `KEYS[1]`) goes to the one primary that owns the key's
//! slot; nothing needs cross-slot atomicity. What a cluster adds is more ways to hang: the
//! cluster client's defaults have *no* response timeout and retry redirects and reconnects for a
//! long time. This builder sets the per-request `response_timeout`, the
//! `overall_response_timeout` (retries and redirects included) and the connection timeout to
//! the store's timeout, and keeps retries short, so a dead primary fails its keys closed within
//! the bound while keys on the other primaries keep working.

use std::fmt;
use std::time::Duration;

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;

use super::StoreError;
use super::redis::{DEFAULT_TIMEOUT, RedisStore, connect_within, redact_password};

/// Builds a [`RedisStore`] over a Redis Cluster connection. See [`RedisStore::cluster_builder`].
#[derive(Clone)]
pub struct RedisClusterStoreBuilder {
    nodes: Vec<String>,
    timeout: Duration,
    retries: u32,
    pub(super) tls: super::tls::TlsSettings,
}

/// Node URLs may carry a password (`redis://user:password@host`); `Debug` shows them without it.
impl fmt::Debug for RedisClusterStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.nodes.iter().map(|n| redact_password(n)).collect();
        f.debug_struct("RedisClusterStoreBuilder")
            .field("nodes", &nodes)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("tls", &self.tls)
            .finish()
    }
}

impl RedisClusterStoreBuilder {
    /// Bound on every Redis call (claim, release, renew), redirects and retries included.
    /// Default [`DEFAULT_TIMEOUT`](crate::store::DEFAULT_TIMEOUT).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often the cluster client retries a request (after `MOVED`/`ASK`, `TRYAGAIN` or a
    /// broken connection) within the timeout. Default 2.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    fn client(&self) -> Result<redis::cluster::ClusterClient, StoreError> {
        let builder = ClusterClientBuilder::new(self.nodes.iter().map(String::as_str));
        self.tls
            .apply_to_cluster(builder)
            .response_timeout(self.timeout)
            .overall_response_timeout(Some(self.timeout))
            .connection_timeout(self.timeout)
            .retries(self.retries)
            .min_retry_wait(10)
            .max_retry_wait(u64::try_from(self.timeout.as_millis() / 4).unwrap_or(u64::MAX).max(10))
            .build()
            .map_err(|source| StoreError::Redis {
                operation: "connect",
                source,
            })
    }

    /// Connects to the cluster now (reads its slot map); fails if no node answers within four
    /// times the timeout.
    pub async fn connect(self) -> Result<RedisStore<ClusterConnection>, StoreError> {
        super::validate_timeout(self.timeout)?;
        let client = self.client()?;
        let conn = connect_within(self.timeout, client.get_async_connection()).await?;
        Ok(RedisStore::from_connection(conn).with_timeout(self.timeout))
    }
}

impl RedisStore<ClusterConnection> {
    /// A builder for a store over the Redis Cluster reachable through `nodes` (any subset of
    /// its primaries, `redis://host:port` each; credentials in the URLs). Needs the
    /// `redis-cluster` feature.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_idempotency::RedisStore;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::cluster_builder(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
    ///     .timeout(Duration::from_millis(250))
    ///     .connect()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn cluster_builder<I, S>(nodes: I) -> RedisClusterStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisClusterStoreBuilder {
            nodes: nodes.into_iter().map(Into::into).collect(),
            timeout: DEFAULT_TIMEOUT,
            retries: 2,
            tls: Default::default(),
        }
    }

    /// Connects to the cluster reachable through `nodes` with the default settings.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect_cluster(["redis://10.0.0.1:6379"]).await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::cluster_builder(nodes).connect().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_does_not_show_passwords() {
        let builder = RedisStore::cluster_builder([
            "redis://idem:s3cret@10.0.0.1:6379",
            "redis://:s3cret@h:1",
            "redis://h:2",
        ]);
        let shown = format!("{builder:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redis://idem:***@10.0.0.1:6379"), "{shown}");
        assert!(shown.contains("redis://h:2"), "{shown}");
    }
}
