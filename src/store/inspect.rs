//! Looking at claims from the outside: inspect one key, list a namespace, find claims that will
//! not free themselves, and force-release a key by hand.
//!
//! This is the operator's side of [`RedisStore`], used by the `tower-idempotency` command-line
//! tool (`cli/` in the repository). A key is one Redis string `<namespace><key>` holding a
//! [`Record`](super::Record) (see [`store::Record`](super::Record) for the format) with a `PX`
//! expiry: in progress or completed, its owner, and a stored outcome. A [`KeyInfo`] reports the
//! state, the **owner**, the **time left** (`PTTL`), the size of a stored outcome and the
//! fencing token; the claim's age is not stored and is reported as absent (`None`).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_idempotency::RedisStore;
//!
//! # async fn run() -> Result<(), tower_idempotency::StoreError> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! for claim in store.list("review:", 100).await? {
//!     println!("{} held by {:?}, {:?} left", claim.key, claim.owner, claim.time_left);
//! }
//! if let Some(claim) = store.inspect("review:octo/repo:42:abc123f").await? {
//!     println!("{claim:?}");
//!     store.force_release(&claim.key, "alice", "job crashed, INC-1234").await?;
//! }
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{RedisError, RedisResult};

use super::redis::RedisStore;
use super::{Record, RecordState, StoreError, bounded};

/// How many keys `list` asks Redis for per `SCAN` call (`COUNT`, a hint Redis may exceed).
const SCAN_COUNT: usize = 500;

/// How many keys `list` looks at concurrently over the multiplexed connection.
const LOOKUP_CONCURRENCY: usize = 32;

/// What a key under a namespace is, as far as Redis can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyState {
    /// A claim is held: the job is in progress (or its owner died and the claim has not
    /// expired yet).
    Claimed,
    /// The job completed; the record is kept for the layer's retention.
    Completed,
    /// The key exists but is not a claim (not a Redis string): something else wrote under the
    /// namespace. [`RedisStore::force_release`] refuses to delete it.
    NotAClaim,
}

impl KeyState {
    /// The state's stable name, as the command-line tool prints it: `claimed`, `not_a_claim`.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Claimed => "claimed",
            KeyState::Completed => "completed",
            KeyState::NotAClaim => "not_a_claim",
        }
    }
}

/// One key as [`RedisStore::inspect`] and [`RedisStore::list`] see it.
///
/// `key`, `state`, `owner`, `time_left`, `outcome_size` and `fencing_token` are read from Redis.
/// `age` is always `None` today: a record does not store when it was claimed. It is here so
/// callers (and the tool's JSON, where it is `null`) do not change shape when records carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The full Redis key, namespace included (lossily decoded if it is not UTF-8).
    pub key: String,
    /// Whether the key is a claim.
    pub state: KeyState,
    /// The owner of the record (its token without a request fingerprint): `0123456789abcdef-1a`
    /// for a generated token, `owner:<id>` for one made from a caller's identity
    /// ([`ClaimToken::from_owner`](super::ClaimToken::from_owner)). `None` when not a claim.
    pub owner: Option<String>,
    /// Time until Redis expires the key (`PTTL`); `None` when the key has **no** expiry, which a
    /// claim made by this crate never has: such a key blocks its job until someone deletes it.
    pub time_left: Option<Duration>,
    /// How long ago the claim was taken. Not stored: always `None`.
    pub age: Option<Duration>,
    /// The claim's fencing token, when the layer that claimed it had fencing on
    /// (`with_fencing`); else `None`.
    pub fencing_token: Option<u64>,
    /// Size in bytes of the outcome stored with a completed record; `None` when there is none.
    pub outcome_size: Option<u64>,
}

impl KeyInfo {
    /// The caller's identity when the owner token was made with
    /// [`ClaimToken::from_owner`](super::ClaimToken::from_owner) (`owner:<id>` gives `<id>`).
    pub fn owner_identity(&self) -> Option<&str> {
        self.owner.as_deref().and_then(|o| o.strip_prefix("owner:"))
    }
}

/// Connections over which [`RedisStore::list`] can walk the whole keyspace: a standalone
/// connection (one `SCAN` loop) or, with the `redis-cluster` feature, a cluster connection
/// (one `SCAN` loop per primary). Sealed: implemented by this crate only.
pub trait ScanKeyspace: ConnectionLike + Clone + Send + Sync + 'static + sealed::Sealed {
    /// The nodes to scan: `None` for "the server this connection talks to", or a primary's
    /// `(host, port)` on a cluster.
    #[doc(hidden)]
    fn scan_nodes(&mut self) -> impl Future<Output = RedisResult<Vec<Option<(String, u16)>>>> + Send;

    /// One `SCAN cursor MATCH pattern COUNT count` on `node`: the next cursor and the keys.
    #[doc(hidden)]
    fn scan_page(
        &mut self,
        node: Option<(String, u16)>,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> impl Future<Output = RedisResult<(u64, Vec<Vec<u8>>)>> + Send;
}

