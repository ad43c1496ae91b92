//! The careful paths: changes that must look at the local row before they write.
//!
//! Updates and deletes always read the local row under a row lock (`FOR UPDATE`, so a
//! concurrent local write cannot slip between the decision and the write), decide with
//! [`crate::merge::conflict`] and record every conflict in `walsync.conflicts` in the same
//! target transaction. Inserts take the fast path (pipelined, COPY) and come here only
//! when the fast path hit a unique key: the link then re-applies that transaction in
//! careful mode ([`ApplyWorker::set_careful`]). In careful mode, inserts and updates
//! first settle any collision on a unique key other than the primary key: both rows stay,
//! the loser's text value is renamed (decision 0004).

use serde_json::Value as Json;
use tokio_postgres::types::Type;

use super::param::Param;
use super::pipeline::Tag;
use super::{ApplyError, ApplyWorker, Mapped, RemoteTxn, Target};
use crate::merge::conflict::{
    as_unsent, changes_besides_counters, renamed, row_image, settle_update, whole_new_row,
    without_local_columns, Against, ConflictKind, Decision, Outcome, UpdatePlan, Version,
    NOT_WHOLE,
};
use crate::merge::keys::{settlement, stays, Settlement, TableName, UniquePolicy};
use crate::merge::statements::{RowWrite, Shape, UniqueKey};
use crate::sql_error::SqlError;

/// How often a careful insert or update settles its unique keys before it is parked: a
/// second settlement sees rows another link into this node committed meanwhile.
const SETTLE_ATTEMPTS: u32 = 3;

/// The rule recorded for a merge (decision 0008).
const SMALLER_KEY_STAYS: &str = "smaller_key_stays";
use crate::pgoutput::{Delete, Insert, OldTuple, Tuple, Update, Value};

/// The local version of a row, read under a row lock.
pub(super) struct LocalRow {
    /// Every target column as text, in target column order.
    values: Vec<Option<String>>,
    version: Version,
}

/// One row of `walsync.conflicts`, before it is written.
pub(super) struct Record {
    pub kind: ConflictKind,
    pub key: Json,
    pub local: Option<(Json, Version)>,
    pub remote: Json,
    pub rule: &'static str,
    pub outcome: Outcome,
    /// What a rename wrote, or what was dropped here.
    pub detail: Option<String>,
}

/// What settling an incoming row's unique keys left to do.
enum Settled {
    /// Write this row (its losing values renamed, if any).
    Write(Tuple),
    /// Nothing: the row collides on a key no rule settles and was parked.
    Parked,
    /// Nothing: the row was the same entity as a local row, merged into it.
    Merged,
}

/// A local row that holds an incoming row's values on a unique key (not the primary key).
struct Collision {
    unique: UniqueKey,
    local: LocalRow,
}

impl ApplyWorker {
    pub(super) fn open_txn(&self) -> RemoteTxn {
        self.open
            .clone()
            .expect("a change is applied inside an open target transaction")
    }

    /// `upd` with its references to merged-away rows redirected, old image and new.
    async fn redirected_update(
        &mut self,
        m: &Mapped,
        upd: &Update,
    ) -> Result<Option<Update>, ApplyError> {
        let id = upd.relation_id;
        let new = self.redirected(m, &upd.new).await?;
        let old = match &upd.old {
            Some(OldTuple::Full(old)) => self.redirected(m, old).await?.map(OldTuple::Full),
            _ => None,
        };
        if new.is_none() && old.is_none() {
            return Ok(None);
        }
        Ok(Some(Update {
            relation_id: id,
            old: old.or_else(|| upd.old.clone()),
            new: new.unwrap_or_else(|| upd.new.clone()),
        }))
    }

    /// The fast path of an update or delete: `write`, made to write only where the
    /// careful path would decide to apply it without a record
    /// ([`crate::merge::statements::RelationMap::guarded`]); where it would not, the
    /// statement fails and the transaction is applied again carefully. `None` if the
    /// change's origin is not known here yet.
    fn guarded(&self, m: &Mapped, write: RowWrite, old: Option<&OldTuple>) -> Option<RowWrite> {
        let txn = self.open.as_ref()?;
        let origin_id = *self.origin_ids.get(&txn.origin)?;
        let per_node = &self.relations.get(&m.id)?.policy.per_node_columns;
        Some(m.guarded(write, old, per_node, origin_id, txn.commit_time_us))
    }

    /// Reads the local row with this key (target key order), locked.
    async fn read_local(
        &mut self,
        m: &Mapped,
        key: &[Value],
    ) -> Result<Option<LocalRow>, ApplyError> {
        let mut rows = self.read_locked(m, Shape::ReadLocal, key).await?;
        Ok(rows.pop())
    }

