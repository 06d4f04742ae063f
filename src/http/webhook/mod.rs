//! Dispatch keys from GitHub and GitLab webhook payloads, and which events dispatch at all.
//!
//! Several distinct deliveries announce the same work: `pull_request opened`, then one
//! `check_suite completed` per CI app, all for one (repository, pull request, head SHA). Keying on
//! the delivery GUID would dispatch each of them; keying on that triple dispatches once. So the
//! extractors here read the triple from the body, deserialising only the fields they need.
//!
//! Only events that will dispatch may take a claim: a claim taken by an event that then does
//! nothing blocks the real trigger that follows it for the whole TTL. A [`DispatchFilter`] on
//! (event, action, conclusion) therefore runs before the claim; events it rejects, and events
//! that name no pull request, pass through unclaimed (logged at `debug`). The extractors'
//! default filter is the empty [`DispatchRules`]: nothing dispatches until rules say what does,
//! so the webhook presets never claim for an event nobody asked to dispatch.

use std::fmt;

use bytes::Bytes;
use http::HeaderName;
use http::request::Parts;
use serde::Deserialize;

use super::ExtractError;

mod github;
mod gitlab;

pub use github::GitHubDispatchKey;
pub use gitlab::GitLabDispatchKey;

/// What a dispatch extractor found, put into the request's extensions next to the claimed key,
/// so the handler can dispatch without parsing the body again.
///
/// Present only when the request took a claim (or, in shadow / fail-open mode, tried to): its
/// absence means the event does not dispatch.
///
/// ```
/// use axum::Extension;
/// use tower_idempotency::http::DispatchTarget;
///
/// async fn handler(target: Option<Extension<DispatchTarget>>) -> String {
///     match target {
///         Some(Extension(t)) => format!("review {}#{} at {}", t.project, t.pull_request, t.head_sha),
///         None => "ignored".to_owned(),
///     }
/// }
/// # let _ = handler;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatchTarget {
    /// The event: GitHub's `X-GitHub-Event` (`check_suite`, …) or GitLab's kind
    /// (`merge_request`, `pipeline`, `note`).
    pub event: String,
    /// The payload's action, when it has one (`completed`, `review_requested`, `open`, …).
    pub action: Option<String>,
    /// The repository's full name (GitHub) or the project's path with namespace (GitLab).
    pub project: String,
    /// The pull request number (GitHub) or merge request IID (GitLab).
    pub pull_request: u64,
    /// The head commit SHA, lower-cased.
    pub head_sha: String,
    /// The delivery's id: `X-GitHub-Delivery`, or GitLab's `X-Gitlab-Webhook-UUID` (else
    /// `X-Gitlab-Event-UUID`), when the header was sent.
    pub delivery: Option<String>,
}

/// The (event, action, conclusion) of one webhook delivery, as a [`DispatchFilter`] sees it.
///
/// | provider | `event` | `action` | `conclusion` |
/// |---|---|---|---|
/// | GitHub | `X-GitHub-Event` | `.action` | `check_suite` / `check_run` / `workflow_run`: `.conclusion`; `pull_request_review`: `.review.state` |
/// | GitLab | `merge_request`, `pipeline`, `note` (from `X-Gitlab-Event`) | `.object_attributes.action` | `pipeline`: `.object_attributes.status`; `merge_request`: `new_commits` when the hook reports pushed commits (`.object_attributes.oldrev` present), else none |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WebhookEvent<'a> {
    /// The event name.
    pub event: &'a str,
    /// The action, if the payload has one.
    pub action: Option<&'a str>,
    /// The conclusion (or status, or review state), if the payload has one.
    pub conclusion: Option<&'a str>,
}

impl<'a> WebhookEvent<'a> {
    /// An event, e.g. to test a filter.
    pub fn new(event: &'a str, action: Option<&'a str>, conclusion: Option<&'a str>) -> Self {
        Self {
            event,
            action,
            conclusion,
        }
    }
}