#[allow(unreachable_pub)]
mod sealed {
    pub trait Sealed {}
}

fn scan_cmd(cursor: u64, pattern: &str, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
    cmd
}

macro_rules! standalone_scan {
    ($conn:ty) => {
        impl sealed::Sealed for $conn {}
        impl ScanKeyspace for $conn {
            async fn scan_nodes(&mut self) -> RedisResult<Vec<Option<(String, u16)>>> {
                Ok(vec![None])
            }
            async fn scan_page(
                &mut self,
                _node: Option<(String, u16)>,
                cursor: u64,
                pattern: &str,
                count: usize,
            ) -> RedisResult<(u64, Vec<Vec<u8>>)> {
                scan_cmd(cursor, pattern, count).query_async(self).await
            }
        }
    };
}

standalone_scan!(ConnectionManager);
standalone_scan!(MultiplexedConnection);

#[cfg(feature = "redis-cluster")]
mod cluster {
    use redis::cluster_async::ClusterConnection;
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    use redis::{ErrorKind, FromRedisValue, RedisResult, Value};

    use super::{ScanKeyspace, scan_cmd, sealed};

    impl sealed::Sealed for ClusterConnection {}

    impl ScanKeyspace for ClusterConnection {
        /// Every primary that serves slots, from `CLUSTER SLOTS` (replicas are skipped: they
        /// hold copies of the same keys).
        async fn scan_nodes(&mut self) -> RedisResult<Vec<Option<(String, u16)>>> {
            let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(self).await?;
            let mut primaries: Vec<Option<(String, u16)>> = Vec::new();
            let Value::Array(ranges) = reply else {
                return Err(unexpected("CLUSTER SLOTS is not an array"));
            };
            for range in ranges {
                // [start, end, [host, port, id, ...], replicas...]
                let Value::Array(parts) = range else {
                    return Err(unexpected("a CLUSTER SLOTS entry is not an array"));
                };
                let Some(Value::Array(primary)) = parts.get(2) else {
                    return Err(unexpected("a CLUSTER SLOTS entry has no primary"));
                };
                let (Some(host), Some(port)) = (primary.first(), primary.get(1)) else {
                    return Err(unexpected("a CLUSTER SLOTS primary has no host and port"));
                };
                let host = String::from_redis_value(host.clone())?;
                let port = u16::from_redis_value(port.clone())?;
                let node = Some((host, port));
                if !primaries.contains(&node) {
                    primaries.push(node);
                }
            }
            Ok(primaries)
        }

        async fn scan_page(
            &mut self,
            node: Option<(String, u16)>,
            cursor: u64,
            pattern: &str,
            count: usize,
        ) -> RedisResult<(u64, Vec<Vec<u8>>)> {
            let cmd = scan_cmd(cursor, pattern, count);
            let reply = match node {
                Some((host, port)) => {
                    self.route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
                    )
                    .await?
                }
                None => {
                    self.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary))
                        .await?
                }
            };
            <(u64, Vec<Vec<u8>>)>::from_redis_value(reply).map_err(Into::into)
        }
    }

    fn unexpected(what: &'static str) -> redis::RedisError {
        redis::RedisError::from((ErrorKind::UnexpectedReturnType, what))
    }
}

/// `prefix` with the glob characters `SCAN MATCH` interprets (`*`, `?`, `[`, `]`, `\`) escaped,
/// then `*`: matches exactly the keys that start with `prefix`.
fn match_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// `PTTL`'s answer: `-2` missing, `-1` no expiry, else milliseconds left.
enum Pttl {
    Missing,
    Forever,
    Left(Duration),
}

impl From<i64> for Pttl {
    fn from(ms: i64) -> Self {
        match ms {
            -2 => Pttl::Missing,
            ms if ms < 0 => Pttl::Forever,
            ms => Pttl::Left(Duration::from_millis(ms.unsigned_abs())),
        }
    }
}

