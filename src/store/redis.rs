//! The Redis-backed claim store: one `SET NX GET PX` per claim, shared by every process.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};

use super::{
    ClaimOutcome, ClaimReply, ClaimToken, IdempotencyStore, LUA_TOKEN, Record, StoreError, encode_completed_header,
    encode_in_progress,
};

/// Deletes the key only if its record is still ours: a job that outlived its TTL must not
/// delete the claim of whoever claimed the key after it.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{LUA_TOKEN}local v = redis.call('GET', KEYS[1]) if v and tok(v) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
    ))
});

/// Marks our record completed: `ARGV[2]` (the completed header) with the record's fencing token
/// and, when given, `␞ARGV[4]` (the outcome), kept `ARGV[3]` ms. A free key (the lease ran out)
/// or someone else's record is left alone (`0`); our own completed record stays as it is.
static COMPLETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{LUA_TOKEN}local v = redis.call('GET', KEYS[1]) \
         if not v or tok(v) ~= ARGV[1] then return 0 end \
         if string.byte(v, 1) == 30 then return 1 end \
         local value = ARGV[2] .. fence(v) \
         if ARGV[4] then value = value .. '\\30' .. ARGV[4] end \
         redis.call('SET', KEYS[1], value, 'PX', ARGV[3]) return 1"
    ))
});

/// Reopens our completed record (or a free key) as in progress under our token (`ARGV[1]`;
/// the new value `ARGV[2]`, `PX ARGV[3]`), for a follow-up run.
static REOPEN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{LUA_TOKEN}local v = redis.call('GET', KEYS[1]) \
         if v and (string.byte(v, 1) ~= 30 or tok(v) ~= ARGV[1]) then return 0 end \
         redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1"
    ))
});

/// Claims with a fencing token from the server's clock (microseconds of `TIME`), kept in the
/// record: `{1, fence}` when claimed, `{0, value}` with the record that is there otherwise.
static CLAIM_FENCED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "local v = redis.call('GET', KEYS[1]) if v then return {0, v} end \
         local t = redis.call('TIME') local f = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
         redis.call('SET', KEYS[1], ARGV[1] .. '\\31n' .. string.format('%d', f), 'PX', ARGV[2]) return {1, f}",
    )
});

/// The claim for servers older than Redis 7.0, which refuse `SET … NX GET`: the same answer
/// (set, or the value that was there) in one atomic script.
static CLAIM_COMPAT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "local v = redis.call('GET', KEYS[1]) if v then return v end redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return false",
    )
});

/// `SET … XX GET` for servers older than 6.2.
static TAKE_OVER_COMPAT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "local v = redis.call('GET', KEYS[1]) if v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end return v",
    )
});

/// Extends our lease only while it is ours and in progress, rewriting its expiry (`ARGV[2]`,
/// `PX ARGV[3]`); a completed record is never turned back into a lease.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{LUA_TOKEN}local v = redis.call('GET', KEYS[1]) \
         if v and string.byte(v, 1) ~= 30 and tok(v) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2] .. fence(v), 'PX', ARGV[3]) return 1 end return 0"
    ))
});

/// Default bound on every Redis call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// Claims kept in Redis, shared by every process that talks to the same server.
///
/// A claim is one atomic `SET <key> <token> NX GET PX <ttl>` (Redis ≥ 7.0; older servers get an
/// equivalent script, chosen once after the server refuses the command). `GET` returns the
/// holder's token, so a claim that finds **its own** token — the cluster client resending a
/// `SET` whose first copy landed, or a retry under a stable owner identity — is `Acquired`, not
/// a duplicate of itself. Release and renewal are Lua scripts
/// that compare the stored token before `DEL` / `PEXPIRE` (run with `EVALSHA`, reloaded on
/// `NOSCRIPT` by [`redis::Script`]). Every call is bounded by a timeout (default
/// [`DEFAULT_TIMEOUT`]).
///
/// `C` is the connection: by default a [`ConnectionManager`] (one multiplexed connection that
/// reconnects by itself, cheap to clone, so all claims pipeline over it). Any
/// [`redis::aio::ConnectionLike`] that is `Clone` fits, e.g. a cluster connection.
///
/// Everything is configured when the store is built; nothing reads the environment afterwards.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::RedisStore;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .timeout(Duration::from_millis(250))
///     .connect()
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    conn: C,
    timeout: Duration,
    /// Set once the server refused `SET … NX GET` (Redis < 7.0): claims use the script.
    compat: Arc<AtomicBool>,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`] over a [`ConnectionManager`]. See [`RedisStore::builder`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    timeout: Duration,
    reconnect_retries: usize,
    reconnect_min_delay: Duration,
    reconnect_max_delay: Duration,
    pub(super) tls: super::tls::TlsSettings,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &redact_password(&self.url))
            .field("timeout", &self.timeout)
            .field("reconnect_retries", &self.reconnect_retries)
            .field("reconnect_min_delay", &self.reconnect_min_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A Redis URL fit to show: `redis://user:secret@host` becomes `redis://user:***@host`, so a