    /// Reads the local rows a `Shape::ReadLocal`-like shape selects with `params`, locked.
    async fn read_locked(
        &mut self,
        m: &Mapped,
        shape: Shape,
        params: &[Value],
    ) -> Result<Vec<LocalRow>, ApplyError> {
        let relation_id = m.id;
        self.flush_runs().await?;
        let stmt = self.statement(m, shape).await?;
        // A direct request: everything in flight is settled first (see `begin`).
        self.flush().await?;
        let what = || format!("reading local rows of {}", self.table_name(relation_id));
        let stream = self
            .client
            .query_raw(&stmt, params.iter().map(Param))
            .await
            .map_err(|source| SqlError::new(what(), source))?;
        futures_util::pin_mut!(stream);
        let mut rows = Vec::with_capacity(1);
        while let Some(row) = futures_util::StreamExt::next(&mut stream).await {
            let row = row.map_err(|source| SqlError::new(what(), source))?;
            let n = row.len() - 2;
            let origin: Option<String> = row.get(n);
            rows.push(LocalRow {
                values: (0..n).map(|i| row.get::<_, Option<String>>(i)).collect(),
                version: Version {
                    origin: origin.unwrap_or_else(|| self.local_origin.clone()),
                    commit_time_us: row.get(n + 1),
                },
            });
        }
        Ok(rows)
    }

    fn remote_version(&self) -> Version {
        let txn = self.open_txn();
        Version {
            origin: txn.origin,
            commit_time_us: Some(txn.commit_time_us),
        }
    }

    /// Reads the local row with `key` (locked) and decides an update or delete made on
    /// the old image `old` against it.
    async fn decide_against_local(
        &mut self,
        m: &Mapped,
        key: &[Value],
        is_delete: bool,
        old: Option<&OldTuple>,
    ) -> Result<(Option<LocalRow>, Decision), ApplyError> {
        let id = m.id;
        let local = self.read_local(m, key).await?;
        let decision =
            self.settle_against(m, local.as_ref(), |against| against.decide(is_delete, old));
        tracing::debug!(
            link = %self.link, table = %self.table_name(id), key = %m.key_image(key),
            remote = ?self.remote_version(), local = ?local.as_ref().map(|l| &l.version),
            ?decision, "decided"
        );
        Ok((local, decision))
    }

    /// Runs a pure settlement against the local row (in source column order).
    fn settle_against<T>(
        &self,
        m: &Mapped,
        local: Option<&LocalRow>,
        settle: impl FnOnce(&Against) -> T,
    ) -> T {
        let id = m.id;
        let in_source_order = local.map(|l| m.in_source_order(l));
        let entry = &self.relations[&id];
        let remote = self.remote_version();
        settle(&Against {
            rule: &entry.policy.rule,
            remote: &remote,
            local: in_source_order.as_deref().zip(local.map(|l| &l.version)),
            per_node: &entry.policy.per_node_columns,
        })
    }

    pub async fn update(&mut self, upd: &Update) -> Result<(), ApplyError> {
        if self.is_merged_keys(upd.relation_id) {
            // A merge the deciding node announced: learnt as from its first note.
            return self
                .learn_merge(&Insert {
                    relation_id: upd.relation_id,
                    new: upd.new.clone(),
                })
                .await;
        }
        match self.ensure_map(upd.relation_id).await? {
            Target::Whole(m) => self.update_mapped(&m, upd).await,
            Target::WithoutColumns(m, gone) => self.update_without_columns(&m, upd, &gone).await,
            Target::Dropped => {
                let kind = ConflictKind::TableDropped;
                self.record_dropped(upd.relation_id, kind, &upd.new, &[])
                    .await
            }
        }
    }

    /// An update of a relation whose target is known and complete.
    pub(super) async fn update_mapped(
        &mut self,
        m: &Mapped,
        upd: &Update,
    ) -> Result<(), ApplyError> {
        let id = upd.relation_id;
        if m.is_keyless() {
            return self.update_keyless(m, upd).await;
        }
        // References to rows merged away name the rows they merged into, in the old image
        // too, so that it still matches the local row (decision 0008).
        let redirected;
        let upd = match self.redirected_update(m, upd).await? {
            Some(u) => {
                redirected = u;
                &redirected
            }
            None => upd,
        };
        let policy = self.policy_of(id);
        if policy.local_columns.is_empty() {
            return self.update_unmasked(m, upd, &policy).await;
        }
        match without_local_columns(upd, &policy.local_columns) {
            Some(masked) => self.update_unmasked(m, &masked, &policy).await,
            None => Ok(()),
        }
    }

