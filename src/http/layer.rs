//! The HTTP layer: core settings plus what HTTP needs (extractor, signature check, responses,
//! body limit).

use std::fmt;
use std::sync::Arc;

use tower::Layer;

use super::classify::HttpClassifier;
use super::detach::Handlers;
use super::pre_claim::PreClaimCheck;
use super::replay::Replay;
use super::response::JsonResponses;
use super::service::{Front, HttpIdempotency};
use super::signature::{GitHubSignature, GitLabToken, NoVerification, SecretError};
use super::webhook::{GitHubDispatchKey, GitLabDispatchKey};
use crate::IdempotencyLayer;
use crate::protocol::Protocol;
use crate::settings::{ConfigError, Settings, settings_builders};
use crate::store::IdempotencyStore;

/// Default limit on a buffered body: 25 MB, GitHub's cap on webhook payloads.
pub const DEFAULT_BODY_LIMIT: usize = 25 * 1024 * 1024;

/// The HTTP form of [`IdempotencyLayer`]: claims a key before the handler runs and answers
/// short-circuits with responses, so it drops into `axum::Router::layer` / `route_layer` with no
/// `HandleErrorLayer`. The wrapped service's error type is unchanged.
///
/// Required: a store and an [`HttpKeyExtractor`](super::HttpKeyExtractor). Defaults: no
/// signature check ([`NoVerification`]), [`HttpClassifier`] (release on any `4xx` but `409`,
/// and on [`Blocked`](super::Blocked)), [`JsonResponses`] (duplicate `409`), body limit
/// [`DEFAULT_BODY_LIMIT`], and the core defaults (TTL 300 s, no namespace, fail closed). The
/// core's `with_*` settings are all here too; [`build`](Self::build) checks them.
///
/// Any request body is taken, as with tower-http's layers: the wrapped service receives it as a
/// [`ReplayBody`](super::ReplayBody) (the body as sent, or the bytes the layer buffered), and
/// its response body comes back as a [`ResponseBody`](super::ResponseBody) (its own, or a
/// short-circuit's).
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::post, http::StatusCode};
/// use tower_idempotency::{MemoryStore, StoreErrorPolicy};
/// use tower_idempotency::http::{DispatchRules, GitHubDispatchKey, GitHubSignature, HttpIdempotencyLayer, JsonResponses};
///
/// let layer = HttpIdempotencyLayer::new(
///     MemoryStore::new(),
///     GitHubDispatchKey::new().with_filter(DispatchRules::new().allow("check_suite", Some("completed"), Some("success"))),
/// )
/// .with_verifier(GitHubSignature::new("webhook secret"))
/// .with_responses(JsonResponses::webhook())
/// .with_namespace("github-dispatch:")
/// .with_ttl(Duration::from_secs(300))
/// .with_store_error_policy(StoreErrorPolicy::FailClosed)
/// .build()
/// .expect("valid settings");
///
/// let app: Router = Router::new()
///     .route("/webhooks/github", post(|| async { StatusCode::ACCEPTED }))
///     .route_layer(layer);
/// # let _ = app;
/// ```
pub struct HttpIdempotencyLayer<X, V = NoVerification, C = HttpClassifier, R = JsonResponses> {
    settings: Settings,
    classifier: C,
    extractor: X,
    verifier: V,
    responses: R,
    body_limit: usize,
    pre_claim: Option<Arc<dyn PreClaimCheck>>,
    replay: Option<Arc<Replay>>,
    handlers: Option<Handlers>,
}

impl<X: Clone, V: Clone, C: Clone, R: Clone> Clone for HttpIdempotencyLayer<X, V, C, R> {
    fn clone(&self) -> Self {
        Self {
            settings: self.settings.clone(),
            classifier: self.classifier.clone(),
            extractor: self.extractor.clone(),
            verifier: self.verifier.clone(),
            responses: self.responses.clone(),
            body_limit: self.body_limit,
            pre_claim: self.pre_claim.clone(),
            replay: self.replay.clone(),
            handlers: self.handlers.clone(),
        }
    }
}

impl<X, V, C: fmt::Debug, R> fmt::Debug for HttpIdempotencyLayer<X, V, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpIdempotencyLayer")
            .field("settings", &self.settings)
            .field("classifier", &self.classifier)
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

