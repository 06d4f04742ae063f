//! The bodies on either side of the HTTP layer, so it takes any [`http_body::Body`] the way
//! tower-http's middleware does.
//!
//! The layer reads a request's body only when its extractor or signature check needs it; then
//! the handler must still receive the identical bytes, from the buffer. It also answers some
//! requests itself (duplicates, refusals), with bodies of its own. Both are the sum of two body
//! types, [`http_body_util::Either`]: the left side is what came from outside the layer (the
//! caller's body, the handler's response body), the right side is the layer's own bytes.
//!
//! Both implement [`Body<Data = Bytes>`](http_body::Body) with a boxed error whenever the left
//! side is a `Body<Data = Bytes>` whose error converts into one, which is what axum's routes,
//! hyper and tower-http's middleware take.

use bytes::Bytes;
use http_body_util::{Either, Full};

/// The request body the inner service receives: the caller's body, unread
/// ([`Either::Left`]), when neither the extractor nor the signature check reads it; else the
/// bytes the layer buffered ([`Either::Right`]), identical to what the caller sent (trailers,
/// if any, are not replayed).
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{BodyExt, Full};
/// use tower::{Layer, ServiceExt};
/// use tower_idempotency::MemoryStore;
/// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, ReplayBody};
///
/// type BoxError = Box<dyn std::error::Error + Send + Sync>;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
/// let layer = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key());
/// // The handler reads whichever side it is given, as one `Body<Data = Bytes>`.
/// let echo = layer.layer(tower::service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
///     let bytes = req.into_body().collect().await?.to_bytes();
///     Ok::<_, BoxError>(Response::new(Full::new(bytes)))
/// }));
/// let req = Request::post("/").header("idempotency-key", "k1").body(Full::new(Bytes::from_static(b"hello")))?;
/// let response = echo.oneshot(req).await?;
/// assert_eq!(response.into_body().collect().await?.to_bytes(), "hello");
/// # Ok(()) }
/// ```
pub type ReplayBody<B> = Either<B, Full<Bytes>>;

/// The response body the layered service answers with: the inner service's
/// ([`Either::Left`]), or the body of one of the layer's own answers ([`Either::Right`], built
/// by a [`ShortCircuitResponse`](super::ShortCircuitResponse)).
pub type ResponseBody<B> = Either<B, Full<Bytes>>;
