//! GitLab: (project, merge request IID, head SHA) by `X-Gitlab-Event`.

use bytes::Bytes;
use http::HeaderName;
use http::request::Parts;
use serde::Deserialize;

use super::{DispatchFilter, DispatchRules, ExtractError, Found, finish, header_text, parse, require_json};
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
/// | `Pipeline Hook` (`pipeline`) | `.project.path_with_namespace` | `.merge_request.iid` (merge-request pipelines, only when [detached](Self::with_detached_pipelines)) | `.object_attributes.sha` |
/// | `Note Hook` (`note`) | `.project.path_with_namespace` | `.merge_request.iid` (when `.object_attributes.noteable_type` is `MergeRequest`) | `.merge_request.last_commit.id` |
///
/// **Merge-request pipelines.** A detached merge-request pipeline runs on the merge request's
/// head, but a *merged results* pipeline runs on a merge-ref commit (the head merged into the
/// target branch), and a *merge train* pipeline on a train-ref commit: for those,
/// `.object_attributes.sha` is not the head, so a key made from it differs from the merge request
/// hook's key for the same head, and the same head would be reviewed twice. GitLab's Pipeline
/// Hook does not carry the head SHA, and does not say which kind of pipeline it is (its `.ref`
/// is the source branch for all three). So by default **every merge-request pipeline passes
/// through** unclaimed (logged at `debug`): the merge request hook keys the head.
/// [`with_detached_pipelines(true)`](Self::with_detached_pipelines) is for projects that run
/// neither merged results pipelines nor merge trains: merge-request pipelines are then keyed on
/// `.object_attributes.sha`, except those whose `.ref` names a merge or train ref
/// (`refs/merge-requests/N/merge`, `refs/merge-requests/N/train`, as the Pipelines API and older
/// GitLab versions report it), which still pass through.
///
/// **Case.** GitLab resolves project paths case-insensitively, so the key's project is
/// lower-cased (as [`IdempotencyKey::for_pull_request`] does).
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
/// use tower_idempotency::http::{DispatchRules, GitLabDispatchKey, HttpKeyExtractor};
///
/// let body = Bytes::from_static(br#"{"object_kind":"merge_request","project":{"path_with_namespace":"group/app"},
///     "object_attributes":{"iid":7,"action":"open","last_commit":{"id":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7"}}}"#);
/// let (mut parts, ()) = http::Request::post("/").header("x-gitlab-event", "Merge Request Hook").body(()).unwrap().into_parts();
/// let extractor = GitLabDispatchKey::new().with_filter(DispatchRules::new().allow("merge_request", Some("open"), None));
/// let key = extractor.extract(&mut parts, &body).unwrap().unwrap();
/// assert_eq!(key.as_str(), "group/app:7:da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
/// ```
#[derive(Debug, Clone, Default)]
pub struct GitLabDispatchKey<F = DispatchRules> {
    filter: F,
    detached_pipelines: bool,
}

impl GitLabDispatchKey {
    /// Nothing dispatches (and nothing takes a claim) until rules are given with
    /// [`with_filter`](Self::with_filter): an event that will not dispatch must never take a
    /// claim, so the safe default is the empty [`DispatchRules`]. `with_filter(AllEvents)`
    /// dispatches every event that names a merge request.
    pub fn new() -> Self {
        Self {
            filter: DispatchRules::new(),
            detached_pipelines: false,
        }
    }
}

impl<F> GitLabDispatchKey<F> {
    /// Only events `filter` accepts dispatch (and take a claim); others pass through unclaimed.
    pub fn with_filter<F2: DispatchFilter>(self, filter: F2) -> GitLabDispatchKey<F2> {
        GitLabDispatchKey {
            filter,
            detached_pipelines: self.detached_pipelines,
        }
    }

    /// Whether merge-request pipelines are keyed on their SHA (default: no, they pass through).
    ///
    /// Set it only for projects that run neither merged results pipelines nor merge trains:
    /// their merge-request pipelines are detached and run on the merge request's head. See the
    /// type's documentation for why the payload cannot tell.
    ///
    /// ```
    /// use tower_idempotency::http::GitLabDispatchKey;
    /// let extractor = GitLabDispatchKey::new().with_detached_pipelines(true);
    /// assert!(extractor.detached_pipelines());
    /// ```
    #[must_use]
    pub fn with_detached_pipelines(mut self, detached: bool) -> Self {
        self.detached_pipelines = detached;
        self
    }