    async fn update_unmasked(
        &mut self,
        m: &Mapped,
        upd: &Update,
        policy: &super::RelationPolicy,
    ) -> Result<(), ApplyError> {
        let id = upd.relation_id;
        if !policy.counters.is_empty() {
            if let Some(OldTuple::Full(old)) = &upd.old {
                return self
                    .update_with_counters(m, old, &upd.new, &policy.counters)
                    .await;
            }
            tracing::warn!(link = %self.link, table = %self.table_name(id), "counter columns need REPLICA IDENTITY FULL on the upstream (walsync init sets it); this update overwrites them");
        }
        let key = m.key_values(upd.old.as_ref(), Some(&upd.new))?;
        if !self.is_careful() {
            // The key the update gives the row (none in the new image: unchanged TOAST,
            // the same key).
            let new_key = m.key_values(None, Some(&upd.new)).ok();
            // A row this transaction inserted and has not sent yet (Odoo writes a record
            // right after creating it): inserted as updated.
            let same_key = new_key.as_ref() == Some(&key);
            if same_key && self.fold_into_insert(m, &key, &upd.new) {
                self.rows_in_txn += 1;
                return Ok(());
            }
            if let Some(write) = m.update(upd.old.as_ref(), &upd.new)? {
                if let Some(guarded) = self.guarded(m, write, upd.old.as_ref()) {
                    // The row it finds, and the key it gives that row if it changes it.
                    let mut keys = vec![key];
                    keys.extend(new_key.filter(|k| *k != keys[0]));
                    return self.push_guarded(m, guarded, keys).await;
                }
            }
        }
        let local = self.read_local(m, &key).await?;
        if local.is_none() {
            return self.update_of_a_row_not_here(m, upd, &key).await;
        }
        let UpdatePlan { decision, mut new } = self.settle_against(m, local.as_ref(), |a| {
            settle_update(a, policy.merge_columns, upd.old.as_ref(), &upd.new)
        });
        let remote_image = m.source_image(&upd.new);
        if self.is_careful() && !matches!(decision, Decision::SkipAndRecord(..)) {
            let mut attempt = 1;
            loop {
                new = match self
                    .settle_unique_keys(m, new, &key, ConflictKind::UpdateExists)
                    .await?
                {
                    Settled::Write(settled) => settled,
                    Settled::Parked | Settled::Merged => return Ok(()),
                };
                let Some(write) = m.update(upd.old.as_ref(), &new)? else {
                    break;
                };
                match self.write_or_park(m, write).await? {
                    None => break,
                    // Another session (another link into this node) committed a colliding
                    // row after the lookups above, which the next lookups see: settle
                    // again, as a careful insert does.
                    Some(_) if attempt < SETTLE_ATTEMPTS => attempt += 1,
                    Some(refused) => {
                        return self
                            .record_refused(m, decision, &key, local, remote_image, refused)
                            .await
                    }
                }
            }
            // Written (or nothing to write): what is left is recording the decision.
            return self
                .carry_out(m, decision, None, &key, local, remote_image)
                .await;
        }
        let write = m.update(upd.old.as_ref(), &new)?;
        self.carry_out(m, decision, write, &key, local, remote_image)
            .await
    }

    /// An update for a row that is not here (key `key`): decided against the delete's
    /// tombstone, if one is kept (decision 0016). A later update brings the row back,
    /// whole, as an insert; an earlier one, or one with nothing known of the row, is
    /// recorded and not applied.
    async fn update_of_a_row_not_here(
        &mut self,
        m: &Mapped,
        upd: &Update,
        key: &[Value],
    ) -> Result<(), ApplyError> {
        let deleted = self.tombstone(m, key).await?;
        let remote = self.remote_version();
        let mut decision = self
            .policy_of(m.id)
            .rule
            .decide_update_deleted(&remote, deleted.as_ref());
        let remote_image = m.source_image(&upd.new);
        let mut write = None;
        if matches!(decision, Decision::ApplyAndRecord(..)) {
            match whole_new_row(upd.old.as_ref(), &upd.new) {
                Some(row) => {
                    let row = if self.is_careful() {
                        let kind = ConflictKind::UpdateDeleted;
                        match self.settle_unique_keys(m, row, key, kind).await? {
                            Settled::Write(row) => row,
                            Settled::Parked | Settled::Merged => return Ok(()),
                        }
                    } else {
                        row
                    };
                    write = Some(m.insert(&row)?);
                }
                None => decision = Decision::SkipAndRecord(ConflictKind::UpdateDeleted, NOT_WHOLE),
            }
        }
        self.carry_out(m, decision, write, key, None, remote_image)
            .await
    }

