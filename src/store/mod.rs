//! Claim stores: where the "who dispatches" decision is recorded.
//!
//! The layer does not care where claims live, only that a claim is atomic and that release and
//! renewal check the owner token, so a slow job can never delete or extend a claim that has
//! since passed to someone else. [`RedisStore`] shares claims across processes;
//! [`MemoryStore`] keeps them in one process, for tests and single-process services.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod memory;
mod record;
#[cfg(feature = "redis")]
mod redis;

pub use self::record::{ClaimReply, Record, RecordState};
#[cfg(feature = "redis")]
pub(crate) use self::record::{LUA_TOKEN, encode_completed_header, encode_in_progress};

#[cfg(feature = "redis")]
pub use self::redis::{DEFAULT_TIMEOUT, RedisStore, RedisStoreBuilder, redact_password};
#[cfg(feature = "redis")]
pub(crate) use self::redis::{bounded, ttl_millis};
#[cfg(feature = "redis")]
mod inspect;
#[cfg(feature = "redis")]
pub use self::inspect::{KeyInfo, KeyState, ScanKeyspace};
#[cfg(feature = "redis-cluster")]
mod redis_cluster;
#[cfg(feature = "redis")]
mod tls;
#[cfg(feature = "redis-cluster")]
pub use self::redis_cluster::RedisClusterStoreBuilder;
pub use memory::MemoryStore;

/// The result of a claim that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClaimOutcome {
    /// The key was free and is now ours, or it was already held by **our own token** (a resent
    /// command whose first copy landed, or a retry of the same job under a stable owner
    /// identity): dispatch.
    Acquired,
    /// Someone else holds the key: this call is a duplicate.
    AlreadyClaimed,
}

/// Identifies the owner of one claim, so release and renewal only touch our own claim, and a
/// claim that finds its own token is recognised as ours.
///
/// By default tokens are unique per call: a per-process random prefix plus a counter. A caller
/// with a stable identity for one job (a stream message id, a delivery id) can make the token
/// from it ([`from_owner`](Self::from_owner)), so a retry of the same job finds its own claim.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken(Arc<str>);

impl ClaimToken {
    /// A fresh token, unique within this process and, with overwhelming probability, across
    /// processes.
    ///
    /// ```
    /// use tower_idempotency::store::ClaimToken;
    /// assert_ne!(ClaimToken::generate(), ClaimToken::generate());
    /// ```
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // `{nonce:016x}-{n:x}`, written by hand: this runs on every claim, and `format!` plus
        // the copy into an `Arc` cost more than the rest of building the token.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 33];
        let nonce = process_nonce();
        for (i, b) in buf[..16].iter_mut().enumerate() {
            *b = HEX[((nonce >> (60 - 4 * i)) & 0xf) as usize];
        }
        buf[16] = b'-';
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
        for (i, b) in buf[17..17 + digits].iter_mut().enumerate() {
            *b = HEX[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
        }
        match std::str::from_utf8(&buf[..17 + digits]) {
            Ok(text) => Self(Arc::from(text)),
            // Unreachable (the buffer is ASCII hex); the slow path gives the same text.
            Err(_) => Self(Arc::from(format!("{nonce:016x}-{n:x}").as_str())),
        }
    }

    /// The token of a caller-supplied owner identity (a stream message id, a delivery id): the
    /// same identity always gives the same token, and it never equals a generated one.
    ///
    /// ```
    /// use tower_idempotency::store::ClaimToken;
    /// assert_eq!(ClaimToken::from_owner("1700000000000-0"), ClaimToken::from_owner("1700000000000-0"));
    /// assert_eq!(ClaimToken::from_owner("1-0").as_str(), "owner:1-0");
    /// ```
    pub fn from_owner(owner: &str) -> Self {
        Self(Arc::from(format!("owner:{owner}").as_str()))
    }

    /// A token with the given text; for stores and tests that need a known value.
    pub fn from_string(token: impl Into<String>) -> Self {
        Self(Arc::from(token.into().as_str()))
    }

