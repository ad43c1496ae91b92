//! TLS for both kinds of connection, from the libpq parameters of a DSN.
//!
//! A DSN may carry `sslmode` (disable, allow, prefer, require, verify-ca, verify-full),
//! `sslrootcert`, `sslcert` and `sslkey`, in URL query or `key=value` form, as libpq
//! reads them. [`split_dsn`] takes them out (tokio-postgres knows only three modes and no
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
use std::path::{Path, PathBuf};
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

/// libpq's `sslmode`, as walsync applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it, certificate not checked (libpq's default).
    Prefer,
    /// TLS or nothing, certificate not checked.
    Require,
    /// TLS, certificate chain checked against the root certificates.
    VerifyCa,
    /// TLS, chain checked and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not a libpq sslmode: use disable, allow, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies_chain(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where the root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The Mozilla roots compiled in (`sslrootcert=system`).
    System,
}

/// The TLS part of a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// Set whenever `mode` checks the chain.
    pub root_cert: Option<RootCerts>,
    /// A client certificate and its key, both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The libpq keys this module takes out of a DSN (the TLS ones, and `passfile`, which
/// crate::node::passfile reads).
const TLS_KEYS: &[&str] = &[
    "passfile",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
];

/// What [`split_dsn`] takes out of a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub tls: TlsSettings,
    /// The DSN's `passfile`, if it names one.
    pub passfile: Option<String>,
}

/// Splits a DSN into what tokio-postgres reads (TLS keys and `passfile` removed, `sslmode`
/// mapped to one of its three) and what was taken out. Errors name the parameter and
/// what to write.
pub fn split_dsn(dsn: &str) -> Result<(String, Taken), String> {
    let (rest, pairs) =
        if let Some((base, query)) = dsn.split_once("://").and_then(|_| dsn.split_once('?')) {
            let mut kept = Vec::new();
            let mut pairs = Vec::new();
            for part in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = part.split_once('=').unwrap_or((part, ""));
                if TLS_KEYS.contains(&k) {
                    pairs.push((k.to_string(), percent_decode(v)?));
                } else {
                    kept.push(part);
                }
            }
            let rest = if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            };
            (rest, pairs)
        } else if dsn.contains("://") {
            (dsn.to_string(), Vec::new())
        } else {
            let mut kept = Vec::new();
            let mut pairs = Vec::new();
            for (k, v, raw) in key_values(dsn)? {
                if TLS_KEYS.contains(&k.as_str()) {
                    pairs.push((k, v));
                } else {
                    kept.push(raw);
                }
            }
            (kept.join(" "), pairs)
        };
    let value = |key: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    for refused in ["sslpassword", "sslcrl", "sslcrldir"] {
        if value(refused).is_some_and(|v| !v.is_empty()) {
            return Err(format!(
                "{refused} is not supported by walsync's TLS: {}",
                match refused {
                    "sslpassword" => "give it a client key without a passphrase (openssl pkey -in KEY -out PLAIN)",
                    _ => "leave it out; revoke a server certificate by replacing the CA file in sslrootcert",
                }
            ));
        }
    }
    let mut mode = SslMode::parse(value("sslmode").unwrap_or("prefer"))?;
    let explicit_root = value("sslrootcert").filter(|v| !v.is_empty());
    if mode == SslMode::Require && explicit_root.is_some() {
        // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
        // same as that of verify-ca" (libpq docs, "SSL Mode Descriptions").
        mode = SslMode::VerifyCa;
    }
    let root_cert = if mode.verifies_chain() {
        Some(match explicit_root {
            Some("system") => RootCerts::System,
            Some(path) => RootCerts::File(PathBuf::from(path)),
            None => {
                let default = std::env::var_os("HOME")
                    .map(|h| Path::new(&h).join(".postgresql/root.crt"))
                    .filter(|p| p.exists())
                    .ok_or_else(|| {
                        format!(
                            "sslmode={} needs the CA that signed the server's certificate: add sslrootcert=/path/to/ca.crt to the dsn",
                            mode.as_str()
                        )
                    })?;
                RootCerts::File(default)
            }
        })
    } else {
        None
    };
    let client_cert = match (
        value("sslcert").filter(|v| !v.is_empty()),
        value("sslkey").filter(|v| !v.is_empty()),
    ) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        (None, None) => None,
        (Some(_), None) => {
            return Err("sslcert is set without sslkey: give both for a client certificate".into())
        }
        (None, Some(_)) => {
            return Err("sslkey is set without sslcert: give both for a client certificate".into())
        }
    };
    let pg_mode = match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    };
    let sep = if rest.contains("://") {
        if rest.contains('?') {
            "&"
        } else {
            "?"
        }
    } else {
        " "
    };
    let rest = if rest.trim().is_empty() {
        format!("sslmode={pg_mode}")
    } else {
        format!("{rest}{sep}sslmode={pg_mode}")
    };
    let passfile = value("passfile").map(str::to_string);
    Ok((
        rest,
        Taken {
            tls: TlsSettings {
                mode,
                root_cert,
                client_cert,
            },
            passfile,
        },
    ))
}