impl<X> HttpIdempotencyLayer<X> {
    /// A layer that claims keys from `extractor` in `store`.
    pub fn new<St: IdempotencyStore>(store: St, extractor: X) -> Self {
        Self::from_core(IdempotencyLayer::new(store, ()), extractor)
    }

    /// A layer with the settings of `core` (store, TTL, namespace, store-error policy, shadow
    /// mode, renewal, coalescing, Sentry reporting) and keys from `extractor`. The core layer's
    /// own extractor and classifier are replaced: keys come from `extractor`, outcomes are
    /// classified by [`HttpClassifier`] (see [`with_classifier`](Self::with_classifier)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
    /// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer};
    ///
    /// let core = IdempotencyLayer::new(MemoryStore::new(), |_: &()| Ok::<Option<IdempotencyKey>, KeyError>(None))
    ///     .with_renewal(Duration::from_secs(100))
    ///     .with_report_interval(Duration::from_secs(60));
    /// let layer = HttpIdempotencyLayer::from_core(core, HeaderKey::idempotency_key());
    /// assert_eq!(layer.ttl(), Duration::from_secs(300));
    /// ```
    pub fn from_core<Y, C0>(core: IdempotencyLayer<Y, C0>, extractor: X) -> Self {
        Self {
            settings: core.settings,
            classifier: HttpClassifier::new(),
            extractor,
            verifier: NoVerification,
            responses: JsonResponses::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            pre_claim: None,
            replay: None,
            handlers: Some(Handlers::default()),
        }
    }
}

impl HttpIdempotencyLayer<GitHubDispatchKey, GitHubSignature> {
    /// The GitHub webhook preset: [`GitHubDispatchKey`] — which **dispatches nothing** until it
    /// is given dispatch rules (`with_extractor(GitHubDispatchKey::new().with_filter(rules))`),
    /// so no event takes a claim by accident — signatures checked with `secret`, duplicates
    /// answered `200 OK` ([`JsonResponses::webhook`]). An empty secret (an HMAC anyone can
    /// compute) is refused.
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::http::{DispatchRules, GitHubDispatchKey, HttpIdempotencyLayer};
    ///
    /// let rules = DispatchRules::new().allow("check_suite", Some("completed"), Some("success"));
    /// let layer = HttpIdempotencyLayer::github_webhook(MemoryStore::new(), "webhook secret")?
    ///     .with_extractor(GitHubDispatchKey::new().with_filter(rules))
    ///     .with_namespace("github-dispatch:");
    /// assert_eq!(layer.namespace(), "github-dispatch:");
    /// assert!(HttpIdempotencyLayer::github_webhook(MemoryStore::new(), "").is_err());
    /// # Ok::<(), tower_idempotency::http::SecretError>(())
    /// ```
    pub fn github_webhook<St: IdempotencyStore>(store: St, secret: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        Ok(HttpIdempotencyLayer::new(store, GitHubDispatchKey::new())
            .with_verifier(GitHubSignature::try_new(secret)?)
            .with_responses(JsonResponses::webhook()))
    }
}

impl HttpIdempotencyLayer<GitLabDispatchKey, GitLabToken> {
    /// The GitLab webhook preset: [`GitLabDispatchKey`] (dispatches nothing until given rules,
    /// like the GitHub preset), `X-Gitlab-Token` checked against `token` from the headers alone,
    /// duplicates answered `200 OK` ([`JsonResponses::webhook`]). An empty token is refused.
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::http::HttpIdempotencyLayer;
    ///
    /// let layer = HttpIdempotencyLayer::gitlab_webhook(MemoryStore::new(), "webhook token")?;
    /// assert!(HttpIdempotencyLayer::gitlab_webhook(MemoryStore::new(), "").is_err());
    /// # let _ = layer;
    /// # Ok::<(), tower_idempotency::http::SecretError>(())
    /// ```
    pub fn gitlab_webhook<St: IdempotencyStore>(store: St, token: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        Ok(HttpIdempotencyLayer::new(store, GitLabDispatchKey::new())
            .with_verifier(GitLabToken::try_new(token)?)
            .with_responses(JsonResponses::webhook()))
    }
}

