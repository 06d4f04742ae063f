//! Webhook signature checks, run before anything touches the store — and before the body is read.
//!
//! Without them, anyone who can reach the endpoint could send a forged delivery for a real
//! (repository, pull request, head SHA), take the claim, and so block the legitimate dispatch
//! that follows for the whole TTL. So the check runs first: a missing or wrong signature is
//! answered `403 Forbidden` and takes no claim. Secrets are captured when the verifier is built
//! and compared in constant time; `Debug` output never shows them.
//!
//! **Head first.** A verifier sees the request head before the body is buffered
//! ([`VerifyRequest::verify_head`]): a request without a well-formed signature header, or with a
//! wrong GitLab token, is refused without reading a byte of its body, so an unauthenticated
//! client cannot make the server buffer up to the body limit.
//!
//! **Empty secrets are refused.** An HMAC keyed with nothing can be computed by anyone, and an
//! empty token is matched by an empty header: [`GitHubSignature::try_new`] and
//! [`GitLabToken::try_new`] return [`SecretError`] for them. Several secrets can be accepted at
//! once, to rotate one without downtime ([`GitHubSignature::try_from_secrets`],
//! [`GitLabToken::try_from_tokens`]).
//!
//! **Why `403`, not `401`.** `401 Unauthorized` must carry a `WWW-Authenticate` challenge naming
//! an HTTP authentication scheme the client can answer through `Authorization` (RFC 9110,
//! §15.5.2). Webhook signatures are no such scheme: there is nothing a challenge could ask for.
//! `403 Forbidden` says what happened: the server understood the request and refuses it, and a
//! retry with the same credentials will not help (§15.5.4).

use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderName;
use http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

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
/// assert!(GitLabToken::try_new("s3cret")?.verify(&parts, &Bytes::new()).is_ok());
/// assert!(GitLabToken::try_new("other")?.verify(&parts, &Bytes::new()).is_err());
/// assert!(None::<GitLabToken>.verify(&parts, &Bytes::new()).is_ok());
/// # Ok::<(), tower_idempotency::http::SecretError>(())
/// ```
pub trait VerifyRequest {
    /// Why the request was refused; shown to the caller in the `403` response.
    type Error: Error + Send + Sync + 'static;

    /// Accepts or refuses the request, given its head and its complete body.
    fn verify(&self, parts: &Parts, body: &Bytes) -> Result<(), Self::Error>;

    /// Refuses what can be refused from the head alone, **before the body is read**: a missing or
    /// malformed signature header, a wrong token. A request it accepts is then checked with
    /// [`verify`](Self::verify) once its body is buffered. Default: accept.
    ///
    /// ```
    /// use http::Request;
    /// use tower_idempotency::http::{GitHubSignature, VerifyRequest};
    ///
    /// let unsigned = Request::post("/hook").body(()).unwrap().into_parts().0;
    /// let verifier = GitHubSignature::try_new("webhook secret")?;
    /// assert_eq!(verifier.verify_head(&unsigned).unwrap_err().to_string(), "missing `x-hub-signature-256` header");
    /// # Ok::<(), tower_idempotency::http::SecretError>(())
    /// ```
    fn verify_head(&self, parts: &Parts) -> Result<(), Self::Error> {
        let _ = parts;
        Ok(())
    }

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