    /// The token's text, as stored as the claim's value.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This token carrying the fingerprint of the request it claims for (e.g. a digest of its
    /// method, path and body), stored with the record so a later request with the same key can
    /// tell whether it carries the same payload. `None` when `fingerprint` contains the record
    /// separators `\x1e`/`\x1f` or the token already has one.
    ///
    /// ```
    /// use tower_idempotency::store::ClaimToken;
    /// let token = ClaimToken::from_owner("7").with_fingerprint("9f86d0").unwrap();
    /// assert_eq!(token.fingerprint(), Some("9f86d0"));
    /// assert_eq!(ClaimToken::from_owner("7").fingerprint(), None);
    /// ```
    pub fn with_fingerprint(&self, fingerprint: &str) -> Option<Self> {
        let separators = |s: &str| s.contains(['\u{1e}', '\u{1f}']);
        if separators(fingerprint) || separators(&self.0) {
            return None;
        }
        Some(Self(Arc::from(format!("{}\u{1f}f{fingerprint}", self.0).as_str())))
    }

    /// The fingerprint this token carries, if any.
    pub fn fingerprint(&self) -> Option<&str> {
        record::fingerprint_of(&self.0)
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ClaimToken").field(&&*self.0).finish()
    }
}

/// 64 random bits per process, from the standard library's randomly seeded hasher: enough to
/// tell processes apart without another dependency.
fn process_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        h.finish()
    })
}

/// A store could not answer. The layer treats this as "don't know", which by default means
/// fail closed: the call is short-circuited rather than risk a second dispatch.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::StoreError;
///
/// let err = StoreError::Timeout { operation: "claim", after: Duration::from_millis(500) };
/// assert_eq!(err.kind(), "timeout");
/// // The SET may still land after we gave up: the layer cleans such a claim up.
/// assert!(err.may_have_applied());
/// assert_eq!(err.to_string(), "idempotency store did not answer `claim` within 500ms");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the configured timeout. The command may still have been
    /// applied (a "phantom" claim), which is why the layer cleans up after it.
    #[error("idempotency store did not answer `{operation}` within {after:?}")]
    Timeout {
        /// The operation: `claim`, `release` or `renew`.
        operation: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// Redis answered with an error or the connection failed.
    #[cfg(feature = "redis")]
    #[error("redis error during `{operation}`")]
    Redis {
        /// The operation: `claim`, `release` or `renew`.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: ::redis::RedisError,
    },
    /// The store answered something the claim protocol does not expect.
    #[error("unexpected reply to `{operation}`: {reply}")]
    UnexpectedReply {
        /// The operation: `claim`, `release` or `renew`.
        operation: &'static str,
        /// The reply, rendered for humans.
        reply: String,
    },
    /// Any other backend failure, for stores outside this crate.
    #[error("idempotency store backend error")]
    Backend(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>),
    /// A store setting was refused when the store was built; nothing was sent.
    #[error("invalid store setting `{setting}`: {reason}")]
    InvalidSetting {
        /// The setting, e.g. `timeout`.
        setting: &'static str,
        /// What is wrong and what to change.
        reason: String,
    },
}

impl StoreError {
    /// Whether the failed command may still have been applied by the store: a timed-out or
    /// broken request may have landed; a command the server refused did not.
    pub fn may_have_applied(&self) -> bool {
        match self {
            StoreError::Timeout { .. } => true,
            #[cfg(feature = "redis")]
            StoreError::Redis { source, .. } => {
                // A refused connection never carried the command.
                (source.is_io_error() || source.is_timeout()) && !source.is_connection_refusal()
            }
            StoreError::UnexpectedReply { .. } | StoreError::InvalidSetting { .. } => false,
            StoreError::Backend(_) => true,
        }
    }

    /// A short, stable name for the kind of failure, for metrics, tags and rate limiting.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout { .. } => "timeout",
            #[cfg(feature = "redis")]
            StoreError::Redis { source, .. } => {
                if source.is_connection_refusal() {
                    "connection_refused"
                } else if source.is_timeout() {
                    "timeout"
                } else if source.is_io_error() {
                    "io"
                } else {
                    "server"
                }
            }
            StoreError::UnexpectedReply { .. } => "unexpected_reply",
            StoreError::Backend(_) => "backend",
            StoreError::InvalidSetting { .. } => "invalid_setting",
        }
    }
}

