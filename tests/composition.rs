//! The layer composes with the rest of tower: outside `Buffer` and `Timeout`, inside a
//! `BoxCloneService<_, _, BoxError>`, and its error shows the inner cause through `Display`.

use std::time::Duration;

use tower::util::BoxCloneService;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};

fn key_of(req: &String) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(req).map(Some)
}

type KeyOf = fn(&String) -> Result<Option<IdempotencyKey>, KeyError>;

fn layer() -> IdempotencyLayer<KeyOf> {
    IdempotencyLayer::new(MemoryStore::new(), key_of as KeyOf)
        .build()
        .expect("valid settings")
}

#[test]
fn idempotency_error_of_a_box_error_is_an_error_that_shows_its_cause() {
    fn is_std_error<E: std::error::Error + Send + Sync + 'static>(_: &E) {}
    let err: IdempotencyError<BoxError> = IdempotencyError::Inner("review service timed out".into());
    is_std_error(&err);
    assert_eq!(err.to_string(), "inner service failed: review service timed out");
    let boxed: BoxError = err.into();
    assert!(boxed.to_string().contains("review service timed out"));
}

#[tokio::test]
async fn layer_wraps_buffer_and_timeout_whose_errors_are_box_errors() {
    let inner = ServiceBuilder::new()
        .buffer(8)
        .timeout(Duration::from_millis(50))
        .service_fn(|job: String| async move {
            if job == "slow" {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok::<_, BoxError>(job)
        });
    let svc = layer().layer(inner);
    assert_eq!(svc.clone().oneshot("a".into()).await.unwrap(), "a");
    assert!(svc.clone().oneshot("a".into()).await.unwrap_err().is_duplicate());
    let timed_out = svc.oneshot("slow".into()).await.unwrap_err();
    assert!(matches!(timed_out, IdempotencyError::Inner(_)));
    assert!(
        format!("{timed_out}").contains("request timed out"),
        "`%e` shows the cause: {timed_out}"
    );
}

#[tokio::test]
async fn layer_sits_inside_buffer_and_timeout_and_a_box_clone_service() {
    let svc = ServiceBuilder::new()
        .buffer(8)
        .timeout(Duration::from_secs(5))
        .layer(layer())
        .service_fn(|job: String| async move { Ok::<_, std::convert::Infallible>(job) });
    let boxed: BoxCloneService<String, String, BoxError> = BoxCloneService::new(svc);
    assert_eq!(boxed.clone().oneshot("b".into()).await.unwrap(), "b");
    let err = boxed.oneshot("b".into()).await.unwrap_err();
    let err = err
        .downcast_ref::<IdempotencyError<std::convert::Infallible>>()
        .expect("the layer's error survives boxing");
    assert!(err.is_duplicate());
}