    fn verify_head(&self, parts: &Parts) -> Result<(), V::Error> {
        match self {
            Some(verifier) => verifier.verify_head(parts),
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
    /// The verifier was built with no usable secret (see [`GitHubSignature::new`]): every
    /// request is refused.
    #[error("no webhook secret is configured for `{header}`: every delivery is refused")]
    NoSecret {
        /// The header that would have been checked.
        header: HeaderName,
    },
}

/// Why a verifier could not be built from the secrets given.
///
/// ```
/// use tower_idempotency::http::{GitHubSignature, GitLabToken, SecretError};
///
/// assert_eq!(GitHubSignature::try_new("").unwrap_err(), SecretError::Empty { index: 0 });
/// assert_eq!(GitLabToken::try_from_tokens(Vec::<String>::new()).unwrap_err(), SecretError::None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// A secret (or token) was empty: an HMAC keyed with nothing can be computed by anyone, and
    /// an empty token is matched by an empty header.
    #[error("webhook secret #{index} is empty: anyone could sign (or send) a matching delivery")]
    Empty {
        /// Position of the empty secret in the list given (0 for a single secret).
        index: usize,
    },
    /// No secret was given at all.
    #[error("no webhook secret given: at least one non-empty secret is needed")]
    None,
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

/// Every secret of `secrets`, checked: at least one, none empty.
fn checked_secrets<T: AsRef<[u8]>>(secrets: impl IntoIterator<Item = T>) -> Result<Vec<Vec<u8>>, SecretError> {
    let mut checked = Vec::new();
    for (index, secret) in secrets.into_iter().enumerate() {
        let secret = secret.as_ref();
        if secret.is_empty() {
            return Err(SecretError::Empty { index });
        }
        checked.push(secret.to_vec());
    }
    if checked.is_empty() {
        return Err(SecretError::None);
    }
    Ok(checked)
}

/// GitHub's `X-Hub-Signature-256`: `sha256=` followed by the hex HMAC-SHA256 of the raw body,
/// keyed with the webhook secret. Compared in constant time.
///
/// The head is checked before the body is read ([`VerifyRequest::verify_head`]): a missing,
/// repeated or malformed header is refused at once.
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use tower_idempotency::http::{GitHubSignature, VerifyRequest};
///
/// // The example from GitHub's "Validating webhook deliveries".
/// let verifier = GitHubSignature::try_new("It's a Secret to Everybody")?;
/// let signed = Request::post("/webhooks/github")
///     .header("x-hub-signature-256", "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
///     .body(()).unwrap().into_parts().0;
/// assert!(verifier.verify(&signed, &Bytes::from_static(b"Hello, World!")).is_ok());
/// assert!(verifier.verify(&signed, &Bytes::from_static(b"Hello, World?")).is_err());
///
/// // Rotation: the old and the new secret are both accepted until the old one is retired.
/// let rotating = GitHubSignature::try_from_secrets(["new secret", "It's a Secret to Everybody"])?;
/// assert!(rotating.verify(&signed, &Bytes::from_static(b"Hello, World!")).is_ok());
/// # Ok::<(), tower_idempotency::http::SecretError>(())
/// ```
#[derive(Clone)]
pub struct GitHubSignature {
    secrets: Arc<[Vec<u8>]>,
}

impl GitHubSignature {
    /// Checks signatures made with `secret`; an empty secret is refused.
    ///
    /// ```
    /// use tower_idempotency::http::{GitHubSignature, SecretError};
    ///
    /// // E.g. from `GITHUB_WEBHOOK_SECRET`, which may be set but empty.
    /// let secret = std::env::var("EXAMPLE_UNSET_SECRET").unwrap_or_default();
    /// assert_eq!(GitHubSignature::try_new(secret).unwrap_err(), SecretError::Empty { index: 0 });
    /// assert!(GitHubSignature::try_new("s3cret").is_ok());
    /// ```
    pub fn try_new(secret: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        Self::try_from_secrets([secret])
    }

    /// Accepts signatures made with any of `secrets` (to rotate a secret: configure the new and
    /// the old one, then drop the old one). Refused: no secret at all, or an empty one.
    ///
    /// ```
    /// use tower_idempotency::http::{GitHubSignature, SecretError};
    ///
    /// let rotating = GitHubSignature::try_from_secrets(["new secret", "old secret"])?;
    /// assert_eq!(rotating.secret_count(), 2);
    /// assert_eq!(
    ///     GitHubSignature::try_from_secrets(Vec::<String>::new()).unwrap_err(),
    ///     SecretError::None
    /// );
    /// # Ok::<(), SecretError>(())
    /// ```
    pub fn try_from_secrets<T: AsRef<[u8]>>(secrets: impl IntoIterator<Item = T>) -> Result<Self, SecretError> {
        Ok(Self {
            secrets: Arc::from(checked_secrets(secrets)?),
        })
    }

    /// Checks signatures made with `secret`, without a fallible constructor. Prefer
    /// [`try_new`](Self::try_new): an **empty** secret here cannot be refused at construction, so
    /// it is logged at `error` and the verifier refuses every request (fail closed) with
    /// [`SignatureError::NoSecret`]; it never accepts an HMAC keyed with nothing.
    ///
    /// ```
    /// use http::Request;
    /// use tower_idempotency::http::{GitHubSignature, VerifyRequest};
    ///
    /// let refuses_all = GitHubSignature::new("");
    /// let parts = Request::post("/").header("x-hub-signature-256", format!("sha256={}", "0".repeat(64))).body(()).unwrap().into_parts().0;
    /// assert!(refuses_all.verify_head(&parts).is_err());
    /// ```
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self::try_new(secret).unwrap_or_else(|error| {
            tracing::error!(error = %error, "GitHub webhook secret refused: every delivery will be refused");
            Self {
                secrets: Arc::from(Vec::new()),
            }
        })
    }

    /// How many secrets are accepted.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }
}

impl fmt::Debug for GitHubSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubSignature")
            .field("secrets", &format_args!("[{} redacted]", self.secrets.len()))
            .finish()
    }
}

