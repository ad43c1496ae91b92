//! Connection strings: the [`Dsn`] type a config holds, read once into what tokio-postgres
//! takes and the libpq parameters it does not ([`params`]: TLS, `passfile`), the password
//! from a password file ([`passfile`]) and every way a password is masked before it is
//! shown. Below the config and the connections, which both use it.

pub mod params;
pub mod passfile;

use std::fmt;

use serde::Deserialize;

use params::{split_dsn, Taken, TlsSettings};

/// A connection string that cannot be used, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DsnError(pub String);

/// A libpq connection string (URL or `key=value` form). Shown with its password masked.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Dsn(String);

impl Dsn {
    pub fn new(s: impl Into<String>) -> Self {
        Dsn(s.into())
    }

    /// The connection string itself, password included: for connecting only, never logging.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The settings tokio-postgres reads (the TLS parameters: [`Dsn::parts`]). A DSN
    /// without a password takes it from the password file, as libpq does
    /// ([`passfile`]).
    pub fn parse(&self) -> Result<tokio_postgres::Config, DsnError> {
        Ok(self.parts()?.0)
    }

    /// The settings tokio-postgres reads and the TLS parameters (`sslmode`,
    /// `sslrootcert`, `sslcert`, `sslkey`), from one reading of the string.
    pub fn parts(&self) -> Result<(tokio_postgres::Config, TlsSettings), DsnError> {
        let (rest, taken) = self.split()?;
        let mut cfg: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| DsnError(format!("dsn {self} does not parse: {e}; use a URL (postgres://user@host:5432/db) or key=value pairs")))?;
        if cfg.get_password().is_none() {
            if let Some(path) = passfile::location(taken.passfile.as_deref()) {
                let host = host_of(&cfg);
                let port = cfg.get_ports().first().copied().unwrap_or(5432);
                let user = cfg.get_user().unwrap_or("postgres").to_string();
                let db = cfg.get_dbname().unwrap_or(&user).to_string();
                if let Some(pw) = passfile::lookup(&path, &host, port, &db, &user) {
                    cfg.password(pw);
                }
            }
        }
        let mut tls = taken.tls;
        if on_unix_socket(&cfg) {
            // A Unix socket never leaves the machine and PostgreSQL offers no TLS on it:
            // as libpq does, sslmode does not apply (a sidecar reaches its own node so).
            tls.mode = params::SslMode::Disable;
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        Ok((cfg, tls))
    }

    /// Whether this DSN reaches its server over TCP on this machine's loopback (127.0.0.1,
    /// ::1, localhost), where the server's Unix socket would do the same for less.
    pub fn is_tcp_loopback(&self) -> bool {
        let Ok((cfg, _)) = self.parts() else {
            return false;
        };
        let hosts = cfg.get_hosts();
        !hosts.is_empty()
            && hosts.iter().all(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => {
                    name == "localhost"
                        || name
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(_) => false,
            })
    }

    /// The DSN for a libpq program (pg_dump, pg_restore) and its password apart, to pass
    /// in `PGPASSWORD` rather than on a command line everyone on the host can read.
    pub fn for_libpq(&self) -> Result<(String, Option<String>), DsnError> {
        let password = self
            .parse()?
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Ok((without_password(&self.0), password))
    }

    fn split(&self) -> Result<(String, Taken), DsnError> {
        split_dsn(&self.0).map_err(|e| DsnError(format!("dsn {self}: {e}")))
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_password(&self.0))
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dsn({self})")
    }
}

/// A connection string without its password (URL userinfo or `password` pair).
fn without_password(dsn: &str) -> String {
    if let Some((scheme, rest)) = dsn.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let rest = match rest[..authority_end].rfind('@') {
            Some(at) => match rest[..at].find(':') {
                Some(colon) => format!("{}{}", &rest[..colon], &rest[at..]),
                None => rest.to_string(),
            },
            None => rest.to_string(),
        };
        // A password in the query: drop that parameter.
        let rest = match rest.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.starts_with("password="))
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => rest,
        };
        return format!("{scheme}://{rest}");
    }
    match params::key_values(dsn) {
        Ok(pairs) => pairs
            .into_iter()
            .filter(|(k, _, _)| k != "password")
            .map(|(_, _, raw)| raw)
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => dsn.to_string(),
    }
}