/// `WRONGTYPE`, alone or as the failure of a pipelined command.
fn is_wrong_type(err: &RedisError) -> bool {
    err.code() == Some("WRONGTYPE")
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "WRONGTYPE"))
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Reads one key: `None` when it does not exist (never claimed, released, or expired).
    ///
    /// `key` is the full Redis key, the layer's namespace included. One `GET` and one `PTTL`,
    /// pipelined, each call bounded by the store's timeout. A key that exists but is not a
    /// string is reported as [`KeyState::NotAClaim`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// match store.inspect("review:octo/repo:42:abc123f").await? {
    ///     Some(claim) => println!("held by {:?} for {:?} more", claim.owner, claim.time_left),
    ///     None => println!("free"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn inspect(&self, key: &str) -> Result<Option<KeyInfo>, StoreError> {
        self.inspect_bytes(key.as_bytes()).await
    }

    async fn inspect_bytes(&self, key: &[u8]) -> Result<Option<KeyInfo>, StoreError> {
        let mut conn = self.connection();
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        let reply: Result<(Option<Vec<u8>>, i64), StoreError> =
            bounded(self.timeout(), "inspect", pipe.query_async(&mut conn)).await;
        let display = String::from_utf8_lossy(key).into_owned();
        let (owner, pttl) = match reply {
            Ok((owner, pttl)) => (owner, Pttl::from(pttl)),
            Err(StoreError::Redis { source, .. }) if is_wrong_type(&source) => {
                let pttl: i64 = bounded(
                    self.timeout(),
                    "inspect",
                    redis::cmd("PTTL").arg(key).query_async(&mut conn),
                )
                .await?;
                return Ok(match Pttl::from(pttl) {
                    Pttl::Missing => None,
                    pttl => Some(key_info(display, KeyState::NotAClaim, None, pttl)),
                });
            }
            Err(e) => return Err(e),
        };
        Ok(match (owner, pttl) {
            // Expired or deleted between the two commands, or never there.
            (None, _) | (_, Pttl::Missing) => None,
            (Some(value), pttl) => {
                let record = Record::parse(&value);
                let (state, outcome_size) = match record.state() {
                    RecordState::Completed { outcome } => {
                        (KeyState::Completed, outcome.as_ref().map(|o| o.len() as u64))
                    }
                    _ => (KeyState::Claimed, None),
                };
                let mut info = key_info(display, state, Some(record.owner().to_owned()), pttl);
                info.outcome_size = outcome_size;
                info.fencing_token = record.fencing_token();
                Some(info)
            }
        })
    }

    /// Deletes `key` whoever holds it, so the next trigger for that job dispatches. For an
    /// operator freeing a claim whose owner died or hangs; the layer never calls it.
    ///
    /// Logged at `warn` with `key`, `who`, `why` and the `owner` whose claim was deleted.
    /// Returns whether a claim was deleted (`false`: the key did not exist). Refuses (with
    /// [`StoreError::Redis`], `WRONGTYPE`) to delete a key that is not a claim. The owner is read
    /// and the key deleted in one script (`EVALSHA`, with `GET` and `DEL` inside: the same
    /// commands the store's own user needs).
    ///
    /// If the job that held the claim is in fact still running, it and the next trigger's job
    /// will run at the same time: release only what you know is dead.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let freed = store.force_release("review:octo/repo:42:abc123f", "alice", "worker OOM-killed").await?;
    /// # let _ = freed; Ok(()) }
    /// ```
    pub async fn force_release(&self, key: &str, who: &str, why: &str) -> Result<bool, StoreError> {
        static FORCE_RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new("local v = redis.call('GET', KEYS[1]) if v then redis.call('DEL', KEYS[1]) end return v")
        });
        let mut conn = self.connection();
        let owner: Option<Vec<u8>> = bounded(
            self.timeout(),
            "force_release",
            FORCE_RELEASE.key(key).invoke_async(&mut conn),
        )
        .await?;
        match owner {
            Some(owner) => {
                tracing::warn!(
                    key = ?key,
                    who = ?who,
                    why = ?why,
                    owner = ?String::from_utf8_lossy(&owner),
                    "idempotency claim force-released"
                );
                Ok(true)
            }
            None => {
                tracing::info!(key = ?key, who = ?who, why = ?why, "force release: no such key");
                Ok(false)
            }
        }
    }
}

fn key_info(key: String, state: KeyState, owner: Option<String>, pttl: Pttl) -> KeyInfo {
    KeyInfo {
        key,
        state,
        owner,
        time_left: match pttl {
            Pttl::Left(left) => Some(left),
            Pttl::Forever | Pttl::Missing => None,
        },
        age: None,
        fencing_token: None,
        outcome_size: None,
    }
}

