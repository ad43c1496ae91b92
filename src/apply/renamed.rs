//! Rows written in a shape the target no longer has because a captured rename ran here
//! meanwhile: a branch cut off while main renamed a column (or a table) sends its rows
//! under the old name once it is back. They are applied under the new name, as the
//! renames captured in `walsync.ddl_log` say (every node keeps every node's DDL there,
//! in the order it ran), instead of stopping the link on a "missing" column.

use tokio_postgres::Client;

use super::ApplyError;
use crate::ddl::{rename, renamed_column, statement_to_replay, Rename};
use crate::merge::statements::TargetTable;
use crate::pgoutput::Relation;
use crate::sql_error::SqlError;

/// Every rename of a table or column captured on any node, oldest first.
pub(super) async fn captured_renames(client: &Client) -> Result<Vec<Rename>, ApplyError> {
    let rows = client
        .query(
            "SELECT query, statement_index FROM walsync.ddl_log \
             WHERE command_tag LIKE '%ALTER TABLE%' AND query ILIKE '%rename%' \
             ORDER BY captured_at, origin, seq",
            &[],
        )
        .await
        .map_err(SqlError::of_bookkeeping(
            "reading the renames in walsync.ddl_log",
        ))?;
    Ok(rows
        .iter()
        .filter_map(|r| statement_to_replay(r.get(0), r.get(1)).ok())
        .filter_map(|statement| rename(&statement))
        .collect())
}

/// `source` with each column the target lacks called by its name after `renames`, where
/// the target has that name (and the source does not send it as well).
pub(super) fn with_renamed_columns(
    mut source: Relation,
    target: &TargetTable,
    renames: &[Rename],
) -> Relation {
    let sent: Vec<String> = source.columns.iter().map(|c| c.name.clone()).collect();
    for column in &mut source.columns {
        if target.columns.contains(&column.name) {
            continue;
        }
        let renamed = renamed_column(renames, &source.namespace, &source.name, &column.name);
        if let Some(new) = renamed.filter(|n| target.columns.contains(n) && !sent.contains(n)) {
            tracing::debug!(table = %target.qualified(), from = %column.name, to = %new, "column renamed here: applied under its new name");
            column.name = new;
        }
    }
    source
}

/// Whether the target lacks a column the source sends.
pub(super) fn lacks_a_column(source: &Relation, target: &TargetTable) -> bool {
    source
        .columns
        .iter()
        .any(|c| !target.columns.contains(&c.name))
}