    /// The version of the delete of the row with `key` here, if its tombstone is kept:
    /// the deleting transaction's origin and commit time (its author's, for a delete
    /// applied from a peer).
    async fn tombstone(
        &mut self,
        m: &Mapped,
        key: &[Value],
    ) -> Result<Option<Version>, ApplyError> {
        self.flush().await?;
        let table = format!("{}.{}", m.target.schema, m.target.name);
        let row = self
            .client
            .query_opt(
                "SELECT o.roname, ((extract(epoch FROM c.timestamp) * 1000000)::int8 - 946684800000000) \
                   FROM walsync.tombstones t \
                   CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(t.xid::xid) c \
                   LEFT JOIN pg_catalog.pg_replication_origin o ON o.roident = c.roident \
                  WHERE t.table_name = $1 AND t.key = $2",
                &[&table, &texts(key)],
            )
            .await
            .map_err(SqlError::of(format!("reading the tombstone of a row of {table}")))?;
        Ok(row.map(|r| Version {
            origin: r
                .get::<_, Option<String>>(0)
                .unwrap_or_else(|| self.local_origin.clone()),
            commit_time_us: r.get(1),
        }))
    }

    /// An update of a table with counter columns: each counter moves by the change the
    /// author made (new - old), on every node, whatever else happened to the row; the
    /// other columns follow the usual decision.
    async fn update_with_counters(
        &mut self,
        m: &Mapped,
        old: &Tuple,
        new: &Tuple,
        counters: &[usize],
    ) -> Result<(), ApplyError> {
        let id = m.id;
        let old_full = OldTuple::Full(old.clone());
        let key = m.key_values(Some(&old_full), Some(new))?;
        let others_changed = changes_besides_counters(old, new, counters);
        // Counters are compared by their change, not their value: leave them out.
        let without_counters = OldTuple::Full(as_unsent(old, counters));
        let (local, decision) = self
            .decide_against_local(m, &key, false, Some(&without_counters))
            .await?;
        let decision = decision.with_counters(local.is_some(), others_changed);
        if local.is_some() {
            // The other columns follow the row's decision, as a whole (last writer wins),
            // and only when this update changed any of them.
            let set_others = others_changed && !matches!(decision, Decision::SkipAndRecord(..));
            if let Some(write) = m.update_counters(old, new, counters, set_others)? {
                let tag = Tag::Row { relation_id: id };
                self.execute(m, write, tag).await?;
            }
        }
        let remote_image = m.source_image(new);
        // The write (if any) is done; what is left is recording the decision.
        self.carry_out(m, decision, None, &key, local, remote_image)
            .await
    }

    pub async fn delete(&mut self, del: &Delete) -> Result<(), ApplyError> {
        match self.ensure_map(del.relation_id).await? {
            Target::Whole(m) => self.delete_mapped(&m, del).await,
            Target::WithoutColumns(m, gone) => self.delete_without_columns(&m, del, &gone).await,
            Target::Dropped => {
                let (OldTuple::Key(old) | OldTuple::Full(old)) = &del.old;
                let kind = ConflictKind::TableDropped;
                self.record_dropped(del.relation_id, kind, old, &[]).await
            }
        }
    }

    /// A delete from a relation whose target is known and complete.
    pub(super) async fn delete_mapped(
        &mut self,
        m: &Mapped,
        del: &Delete,
    ) -> Result<(), ApplyError> {
        let id = del.relation_id;
        if m.is_keyless() {
            return self.delete_keyless(m, del).await;
        }
        let redirected;
        let del = match &del.old {
            OldTuple::Full(old) => match self.redirected(m, old).await? {
                Some(old) => {
                    redirected = Delete {
                        relation_id: id,
                        old: OldTuple::Full(old),
                    };
                    &redirected
                }
                None => del,
            },
            OldTuple::Key(_) => del,
        };
        let key = m.key_values(Some(&del.old), None)?;
        let write = m.delete(&del.old)?;
        if let OldTuple::Full(old) = &del.old {
            self.note_delete(m, &key, old).await?;
        }
        if !self.is_careful() {
            if let Some(guarded) = self.guarded(m, write.clone(), Some(&del.old)) {
                return self.push_guarded(m, guarded, vec![key]).await;
            }
        }
        let (local, decision) = self
            .decide_against_local(m, &key, true, Some(&del.old))
            .await?;
        let old = match &del.old {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        };
        let remote_image = m.source_image(old);
        self.carry_out(m, decision, Some(write), &key, local, remote_image)
            .await
    }

