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
/// which of some rows of `$1` (given as a `jsonb` array of rows, their columns by name)
/// it refers to: their positions in the array, from 1.
const REFERENCE_CHECKS: &str = "\
    SELECT con.conrelid::regclass::text, \
           pg_catalog.format('SELECT x.i FROM pg_catalog.jsonb_array_elements($1::text::jsonb) WITH ORDINALITY x(e, i) \
                                CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::%s, x.e) r \
                               WHERE EXISTS (SELECT 1 FROM %s c WHERE %s)', \
             con.confrelid::regclass, con.conrelid::regclass, \
             (SELECT pg_catalog.string_agg(pg_catalog.format('c.%I = r.%I', ca.attname, pa.attname), ' AND ') \
                FROM ROWS FROM (pg_catalog.unnest(con.conkey), pg_catalog.unnest(con.confkey)) k(c, p) \
                JOIN pg_catalog.pg_attribute ca ON ca.attrelid = con.conrelid AND ca.attnum = k.c \
                JOIN pg_catalog.pg_attribute pa ON pa.attrelid = con.confrelid AND pa.attnum = k.p)) \
      FROM pg_catalog.pg_constraint con \
     WHERE con.contype = 'f' AND con.confrelid = $1::text::regclass \
     ORDER BY 1";

/// The old rows a transaction's deletes keep for the check at most: a transaction that
/// deletes more (a table emptied) is applied as it came, unchecked, with a warning, so
/// that a sidecar's memory stays bounded (ARCHITECTURE.md, invariant 6).
const DELETED_BYTES: usize = 32 << 20;

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
    /// Per relation (its target table's): the referring tables and their checks.
    checks: HashMap<u32, Arc<Vec<(String, String)>>>,
    deleted: Vec<Deleted>,
    /// The bytes of `deleted`'s rows; past [`DELETED_BYTES`], no more are kept.
    deleted_bytes: usize,
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
        self.deleted_bytes = 0;
        self.resend.clear();
    }
}

impl ApplyWorker {
    /// The foreign keys into `m`'s table, read once per table (until a DDL).
    async fn reference_checks(
        &mut self,
        m: &Mapped,
    ) -> Result<Arc<Vec<(String, String)>>, ApplyError> {
        if let Some(c) = self.references.checks.get(&m.id) {
            return Ok(c.clone());
        }
        let table = m.target.qualified();
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
        self.references.checks.insert(m.id, checks.clone());
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
        if self.references.deleted_bytes > DELETED_BYTES
            || self.reference_checks(m).await?.is_empty()
        {
            return Ok(());
        }
        self.references.deleted_bytes += old.0.iter().map(Value::as_bytes_len).sum::<usize>() + 64;
        if self.references.deleted_bytes > DELETED_BYTES {
            tracing::warn!(
                link = %self.link, table = %m.target.qualified(),
                "a transaction deletes more than {} MiB of rows that foreign keys may point at: the rest of its \
                 deletes are applied without looking for rows that still refer to them (decision 0016)",
                DELETED_BYTES >> 20
            );
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
    /// the conflict recorded, and the row kept to send again after the commit. One query
    /// per foreign key into each table, for all the rows deleted from it.
    pub(super) async fn keep_referenced_rows(&mut self) -> Result<(), ApplyError> {
        if self.references.deleted.is_empty() {
            return Ok(());
        }
        self.flush_runs().await?;
        self.flush().await?;
        let mut deleted = std::mem::take(&mut self.references.deleted);
        self.references.deleted_bytes = 0;
        while !deleted.is_empty() {
            let relation = deleted[0].m.id;
            let (of_table, rest): (Vec<Deleted>, Vec<Deleted>) =
                deleted.into_iter().partition(|d| d.m.id == relation);
            deleted = rest;
            let referring = self.referred_to(&of_table).await?;
            for (d, referring) in of_table.iter().zip(referring) {
                if let Some(referring) = referring {
                    self.keep_row(d, &referring).await?;
                }
            }
        }
        Ok(())
    }

    /// For each of `rows` (all of one table), the first table whose rows refer to it.
    async fn referred_to(&mut self, rows: &[Deleted]) -> Result<Vec<Option<String>>, ApplyError> {
        let images =
            serde_json::Value::Array(rows.iter().map(|d| d.m.source_image(&d.old)).collect())
                .to_string();
        let mut referring = vec![None; rows.len()];
        for (table, check) in self.reference_checks(&rows[0].m).await?.iter() {
            let found = self
                .client
                .query(check.as_str(), &[&images])
                .await
                .map_err(SqlError::of(format!(
                    "looking for rows of {table} that refer to deleted rows"
                )))?;
            for r in found {
                let i = r.get::<_, i64>(0) as usize - 1;
                if let Some(slot @ None) = referring.get_mut(i) {
                    *slot = Some(table.clone());
                }
            }
        }
        Ok(referring)
    }

    /// Writes the deleted row `d` back (rows of `referring` refer to it), records it, and
    /// keeps it to send again. Nothing if the row is here (its delete was not applied).
    async fn keep_row(&mut self, d: &Deleted, referring: &str) -> Result<(), ApplyError> {
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
            return Ok(());
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
        Ok(())
    }

    /// After the commit (sent, of the transaction that ends at `end` in the source): the
    /// rows kept are written once more as this node's own change, so that every node gets
    /// them again. Only if that commit moved the link's progress: requests are pipelined,
    /// and a failed transaction's COMMIT is a ROLLBACK that lets what follows run (its
    /// rows are then kept again when it is applied again). The session's origin is
    /// released first (the next transaction sets it up again).
    pub(super) async fn resend_kept_rows(
        &mut self,
        end: crate::lsn::Lsn,
    ) -> Result<(), ApplyError> {
        if self.references.resend.is_empty() {
            return Ok(());
        }
        let committed = format!(
            "EXISTS (SELECT 1 FROM walsync.link_progress WHERE link = {} AND source_lsn >= {}::pg_lsn)",
            quote_literal(&self.link),
            quote_literal(&end.to_string())
        );
        let updates = std::mem::take(&mut self.references.resend)
            .into_iter()
            .map(|u| format!("{u} AND {committed}"))
            .collect::<Vec<_>>()
            .join("; ");
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
