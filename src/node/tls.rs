//! TLS for both kinds of connection, from the libpq parameters of a DSN.
//!
//! A DSN may carry `sslmode` (disable, allow, prefer, require, verify-ca, verify-full),
//! `sslrootcert`, `sslcert` and `sslkey`, in URL query or `key=value` form, as libpq
//! reads them. `crate::dsn::params::split_dsn` takes them out (tokio-postgres knows only three modes and no
//! certificate files) and returns what is left for tokio-postgres with the TLS settings
//! beside it. Both connection kinds then use rustls with the ring provider: the SQL
//! connections through [`MakeRustls`], the replication connection through
//! pgwire-replication's own rustls support, fed the same settings
//! ([`TlsSettings::replication`]).
//!
//! Defaults and departures from libpq (docs/security.md):
//! - no `sslmode` means `prefer`, as in libpq: TLS when the server offers it, without
//!   checking its certificate; `allow` is treated as `prefer`;
//! - `require` with an `sslrootcert` checks the chain, as libpq does (verify-ca);
//! - `verify-ca`/`verify-full` without `sslrootcert` use `~/.postgresql/root.crt`, as
//!   libpq does, and `sslrootcert=system` uses the Mozilla roots (PostgreSQL 16's word);
//! - an encrypted client key (`sslpassword`) and CRLs (`sslcrl`) are refused with a clear
//!   error rather than ignored.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

pub use crate::dsn::params::{RootCerts, SslMode, TlsSettings};

/// A TLS failure with what to check.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl TlsSettings {
    /// The settings for pgwire-replication's connection to `host`.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as M;
        pgwire_replication::TlsConfig {
            mode: match self.mode {
                SslMode::Disable => M::Disable,
                SslMode::Prefer => M::Prefer,
                SslMode::Require => M::Require,
                SslMode::VerifyCa => M::VerifyCa,
                SslMode::VerifyFull => M::VerifyFull,
            },
            ca_pem_path: match &self.root_cert {
                Some(RootCerts::File(p)) => Some(p.clone()),
                _ => None,
            },
            // pgwire-replication refuses verify-full on an IP address unless the name to
            // check is given; the address itself is that name (its IP SAN is checked).
            sni_hostname: host
                .parse::<std::net::IpAddr>()
                .is_ok()
                .then(|| host.to_string()),
            client_cert_pem_path: self.client_cert.as_ref().map(|(c, _)| c.clone()),
            client_key_pem_path: self.client_cert.as_ref().map(|(_, k)| k.clone()),
        }
    }

    /// A rustls configuration that checks what `mode` asks for.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("tls: {e}")))?;
        let builder = match (&self.root_cert, self.mode) {
            (Some(roots), SslMode::VerifyFull) => {
                builder.with_root_certificates(root_store(roots)?)
            }
            (Some(roots), _) => {
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(roots)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError(format!("tls: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
            }
            (None, _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
        };
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsError(format!("sslcert {}: {e}", cert.display())))?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| TlsError(format!("sslkey {}: {e}", key.display())))?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    TlsError(format!(
                        "sslcert {} and sslkey {} do not make a client certificate: {e}",
                        cert.display(),
                        key.display()
                    ))
                })
            }
        }
    }

    /// A handshake failure explained: which certificate and what to check. Read from the
    /// failure's text, because pgwire-replication hands its TLS errors over as text only;
    /// the words are rustls' `CertificateError` as it displays them.
    pub fn explain(&self, host: &str, failure: &str) -> String {
        let roots = match &self.root_cert {
            Some(RootCerts::File(p)) => format!("sslrootcert {}", p.display()),
            Some(RootCerts::System) => "the system's root certificates".to_string(),
            None => "no root certificate".to_string(),
        };
        let hint = if failure.contains("UnknownIssuer") || failure.contains("BadSignature") {
            format!("the server's certificate is not signed by a CA in {roots}: point sslrootcert at the CA that signed it")
        } else if failure.contains("NotValidForName") || failure.contains("not valid for name") {
            format!("the server's certificate does not name host {host} (sslmode=verify-full): connect with a host name the certificate was issued for, or use sslmode=verify-ca")
        } else if failure.contains("Expired") || failure.contains("certificate expired") {
            "the server's certificate has expired: renew it".to_string()
        } else if failure.contains("does not support TLS")
            || failure.contains("SSLRequest rejected")
        {
            format!("the server does not offer TLS but sslmode={} requires it: set ssl = on on the server, or lower sslmode", self.mode.as_str())
        } else {
            format!("check the server's TLS setup and {roots}")
        };
        format!("tls with {host} failed: {failure}; {hint}")
    }
}

fn root_store(roots: &RootCerts) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::System => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        RootCerts::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError(format!("sslrootcert {}: {e}", path.display())))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError(format!(
                    "sslrootcert {} holds no CA certificate in PEM form",
                    path.display()
                )));
            }
        }
    }
    Ok(store)
}

/// `prefer`/`require`: encrypts, checks the handshake's signatures, trusts any
/// certificate (libpq's meaning of these modes).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres' TLS hook, backed by rustls.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    settings: Arc<TlsSettings>,
}

impl MakeRustls {
    pub fn new(settings: &TlsSettings) -> Result<MakeRustls, TlsError> {
        Ok(MakeRustls {
            config: Arc::new(settings.client_config()?),
            settings: Arc::new(settings.clone()),
        })
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        let name = match ServerName::try_from(domain.to_string()) {
            Ok(name) => Ok(name),
            // tokio-postgres asks for a connector even where no TLS is tried: on a Unix
            // socket (no name; crate::dsn turns sslmode off there). Should a handshake
            // ever be tried on one, it fails with this.
            Err(_) if domain.is_empty() => Err(TlsError(
                "tls: a Unix socket has no host name to check a certificate against".into(),
            )),
            Err(_) => {
                return Err(TlsError(format!(
                    "tls: `{domain}` is not a host name or address"
                )))
            }
        };
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
            host: domain.to_string(),
            settings: self.settings.clone(),
        })
    }
}

pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: Result<ServerName<'static>, TlsError>,
    host: String,
    settings: Arc<TlsSettings>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name?, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
                .map_err(|e| TlsError(self.settings.explain(&self.host, &e.to_string())))
        })
    }
}

/// An encrypted connection to a server.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM then authenticates without channel binding (SCRAM-SHA-256, not -PLUS).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use crate::dsn::params::split_dsn;

    #[test]
    fn a_verify_full_replication_connection_to_an_address_checks_that_address() {
        let (_, taken) =
            split_dsn("host=127.0.0.1 sslmode=verify-full sslrootcert=/ca.crt").unwrap();
        let tls = taken.tls;
        let r = tls.replication("127.0.0.1");
        assert_eq!(r.mode, pgwire_replication::SslMode::VerifyFull);
        assert_eq!(r.sni_hostname.as_deref(), Some("127.0.0.1"));
        assert_eq!(tls.replication("db.example").sni_hostname, None);
    }
}