    /// Careful insert: settles collisions on other unique keys, then does nothing if the
    /// primary key holds a row already; then decides.
    pub(super) async fn insert_carefully(
        &mut self,
        m: &Mapped,
        ins: &Insert,
    ) -> Result<(), ApplyError> {
        let id = ins.relation_id;
        if m.is_keyless() {
            return self.insert_keyless_carefully(m, ins).await;
        }
        self.flush_runs().await?;
        let key = m.key_values(None, Some(&ins.new))?;
        let mut new = ins.new.clone();
        let mut attempt = 1;
        let (local, overwrite) = loop {
            new = match self
                .settle_unique_keys(m, new, &key, ConflictKind::InsertExists)
                .await?
            {
                Settled::Write(new) => new,
                Settled::Parked | Settled::Merged => return Ok(()),
            };
            let write = m.insert(&new)?;
            let overwrite = m.overwrite(&new)?;
            let Shape::Insert { columns, .. } = write.shape else {
                unreachable!("RelationMap::insert makes Shape::Insert");
            };
            let stmt = self
                .statement(m, Shape::InsertOrNothing { columns })
                .await?;
            self.flush().await?;
            let inserted = self
                .client
                .execute_raw(&stmt, write.params.iter().map(Param))
                .await
                .map_err(SqlError::of(format!(
                    "applying an insert to {}",
                    self.table_name(id)
                )))?;
            self.rows_in_txn += 1;
            if inserted == 1 {
                return Ok(());
            }
            if let Some(local) = self.read_local(m, &key).await? {
                break (local, overwrite);
            }
            // No row here has its key, yet a unique index refused it. Either another
            // session (another link into this node) committed a colliding row after the
            // lookups above, which the next lookups see: settle again. Or the index reads
            // a column this change does not send, and the row is parked.
            if attempt == SETTLE_ATTEMPTS {
                let why = "the row collides with another row here on a unique index whose rows could not be read";
                self.park(
                    m,
                    ConflictKind::InsertExists,
                    &key,
                    &new,
                    None,
                    "(unknown)",
                    why,
                )
                .await?;
                return Ok(());
            }
            attempt += 1;
        };
        let decision = self
            .policy_of(id)
            .rule
            .decide_insert_exists(&self.remote_version(), &local.version);
        let remote_image = m.source_image(&ins.new);
        self.carry_out(m, decision, overwrite, &key, Some(local), remote_image)
            .await
    }

