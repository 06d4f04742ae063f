//! The layer: configuration captured once, applied to every wrapped service.

use std::fmt;

use tower::Layer;

use crate::classify::{DefaultClassifier, StoredOutcome};
use crate::extract::{WithOverride, WithOwner, WithRunOnceMore};
use crate::protocol::Protocol;
use crate::service::Idempotency;
use crate::settings::{ConfigError, Settings, settings_builders};
use crate::store::IdempotencyStore;

/// Claims a key in a shared store before the inner service runs; short-circuits duplicates;
/// releases the claim when the outcome says the job was blocked.
///
/// Required parameters go in [`new`](Self::new); everything else has a default and a `with_*`
/// method: TTL 300 s, no namespace, fail closed, keep the claim on success and on error, no
/// shadow mode, no renewal (maximum hold 12 × TTL when renewal is on), no coalescing, a fresh
/// owner token per call. [`build`](Self::build) checks the settings and refuses those that
/// cannot work; a layer used without it answers every call with
/// [`IdempotencyError::Misconfigured`](crate::IdempotencyError::Misconfigured) instead.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tower_idempotency::{IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
///
/// #[derive(Clone)]
/// struct Job { project: String, pr: u64, sha: String }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &Job| -> Result<_, KeyError> {
///     IdempotencyKey::for_pull_request(&job.project, job.pr, &job.sha).map(Some)
/// })
/// .with_namespace("review:")
/// .with_ttl(std::time::Duration::from_secs(600))
/// .build()
/// .expect("valid settings");
///
/// let mut svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|_job: Job| async { Ok::<_, Infallible>("dispatched") });
///
/// let job = Job { project: "o/r".into(), pr: 1, sha: "abcdef1".into() };
/// let first = svc.ready().await.unwrap().call(job.clone()).await;
/// assert_eq!(first.unwrap(), "dispatched");
/// let second = svc.ready().await.unwrap().call(job).await;
/// assert!(matches!(second, Err(IdempotencyError::Duplicate { .. })));
/// # }
/// ```
pub struct IdempotencyLayer<X, C = DefaultClassifier> {
    pub(crate) settings: Settings,
    extractor: X,
    classifier: C,
}

