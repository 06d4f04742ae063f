//! Records: what a key holds — a claim **in progress** (a renewable lease) or a **completed**
//! job with an optional stored outcome — and their encoding as one Redis string.
//!
//! # Format
//!
//! One string value per key, so every transition is one command or one single-key script and
//! works unchanged on Redis Cluster. `␟` is the unit separator `0x1f`, `␞` the record separator
//! `0x1e`; neither may appear in a token or a fingerprint.
//!
//! | State | Value | Expiry (`PX`) |
//! |---|---|---|
//! | in progress | `<token>␟e<lease expiry, Unix ms>` | the lease (the layer's TTL), renewed |
//! | completed | `␞<token>␟c<completion time, Unix ms>` | the retention |
//! | completed, outcome stored | `␞<token>␟c<completion time, Unix ms>␞<outcome bytes>` | the retention |
//!
//! `<token>` is the owner's [`ClaimToken`]: its owner id, then `␟f<fingerprint>` when the request
//! carried one. A value with neither form (a bare token, as written by versions before records)
//! reads as in progress with an unknown lease.
//!
//! The claim stays a plain `SET <key> <value> NX GET PX <ttl>`: one command that claims, or
//! returns the record that is there. The times in a record are the writer's clock; they are
//! hints for humans and `Retry-After`, never used to decide anything (Redis's own expiry does).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::ClaimToken;

/// Separates a token's fields and a record's trailing field.
pub(crate) const UNIT: char = '\u{1f}';
/// Starts a completed record and separates its stored outcome.
pub(crate) const RECORD: u8 = 0x1e;

/// What a key holds, as a duplicate sees it.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{Record, RecordState};
///
/// let record = Record::parse(b"\x1eabc-1\x1fc1700000000000\x1e{\"id\":7}");
/// assert_eq!(record.owner(), "abc-1");
/// assert_eq!(record.state(), &RecordState::Completed { outcome: Some(b"{\"id\":7}".to_vec()) });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    token: String,
    state: RecordState,
}

/// The state of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordState {
    /// The original is running: its claim is a lease, renewed while it runs.
    InProgress {
        /// How long the lease has left, by the holder's clock when it wrote the lease; `None`
        /// when the store cannot tell. A hint (e.g. for `Retry-After`), not a bound.
        lease_left: Option<Duration>,
    },
    /// The original finished and the layer recorded it.
    Completed {
        /// The outcome it stored, when storing was asked for and it fitted.
        outcome: Option<Vec<u8>>,
    },
}

impl RecordState {
    /// Whether the original is still running.
    pub fn is_in_progress(&self) -> bool {
        matches!(self, RecordState::InProgress { .. })
    }

    /// Whether the original completed.
    pub fn is_completed(&self) -> bool {
        matches!(self, RecordState::Completed { .. })
    }
}

/// The answer to a claim: ours, or the record that is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimReply {
    /// The key was free and is now ours (or was already ours: a resend, or a retry under the same
    /// stable owner identity while it is in progress).
    Acquired,
    /// Someone holds the key — or **we** completed it already; the record says which state.
    Held(Record),
}

impl Record {
    /// A record in progress, held by `token`.
    pub fn in_progress(token: &ClaimToken, lease_left: Option<Duration>) -> Self {
        Self {
            token: token.as_str().to_owned(),
            state: RecordState::InProgress { lease_left },
        }
    }

    /// A completed record of `token`'s, with its stored outcome.
    pub fn completed(token: &ClaimToken, outcome: Option<Vec<u8>>) -> Self {
        Self {
            token: token.as_str().to_owned(),
            state: RecordState::Completed { outcome },
        }
    }

    /// Reads a stored value (see the module docs for the format). Never fails: a value in no
    /// known form is a bare token in progress.
    pub fn parse(value: &[u8]) -> Self {
        let now = unix_millis(SystemTime::now());
        if let Some((&RECORD, rest)) = value.split_first() {
            let (header, outcome) = match rest.iter().position(|&b| b == RECORD) {
                Some(i) => (&rest[..i], Some(rest[i + 1..].to_vec())),
                None => (rest, None),
            };
            let header = String::from_utf8_lossy(header);
            let token = match split_field(&header, 'c') {
                Some((token, _)) => token.to_owned(),
                None => header.into_owned(),
            };
            return Self {
                token,
                state: RecordState::Completed { outcome },
            };
        }
        let text = String::from_utf8_lossy(value);
        match split_field(&text, 'e') {
            Some((token, expires)) => Self {
                token: token.to_owned(),
                state: RecordState::InProgress {
                    lease_left: Some(Duration::from_millis(expires.saturating_sub(now))),
                },
            },
            None => Self {
                token: text.into_owned(),
                state: RecordState::InProgress { lease_left: None },
            },
        }
    }