/// Decides whether an event dispatches, and so whether it may take a claim.
///
/// Closures `Fn(&WebhookEvent) -> bool` implement it:
///
/// ```
/// use tower_idempotency::http::{DispatchFilter, WebhookEvent};
///
/// let only_green_suites = |e: &WebhookEvent<'_>| e.event == "check_suite" && e.conclusion == Some("success");
/// assert!(only_green_suites.dispatches(&WebhookEvent::new("check_suite", Some("completed"), Some("success"))));
/// assert!(!only_green_suites.dispatches(&WebhookEvent::new("check_suite", Some("completed"), Some("failure"))));
/// ```
pub trait DispatchFilter {
    /// Whether `event` dispatches.
    fn dispatches(&self, event: &WebhookEvent<'_>) -> bool;

    /// Whether a dispatching `event` is a **human override** (a person asking for the job again,
    /// e.g. `pull_request` `review_requested`): it takes the key over even while an automated
    /// claim holds it, deduplicated by its own delivery. Default: never.
    fn overrides(&self, event: &WebhookEvent<'_>) -> bool {
        let _ = event;
        false
    }
}

impl<F> DispatchFilter for F
where
    F: Fn(&WebhookEvent<'_>) -> bool,
{
    fn dispatches(&self, event: &WebhookEvent<'_>) -> bool {
        self(event)
    }
}

/// Every event that names a pull request dispatches: the default filter.
///
/// ```
/// use tower_idempotency::http::{AllEvents, DispatchFilter, WebhookEvent};
/// assert!(AllEvents.dispatches(&WebhookEvent::new("pull_request", Some("closed"), None)));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllEvents;

impl DispatchFilter for AllEvents {
    fn dispatches(&self, _event: &WebhookEvent<'_>) -> bool {
        true
    }
}

/// A list of allowed (event, action, conclusion) patterns; `None` matches anything. An event
/// dispatches when any rule matches.
///
/// ```
/// use tower_idempotency::http::{DispatchFilter, DispatchRules, WebhookEvent};
///
/// let rules = DispatchRules::new()
///     .allow("check_suite", Some("completed"), Some("success"))
///     .allow("pull_request", Some("review_requested"), None);
/// assert!(rules.dispatches(&WebhookEvent::new("check_suite", Some("completed"), Some("success"))));
/// assert!(rules.dispatches(&WebhookEvent::new("pull_request", Some("review_requested"), None)));
/// assert!(!rules.dispatches(&WebhookEvent::new("check_suite", Some("requested"), None)));
/// assert!(!rules.dispatches(&WebhookEvent::new("pull_request", Some("opened"), None)));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DispatchRules {
    rules: Vec<Rule>,
}

#[derive(Clone, PartialEq, Eq)]
struct Rule {
    event: String,
    action: Option<String>,
    conclusion: Option<String>,
    overrides: bool,
}

impl DispatchRules {
    /// No rules: nothing dispatches until rules are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule: `event` with `action` (any if `None`) and `conclusion` (any if `None`).
    pub fn allow(mut self, event: impl Into<String>, action: Option<&str>, conclusion: Option<&str>) -> Self {
        self.rules.push(Rule {
            event: event.into(),
            action: action.map(str::to_owned),
            conclusion: conclusion.map(str::to_owned),
            overrides: false,
        });
        self
    }

    /// Adds a rule whose events dispatch as **human overrides**: such an event takes the key
    /// over even while an automated claim holds it, and is deduplicated by its own delivery id
    /// (`X-GitHub-Delivery`, scoped by `X-GitHub-Hook-ID`; GitLab's `X-Gitlab-Webhook-UUID`), so
    /// a person can always get a fresh review of the same commit, once per request.
    ///
    /// ```
    /// use tower_idempotency::http::{DispatchFilter, DispatchRules, WebhookEvent};
    ///
    /// let rules = DispatchRules::new()
    ///     .allow("check_suite", Some("completed"), Some("success"))
    ///     .allow_override("pull_request", Some("review_requested"), None);
    /// let requested = WebhookEvent::new("pull_request", Some("review_requested"), None);
    /// assert!(rules.dispatches(&requested) && rules.overrides(&requested));
    /// assert!(!rules.overrides(&WebhookEvent::new("check_suite", Some("completed"), Some("success"))));
    /// ```
    pub fn allow_override(mut self, event: impl Into<String>, action: Option<&str>, conclusion: Option<&str>) -> Self {
        self = self.allow(event, action, conclusion);
        if let Some(rule) = self.rules.last_mut() {
            rule.overrides = true;
        }
        self
    }

    fn matching<'a>(&'a self, event: &'a WebhookEvent<'_>) -> impl Iterator<Item = &'a Rule> + 'a {
        let matches =
            |pattern: &Option<String>, value: Option<&str>| pattern.as_deref().is_none_or(|p| Some(p) == value);
        self.rules.iter().filter(move |rule| {
            rule.event == event.event
                && matches(&rule.action, event.action)
                && matches(&rule.conclusion, event.conclusion)
        })
    }
}

impl fmt::Debug for DispatchRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for rule in &self.rules {
            list.entry(&format_args!(
                "{}/{}/{}",
                rule.event,
                rule.action.as_deref().unwrap_or("*"),
                rule.conclusion.as_deref().unwrap_or("*"),
            ));
            if rule.overrides {
                list.entry(&"(override)");
            }
        }
        list.finish()
    }
}

