//! GitHub: (repository, pull request, head SHA) by `X-GitHub-Event`.

use bytes::Bytes;
use http::HeaderName;
use http::request::Parts;
use serde::Deserialize;

use super::{
    DispatchFilter, DispatchRules, ExtractError, Found, finish, header_text, parse, pull_request_from_ref, require_json,
};
use crate::IdempotencyKey;
use crate::http::HttpKeyExtractor;

const X_GITHUB_EVENT: HeaderName = HeaderName::from_static("x-github-event");
const X_GITHUB_DELIVERY: HeaderName = HeaderName::from_static("x-github-delivery");

/// The dispatch key of a GitHub webhook delivery: `repository:pr:head_sha`, the same key as
/// [`IdempotencyKey::for_pull_request`], so a webhook router and a queue worker that dispatch the
/// same review agree on it.
///
/// | `X-GitHub-Event` | repository | pull request | head SHA |
/// |---|---|---|---|
/// | `check_suite` | `.repository.full_name` | the own pull request of `.check_suite.pull_requests[]` (below), else `.check_suite.head_branch` = `refs/pull/N/head` | `.check_suite.head_sha` |
/// | `check_run` | `.repository.full_name` | the own pull request of `.check_run.pull_requests[]`, else of `.check_run.check_suite.pull_requests[]`, else `.check_run.check_suite.head_branch` = `refs/pull/N/head` | `.check_run.head_sha` |
/// | `workflow_run` | `.repository.full_name` | the own pull request of `.workflow_run.pull_requests[]`, else `.workflow_run.head_branch` = `refs/pull/N/head` | `.workflow_run.head_sha` |
/// | `pull_request` | `.repository.full_name` | `.pull_request.number` (else `.number`) | `.pull_request.head.sha` |
/// | `pull_request_review` | `.repository.full_name` | `.pull_request.number` | `.pull_request.head.sha` |
///
/// **The own pull request.** `pull_requests[]` lists every open pull request whose head branch
/// matches the run's, and that includes pull requests of *other* repositories (a fork's pull
/// request whose branch has the same name). So the extractor takes only an entry whose
/// `base.repo.id` is the event's `repository.id`, preferring one whose `head.sha` is the event's
/// head SHA; when no entry qualifies, it falls back to a `refs/pull/N/head` branch, else the
/// event passes through unclaimed (logged at `debug`).
///
/// **Case.** GitHub treats `owner/repository` case-insensitively, so the key's repository is
/// lower-cased (as [`IdempotencyKey::for_pull_request`] does); the
/// [`DispatchTarget`](super::DispatchTarget) keeps the name as the payload spells it.
///
/// Every other event (`push`, `status`, `ping`, `issue_comment`, …) passes through unclaimed
/// without its body being parsed, and so does a listed event that names no pull request (a fork's
/// suite, whose `pull_requests` is empty and whose `head_branch` names no PR) or that the
/// [filter](Self::with_filter) rejects (by default, every event: see [`new`](Self::new)). A listed event whose body is not JSON, has a needed field
/// of the wrong type, or lacks the repository or head SHA is answered `400`. A missing
/// `X-GitHub-Event` header is `400` too. The [`DispatchTarget`](super::DispatchTarget) found is
/// put into the request's extensions.
///
/// What it trusts: the body. Pair it with [`GitHubSignature`](crate::http::GitHubSignature).
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::http::{DispatchRules, DispatchTarget, GitHubDispatchKey, HttpKeyExtractor};
///
/// let extractor = GitHubDispatchKey::new()
///     .with_filter(DispatchRules::new().allow("check_suite", Some("completed"), Some("success")));
/// let body = Bytes::from_static(br#"{"action":"completed","repository":{"id":7,"full_name":"Octo/Repo"},
///     "check_suite":{"head_sha":"EC26C3E5","conclusion":"success",
///       "pull_requests":[{"number":2,"head":{"sha":"ec26c3e5"},"base":{"repo":{"id":7}}}]}}"#);
/// let (mut parts, ()) = http::Request::post("/").header("x-github-event", "check_suite").body(()).unwrap().into_parts();
/// let key = extractor.extract(&mut parts, &body).unwrap().unwrap();
/// assert_eq!(key.as_str(), "octo/repo:2:ec26c3e5");
/// assert_eq!(parts.extensions.get::<DispatchTarget>().unwrap().pull_request, 2);
///
/// let (mut push, ()) = http::Request::post("/").header("x-github-event", "push").body(()).unwrap().into_parts();
/// assert!(extractor.extract(&mut push, &Bytes::from_static(b"{}")).unwrap().is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct GitHubDispatchKey<F = DispatchRules> {
    filter: F,
}