    /// Makes room for the incoming row `new` (source order; its primary key `key`) on
    /// every unique key other than the primary key. A local row that holds the same values
    /// meets it: the rule decides, both rows stay, and the loser's text column in that key
    /// gets [`renamed`] — the local row by an update, the incoming one in what is returned.
    /// Every node meets the same pair and renames the same row to the same value.
    async fn settle_unique_keys(
        &mut self,
        m: &Mapped,
        mut new: Tuple,
        key: &[Value],
        mut kind: ConflictKind,
    ) -> Result<Settled, ApplyError> {
        let id = m.id;
        let uniques = m.target.uniques.clone();
        let key_text = texts(key);
        let mut collisions = Vec::new();
        for (u, unique) in uniques.into_iter().enumerate() {
            let values: Option<Vec<Value>> = unique
                .columns
                .iter()
                .map(|&c| match m.source_index_of_target(c).map(|s| &new.0[s]) {
                    Some(v @ Value::Text(_)) | Some(v @ Value::Binary(_)) => Some(v.clone()),
                    // An index's expression or predicate may read a NULL.
                    Some(Value::Null) if unique.lookup.is_some() => Some(Value::Null),
                    // NULLs never collide on plain columns; an unsent column is not
                    // changed by this write (and a write that still collides is
                    // parked by `write_or_park`).
                    _ => None,
                })
                .collect();
            let Some(values) = values else { continue };
            let shape = match unique.lookup {
                Some(_) => Shape::ReadByIndex { unique: u },
                None => Shape::ReadByColumns {
                    columns: unique.columns.clone(),
                },
            };
            for local in self.read_locked(m, shape, &values).await? {
                if m.key_of_local(&local) != key_text {
                    collisions.push(Collision {
                        unique: unique.clone(),
                        local,
                    });
                }
            }
        }
        if collisions.len() > 1 {
            kind = ConflictKind::MultipleUniqueConflicts;
        }
        // A collision no rule settles parks the row before anything is renamed or merged
        // for the others: nothing of the incoming row is then written here.
        let policy = self.policy_of(id);
        let has_key = !m.target.key.is_empty();
        let settle = |u: &UniqueKey| {
            settlement(
                &u.name,
                u.renamable,
                has_key,
                UniquePolicy {
                    park: &policy.park_unique,
                    merge: &policy.merge_unique,
                },
            )
        };
        if let Some((i, why)) =
            collisions
                .iter()
                .enumerate()
                .find_map(|(i, c)| match settle(&c.unique) {
                    Settlement::Park { why } => Some((i, why)),
                    _ => None,
                })
        {
            let Collision { unique, local } = collisions.swap_remove(i);
            return self
                .park(m, kind, key, &new, Some(local), &unique.name, why)
                .await;
        }
        // The same entity twice: the row with the smaller primary key stays. If a local
        // row stays, the incoming one merges into it and nothing else of it matters.
        let (merges, renames): (Vec<Collision>, Vec<Collision>) = collisions
            .into_iter()
            .partition(|c| settle(&c.unique) == Settlement::Merge);
        // Every rename's value first: one that cannot fit parks the row before anything
        // is merged or renamed for the others.
        let remote = self.remote_version();
        let rule = &policy.rule;
        let mut planned = Vec::with_capacity(renames.len());
        for c in renames {
            let Settlement::Rename { column, limit } = settle(&c.unique) else {
                unreachable!("parks and merges were partitioned out above");
            };
            let (remote_wins, rule_name) = rule.remote_wins(&remote, &c.local.version);
            let (loser_value, loser_key) = if remote_wins {
                (c.local.values[column].clone(), m.key_of_local(&c.local))
            } else {
                let s = m
                    .source_index_of_target(column)
                    .expect("a collision was read with it");
                (text_of(&new.0[s]), key_text.clone())
            };
            match renamed(&loser_value.unwrap_or_default(), &loser_key, limit) {
                Some(value) => planned.push((c, column, remote_wins, rule_name, value)),
                None => {
                    let why = "its text column is too short to hold a renamed value";
                    return self
                        .park(m, kind, key, &new, Some(c.local), &c.unique.name, why)
                        .await;
                }
            }
        }
        let table = m.target_name();
        // The incoming row merges into the local row with the smallest key that stays
        // (every node that meets any of them picks the same one).
        let into_local = merges
            .iter()
            .map(|c| (m.key_of_local(&c.local), c))
            .filter(|(local_key, _)| !stays(&key_text, local_key))
            .reduce(|a, b| if stays(&a.0, &b.0) { a } else { b });
        if let Some((winner, c)) = into_local {
            let merge = (
                &key_text[..],
                &winner[..],
                "the incoming row",
                "the local row",
            );
            self.merge_and_record(m, &table, c, merge, kind, key, &new)
                .await?;
            return Ok(Settled::Merged);
        }
        for c in &merges {
            let loser = m.key_of_local(&c.local);
            let merge = (
                &loser[..],
                &key_text[..],
                "the local row",
                "the incoming row",
            );
            self.merge_and_record(m, &table, c, merge, kind, key, &new)
                .await?;
        }
        for (Collision { unique, local }, column, remote_wins, rule_name, value) in planned {
            let outcome = if remote_wins {
                Outcome::LocalRenamed
            } else {
                Outcome::RemoteRenamed
            };
            // The renamed value, and what the table's `on_rename` gives the loser besides.
            let mut writes = vec![(column, value)];
            writes.extend(
                policy
                    .on_rename
                    .iter()
                    .filter(|(c, _)| *c != column)
                    .cloned(),
            );
            let detail = format!(
                "unique key {}: {}",
                unique.name,
                writes
                    .iter()
                    .map(|(c, v)| format!("{} = {}", m.target.columns[*c], Json::String(v.clone())))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let text = |v: String| Value::Text(bytes::Bytes::from(v.into_bytes()));
            if remote_wins {
                let set: Vec<usize> = writes.iter().map(|(c, _)| *c).collect();
                let mut params: Vec<Value> = writes.into_iter().map(|(_, v)| text(v)).collect();
                params.extend(m.target.key.iter().map(|&k| value_of(&local.values[k])));
                let write = RowWrite {
                    shape: Shape::Update { set },
                    params,
                };
                self.execute(m, write, Tag::Row { relation_id: id }).await?;
            } else {
                for (c, v) in writes {
                    // A column the upstream does not send keeps the target's default.
                    if let Some(s) = m.source_index_of_target(c) {
                        new.0[s] = text(v);
                    }
                }
            }
            let record = Record {
                kind,
                key: m.key_image(key),
                local: Some((m.local_image(&local), local.version)),
                remote: m.source_image(&new),
                rule: rule_name,
                outcome,
                detail: Some(detail),
            };
            self.record(id, record).await?;
        }
        Ok(Settled::Write(new))
    }

    /// Parks an incoming row that collides on a unique key no rule settles: it is not
    /// written here, its whole image is recorded (outcome `parked`, a problem `walsync
    /// status` shows), and the link goes on with everything else.
    #[allow(clippy::too_many_arguments)]
    async fn park(
        &mut self,
        m: &Mapped,
        kind: ConflictKind,
        key: &[Value],
        new: &Tuple,
        local: Option<LocalRow>,
        index: &str,
        why: &str,
    ) -> Result<Settled, ApplyError> {
        let id = m.id;
        tracing::warn!(
            link = %self.link, table = %self.table_name(id), key = %m.key_image(key),
            index, why, "row parked: a unique collision no rule settles"
        );
        let record = Record {
            kind,
            key: m.key_image(key),
            local: local.map(|l| (m.local_image(&l), l.version)),
            remote: m.source_image(new),
            rule: "none_applies",
            outcome: Outcome::Parked,
            detail: Some(format!(
                "unique key {index}: {why}; the incoming row was not written here. Settle the two rows by hand \
                 (change or merge them on one node), then walsync conflicts reapply this record if the row is still wanted"
            )),
        };
        self.record(id, record).await?;
        Ok(Settled::Parked)
    }

    /// Merges the row `loser` into the row `winner` (`merge`: their keys, then which of
    /// the incoming and local rows each is, for the record) and records it.
    #[allow(clippy::too_many_arguments)]
    async fn merge_and_record(
        &mut self,
        m: &Mapped,
        table: &TableName,
        c: &Collision,
        (loser, winner, loser_is, winner_is): (&[String], &[String], &str, &str),
        kind: ConflictKind,
        key: &[Value],
        new: &Tuple,
    ) -> Result<(), ApplyError> {
        let id = m.id;
        let merged = self.merge_rows(table, loser, winner).await?;
        let detail = format!(
            "unique key {}: the same entity on two nodes; {loser_is} {} merged into {winner_is} {} \
             (the smaller key stays); {}",
            c.unique.name,
            Json::from(loser.to_vec()),
            Json::from(winner.to_vec()),
            merged.describe()
        );
        let local = &c.local;
        let record = Record {
            kind,
            key: m.key_image(key),
            local: Some((m.local_image(local), local.version.clone())),
            remote: m.source_image(new),
            rule: SMALLER_KEY_STAYS,
            outcome: Outcome::Merged,
            detail: Some(detail),
        };
        self.record(id, record).await
    }

    /// Writes (or not) and records, as decided.
    async fn carry_out(
        &mut self,
        m: &Mapped,
        decision: Decision,
        write: Option<RowWrite>,
        key: &[Value],
        local: Option<LocalRow>,
        remote_image: Json,
    ) -> Result<(), ApplyError> {
        let relation_id = m.id;
        let (apply, record) = decision.plan(local.is_some());
        if apply {
            if let Some(write) = write {
                if self.is_careful() {
                    if let Some(refused) = self.write_or_park(m, write).await? {
                        return self
                            .record_refused(m, decision, key, local, remote_image, refused)
                            .await;
                    }
                } else {
                    let tag = Tag::Row { relation_id };
                    self.execute(m, write, tag).await?;
                }
            }
        }
        if let Some((kind, rule, outcome)) = record {
            let record = Record {
                kind,
                key: m.key_image(key),
                local: local.map(|l| (m.local_image(&l), l.version)),
                remote: remote_image,
                rule,
                outcome,
                detail: None,
            };
            self.record(relation_id, record).await?;
        }
        Ok(())
    }

    /// Records a change a unique index refused in careful mode as parked: not written here.
    async fn record_refused(
        &mut self,
        m: &Mapped,
        decision: Decision,
        key: &[Value],
        local: Option<LocalRow>,
        remote_image: Json,
        refused: String,
    ) -> Result<(), ApplyError> {
        let record = Record {
            kind: decision.refused_kind(),
            key: m.key_image(key),
            local: local.map(|l| (m.local_image(&l), l.version)),
            remote: remote_image,
            rule: "none_applies",
            outcome: Outcome::Parked,
            detail: Some(format!(
                "{refused}; the incoming change was not written here. Settle the two rows by hand, \
                 then walsync conflicts reapply this record if the change is still wanted"
            )),
        };
        self.record(m.id, record).await
    }

    /// In careful mode: writes one change inside a savepoint and waits for the answer.
    /// A unique violation (a key no lookup found, a rename that still collides) rolls
    /// the change back and is returned as the server's message, for the caller to park
    /// the row; the transaction goes on.
    pub(super) async fn write_or_park(
        &mut self,
        m: &Mapped,
        write: RowWrite,
    ) -> Result<Option<String>, ApplyError> {
        let relation_id = m.id;
        self.flush_runs().await?;
        let stmt = self.statement(m, write.shape).await?;
        self.flush().await?;
        self.rows_in_txn += 1;
        let params: Vec<Param> = write.params.iter().map(Param).collect();
        let table = self.table_name(relation_id);
        match super::unless_duplicate(&self.client, &stmt, &super::as_params(&params))
            .await
            .map_err(|e| super::change_failed(table, e))?
        {
            super::Tried::Done(_) => Ok(None),
            super::Tried::Duplicate { message, .. } => Ok(Some(message)),
        }
    }

    pub(super) async fn record(&mut self, relation_id: u32, r: Record) -> Result<(), ApplyError> {
        // The source's names: they are the target's (tables are matched by name), and
        // they still exist when the target was dropped here.
        let source = &self.relations[&relation_id].source;
        let table = (source.namespace.clone(), source.name.clone());
        self.record_on(table, r).await
    }

    /// [`ApplyWorker::record`] for table `(schema, name)`.
    pub(super) async fn record_on(
        &mut self,
        (schema, table): (String, String),
        r: Record,
    ) -> Result<(), ApplyError> {
        tracing::info!(
            link = %self.link, table = %format!("{schema}.{table}"), conflict = r.kind.as_str(),
            outcome = r.outcome.as_str(), key = %r.key, "conflict decided"
        );
        if self.record_conflict.is_none() {
            self.flush().await?;
            let stmt = self
                .client
                .prepare_typed(
                    &format!(
                        "INSERT INTO walsync.conflicts (link, kind, table_schema, table_name, key, local_row, \
                           local_origin, local_commit_time, remote_row, remote_origin, remote_commit_time, rule, outcome, detail) \
                         VALUES ($1, $2, $3, $4, $5::text::jsonb, $6::text::jsonb, $7, {}, $9::text::jsonb, $10, {}, \
                           $12, $13, $14)",
                        super::timestamp_sql("$8::int8"),
                        super::timestamp_sql("$11::int8")
                    ),
                    &[
                        Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT,
                        Type::INT8, Type::TEXT, Type::TEXT, Type::INT8, Type::TEXT,
                    ],
                )
                .await
                .map_err(SqlError::of_bookkeeping("preparing the conflict record"))?;
            self.record_conflict = Some(stmt);
        }
        let stmt = self.record_conflict.clone().expect("prepared above");
        let txn = self.open_txn();
        let (local_row, local_origin, local_time) = match r.local {
            Some((img, v)) => (Some(img.to_string()), Some(v.origin), v.commit_time_us),
            None => (None, None, None),
        };
        // Owned, so that the request can outlive this call in the pipeline.
        let text: [String; 6] = [
            self.link.clone(),
            r.kind.as_str().to_string(),
            schema,
            table,
            r.key.to_string(),
            r.remote.to_string(),
        ];
        let local: (Option<String>, Option<String>, Option<i64>) =
            (local_row, local_origin, local_time);
        let remote: (String, i64, String, String, Option<String>) = (
            txn.origin,
            txn.commit_time_us,
            r.rule.to_string(),
            r.outcome.as_str().to_string(),
            r.detail,
        );
        let client = self.client.clone();
        self.send(
            Tag::Other {
                what: "recording a conflict",
            },
            512,
            async move {
                let [link, kind, schema, table, key, remote_row] = &text;
                let (local_row, local_origin, local_time) = &local;
                let (remote_origin, remote_time, rule, outcome, detail) = &remote;
                client
                    .execute(
                        &stmt,
                        &[
                            link,
                            kind,
                            schema,
                            table,
                            key,
                            local_row,
                            local_origin,
                            local_time,
                            remote_row,
                            remote_origin,
                            remote_time,
                            rule,
                            outcome,
                            detail,
                        ],
                    )
                    .await
            },
        )
        .await
    }
}

/// Images and keys of a mapped relation's rows, for records and comparisons.
impl Mapped {
    /// The local row as a JSON image (target column names).
    fn local_image(&self, local: &LocalRow) -> Json {
        let values: Vec<Value> = local.values.iter().map(value_of).collect();
        row_image(&self.target.columns, &values)
    }