/// Where claims are kept.
///
/// Every method receives the full key (the layer's namespace already applied) and must be
/// atomic with respect to other callers, including callers in other processes when the store is
/// shared. Implementations bound their own latency: a method that may hang forever would hang the
/// request it guards.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
/// use tower_idempotency::MemoryStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let mine = ClaimToken::generate();
/// let ttl = Duration::from_secs(60);
/// assert_eq!(store.claim("k", &mine, ttl).await?, ClaimOutcome::Acquired);
/// assert_eq!(store.claim("k", &ClaimToken::generate(), ttl).await?, ClaimOutcome::AlreadyClaimed);
/// assert!(store.release("k", &mine).await?);
/// # Ok(()) }
/// ```
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically claims `key` for `token` for `ttl`, unless someone else holds it.
    ///
    /// Must be idempotent per owner: when `key` is already held by `token` (the same command
    /// resent after a lost reply, or a retry of the same job under a stable owner identity) the
    /// answer is [`ClaimOutcome::Acquired`], never a duplicate of ourselves.
    fn claim(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// Deletes the claim on `key` if, and only if, it is still held by `token`.
    /// Returns whether a claim was deleted.
    fn release(&self, key: &str, token: &ClaimToken) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Extends the claim on `key` to `ttl` from now if, and only if, it is still held by
    /// `token`. Returns `false` when the claim has been lost (expired, or taken by another).
    fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The longest TTL this store can express; the layer refuses a longer one when it is built.
    /// The default is 100 years.
    fn max_ttl(&self) -> Duration {
        Duration::from_secs(100 * 365 * 24 * 3600)
    }

    /// [`claim`](Self::claim), answering with the [`Record`] that is there when the key is held:
    /// in progress (and how long its lease has left) or completed (and its stored outcome). A
    /// record **completed by `token`** is `Held`, not `Acquired`: a retry of a finished job does
    /// not run it again.
    ///
    /// The default calls `claim` and reports a held key as in progress with an unknown lease
    /// (for stores without records); the stores of this crate read the record in the same
    /// command that claims.
    fn claim_record(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<ClaimReply, StoreError>> + Send {
        async move {
            Ok(match self.claim(key, token, ttl).await? {
                ClaimOutcome::Acquired => ClaimReply::Acquired,
                ClaimOutcome::AlreadyClaimed => {
                    ClaimReply::Held(Record::in_progress(&ClaimToken::from_string(""), None))
                }
            })
        }
    }

    /// [`claim_record`](Self::claim_record) that also hands out a **fencing token** when it
    /// claims: a number greater than every earlier holder's of `key`, kept in the record, so
    /// downstream writes can reject a stale holder. A held key answers as `claim_record` does
    /// (the holder's token is in its [`Record`]).
    ///
    /// The default claims without one (`None`). [`RedisStore`] takes the server's clock in
    /// microseconds (`TIME`, in a script: the claim costs a script instead of one `SET`);
    /// [`MemoryStore`] a process-wide counter.
    fn claim_fenced(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<(ClaimReply, Option<u64>), StoreError>> + Send {
        async move { Ok((self.claim_record(key, token, ttl).await?, None)) }
    }

    /// Records `payload` as the **follow-up** of the run in progress on `key` (run once more
    /// after it, with the latest trigger): kept for `ttl` beside the record, a newer payload
    /// replacing an older one. One command (`SET <key>␟next`). The default refuses.
    fn record_follow_up(
        &self,
        key: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, payload, ttl);
        std::future::ready(Err(unsupported("record_follow_up")))
    }

    /// Takes the follow-up recorded for `key`, if any, atomically: of all the callers, one gets
    /// it. One command (`GETDEL`). The default refuses.
    fn take_follow_up(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send {
        let _ = key;
        std::future::ready(Err(unsupported("take_follow_up")))
    }

    /// Makes `key` in progress again under `token`, for a follow-up run: if it holds `token`'s
    /// **completed** record, or nothing. Returns whether it did; someone else's record is left
    /// alone. The default refuses.
    fn reopen(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (key, token, ttl);
        std::future::ready(Err(unsupported("reopen")))
    }

    /// Marks the record on `key` **completed** if, and only if, it is `token`'s, storing
    /// `outcome` with it, and keeps it for `retention` from now. Returns whether it was
    /// recorded. A key that is free (the lease ran out while the job ran) or that someone else
    /// holds is left alone (`false`): the record is the lease's, and the lease is gone.
    ///
    /// The default keeps the claim in progress until its TTL, as a store without records does,
    /// and answers `true`.
    fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: Option<&[u8]>,
        retention: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (key, token, outcome, retention);
        std::future::ready(Ok(true))
    }

    /// Atomically makes `token` the holder of `key` for `ttl` **if someone holds it** (a human
    /// override taking an automated claim over); a free key is left free. Returns whether the
    /// key was held (and is now `token`'s). Afterwards the previous holder's release and renewal
    /// fail their token check.
    ///
    /// The default refuses (the override then fails like any store error); the stores of this
    /// crate implement it with one command.
    fn take_over(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (key, token, ttl);
        std::future::ready(Err(StoreError::UnexpectedReply {
            operation: "take_over",
            reply: "this store does not support overrides".into(),
        }))
    }
}

impl<T: IdempotencyStore> IdempotencyStore for Arc<T> {
    fn claim(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send {
        (**self).claim(key, token, ttl)
    }

    fn release(&self, key: &str, token: &ClaimToken) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).release(key, token)
    }

    fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).renew(key, token, ttl)
    }

    fn max_ttl(&self) -> Duration {
        (**self).max_ttl()
    }

    fn claim_record(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<ClaimReply, StoreError>> + Send {
        (**self).claim_record(key, token, ttl)
    }

    fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: Option<&[u8]>,
        retention: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).complete(key, token, outcome, retention)
    }

    fn claim_fenced(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<(ClaimReply, Option<u64>), StoreError>> + Send {
        (**self).claim_fenced(key, token, ttl)
    }

    fn record_follow_up(
        &self,
        key: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).record_follow_up(key, payload, ttl)
    }

    fn take_follow_up(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send {
        (**self).take_follow_up(key)
    }

    fn reopen(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).reopen(key, token, ttl)
    }

    fn take_over(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).take_over(key, token, ttl)
    }
}

