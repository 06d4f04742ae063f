//! Idempotency keys: the validated identity of "the same job".
//!
//! A key is what two processes must agree on for a dispatch to be deduplicated, so it is
//! validated once, when it is made: an empty key would make every request a duplicate of every
//! other, a multi-megabyte key would be an easy way to fill Redis, and control characters make
//! keys that cannot be read back in logs.

use std::fmt;
use std::sync::Arc;

/// Longest key accepted, in bytes, before the layer's namespace is added.
pub const MAX_KEY_LEN: usize = 512;

/// A validated idempotency key.
///
/// Non-empty, at most [`MAX_KEY_LEN`] bytes, and free of control characters. Cloning is cheap
/// (the text is shared).
///
/// ```
/// use tower_idempotency::IdempotencyKey;
///
/// let key = IdempotencyKey::new("delivery-72d3162e")?;
/// assert_eq!(key.as_str(), "delivery-72d3162e");
///
/// let review = IdempotencyKey::for_pull_request("octo-org/octo-repo", 42, "abc123f")?;
/// assert_eq!(review.as_str(), "octo-org/octo-repo:42:abc123f");
///
/// assert!(IdempotencyKey::new("").is_err());
/// assert!(IdempotencyKey::new("line\nbreak").is_err());
/// # Ok::<(), tower_idempotency::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Arc<str>);

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key was empty.
    #[error("idempotency key is empty")]
    Empty,
    /// The key was longer than [`MAX_KEY_LEN`] bytes.
    #[error("idempotency key is {len} bytes long; the limit is {max} bytes")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The key contained a control character (newline, NUL, escape, ...) or an invisible one
    /// (line separator, bidirectional override, zero-width space, byte-order mark).
    #[error("idempotency key contains a control or invisible character at byte {index}")]
    ControlCharacter {
        /// Byte offset of the first control character.
        index: usize,
    },
    /// The project part of a pull-request key was empty or not usable.
    #[error(
        "project name `{0}` is not usable in a key: it must be non-empty and free of whitespace and control characters"
    )]
    InvalidProject(String),
    /// The pull-request number was zero.
    #[error("pull request number must be at least 1, got {0}")]
    InvalidPullRequest(u64),
    /// The head SHA was not 7 to 64 hexadecimal digits.
    #[error("head SHA `{0}` is not a commit id: expected 7 to 64 hexadecimal digits")]
    InvalidSha(String),
}

impl IdempotencyKey {
    /// Validates `key` and wraps it.
    pub fn new(key: impl AsRef<str>) -> Result<Self, KeyError> {
        let key = key.as_ref();
        validate(key)?;
        Ok(Self(Arc::from(key)))
    }

    /// The key of one review of one pull request at one commit: `project:pr:sha`.
    ///
    /// The rendering is injective: the SHA must be hexadecimal and the PR number is decimal, so
    /// reading from the right recovers the triple even when the project itself contains `:`.
    ///
    /// **Case.** What the providers treat case-insensitively is normalised, so a worker that
    /// builds the key from `Octo/Repo` and a webhook that carries `octo/repo` agree:
    /// - the project's ASCII letters are lower-cased: GitHub (`owner/repository`) and GitLab
    ///   (`group/subgroup/project`) resolve paths case-insensitively, and their names are ASCII
    ///   (other characters are kept as they are);
    /// - hex digits of the SHA are lower-cased, as git treats them case-insensitively.
    ///
    /// The webhook extractors ([`GitHubDispatchKey`](crate::http::GitHubDispatchKey),
    /// [`GitLabDispatchKey`](crate::http::GitLabDispatchKey)) build their keys with this function.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    /// let key = IdempotencyKey::for_pull_request("Codertocat/Hello-World", 2, "EC26C3E5")?;
    /// assert_eq!(key.as_str(), "codertocat/hello-world:2:ec26c3e5");
    /// assert_eq!(key, IdempotencyKey::for_pull_request("codertocat/HELLO-world", 2, "ec26c3e5")?);
    /// assert!(IdempotencyKey::for_pull_request("a/b", 0, "abcdef1").is_err());
    /// assert!(IdempotencyKey::for_pull_request("a/b", 1, "main").is_err());
    /// # Ok::<(), tower_idempotency::KeyError>(())
    /// ```
    pub fn for_pull_request(project: &str, pull_request: u64, head_sha: &str) -> Result<Self, KeyError> {
        if project.is_empty() || project.chars().any(|c| c.is_whitespace() || is_unprintable(c)) {
            return Err(KeyError::InvalidProject(truncate_for_error(project)));
        }
        if pull_request == 0 {
            return Err(KeyError::InvalidPullRequest(pull_request));
        }
        let sha_ok = (7..=64).contains(&head_sha.len()) && head_sha.bytes().all(|b| b.is_ascii_hexdigit());
        if !sha_ok {
            return Err(KeyError::InvalidSha(truncate_for_error(head_sha)));
        }
        Self::new(format!(
            "{}:{pull_request}:{}",
            project.to_ascii_lowercase(),
            head_sha.to_ascii_lowercase()
        ))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's text, shared (no copy).
    pub(crate) fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    if key.is_ascii() {
        // Fast path: only ASCII control characters can be unprintable here.
        if let Some(index) = key.bytes().position(|b| b.is_ascii_control()) {
            return Err(KeyError::ControlCharacter { index });
        }
        return Ok(());
    }
    if let Some((index, _)) = key.char_indices().find(|&(_, c)| is_unprintable(c)) {
        return Err(KeyError::ControlCharacter { index });
    }
    Ok(())
}

/// Control characters, plus the invisible characters that make a key render differently from
/// what it is in logs and terminals: line/paragraph separators, bidirectional overrides and
/// isolates ("Trojan Source"), zero-width characters and the byte-order mark.
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Error messages quote the offending input; keep them short and printable.
fn truncate_for_error(s: &str) -> String {
    s.chars().take(80).flat_map(char::escape_default).collect()
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for IdempotencyKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::new(s)
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        validate(&s)?;
        Ok(Self(Arc::from(s)))
    }
}

