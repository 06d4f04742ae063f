//! The reference GitHub webhook router: each review is dispatched once per (repository, pull
//! request, head SHA), however many deliveries announce it and however many router processes
//! receive them.
//!
//! ```text
//! GITHUB_WEBHOOK_SECRET=… cargo run --example github_webhook -- \
//!     [--listen ADDR] [--redis URL] [--namespace NS] [--ttl-secs N] [--stream NAME] [--capacity N]
//! ```
//!
//! Defaults: `127.0.0.1:3000`, `REDIS_URL` (else `redis://127.0.0.1:6379`), `github-dispatch:`,
//! 300 s, `reviews`, unlimited. An unset `GITHUB_WEBHOOK_SECRET` turns signature checks off (with
//! a warning); an empty one is refused (exit code 2). The full contract (dispatching events, answers, stream entries)
//! is in `examples/support/webhook_router.rs`, which `examples/incident_replay.rs` and the tests
//! share.
//!
//! Try it against a running Redis:
//!
//! ```text
//! curl -i localhost:3000/webhooks/github -H 'content-type: application/json' \
//!   -H 'x-github-event: pull_request' -H 'x-github-delivery: d1' \
//!   -d '{"action":"review_requested","repository":{"full_name":"o/r"},"pull_request":{"number":2,"head":{"sha":"ec26c3e5"}}}'
//! redis-cli XRANGE reviews - +
//! ```

#[path = "support/webhook_router.rs"]
mod webhook_router;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    webhook_router::run(webhook_router::Provider::GitHub).await
}