impl<X: Clone, C: Clone> Clone for IdempotencyLayer<X, C> {
    fn clone(&self) -> Self {
        Self {
            settings: self.settings.clone(),
            extractor: self.extractor.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<X, C: fmt::Debug> fmt::Debug for IdempotencyLayer<X, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("settings", &self.settings)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl<X> IdempotencyLayer<X> {
    /// A layer that claims keys from `extractor` in `store`.
    pub fn new<St: IdempotencyStore>(store: St, extractor: X) -> Self {
        Self {
            settings: Settings::new(store),
            extractor,
            classifier: DefaultClassifier::new(),
        }
    }
}

impl<X, C> IdempotencyLayer<X, C> {
    settings_builders!();

    /// Checks the settings: a TTL of zero or beyond what the store can express, a renewal
    /// interval of zero or not shorter than the TTL, and a zero maximum hold are refused, with
    /// a message that says what to change.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{ConfigError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
    ///
    /// let layer = || IdempotencyLayer::new(MemoryStore::new(), |job: &String| -> Result<_, KeyError> {
    ///     IdempotencyKey::new(job).map(Some)
    /// });
    /// assert!(layer().with_ttl(Duration::from_secs(30)).with_renewal(Duration::from_secs(10)).build().is_ok());
    /// let err = layer().with_ttl(Duration::from_secs(30)).with_renewal(Duration::from_secs(30)).build().unwrap_err();
    /// assert!(matches!(err, ConfigError::RenewalNotBelowTtl { .. }));
    /// ```
    pub fn build(self) -> Result<Self, ConfigError> {
        self.settings.validate()?;
        Ok(self)
    }

    /// Replaces the outcome classifier, which decides keep or release after the inner service
    /// answers.
    pub fn with_classifier<C2>(self, classifier: C2) -> IdempotencyLayer<X, C2> {
        IdempotencyLayer {
            settings: self.settings,
            extractor: self.extractor,
            classifier,
        }
    }

    /// Stores an outcome with the completed record of every kept result: `store` returns the
    /// bytes (or `None` to store nothing), and a later duplicate receives them in
    /// [`IdempotencyError::Duplicate`](crate::IdempotencyError::Duplicate)'s record. Outcomes
    /// over [`with_max_outcome_size`](Self::with_max_outcome_size) are not stored.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{Layer, ServiceExt};
    /// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, RecordState};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &String| -> Result<_, KeyError> {
    ///     IdempotencyKey::new(job).map(Some)
    /// })
    /// .with_stored_outcome(|r: &Result<u64, Infallible>| r.as_ref().ok().map(|id| id.to_string().into_bytes()));
    /// let svc = layer.layer(tower::service_fn(|_: String| async { Ok::<_, Infallible>(42u64) }));
    /// assert_eq!(svc.clone().oneshot("job-1".to_owned()).await.unwrap(), 42);
    /// let duplicate = svc.oneshot("job-1".to_owned()).await.unwrap_err();
    /// assert_eq!(duplicate.record().map(|r| r.state()), Some(&RecordState::Completed { outcome: Some(b"42".to_vec()) }));
    /// # }
    /// ```
    pub fn with_stored_outcome<F>(self, store: F) -> IdempotencyLayer<X, StoredOutcome<C, F>> {
        IdempotencyLayer {
            settings: self.settings,
            extractor: self.extractor,
            classifier: StoredOutcome::new(self.classifier, store),
        }
    }

    /// Replaces the key extractor.
    pub fn with_extractor<X2>(self, extractor: X2) -> IdempotencyLayer<X2, C> {
        IdempotencyLayer {
            settings: self.settings,
            extractor,
            classifier: self.classifier,
        }
    }

    /// Claims under a stable owner identity per job, from `owner` (e.g. a stream message id),
    /// instead of a fresh token per call: a retry of the same job then finds its own claim and
    /// dispatches, while other jobs with the same key are duplicates. See [`WithOwner`].
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
    ///
    /// struct Message { id: String, key: String }
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new(), |m: &Message| -> Result<_, KeyError> {
    ///     IdempotencyKey::new(&m.key).map(Some)
    /// })
    /// .with_owner(|m: &Message| Some(m.id.clone()));
    /// # let _ = layer;
    /// ```
    pub fn with_owner<F>(self, owner: F) -> IdempotencyLayer<WithOwner<X, F>, C> {
        IdempotencyLayer {
            settings: self.settings,
            extractor: WithOwner::new(self.extractor, owner),
            classifier: self.classifier,
        }
    }

    /// The **run-once-more** strategy (BullMQ's `keepLastIfActive`): a trigger that arrives
    /// while the original is **in progress** records itself as the key's follow-up (a newer
    /// one replaces an older one) and is answered duplicate; when the run settles, the process
    /// that ran it runs the follow-up once — with the latest trigger's request, decoded from
    /// the store, whichever process recorded it — before its own call returns. Triggers during
    /// the follow-up run make the next follow-up. `encode` returns the bytes of a request
    /// (`None`: this request records nothing); `decode` turns them back. Needs a store with
    /// follow-ups (both of this crate's; `GETDEL` needs Redis ≥ 6.2).
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{Layer, ServiceExt};
    /// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
    ///
    /// #[derive(Clone)]
    /// struct Trigger { pr: &'static str, payload: String }
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new(), |t: &Trigger| -> Result<_, KeyError> {
    ///     IdempotencyKey::new(t.pr).map(Some)
    /// })
    /// .with_run_once_more(
    ///     |t: &Trigger| Some(t.payload.clone().into_bytes()),
    ///     |bytes: &[u8]| Some(Trigger { pr: "o/r:1", payload: String::from_utf8_lossy(bytes).into_owned() }),
    /// );
    /// # let _ = layer;
    /// ```
    pub fn with_run_once_more<Req, E>(
        self,
        encode: E,
        decode: impl Fn(&[u8]) -> Option<Req> + Send + Sync + 'static,
    ) -> IdempotencyLayer<WithRunOnceMore<X, E, Req>, C> {
        IdempotencyLayer {
            settings: self.settings,
            extractor: WithRunOnceMore::new(self.extractor, encode, decode),
            classifier: self.classifier,
        }
    }

    /// Marks human overrides: `takeover` returns the override's own identity (e.g. the
    /// delivery id of a person's review request) for requests that are overrides. An override
    /// takes its key over even while an automated claim holds it (the previous holder's release
    /// and renewal then fail their token check; later automated triggers are duplicates), and
    /// is deduplicated by its identity: the same override twice dispatches once. An override of
    /// a free key leaves it free, so the automated trigger still dispatches once.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{Layer, ServiceExt};
    /// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
    ///
    /// #[derive(Clone)]
    /// struct Trigger { key: &'static str, review_request: Option<&'static str> }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new(), |t: &Trigger| -> Result<_, KeyError> {
    ///     IdempotencyKey::new(t.key).map(Some)
    /// })
    /// .with_override(|t: &Trigger| t.review_request.map(str::to_owned));
    /// let svc = layer.layer(tower::service_fn(|_: Trigger| async { Ok::<_, Infallible>(()) }));
    /// let automated = Trigger { key: "o/r:1:abcdef1", review_request: None };
    /// let person = Trigger { key: "o/r:1:abcdef1", review_request: Some("delivery-1") };
    /// assert!(svc.clone().oneshot(automated.clone()).await.is_ok());
    /// assert!(svc.clone().oneshot(person.clone()).await.is_ok(), "a person gets a fresh run");
    /// assert!(svc.clone().oneshot(person).await.unwrap_err().is_duplicate(), "once per request");
    /// assert!(svc.oneshot(automated).await.unwrap_err().is_duplicate());
    /// # }
    /// ```
    pub fn with_override<F>(self, takeover: F) -> IdempotencyLayer<WithOverride<X, F>, C> {
        IdempotencyLayer {
            settings: self.settings,
            extractor: WithOverride::new(self.extractor, takeover),
            classifier: self.classifier,
        }
    }
}

impl<S, X: Clone, C: Clone> Layer<S> for IdempotencyLayer<X, C> {
    type Service = Idempotency<S, X, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_parts(
            inner,
            Protocol::new(self.settings.clone()),
            self.extractor.clone(),
            self.classifier.clone(),
        )
    }
}
