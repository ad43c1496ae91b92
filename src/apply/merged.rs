//! Merging one entity created on two nodes (decision 0008): the I/O.
//!
//! [`crate::merge::keys`] decides which row stays; here the other row's references are
//! re-pointed at it (the foreign keys into the table's primary key, from the catalog), the
//! other row is deleted, and the merge is noted in `walsync.merged_keys`, which travels
//! with the deciding transaction and which the deciding node's guard announces once to
//! every node ([`announce`]). Later changes that still name the merged-away key are
//! written with the key it merged into ([`ApplyWorker::redirected`]). Three places run a
//! merge: the applier that meets the collision, the applier of a note or an announcement
//! from a peer ([`ApplyWorker::learn_merge`]), and the node guard, which re-points rows
//! that reached the table while a merge was being decided elsewhere ([`sweep`]).

use std::sync::{Arc, Mutex};

use serde_json::Value as Json;
use tokio_postgres::Client;

use super::param::Param;
use super::{as_params, unless_duplicate, ApplyError, ApplyWorker, Mapped, Tried};
use crate::merge::conflict::{note_is_authentic, ConflictKind, Outcome, AUTHOR_ONLY};
use crate::merge::keys::{redirect, stays, ForeignKey, KeyMap, TableName};
use crate::names::quote_ident;
use crate::pgoutput::{Insert, Tuple, Value};
use crate::sql_error::SqlError;

/// The merges known to every applier of one node in this process.
pub type SharedKeys = Arc<Mutex<KeyMap>>;

/// Merges are recent for [`sweep`] this long after this node learnt of them.
const SWEEP_WINDOW: &str = "10 minutes";

/// A table whose rows can be merged: its primary key and the foreign keys into it.
#[derive(Debug, Clone)]
pub struct MergeTarget {
    pub table: TableName,
    /// Its primary key's columns, in key order.
    pub key: Vec<String>,
    /// Per referencing table: its columns that hold the key, in key order.
    pub referencing: Vec<(TableName, Vec<String>)>,
}

/// What a merge did to the rows here, for the record.
#[derive(Debug, Default)]
pub struct Merged {
    /// `table.columns`: rows re-pointed.
    pub repointed: Vec<(String, u64)>,
    /// Referencing rows that became the same as a row of the winner's (its m2m pair, its
    /// volume for one partner) and were merged in turn, by the same rule: table,
    /// merged-away key, key merged into, and the merged-away row as JSON.
    pub cascaded: Vec<(TableName, Vec<String>, Vec<String>, String)>,
    /// Referencing rows that duplicated a winner's row in a table without a primary key
    /// to merge by: removed, as JSON images.
    pub removed_duplicates: Vec<String>,
    /// The merged-away row as JSON, if it was here (it is gone now).
    pub removed: Option<String>,
}

impl Merged {
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.repointed.is_empty() {
            let moved: Vec<String> = self
                .repointed
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            parts.push(format!("rows re-pointed here: {}", moved.join(", ")));
        }
        for ((_, table), loser, winner, row) in &self.cascaded {
            parts.push(format!(
                "{table} {} merged into {} as the same row: {row}",
                Json::from(loser.clone()),
                Json::from(winner.clone())
            ));
        }
        if !self.removed_duplicates.is_empty() {
            parts.push(format!(
                "removed as duplicates of the winner's: {}",
                self.removed_duplicates.join(", ")
            ));
        }
        if parts.is_empty() {
            "no rows pointed at it here".into()
        } else {
            parts.join("; ")
        }
    }
}

/// The foreign keys of `schema.name` (`into`: pointing at it from other tables; else its
/// own, pointing at other tables) that reference a whole primary key: the other table,
/// and the referencing columns in the referenced key's order.
pub async fn foreign_keys(
    client: &Client,
    schema: &str,
    name: &str,
    into: bool,
) -> Result<Vec<(TableName, Vec<String>)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                        WHERE n.nspname = $1 AND c.relname = $2) \
             SELECT on_.nspname::text, oc.relname::text, array_agg(a.attname::text ORDER BY pk.ord) \
             FROM pg_constraint con \
             JOIN pg_index pki ON pki.indrelid = con.confrelid AND pki.indisprimary \
             CROSS JOIN LATERAL unnest(con.conkey, con.confkey) AS k(att, ratt) \
             JOIN LATERAL unnest(pki.indkey::int2[]) WITH ORDINALITY AS pk(att, ord) ON pk.att = k.ratt \
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.att \
             JOIN pg_class oc ON oc.oid = CASE WHEN $3 THEN con.conrelid ELSE con.confrelid END \
             JOIN pg_namespace on_ ON on_.oid = oc.relnamespace \
             WHERE con.contype = 'f' AND (CASE WHEN $3 THEN con.confrelid ELSE con.conrelid END) = (SELECT oid FROM t) \
             GROUP BY con.oid, on_.nspname, oc.relname, pki.indnkeyatts \
             HAVING count(*) = pki.indnkeyatts \
             ORDER BY 1, 2, 3",
            &[&schema, &name, &into],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// `schema.name` as a table to merge rows of; `None` if it is not here or has no