impl DispatchFilter for DispatchRules {
    fn dispatches(&self, event: &WebhookEvent<'_>) -> bool {
        self.matching(event).next().is_some()
    }

    fn overrides(&self, event: &WebhookEvent<'_>) -> bool {
        self.matching(event).any(|rule| rule.overrides)
    }
}

/// Refuses a body whose `Content-Type` says it is not JSON. GitHub can be configured to send
/// `application/x-www-form-urlencoded` (the JSON in a `payload` field); answering `400` to that
/// while `ping` (whose body is never read) answers `200` would make a hook look healthy while
/// every dispatching delivery fails. So every delivery with a non-JSON content type, `ping`
/// included, is refused with `415`, whose message says what to set. An absent `Content-Type` is
/// read as JSON.
fn require_json(parts: &Parts) -> Result<(), ExtractError> {
    let Some(value) = parts.headers.get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let media_type = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if media_type == "application/json" || media_type.ends_with("+json") {
        return Ok(());
    }
    Err(ExtractError::UnsupportedContentType {
        content_type: quoted(&text),
    })
}

/// The value of a header that identifies the event, as text.
fn header_text<'a>(parts: &'a Parts, name: &HeaderName) -> Result<Option<&'a str>, ExtractError> {
    parts
        .headers
        .get(name)
        .map(|value| {
            value
                .to_str()
                .map_err(|_| ExtractError::InvalidHeader { name: name.clone() })
        })
        .transpose()
}

/// Deserialises the few fields `T` names from a JSON body; every other field is skipped.
fn parse<'a, T: Deserialize<'a>>(event: &str, body: &'a Bytes) -> Result<T, ExtractError> {
    let text = std::str::from_utf8(body).map_err(|e| ExtractError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let malformed = |path: String, source| ExtractError::MalformedPayload {
        event: event.to_owned(),
        path,
        source,
    };
    // Derived structs would also accept a JSON array (as a tuple); a payload is an object.
    if !text.trim_start().starts_with('{') {
        let error = <serde_json::Error as serde::de::Error>::invalid_type(first_token(text), &"a JSON object");
        return Err(malformed(".".to_owned(), error));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // `?` is an object key the parser could not read: that is the enclosing object's problem.
        let path = match e.path().to_string() {
            p if p == "?" => ".".to_owned(),
            p => p.strip_suffix(".?").map(str::to_owned).unwrap_or(p),
        };
        malformed(quoted(&path), shortened(e.into_inner()))
    })?;
    // Trailing garbage after the document makes it malformed too.
    de.end().map_err(|e| malformed(".".to_owned(), e))?;
    Ok(value)
}

/// Longest payload-derived text (document path, parser message) kept in an error, in bytes. Both
/// can echo the payload (an object key, a string value) into the `400` body and the log line.
const MAX_QUOTED_LEN: usize = 200;

/// `text` with every character that is not printable ASCII escaped, and when longer than
/// [`MAX_QUOTED_LEN`], its middle cut out (`…`): an object key from the payload must not forge
/// log lines (newline, bidi override) or grow the error without bound.
fn quoted(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c == ' ' || c.is_ascii_graphic() {
            escaped.push(c);
        } else {
            escaped.extend(c.escape_unicode());
        }
    }
    if escaped.len() <= MAX_QUOTED_LEN {
        return escaped;
    }
    // All ASCII now, so any byte offset is a character boundary.
    let tail = MAX_QUOTED_LEN / 4;
    let head = MAX_QUOTED_LEN - tail;
    format!("{}…{}", &escaped[..head], &escaped[escaped.len() - tail..])
}

/// The parser's error, unless its message quotes too much of the payload (a type error quotes the
/// whole offending string): then a data error with the message [`quoted`] and its location kept
/// in the text (`line()` and `column()` of the replacement are 0).
fn shortened(error: serde_json::Error) -> serde_json::Error {
    let message = error.to_string();
    if message.len() <= MAX_QUOTED_LEN {
        return error;
    }
    let location = format!(" at line {} column {}", error.line(), error.column());
    let what = message.strip_suffix(&location).unwrap_or(&message);
    <serde_json::Error as serde::de::Error>::custom(format_args!("{}{location}", quoted(what)))
}

/// What a document that is not an object starts with, for the error message.
fn first_token(text: &str) -> serde::de::Unexpected<'static> {
    use serde::de::Unexpected;
    match text.trim_start().bytes().next() {
        None => Unexpected::Other("an empty body"),
        Some(b'[') => Unexpected::Seq,
        Some(b'"') => Unexpected::Other("a string"),
        Some(b'n') => Unexpected::Unit,
        Some(b't' | b'f') => Unexpected::Other("a boolean"),
        Some(b'-' | b'0'..=b'9') => Unexpected::Other("a number"),
        Some(_) => Unexpected::Other("something that is not JSON"),
    }
}

