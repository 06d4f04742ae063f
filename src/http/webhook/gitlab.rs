//! GitLab: (project, merge request IID, head SHA) by `X-Gitlab-Event`.

use bytes::Bytes;
use http::HeaderName;
use http::request::Parts;
use serde::Deserialize;

use super::{AllEvents, DispatchFilter, ExtractError, Found, finish, header_text, parse};
use crate::IdempotencyKey;
use crate::http::HttpKeyExtractor;

const X_GITLAB_EVENT: HeaderName = HeaderName::from_static("x-gitlab-event");
const X_GITLAB_WEBHOOK_UUID: HeaderName = HeaderName::from_static("x-gitlab-webhook-uuid");
const X_GITLAB_EVENT_UUID: HeaderName = HeaderName::from_static("x-gitlab-event-uuid");

/// The dispatch key of a GitLab webhook delivery: `project:iid:head_sha`, as
/// [`IdempotencyKey::for_pull_request`] renders it.
///
/// | `X-Gitlab-Event` (event name for the filter) | project | merge request | head SHA |
/// |---|---|---|---|
/// | `Merge Request Hook` (`merge_request`) | `.project.path_with_namespace` | `.object_attributes.iid` | `.object_attributes.last_commit.id` |
/// | `Pipeline Hook` (`pipeline`) | `.project.path_with_namespace` | `.merge_request.iid` (merge-request pipelines only) | `.object_attributes.sha` |
/// | `Note Hook` (`note`) | `.project.path_with_namespace` | `.merge_request.iid` (when `.object_attributes.noteable_type` is `MergeRequest`) | `.merge_request.last_commit.id` |
///
/// A pipeline without a merge request, a note on anything but a merge request, and every other
/// event (`Push Hook`, `Tag Push Hook`, …) pass through unclaimed, and so does an event the
/// [filter](Self::with_filter) rejects. A listed event whose body is malformed or lacks a needed
/// field is answered `400`; so is a missing `X-Gitlab-Event`. The
/// [`DispatchTarget`](super::DispatchTarget) found is put into the request's extensions.
///
/// What it trusts: the body. Pair it with [`GitLabToken`](crate::http::GitLabToken).
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::http::{GitLabDispatchKey, HttpKeyExtractor};
///
/// let body = Bytes::from_static(br#"{"object_kind":"merge_request","project":{"path_with_namespace":"group/app"},
///     "object_attributes":{"iid":7,"action":"open","last_commit":{"id":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7"}}}"#);
/// let (mut parts, ()) = http::Request::post("/").header("x-gitlab-event", "Merge Request Hook").body(()).unwrap().into_parts();
/// let key = GitLabDispatchKey::new().extract(&mut parts, &body).unwrap().unwrap();
/// assert_eq!(key.as_str(), "group/app:7:da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
/// ```
#[derive(Debug, Clone, Default)]
pub struct GitLabDispatchKey<F = AllEvents> {
    filter: F,
}

impl GitLabDispatchKey {
    /// Every event that names a merge request dispatches.
    pub fn new() -> Self {
        Self { filter: AllEvents }
    }
}

impl<F> GitLabDispatchKey<F> {
    /// Only events `filter` accepts dispatch (and take a claim); others pass through unclaimed.
    pub fn with_filter<F2: DispatchFilter>(self, filter: F2) -> GitLabDispatchKey<F2> {
        GitLabDispatchKey { filter }
    }

    /// The filter.
    pub fn filter(&self) -> &F {
        &self.filter
    }
}

#[derive(Deserialize)]
struct Project {
    path_with_namespace: Option<String>,
}

#[derive(Deserialize)]
struct Commit {
    id: Option<String>,
}

#[derive(Deserialize)]
struct MergeRequestAttributes {
    iid: Option<u64>,
    action: Option<String>,
    last_commit: Option<Commit>,
}

#[derive(Deserialize)]
struct MergeRequestEvent {
    project: Option<Project>,
    object_attributes: Option<MergeRequestAttributes>,
}