/// logged builder or an error message leaks no password.
///
/// ```
/// use tower_idempotency::store::redact_password;
/// assert_eq!(redact_password("redis://svc:hunter2@cache:6379/0"), "redis://svc:***@cache:6379/0");
/// assert_eq!(redact_password("redis://cache:6379"), "redis://cache:6379");
/// ```
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

/// Runs `connecting` within four times the store's `timeout` (refused when zero or over an
/// hour), with its errors as [`StoreError`]s of the `connect` operation.
pub(crate) async fn connect_within<C>(
    timeout: Duration,
    connecting: impl Future<Output = Result<C, RedisError>>,
) -> Result<C, StoreError> {
    let limit = super::validate_timeout(timeout)?;
    tokio::time::timeout(limit, connecting)
        .await
        .map_err(|_| StoreError::Timeout {
            operation: "connect",
            after: limit,
        })?
        .map_err(|source| StoreError::Redis {
            operation: "connect",
            source,
        })
}

impl RedisStoreBuilder {
    /// Bound on every Redis call (claim, release, renew), including waiting for a reconnect.
    /// Default [`DEFAULT_TIMEOUT`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How the connection retries after it is lost: `retries` attempts with exponential backoff
    /// between `min_delay` and `max_delay`. The defaults (2 retries, 50 ms to 200 ms) make a dead
    /// Redis fail in well under a second; a later call starts a new reconnect, so a Redis that
    /// comes back is picked up without rebuilding the store.
    pub fn reconnect_backoff(mut self, retries: usize, min_delay: Duration, max_delay: Duration) -> Self {
        self.reconnect_retries = retries;
        self.reconnect_min_delay = min_delay;
        self.reconnect_max_delay = max_delay;
        self
    }

    fn client_and_config(&self) -> Result<(redis::Client, ConnectionManagerConfig), StoreError> {
        let client = self.tls.open_client(&self.url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.timeout))
            .set_number_of_retries(self.reconnect_retries)
            .set_min_delay(self.reconnect_min_delay)
            .set_max_delay(self.reconnect_max_delay)
            .set_exponent_base(2.0);
        Ok((client, config))
    }

    /// Connects now; fails if Redis cannot be reached within four times the timeout, and
    /// refuses a zero timeout or one over an hour ([`StoreError::InvalidSetting`]).
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let (client, config) = self.client_and_config()?;
        let conn = connect_within(self.timeout, ConnectionManager::new_with_config(client, config)).await?;
        Ok(RedisStore::from_connection(conn).with_timeout(self.timeout))
    }

    /// Builds the store without connecting; the first call connects. Lets a service start while
    /// Redis is down (its calls fail closed until Redis is back). Needs a Tokio runtime.
    pub fn connect_lazy(self) -> Result<RedisStore, StoreError> {
        super::validate_timeout(self.timeout)?;
        let (client, config) = self.client_and_config()?;
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|source| StoreError::Redis {
            operation: "connect",
            source,
        })?;
        Ok(RedisStore::from_connection(conn).with_timeout(self.timeout))
    }
}