/// Masks the password of a URL (`postgres://u:secret@h`) or key/value (`password=secret`)
/// connection string.
pub fn redact_password(dsn: &str) -> String {
    if let Some(rest) = dsn.split_once("://").map(|(_, r)| r) {
        let scheme_len = dsn.len() - rest.len();
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!(
                    "{}{}:***{}",
                    &dsn[..scheme_len],
                    &rest[..colon],
                    redact_password(&rest[at..])
                );
            }
        }
        // query parameters may carry password=...
        if let Some(q) = rest.find('?') {
            return format!("{}{}", &dsn[..scheme_len + q], redact_kv(&rest[q..]));
        }
        return dsn.to_string();
    }
    redact_kv(dsn)
}

fn redact_kv(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("password") {
        let after_key = &rest[pos + "password".len()..];
        let trimmed = after_key.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            out.push_str(&rest[..pos + "password".len()]);
            rest = after_key;
            continue;
        };
        let value = value.trim_start();
        out.push_str(&rest[..pos]);
        out.push_str("password=***");
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            quoted.find('\'').map(|i| i + 2).unwrap_or(value.len())
        } else {
            value.find([' ', '&', '"', '\n']).unwrap_or(value.len())
        };
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// Masks every password in free text that may quote connection strings (a TOML parse
/// error echoes the offending line): URL userinfo and `password = ...` pairs.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let start = rest[..pos]
            .rfind(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .map(|i| i + 1)
            .unwrap_or(0);
        let end = rest[pos..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .map(|i| pos + i)
            .unwrap_or(rest.len());
        out.push_str(&redact_kv(&rest[..start]));
        out.push_str(&redact_password(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(&redact_kv(rest));
    out
}

/// Whether every host of a connection's settings is a Unix socket directory.
fn on_unix_socket(cfg: &tokio_postgres::Config) -> bool {
    #[cfg(unix)]
    {
        let hosts = cfg.get_hosts();
        !hosts.is_empty()
            && hosts
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
    }
    #[cfg(not(unix))]
    {
        let _ = cfg;
        false
    }
}

/// The first host of a connection's settings, for messages.
pub fn host_of(cfg: &tokio_postgres::Config) -> String {
    match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode as PgSslMode;

    #[test]
    fn a_unix_socket_takes_no_tls_whatever_sslmode_says() {
        let (cfg, tls) = Dsn::new("host=/var/run/postgresql port=5432 user=u sslmode=require")
            .parts()
            .unwrap();
        assert_eq!(tls.mode, params::SslMode::Disable);
        assert_eq!(cfg.get_ssl_mode(), PgSslMode::Disable);

        let (cfg, tls) = Dsn::new("host=10.0.0.1 port=5432 user=u sslmode=require")
            .parts()
            .unwrap();
        assert_eq!(tls.mode, params::SslMode::Require);
        assert_eq!(cfg.get_ssl_mode(), PgSslMode::Require);
    }

    #[test]
    fn loopback_over_tcp_is_told_from_a_socket_and_a_remote_host() {
        for dsn in [
            "host=127.0.0.1 user=u",
            "host=localhost user=u",
            "postgres://u@[::1]:5432/odoo",
        ] {
            assert!(Dsn::new(dsn).is_tcp_loopback(), "{dsn}");
        }
        for dsn in [
            "host=/var/run/postgresql user=u",
            "host=main.example.com user=u",
            "postgres://u@10.0.0.1/odoo",
            "not a dsn = =",
        ] {
            assert!(!Dsn::new(dsn).is_tcp_loopback(), "{dsn}");
        }
    }
}
