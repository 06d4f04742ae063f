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
//! | in progress | `<token>␟e<lease expiry, Unix ms>[␟n<fencing token>]` | the lease (the layer's TTL), renewed |
//! | completed | `␞<token>␟c<completion time, Unix ms>[␟n<fencing token>]` | the retention |
//! | completed, outcome stored | `␞<token>␟c<completion time, Unix ms>[␟n<fencing token>]␞<outcome bytes>` | the retention |
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
    fencing_token: Option<u64>,
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
            fencing_token: None,
        }
    }

    /// A completed record of `token`'s, with its stored outcome.
    pub fn completed(token: &ClaimToken, outcome: Option<Vec<u8>>) -> Self {
        Self {
            token: token.as_str().to_owned(),
            state: RecordState::Completed { outcome },
            fencing_token: None,
        }
    }

    /// This record with `fencing_token`.
    pub fn with_fencing_token(mut self, fencing_token: Option<u64>) -> Self {
        self.fencing_token = fencing_token;
        self
    }

    /// The fencing token of the holder that made this record, when fencing was on.
    pub fn fencing_token(&self) -> Option<u64> {
        self.fencing_token
    }

    /// Reads a stored value (see the module docs for the format). Never fails: a value in no
    /// known form is a bare token in progress.
    pub fn parse(value: &[u8]) -> Self {
        let now = unix_millis(SystemTime::now());
        let (completed, header, outcome) = match value.split_first() {
            Some((&RECORD, rest)) => match rest.iter().position(|&b| b == RECORD) {
                Some(i) => (true, &rest[..i], Some(rest[i + 1..].to_vec())),
                None => (true, rest, None),
            },
            _ => (false, value, None),
        };
        let header = String::from_utf8_lossy(header);
        let fields = Fields::split(&header);
        let state = if completed {
            RecordState::Completed { outcome }
        } else {
            RecordState::InProgress {
                lease_left: fields
                    .expires
                    .map(|expires| Duration::from_millis(expires.saturating_sub(now))),
            }
        };
        Self {
            token: fields.token.to_owned(),
            state,
            fencing_token: fields.fence,
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

/// A record's header: the token (owner id and fingerprint fields), then numeric fields.
struct Fields<'a> {
    token: &'a str,
    expires: Option<u64>,
    fence: Option<u64>,
}

impl<'a> Fields<'a> {
    /// The token ends at the first `␟<e|c|n><digits>` field.
    fn split(header: &'a str) -> Self {
        let mut fields = Fields {
            token: header,
            expires: None,
            fence: None,
        };
        let mut offset = 0;
        for (i, part) in header.split(UNIT).enumerate() {
            let numeric = |tag: char| {
                part.strip_prefix(tag)
                    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse::<u64>().ok())
            };
            let meta = i > 0 && (numeric('e').is_some() || numeric('c').is_some() || numeric('n').is_some());
            if meta {
                if fields.token.len() == header.len() && offset > 0 {
                    fields.token = &header[..offset - 1];
                }
                fields.expires = fields.expires.or(numeric('e'));
                fields.fence = fields.fence.or(numeric('n'));
            }
            offset += part.len() + 1;
        }
        fields
    }
}

/// The `f` field of a token.
pub(crate) fn fingerprint_of(token: &str) -> Option<&str> {
    token.split(UNIT).skip(1).find_map(|field| field.strip_prefix('f'))
}

/// The value of a claim in progress: `<token>␟e<expiry>`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis store's encoding
pub(crate) fn encode_in_progress(token: &ClaimToken, lease: Duration) -> String {
    encode_in_progress_fenced(token, lease, None)
}

/// The value of a claim in progress: `<token>␟e<expiry>[␟n<fence>]`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis store's encoding
pub(crate) fn encode_in_progress_fenced(token: &ClaimToken, lease: Duration, fence: Option<u64>) -> String {
    let expires = unix_millis(SystemTime::now()).saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
    let mut value = String::with_capacity(token.as_str().len() + 16);
    value.push_str(token.as_str());
    value.push(UNIT);
    value.push('e');
    push_u64(&mut value, expires);
    if let Some(fence) = fence {
        value.push(UNIT);
        value.push('n');
        push_u64(&mut value, fence);
    }
    value
}