fn unsupported(operation: &'static str) -> StoreError {
    StoreError::UnexpectedReply {
        operation,
        reply: "this store does not support follow-up runs".into(),
    }
}

/// The key beside a record where its follow-up is kept.
#[cfg(feature = "redis")]
pub(crate) fn follow_up_key(key: &str) -> String {
    format!("{key}\u{1f}next")
}

/// Futures returned by the type-erased store the layer holds.
pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Object-safe form of [`IdempotencyStore`], so the layer's types do not carry the store type.
pub(crate) trait ErasedStore: Send + Sync + 'static {
    fn claim(
        self: Arc<Self>,
        key: Arc<str>,
        token: ClaimToken,
        ttl: Duration,
        fenced: bool,
    ) -> BoxFuture<Result<(ClaimReply, Option<u64>), StoreError>>;
    fn complete(
        self: Arc<Self>,
        key: Arc<str>,
        token: ClaimToken,
        outcome: Option<Vec<u8>>,
        retention: Duration,
    ) -> BoxFuture<Result<bool, StoreError>>;
    fn record_follow_up(
        self: Arc<Self>,
        key: Arc<str>,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<Result<(), StoreError>>;
    fn take_follow_up(self: Arc<Self>, key: Arc<str>) -> BoxFuture<Result<Option<Vec<u8>>, StoreError>>;
    fn reopen(self: Arc<Self>, key: Arc<str>, token: ClaimToken, ttl: Duration) -> BoxFuture<Result<bool, StoreError>>;
    fn release(self: Arc<Self>, key: Arc<str>, token: ClaimToken) -> BoxFuture<Result<bool, StoreError>>;
    fn renew(self: Arc<Self>, key: Arc<str>, token: ClaimToken, ttl: Duration) -> BoxFuture<Result<bool, StoreError>>;
    fn max_ttl(&self) -> Duration;
    fn take_over(
        self: Arc<Self>,
        key: Arc<str>,
        token: ClaimToken,
        ttl: Duration,
    ) -> BoxFuture<Result<bool, StoreError>>;
}