impl GitHubSignature {
    /// The digest the signature header claims, or why there is none.
    fn claimed_digest(&self, parts: &Parts) -> Result<[u8; 32], SignatureError> {
        if self.secrets.is_empty() {
            return Err(SignatureError::NoSecret {
                header: X_HUB_SIGNATURE_256,
            });
        }
        let value = single_header(parts, &X_HUB_SIGNATURE_256)?;
        let malformed = || SignatureError::Malformed {
            header: X_HUB_SIGNATURE_256,
        };
        let hex_digest = value.strip_prefix(b"sha256=").ok_or_else(malformed)?;
        let mut claimed = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut claimed).map_err(|_| malformed())?;
        Ok(claimed)
    }
}

impl VerifyRequest for GitHubSignature {
    type Error = SignatureError;

    fn verify(&self, parts: &Parts, body: &Bytes) -> Result<(), SignatureError> {
        let claimed = self.claimed_digest(parts)?;
        let mut matched = Choice::from(0);
        for secret in self.secrets.iter() {
            // HMAC takes keys of any length, so this cannot fail; if it ever did, that secret
            // matches nothing.
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
                continue;
            };
            mac.update(body);
            let expected: [u8; 32] = mac.finalize().into_bytes().into();
            // Every secret is tried, so the time taken does not say which one matched.
            matched |= expected.ct_eq(&claimed);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch {
                header: X_HUB_SIGNATURE_256,
            })
        }
    }

    fn verify_head(&self, parts: &Parts) -> Result<(), SignatureError> {
        self.claimed_digest(parts).map(|_| ())
    }
}

/// GitLab's `X-Gitlab-Token`: the secret token itself, sent in plain text. Compared in constant
/// time (SHA-256 digests of both are compared, so not even the length leaks).
///
/// The token is in the head, so it is checked completely before the body is read
/// ([`VerifyRequest::verify_head`]), and the body is not needed.
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use tower_idempotency::http::{GitLabToken, VerifyRequest};
///
/// let verifier = GitLabToken::try_new("s3cret")?;
/// let missing = Request::post("/webhooks/gitlab").body(()).unwrap().into_parts().0;
/// assert_eq!(
///     verifier.verify_head(&missing).unwrap_err().to_string(),
///     "missing `x-gitlab-token` header"
/// );
/// // Rotation: both tokens are accepted.
/// let rotating = GitLabToken::try_from_tokens(["new", "s3cret"])?;
/// let sent = Request::post("/").header("x-gitlab-token", "s3cret").body(()).unwrap().into_parts().0;
/// assert!(rotating.verify(&sent, &Bytes::new()).is_ok());
/// # Ok::<(), tower_idempotency::http::SecretError>(())
/// ```
#[derive(Clone)]
pub struct GitLabToken {
    digests: Arc<[[u8; 32]]>,
}

impl GitLabToken {
    /// Accepts requests whose `X-Gitlab-Token` equals `token`; an empty token is refused.
    ///
    /// ```
    /// use tower_idempotency::http::{GitLabToken, SecretError};
    ///
    /// assert_eq!(GitLabToken::try_new("").unwrap_err(), SecretError::Empty { index: 0 });
    /// assert_eq!(GitLabToken::try_new("s3cret")?.token_count(), 1);
    /// # Ok::<(), SecretError>(())
    /// ```
    pub fn try_new(token: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        Self::try_from_tokens([token])
    }

    /// Accepts requests whose `X-Gitlab-Token` equals any of `tokens` (rotation). Refused: no
    /// token at all, or an empty one.
    ///
    /// ```
    /// use tower_idempotency::http::{GitLabToken, SecretError};
    ///
    /// assert_eq!(GitLabToken::try_from_tokens(["new", "old"])?.token_count(), 2);
    /// assert_eq!(GitLabToken::try_from_tokens(["new", ""]).unwrap_err(), SecretError::Empty { index: 1 });
    /// # Ok::<(), SecretError>(())
    /// ```
    pub fn try_from_tokens<T: AsRef<[u8]>>(tokens: impl IntoIterator<Item = T>) -> Result<Self, SecretError> {
        let digests: Vec<[u8; 32]> = checked_secrets(tokens)?
            .iter()
            .map(|token| Sha256::digest(token).into())
            .collect();
        Ok(Self {
            digests: Arc::from(digests),
        })
    }