    /// Whether merge-request pipelines are keyed on their SHA.
    pub fn detached_pipelines(&self) -> bool {
        self.detached_pipelines
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
    /// The previous head, present when the update pushed commits.
    oldrev: Option<String>,
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
    #[serde(rename = "ref")]
    reference: Option<String>,
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

/// The conclusion a merge request hook reports to the filter: `new_commits` when the update
/// pushed commits (`.object_attributes.oldrev` is present).
pub(super) const NEW_COMMITS: &str = "new_commits";

fn merge_request_found(event: MergeRequestEvent) -> Found {
    let (iid, action, oldrev, head_sha) = match event.object_attributes {
        Some(a) => (a.iid, a.action, a.oldrev, a.last_commit.and_then(|c| c.id)),
        None => (None, None, None, None),
    };
    let pushed = oldrev.is_some_and(|rev| !rev.is_empty());
    Found {
        action,
        conclusion: pushed.then(|| NEW_COMMITS.to_owned()),
        project: path(event.project),
        project_field: PROJECT_FIELD,
        // Every merge request event is about a merge request: no IID is malformed.
        pull_request: iid.map(Some).ok_or("object_attributes.iid"),
        head_sha,
        head_sha_field: "object_attributes.last_commit.id",
    }
}

/// Whether `reference` is a merge request's merge ref or train ref
/// (`refs/merge-requests/N/merge`, `refs/merge-requests/N/train`): the pipeline's commit is not
/// the merge request's head.
fn is_merge_or_train_ref(reference: &str) -> bool {
    let Some(rest) = reference.strip_prefix("refs/merge-requests/") else {
        return false;
    };
    match rest.split_once('/') {
        Some((iid, kind)) => {
            !iid.is_empty() && iid.bytes().all(|b| b.is_ascii_digit()) && matches!(kind, "merge" | "train")
        }
        None => false,
    }
}

fn pipeline_found(event: PipelineEvent, detached_pipelines: bool) -> Found {
    let (head_sha, status, reference, has_attributes) = match event.object_attributes {
        Some(a) => (a.sha, a.status, a.reference, true),
        None => (None, None, None, false),
    };
    let pull_request = match event.merge_request {
        // The pipeline itself is missing: malformed.
        _ if !has_attributes => Err("object_attributes"),
        // A branch or tag pipeline: no merge request.
        None => Ok(None),
        Some(MergeRequestRef { iid: None }) => Err("merge_request.iid"),
        Some(MergeRequestRef { iid: Some(iid) }) => {
            if !detached_pipelines {
                tracing::debug!(
                    iid,
                    outcome = "pass_through",
                    "merge-request pipeline: its SHA may be a merged-results or merge-train commit, not the head; the merge request hook keys the head"
                );
                Ok(None)
            } else if reference.as_deref().is_some_and(is_merge_or_train_ref) {
                tracing::debug!(
                    iid,
                    reference,
                    outcome = "pass_through",
                    "merged-results or merge-train pipeline: its SHA is not the merge request's head"
                );
                Ok(None)
            } else {
                Ok(Some(iid))
            }
        }
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
        require_json(parts)?;
        let Some(hook) = header_text(parts, &X_GITLAB_EVENT)? else {
            return Err(ExtractError::MissingHeader { name: X_GITLAB_EVENT });
        };
        let (event, found) = match hook {
            "Merge Request Hook" => ("merge_request", merge_request_found(parse("merge_request", body)?)),
            "Pipeline Hook" => (
                "pipeline",
                pipeline_found(parse("pipeline", body)?, self.detached_pipelines),
            ),
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

#[cfg(test)]
mod tests {
    use super::is_merge_or_train_ref;

    #[test]
    fn merge_and_train_refs_are_recognised() {
        assert!(is_merge_or_train_ref("refs/merge-requests/12/merge"));
        assert!(is_merge_or_train_ref("refs/merge-requests/12/train"));
        assert!(!is_merge_or_train_ref("refs/merge-requests/12/head"));
        assert!(!is_merge_or_train_ref("refs/merge-requests//merge"));
        assert!(!is_merge_or_train_ref("refs/merge-requests/x/merge"));
        assert!(!is_merge_or_train_ref("main"));
    }
}
