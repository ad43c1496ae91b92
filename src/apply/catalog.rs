//! Reads a target table's shape from the target's own catalog.

use tokio_postgres::Client;

use super::ApplyError;
use crate::merge::statements::{IndexLookup, TargetTable, UniqueKey};
use crate::sql_error::SqlError;

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
        .map_err(SqlError::of(what()))?
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
    // Named so that the apply session finds them whatever its search_path.
    let types = names(
        client,
        "SELECT CASE WHEN n.nspname = 'pg_catalog' THEN format_type(a.atttypid, NULL) \
                     ELSE quote_ident(n.nspname) || '.' || quote_ident(t.typname) END \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace \
         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
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
        .filter(|u| u.lookup.is_some() || u.columns != key)
        .collect();
    Ok(Some(TargetTable {
        schema: schema.to_string(),
        name: name.to_string(),
        columns,
        types,
        key,
        uniques,
    }))
}

/// The table's unique indexes other than the primary key. Plain ones (columns compared
/// with `=`, checked at once) are found by their columns; an index on expressions, a
/// partial one or a deferrable one carries an [`IndexLookup`]: its own definition, which
/// finds colliding rows whatever it computes.
async fn unique_keys(
    client: &Client,
    oid: u32,
    columns: &[String],
    what: &str,
) -> Result<Vec<UniqueKey>, ApplyError> {
    // Per index: its key positions (a column name, or '' for an expression) with their
    // SQL, the columns it reads anywhere (pg_depend holds them, expressions and
    // predicate included), their types, and its predicate.
    let rows = client
        .query(
            "SELECT c.relname::text, \
               (i.indpred IS NULL AND i.indexprs IS NULL AND i.indimmediate), \
               (SELECT array_agg(coalesce(a.attname::text, '') ORDER BY k.ord) \
                  FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
                  LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                  WHERE k.ord <= i.indnkeyatts), \
               (SELECT array_agg(pg_get_indexdef(i.indexrelid, k::int, true) ORDER BY k) \
                  FROM generate_series(1, i.indnkeyatts) k), \
               r.names, r.types, \
               pg_get_expr(i.indpred, i.indrelid, true) \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             CROSS JOIN LATERAL ( \
               SELECT array_agg(a.attname::text ORDER BY a.attnum) AS names, \
                      array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) AS types \
               FROM pg_attribute a \
               WHERE a.attrelid = i.indrelid AND a.attnum > 0 AND NOT a.attisdropped \
                 AND (a.attnum = ANY (i.indkey::int2[]) OR EXISTS ( \
                   SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                     AND d.objid = i.indexrelid AND d.refclassid = 'pg_class'::regclass \
                     AND d.refobjid = i.indrelid AND d.refobjsubid = a.attnum))) r \
             WHERE i.indrelid = $1 AND i.indisunique AND NOT i.indisprimary AND i.indisvalid \
             ORDER BY c.relname",
            &[&oid],
        )
        .await
        .map_err(SqlError::of(what))?;
    let mut keys = Vec::new();
    for r in &rows {
        let plain: bool = r.get(1);
        let positions: Vec<String> = r.get::<_, Option<Vec<String>>>(2).unwrap_or_default();
        let key_sql: Vec<String> = r.get::<_, Option<Vec<String>>>(3).unwrap_or_default();
        let read: Vec<String> = r.get::<_, Option<Vec<String>>>(4).unwrap_or_default();
        let types: Vec<String> = r.get::<_, Option<Vec<String>>>(5).unwrap_or_default();
        let predicate: Option<String> = r.get(6);
        let index_of = |name: &str| columns.iter().position(|c| c == name);
        // The columns whose values make the key: plain positions, and the columns an
        // expression position reads (not the predicate's: renaming those changes which
        // rows the index covers, not their key).
        let mut key_columns: Vec<String> = Vec::new();
        for (position, sql) in positions.iter().zip(&key_sql) {
            let names = if position.is_empty() {
                crate::ddl::columns_read(sql)
            } else {
                vec![position.clone()]
            };
            for n in names {
                if !key_columns.contains(&n) {
                    key_columns.push(n);
                }
            }
        }
        let type_of = |name: &str| {
            read.iter()
                .position(|c| c == name)
                .map(|i| types[i].as_str())
        };
        let renamable = key_columns.iter().find_map(|name| {
            let ty = type_of(name)?;
            let limit = if ty == "text" || ty == "citext" || ty == "character varying" {
                None
            } else if let Some(n) = ty
                .strip_prefix("character varying(")
                .and_then(|t| t.strip_suffix(')'))
            {
                Some(n.parse::<usize>().ok()?)
            } else {
                return None;
            };
            Some((index_of(name)?, limit))
        });
        let name: String = r.get(0);
        // A plain key is found by its columns; any other by its definition, fed every
        // column it reads.
        let (found_by, lookup) = if plain {
            (&positions, None)
        } else {
            (
                &read,
                Some(IndexLookup {
                    keys: key_sql,
                    predicate,
                    types,
                }),
            )
        };
        let Some(columns) = found_by
            .iter()
            .map(|p| index_of(p))
            .collect::<Option<Vec<usize>>>()
        else {
            continue;
        };
        keys.push(UniqueKey {
            name,
            columns,
            renamable,
            lookup,
        });
    }
    Ok(keys)
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
        .map_err(SqlError::of(what))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
