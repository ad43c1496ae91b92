//! Changes for what this node dropped. A peer that was cut off while a DROP TABLE or DROP
//! COLUMN ran here (or arrived here) still sends rows for the dropped table or column
//! once it is back. Stopping the link on a "missing" table would hold up everything
//! behind them for good; applying what still fits and recording the rest does not lose
//! them either: a change for a dropped table is recorded whole in `walsync.conflicts`
//! (`table_dropped`), a change that set dropped columns is applied without them and
//! recorded with their values (`column_dropped`). What counts as dropped is what
//! `walsync.dropped_objects` says (filled by an event trigger); a table or column missing
//! for any other reason still stops the link as a schema difference.

use tokio_postgres::Client;

use super::conflict::Record;
use super::{ApplyError, ApplyWorker, Gone, Mapped};
use crate::merge::conflict::{row_image, ConflictKind, DROPPED_HERE};
use crate::merge::statements::TargetTable;
use crate::pgoutput::{Delete, Insert, OldTuple, Relation, Tuple, Update, Value};
use crate::sql_error::SqlError;

/// Whether this node dropped table `schema.name`.
pub(super) async fn table_was_dropped(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<bool, ApplyError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM walsync.dropped_objects \
             WHERE object_type = 'table' AND schema_name = $1 AND table_name = $2)",
            &[&schema, &name],
        )
        .await
        .map_err(SqlError::of(format!(
            "looking up whether {schema}.{name} was dropped here"
        )))?;
    Ok(row.get(0))
}

/// The source relation without the columns this node dropped from the target, and which
/// they were. A column missing for another reason stays, for the map to refuse.
pub(super) async fn without_dropped_columns(
    client: &Client,
    source: &Relation,
    target: &TargetTable,
) -> Result<(Relation, Gone), ApplyError> {
    let missing = |i: &usize| !target.columns.contains(&source.columns[*i].name);
    if !(0..source.columns.len()).any(|i| missing(&i)) {
        return Ok((source.clone(), Gone::Nothing));
    }
    let dropped: Vec<String> = client
        .query(
            "SELECT column_name FROM walsync.dropped_objects \
             WHERE object_type = 'table column' AND schema_name = $1 AND table_name = $2",
            &[&source.namespace, &source.name],
        )
        .await
        .map_err(SqlError::of(format!(
            "looking up the columns of {}.{} dropped here",
            source.namespace, source.name
        )))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let gone: Vec<usize> = (0..source.columns.len())
        .filter(|i| missing(i) && dropped.contains(&source.columns[*i].name))
        .collect();
    if gone.is_empty() {
        return Ok((source.clone(), Gone::Nothing));
    }
    let mut stripped = source.clone();
    stripped.columns = without(&source.columns, &gone);
    Ok((stripped, Gone::Columns(gone)))
}

fn without<T: Clone>(items: &[T], gone: &[usize]) -> Vec<T> {
    items
        .iter()
        .enumerate()
        .filter(|(i, _)| !gone.contains(i))
        .map(|(_, v)| v.clone())
        .collect()
}

fn strip(t: &Tuple, gone: &[usize]) -> Tuple {
    Tuple(without(&t.0, gone))
}

fn strip_old(o: &OldTuple, gone: &[usize]) -> OldTuple {
    match o {
        OldTuple::Key(t) => OldTuple::Key(strip(t, gone)),
        OldTuple::Full(t) => OldTuple::Full(strip(t, gone)),
    }
}

/// Whether a value was given (not NULL, not an unchanged TOAST marker).
fn given(v: &Value) -> bool {
    matches!(v, Value::Text(_) | Value::Binary(_))
}

impl ApplyWorker {
    pub(super) fn set_gone(&mut self, relation_id: u32, gone: Gone) {
        if let Some(e) = self.relations.get_mut(&relation_id) {
            e.gone = gone;
        }
    }