impl<T: IdempotencyStore> ErasedStore for T {
    fn claim(
        self: Arc<Self>,
        key: Arc<str>,
        token: ClaimToken,
        ttl: Duration,
        fenced: bool,
    ) -> BoxFuture<Result<(ClaimReply, Option<u64>), StoreError>> {
        if fenced {
            Box::pin(async move { IdempotencyStore::claim_fenced(&*self, &key, &token, ttl).await })
        } else {
            Box::pin(async move { Ok((IdempotencyStore::claim_record(&*self, &key, &token, ttl).await?, None)) })
        }
    }
    fn complete(
        self: Arc<Self>,
        key: Arc<str>,
        token: ClaimToken,
        outcome: Option<Vec<u8>>,
        retention: Duration,
    ) -> BoxFuture<Result<bool, StoreError>> {
        Box::pin(async move { IdempotencyStore::complete(&*self, &key, &token, outcome.as_deref(), retention).await })
    }
    fn record_follow_up(
        self: Arc<Self>,
        key: Arc<str>,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        Box::pin(async move { IdempotencyStore::record_follow_up(&*self, &key, &payload, ttl).await })
    }
    fn take_follow_up(self: Arc<Self>, key: Arc<str>) -> BoxFuture<Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move { IdempotencyStore::take_follow_up(&*self, &key).await })
    }
    fn reopen(self: Arc<Self>, key: Arc<str>, token: ClaimToken, ttl: Duration) -> BoxFuture<Result<bool, StoreError>> {
        Box::pin(async move { IdempotencyStore::reopen(&*self, &key, &token, ttl).await })
    }
    fn release(self: Arc<Self>, key: Arc<str>, token: ClaimToken) -> BoxFuture<Result<bool, StoreError>> {
        Box::pin(async move { IdempotencyStore::release(&*self, &key, &token).await })
    }
    fn renew(self: Arc<Self>, key: Arc<str>, token: ClaimToken, ttl: Duration) -> BoxFuture<Result<bool, StoreError>> {
        Box::pin(async move { IdempotencyStore::renew(&*self, &key, &token, ttl).await })
    }
    fn max_ttl(&self) -> Duration {
        IdempotencyStore::max_ttl(self)
    }
    fn take_over(
        self: Arc<Self>,
        key: Arc<str>,
        token: ClaimToken,
        ttl: Duration,
    ) -> BoxFuture<Result<bool, StoreError>> {
        Box::pin(async move { IdempotencyStore::take_over(&*self, &key, &token, ttl).await })
    }
}

/// Checks a store's per-call timeout when the store is built: zero would fail every call, and
/// a bound over an hour is no bound (and overflows the connect limit, four times it).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn validate_timeout(timeout: Duration) -> Result<Duration, StoreError> {
    const MAX: Duration = Duration::from_secs(3600);
    if timeout.is_zero() {
        return Err(StoreError::InvalidSetting {
            setting: "timeout",
            reason: "a zero timeout fails every call; use a positive bound such as 500 ms".into(),
        });
    }
    if timeout > MAX {
        return Err(StoreError::InvalidSetting {
            setting: "timeout",
            reason: format!(
                "{timeout:?} is longer than the 1 h maximum; a store call that may hang that long is not bounded, use a value in milliseconds"
            ),
        });
    }
    Ok(timeout * 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_read_nonce_dash_counter_in_hex() {
        let a = ClaimToken::generate();
        let b = ClaimToken::generate();
        let parse = |t: &ClaimToken| {
            let (nonce, n) = t.as_str().split_once('-').expect("nonce-counter");
            assert_eq!(nonce.len(), 16, "{t:?}");
            assert_eq!(nonce, format!("{:016x}", process_nonce()));
            assert_eq!(
                n,
                format!("{:x}", u64::from_str_radix(n, 16).unwrap()),
                "minimal hex: {t:?}"
            );
            u64::from_str_radix(n, 16).unwrap()
        };
        assert!(parse(&b) > parse(&a), "the counter increases");
        assert_ne!(a, b);
    }
}