/// A pull request number from a ref such as `refs/pull/42/head`.
fn pull_request_from_ref(reference: &str) -> Option<u64> {
    let digits = reference.strip_prefix("refs/pull/")?.strip_suffix("/head")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|n| *n > 0)
}

/// What one payload yields before the filter and the key are applied.
struct Found {
    action: Option<String>,
    conclusion: Option<String>,
    project: Option<String>,
    project_field: &'static str,
    /// `Ok(None)`: the event names no pull request.
    pull_request: Result<Option<u64>, &'static str>,
    head_sha: Option<String>,
    head_sha_field: &'static str,
}

/// Marks a request as a **human override** with its own identity (e.g. a review request's
/// delivery id): the HTTP layer claims it as an override — taking the key over even while an
/// automated claim holds it, deduplicated by `identity`. The webhook extractors insert it into
/// the request's extensions for events their rules mark as overrides
/// ([`DispatchRules::allow_override`]); any [`HttpKeyExtractor`](super::HttpKeyExtractor) may
/// insert it too.
///
/// ```
/// use tower_idempotency::http::OverrideTrigger;
/// let marker = OverrideTrigger { identity: "hook-1/delivery-7".into() };
/// assert_eq!(marker.identity, "hook-1/delivery-7");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideTrigger {
    /// The override's own identity; the same identity is one override.
    pub identity: String,
}

/// Applies the filter, then builds the key and the [`DispatchTarget`]; shared by both providers.
fn finish(
    filter: &impl DispatchFilter,
    event: &str,
    delivery: Option<&str>,
    found: Found,
    parts: &mut Parts,
) -> Result<Option<crate::IdempotencyKey>, ExtractError> {
    let action = found.action.as_deref();
    let conclusion = found.conclusion.as_deref();
    if !filter.dispatches(&WebhookEvent::new(event, action, conclusion)) {
        tracing::debug!(
            event,
            action,
            conclusion,
            outcome = "pass_through",
            "event does not dispatch; passing through unclaimed"
        );
        return Ok(None);
    }
    let pull_request = match found.pull_request {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::debug!(
                event,
                action,
                outcome = "pass_through",
                "event names no pull request; passing through unclaimed"
            );
            return Ok(None);
        }
        Err(field) => {
            return Err(ExtractError::MissingField {
                event: event.to_owned(),
                field,
            });
        }
    };
    let missing = |field| ExtractError::MissingField {
        event: event.to_owned(),
        field,
    };
    let project = found.project.ok_or_else(|| missing(found.project_field))?;
    let head_sha = found.head_sha.ok_or_else(|| missing(found.head_sha_field))?;
    let key = crate::IdempotencyKey::for_pull_request(&project, pull_request, &head_sha).map_err(|source| {
        ExtractError::InvalidKey {
            event: event.to_owned(),
            source,
        }
    })?;
    if filter.overrides(&WebhookEvent::new(
        event,
        found.action.as_deref(),
        found.conclusion.as_deref(),
    )) {
        match delivery {
            Some(delivery) => {
                // GitHub sends one delivery id to every hook that receives the event.
                let hook = parts.headers.get("x-github-hook-id").and_then(|v| v.to_str().ok());
                let identity = match hook {
                    Some(hook) => format!("{hook}/{delivery}"),
                    None => delivery.to_owned(),
                };
                parts.extensions.insert(OverrideTrigger { identity });
            }
            None => tracing::warn!(
                event,
                action,
                "override event without a delivery id; claimed as an ordinary trigger"
            ),
        }
    }
    parts.extensions.insert(DispatchTarget {
        event: event.to_owned(),
        action: found.action,
        project,
        pull_request,
        head_sha: head_sha.to_ascii_lowercase(),
        delivery: delivery.map(str::to_owned),
    });
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_request_refs() {
        assert_eq!(pull_request_from_ref("refs/pull/42/head"), Some(42));
        assert_eq!(pull_request_from_ref("refs/pull/0/head"), None);
        assert_eq!(pull_request_from_ref("refs/pull//head"), None);
        assert_eq!(pull_request_from_ref("refs/pull/+4/head"), None);
        assert_eq!(pull_request_from_ref("refs/pull/4/merge"), None);
        assert_eq!(pull_request_from_ref("main"), None);
        assert_eq!(pull_request_from_ref("refs/pull/99999999999999999999999/head"), None);
    }
}