impl RedisStore {
    /// A builder for a store at `url` (`redis://host:port/db`, `rediss://…`, `unix://…`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            timeout: DEFAULT_TIMEOUT,
            reconnect_retries: 2,
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_millis(200),
            tls: Default::default(),
        }
    }

    /// Connects to `url` with the default settings.
    pub async fn connect(url: impl Into<String>) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over an existing connection, e.g. a cluster connection. Configure the
    /// connection's own response timeout too; this store's timeout bounds each call regardless.
    pub fn from_connection(conn: C) -> Self {
        Self {
            conn,
            timeout: DEFAULT_TIMEOUT,
            compat: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets the bound on every call. A zero timeout makes every call fail with
    /// [`StoreError::Timeout`]; the builders refuse it.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A clone of the underlying connection, e.g. to run other commands on the same
    /// multiplexed connection.
    pub fn connection(&self) -> C {
        self.conn.clone()
    }

    async fn bounded<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        bounded(self.timeout, operation, fut).await
    }
}

/// Runs one Redis call within `timeout`, with its errors as [`StoreError`]s of `operation`:
/// every Redis call of the crate (claims, inspection, the concurrency limit) goes through it.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    operation: &'static str,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) if source.is_timeout() => Err(StoreError::Timeout {
            operation,
            after: timeout,
        }),
        Ok(Err(source)) => Err(StoreError::Redis { operation, source }),
        Err(_) => Err(StoreError::Timeout {
            operation,
            after: timeout,
        }),
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Runs an owner-checked script that writes `token`'s in-progress record for `ttl` (renew,
    /// reopen): `ARGV` = token, the new record, `PX` milliseconds. Whether it wrote.
    async fn lease_script(
        &self,
        operation: &'static str,
        script: &redis::Script,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = script.key(key);
        invocation
            .arg(token.as_str())
            .arg(encode_in_progress(token, ttl))
            .arg(ttl_millis(ttl));
        let wrote: i64 = self.bounded(operation, invocation.invoke_async(&mut conn)).await?;
        Ok(wrote == 1)
    }

    async fn claim_by_script(&self, conn: &mut C, key: &str, value: &str, ttl: Duration) -> Result<Value, StoreError> {
        let mut invocation = CLAIM_COMPAT.key(key);
        invocation.arg(value).arg(ttl_millis(ttl));
        self.bounded("claim", invocation.invoke_async(conn)).await
    }
}