/// primary key.
pub async fn merge_target(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<MergeTarget>, tokio_postgres::Error> {
    let key: Vec<String> = client
        .query_one(
            "SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}') \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary",
            &[&schema, &name],
        )
        .await?
        .get(0);
    if key.is_empty() {
        return Ok(None);
    }
    Ok(Some(MergeTarget {
        table: (schema.to_string(), name.to_string()),
        key,
        referencing: foreign_keys(client, schema, name, true).await?,
    }))
}

fn qualified((schema, name): &TableName) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// `c1 = $first AND c2 = $first+1 ...`: parameters take the columns' types (sent as
/// text, read by each type's input function), so the columns' indexes find the rows.
fn columns_equal(columns: &[String], first: usize) -> String {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Key values as parameters of any type (see [`Param`]).
fn values(key: &[String]) -> Vec<Value> {
    key.iter()
        .map(|v| Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// Merges nest this deep at most (a referencing row that becomes a duplicate is merged,
/// and so on): enough for entity -> m2m row or entity -> child -> m2m row.
const MAX_DEPTH: usize = 3;

type MergeFuture<'a> = futures_util::future::BoxFuture<'a, Result<Merged, tokio_postgres::Error>>;

/// Points every row of `table` whose `columns` hold `loser` at `winner`. A row that would
/// then collide with a row already pointing at the winner (the same m2m pair, the same
/// partner's volume) is the same thing twice: the two merge by the rule of every merge,
/// the smaller primary key stays ([`stays`]), so that every node keeps the same one
/// whether it re-points here or merges the incoming row. Runs inside the caller's
/// transaction.
async fn repoint(
    client: &Client,
    (table, columns): &(TableName, Vec<String>),
    loser: &[String],
    winner: &[String],
    depth: usize,
    merged: &mut Merged,
) -> Result<(), tokio_postgres::Error> {
    let t = qualified(table);
    let n = columns.len();
    let set = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let label = format!("{}.{}", table.1, columns.join(","));
    let both: Vec<Value> = values(winner).into_iter().chain(values(loser)).collect();
    let both: Vec<Param> = both.iter().map(Param).collect();
    let all = format!(
        "UPDATE {t} SET {set} WHERE {}",
        columns_equal(columns, n + 1)
    );
    if let Tried::Done(moved) = unless_duplicate(client, &all, &as_params(&both)).await? {
        if moved > 0 {
            merged.repointed.push((label, moved));
        }
        return Ok(());
    }
    // Some rows collide with the winner's: one by one.
    let target = merge_target(client, &table.0, &table.1).await?;
    let loser_values = values(loser);
    let loser_params: Vec<Param> = loser_values.iter().map(Param).collect();
    let rows = client
        .query(
            &format!(
                "SELECT ctid::text FROM {t} WHERE {} FOR UPDATE",
                columns_equal(columns, 1)
            ),
            &as_params(&loser_params),
        )
        .await?;
    let one = format!("UPDATE {t} SET {set} WHERE ctid = ${}::text::tid", n + 1);
    let mut moved = 0;
    for r in rows {
        let ctid = Value::Text(bytes::Bytes::from(r.get::<_, String>(0).into_bytes()));
        let winner_values = values(winner);
        let mut p: Vec<Param> = winner_values.iter().map(Param).collect();
        p.push(Param(&ctid));
        let index = match unless_duplicate(client, &one, &as_params(&p)).await? {
            Tried::Done(_) => {
                moved += 1;
                continue;
            }
            Tried::Duplicate { index, .. } => index,
        };
        let twin = match (&target, index) {
            (Some(target), Some(index)) if depth < MAX_DEPTH => {
                twin_of(client, target, columns, &index, &ctid, winner).await?
            }
            _ => None,
        };
        let Some((target, mine, theirs)) =
            twin.map(|(m, t)| (target.as_ref().expect("found with it"), m, t))
        else {
            // Nothing to merge by (no primary key, no index named, too deep): the row
            // goes as the duplicate it is.
            remove_duplicate(client, table, &ctid, merged).await?;
            continue;
        };
        if stays(&mine, &theirs) {
            // This row stays: the winner's twin merges into it, then it is re-pointed.
            let inner = merge_away(client, target, &theirs, &mine, depth + 1).await?;
            absorb(merged, inner, table, &theirs, &mine);
            match unless_duplicate(client, &one, &as_params(&p)).await? {
                Tried::Done(_) => moved += 1,
                // It still collides (another unique index): it goes as a duplicate.
                Tried::Duplicate { .. } => remove_duplicate(client, table, &ctid, merged).await?,
            }
        } else {
            let inner = merge_away(client, target, &mine, &theirs, depth + 1).await?;
            absorb(merged, inner, table, &mine, &theirs);
        }
    }
    if moved > 0 {
        merged.repointed.push((label, moved));
    }
    Ok(())
}

/// Deletes the row at `ctid` of `table`, a duplicate of one the winner has, keeping its
/// image for the record.
async fn remove_duplicate(
    client: &Client,
    table: &TableName,
    ctid: &Value,
    merged: &mut Merged,
) -> Result<(), tokio_postgres::Error> {
    let gone = client
        .query_opt(
            &format!(
                "DELETE FROM {} d WHERE ctid = $1::text::tid RETURNING to_jsonb(d)::text",
                qualified(table)
            ),
            &[&Param(ctid)],
        )
        .await?;
    if let Some(gone) = gone {
        merged
            .removed_duplicates
            .push(format!("{} {}", table.1, gone.get::<_, String>(0)));
    }
    Ok(())
}

/// Adds what a nested merge did to the outer one's record.
fn absorb(
    merged: &mut Merged,
    inner: Merged,
    table: &TableName,
    loser: &[String],
    winner: &[String],
) {
    merged.repointed.extend(inner.repointed);
    merged.cascaded.extend(inner.cascaded);
    merged.removed_duplicates.extend(inner.removed_duplicates);
    merged.cascaded.push((
        table.clone(),
        loser.to_vec(),
        winner.to_vec(),
        inner.removed.unwrap_or_default(),
    ));
}

/// The row of `target` that holds, on the unique index `index`, what the row at `ctid`
/// would hold once its `columns` name `winner`: both primary keys (the row's, the twin's).
async fn twin_of(
    client: &Client,
    target: &MergeTarget,
    columns: &[String],
    index: &str,
    ctid: &Value,
    winner: &[String],
) -> Result<Option<(Vec<String>, Vec<String>)>, tokio_postgres::Error> {
    // The index's key columns (not its INCLUDE columns; an expression position has none).
    let index_columns: Vec<String> = client
        .query_one(
            "SELECT coalesce(array_agg(a.attname::text), '{}') FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE n.nspname = $1 AND c.relname = $2 AND k.ord <= i.indnkeyatts",
            &[&target.table.0, &index],
        )
        .await?
        .get(0);
    if index_columns.is_empty() {
        return Ok(None);
    }
    let t = qualified(&target.table);
    let key = |alias: &str| {
        let k: Vec<String> = target
            .key
            .iter()
            .map(|c| format!("{alias}.{}::text", quote_ident(c)))
            .collect();
        format!("ARRAY[{}]", k.join(", "))
    };
    let mut conditions: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("y.{} = ${}", quote_ident(c), i + 2))
        .collect();
    conditions.extend(
        index_columns
            .iter()
            .filter(|c| !columns.contains(c))
            .map(|c| format!("y.{0} IS NOT DISTINCT FROM x.{0}", quote_ident(c))),
    );
    let sql = format!(
        "SELECT {}, {} FROM {t} x JOIN {t} y ON y.ctid <> x.ctid          WHERE x.ctid = $1::text::tid AND {} ORDER BY 2 LIMIT 1",
        key("x"),
        key("y"),
        conditions.join(" AND ")
    );
    let winner_values = values(winner);
    let mut p: Vec<Param> = vec![Param(ctid)];
    p.extend(winner_values.iter().map(Param));
    Ok(client
        .query_opt(&sql, &as_params(&p))
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Merges the row `loser` of `target` into the row `winner`: re-points every reference,
/// then deletes the loser if it is here. Runs inside the caller's transaction; notes
/// nothing in `walsync.merged_keys` (the caller does, [`note`]).
pub fn merge_away<'a>(
    client: &'a Client,
    target: &'a MergeTarget,
    loser: &'a [String],
    winner: &'a [String],
    depth: usize,
) -> MergeFuture<'a> {
    Box::pin(async move {
        let mut merged = Merged::default();
        for referencing in &target.referencing {
            repoint(client, referencing, loser, winner, depth, &mut merged).await?;
        }
        let loser_values = values(loser);
        let params: Vec<Param> = loser_values.iter().map(Param).collect();
        merged.removed = client
            .query_opt(
                &format!(
                    "DELETE FROM {} d WHERE {} RETURNING to_jsonb(d)::text",
                    qualified(&target.table),
                    columns_equal(&target.key, 1)
                ),
                &as_params(&params),
            )
            .await?
            .map(|r| r.get(0));
        Ok(merged)
    })
}

/// Notes a merge in `walsync.merged_keys` (once: a merge known already stays as it is).
/// Returns whether it was new here.
pub async fn note(
    client: &Client,
    table: &TableName,
    loser: &[String],
    winner: &[String],
    decided_by: &str,
    decided_at: Option<&str>,
) -> Result<bool, tokio_postgres::Error> {
    let (loser, winner) = (
        Json::from(loser).to_string(),
        Json::from(winner).to_string(),
    );
    let n = client
        .execute(
            "INSERT INTO walsync.merged_keys (table_schema, table_name, loser_key, winner_key, decided_by, decided_at) \
             VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5, coalesce($6::text::timestamptz, now())) \
             ON CONFLICT DO NOTHING",
            &[&table.0, &table.1, &loser, &winner, &decided_by, &decided_at],
        )
        .await?;
    Ok(n == 1)
}

/// Every merge noted on this node.
pub async fn load(client: &Client) -> Result<(KeyMap, i64), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT table_schema, table_name, loser_key::text, winner_key::text FROM walsync.merged_keys",
            &[],
        )
        .await?;
    let mut map = KeyMap::default();
    for r in &rows {
        let key = |i: usize| serde_json::from_str::<Vec<String>>(r.get(i)).unwrap_or_default();
        map.insert((r.get(0), r.get(1)), key(2), key(3));
    }
    Ok((map, rows.len() as i64))
}

/// Notes the merges a merge cascaded into (see [`Merged::cascaded`]); returns how many
/// were new here.
pub async fn note_cascaded(
    client: &Client,
    merged: &Merged,
    decided_by: &str,
) -> Result<i64, tokio_postgres::Error> {
    let mut new = 0;
    for (table, loser, winner, _) in &merged.cascaded {
        new += i64::from(note(client, table, loser, winner, decided_by, None).await?);
    }
    Ok(new)
}

/// The guard's round, first part: announces the merges this node decided, once, as a
/// write of its own, so that the note reaches every node (the one written with the
/// merge went only where the deciding transaction went). Returns how many.
pub async fn announce(client: &Client, node: &str) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE walsync.merged_keys SET announced = true WHERE decided_by = $1 AND NOT announced",
            &[&node],
        )
        .await
}