impl GitHubDispatchKey {
    /// Nothing dispatches (and nothing takes a claim) until rules are given with
    /// [`with_filter`](Self::with_filter): an event that will not dispatch must never take a
    /// claim, so the safe default is the empty [`DispatchRules`]. `with_filter(AllEvents)`
    /// dispatches every event that names a pull request.
    pub fn new() -> Self {
        Self {
            filter: DispatchRules::new(),
        }
    }
}

impl<F> GitHubDispatchKey<F> {
    /// Only events `filter` accepts dispatch (and take a claim); others pass through unclaimed.
    pub fn with_filter<F2: DispatchFilter>(self, filter: F2) -> GitHubDispatchKey<F2> {
        GitHubDispatchKey { filter }
    }

    /// The filter.
    pub fn filter(&self) -> &F {
        &self.filter
    }
}

#[derive(Deserialize)]
struct Repository {
    id: Option<u64>,
    full_name: Option<String>,
}

#[derive(Deserialize)]
struct RepositoryId {
    id: Option<u64>,
}

/// One side (`head` or `base`) of a listed pull request.
#[derive(Deserialize)]
struct Side {
    sha: Option<String>,
    repo: Option<RepositoryId>,
}

/// An entry of `pull_requests`: GitHub lists every open pull request whose head branch matches
/// the run's, including pull requests of *other* repositories (a fork whose branch has the same
/// name), so the base repository and head SHA are read to pick the right one.
#[derive(Deserialize)]
struct PullRequestRef {
    number: Option<u64>,
    head: Option<Side>,
    base: Option<Side>,
}

/// The part of a `check_suite` or `workflow_run` we read.
#[derive(Deserialize)]
struct Run {
    head_sha: Option<String>,
    head_branch: Option<String>,
    conclusion: Option<String>,
    pull_requests: Option<Vec<PullRequestRef>>,
}

#[derive(Deserialize)]
struct CheckSuiteEvent {
    action: Option<String>,
    repository: Option<Repository>,
    check_suite: Option<Run>,
}

#[derive(Deserialize)]
struct WorkflowRunEvent {
    action: Option<String>,
    repository: Option<Repository>,
    workflow_run: Option<Run>,
}

#[derive(Deserialize)]
struct CheckRunSuite {
    head_branch: Option<String>,
    pull_requests: Option<Vec<PullRequestRef>>,
}

#[derive(Deserialize)]
struct CheckRun {
    head_sha: Option<String>,
    conclusion: Option<String>,
    pull_requests: Option<Vec<PullRequestRef>>,
    check_suite: Option<CheckRunSuite>,
}

#[derive(Deserialize)]
struct CheckRunEvent {
    action: Option<String>,
    repository: Option<Repository>,
    check_run: Option<CheckRun>,
}

#[derive(Deserialize)]
struct Head {
    sha: Option<String>,
}

#[derive(Deserialize)]
struct PullRequest {
    number: Option<u64>,
    head: Option<Head>,
}

#[derive(Deserialize)]
struct Review {
    state: Option<String>,
}

#[derive(Deserialize)]
struct PullRequestEvent {
    action: Option<String>,
    repository: Option<Repository>,
    number: Option<u64>,
    pull_request: Option<PullRequest>,
    review: Option<Review>,
}

