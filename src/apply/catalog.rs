//! Reads a target table's shape from the target's own catalog.

use tokio_postgres::Client;

use super::ApplyError;
use crate::merge::statements::{TargetTable, UniqueKey};

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
    let key: Vec<usize> = key_names
        .iter()
        .filter_map(|k| columns.iter().position(|c| c == k))
        .collect();
    let uniques = unique_keys(client, oid, &columns, &what())
        .await?
        .into_iter()
        .filter(|u| u.columns != key)
        .collect();
    Ok(Some(TargetTable {
        schema: schema.to_string(),
        name: name.to_string(),
        columns,
        key,
        uniques,
    }))
}

/// The table's unique keys other than the primary key, on plain columns and enforced at
/// once (an expression, a predicate or a deferred check is left out: its collisions stop
/// the link with an error instead of being settled).
async fn unique_keys(
    client: &Client,
    oid: u32,
    columns: &[String],
    what: &str,
) -> Result<Vec<UniqueKey>, ApplyError> {
    let rows = client
        .query(
            "SELECT c.relname::text, \
               array_agg(a.attname::text ORDER BY k.ord), \
               array_agg(t.typname::text ORDER BY k.ord), \
               array_agg(a.atttypmod ORDER BY k.ord) \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             JOIN pg_type t ON t.oid = a.atttypid \
             WHERE i.indrelid = $1 AND i.indisunique AND NOT i.indisprimary AND i.indimmediate \
               AND i.indpred IS NULL AND i.indexprs IS NULL \
             GROUP BY c.relname ORDER BY c.relname",
            &[&oid],
        )
        .await
        .map_err(ApplyError::sql(what))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let names: Vec<String> = r.get(1);
            let types: Vec<String> = r.get(2);
            let typmods: Vec<i32> = r.get(3);
            let idx: Option<Vec<usize>> = names
                .iter()
                .map(|n| columns.iter().position(|c| c == n))
                .collect();
            let idx = idx?;
            let renamable = (0..idx.len())
                .find(|&i| matches!(types[i].as_str(), "text" | "varchar" | "citext"))
                .map(|i| {
                    // varchar(n) stores n + 4 (the varlena header) in atttypmod.
                    let limit = (types[i] == "varchar" && typmods[i] > 4)
                        .then(|| (typmods[i] - 4) as usize);
                    (idx[i], limit)
                });
            Some(UniqueKey {
                name: r.get(0),
                columns: idx,
                renamable,
            })
        })
        .collect())
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
