//! The HTTP form of the layer: drop-in idempotency for axum routes and webhook receivers.
//!
//! The core [`IdempotencyLayer`](crate::IdempotencyLayer) short-circuits with an
//! [`IdempotencyError`](crate::IdempotencyError), which an axum router cannot take without a
//! `HandleErrorLayer`, and its extractor only sees the request, not a body that still has to be
//! read. This module exists to close that gap for HTTP:
//!
//! - [`HttpIdempotencyLayer`] wraps the core state machine (claim, call, settle) and turns every
//!   short-circuit into a **response** ([`ShortCircuitResponse`], JSON by default). The inner
//!   service's error type is untouched, so `Infallible` stays `Infallible` and the layer drops into
//!   `Router::layer` / `Router::route_layer` as is.
//! - When the key lives in the body (webhooks), the body is buffered up to a limit (default
//!   [`DEFAULT_BODY_LIMIT`], GitHub's 25 MB payload cap; over it: `413`), the signature is checked
//!   ([`VerifyRequest`]: `401`, before anything touches the store), the key is extracted
//!   ([`HttpKeyExtractor`]: `400` when malformed), and the inner service receives the identical
//!   bytes. The claimed [`IdempotencyKey`](crate::IdempotencyKey) is put into the request's
//!   extensions for the handler.
//! - Key extractors: [`HeaderKey`] (`Idempotency-Key`, `X-GitHub-Delivery`, any header),
//!   [`GitHubDispatchKey`] and [`GitLabDispatchKey`] (repository, pull/merge request, head SHA
//!   from the JSON body, with a [`DispatchFilter`] applied *before* the claim).
//! - Signature checks: [`GitHubSignature`] (`X-Hub-Signature-256`) and [`GitLabToken`]
//!   (`X-Gitlab-Token`), both constant-time, secrets captured at construction.
//! - Outcome classification: [`HttpClassifier`] releases the claim when the handler answers
//!   `429 Too Many Requests` or marks its response [`Blocked`]; any
//!   [`ClassifyOutcome`](crate::ClassifyOutcome) can replace it.
//!
//! # Order of checks
//!
//! body limit (`413`) → signature (`401`) → key extraction and dispatch filter (`400`, or pass
//! through unclaimed) → claim in the store (duplicate: `409`, or `200` with the webhook presets;
//! store unavailable: `503`) → handler → keep or release the claim.
//!
//! # Example
//!
//! ```
//! use axum::{Extension, Router, routing::post};
//! use axum::http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_idempotency::{IdempotencyKey, MemoryStore};
//! use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer};
//!
//! async fn create_payment(Extension(key): Extension<IdempotencyKey>) -> String {
//!     format!("created payment for {key}")
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // In production: `RedisStore::connect("redis://127.0.0.1:6379").await?`.
//! let app = Router::new()
//!     .route("/payments", post(create_payment))
//!     .route_layer(HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key()));
//!
//! let request = || Request::post("/payments").header("idempotency-key", "pay-7").body(axum::body::Body::empty()).unwrap();
//! let first = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::OK);
//! let second = app.oneshot(request()).await.unwrap();
//! assert_eq!(second.status(), StatusCode::CONFLICT);
//! assert_eq!(second.headers()["idempotency-status"], "duplicate");
//! # }
//! ```
//!
//! # Webhook receiver
//!
//! One review per (repository, pull request, head SHA), however many deliveries announce it;
//! events that will not dispatch never take a claim. `examples/github_webhook.rs` is the complete
//! reference router.
//!
//! ```no_run
//! use axum::{Extension, Router, http::StatusCode, routing::post};
//! use tower_idempotency::{IdempotencyKey, RedisStore};
//! use tower_idempotency::http::{DispatchRules, DispatchTarget, GitHubDispatchKey, HttpIdempotencyLayer};
//!
//! async fn github(key: Option<Extension<IdempotencyKey>>, target: Option<Extension<DispatchTarget>>) -> StatusCode {
//!     match (key, target) {
//!         // Claimed: dispatch the review of t.project #t.pull_request at t.head_sha. Answering
//!         // 429 (or marking the response `Blocked`) releases the claim.
//!         (Some(_), Some(Extension(_t))) => StatusCode::ACCEPTED,
//!         // An event that dispatches nothing; it took no claim.
//!         _ => StatusCode::OK,
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! let rules = DispatchRules::new()
//!     .allow("check_suite", Some("completed"), Some("success"))
//!     .allow("pull_request", Some("review_requested"), None);
//! let app: Router = Router::new()
//!     .route("/webhooks/github", post(github))
//!     .route_layer(
//!         HttpIdempotencyLayer::github_webhook(store, std::env::var("GITHUB_WEBHOOK_SECRET")?)
//!             .with_extractor(GitHubDispatchKey::new().with_filter(rules))
//!             .with_namespace("github-dispatch:"),
//!     );
//! # let _ = app; Ok(()) }
//! ```

mod classify;
mod extract;
mod future;
mod layer;
mod response;
mod service;
mod signature;
mod webhook;

pub use classify::{Blocked, HttpClassifier};
pub use extract::{ExtractError, HeaderKey, HttpKeyExtractor};
pub use future::ResponseFuture;
pub use layer::{DEFAULT_BODY_LIMIT, HttpIdempotencyLayer};
pub use response::{DEFAULT_RETRY_AFTER, IDEMPOTENCY_STATUS, JsonResponses, ShortCircuitResponse};
pub use service::HttpIdempotency;
pub use signature::{GitHubSignature, GitLabToken, NoVerification, SignatureError, VerifyRequest};
pub use webhook::{
    AllEvents, DispatchFilter, DispatchRules, DispatchTarget, GitHubDispatchKey, GitLabDispatchKey, WebhookEvent,
};