/// What the event says about itself, to pick the listed pull request that is about it.
#[derive(Clone, Copy)]
struct Subject<'a> {
    repository_id: Option<u64>,
    head_sha: Option<&'a str>,
}

/// The number of the listed pull request whose base repository is the event's repository (by
/// id), preferring one whose head SHA is the event's head SHA. `Ok(None)` when none is (an empty
/// list, or only pull requests of other repositories); `Err(field)` when the chosen entry has no
/// number.
fn matching_pull_request(
    list: Option<&[PullRequestRef]>,
    subject: Subject<'_>,
    field: &'static str,
) -> Result<Option<u64>, &'static str> {
    let list = list.unwrap_or_default();
    let Some(repository_id) = subject.repository_id else {
        if !list.is_empty() {
            tracing::debug!(
                field,
                "event has no `repository.id`: cannot tell which listed pull request is its own"
            );
        }
        return Ok(None);
    };
    let base_id = |pr: &PullRequestRef| pr.base.as_ref().and_then(|b| b.repo.as_ref()).and_then(|r| r.id);
    let same_head = |pr: &&&PullRequestRef| {
        let head = pr.head.as_ref().and_then(|h| h.sha.as_deref());
        matches!((head, subject.head_sha), (Some(a), Some(b)) if a.eq_ignore_ascii_case(b))
    };
    let own: Vec<&PullRequestRef> = list.iter().filter(|pr| base_id(pr) == Some(repository_id)).collect();
    let chosen = own.iter().find(same_head).or(own.first()).copied();
    match chosen {
        None => {
            if !list.is_empty() {
                tracing::debug!(
                    field,
                    listed = list.len(),
                    repository_id,
                    "no listed pull request belongs to the event's repository"
                );
            }
            Ok(None)
        }
        Some(PullRequestRef { number: Some(n), .. }) => Ok(Some(*n)),
        Some(PullRequestRef { number: None, .. }) => Err(field),
    }
}

/// The event's own listed pull request, else a `refs/pull/N/head` branch.
fn pull_request_of(
    list: Option<&[PullRequestRef]>,
    subject: Subject<'_>,
    field: &'static str,
    head_branch: Option<&str>,
) -> Result<Option<u64>, &'static str> {
    match matching_pull_request(list, subject, field)? {
        Some(n) => Ok(Some(n)),
        None => Ok(head_branch.and_then(pull_request_from_ref)),
    }
}

/// The repository's id and full name.
fn repository_parts(repository: Option<Repository>) -> (Option<u64>, Option<String>) {
    match repository {
        Some(r) => (r.id, r.full_name),
        None => (None, None),
    }
}

fn run_found(action: Option<String>, repository: Option<Repository>, run: Option<Run>, prefix: Prefix) -> Found {
    let (repository_id, project) = repository_parts(repository);
    let (head_sha, head_branch, conclusion, pull_requests) = match run {
        Some(r) => (r.head_sha, r.head_branch, r.conclusion, Some(r.pull_requests)),
        None => (None, None, None, None),
    };
    let subject = Subject {
        repository_id,
        head_sha: head_sha.as_deref(),
    };
    let pull_request = match &pull_requests {
        Some(list) => pull_request_of(list.as_deref(), subject, prefix.pr_field(), head_branch.as_deref()),
        // The event's own object is missing: malformed, not "no pull request".
        None => Err(prefix.object()),
    };
    Found {
        action,
        conclusion,
        project,
        project_field: "repository.full_name",
        pull_request,
        head_sha,
        head_sha_field: prefix.sha_field(),
    }
}

#[derive(Clone, Copy)]
enum Prefix {
    CheckSuite,
    WorkflowRun,
}