/// The guard's round: re-points rows that still name a key merged away in the last
/// [`SWEEP_WINDOW`] (a row another session wrote while the merge was being decided, or
/// applied by a sidecar that had not learnt of it yet). Its writes are this node's own
/// (`node`) and replicate as such. Returns the rows re-pointed or merged.
pub async fn sweep(client: &Client, node: &str) -> Result<u64, tokio_postgres::Error> {
    let recent = client
        .query(
            &format!(
                "SELECT table_schema, table_name, loser_key::text FROM walsync.merged_keys \
                 WHERE learnt_at > now() - interval '{SWEEP_WINDOW}' ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    if recent.is_empty() {
        return Ok(0);
    }
    let (map, _) = load(client).await?;
    let mut moved = 0;
    let mut target: Option<MergeTarget> = None;
    // A row held by another session (an application's open transaction) waits for the
    // next round rather than holding up the guard's other duties.
    client
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '500ms'")
        .await?;
    for r in &recent {
        let table: TableName = (r.get(0), r.get(1));
        if target.as_ref().is_none_or(|t| t.table != table) {
            target = merge_target(client, &table.0, &table.1).await?;
        }
        let Some(t) = &target else { continue };
        let loser: Vec<String> = serde_json::from_str(r.get(2)).unwrap_or_default();
        let Some(winner) = map.resolve(&table, &loser) else {
            continue;
        };
        // One savepoint per merge: one that fails (a lock not granted in time) is tried
        // again next round, the others are done now.
        client.batch_execute("SAVEPOINT walsync_sweep").await?;
        let mut merged = Merged::default();
        let mut done = Ok(());
        for referencing in &t.referencing {
            done = repoint(client, referencing, &loser, &winner, 0, &mut merged).await;
            if done.is_err() {
                break;
            }
        }
        if done.is_ok() {
            done = note_cascaded(client, &merged, node).await.map(|_| ());
        }
        if let Err(e) = done {
            tracing::warn!(
                table = %format!("{}.{}", table.0, table.1), loser = ?loser,
                error = %crate::observability::error_chain(&e),
                "could not re-point the rows of a merged-away row; trying again in the next round"
            );
            client
                .batch_execute(
                    "ROLLBACK TO SAVEPOINT walsync_sweep; RELEASE SAVEPOINT walsync_sweep",
                )
                .await?;
            continue;
        }
        client
            .batch_execute("RELEASE SAVEPOINT walsync_sweep")
            .await?;
        moved += merged.repointed.iter().map(|(_, n)| n).sum::<u64>()
            + (merged.cascaded.len() + merged.removed_duplicates.len()) as u64;
    }
    client.batch_execute("COMMIT").await?;
    Ok(moved)
}

impl ApplyWorker {
    pub(super) fn is_merged_keys(&self, relation_id: u32) -> bool {
        self.relations
            .get(&relation_id)
            .is_some_and(|e| e.source.namespace == "walsync" && e.source.name == "merged_keys")
    }

    /// The node this worker writes to, as merges name it.
    pub(super) fn node_name(&self) -> &str {
        self.local_origin
            .strip_prefix("walsync_")
            .unwrap_or(&self.local_origin)
    }

    async fn merge_target_of(
        &mut self,
        table: &TableName,
    ) -> Result<Option<MergeTarget>, ApplyError> {
        if let Some(t) = self.merge_targets.get(table) {
            return Ok(Some(t.clone()));
        }
        self.flush_runs().await?;
        self.flush().await?;
        let what = format!("reading the foreign keys into {}.{}", table.0, table.1);
        let t = merge_target(&self.client, &table.0, &table.1)
            .await
            .map_err(SqlError::of(what))?;
        if let Some(t) = &t {
            self.merge_targets.insert(table.clone(), t.clone());
        }
        Ok(t)
    }

    /// Merges `loser` of `table` into `winner` here, in the open transaction, and notes
    /// it (here, and for every node: the note travels with the data).
    pub(super) async fn merge_rows(
        &mut self,
        table: &TableName,
        loser: &[String],
        winner: &[String],
    ) -> Result<Merged, ApplyError> {
        let target = self.merge_target_of(table).await?.ok_or_else(|| {
            ApplyError::Protocol(format!(
                "{}.{} has no primary key to merge by",
                table.0, table.1
            ))
        })?;
        self.flush_runs().await?;
        self.flush().await?;
        let what = format!("merging a row of {}.{} into another", table.0, table.1);
        let merged = merge_away(&self.client, &target, loser, winner, 0)
            .await
            .map_err(SqlError::of(what.clone()))?;
        let by = self.node_name().to_string();
        let noted = note(&self.client, table, loser, winner, &by, None)
            .await
            .map_err(SqlError::of(what.clone()))?;
        let cascaded = note_cascaded(&self.client, &merged, &by)
            .await
            .map_err(SqlError::of(what))?;
        // This session's own notes: no reason to read the table again for them.
        self.merged_count += i64::from(noted) + cascaded;
        self.remember(&merged, Some((table, loser, winner)));
        Ok(merged)
    }

    /// Puts a merge, and the merges it cascaded into, into the shared map.
    /// Notes a merge, and the merges it cascaded into, for this transaction: the other
    /// appliers see them once its commit is confirmed ([`Self::publish_merges`]).
    fn remember(&mut self, merged: &Merged, first: Option<(&TableName, &[String], &[String])>) {
        if let Some((table, loser, winner)) = first {
            self.merged_in_txn
                .push((table.clone(), loser.to_vec(), winner.to_vec()));
        }
        for (table, loser, winner, _) in &merged.cascaded {
            self.merged_in_txn
                .push((table.clone(), loser.clone(), winner.clone()));
        }
    }

    /// The open transaction's commit was sent: its merges wait for the confirmation,
    /// kept with the commit's end LSN.
    pub(super) fn commit_merges(&mut self, end_lsn: crate::lsn::Lsn) {
        if !self.merged_in_txn.is_empty() {
            let entries = std::mem::take(&mut self.merged_in_txn);
            self.merged_unconfirmed.push_back((end_lsn, entries));
        }
    }

    /// The target confirmed the commit ending at `end_lsn`: its merges are the node's now,
    /// seen by every applier into it. A transaction that failed never gets here, and its
    /// merges go with the worker.
    pub(super) fn publish_merges(&mut self, end_lsn: crate::lsn::Lsn) {
        while self
            .merged_unconfirmed
            .front()
            .is_some_and(|(lsn, _)| *lsn <= end_lsn)
        {
            let (_, entries) = self.merged_unconfirmed.pop_front().expect("checked");
            let mut map = self
                .merged
                .lock()
                .expect("the merged keys lock is never held across a panic");
            for (table, loser, winner) in entries {
                map.insert(table, loser, winner);
            }
        }
    }

    /// `f` of every merge this worker knows: the node's, and its own not yet confirmed.
    fn with_merges<R>(&self, f: impl FnOnce(&KeyMap) -> R) -> R {
        let shared = self
            .merged
            .lock()
            .expect("the merged keys lock is never held across a panic");
        let own = self
            .merged_unconfirmed
            .iter()
            .flat_map(|(_, e)| e)
            .chain(&self.merged_in_txn);
        if self.merged_in_txn.is_empty() && self.merged_unconfirmed.is_empty() {
            return f(&shared);
        }
        let mut all = shared.clone();
        drop(shared);
        for (table, loser, winner) in own {
            all.insert(table.clone(), loser.clone(), winner.clone());
        }
        f(&all)
    }

    /// A `walsync.merged_keys` row from a peer: a merge decided elsewhere. This node
    /// re-points its own rows and removes the merged-away row if it has it, then notes
    /// the merge (once) with the time it learnt of it.
    pub(super) async fn learn_merge(&mut self, ins: &Insert) -> Result<(), ApplyError> {
        // Direct requests follow: everything before them in the stream is settled first
        // (a COPY waiting to be sent would otherwise hold them up for ever; see `begin`).
        self.flush_runs().await?;
        self.flush().await?;
        let field = |name: &str| self.field_of(ins, name);
        let missing =
            |what: &str| ApplyError::Protocol(format!("a walsync.merged_keys row without {what}"));
        let key = |name: &str| -> Result<Vec<String>, ApplyError> {
            let text = field(name).ok_or_else(|| missing(name))?;
            serde_json::from_str(&text).map_err(|e| {
                ApplyError::Protocol(format!(
                    "walsync.merged_keys.{name} {text:?} is not a JSON array of text: {e}"
                ))
            })
        };
        let table: TableName = (
            field("table_schema").ok_or_else(|| missing("table_schema"))?,
            field("table_name").ok_or_else(|| missing("table_name"))?,
        );
        let (loser, winner) = (key("loser_key")?, key("winner_key")?);
        let by = field("decided_by").ok_or_else(|| missing("decided_by"))?;
        let at = field("decided_at");
        let author = self.open_txn().origin;
        let author = author
            .strip_prefix("walsync_")
            .unwrap_or(&author)
            .to_string();
        let upstream = self
            .link
            .split_once("->")
            .map_or("", |(from, _)| from)
            .to_string();
        if !note_is_authentic(&by, &author, &upstream) {
            // A store cannot make another node merge rows away: its note is not learnt.
            tracing::warn!(link = %self.link, decided_by = %by, %author, "refused a merge note not written by the node it names");
            let record = super::conflict::Record {
                kind: ConflictKind::ForgedRecord,
                key: serde_json::json!({ "table": format!("{}.{}", table.0, table.1), "loser_key": loser }),
                local: None,
                remote: crate::merge::conflict::row_image(
                    &["table_schema", "table_name", "loser_key", "winner_key", "decided_by"].map(String::from),
                    &[
                        Value::Text(table.0.clone().into()),
                        Value::Text(table.1.clone().into()),
                        Value::Text(serde_json::to_string(&loser).unwrap_or_default().into()),
                        Value::Text(serde_json::to_string(&winner).unwrap_or_default().into()),
                        Value::Text(by.clone().into()),
                    ],
                ),
                rule: AUTHOR_ONLY,
                outcome: Outcome::Skipped,
                detail: Some(format!(
                    "a walsync.merged_keys note naming {by} as the node that merged these rows arrived in a \
                     transaction written by {author} from {upstream}; a node's merge notes are taken only from it \
                     (or the hub forwarding it), so nothing was merged here. {author} may be compromised \
                     (docs/security.md)"
                )),
            };
            return self.record(ins.relation_id, record).await;
        }
        self.merged_in_txn
            .push((table.clone(), loser.clone(), winner.clone()));
        let known = self
            .with_merges(|map| map.resolve(&table, &loser))
            .unwrap_or_else(|| winner.clone());
        let what = format!("merging a row of {}.{} as {by} did", table.0, table.1);
        if let Some(target) = self.merge_target_of(&table).await? {
            let merged = merge_away(&self.client, &target, &loser, &known, 0)
                .await
                .map_err(SqlError::of(what.clone()))?;
            tracing::info!(
                link = %self.link, table = %format!("{}.{}", table.0, table.1), loser = ?loser, winner = ?known,
                decided_by = %by, removed_here = merged.removed.is_some(), detail = %merged.describe(),
                "learnt of a merge"
            );
            let node = self.node_name().to_string();
            self.merged_count += note_cascaded(&self.client, &merged, &node)
                .await
                .map_err(SqlError::of(what.clone()))?;
            self.remember(&merged, None);
        }
        if note(&self.client, &table, &loser, &winner, &by, at.as_deref())
            .await
            .map_err(SqlError::of(what))?
        {
            self.merged_count += 1;
        }
        self.rows_in_txn += 1;
        Ok(())
    }

    /// `tuple` (of relation `id`) with its references to merged-away rows pointed at the
    /// rows they merged into; `None` when it names none (the usual case, decided without
    /// I/O once the relation's foreign keys are known).
    pub(super) async fn redirected(
        &mut self,
        m: &Mapped,
        tuple: &Tuple,
    ) -> Result<Option<Tuple>, ApplyError> {
        let id = m.id;
        if self.with_merges(KeyMap::is_empty) {
            return Ok(None);
        }
        if self.relations.get(&id).is_some_and(|e| e.fks.is_none()) {
            self.flush_runs().await?;
            self.flush().await?;
            let (schema, name) = (m.target.schema.clone(), m.target.name.clone());
            let found = foreign_keys(&self.client, &schema, &name, false)
                .await
                .map_err(SqlError::of(format!(
                    "reading the foreign keys of {schema}.{name}"
                )))?;
            let map = &m.map;
            let fks: Vec<ForeignKey> = found
                .into_iter()
                .filter_map(|(references, columns)| {
                    let indexes: Option<Vec<usize>> = columns
                        .iter()
                        .map(|c| {
                            let t = map.target.columns.iter().position(|x| x == c)?;
                            map.source_index_of_target(t)
                        })
                        .collect();
                    Some(ForeignKey {
                        columns: indexes?,
                        references,
                    })
                })
                .collect();
            if let Some(e) = self.relations.get_mut(&id) {
                e.fks = Some(fks);
            }
        }
        let Some(fks) = self.relations.get(&id).and_then(|e| e.fks.as_ref()) else {
            return Ok(None);
        };
        if fks.is_empty() {
            return Ok(None);
        }
        let mut out = tuple.clone();
        Ok(self
            .with_merges(|map| redirect(&mut out, fks, map))
            .then_some(out))
    }

    /// Reads every merge noted here into the shared map (at start, and when the count of
    /// noted merges changed: another sidecar decided one).
    pub(super) async fn reload_merged(&mut self) -> Result<(), ApplyError> {
        self.flush_runs().await?;
        self.flush().await?;
        let (loaded, count) = load(&self.client)
            .await
            .map_err(SqlError::of_bookkeeping("reading walsync.merged_keys"))?;
        let mut map = self
            .merged
            .lock()
            .expect("the merged keys lock is never held across a panic");
        for (table, loser, winner) in loaded.entries() {
            map.insert(table, loser, winner);
        }
        self.merged_count = count;
        self.merged_stale = false;
        Ok(())
    }
}
