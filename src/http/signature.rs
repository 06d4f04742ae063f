//! Webhook signature checks, run before anything touches the store.
//!
//! Without them, anyone who can reach the endpoint could send a forged delivery for a real
//! (repository, pull request, head SHA), take the claim, and so block the legitimate dispatch
//! that follows for the whole TTL. So the check runs first: a missing or wrong signature is
//! answered `401` and takes no claim. Secrets are captured when the verifier is built and
//! compared in constant time; `Debug` output never shows them.

use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderName;
use http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Checks that a request is authentic before its key is claimed.
///
/// Closures `Fn(&Parts, &Bytes) -> Result<(), E>` implement it, and `Option<V>` checks with `V`
/// when it is `Some` and accepts everything when it is `None` (e.g. a secret that is optional in
/// development):
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use tower_idempotency::http::{GitLabToken, VerifyRequest};
///
/// let (parts, ()) = Request::post("/hook").header("x-gitlab-token", "s3cret").body(()).unwrap().into_parts();
/// assert!(GitLabToken::new("s3cret").verify(&parts, &Bytes::new()).is_ok());
/// assert!(GitLabToken::new("other").verify(&parts, &Bytes::new()).is_err());
/// assert!(None::<GitLabToken>.verify(&parts, &Bytes::new()).is_ok());
/// ```
pub trait VerifyRequest {
    /// Why the request was refused; shown to the caller in the `401` response.
    type Error: Error + Send + Sync + 'static;

    /// Accepts or refuses the request, given its head and its complete body.
    fn verify(&self, parts: &Parts, body: &Bytes) -> Result<(), Self::Error>;

    /// Whether [`verify`](Self::verify) reads the body. When neither the verifier nor the key
    /// extractor does, the layer does not buffer the body. Default: `true`.
    fn needs_body(&self) -> bool {
        true
    }
}

impl<F, E> VerifyRequest for F
where
    F: Fn(&Parts, &Bytes) -> Result<(), E>,
    E: Error + Send + Sync + 'static,
{
    type Error = E;

    fn verify(&self, parts: &Parts, body: &Bytes) -> Result<(), E> {
        self(parts, body)
    }
}

impl<V: VerifyRequest> VerifyRequest for Option<V> {
    type Error = V::Error;

    fn verify(&self, parts: &Parts, body: &Bytes) -> Result<(), V::Error> {
        match self {
            Some(verifier) => verifier.verify(parts, body),
            None => Ok(()),
        }
    }

    fn needs_body(&self) -> bool {
        self.as_ref().is_some_and(VerifyRequest::needs_body)
    }
}

/// Accepts every request: the default of [`HttpIdempotencyLayer`](super::HttpIdempotencyLayer).
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::http::{NoVerification, VerifyRequest};
///
/// let (parts, ()) = http::Request::new(()).into_parts();
/// assert!(NoVerification.verify(&parts, &Bytes::new()).is_ok());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoVerification;

impl VerifyRequest for NoVerification {
    type Error = Infallible;

    fn verify(&self, _parts: &Parts, _body: &Bytes) -> Result<(), Infallible> {
        Ok(())
    }

    fn needs_body(&self) -> bool {
        false
    }
}

/// Why a signature check refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The signature header was absent (or repeated).
    #[error("missing `{header}` header")]
    Missing {
        /// The header that was expected.
        header: HeaderName,
    },
    /// The signature header was not of the expected form (e.g. `sha256=` and 64 hex digits).
    #[error("malformed `{header}` header")]
    Malformed {
        /// The offending header.
        header: HeaderName,
    },
    /// The signature or token did not match.
    #[error("`{header}` does not match")]
    Mismatch {
        /// The offending header.
        header: HeaderName,
    },
}

const X_HUB_SIGNATURE_256: HeaderName = HeaderName::from_static("x-hub-signature-256");
const X_GITLAB_TOKEN: HeaderName = HeaderName::from_static("x-gitlab-token");