impl Prefix {
    fn pr_field(self) -> &'static str {
        match self {
            Prefix::CheckSuite => "check_suite.pull_requests[].number",
            Prefix::WorkflowRun => "workflow_run.pull_requests[].number",
        }
    }

    fn object(self) -> &'static str {
        match self {
            Prefix::CheckSuite => "check_suite",
            Prefix::WorkflowRun => "workflow_run",
        }
    }

    fn sha_field(self) -> &'static str {
        match self {
            Prefix::CheckSuite => "check_suite.head_sha",
            Prefix::WorkflowRun => "workflow_run.head_sha",
        }
    }
}

fn check_run_found(event: CheckRunEvent) -> Found {
    let Some(run) = event.check_run else {
        // The event's own object is missing: malformed, not "no pull request".
        return Found {
            action: event.action,
            conclusion: None,
            project: None,
            project_field: "repository.full_name",
            pull_request: Err("check_run"),
            head_sha: None,
            head_sha_field: "check_run.head_sha",
        };
    };
    let (repository_id, project) = repository_parts(event.repository);
    let (head_sha, conclusion, own, suite) = (run.head_sha, run.conclusion, run.pull_requests, run.check_suite);
    let (suite_branch, suite_prs) = match suite {
        Some(s) => (s.head_branch, s.pull_requests),
        None => (None, None),
    };
    let subject = Subject {
        repository_id,
        head_sha: head_sha.as_deref(),
    };
    let pull_request = match matching_pull_request(own.as_deref(), subject, "check_run.pull_requests[].number") {
        Ok(None) => pull_request_of(
            suite_prs.as_deref(),
            subject,
            "check_run.check_suite.pull_requests[].number",
            suite_branch.as_deref(),
        ),
        other => other,
    };
    Found {
        action: event.action,
        conclusion,
        project,
        project_field: "repository.full_name",
        pull_request,
        head_sha,
        head_sha_field: "check_run.head_sha",
    }
}

fn pull_request_found(event: PullRequestEvent, is_review: bool) -> Found {
    let (number, head_sha) = match event.pull_request {
        Some(pr) => (pr.number, pr.head.and_then(|h| h.sha)),
        None => (None, None),
    };
    let number = if is_review { number } else { number.or(event.number) };
    Found {
        action: event.action,
        conclusion: if is_review {
            event.review.and_then(|r| r.state)
        } else {
            None
        },
        // A pull_request event's repository is the pull request's base repository.
        project: repository_parts(event.repository).1,
        project_field: "repository.full_name",
        // Every pull_request(_review) event is about a pull request: no number is malformed.
        pull_request: number.map(Some).ok_or("pull_request.number"),
        head_sha,
        head_sha_field: "pull_request.head.sha",
    }
}

impl<F: DispatchFilter> HttpKeyExtractor for GitHubDispatchKey<F> {
    type Error = ExtractError;

    fn extract(&self, parts: &mut Parts, body: &Bytes) -> Result<Option<IdempotencyKey>, ExtractError> {
        require_json(parts)?;
        let Some(event) = header_text(parts, &X_GITHUB_EVENT)? else {
            return Err(ExtractError::MissingHeader { name: X_GITHUB_EVENT });
        };
        let found = match event {
            "check_suite" => {
                let e: CheckSuiteEvent = parse(event, body)?;
                run_found(e.action, e.repository, e.check_suite, Prefix::CheckSuite)
            }
            "workflow_run" => {
                let e: WorkflowRunEvent = parse(event, body)?;
                run_found(e.action, e.repository, e.workflow_run, Prefix::WorkflowRun)
            }
            "check_run" => check_run_found(parse(event, body)?),
            "pull_request" => pull_request_found(parse(event, body)?, false),
            "pull_request_review" => pull_request_found(parse(event, body)?, true),
            _ => {
                tracing::debug!(
                    event,
                    outcome = "pass_through",
                    "not a pull-request event; passing through unclaimed"
                );
                return Ok(None);
            }
        };
        let event = event.to_owned();
        let delivery = header_text(parts, &X_GITHUB_DELIVERY)?.map(str::to_owned);
        finish(&self.filter, &event, delivery.as_deref(), found, parts)
    }
}
