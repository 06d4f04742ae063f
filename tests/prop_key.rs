//! Hostile input to key construction: arbitrary text and bytes, control characters, enormous
//! keys, every pull-request number, SHAs of the wrong shape. `IdempotencyKey::new` and
//! `IdempotencyKey::for_pull_request` never panic; what they accept satisfies the key invariants;
//! what they refuse is refused for the stated reason, with a bounded, printable message; and
//! `for_pull_request` is injective.

use proptest::prelude::*;
use tower_idempotency::{IdempotencyKey, KeyError, MAX_KEY_LEN};

/// The invariants every key satisfies, whichever constructor made it.
/// What the crate refuses in keys: control characters and the invisible ones that make a key
/// render as something else (separators, bidi overrides/isolates, zero-width, BOM).
fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

fn assert_key_invariants(key: &IdempotencyKey) {
    let s = key.as_str();
    assert!(!s.is_empty(), "empty key");
    assert!(s.len() <= MAX_KEY_LEN, "key of {} bytes", s.len());
    assert!(!s.chars().any(unprintable), "control character in {s:?}");
    assert_eq!(key.to_string(), s, "Display is the key itself");
    assert_eq!(IdempotencyKey::new(s).as_ref(), Ok(key), "a key re-validates to itself");
}

/// Error messages quote hostile input into logs and HTTP responses: bounded and printable.
fn assert_error_is_printable(e: &KeyError) {
    let msg = e.to_string();
    assert!(msg.len() <= 1024, "error message of {} bytes", msg.len());
    assert!(
        !msg.chars().any(unprintable),
        "control character in error message {msg:?}"
    );
}

