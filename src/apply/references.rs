//! A delete of a row that other rows here still refer to (decision 0016).
//!
//! A replica applies with `session_replication_role = replica`, so no foreign key is
//! checked: a delete made on a node that did not know of a row referring to the deleted
//! one (a sale made at a store while main deleted its customer) would leave that row
//! pointing at nothing. So a delete of a row of a table that foreign keys point at is
//! noted, and before the transaction commits each noted row is looked for in the tables
//! that refer to it; one still referred to (its author did not know those rows: a
//! cascade would have deleted them in the same transaction, a RESTRICT would have
//! refused) is written back from the delete's old image (REPLICA IDENTITY FULL) and the
//! conflict is recorded (`delete_referenced`). After the commit the row is written once
//! more as this node's own change (a no-op update, no origin): every other node gets it
//! as an update later than the delete, which brings the row back there
//! (`Rule::decide_update_deleted`), the deleting node included.

use std::collections::HashMap;
use std::sync::Arc;

use super::conflict::Record;
use super::{ApplyError, ApplyWorker, Mapped};
use crate::merge::conflict::{ConflictKind, Outcome, REFERENCED_ROW_STAYS};
use crate::merge::statements::Shape;
use crate::names::quote_literal;
use crate::pgoutput::{Tuple, Value};
use crate::sql_error::SqlError;

/// For each foreign key into table `$1`: the referring table, and a query that tells
/// whether a row of `$1` (given as `jsonb`, its columns by name) is referred to by it.
const REFERENCE_CHECKS: &str = "\
    SELECT con.conrelid::regclass::text, \
           pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %s c, pg_catalog.jsonb_populate_record(NULL::%s, $1::text::jsonb) r WHERE %s)', \
             con.conrelid::regclass, con.confrelid::regclass, \
             (SELECT pg_catalog.string_agg(pg_catalog.format('c.%I = r.%I', ca.attname, pa.attname), ' AND ') \
                FROM ROWS FROM (pg_catalog.unnest(con.conkey), pg_catalog.unnest(con.confkey)) k(c, p) \
                JOIN pg_catalog.pg_attribute ca ON ca.attrelid = con.conrelid AND ca.attnum = k.c \
                JOIN pg_catalog.pg_attribute pa ON pa.attrelid = con.confrelid AND pa.attnum = k.p)) \
      FROM pg_catalog.pg_constraint con \
     WHERE con.contype = 'f' AND con.confrelid = $1::text::regclass \
     ORDER BY 1";

/// A row the open transaction deleted from a table that foreign keys point at.
struct Deleted {
    m: Mapped,
    key: Vec<Value>,
    old: Tuple,
}

/// What the applier keeps for this: the checks per table, the rows deleted in the open
/// transaction, the rows kept to send again after its commit.
#[derive(Default)]
pub(super) struct References {
    /// Per target table (quoted, qualified): the referring tables and their checks.
    checks: HashMap<String, Arc<Vec<(String, String)>>>,
    deleted: Vec<Deleted>,
    resend: Vec<String>,
}

impl References {
    /// Tables may have changed shape (a DDL here): their foreign keys are read again.
    pub(super) fn forget_checks(&mut self) {
        self.checks.clear();
    }

    /// The open transaction is abandoned (applied again, or set aside).
    pub(super) fn forget_transaction(&mut self) {
        self.deleted.clear();
        self.resend.clear();
    }
}