impl<C: ScanKeyspace> RedisStore<C> {
    /// Lists up to `limit` keys that start with `namespace_prefix` (e.g. the layer's namespace,
    /// `review:`), in no particular order.
    ///
    /// Walks the keyspace with `SCAN … MATCH <prefix>* COUNT 500` (glob characters in the prefix
    /// are escaped), on a cluster once per primary, and stops as soon as it has `limit` keys, so
    /// the answer and the per-key lookups are bounded by `limit`. When fewer keys match, the
    /// walk goes through the whole keyspace, 500 keys per call: each call is short for Redis
    /// (unlike `KEYS`, it never blocks the server for the whole keyspace), but on a Redis with
    /// millions of other keys the walk takes that many calls. Each `SCAN` call and each key's
    /// lookup is bounded by the store's timeout. A key is listed once even if `SCAN` returns it
    /// twice; keys created or deleted during the walk may be missed; keys that expire during the
    /// walk are left out. An empty prefix lists every key, claims or not.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let claims = store.list("review:", 1000).await?;
    /// println!("{} claims held", claims.len());
    /// # Ok(()) }
    /// ```
    pub async fn list(&self, namespace_prefix: &str, limit: usize) -> Result<Vec<KeyInfo>, StoreError> {
        let keys = self.scan_keys(namespace_prefix, limit).await?;
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(LOOKUP_CONCURRENCY) {
            for info in join_all(chunk.iter().map(|key| self.inspect_bytes(key))).await {
                found.extend(info?);
            }
        }
        Ok(found)
    }

    async fn scan_keys(&self, namespace_prefix: &str, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let pattern = match_prefix(namespace_prefix);
        let mut conn = self.connection();
        let nodes = bounded(self.timeout(), "list", conn.scan_nodes()).await?;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if limit == 0 {
            return Ok(keys);
        }
        'nodes: for node in nodes {
            let mut cursor = 0;
            loop {
                let (next, page) = bounded(
                    self.timeout(),
                    "list",
                    conn.scan_page(node.clone(), cursor, &pattern, SCAN_COUNT),
                )
                .await?;
                for key in page {
                    if seen.insert(key.clone()) {
                        keys.push(key);
                        if keys.len() >= limit {
                            break 'nodes;
                        }
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }

    /// Claims under `namespace_prefix` that will not free themselves soon: those with **no
    /// expiry**, and those with more than `time_left_over` left. Each is logged at `warn`
    /// (`key`, `owner`, `time_left_ms`) and returned. Looks at up to `limit` keys (see
    /// [`list`](Self::list)).
    ///
    /// A claim's age is not stored, so "in progress for longer than X" cannot be answered
    /// directly. What can be: the layer always sets a TTL and renews it to at most that TTL, so a
    /// claim with more time left than the longest TTL your layers use was not made by them (or
    /// was made with a mistaken TTL), and a claim without expiry blocks its job forever. Pass
    /// your longest layer TTL as `time_left_over`. A claim whose owner died inside its TTL is
    /// not found here: it frees itself when the TTL runs out.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// for claim in store.wedged("review:", Duration::from_secs(300), 10_000).await? {
    ///     eprintln!("{} will not free itself soon", claim.key);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wedged(
        &self,
        namespace_prefix: &str,
        time_left_over: Duration,
        limit: usize,
    ) -> Result<Vec<KeyInfo>, StoreError> {
        let mut wedged = self.list(namespace_prefix, limit).await?;
        wedged
            .retain(|info| info.state == KeyState::Claimed && info.time_left.is_none_or(|left| left > time_left_over));
        for info in &wedged {
            tracing::warn!(
                key = ?info.key,
                owner = ?info.owner,
                time_left_ms = info.time_left.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                threshold_ms = u64::try_from(time_left_over.as_millis()).unwrap_or(u64::MAX),
                "wedged idempotency claim: no expiry, or more time left than the threshold"
            );
        }
        Ok(wedged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_prefix_escapes_glob_characters() {
        assert_eq!(match_prefix("review:"), "review:*");
        assert_eq!(match_prefix("a*b?c[d]e\\"), "a\\*b\\?c\\[d\\]e\\\\*");
        assert_eq!(match_prefix(""), "*");
    }

    #[test]
    fn pttl_codes_mean_missing_forever_or_time_left() {
        assert!(matches!(Pttl::from(-2), Pttl::Missing));
        assert!(matches!(Pttl::from(-1), Pttl::Forever));
        assert!(matches!(Pttl::from(1500), Pttl::Left(d) if d == Duration::from_millis(1500)));
    }

    #[test]
    fn owner_identity_is_read_from_owner_tokens_only() {
        let mut info = key_info("k".into(), KeyState::Claimed, Some("owner:1-0".into()), Pttl::Forever);
        assert_eq!(info.owner_identity(), Some("1-0"));
        info.owner = Some("0123456789abcdef-1a".into());
        assert_eq!(info.owner_identity(), None);
    }
}