/// The one value of `name`, or `Missing` when it is absent or repeated (a repeated signature
/// header is ambiguous: which one would GitHub have sent?).
fn single_header<'a>(parts: &'a Parts, name: &HeaderName) -> Result<&'a [u8], SignatureError> {
    let mut values = parts.headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Ok(value.as_bytes()),
        _ => Err(SignatureError::Missing { header: name.clone() }),
    }
}

/// GitHub's `X-Hub-Signature-256`: `sha256=` followed by the hex HMAC-SHA256 of the raw body,
/// keyed with the webhook secret. Compared in constant time.
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use tower_idempotency::http::{GitHubSignature, VerifyRequest};
///
/// // The example from GitHub's "Validating webhook deliveries".
/// let verifier = GitHubSignature::new("It's a Secret to Everybody");
/// let signed = Request::post("/webhooks/github")
///     .header("x-hub-signature-256", "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
///     .body(()).unwrap().into_parts().0;
/// assert!(verifier.verify(&signed, &Bytes::from_static(b"Hello, World!")).is_ok());
/// assert!(verifier.verify(&signed, &Bytes::from_static(b"Hello, World?")).is_err());
/// ```
#[derive(Clone)]
pub struct GitHubSignature {
    secret: Arc<[u8]>,
}

impl GitHubSignature {
    /// Checks signatures made with `secret`.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            secret: Arc::from(secret.as_ref()),
        }
    }
}

impl fmt::Debug for GitHubSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubSignature")
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl VerifyRequest for GitHubSignature {
    type Error = SignatureError;

    fn verify(&self, parts: &Parts, body: &Bytes) -> Result<(), SignatureError> {
        let value = single_header(parts, &X_HUB_SIGNATURE_256)?;
        let malformed = || SignatureError::Malformed {
            header: X_HUB_SIGNATURE_256,
        };
        let hex_digest = value.strip_prefix(b"sha256=").ok_or_else(malformed)?;
        let mut expected = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut expected).map_err(|_| malformed())?;
        // HMAC takes keys of any length, so this cannot fail; if it ever did, refuse.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.secret) else {
            return Err(SignatureError::Mismatch {
                header: X_HUB_SIGNATURE_256,
            });
        };
        mac.update(body);
        mac.verify_slice(&expected).map_err(|_| SignatureError::Mismatch {
            header: X_HUB_SIGNATURE_256,
        })
    }
}

/// GitLab's `X-Gitlab-Token`: the secret token itself, sent in plain text. Compared in constant
/// time (SHA-256 digests of both are compared, so not even the length leaks).
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use tower_idempotency::http::{GitLabToken, VerifyRequest};
///
/// let verifier = GitLabToken::new("s3cret");
/// let missing = Request::post("/webhooks/gitlab").body(()).unwrap().into_parts().0;
/// assert_eq!(
///     verifier.verify(&missing, &Bytes::new()).unwrap_err().to_string(),
///     "missing `x-gitlab-token` header"
/// );
/// ```
#[derive(Clone)]
pub struct GitLabToken {
    digest: [u8; 32],
}

impl GitLabToken {
    /// Accepts requests whose `X-Gitlab-Token` equals `token`.
    pub fn new(token: impl AsRef<[u8]>) -> Self {
        Self {
            digest: Sha256::digest(token.as_ref()).into(),
        }
    }
}

impl fmt::Debug for GitLabToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitLabToken").field("token", &"[redacted]").finish()
    }
}

impl VerifyRequest for GitLabToken {
    type Error = SignatureError;

    fn verify(&self, parts: &Parts, _body: &Bytes) -> Result<(), SignatureError> {
        let value = single_header(parts, &X_GITLAB_TOKEN)?;
        let given: [u8; 32] = Sha256::digest(value).into();
        if bool::from(given.ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch { header: X_GITLAB_TOKEN })
        }
    }

    fn needs_body(&self) -> bool {
        false
    }
}