/// Text that is mostly hostile: controls, separators, non-ASCII, and long runs.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\x00-\\x1f\\x7f\\u{80}-\\u{9f} :/\\\\a-zA-Z0-9\\u{2028}\\u{202e}\\u{fffd}]{0,40}",
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        (0usize..3000, any::<char>()).prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
        (MAX_KEY_LEN - 2..MAX_KEY_LEN + 3).prop_map(|n| "k".repeat(n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn new_accepts_exactly_the_valid_keys(s in hostile_text()) {
        let expected_valid = !s.is_empty() && s.len() <= MAX_KEY_LEN && !s.chars().any(unprintable);
        match IdempotencyKey::new(&s) {
            Ok(key) => {
                prop_assert!(expected_valid, "accepted {s:?}");
                prop_assert_eq!(key.as_str(), s.as_str());
                assert_key_invariants(&key);
            }
            Err(e) => {
                prop_assert!(!expected_valid, "refused a valid key {s:?}: {e}");
                assert_error_is_printable(&e);
                match e {
                    KeyError::Empty => prop_assert!(s.is_empty()),
                    KeyError::TooLong { len, max } => {
                        prop_assert_eq!(len, s.len());
                        prop_assert_eq!(max, MAX_KEY_LEN);
                        prop_assert!(len > MAX_KEY_LEN);
                    }
                    KeyError::ControlCharacter { index } => {
                        let first = s.char_indices().find(|&(_, c)| unprintable(c)).map(|(i, _)| i);
                        prop_assert_eq!(Some(index), first, "index of the first control character");
                        prop_assert!(s.len() <= MAX_KEY_LEN);
                    }
                    other => prop_assert!(false, "unexpected error for a plain key: {other:?}"),
                }
            }
        }
        // Every other way to make a key agrees with `new`.
        let via_new = IdempotencyKey::new(&s);
        prop_assert_eq!(&s.parse::<IdempotencyKey>(), &via_new);
        prop_assert_eq!(&IdempotencyKey::try_from(s.as_str()), &via_new);
        prop_assert_eq!(&IdempotencyKey::try_from(s.clone()), &via_new);
    }

    #[test]
    fn for_pull_request_never_panics_and_accepts_exactly_the_valid_triples(
        project in hostile_text(),
        pr in prop_oneof![Just(0u64), Just(1u64), Just(u64::MAX), any::<u64>()],
        sha in prop_oneof![
            "[0-9a-fA-F]{0,70}",
            "[0-9a-zA-Z:\\- ]{0,70}",
            hostile_text(),
        ],
    ) {
        let project_ok = !project.is_empty() && !project.chars().any(|c| c.is_whitespace() || unprintable(c));
        let sha_ok = (7..=64).contains(&sha.len()) && sha.bytes().all(|b| b.is_ascii_hexdigit());
        let rendered = format!("{}:{pr}:{}", project.to_ascii_lowercase(), sha.to_ascii_lowercase());
        match IdempotencyKey::for_pull_request(&project, pr, &sha) {
            Ok(key) => {
                prop_assert!(project_ok && pr != 0 && sha_ok, "accepted ({project:?}, {pr}, {sha:?})");
                prop_assert_eq!(key.as_str(), rendered.as_str());
                assert_key_invariants(&key);
            }
            Err(e) => {
                assert_error_is_printable(&e);
                match e {
                    KeyError::InvalidProject(_) => prop_assert!(!project_ok),
                    KeyError::InvalidPullRequest(n) => prop_assert!(project_ok && n == 0 && pr == 0),
                    KeyError::InvalidSha(_) => prop_assert!(project_ok && pr != 0 && !sha_ok),
                    // A valid triple whose rendering is over the limit (a very long project).
                    KeyError::TooLong { len, .. } => {
                        prop_assert!(project_ok && pr != 0 && sha_ok);
                        prop_assert_eq!(len, rendered.len());
                    }
                    other => prop_assert!(false, "unexpected error {other:?}"),
                }
            }
        }
    }

    /// Reading the key from the right recovers the triple, even when the project holds `:` and
    /// digits: so two different triples can never share a key.
    #[test]
    fn for_pull_request_keys_parse_back_to_their_triple(
        project in "[a-z0-9:/._-]{1,12}",
        pr in 1u64..,
        sha in "[0-9a-fA-F]{7,64}",
    ) {
        let key = IdempotencyKey::for_pull_request(&project, pr, &sha).unwrap();
        let mut parts = key.as_str().rsplitn(3, ':');
        let (s, n, p) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        prop_assert_eq!(p, project.as_str());
        prop_assert_eq!(n.parse::<u64>().unwrap(), pr);
        prop_assert_eq!(s, sha.to_ascii_lowercase());
    }

    /// Direct injectivity over a small alphabet, where collisions would be likely if the
    /// rendering were ambiguous (`a:1` + `2` vs `a` + `12`, ...).
    #[test]
    fn for_pull_request_is_injective(
        a in ("[a1:]{1,4}", 1u64..30, "[a-fA-F1]{7,8}"),
        b in ("[a1:]{1,4}", 1u64..30, "[a-fA-F1]{7,8}"),
    ) {
        let ka = IdempotencyKey::for_pull_request(&a.0, a.1, &a.2).unwrap();
        let kb = IdempotencyKey::for_pull_request(&b.0, b.1, &b.2).unwrap();
        let same_triple = a.0 == b.0 && a.1 == b.1 && a.2.eq_ignore_ascii_case(&b.2);
        prop_assert_eq!(ka == kb, same_triple, "{:?} vs {:?}", a, b);
    }
}

/// A few inputs pinned by hand, so the boundaries do not depend on what the generator draws.
#[test]
fn boundaries_of_key_construction() {
    assert!(IdempotencyKey::new("k".repeat(MAX_KEY_LEN)).is_ok());
    assert_eq!(
        IdempotencyKey::new("k".repeat(MAX_KEY_LEN + 1)),
        Err(KeyError::TooLong {
            len: MAX_KEY_LEN + 1,
            max: MAX_KEY_LEN
        })
    );
    // A multi-byte character straddling the limit counts in bytes.
    let straddling = format!("{}é", "k".repeat(MAX_KEY_LEN - 1));
    assert!(matches!(
        IdempotencyKey::new(&straddling),
        Err(KeyError::TooLong { .. })
    ));
    // A 10 MB key is refused without copying it into the error.
    let huge = "x".repeat(10 << 20);
    let err = IdempotencyKey::new(&huge).unwrap_err();
    assert!(err.to_string().len() < 100);
    let err = IdempotencyKey::for_pull_request(&huge, 1, "abcdef1").unwrap_err();
    assert!(err.to_string().len() < 1024, "the project is truncated in the message");
    assert_eq!(
        IdempotencyKey::for_pull_request("o/r", 0, "abcdef1"),
        Err(KeyError::InvalidPullRequest(0))
    );
    assert!(IdempotencyKey::for_pull_request("o/r", u64::MAX, "abcdef1").is_ok());
    assert!(IdempotencyKey::for_pull_request("o/r", 1, &"a".repeat(64)).is_ok());
    assert!(matches!(
        IdempotencyKey::for_pull_request("o/r", 1, &"a".repeat(65)),
        Err(KeyError::InvalidSha(_))
    ));
    assert!(matches!(
        IdempotencyKey::for_pull_request("o/r", 1, "abcdeg1"),
        Err(KeyError::InvalidSha(_))
    ));
    assert!(matches!(
        IdempotencyKey::for_pull_request("o/r\n", 1, "abcdef1"),
        Err(KeyError::InvalidProject(_))
    ));
    // An error quoting a control-laden input escapes it.
    let err = IdempotencyKey::for_pull_request("o/r", 1, "\u{1b}[31mred").unwrap_err();
    assert!(!err.to_string().contains('\u{1b}'), "{err}");
}
