//! Opening SQL connections to a node, with errors that say what to check.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tracing::warn;

use crate::dsn::{host_of, Dsn, DsnError};

/// Session settings pinned on every walsync connection, so that values travel as text
/// that reads back to the same value on the other side: ISO dates, hex bytea, floats with
/// full precision, timestamps in UTC (PostgreSQL docs, "Client Connection Defaults").
/// Conflict detection compares a change's old image, printed by the upstream's
/// walsender, with the local row printed by the applier: both use these settings.
pub const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,YMD -c intervalstyle=postgres -c extra_float_digits=3 -c bytea_output=hex -c timezone=UTC -c client_encoding=UTF8";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("config: {0}")]
    Dsn(#[from] DsnError),
    #[error("cannot connect to {dsn}: {hint}")]
    Connect {
        dsn: String,
        hint: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectError {
    /// A wrong password, a missing database or a refused certificate will not fix itself
    /// by retrying.
    pub fn is_permanent(&self) -> bool {
        match self {
            ConnectError::Dsn(_) => true,
            ConnectError::Connect { source, .. } => {
                matches!(
                    source.code(),
                    Some(c) if *c == SqlState::INVALID_PASSWORD
                        || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                        || *c == SqlState::INVALID_CATALOG_NAME
                ) || tls_failure(source).is_some()
            }
        }
    }
}

/// Connects with the pinned session settings and spawns the connection task.
pub async fn connect(dsn: &Dsn, application_name: &str) -> Result<Client, ConnectError> {
    let (mut cfg, tls) = dsn.parts()?;
    let connector = crate::node::tls::MakeRustls::new(&tls)
        .map_err(|e| ConnectError::Dsn(DsnError(format!("dsn {dsn}: {e}"))))?;
    cfg.application_name(application_name);
    cfg.options(SESSION_OPTIONS);
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    // A connection that dies in a cut errors within about a minute instead of the
    // kernel's default quarter of an hour, whatever awaits it: keepalive probes while idle,
    // and a user timeout while sent data goes unacknowledged. A dsn's own values stay.
    if cfg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        cfg.keepalives_idle(Duration::from_secs(30));
    }
    if cfg.get_keepalives_interval().is_none() {
        cfg.keepalives_interval(Duration::from_secs(10));
    }
    if cfg.get_keepalives_retries().is_none() {
        cfg.keepalives_retries(3);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(Duration::from_secs(60));
    }
    let (client, connection) = cfg.connect(connector).await.map_err(|source| {
        let hint = match source.code() {
            Some(c) if *c == SqlState::INVALID_PASSWORD => "password authentication failed: check the user and password in the dsn".to_string(),
            Some(c) if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => "the server refused this user (pg_hba.conf or role): check the user in the dsn and pg_hba.conf".to_string(),
            Some(c) if *c == SqlState::INVALID_CATALOG_NAME => "the database does not exist: check the database name in the dsn".to_string(),
            Some(_) => "the server refused the connection".to_string(),
            None => match tls_failure(&source) {
                Some(explained) => explained,
                // tokio-postgres says so in words only (no SQLSTATE, no error type).
                None if crate::observability::error_chain(&source).contains("server does not support TLS") => {
                    tls.explain(&host_of(&cfg), "the server does not support TLS")
                }
                None => "the server is unreachable: check host, port and that PostgreSQL is running".to_string(),
            },
        };
        ConnectError::Connect { dsn: dsn.to_string(), hint, source }
    })?;
    let app = application_name.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(application = %app, error = %e, "connection closed");
        }
    });
    Ok(client)
}

/// The explained TLS failure in `e`'s causes, if the handshake is what failed.
fn tls_failure(e: &tokio_postgres::Error) -> Option<String> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<crate::node::tls::TlsError>() {
            return Some(t.to_string());
        }
        cause = c.source();
    }
    None
}
