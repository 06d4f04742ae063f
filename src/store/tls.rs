//! TLS settings for [`RedisStoreBuilder`]: a private CA to trust, and a client certificate for
//! servers that require one (`tls-auth-clients yes`, Redis's default once TLS is on).
//!
//! A `rediss://` URL alone already works with the `tls-rustls` or `tls-native-tls` feature,
//! trusting the system's root certificates. These settings are for the common production case
//! of a Redis whose certificate is signed by an internal CA.

use std::fmt;

use super::StoreError;
#[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
use super::redis::RedisStoreBuilder;

/// Certificates a builder connects with. Empty unless a TLS method was called.
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    /// PEM: the CA certificate(s) to trust instead of the system's roots.
    root_certificate: Option<Vec<u8>>,
    /// PEM: the client certificate chain and its private key.
    client_identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Certificates are not secrets, but private keys are: `Debug` shows only what is set.
impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("root_certificate", &self.root_certificate.as_ref().map(|_| "<set>"))
            .field("client_identity", &self.client_identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TlsSettings {
    #[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client_identity
                .as_ref()
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert: client_cert.clone(),
                    client_key: client_key.clone(),
                }),
            root_cert: self.root_certificate.clone(),
        }
    }

    /// The redis-rs client for `url` with these settings.
    pub(crate) fn open_client(&self, url: &str) -> Result<redis::Client, StoreError> {
        let connect_error = |source| StoreError::Redis {
            operation: "connect",
            source,
        };
        #[cfg(feature = "tls-rustls")]
        ensure_crypto_provider();
        if self.root_certificate.is_none() && self.client_identity.is_none() {
            return redis::Client::open(url).map_err(connect_error);
        }
        #[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
        {
            redis::Client::build_with_tls(url, self.certificates()).map_err(connect_error)
        }
        #[cfg(not(any(feature = "tls-rustls", feature = "tls-native-tls")))]
        {
            // Unreachable: the setters exist only with a TLS feature.
            Err(StoreError::InvalidSetting {
                setting: "tls",
                reason: "TLS certificates need the `tls-rustls` or `tls-native-tls` feature".into(),
            })
        }
    }
}

#[cfg(feature = "redis-cluster")]
impl TlsSettings {
    /// `builder` with these certificates (redis-rs takes them for clusters with rustls only).
    pub(crate) fn apply_to_cluster(
        &self,
        builder: redis::cluster::ClusterClientBuilder,
    ) -> redis::cluster::ClusterClientBuilder {
        #[cfg(feature = "tls-rustls")]
        {
            ensure_crypto_provider();
            if self.root_certificate.is_some() || self.client_identity.is_some() {
                return builder.certs(self.certificates());
            }
        }
        builder
    }
}

/// redis-rs builds its rustls configuration with the process-wide default crypto provider.
/// This crate enables rustls's `ring` provider; if another crate in the build enables a second
/// one (e.g. `aws-lc-rs`), rustls cannot choose and would panic on the first connection, so
/// install `ring` as the default unless the application already installed one.
#[cfg(feature = "tls-rustls")]
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race against another installer is fine: some provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
impl RedisStoreBuilder {
    /// Trusts the CA certificate(s) in `pem` (PEM text, e.g. the contents of Redis's
    /// `tls-ca-cert-file`) for the server's certificate, **instead of** the system's roots.
    /// Needs a `rediss://` URL; the host name in the URL must match the server certificate.
    /// An unreadable PEM fails [`connect`](Self::connect) with a `connect` error.
    ///
    /// ```no_run
    /// use tower_idempotency::RedisStore;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = std::fs::read("/etc/redis/tls/ca.crt")?;
    /// let store = RedisStore::builder("rediss://redis.internal:6380")
    ///     .tls_root_certificate(ca)
    ///     .connect()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_certificate = Some(pem.into());
        self
    }

    /// Presents this client certificate chain and private key (both PEM) to a server that
    /// requires client certificates (`tls-auth-clients yes`, Redis's default with TLS on).
    /// The key stays out of `Debug` output.
    ///
    /// ```no_run
    /// use tower_idempotency::RedisStore;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::builder("rediss://redis.internal:6380")
    ///     .tls_root_certificate(std::fs::read("/etc/redis/tls/ca.crt")?)
    ///     .tls_client_certificate(std::fs::read("client.crt")?, std::fs::read("client.key")?)
    ///     .connect()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn tls_client_certificate(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.client_identity = Some((cert_pem.into(), key_pem.into()));
        self
    }
}

#[cfg(all(feature = "redis-cluster", feature = "tls-rustls"))]
impl super::RedisClusterStoreBuilder {
    /// Trusts the CA certificate(s) in `pem` for every node's certificate, **instead of** the
    /// system's roots, and connects with TLS. Use `rediss://` node URLs; each node must announce
    /// an address (its TLS port, `tls-cluster yes`) that its certificate names. Needs the
    /// `tls-rustls` feature (redis-rs takes cluster certificates with rustls only).
    ///
    /// ```no_run
    /// use tower_idempotency::RedisStore;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::cluster_builder(["rediss://10.0.0.1:6380", "rediss://10.0.0.2:6380"])
    ///     .tls_root_certificate(std::fs::read("/etc/redis/tls/ca.crt")?)
    ///     .connect()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_certificate = Some(pem.into());
        self
    }

    /// Presents this client certificate chain and private key (both PEM) to every node; see
    /// [`RedisStoreBuilder::tls_client_certificate`].
    ///
    /// ```no_run
    /// use tower_idempotency::RedisStore;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::cluster_builder(["rediss://10.0.0.1:6380"])
    ///     .tls_root_certificate(std::fs::read("/etc/redis/tls/ca.crt")?)
    ///     .tls_client_certificate(std::fs::read("client.crt")?, std::fs::read("client.key")?)
    ///     .connect()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn tls_client_certificate(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.client_identity = Some((cert_pem.into(), key_pem.into()));
        self
    }
}
