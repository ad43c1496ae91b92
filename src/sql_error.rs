//! One SQL failure with what walsync was doing: the error type every layer's own errors
//! wrap for a failed statement. Shown as what was being done; the server's message
//! follows as its source (`observability::error_chain` prints both).

/// A statement that failed, and what it was for.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct SqlError {
    pub what: String,
    #[source]
    pub source: tokio_postgres::Error,
}

impl SqlError {
    /// The connection failed under the statement (closed, reset): no answer from the
    /// server, as opposed to an error it reported.
    pub fn is_connection_lost(&self) -> bool {
        self.source.as_db_error().is_none()
    }

    pub fn new(what: impl Into<String>, source: tokio_postgres::Error) -> SqlError {
        SqlError {
            what: what.into(),
            source,
        }
    }

    /// Wraps a failure of the statement run for `what` (for `map_err`).
    pub fn of(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SqlError {
        let what = what.into();
        move |source| SqlError { what, source }
    }

    /// Wraps a failure of a statement on walsync's own tables (for `map_err`). Only when
    /// the server says the table or schema is missing does the message point at
    /// `walsync init`; a lost connection or any other error is shown as it is.
    pub fn of_bookkeeping(
        what: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> SqlError {
        use tokio_postgres::error::SqlState;
        let what = what.into();
        move |source| {
            let missing = source.code().is_some_and(|c| {
                *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME
            });
            let what = if missing {
                format!("{what}: walsync's tables are missing here; run walsync init with this node's config")
            } else {
                what
            };
            SqlError { what, source }
        }
    }
}