impl TryFrom<&str> for IdempotencyKey {
    type Error = KeyError;
    fn try_from(s: &str) -> Result<Self, KeyError> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_long_and_control() {
        assert_eq!(IdempotencyKey::new(""), Err(KeyError::Empty));
        assert!(matches!(
            IdempotencyKey::new("x".repeat(MAX_KEY_LEN + 1)),
            Err(KeyError::TooLong { .. })
        ));
        assert!(IdempotencyKey::new("x".repeat(MAX_KEY_LEN)).is_ok());
        assert_eq!(
            IdempotencyKey::new("a\u{0}b"),
            Err(KeyError::ControlCharacter { index: 1 })
        );
        assert_eq!(
            IdempotencyKey::new("ab\u{1b}"),
            Err(KeyError::ControlCharacter { index: 2 })
        );
        assert!(IdempotencyKey::new("ünïcode/ok:1").is_ok());
        for invisible in ['\u{2028}', '\u{202E}', '\u{200B}', '\u{2066}', '\u{FEFF}'] {
            assert_eq!(
                IdempotencyKey::new(format!("a{invisible}")),
                Err(KeyError::ControlCharacter { index: 1 })
            );
        }
    }

    #[test]
    fn pull_request_triples_do_not_collide() {
        // Reading from the right: sha is hex (no ':'), pr is decimal, the rest is the project.
        let a = IdempotencyKey::for_pull_request("a:1", 2, "abcdef1").unwrap();
        let b = IdempotencyKey::for_pull_request("a", 12, "abcdef1").unwrap();
        assert_ne!(a, b);
        assert!(IdempotencyKey::for_pull_request("a", 1, "2:abcdef").is_err());
        assert!(IdempotencyKey::for_pull_request("a b", 1, "abcdef1").is_err());
        assert!(IdempotencyKey::for_pull_request("", 1, "abcdef1").is_err());
        assert!(IdempotencyKey::for_pull_request("a", 1, &"f".repeat(65)).is_err());
        assert!(IdempotencyKey::for_pull_request("a", 1, "abc").is_err());
    }

    #[test]
    fn pull_request_keys_ignore_the_case_of_the_project_and_the_sha() {
        let mixed = IdempotencyKey::for_pull_request("Octo-Org/Octo-Repo", 7, "ABCDEF1").unwrap();
        let lower = IdempotencyKey::for_pull_request("octo-org/octo-repo", 7, "abcdef1").unwrap();
        assert_eq!(mixed, lower);
        assert_eq!(mixed.as_str(), "octo-org/octo-repo:7:abcdef1");
        // Only ASCII letters are folded.
        let accented = IdempotencyKey::for_pull_request("Équipe/App", 1, "abcdef1").unwrap();
        assert_eq!(accented.as_str(), "Équipe/app:1:abcdef1");
    }
}