impl<X, V, C, R> HttpIdempotencyLayer<X, V, C, R> {
    /// Replaces the key extractor.
    pub fn with_extractor<X2>(self, extractor: X2) -> HttpIdempotencyLayer<X2, V, C, R> {
        HttpIdempotencyLayer {
            settings: self.settings,
            classifier: self.classifier,
            extractor,
            verifier: self.verifier,
            responses: self.responses,
            body_limit: self.body_limit,
            pre_claim: self.pre_claim,
            replay: self.replay,
            handlers: self.handlers,
        }
    }

    /// Checks every request with `verifier` before anything else — from the headers before the
    /// body is read, then with the body (a refused request is answered `403` and takes no claim).
    pub fn with_verifier<V2>(self, verifier: V2) -> HttpIdempotencyLayer<X, V2, C, R> {
        HttpIdempotencyLayer {
            settings: self.settings,
            classifier: self.classifier,
            extractor: self.extractor,
            verifier,
            responses: self.responses,
            body_limit: self.body_limit,
            pre_claim: self.pre_claim,
            replay: self.replay,
            handlers: self.handlers,
        }
    }

    /// Replaces the short-circuit responses.
    pub fn with_responses<R2>(self, responses: R2) -> HttpIdempotencyLayer<X, V, C, R2> {
        HttpIdempotencyLayer {
            settings: self.settings,
            classifier: self.classifier,
            extractor: self.extractor,
            verifier: self.verifier,
            responses,
            body_limit: self.body_limit,
            pre_claim: self.pre_claim,
            replay: self.replay,
            handlers: self.handlers,
        }
    }

    /// Replaces the outcome classifier, which decides keep or release from the handler's
    /// response. Any [`ClassifyOutcome<Response<B>, E>`](crate::ClassifyOutcome) fits, closures
    /// included.
    pub fn with_classifier<C2>(self, classifier: C2) -> HttpIdempotencyLayer<X, V, C2, R> {
        HttpIdempotencyLayer {
            settings: self.settings,
            classifier,
            extractor: self.extractor,
            verifier: self.verifier,
            responses: self.responses,
            body_limit: self.body_limit,
            pre_claim: self.pre_claim,
            replay: self.replay,
            handlers: self.handlers,
        }
    }

    /// Runs `check` after the key is extracted and **before anything is claimed**: it decides
    /// claim, ignore (pass through unclaimed) or defer (answer
    /// [`deferred`](super::ShortCircuitResponse::deferred), take no claim). For checks that need
    /// I/O — "are all of this commit's checks complete and green?" — so a delivery that defers
    /// never holds the key while a concurrent, ready delivery for the same key arrives.
    ///
    /// ```
    /// use axum::{Router, routing::post, http::StatusCode};
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::http::{DispatchRules, DispatchTarget, GitHubDispatchKey, HttpIdempotencyLayer, JsonResponses, PreClaim};
    ///
    /// async fn all_checks_green(_target: Option<DispatchTarget>) -> bool {
    ///     true // e.g. GET /repos/{owner}/{repo}/commits/{sha}/check-runs
    /// }
    ///
    /// let rules = DispatchRules::new().allow("check_suite", Some("completed"), Some("success"));
    /// let layer = HttpIdempotencyLayer::new(MemoryStore::new(), GitHubDispatchKey::new().with_filter(rules))
    ///     .with_responses(JsonResponses::webhook())
    ///     .with_pre_claim(|parts: &http::request::Parts, _key: &tower_idempotency::IdempotencyKey| {
    ///         let target = parts.extensions.get::<DispatchTarget>().cloned();
    ///         async move {
    ///             if all_checks_green(target).await { PreClaim::Claim } else { PreClaim::Defer }
    ///         }
    ///     });
    /// let app: Router = Router::new()
    ///     .route("/webhooks/github", post(|| async { StatusCode::ACCEPTED }))
    ///     .route_layer(layer);
    /// # let _ = app;
    /// ```
    pub fn with_pre_claim(mut self, check: impl PreClaimCheck) -> Self {
        self.pre_claim = Some(Arc::new(check));
        self
    }