/// `key=value` pairs of a libpq connection string: key, unquoted value, raw text.
pub(crate) fn key_values(s: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("dsn: `{key}` has no `=value`"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\\')) => {
                        if let Some((_, c)) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some((_, '\'')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("dsn: the quoted value of `{key}` is not closed")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, c)) = chars.next() {
                        value.push(c);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map(|(i, _)| *i).unwrap_or(s.len());
        out.push((key, value, s[start..end].trim_end().to_string()));
    }
    Ok(out)
}

fn percent_decode(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("dsn: bad percent-escape in `{v}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("dsn: `{v}` is not UTF-8 once decoded"))
}

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
        let name = ServerName::try_from(domain.to_string())
            .map_err(|_| TlsError(format!("tls: `{domain}` is not a host name or address")))?;
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
    name: ServerName<'static>,
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
                .connect(self.name, stream)
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
    use super::*;

    #[test]
    fn url_query_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, taken) = split_dsn(
            "postgres://u:p@db.example:5432/odoo?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.crt&application_name=x&passfile=%2Fp",
        )
        .unwrap();
        let tls = taken.tls;
        assert_eq!(taken.passfile.as_deref(), Some("/p"));
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5432/odoo?application_name=x&sslmode=require"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCerts::File("/etc/ca.crt".into())));
        rest.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn key_value_pairs_are_taken_out_with_quotes_understood() {
        let (rest, tls) = split_dsn(
            "host=db port=5432 password='it\\'s secret' sslmode = verify-ca sslrootcert='/etc/my ca.crt' dbname=odoo",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let tls = tls.tls;
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(
            tls.root_cert,
            Some(RootCerts::File("/etc/my ca.crt".into()))
        );
        assert!(rest.starts_with("host=db port=5432 password="), "{rest}");
        assert!(rest.ends_with("dbname=odoo sslmode=require"), "{rest}");
        assert!(!rest.contains("sslrootcert"), "{rest}");
    }

    #[test]
    fn the_default_is_prefer_and_require_with_a_root_certificate_checks_the_chain() {
        let (rest, tls) = split_dsn("postgres://u@h/db").unwrap();
        assert_eq!(tls.tls.mode, SslMode::Prefer);
        assert_eq!(rest, "postgres://u@h/db?sslmode=prefer");
        let (_, tls) = split_dsn("host=h sslmode=require sslrootcert=/ca.crt").unwrap();
        assert_eq!(tls.tls.mode, SslMode::VerifyCa);
        let (_, tls) = split_dsn("host=h sslmode=disable").unwrap();
        assert_eq!(tls.tls.mode, SslMode::Disable);
    }

    #[test]
    fn unusable_tls_parameters_are_refused_with_what_to_do() {
        assert!(split_dsn("host=h sslmode=verify")
            .unwrap_err()
            .contains("verify-full"));
        assert!(split_dsn("host=h sslcert=/c")
            .unwrap_err()
            .contains("sslkey"));
        assert!(split_dsn("host=h sslpassword=x sslcert=/c sslkey=/k")
            .unwrap_err()
            .contains("passphrase"));
        std::env::set_var("HOME", "/nonexistent-walsync-home");
        assert!(split_dsn("postgres://u@h/db?sslmode=verify-full")
            .unwrap_err()
            .contains("sslrootcert"));
    }

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