    /// The owner's full token (its owner id and fingerprint), as the owner checks compare it.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The owner id: the token without its fingerprint.
    pub fn owner(&self) -> &str {
        self.token.split(UNIT).next().unwrap_or_default()
    }

    /// The fingerprint of the request that made the record, when it carried one.
    pub fn fingerprint(&self) -> Option<&str> {
        fingerprint_of(&self.token)
    }

    /// The record's state.
    pub fn state(&self) -> &RecordState {
        &self.state
    }

    /// The record's state, owned.
    pub fn into_state(self) -> RecordState {
        self.state
    }

    /// Whether `token` owns this record.
    pub fn is_owned_by(&self, token: &ClaimToken) -> bool {
        self.token == token.as_str()
    }
}

/// `<token>␟<tag><digits>` → (`<token>`, number).
fn split_field(text: &str, tag: char) -> Option<(&str, u64)> {
    let (token, field) = text.rsplit_once(UNIT)?;
    let digits = field.strip_prefix(tag)?;
    Some((token, digits.parse().ok()?))
}

/// The `f` field of a token.
pub(crate) fn fingerprint_of(token: &str) -> Option<&str> {
    token.split(UNIT).skip(1).find_map(|field| field.strip_prefix('f'))
}

/// The value of a claim in progress: `<token>␟e<expiry>`.
pub(crate) fn encode_in_progress(token: &ClaimToken, lease: Duration) -> String {
    let expires = unix_millis(SystemTime::now()).saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
    let mut value = String::with_capacity(token.as_str().len() + 16);
    value.push_str(token.as_str());
    value.push(UNIT);
    value.push('e');
    push_u64(&mut value, expires);
    value
}

/// The value of a completed record: `␞<token>␟c<now>[␞<outcome>]`.
pub(crate) fn encode_completed(token: &ClaimToken, outcome: Option<&[u8]>) -> Vec<u8> {
    let mut value = Vec::with_capacity(token.as_str().len() + 18 + outcome.map_or(0, <[u8]>::len));
    value.push(RECORD);
    value.extend_from_slice(token.as_str().as_bytes());
    let mut field = String::with_capacity(16);
    field.push(UNIT);
    field.push('c');
    push_u64(&mut field, unix_millis(SystemTime::now()));
    value.extend_from_slice(field.as_bytes());
    if let Some(outcome) = outcome {
        value.push(RECORD);
        value.extend_from_slice(outcome);
    }
    value
}

fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits[i..].iter().for_each(|&d| out.push(char::from(d)));
}

pub(crate) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Lua: `tok(v)`, the owner token of a stored value in any of the forms above. Prepended to
/// every owner-checked script.
pub(crate) const LUA_TOKEN: &str = "local function tok(v) \
if string.byte(v, 1) == 30 then local e = string.find(v, '\\30', 2, true) v = string.sub(v, 2, (e or (#v + 1)) - 1) end \
return string.match(v, '^(.*)\\31[ec]%d+$') or v end ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_progress_round_trips_with_its_lease() {
        let token = ClaimToken::from_string("abc-1").with_fingerprint("f00d").expect("valid");
        let record = Record::parse(encode_in_progress(&token, Duration::from_secs(30)).as_bytes());
        assert_eq!(record.token(), token.as_str());
        assert_eq!(record.owner(), "abc-1");
        assert_eq!(record.fingerprint(), Some("f00d"));
        let RecordState::InProgress { lease_left: Some(left) } = record.state() else {
            panic!("{record:?}")
        };
        assert!(*left > Duration::from_secs(25) && *left <= Duration::from_secs(30), "{left:?}");
        assert!(record.is_owned_by(&token));
    }

    #[test]
    fn completed_round_trips_with_and_without_outcome() {
        let token = ClaimToken::from_owner("1-0");
        let with = Record::parse(&encode_completed(&token, Some(b"a\x1eb\x1fc")));
        assert_eq!(with.token(), "owner:1-0");
        assert_eq!(with.state(), &RecordState::Completed { outcome: Some(b"a\x1eb\x1fc".to_vec()) });
        let without = Record::parse(&encode_completed(&token, None));
        assert_eq!(without.state(), &RecordState::Completed { outcome: None });
        let empty = Record::parse(&encode_completed(&token, Some(b"")));
        assert_eq!(empty.state(), &RecordState::Completed { outcome: Some(Vec::new()) });
    }

    #[test]
    fn a_bare_token_reads_as_in_progress_with_unknown_lease() {
        let record = Record::parse(b"0123456789abcdef-1a");
        assert_eq!(record.owner(), "0123456789abcdef-1a");
        assert_eq!(record.state(), &RecordState::InProgress { lease_left: None });
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0u64, 7, 10, 1_700_000_000_123, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }
}
