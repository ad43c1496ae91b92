//! Reads a target table's shape from the target's own catalog.

use tokio_postgres::Client;

use super::ApplyError;
use crate::merge::statements::TargetTable;

/// The table `schema.name` on the target: its writable columns (generated and dropped
/// ones left out) and the columns of its primary key, or else its replica identity index.
/// `None` if there is no such table.
pub async fn target_table(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<TargetTable>, ApplyError> {
    let what = || format!("reading the catalog entry of {schema}.{name}");
    let oid: Option<u32> = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(ApplyError::sql(what()))?
        .map(|r| r.get(0));
    let Some(oid) = oid else {
        return Ok(None);
    };
    let columns = names(
        client,
        "SELECT attname::text FROM pg_attribute \
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
        oid,
        &what(),
    )
    .await?;
    let key_names = names(
        client,
        "SELECT a.attname::text FROM \
           (SELECT indrelid, indkey FROM pg_index WHERE indrelid = $1 AND (indisprimary OR indisreplident) \
            ORDER BY indisprimary DESC LIMIT 1) i \
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         ORDER BY k.ord",
        oid,
        &what(),
    )
    .await?;
    let key = key_names
        .iter()
        .filter_map(|k| columns.iter().position(|c| c == k))
        .collect();
    Ok(Some(TargetTable {
        schema: schema.to_string(),
        name: name.to_string(),
        columns,
        key,
    }))
}

/// The first column of every row of `sql` run with the table's oid.
async fn names(
    client: &Client,
    sql: &str,
    oid: u32,
    what: &str,
) -> Result<Vec<String>, ApplyError> {
    let rows = client
        .query(sql, &[&oid])
        .await
        .map_err(ApplyError::sql(what))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
