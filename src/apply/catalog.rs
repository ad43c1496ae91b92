//! Reads a target table's shape from the target's own catalog.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::ApplyError;
use crate::merge::statements::{IndexLookup, TargetTable, UniqueKey};
use crate::sql_error::SqlError;

/// The table with `$1.$2` as its schema and name, if it is one (an ordinary or a
/// partitioned table): every catalog read below finds its table by this, so that all of
/// them can go at once.
const TABLE_OID: &str =
    "(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))";

/// Reads target tables from the catalog of the session it is used with, each table in
/// one round trip: its queries are prepared there on first use, then sent together.
#[derive(Default)]
pub struct CatalogReader {
    prepared: Option<Reads>,
}

/// The prepared catalog reads, each run with a table's schema and name.
struct Reads {
    exists: Statement,
    columns: Statement,
    key: Statement,
    uniques: Statement,
    warned: Statement,
}

/// A table as the target's catalog has it.
pub struct CatalogEntry {
    pub table: TargetTable,
    /// Its columns that an open DDL warning says each node filled with its own values
    /// (`walsync.ddl_warnings`).
    pub per_node_columns: Vec<String>,
}

impl CatalogReader {
    /// The table `schema.name` on the target: its writable columns (generated and dropped
    /// ones left out), the columns of its primary key, or else of its replica identity
    /// index, and its other unique keys. `None` if there is no such table.
    pub async fn table(
        &mut self,
        client: &Client,
        schema: &str,
        name: &str,
    ) -> Result<Option<CatalogEntry>, ApplyError> {
        let what = || format!("reading the catalog entry of {schema}.{name}");
        if self.prepared.is_none() {
            self.prepared = Some(Reads::prepare(client).await?);
        }
        let reads = self.prepared.as_ref().expect("prepared above");
        let params: [&(dyn ToSql + Sync); 2] = [&schema, &name];
        let (exists, columns, key, uniques, warned) = tokio::try_join!(
            client.query_opt(&reads.exists, &params),
            client.query(&reads.columns, &params),
            client.query(&reads.key, &params),
            client.query(&reads.uniques, &params),
            client.query_one(&reads.warned, &params),
        )
        .map_err(SqlError::of(what()))?;
        if exists.is_none() {
            return Ok(None);
        }
        let types = columns.iter().map(|r| r.get(1)).collect();
        let columns: Vec<String> = columns.iter().map(|r| r.get(0)).collect();
        let key: Vec<usize> = key
            .iter()
            .filter_map(|r| columns.iter().position(|c| *c == r.get::<_, String>(0)))
            .collect();
        let uniques = unique_keys(&uniques, &columns)
            .into_iter()
            .filter(|u| u.lookup.is_some() || u.columns != key)
            .collect();
        Ok(Some(CatalogEntry {
            table: TargetTable {
                schema: schema.to_string(),
                name: name.to_string(),
                columns,
                types,
                key,
                uniques,
            },
            per_node_columns: warned.get(0),
        }))
    }
}

impl Reads {
    async fn prepare(client: &Client) -> Result<Reads, ApplyError> {
        let sql = [
            // A row only if the table is there.
            format!("SELECT 1 WHERE {TABLE_OID} IS NOT NULL"),
            // Types named so that the apply session finds them whatever its search_path.
            format!(
                "SELECT a.attname::text, \
                   CASE WHEN tn.nspname = 'pg_catalog' THEN format_type(a.atttypid, NULL) \
                        ELSE quote_ident(tn.nspname) || '.' || quote_ident(t.typname) END \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 JOIN pg_namespace tn ON tn.oid = t.typnamespace \
                 WHERE a.attrelid = {TABLE_OID} AND a.attnum > 0 AND NOT a.attisdropped \
                   AND a.attgenerated = '' ORDER BY a.attnum"
            ),
            format!(
                "SELECT a.attname::text FROM \
                   (SELECT indrelid, indkey FROM pg_index \
                    WHERE indrelid = {TABLE_OID} AND (indisprimary OR indisreplident) \
                    ORDER BY indisprimary DESC LIMIT 1) i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 ORDER BY k.ord"
            ),
            // Per unique index but the primary key: its key positions (a column name, or ''
            // for an expression) with their SQL, the columns it reads anywhere (pg_depend
            // holds them, expressions and predicate included), their types, its predicate.
            format!(
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
                 WHERE i.indrelid = {TABLE_OID} AND i.indisunique AND NOT i.indisprimary \
                   AND i.indisvalid \
                 ORDER BY c.relname"
            ),
            "SELECT coalesce(array_agg(DISTINCT c), '{}') FROM walsync.ddl_warnings w, unnest(w.columns) c \
             WHERE w.resolved_at IS NULL AND w.table_schema = $1 AND w.table_name = $2"
                .to_string(),
        ];
        let (exists, columns, key, uniques, warned) = tokio::try_join!(
            client.prepare(&sql[0]),
            client.prepare(&sql[1]),
            client.prepare(&sql[2]),
            client.prepare(&sql[3]),
            client.prepare(&sql[4]),
        )
        .map_err(SqlError::of("preparing the catalog reads"))?;
        Ok(Reads {
            exists,
            columns,
            key,
            uniques,
            warned,
        })
    }
}

/// The unique indexes other than the primary key, from the rows of the `uniques` read
/// (`columns`: the table's). Plain ones (columns compared
/// with `=`, checked at once) are found by their columns; an index on expressions, a
/// partial one or a deferrable one carries an [`IndexLookup`]: its own definition, which
/// finds colliding rows whatever it computes.
fn unique_keys(rows: &[Row], columns: &[String]) -> Vec<UniqueKey> {
    let mut keys = Vec::new();
    for r in rows {
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
    keys
}