impl ApplyWorker {
    /// The foreign keys into `m`'s table, read once per table (until a DDL).
    async fn reference_checks(
        &mut self,
        m: &Mapped,
    ) -> Result<Arc<Vec<(String, String)>>, ApplyError> {
        let table = m.target.qualified();
        if let Some(c) = self.references.checks.get(&table) {
            return Ok(c.clone());
        }
        self.flush_runs().await?;
        self.flush().await?;
        let rows = self
            .client
            .query(REFERENCE_CHECKS, &[&table])
            .await
            .map_err(SqlError::of(format!(
                "reading the foreign keys into {table}"
            )))?;
        let checks: Arc<Vec<(String, String)>> =
            Arc::new(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
        self.references.checks.insert(table, checks.clone());
        Ok(checks)
    }

    /// Notes a delete (of the row `old`, whole, with key `key`) for the check at commit,
    /// if foreign keys point at its table.
    pub(super) async fn note_delete(
        &mut self,
        m: &Mapped,
        key: &[Value],
        old: &Tuple,
    ) -> Result<(), ApplyError> {
        if self.reference_checks(m).await?.is_empty() {
            return Ok(());
        }
        self.references.deleted.push(Deleted {
            m: m.clone(),
            key: key.to_vec(),
            old: old.clone(),
        });
        Ok(())
    }

    /// Before the commit: each noted row that rows here still refer to is written back,
    /// the conflict recorded, and the row kept to send again after the commit.
    pub(super) async fn keep_referenced_rows(&mut self) -> Result<(), ApplyError> {
        if self.references.deleted.is_empty() {
            return Ok(());
        }
        self.flush_runs().await?;
        self.flush().await?;
        for d in std::mem::take(&mut self.references.deleted) {
            let Some(referring) = self.referred_to_by(&d).await? else {
                continue;
            };
            let table = d.m.target.qualified();
            let write = d.m.insert(&d.old)?;
            let Shape::Insert { columns, .. } = write.shape else {
                unreachable!("RelationMap::insert makes Shape::Insert");
            };
            let stmt = self
                .statement(&d.m, Shape::InsertOrNothing { columns })
                .await?;
            let params: Vec<super::param::Param> =
                write.params.iter().map(super::param::Param).collect();
            let written = self
                .client
                .execute_raw(&stmt, params)
                .await
                .map_err(SqlError::of(format!(
                    "writing back a referenced row of {table}"
                )))?;
            if written == 0 {
                // The delete was not applied (a later update here won): nothing to do.
                continue;
            }
            self.rows_in_txn += 1;
            let record = Record {
                kind: ConflictKind::DeleteReferenced,
                key: d.m.key_image(&d.key),
                local: None,
                remote: d.m.source_image(&d.old),
                rule: REFERENCED_ROW_STAYS,
                outcome: Outcome::LocalKept,
                detail: Some(format!(
                    "rows of {referring} here still refer to it (written where the delete's author did not know them): \
                     kept, and sent again to every node, where it comes back"
                )),
            };
            self.record(d.m.id, record).await?;
            self.references.resend.push(resend_sql(&d.m, &d.key));
        }
        Ok(())
    }

    /// The first table whose rows refer to the deleted row `d`, if any.
    async fn referred_to_by(&mut self, d: &Deleted) -> Result<Option<String>, ApplyError> {
        let image = d.m.source_image(&d.old).to_string();
        for (referring, check) in self.reference_checks(&d.m).await?.iter() {
            let found: bool = self
                .client
                .query_one(check.as_str(), &[&image])
                .await
                .map_err(SqlError::of(format!(
                    "looking for rows of {referring} that refer to a deleted row"
                )))?
                .get(0);
            if found {
                return Ok(Some(referring.clone()));
            }
        }
        Ok(None)
    }

    /// After the commit: the rows kept are written once more as this node's own change,
    /// so that every node gets them again. The session's origin is released first (the
    /// next transaction sets it up again).
    pub(super) async fn resend_kept_rows(&mut self) -> Result<(), ApplyError> {
        if self.references.resend.is_empty() {
            return Ok(());
        }
        let updates = std::mem::take(&mut self.references.resend).join("; ");
        self.release_origin().await?;
        self.send_batch(
            format!("BEGIN; {updates}; COMMIT"),
            "sending a row kept from a delete again as this node's own change",
        )
        .await
    }
}

/// A no-op update of the row with `key` (target key order), by its key.
fn resend_sql(m: &Mapped, key: &[Value]) -> String {
    let columns: Vec<String> = m
        .target
        .key
        .iter()
        .map(|&i| crate::names::quote_ident(&m.target.columns[i]))
        .collect();
    let set = columns
        .iter()
        .map(|c| format!("{c} = {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let filter = columns
        .iter()
        .zip(key)
        .map(|(c, v)| match v {
            Value::Text(b) => format!("{c} = {}", quote_literal(&String::from_utf8_lossy(b))),
            _ => format!("{c} IS NULL"),
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    format!("UPDATE {} SET {set} WHERE {filter}", m.target.qualified())
}
