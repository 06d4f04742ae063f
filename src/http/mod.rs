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
//! - Authentication comes before any work: the verifier sees the request head first
//!   ([`VerifyRequest::verify_head`]), so a missing or malformed signature header, or a wrong
//!   GitLab token, is answered `403` without reading the body, and a declared `Content-Length`
//!   over the limit is answered `413` without reading it either.
//! - When the key lives in the body (webhooks), the body is buffered up to a limit (default
//!   [`DEFAULT_BODY_LIMIT`], GitHub's 25 MB payload cap; over it: `413`), the signature is checked
//!   ([`VerifyRequest`]: `403`, before anything touches the store), the key is extracted
//!   ([`HttpKeyExtractor`]: `400` when malformed, `415` when the body is not JSON by its content
//!   type), and the inner service receives the identical bytes. The claimed
//!   [`IdempotencyKey`](crate::IdempotencyKey) is put into the request's extensions for the
//!   handler.
//! - Any body, the way tower-http's middleware takes it: the inner service receives a
//!   [`ReplayBody<B>`] (the request's own body, or the bytes the layer buffered), the layered
//!   service answers a [`ResponseBody<ResBody>`] (the handler's body, or a short-circuit's), so the
//!   layer runs in axum routers, under a plain hyper server over `hyper::body::Incoming`, and next
//!   to tower-http's layers.
//! - Key extractors: [`HeaderKey`] (`Idempotency-Key`, `X-GitHub-Delivery`, GitLab's
//!   `Idempotency-Key`, any header; never on `GET`/`HEAD`/`OPTIONS`, and scoped by method and
//!   path), [`GitHubDispatchKey`] and [`GitLabDispatchKey`] (repository, pull/merge request, head
//!   SHA from the JSON body, with a [`DispatchFilter`] applied *before* the claim; by default
//!   nothing dispatches).
//! - Signature checks: [`GitHubSignature`] (`X-Hub-Signature-256`) and [`GitLabToken`]
//!   (`X-Gitlab-Token`), both constant-time, secrets captured at construction, empty secrets
//!   refused ([`SecretError`]), several secrets accepted at once for rotation.
//! - Outcome classification: [`HttpClassifier`] releases the claim when the handler answers
//!   `429 Too Many Requests`, any other `4xx` but `409` (the request was refused before it did
//!   anything), or marks its response [`Blocked`]; any
//!   [`ClassifyOutcome`](crate::ClassifyOutcome) can replace it.
//!
//! # Order of checks
//!
//! signature or token header (`403`) → declared `Content-Length` over the limit (`413`) → body
//! read up to the limit (`413`) → signature over the body (`403`) → content type (`415`) → key
//! extraction and dispatch filter (`400`, or pass through unclaimed) → the pre-claim check, if
//! any ([`PreClaimCheck`]: claim, pass through unclaimed, or `200 deferred`) → claim in the
//! store — an override ([`OverrideTrigger`]) takes the key over — (duplicate: `409`, or `200`
//! with the webhook presets; store unavailable: `503`) → handler → keep or release the claim.
//!
//! # Keys and case
//!
//! GitHub and GitLab resolve `owner/repository` and `group/project` paths case-insensitively, so
//! [`IdempotencyKey::for_pull_request`](crate::IdempotencyKey::for_pull_request) lower-cases the
//! project (and the SHA), and the webhook extractors build their keys with it: a worker that keys
//! `Octo/Repo` and a webhook that carries `octo/repo` claim the same key.
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
//! use tower_idempotency::http::{
//!     DispatchRules, DispatchTarget, GitHubDispatchKey, GitHubSignature, HttpIdempotencyLayer, JsonResponses,
//! };
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
//! // An empty secret is refused here, with a clear error.
//! let signature = GitHubSignature::try_new(std::env::var("GITHUB_WEBHOOK_SECRET")?)?;
//! let app: Router = Router::new()
//!     .route("/webhooks/github", post(github))
//!     .route_layer(
//!         HttpIdempotencyLayer::new(store, GitHubDispatchKey::new().with_filter(rules))
//!             .with_verifier(signature)
//!             .with_responses(JsonResponses::webhook())
//!             .with_namespace("github-dispatch:"),
//!     );
//! # let _ = app; Ok(()) }
//! ```

mod body;
mod classify;
mod collect;
mod detach;
mod extract;
mod future;
mod layer;
mod pre_claim;
mod replay;
mod response;
mod service;
mod signature;
mod webhook;

pub use body::{ReplayBody, ResponseBody};
pub use classify::{Blocked, HttpClassifier};
pub use collect::HttpResponse;
pub use detach::{Handlers, RunToCompletion, RunToCompletionLayer};
pub use extract::{ExtractError, HeaderKey, HttpKeyExtractor};
pub use future::ResponseFuture;
pub use layer::{DEFAULT_BODY_LIMIT, HttpIdempotencyLayer};
pub use pre_claim::{PreClaim, PreClaimCheck, PreClaimFuture};
pub use replay::{IDEMPOTENCY_REPLAYED, Replay};
pub use response::{DEFAULT_RETRY_AFTER, IDEMPOTENCY_STATUS, JsonResponses, ProblemResponses, ShortCircuitResponse};
pub use service::HttpIdempotency;
pub use signature::{GitHubSignature, GitLabToken, NoVerification, SecretError, SignatureError, VerifyRequest};
pub use webhook::{
    AllEvents, DispatchFilter, DispatchRules, DispatchTarget, GitHubDispatchKey, GitLabDispatchKey, OverrideTrigger,
    WebhookEvent,
};