/// A duration as Redis's `PX` milliseconds: at least 1, saturating.
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl<C> IdempotencyStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        Ok(match self.claim_record(key, token, ttl).await? {
            ClaimReply::Acquired => ClaimOutcome::Acquired,
            ClaimReply::Held(_) => ClaimOutcome::AlreadyClaimed,
        })
    }

    async fn claim_record(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimReply, StoreError> {
        let mut conn = self.conn.clone();
        let value = encode_in_progress(token, ttl);
        let reply: Value = if self.compat.load(Ordering::Relaxed) {
            self.claim_by_script(&mut conn, key, &value, ttl).await?
        } else {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key)
                .arg(&value)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(ttl_millis(ttl));
            match self.bounded("claim", cmd.query_async(&mut conn)).await {
                Err(StoreError::Redis { source, .. })
                    if source.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                        && source.to_string().contains("syntax error") =>
                {
                    // Redis < 7.0 does not take NX with GET; nothing was applied.
                    tracing::info!("redis refused `SET … NX GET` (server older than 7.0); claiming with a script");
                    self.compat.store(true, Ordering::Relaxed);
                    self.claim_by_script(&mut conn, key, &value, ttl).await?
                }
                other => other?,
            }
        };
        match reply {
            Value::Okay | Value::Nil => Ok(ClaimReply::Acquired),
            Value::BulkString(held) => {
                let record = Record::parse(&held);
                // Our own lease (a resend whose first copy landed, a retry under a stable
                // identity): ours to run. Our own *completed* record is a duplicate.
                if record.state().is_in_progress() && record.is_owned_by(token) {
                    Ok(ClaimReply::Acquired)
                } else {
                    Ok(ClaimReply::Held(record))
                }
            }
            other => Err(StoreError::UnexpectedReply {
                operation: "claim",
                reply: format!("{other:?}"),
            }),
        }
    }

    async fn claim_fenced(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(ClaimReply, Option<u64>), StoreError> {
        let mut conn = self.conn.clone();
        let reply: Value = self
            .bounded(
                "claim",
                CLAIM_FENCED
                    .key(key)
                    .arg(encode_in_progress(token, ttl))
                    .arg(ttl_millis(ttl))
                    .invoke_async(&mut conn),
            )
            .await?;
        let unexpected = |reply: &Value| StoreError::UnexpectedReply {
            operation: "claim",
            reply: format!("{reply:?}"),
        };
        let Value::Array(items) = &reply else {
            return Err(unexpected(&reply));
        };
        match items.as_slice() {
            [Value::Int(1), Value::Int(fence)] => Ok((ClaimReply::Acquired, u64::try_from(*fence).ok())),
            [Value::Int(0), Value::BulkString(held)] => {
                let record = Record::parse(held);
                if record.state().is_in_progress() && record.is_owned_by(token) {
                    let fence = record.fencing_token();
                    Ok((ClaimReply::Acquired, fence))
                } else {
                    Ok((ClaimReply::Held(record), None))
                }
            }
            _ => Err(unexpected(&reply)),
        }
    }

    async fn record_follow_up(&self, key: &str, payload: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(super::follow_up_key(key))
            .arg(payload)
            .arg("PX")
            .arg(ttl_millis(ttl));
        let _: Value = self.bounded("record_follow_up", cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    async fn take_follow_up(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("GETDEL");
        cmd.arg(super::follow_up_key(key));
        self.bounded("take_follow_up", cmd.query_async(&mut conn)).await
    }

    async fn reopen(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        self.lease_script("reopen", &REOPEN, key, token, ttl).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: Option<&[u8]>,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = COMPLETE.key(key);
        invocation
            .arg(token.as_str())
            .arg(encode_completed_header(token))
            .arg(ttl_millis(retention));
        if let Some(outcome) = outcome {
            invocation.arg(outcome);
        }
        let recorded: i64 = self.bounded("complete", invocation.invoke_async(&mut conn)).await?;
        Ok(recorded != 0)
    }

    async fn take_over(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let value = encode_in_progress(token, ttl);
        let reply: Value = if self.compat.load(Ordering::Relaxed) {
            let mut invocation = TAKE_OVER_COMPAT.key(key);
            invocation.arg(&value).arg(ttl_millis(ttl));
            self.bounded("take_over", invocation.invoke_async(&mut conn)).await?
        } else {
            // Only if held (XX); GET says whether it was.
            let mut cmd = redis::cmd("SET");
            cmd.arg(key)
                .arg(&value)
                .arg("XX")
                .arg("GET")
                .arg("PX")
                .arg(ttl_millis(ttl));
            self.bounded("take_over", cmd.query_async(&mut conn)).await?
        };
        match reply {
            Value::Nil => Ok(false),
            Value::BulkString(_) | Value::Okay => Ok(true),
            other => Err(StoreError::UnexpectedReply {
                operation: "take_over",
                reply: format!("{other:?}"),
            }),
        }
    }

    fn max_ttl(&self) -> Duration {
        // `PX` takes a signed 64-bit millisecond count, to which Redis adds the current time.
        Duration::from_millis(i64::MAX as u64 / 2)
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let deleted: i64 = self
            .bounded("release", RELEASE.key(key).arg(token.as_str()).invoke_async(&mut conn))
            .await?;
        Ok(deleted == 1)
    }

    async fn renew(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        self.lease_script("renew", &RENEW, key, token, ttl).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_debug_hides_the_password() {
        let b = RedisStore::builder("redis://svc:hunter2@cache.internal:6379/0");
        let shown = format!("{b:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://svc:***@cache.internal:6379/0"), "{shown}");
        assert_eq!(redact_password("redis://:pw@h"), "redis://:***@h");
        assert_eq!(redact_password("redis://h:6379"), "redis://h:6379");
    }
}