    /// An insert into a table this node dropped some columns of: what it sent for them
    /// is recorded, the rest applied.
    pub(super) async fn insert_without_columns(
        &mut self,
        m: &Mapped,
        ins: &Insert,
        cols: &[usize],
    ) -> Result<(), ApplyError> {
        if cols.iter().any(|&i| given(&ins.new.0[i])) {
            self.record_dropped(m.id, ConflictKind::ColumnDropped, &ins.new, cols)
                .await?;
        }
        let stripped = Insert {
            relation_id: m.id,
            new: strip(&ins.new, cols),
        };
        self.insert_mapped(m, &stripped).await
    }

    /// An update of a table this node dropped some columns of: a change to them is
    /// recorded, the rest applied.
    pub(super) async fn update_without_columns(
        &mut self,
        m: &Mapped,
        upd: &Update,
        cols: &[usize],
    ) -> Result<(), ApplyError> {
        let changed = cols.iter().any(|&i| {
            given(&upd.new.0[i])
                && match &upd.old {
                    Some(OldTuple::Full(old)) => old.0[i] != upd.new.0[i],
                    _ => true,
                }
        });
        if changed {
            self.record_dropped(m.id, ConflictKind::ColumnDropped, &upd.new, cols)
                .await?;
        }
        let stripped = Update {
            relation_id: m.id,
            old: upd.old.as_ref().map(|o| strip_old(o, cols)),
            new: strip(&upd.new, cols),
        };
        self.update_mapped(m, &stripped).await
    }

    /// A delete from a table this node dropped some columns of.
    pub(super) async fn delete_without_columns(
        &mut self,
        m: &Mapped,
        del: &Delete,
        cols: &[usize],
    ) -> Result<(), ApplyError> {
        let stripped = Delete {
            relation_id: m.id,
            old: strip_old(&del.old, cols),
        };
        self.delete_mapped(m, &stripped).await
    }

    /// Records a change (its whole row as sent) that met something dropped here.
    pub(super) async fn record_dropped(
        &mut self,
        relation_id: u32,
        kind: ConflictKind,
        row: &Tuple,
        dropped_columns: &[usize],
    ) -> Result<(), ApplyError> {
        let source = &self.relations[&relation_id].source;
        let table = format!("{}.{}", source.namespace, source.name);
        let detail = if dropped_columns.is_empty() {
            format!("table {table} was dropped on this node; the change was not applied")
        } else {
            let cols: Vec<&str> = dropped_columns
                .iter()
                .map(|&i| source.columns[i].name.as_str())
                .collect();
            format!(
                "column(s) {} of {table} were dropped on this node; the rest of the change was applied",
                cols.join(", ")
            )
        };
        self.record_row(relation_id, kind, DROPPED_HERE, row, detail)
            .await
    }

    /// Records a change that was not applied (or not wholly), with its whole row as sent.
    pub(super) async fn record_row(
        &mut self,
        relation_id: u32,
        kind: ConflictKind,
        rule: &'static str,
        row: &Tuple,
        detail: String,
    ) -> Result<(), ApplyError> {
        let entry = &self.relations[&relation_id];
        let source = &entry.source;
        let names: Vec<String> = source.columns.iter().map(|c| c.name.clone()).collect();
        // The target's primary key where the table is mapped here; else the columns the
        // source sent as its key (all of them under REPLICA IDENTITY FULL).
        let mapped_key = entry.map.as_ref().and_then(|m| {
            let values = m.key_values(None, Some(row)).ok()?;
            Some((m.key_names(), values))
        });
        let (key_names, key_values): (Vec<String>, Vec<Value>) = match mapped_key {
            Some(key) => key,
            None => source
                .columns
                .iter()
                .zip(&row.0)
                .filter(|(c, _)| c.is_key)
                .map(|(c, v)| (c.name.clone(), v.clone()))
                .unzip(),
        };
        let record = Record {
            kind,
            key: row_image(&key_names, &key_values),
            local: None,
            remote: row_image(&names, &row.0),
            rule,
            outcome: crate::merge::conflict::Outcome::Skipped,
            detail: Some(detail),
        };
        self.record(relation_id, record).await
    }
}