    pub(super) fn source_image(&self, tuple: &Tuple) -> Json {
        row_image(&self.source_column_names(), &tuple.0)
    }

    pub(super) fn key_image(&self, key: &[Value]) -> Json {
        row_image(&self.key_names(), key)
    }

    /// A local row's primary key values as text (target key order).
    fn key_of_local(&self, local: &LocalRow) -> Vec<String> {
        self.target
            .key
            .iter()
            .map(|&k| local.values[k].clone().unwrap_or_default())
            .collect()
    }

    /// The local row in source column order (for comparing with sent images).
    fn in_source_order(&self, local: &LocalRow) -> Vec<Option<String>> {
        (0..self.source_column_names().len())
            .map(|i| local.values[self.target_index_of_source(i)].clone())
            .collect()
    }

    /// The target table of a mapped relation.
    fn target_name(&self) -> TableName {
        let t = &self.target;
        (t.schema.clone(), t.name.clone())
    }
}

/// A local value (text, or NULL) as a value to send.
fn value_of(v: &Option<String>) -> Value {
    match v {
        Some(s) => Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes())),
        None => Value::Null,
    }
}

/// A sent value as text (`None`: NULL, binary or not sent).
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// Key values as text, to compare with a local row's.
fn texts(values: &[Value]) -> Vec<String> {
    values
        .iter()
        .map(|v| text_of(v).unwrap_or_default())
        .collect()
}
