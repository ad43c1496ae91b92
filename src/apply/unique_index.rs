//! A unique index (or constraint) replayed over rows that violate it here: made on its
//! author while this node, cut off, wrote two rows with one value. Stopping the link
//! would hold up everything behind the statement; instead the rows are settled as the
//! author settled them when they arrived there, one by one as inserts (decision 0004:
//! the row kept by `merge::conflict::keeps_the_value`, the others' text value renamed
//! by `merge::conflict::renamed`, each recorded), and the index is built. The author's
//! own renames of these rows, when they come, write the same values.
//!
//! Only what renaming settles is done here: an index on expressions or with a `WHERE`,
//! one without a text column, one the table's policy parks or merges, a table without a
//! primary key, or a value too long to rename leaves the statement failing, as before.

use tokio_postgres::types::Type;

use super::conflict::Record;
use super::{ApplyError, ApplyWorker};
use crate::ddl::UniqueIndex;
use crate::merge::conflict::{
    keeps_the_value, renamed, row_image, ConflictKind, Outcome, Rule, Version,
};
use crate::merge::keys::{settlement, Settlement, UniquePolicy};
use crate::names::{quote_ident, quote_literal, quote_written};
use crate::pgoutput::Value;
use crate::sql_error::SqlError;

/// One row holding a duplicated value: its primary key and value as text, its version.
struct Holder {
    key: Vec<String>,
    value: String,
    version: Version,
}