    /// Accepts requests whose `X-Gitlab-Token` equals `token`, without a fallible constructor.
    /// Prefer [`try_new`](Self::try_new): an **empty** token here is logged at `error` and the
    /// verifier refuses every request (fail closed) with [`SignatureError::NoSecret`].
    ///
    /// ```
    /// use http::Request;
    /// use tower_idempotency::http::{GitLabToken, VerifyRequest};
    ///
    /// let empty_header = Request::post("/").header("x-gitlab-token", "").body(()).unwrap().into_parts().0;
    /// assert!(GitLabToken::new("").verify_head(&empty_header).is_err());
    /// ```
    pub fn new(token: impl AsRef<[u8]>) -> Self {
        Self::try_new(token).unwrap_or_else(|error| {
            tracing::error!(error = %error, "GitLab webhook token refused: every delivery will be refused");
            Self {
                digests: Arc::from(Vec::new()),
            }
        })
    }

    /// How many tokens are accepted.
    pub fn token_count(&self) -> usize {
        self.digests.len()
    }
}

impl fmt::Debug for GitLabToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitLabToken")
            .field("tokens", &format_args!("[{} redacted]", self.digests.len()))
            .finish()
    }
}

impl VerifyRequest for GitLabToken {
    type Error = SignatureError;

    fn verify(&self, parts: &Parts, _body: &Bytes) -> Result<(), SignatureError> {
        self.verify_head(parts)
    }

    fn verify_head(&self, parts: &Parts) -> Result<(), SignatureError> {
        if self.digests.is_empty() {
            return Err(SignatureError::NoSecret { header: X_GITLAB_TOKEN });
        }
        let value = single_header(parts, &X_GITLAB_TOKEN)?;
        let given: [u8; 32] = Sha256::digest(value).into();
        let mut matched = Choice::from(0);
        for digest in self.digests.iter() {
            matched |= given.ct_eq(digest);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch { header: X_GITLAB_TOKEN })
        }
    }

    fn needs_body(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::post("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
            .body(())
            .map(|r| r.into_parts().0)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn empty_secrets_and_tokens_are_refused_at_construction() {
        assert_eq!(
            GitHubSignature::try_new("").unwrap_err(),
            SecretError::Empty { index: 0 }
        );
        assert_eq!(
            GitHubSignature::try_from_secrets(["ok", ""]).unwrap_err(),
            SecretError::Empty { index: 1 }
        );
        assert_eq!(GitLabToken::try_new(b"").unwrap_err(), SecretError::Empty { index: 0 });
        assert_eq!(
            GitHubSignature::try_from_secrets(Vec::<&str>::new()).unwrap_err(),
            SecretError::None
        );
    }

    #[test]
    fn infallible_constructors_with_an_empty_secret_refuse_everything() {
        let github = GitHubSignature::new("");
        let digest = format!(
            "sha256={}",
            hex::encode(Hmac::<Sha256>::new_from_slice(b"").unwrap().finalize().into_bytes())
        );
        let signed_with_nothing = parts(&[("x-hub-signature-256", &digest)]);
        assert!(matches!(
            github.verify(&signed_with_nothing, &Bytes::new()),
            Err(SignatureError::NoSecret { .. })
        ));
        let gitlab = GitLabToken::new("");
        assert!(matches!(
            gitlab.verify_head(&parts(&[("x-gitlab-token", "")])),
            Err(SignatureError::NoSecret { .. })
        ));
    }

    #[test]
    fn github_heads_without_a_well_formed_signature_are_refused_before_the_body() {
        let verifier = GitHubSignature::try_new("s").unwrap();
        assert!(matches!(
            verifier.verify_head(&parts(&[])),
            Err(SignatureError::Missing { .. })
        ));
        assert!(matches!(
            verifier.verify_head(&parts(&[("x-hub-signature-256", "sha1=00")])),
            Err(SignatureError::Malformed { .. })
        ));
        let well_formed = format!("sha256={}", "ab".repeat(32));
        assert!(
            verifier
                .verify_head(&parts(&[("x-hub-signature-256", &well_formed)]))
                .is_ok()
        );
    }
}
