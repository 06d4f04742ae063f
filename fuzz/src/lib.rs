//! What the fuzz targets run, as plain functions over `&[u8]`.
//!
//! The `fuzz_targets/*.rs` binaries are one-line `fuzz_target!` wrappers around these functions,
//! and `tests/replay_seeds.rs` replays seed files through the very same functions without
//! libFuzzer. Each function panics — which libFuzzer reports as a crash — when the library breaks
//! one of its hostile-input promises:
//!
//! - a key that validates is non-empty, at most [`MAX_KEY_LEN`] bytes and free of control and
//!   invisible characters, and exactly the keys the written-out rules accept do validate;
//! - an extractor answers `Ok(Some(valid key))` (with a matching [`DispatchTarget`] for the
//!   handler), `Ok(None)` (pass through, nothing for the handler), or an error whose response is a
//!   `4xx` with a JSON body — never a panic, never a dispatch target without a claim;
//! - error messages are logged and sent back to the caller, so they stay short and printable
//!   whatever the input.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http::HeaderValue;
use tower_idempotency::http::{
    AllEvents, DispatchRules, DispatchTarget, ExtractError, GitHubDispatchKey, GitLabDispatchKey, HttpKeyExtractor, JsonResponses,
    ShortCircuitResponse,
};
use tower_idempotency::{IdempotencyKey, KeyError, MAX_KEY_LEN};

/// Longest error message (`400` body, log line) accepted from any input, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 2048;

/// GitHub events the extractor reads (the first five) and two it passes through unparsed.
pub const GITHUB_EVENTS: &[&str] = &[
    "check_suite",
    "check_run",
    "workflow_run",
    "pull_request",
    "pull_request_review",
    "push",
    "ping",
];

/// GitLab `X-Gitlab-Event` values the extractor reads (the first three), with the event name it
/// reports, and one it passes through unparsed.
pub const GITLAB_EVENTS: &[(&str, &str)] = &[
    ("Merge Request Hook", "merge_request"),
    ("Pipeline Hook", "pipeline"),
    ("Note Hook", "note"),
    ("Push Hook", "push"),
];

/// What one extraction came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A valid key: the request would take a claim.
    Key(String),
    /// No key: the request passes through unclaimed.
    PassThrough,
    /// Refused with this status and message; nothing claimed.
    Rejected(u16, String),
}

/// How many extractions of each kind one input produced (the replay test uses it to show the
/// seeds reach every branch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Extractions that produced a key.
    pub keys: usize,
    /// Extractions that passed through.
    pub pass_throughs: usize,
    /// Extractions that were refused.
    pub rejections: usize,
}

impl Tally {
    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Key(_) => self.keys += 1,
            Outcome::PassThrough => self.pass_throughs += 1,
            Outcome::Rejected(..) => self.rejections += 1,
        }
    }

    /// Adds `other` to `self`.
    pub fn add(&mut self, other: Tally) {
        self.keys += other.keys;
        self.pass_throughs += other.pass_throughs;
        self.rejections += other.rejections;
    }
}

/// The characters a key must not contain, written out from the documentation of
/// [`KeyError::ControlCharacter`] rather than taken from the library: control characters, line
/// and paragraph separators, bidirectional overrides and isolates, zero-width characters, BOM.
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Target `key`: the input as a key (lossy and strict UTF-8), and as a `(project, pr, sha)` triple.
pub fn key(data: &[u8]) -> Tally {
    let mut tally = Tally::default();
    let lossy = String::from_utf8_lossy(data);
    tally.count(&check_new(&lossy));
    if let Ok(text) = std::str::from_utf8(data) {
        tally.count(&check_new(text));
        // The same text as a (project, pr, sha) triple split on its last two ':'.
        let mut fields = text.rsplitn(3, ':');
        if let (Some(sha), Some(pr), Some(project)) = (fields.next(), fields.next(), fields.next())
            && let Ok(pr) = pr.parse::<u64>()
        {
            tally.count(&check_pull_request(project, pr, sha));
        }
    }
    if let Ok((project, pr, sha)) = <(&str, u64, &str)>::arbitrary_take_rest(Unstructured::new(data)) {
        tally.count(&check_pull_request(project, pr, sha));
    }
    // Small PR numbers (0 and 1 especially) are rare as 8 random bytes; give them their own try.
    if let Ok((project, pr, sha)) = <(&str, u8, &str)>::arbitrary(&mut Unstructured::new(data)) {
        tally.count(&check_pull_request(project, u64::from(pr), sha));
    }
    tally
}