#[derive(Deserialize)]
struct PipelineAttributes {
    sha: Option<String>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct MergeRequestRef {
    iid: Option<u64>,
}

#[derive(Deserialize)]
struct PipelineEvent {
    project: Option<Project>,
    object_attributes: Option<PipelineAttributes>,
    merge_request: Option<MergeRequestRef>,
}

#[derive(Deserialize)]
struct NoteAttributes {
    noteable_type: Option<String>,
    action: Option<String>,
}

#[derive(Deserialize)]
struct NotedMergeRequest {
    iid: Option<u64>,
    last_commit: Option<Commit>,
}

#[derive(Deserialize)]
struct NoteEvent {
    project: Option<Project>,
    object_attributes: Option<NoteAttributes>,
    merge_request: Option<NotedMergeRequest>,
}

const PROJECT_FIELD: &str = "project.path_with_namespace";

fn path(project: Option<Project>) -> Option<String> {
    project.and_then(|p| p.path_with_namespace)
}

fn merge_request_found(event: MergeRequestEvent) -> Found {
    let (iid, action, head_sha) = match event.object_attributes {
        Some(a) => (a.iid, a.action, a.last_commit.and_then(|c| c.id)),
        None => (None, None, None),
    };
    Found {
        action,
        conclusion: None,
        project: path(event.project),
        project_field: PROJECT_FIELD,
        // Every merge request event is about a merge request: no IID is malformed.
        pull_request: iid.map(Some).ok_or("object_attributes.iid"),
        head_sha,
        head_sha_field: "object_attributes.last_commit.id",
    }
}

fn pipeline_found(event: PipelineEvent) -> Found {
    let (head_sha, status, has_attributes) = match event.object_attributes {
        Some(a) => (a.sha, a.status, true),
        None => (None, None, false),
    };
    let pull_request = match event.merge_request {
        // The pipeline itself is missing: malformed.
        _ if !has_attributes => Err("object_attributes"),
        // A branch or tag pipeline: no merge request.
        None => Ok(None),
        Some(MergeRequestRef { iid: Some(iid) }) => Ok(Some(iid)),
        Some(MergeRequestRef { iid: None }) => Err("merge_request.iid"),
    };
    Found {
        action: None,
        conclusion: status,
        project: path(event.project),
        project_field: PROJECT_FIELD,
        pull_request,
        head_sha,
        head_sha_field: "object_attributes.sha",
    }
}

fn note_found(event: NoteEvent) -> Found {
    let (noteable_type, action, has_attributes) = match event.object_attributes {
        Some(a) => (a.noteable_type, a.action, true),
        None => (None, None, false),
    };
    let on_merge_request = noteable_type.as_deref() == Some("MergeRequest");
    let (iid, head_sha) = match event.merge_request {
        Some(mr) => (mr.iid, mr.last_commit.and_then(|c| c.id)),
        None => (None, None),
    };
    let pull_request = if !has_attributes {
        // The note itself is missing: malformed.
        Err("object_attributes")
    } else if !on_merge_request {
        // A note on a commit, an issue or a snippet.
        Ok(None)
    } else {
        iid.map(Some).ok_or("merge_request.iid")
    };
    Found {
        action,
        conclusion: None,
        project: path(event.project),
        project_field: PROJECT_FIELD,
        pull_request,
        head_sha,
        head_sha_field: "merge_request.last_commit.id",
    }
}

impl<F: DispatchFilter> HttpKeyExtractor for GitLabDispatchKey<F> {
    type Error = ExtractError;

    fn extract(&self, parts: &mut Parts, body: &Bytes) -> Result<Option<IdempotencyKey>, ExtractError> {
        let Some(hook) = header_text(parts, &X_GITLAB_EVENT)? else {
            return Err(ExtractError::MissingHeader { name: X_GITLAB_EVENT });
        };
        let (event, found) = match hook {
            "Merge Request Hook" => ("merge_request", merge_request_found(parse("merge_request", body)?)),
            "Pipeline Hook" => ("pipeline", pipeline_found(parse("pipeline", body)?)),
            "Note Hook" => ("note", note_found(parse("note", body)?)),
            _ => {
                tracing::debug!(
                    event = hook,
                    outcome = "pass_through",
                    "not a merge-request event; passing through unclaimed"
                );
                return Ok(None);
            }
        };
        let delivery = match header_text(parts, &X_GITLAB_WEBHOOK_UUID)? {
            Some(uuid) => Some(uuid.to_owned()),
            None => header_text(parts, &X_GITLAB_EVENT_UUID)?.map(str::to_owned),
        };
        finish(&self.filter, event, delivery.as_deref(), found, parts)
    }
}
