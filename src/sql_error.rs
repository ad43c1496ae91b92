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

/// What a server's refusal of a statement means to walsync, read from its SQLSTATE (and
/// the constraint it names): pure, so the reading is tested without a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// What the statement creates exists already: a relation (table, index, sequence),
    /// a column or another object (a constraint).
    Exists,
    /// The statement lost a race with another session of the server, not with the
    /// schema: a deadlock, or a catalog's unique index (`pg_type_typname_nsp_index`) when
    /// both created one name at once. Running it again settles it.
    RacedAnotherSession,
    /// The row's values do not fit the table: a data exception (class 22: too long, out
    /// of range, not of the type), a NULL where NOT NULL, a CHECK violated.
    DoesNotFit,
    /// A unique index of the table refused a value.
    Duplicate,
    /// Anything else.
    Other,
}

impl Refusal {
    /// The refusal with SQLSTATE `code`, naming `constraint` if any.
    pub fn of_code(code: &str, constraint: Option<&str>) -> Refusal {
        match code {
            // duplicate_table, duplicate_column, duplicate_object
            "42P07" | "42701" | "42710" => Refusal::Exists,
            // deadlock_detected
            "40P01" => Refusal::RacedAnotherSession,
            // unique_violation: a catalog's index is a race, a table's a duplicate
            "23505" if constraint.is_some_and(|c| c.starts_with("pg_")) => {
                Refusal::RacedAnotherSession
            }
            "23505" => Refusal::Duplicate,
            // not_null_violation, check_violation, class 22
            "23502" | "23514" => Refusal::DoesNotFit,
            c if c.starts_with("22") => Refusal::DoesNotFit,
            _ => Refusal::Other,
        }
    }

    /// The refusal `e` reports; `None` when the server gave no answer (the connection
    /// failed under the statement).
    pub fn of(e: &tokio_postgres::Error) -> Option<Refusal> {
        let db = e.as_db_error()?;
        Some(Refusal::of_code(db.code().code(), db.constraint()))
    }

    /// Whether `e` is a refusal of this kind.
    pub fn is(self, e: &tokio_postgres::Error) -> bool {
        Refusal::of(e) == Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::Refusal;

    #[test]
    fn a_refusal_is_read_from_its_sqlstate_and_constraint() {
        for (code, constraint, refusal) in [
            ("42P07", None, Refusal::Exists),
            ("42701", None, Refusal::Exists),
            ("42710", None, Refusal::Exists),
            ("40P01", None, Refusal::RacedAnotherSession),
            (
                "23505",
                Some("pg_type_typname_nsp_index"),
                Refusal::RacedAnotherSession,
            ),
            (
                "23505",
                Some("pg_class_relname_nsp_index"),
                Refusal::RacedAnotherSession,
            ),
            ("23505", Some("partner_email_key"), Refusal::Duplicate),
            ("23505", None, Refusal::Duplicate),
            ("22001", None, Refusal::DoesNotFit),
            ("22P02", None, Refusal::DoesNotFit),
            ("23502", None, Refusal::DoesNotFit),
            ("23514", None, Refusal::DoesNotFit),
            ("23503", None, Refusal::Other),
            ("42P01", None, Refusal::Other),
        ] {
            assert_eq!(
                Refusal::of_code(code, constraint),
                refusal,
                "{code} {constraint:?}"
            );
        }
    }
}