    /// Replays the stored response of a completed request to its duplicates, and answers the
    /// error cases of the IETF `Idempotency-Key` draft (`409` in flight, `422` for another
    /// payload under the same key) as `application/problem+json`; see [`Replay`]. The body is
    /// read (up to the body limit) to fingerprint the request. For HTTP APIs, not webhook
    /// receivers (whose senders want `200` for a duplicate, not a replay).
    ///
    /// ```
    /// use axum::{Router, http::{Request, StatusCode}, routing::post};
    /// use tower::ServiceExt;
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, Replay};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let app = Router::new()
    ///     .route("/payments", post(|| async { (StatusCode::CREATED, r#"{"id":"p1"}"#) }))
    ///     .route_layer(HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key()).with_replay(Replay::new()));
    /// let req = |body: &'static str| Request::post("/payments").header("idempotency-key", "k1").body(axum::body::Body::from(body)).unwrap();
    /// let first = app.clone().oneshot(req("{\"amount\":1}")).await.unwrap();
    /// assert_eq!(first.status(), StatusCode::CREATED);
    /// let retry = app.clone().oneshot(req("{\"amount\":1}")).await.unwrap();
    /// assert_eq!(retry.status(), StatusCode::CREATED);
    /// assert_eq!(retry.headers()["idempotency-replayed"], "true");
    /// let other = app.oneshot(req("{\"amount\":2}")).await.unwrap();
    /// assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    /// # }
    /// ```
    pub fn with_replay(mut self, replay: Replay) -> Self {
        self.settings.wait = replay.wait();
        self.replay = Some(Arc::new(replay));
        self
    }

    /// Whether a claimed request's handler runs to completion in its own Tokio task (default
    /// `true`): a client that disconnects does not cancel it, so its claim is settled and its
    /// outcome recorded (with [`with_replay`](Self::with_replay), the retry gets the stored
    /// response). `false`: the handler runs in the caller's future and is cancelled with it
    /// (its claim is then kept until the TTL). Requests that take no claim are never moved.
    pub fn with_run_to_completion(mut self, run_to_completion: bool) -> Self {
        self.handlers = run_to_completion.then(Handlers::default);
        self
    }

    /// Caps how many claimed handlers run at once (in their own tasks); the others wait for a
    /// slot. Turns [`with_run_to_completion`](Self::with_run_to_completion) on.
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.handlers = Some(Handlers::with_limit(Some(max)));
        self
    }

    /// The claimed handlers running in their own tasks, shared by every service this layer
    /// makes: a graceful shutdown waits for them with [`Handlers::wait`]. `None` when
    /// run-to-completion is off.
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key()).with_max_in_flight(256);
    /// let handlers = layer.handlers().expect("on by default");
    /// // … serve with `layer`; on shutdown, after the server stopped accepting:
    /// handlers.wait().await;
    /// # }
    /// ```
    pub fn handlers(&self) -> Option<Handlers> {
        self.handlers.clone()
    }

    /// The largest body buffered, in bytes (default [`DEFAULT_BODY_LIMIT`]); a larger one is
    /// answered `413`. Applies when the extractor or the verifier reads the body.
    pub fn with_body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    settings_builders!();

    /// Checks the settings (see [`IdempotencyLayer::build`]) and refuses those that cannot work.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer};
    ///
    /// let layer = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key())
    ///     .with_ttl(Duration::ZERO);
    /// assert!(layer.build().is_err());
    /// ```
    pub fn build(self) -> Result<Self, ConfigError> {
        self.settings.validate()?;
        Ok(self)
    }

    /// The body limit in bytes.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }
}

impl<S, X: Clone, V: Clone, C: Clone, R: Clone> Layer<S> for HttpIdempotencyLayer<X, V, C, R> {
    type Service = HttpIdempotency<S, X, V, C, R>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpIdempotency::from_parts(
            inner,
            Protocol::new(self.settings.clone()),
            self.classifier.clone(),
            Arc::new(Front {
                extractor: self.extractor.clone(),
                verifier: self.verifier.clone(),
                responses: self.responses.clone(),
                body_limit: self.body_limit,
                pre_claim: self.pre_claim.clone(),
                replay: self.replay.clone(),
                handlers: self.handlers.clone(),
            }),
        )
    }
}
