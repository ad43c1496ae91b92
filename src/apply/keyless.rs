//! Tables without a primary key or replica identity index (an insert-only log, a copy a
//! DBA made with `CREATE TABLE ... AS`): applied as PostgreSQL's own apply does under
//! REPLICA IDENTITY FULL. Inserts take the usual fast path. An update or delete changes
//! the first row equal to its whole old image; where no row is equal (it was changed or
//! deleted here meanwhile), the change is recorded (`update_missing` / `delete_missing`)
//! and the link goes on. There is no key to tell two nodes' edits of one row apart, so
//! nothing is merged or ordered by commit time: the record is what is kept.

use super::conflict::Record;
use super::{ApplyError, ApplyWorker, Mapped, Tried};
use crate::merge::conflict::{ConflictKind, Outcome, NO_LOCAL_ROW};
use crate::merge::statements::{RowWrite, StatementError};
use crate::pgoutput::{Delete, Insert, OldTuple, Tuple, Update};

use super::param::Param;

impl ApplyWorker {
    /// An update of a keyless table.
    pub(super) async fn update_keyless(
        &mut self,
        m: &Mapped,
        upd: &Update,
    ) -> Result<(), ApplyError> {
        let write = match m.update_by_image(upd.old.as_ref(), &upd.new) {
            Ok(Some(w)) => w,
            Ok(None) => return Ok(()),
            Err(e @ StatementError::NoOldImage { .. }) => {
                let old = upd.old.as_ref().map(|o| match o {
                    OldTuple::Key(t) | OldTuple::Full(t) => t.clone(),
                });
                return self
                    .record_keyless(
                        m,
                        ConflictKind::UpdateMissing,
                        old.as_ref(),
                        &upd.new,
                        Some(e.to_string()),
                    )
                    .await;
            }
            Err(e) => return Err(e.into()),
        };
        let old = match &upd.old {
            Some(OldTuple::Full(t)) => t,
            _ => unreachable!("update_by_image wrote only with a whole old row"),
        };
        self.write_keyless(m, write, ConflictKind::UpdateMissing, old, &upd.new)
            .await
    }

    /// A delete from a keyless table.
    pub(super) async fn delete_keyless(
        &mut self,
        m: &Mapped,
        del: &Delete,
    ) -> Result<(), ApplyError> {
        let (OldTuple::Key(old) | OldTuple::Full(old)) = &del.old;
        match m.delete_by_image(&del.old) {
            Ok(write) => {
                self.write_keyless(m, write, ConflictKind::DeleteMissing, old, old)
                    .await
            }
            Err(e @ StatementError::NoOldImage { .. }) => {
                self.record_keyless(
                    m,
                    ConflictKind::DeleteMissing,
                    Some(old),
                    old,
                    Some(e.to_string()),
                )
                .await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A careful insert into a keyless table: written, or parked with a record if one of
    /// its unique indexes refuses it (there is no key to merge or rename by).
    pub(super) async fn insert_keyless_carefully(
        &mut self,
        m: &Mapped,
        ins: &Insert,
    ) -> Result<(), ApplyError> {
        let write = m.insert(&ins.new)?;
        if let Some(refused) = self.write_or_park(m, write).await? {
            let record = Record {
                kind: ConflictKind::InsertExists,
                key: serde_json::Value::Null,
                local: None,
                remote: m.source_image(&ins.new),
                rule: "none_applies",
                outcome: Outcome::Parked,
                detail: Some(format!(
                    "{refused}; the table has no primary key to settle the two rows by, so the incoming row \
                     was not written here. Settle them by hand, then walsync conflicts reapply this record"
                )),
            };
            self.record(m.id, record).await?;
        }
        Ok(())
    }

    /// Writes one change found by its old image, waiting for how many rows it changed:
    /// none means the row is not here as the author saw it, which is recorded.
    async fn write_keyless(
        &mut self,
        m: &Mapped,
        write: RowWrite,
        missing: ConflictKind,
        old: &Tuple,
        new: &Tuple,
    ) -> Result<(), ApplyError> {
        self.flush_runs().await?;
        let stmt = self.statement(m, write.shape).await?;
        self.flush().await?;
        self.rows_in_txn += 1;
        let params: Vec<Param> = write.params.iter().map(Param).collect();
        let table = self.table_name(m.id);
        match super::unless_duplicate(&self.client, &stmt, &super::as_params(&params))
            .await
            .map_err(|e| super::change_failed(table, e))?
        {
            Tried::Done(0) => self.record_keyless(m, missing, Some(old), new, None).await,
            Tried::Done(_) => Ok(()),
            Tried::Duplicate { message, .. } => {
                let record = Record {
                    kind: ConflictKind::UpdateExists,
                    key: m.source_image(old),
                    local: None,
                    remote: m.source_image(new),
                    rule: "none_applies",
                    outcome: Outcome::Parked,
                    detail: Some(format!(
                        "{message}; the table has no primary key to settle the two rows by, so the change \
                         was not written here"
                    )),
                };
                self.record(m.id, record).await
            }
        }
    }

    /// Records a change of a keyless table that found no row equal to its old image.
    async fn record_keyless(
        &mut self,
        m: &Mapped,
        kind: ConflictKind,
        old: Option<&Tuple>,
        new: &Tuple,
        detail: Option<String>,
    ) -> Result<(), ApplyError> {
        let record = Record {
            kind,
            // No key: the old row as the author saw it is what identifies the row.
            key: old.map_or(serde_json::Value::Null, |o| m.source_image(o)),
            local: None,
            remote: m.source_image(new),
            rule: NO_LOCAL_ROW,
            outcome: Outcome::Skipped,
            detail: detail.or_else(|| {
                Some("no row here equals the row the change was made on (the table has no primary key)".into())
            }),
        };
        self.record(m.id, record).await
    }
}
