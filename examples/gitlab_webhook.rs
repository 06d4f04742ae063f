//! The reference GitLab webhook router: each review is dispatched once per (project, merge
//! request, head SHA), however many deliveries announce it and however many router processes
//! receive them. The same flags and answers as `examples/github_webhook.rs`.
//!
//! ```text
//! GITLAB_WEBHOOK_TOKEN=… cargo run --example gitlab_webhook -- \
//!     [--listen ADDR] [--redis URL] [--namespace NS] [--ttl-secs N] [--stream NAME] [--capacity N] \
//!     [--detached-pipelines]
//! ```
//!
//! Defaults: `127.0.0.1:3000`, `REDIS_URL` (else `redis://127.0.0.1:6379`), `gitlab-dispatch:`,
//! 300 s, `reviews`, unlimited. An unset `GITLAB_WEBHOOK_TOKEN` turns token checks off (with a
//! warning); an empty one is refused (exit code 2).
//!
//! Dispatching: `Merge Request Hook` `open`, and `update` that pushed commits; merge-request
//! pipelines that succeeded, with `--detached-pipelines` only (GitLab's pipeline hook does not say
//! whether its SHA is the merge request's head or a merged-results / merge-train commit). The full
//! contract is in `examples/support/webhook_router.rs`, which the tests share.
//!
//! Try it against a running Redis:
//!
//! ```text
//! curl -i localhost:3000/webhooks/gitlab -H 'content-type: application/json' \
//!   -H 'x-gitlab-event: Merge Request Hook' -H 'x-gitlab-token: s3cret' \
//!   -d '{"object_kind":"merge_request","project":{"path_with_namespace":"group/app"},"object_attributes":{"iid":7,"action":"open","last_commit":{"id":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7"}}}'
//! redis-cli XRANGE reviews - +
//! ```

#[path = "support/webhook_router.rs"]
mod webhook_router;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    webhook_router::run(webhook_router::Provider::GitLab).await
}
