//! The libpq parameters of a DSN that tokio-postgres does not read: `sslmode` (all six
//! of libpq's), `sslrootcert`, `sslcert`, `sslkey` and `passfile`, in URL query or
//! `key=value` form. [`split_dsn`] takes them out and returns what is left for
//! tokio-postgres with the settings beside it; `crate::node::tls` builds the connectors
//! from [`TlsSettings`]. Pure.

use std::path::{Path, PathBuf};

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

    pub fn verifies_chain(self) -> bool {
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
/// crate::dsn::passfile reads).
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
}