impl ApplyWorker {
    /// Renames the values that keep `index` from being built on its table here, as the
    /// author settled them. `Ok(Err(why))`: renaming cannot settle it.
    pub(super) async fn settle_for_unique_index(
        &mut self,
        search_path: &str,
        index: &UniqueIndex,
    ) -> Result<Result<usize, String>, ApplyError> {
        let sql = |what: &'static str| SqlError::of(what);
        let (schema, name) = &index.table;
        let written = quote_written(schema.as_deref(), name);
        // The table as the statement's search_path finds it.
        self.client
            .query(
                "SELECT pg_catalog.set_config('search_path', $1, true)",
                &[&search_path],
            )
            .await
            .map_err(sql("setting the captured search_path"))?;
        let found = self
            .client
            .query_opt(
                "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = pg_catalog.to_regclass($1)",
                &[&written],
            )
            .await
            .map_err(sql("finding the table of a unique index"));
        self.client
            .batch_execute("RESET search_path")
            .await
            .map_err(sql("resetting the search_path"))?;
        let Some(table) = found? else {
            return Ok(Err(format!("table {written} is not here")));
        };
        let (oid, schema, name): (u32, String, String) = (table.get(0), table.get(1), table.get(2));
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        // The index's columns: the first text one is renamed (with its varchar limit).
        let columns = self
            .client
            .query(
                "SELECT a.attname::text, t.typcategory = 'S', \
                        CASE WHEN t.typname IN ('varchar', 'bpchar') AND a.atttypmod > 4 THEN a.atttypmod - 4 END \
                 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = $1 AND a.attname = ANY($2) AND NOT a.attisdropped \
                 ORDER BY array_position($2, a.attname::text)",
                &[&oid, &index.columns],
            )
            .await
            .map_err(sql("reading a unique index's columns"))?;
        if columns.len() != index.columns.len() {
            return Ok(Err("a column of the index is not here".into()));
        }
        let renamable = columns.iter().enumerate().find_map(|(i, c)| {
            let limit: Option<i32> = c.get(2);
            c.get::<_, bool>(1)
                .then_some((i, limit.map(|l| l as usize)))
        });
        let key: Vec<String> = self
            .client
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_index i \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&oid],
            )
            .await
            .map_err(sql("reading a table's primary key"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let policy = self.policies.get(&(schema.clone(), name.clone())).cloned();
        let policy = policy.as_ref();
        let (park, merge) = policy
            .map(|p| (p.park_unique.as_slice(), p.merge_unique.as_slice()))
            .unwrap_or_default();
        let unique = UniquePolicy { park, merge };
        let (column, limit) = match settlement(&index.name, renamable, !key.is_empty(), unique) {
            Settlement::Rename { column, limit } if !key.is_empty() => (column, limit),
            Settlement::Rename { .. } => return Ok(Err("the table has no primary key".into())),
            Settlement::Merge => {
                return Ok(Err(
                    "its rows would be merged, which is not done while an index is built".into(),
                ))
            }
            Settlement::Park { why } => return Ok(Err(why.to_string())),
        };
        let rule = Rule {
            prefer: policy
                .and_then(|p| p.prefer.as_deref())
                .map(|n| format!("walsync_{n}")),
        };
        let renamed_column = index.columns[column].clone();
        let holders = self
            .duplicates(&qualified, &index.columns, &key, &renamed_column)
            .await?;
        let mut renames = Vec::new();
        for group in &holders {
            let versions: Vec<Version> = group.iter().map(|h| h.version.clone()).collect();
            let kept = keeps_the_value(&rule, &versions);
            for (_, h) in group.iter().enumerate().filter(|(i, _)| *i != kept) {
                let Some(value) = renamed(&h.value, &h.key, limit) else {
                    return Ok(Err(format!(
                        "{renamed_column} is too short to hold a renamed value"
                    )));
                };
                renames.push((h, value, group[kept].version.clone()));
            }
        }
        let set_by_key = key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("pg_catalog.format('%s', {}) = ${}", quote_ident(k), i + 2))
            .collect::<Vec<_>>()
            .join(" AND ");
        // What the table's `on_rename` gives a loser besides, as a collision's rename does.
        let also: String = policy
            .map(|p| {
                p.on_rename
                    .iter()
                    .filter(|(c, _)| **c != renamed_column)
                    .map(|(c, v)| format!(", {} = {}", quote_ident(c), quote_literal(v)))
                    .collect()
            })
            .unwrap_or_default();
        let update = format!(
            "UPDATE {qualified} SET {} = $1{also} WHERE {set_by_key}",
            quote_ident(&renamed_column)
        );
        let types: Vec<Type> = vec![Type::TEXT; key.len() + 1];
        let stmt = self
            .client
            .prepare_typed(&update, &types)
            .await
            .map_err(sql("preparing the rename of a duplicated value"))?;
        let count = renames.len();
        for (h, value, kept_version) in renames {
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&value];
            params.extend(
                h.key
                    .iter()
                    .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync)),
            );
            self.client
                .execute(&stmt, &params)
                .await
                .map_err(sql("renaming a duplicated value"))?;
            let text = |s: &str| Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes()));
            let key_values: Vec<Value> = h.key.iter().map(|k| text(k)).collect();
            let mut names = key.clone();
            names.push(renamed_column.clone());
            let mut local = key_values.clone();
            local.push(text(&h.value));
            let (_, rule_name) = rule.remote_wins(&kept_version, &h.version);
            let record = Record {
                kind: ConflictKind::InsertExists,
                key: row_image(&key, &key_values),
                local: Some((row_image(&names, &local), h.version.clone())),
                remote: row_image(std::slice::from_ref(&renamed_column), &[text(&h.value)]),
                rule: rule_name,
                outcome: Outcome::LocalRenamed,
                detail: Some(format!(
                    "unique key {}: {renamed_column} = {} (renamed here so that the replayed unique index \
                     could be built: another row holds the value, as on the index's author)",
                    index.name,
                    serde_json::Value::String(value)
                )),
            };
            self.record_on((schema.clone(), name.clone()), record)
                .await?;
        }
        self.flush().await?;
        Ok(Ok(count))
    }

    /// The rows of `table` that share a value of `columns` (none NULL) with another
    /// row, grouped by it, each group in the order a peer applied them.
    async fn duplicates(
        &mut self,
        table: &str,
        columns: &[String],
        key: &[String],
        renamed: &str,
    ) -> Result<Vec<Vec<Holder>>, ApplyError> {
        let cols = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let text = |c: &str| format!("pg_catalog.format('%s', t.{})", quote_ident(c));
        let not_null = columns
            .iter()
            .map(|c| format!("{} IS NOT NULL", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let group = columns
            .iter()
            .map(|c| text(c))
            .collect::<Vec<_>>()
            .join(", ");
        let keys = key.iter().map(|k| text(k)).collect::<Vec<_>>().join(", ");
        let key_order = key
            .iter()
            .map(|k| format!("t.{}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT ARRAY[{group}], ARRAY[{keys}], {value}, \
                    coalesce(o.roname, CASE WHEN x.roident = 0 THEN $1 END), \
                    ((extract(epoch FROM x.timestamp) * 1000000)::int8 - 946684800000000) \
             FROM {table} t \
             CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(t.xmin) x \
             LEFT JOIN pg_catalog.pg_replication_origin o ON o.roident = x.roident \
             WHERE ({cols}) IN (SELECT {cols} FROM {table} WHERE {not_null} GROUP BY {cols} HAVING count(*) > 1) \
             ORDER BY 1, 5 NULLS FIRST, {key_order}",
            value = text(renamed),
        );
        let rows = self
            .client
            .query(&sql, &[&self.local_origin])
            .await
            .map_err(SqlError::of(format!(
                "reading the duplicated values of {table}"
            )))?;
        let mut groups: Vec<(Vec<String>, Vec<Holder>)> = Vec::new();
        for r in &rows {
            let value_of_group: Vec<String> = r.get(0);
            let holder = Holder {
                key: r.get(1),
                value: r.get(2),
                version: Version {
                    origin: r.get::<_, Option<String>>(3).unwrap_or_default(),
                    commit_time_us: r.get(4),
                },
            };
            match groups.last_mut() {
                Some((g, holders)) if *g == value_of_group => holders.push(holder),
                _ => groups.push((value_of_group, vec![holder])),
            }
        }
        Ok(groups.into_iter().map(|(_, h)| h).collect())
    }
}