/// `IdempotencyKey::new(text)` accepts exactly the documented keys, and every way of making a key
/// from text agrees with it.
fn check_new(text: &str) -> Outcome {
    let first_unprintable = text.char_indices().find(|&(_, c)| is_unprintable(c)).map(|(i, _)| i);
    let expected = if text.is_empty() {
        Err(KeyError::Empty)
    } else if text.len() > MAX_KEY_LEN {
        Err(KeyError::TooLong {
            len: text.len(),
            max: MAX_KEY_LEN,
        })
    } else if let Some(index) = first_unprintable {
        Err(KeyError::ControlCharacter { index })
    } else {
        Ok(())
    };
    let made = IdempotencyKey::new(text);
    assert_eq!(made.as_ref().err(), expected.err().as_ref(), "new({text:?})");
    assert_eq!(
        text.parse::<IdempotencyKey>(),
        made,
        "FromStr disagrees with new for {text:?}"
    );
    assert_eq!(
        IdempotencyKey::try_from(text),
        made,
        "TryFrom<&str> disagrees for {text:?}"
    );
    assert_eq!(
        IdempotencyKey::try_from(text.to_owned()),
        made,
        "TryFrom<String> disagrees for {text:?}"
    );
    match made {
        Ok(key) => {
            assert_eq!(key.as_str(), text, "a key is its text, unchanged");
            assert_valid_key(&key);
            Outcome::Key(text.to_owned())
        }
        Err(error) => Outcome::Rejected(400, checked_message(&error)),
    }
}

/// `for_pull_request` accepts exactly a usable project, a PR number ≥ 1 and a 7–64 digit hex SHA,
/// and renders `project:pr:sha` (SHA lower-cased) in a way that reads back from the right.
fn check_pull_request(project: &str, pull_request: u64, head_sha: &str) -> Outcome {
    let made = IdempotencyKey::for_pull_request(project, pull_request, head_sha);
    let project_ok = !project.is_empty() && !project.chars().any(|c| c.is_whitespace() || is_unprintable(c));
    let sha_ok = (7..=64).contains(&head_sha.len()) && head_sha.bytes().all(|b| b.is_ascii_hexdigit());
    let rendered = format!("{}:{pull_request}:{}", project.to_ascii_lowercase(), head_sha.to_ascii_lowercase());
    let fits = rendered.len() <= MAX_KEY_LEN;
    match made {
        Ok(key) => {
            assert!(project_ok && pull_request >= 1 && sha_ok && fits, "accepted {key:?}");
            assert_valid_key(&key);
            assert_eq!(key.as_str(), rendered);
            // Injective: reading from the right recovers the triple.
            let mut fields = key.as_str().rsplitn(3, ':');
            assert_eq!(fields.next(), Some(head_sha.to_ascii_lowercase().as_str()));
            assert_eq!(fields.next(), Some(pull_request.to_string().as_str()));
            assert_eq!(fields.next(), Some(project.to_ascii_lowercase().as_str()));
            Outcome::Key(rendered)
        }
        Err(error) => {
            assert!(
                !(project_ok && pull_request >= 1 && sha_ok && fits),
                "refused ({project:?}, {pull_request}, {head_sha:?}): {error}"
            );
            Outcome::Rejected(400, checked_message(&error))
        }
    }
}

fn assert_valid_key(key: &IdempotencyKey) {
    let text = key.as_str();
    assert!(!text.is_empty(), "empty key");
    assert!(text.len() <= MAX_KEY_LEN, "key of {} bytes", text.len());
    assert!(
        !text.chars().any(is_unprintable),
        "unprintable character in key {text:?}"
    );
}

/// An error's message (with its sources) is bounded and printable: it is logged and returned.
fn checked_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    assert_message_is_safe(&message);
    message
}

fn assert_message_is_safe(message: &str) {
    assert!(
        message.len() <= MAX_ERROR_MESSAGE_LEN,
        "error message of {} bytes: {}…",
        message.len(),
        message.chars().take(200).collect::<String>()
    );
    assert!(
        !message.chars().any(is_unprintable),
        "unprintable character in error message {message:?}"
    );
}

/// Runs `extractor` on a request with `headers` and `body`, and checks the result against the
/// documented contract. `event` is the event name a [`DispatchTarget`] must report. `None` when
/// a header value is not representable in HTTP (no server would hand such a request to the layer).
fn extract_checked<X>(extractor: &X, headers: &[(&str, &[u8])], body: &Bytes, event: Option<&str>) -> Option<Outcome>
where
    X: HttpKeyExtractor<Error = ExtractError>,
{
    let mut request = http::Request::post("/webhook");
    for (name, value) in headers {
        request = request.header(*name, HeaderValue::from_bytes(value).ok()?);
    }
    let (mut parts, ()) = request.body(()).ok()?.into_parts();
    let result = extractor.extract(&mut parts, body);
    let target = parts.extensions.get::<DispatchTarget>().cloned();
    match result {
        Ok(Some(key)) => {
            assert_valid_key(&key);
            let target = target.expect("a key was extracted but no DispatchTarget was left for the handler");
            if let Some(event) = event {
                assert_eq!(target.event, event);
            }
            assert!(target.pull_request >= 1, "pull request {}", target.pull_request);
            assert!(
                (7..=64).contains(&target.head_sha.len())
                    && target.head_sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "head SHA {:?}",
                target.head_sha
            );
            let expected = IdempotencyKey::for_pull_request(&target.project, target.pull_request, &target.head_sha);
            assert_eq!(
                expected.as_ref(),
                Ok(&key),
                "the key is not the target's (project, pr, sha)"
            );
            Some(Outcome::Key(key.as_str().to_owned()))
        }
        Ok(None) => {
            assert_eq!(target, None, "a pass-through left a DispatchTarget for the handler");
            Some(Outcome::PassThrough)
        }
        Err(error) => {
            assert_eq!(target, None, "a rejected request left a DispatchTarget for the handler");
            checked_message(&error);
            let response = JsonResponses::new().invalid(&error);
            let status = response.status();
            assert!(status.is_client_error(), "extraction error answered {status}: {error}");
            let body: serde_json::Value = serde_json::from_slice(response.body()).expect("the 400 body is not JSON");
            let message = body
                .get("error")
                .and_then(serde_json::Value::as_str)
                .expect("the 400 body has no string `error`");
            assert_message_is_safe(message);
            Some(Outcome::Rejected(status.as_u16(), message.to_owned()))
        }
    }
}