/// The header of a completed record: `␞<token>␟c<now>`; the store appends the fencing token
/// field it keeps and `␞<outcome>`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis store's encoding
pub(crate) fn encode_completed_header(token: &ClaimToken) -> String {
    let mut value = String::with_capacity(token.as_str().len() + 18);
    value.push(char::from(RECORD));
    value.push_str(token.as_str());
    value.push(UNIT);
    value.push('c');
    push_u64(&mut value, unix_millis(SystemTime::now()));
    value
}

/// The value of a completed record: `␞<token>␟c<now>[␞<outcome>]`.
#[cfg(test)]
pub(crate) fn encode_completed(token: &ClaimToken, outcome: Option<&[u8]>) -> Vec<u8> {
    let mut value = encode_completed_header(token).into_bytes();
    if let Some(outcome) = outcome {
        value.push(RECORD);
        value.extend_from_slice(outcome);
    }
    value
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis store's encoding
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

/// Lua: `tok(v)`, the owner token of a stored value in any of the forms above, and `fence(v)`,
/// its `␟n<fencing token>` field (or the empty string). Prepended to every owner-checked script.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis store's encoding
pub(crate) const LUA_TOKEN: &str = "local function hdr(v) \
if string.byte(v, 1) == 30 then local e = string.find(v, '\\30', 2, true) return string.sub(v, 2, (e or (#v + 1)) - 1) end \
return v end \
local function tok(v) local h = hdr(v) return string.match(h, '^(.-)\\31[ecn]%d+') or h end \
local function fence(v) return string.match(hdr(v), '\\31n%d+') or '' end ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_progress_round_trips_with_its_lease() {
        let token = ClaimToken::from_string("abc-1")
            .with_fingerprint("f00d")
            .expect("valid");
        let record = Record::parse(encode_in_progress(&token, Duration::from_secs(30)).as_bytes());
        assert_eq!(record.token(), token.as_str());
        assert_eq!(record.owner(), "abc-1");
        assert_eq!(record.fingerprint(), Some("f00d"));
        let RecordState::InProgress { lease_left: Some(left) } = record.state() else {
            panic!("{record:?}")
        };
        assert!(
            *left > Duration::from_secs(25) && *left <= Duration::from_secs(30),
            "{left:?}"
        );
        assert!(record.is_owned_by(&token));
    }

    #[test]
    fn completed_round_trips_with_and_without_outcome() {
        let token = ClaimToken::from_owner("1-0");
        let with = Record::parse(&encode_completed(&token, Some(b"a\x1eb\x1fc")));
        assert_eq!(with.token(), "owner:1-0");
        assert_eq!(
            with.state(),
            &RecordState::Completed {
                outcome: Some(b"a\x1eb\x1fc".to_vec())
            }
        );
        let without = Record::parse(&encode_completed(&token, None));
        assert_eq!(without.state(), &RecordState::Completed { outcome: None });
        let empty = Record::parse(&encode_completed(&token, Some(b"")));
        assert_eq!(
            empty.state(),
            &RecordState::Completed {
                outcome: Some(Vec::new())
            }
        );
    }

    #[test]
    fn the_fencing_token_field_is_not_part_of_the_token() {
        let token = ClaimToken::from_string("abc-1").with_fingerprint("e12").expect("valid");
        let record = Record::parse(encode_in_progress_fenced(&token, Duration::from_secs(5), Some(42)).as_bytes());
        assert_eq!(record.token(), token.as_str());
        assert_eq!(record.fingerprint(), Some("e12"));
        assert_eq!(record.fencing_token(), Some(42));
        let completed = Record::parse(b"\x1eabc-1\x1fc1700000000000\x1fn43\x1eout");
        assert_eq!((completed.token(), completed.fencing_token()), ("abc-1", Some(43)));
        assert_eq!(
            completed.state(),
            &RecordState::Completed {
                outcome: Some(b"out".to_vec())
            }
        );
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