/// A filter can only turn a dispatching event into a pass-through; it never changes a key or a
/// parse error.
fn assert_filter_only_narrows(all: &Outcome, filtered: &Outcome) {
    assert!(
        filtered == all || *filtered == Outcome::PassThrough,
        "with AllEvents: {all:?}; with rules: {filtered:?}"
    );
}

/// Splits `data` into two header lines and the body: `event\ndelivery\nbody`.
fn header_lines(data: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

const DELIVERY: &[u8] = b"72d3162e-cc78-11e3-81ab-4c9367dc0958";

/// Target `github_webhook`: the input as the body of every listed `X-GitHub-Event`, with the
/// default filter and with dispatch rules; then as `event\ndelivery\nbody` with hostile headers;
/// then without an event header.
pub fn github_webhook(data: &[u8]) -> Tally {
    let mut tally = Tally::default();
    let body = Bytes::copy_from_slice(data);
    let all = GitHubDispatchKey::new().with_filter(AllEvents);
    let rules = GitHubDispatchKey::new().with_filter(
        DispatchRules::new()
            .allow("check_suite", Some("completed"), Some("success"))
            .allow("check_run", Some("completed"), None)
            .allow("workflow_run", None, Some("success"))
            .allow("pull_request", Some("review_requested"), None)
            .allow("pull_request_review", Some("submitted"), Some("approved")),
    );
    for event in GITHUB_EVENTS {
        let headers: [(&str, &[u8]); 2] = [("x-github-event", event.as_bytes()), ("x-github-delivery", DELIVERY)];
        let with_all = extract_checked(&all, &headers, &body, Some(event)).expect("valid headers");
        let with_rules = extract_checked(&rules, &headers, &body, Some(event)).expect("valid headers");
        assert_filter_only_narrows(&with_all, &with_rules);
        if matches!(*event, "push" | "ping") {
            assert_eq!(with_all, Outcome::PassThrough, "`{event}` names no pull request");
        }
        tally.count(&with_all);
    }
    if let Some((event, delivery, rest)) = header_lines(data) {
        let rest = Bytes::copy_from_slice(rest);
        let headers: [(&str, &[u8]); 2] = [("x-github-event", event), ("x-github-delivery", delivery)];
        if let Some(outcome) = extract_checked(&all, &headers, &rest, None) {
            tally.count(&outcome);
        }
    }
    let missing = extract_checked(&all, &[], &body, None).expect("no headers");
    assert!(
        matches!(missing, Outcome::Rejected(400, _)),
        "no X-GitHub-Event: {missing:?}"
    );
    tally
}

/// Target `gitlab_webhook`: as [`github_webhook`], for `X-Gitlab-Event`.
pub fn gitlab_webhook(data: &[u8]) -> Tally {
    let mut tally = Tally::default();
    let body = Bytes::copy_from_slice(data);
    let all = GitLabDispatchKey::new().with_filter(AllEvents);
    let rules = GitLabDispatchKey::new().with_filter(
        DispatchRules::new()
            .allow("merge_request", Some("open"), None)
            .allow("pipeline", None, Some("success"))
            .allow("note", Some("create"), None),
    );
    for (hook, event) in GITLAB_EVENTS {
        let headers: [(&str, &[u8]); 2] = [("x-gitlab-event", hook.as_bytes()), ("x-gitlab-webhook-uuid", DELIVERY)];
        let with_all = extract_checked(&all, &headers, &body, Some(event)).expect("valid headers");
        let with_rules = extract_checked(&rules, &headers, &body, Some(event)).expect("valid headers");
        assert_filter_only_narrows(&with_all, &with_rules);
        if *event == "push" {
            assert_eq!(with_all, Outcome::PassThrough, "`{hook}` names no merge request");
        }
        tally.count(&with_all);
    }
    if let Some((hook, delivery, rest)) = header_lines(data) {
        let rest = Bytes::copy_from_slice(rest);
        let headers: [(&str, &[u8]); 2] = [("x-gitlab-event", hook), ("x-gitlab-event-uuid", delivery)];
        if let Some(outcome) = extract_checked(&all, &headers, &rest, None) {
            tally.count(&outcome);
        }
    }
    let missing = extract_checked(&all, &[], &body, None).expect("no headers");
    assert!(
        matches!(missing, Outcome::Rejected(400, _)),
        "no X-Gitlab-Event: {missing:?}"
    );
    tally
}
