//! The relations a link has seen: each source relation's description, its target table
//! read from the catalog on first use and the statements prepared for it, what this node
//! dropped of it, and the table policy resolved against its columns.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Statement;

use super::{catalog, dropped, renamed, ApplyError, ApplyWorker};
use crate::config::{MergeMode, TablePolicy};
use crate::merge::conflict::Rule;
use crate::merge::keys::ForeignKey;
use crate::merge::relation_travels;
use crate::merge::statements::{RelationMap, Shape, StatementError};
use crate::pgoutput::{Insert, Relation};
use crate::sql_error::SqlError;

/// What the applier knows about one source relation.
pub(super) struct RelationEntry {
    pub(super) source: Relation,
    /// Whether its changes are applied at all (read once per Relation message: it is
    /// asked at every change).
    pub(super) travels: bool,
    /// `None` until the first change needs it (the target catalog is read then).
    pub(super) map: Option<Arc<RelationMap>>,
    /// A DDL statement was replayed since the map was made: the catalog is read again
    /// at the next change, and the map and its statements are kept only if the table is
    /// as it was.
    pub(super) stale: bool,
    /// How its conflicts are decided (from the table policy, set with the map); shared,
    /// as every change of the relation reads it.
    pub(super) policy: Arc<RelationPolicy>,
    /// What this node dropped of it (found with the map): its changes are recorded, not
    /// applied, for the dropped part.
    pub(super) gone: Gone,
    /// Its foreign keys into other tables' primary keys: read the first time a change
    /// of it is applied while any merge is known (decision 0008).
    pub(super) fks: Option<Vec<ForeignKey>>,
}

/// A relation whose target table is mapped here. Only [`ApplyWorker::ensure_map`] hands
/// one out: the code that writes through it never asks whether the map is there. It
/// keeps the map it was made with, also when a DDL replay makes the relation's map be
/// read again.
#[derive(Clone)]
pub(super) struct Mapped {
    pub(super) id: u32,
    pub(super) map: Arc<RelationMap>,
}

impl std::ops::Deref for Mapped {
    type Target = RelationMap;

    fn deref(&self) -> &RelationMap {
        &self.map
    }
}

/// What a source relation is on this node.
pub(super) enum Target {
    /// Its table, whole.
    Whole(Mapped),
    /// Its table without the columns this node dropped (source indexes, ascending); the
    /// map leaves them out.
    WithoutColumns(Mapped, Vec<usize>),
    /// This node dropped its table.
    Dropped,
}

impl Target {
    fn of(id: u32, map: Arc<RelationMap>, gone: &Gone) -> Target {
        let mapped = Mapped { id, map };
        match gone {
            Gone::Nothing => Target::Whole(mapped),
            Gone::Columns(columns) => Target::WithoutColumns(mapped, columns.clone()),
            Gone::Table => Target::Dropped,
        }
    }
}

/// Whether changes to `rel` are applied at all, under the table policies `policies`.
pub(super) fn travels(policies: &HashMap<(String, String), TablePolicy>, rel: &Relation) -> bool {
    let local = policies
        .get(&(rel.namespace.clone(), rel.name.clone()))
        .is_some_and(|p| p.local);
    relation_travels(&rel.namespace, &rel.name, local)
}

/// A relation the upstream still sends, that this node dropped (wholly or some columns).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum Gone {
    #[default]
    Nothing,
    Table,
    /// Source column indexes of the dropped columns, ascending.
    Columns(Vec<usize>),
}

/// A table policy resolved against one source relation.
#[derive(Debug, Clone, Default)]
pub(super) struct RelationPolicy {
    /// Source column indexes of the counter columns.
    pub(super) counters: Vec<usize>,
    /// Source column indexes of the node-local columns.
    pub(super) local_columns: Vec<usize>,
    /// Source column indexes of columns an open DDL warning says each node filled with
    /// its own values: left out when telling a sequential edit from a conflict.
    pub(super) per_node_columns: Vec<usize>,
    /// Unique indexes whose collisions park the incoming row rather than settle it.
    pub(super) park_unique: Vec<String>,
    /// Unique indexes whose collisions merge the two rows although they could rename.
    pub(super) merge_unique: Vec<String>,
    /// Target columns (and their values, as text) the losing row of a rename also gets.
    pub(super) on_rename: Vec<(usize, String)>,
    pub(super) rule: Rule,
    pub(super) merge_columns: bool,
}

impl ApplyWorker {
    /// A Relation message: (re)describes a source relation. Anything cached for it goes
    /// (its statements, and the combined ones that write it: `held`). Changes decoded
    /// under the old description and not sent yet (pending or held) are sent first, with
    /// the old mapping.
    pub async fn on_relation(&mut self, rel: Relation) -> Result<(), ApplyError> {
        if self.run.as_ref().is_some_and(|r| r.mapped.id == rel.id) || self.holds(rel.id) {
            self.flush_runs().await?;
        }
        self.statements.retain(|(id, _), _| *id != rel.id);
        self.combined.forget(Some(rel.id));
        self.relations.insert(
            rel.id,
            RelationEntry {
                travels: travels(&self.policies, &rel),
                policy: Default::default(),
                gone: Gone::Nothing,
                source: rel,
                map: None,
                stale: false,
                fks: None,
            },
        );
        Ok(())
    }

    /// Whether changes to this relation are applied at all.
    pub fn replicates(&self, relation_id: u32) -> Result<bool, ApplyError> {
        self.relations
            .get(&relation_id)
            .map(|e| e.travels)
            .ok_or(ApplyError::UnknownRelation(relation_id))
    }

    /// The relation's target here, its table read from the catalog the first time.
    pub(super) async fn ensure_map(&mut self, relation_id: u32) -> Result<Target, ApplyError> {
        let entry = self
            .relations
            .get(&relation_id)
            .ok_or(ApplyError::UnknownRelation(relation_id))?;
        match (&entry.map, &entry.gone) {
            (Some(map), gone) if !entry.stale => {
                return Ok(Target::of(relation_id, map.clone(), gone))
            }
            (None, Gone::Table) => return Ok(Target::Dropped),
            _ => {}
        }
        // Direct requests wait for everything in flight (see `begin`); once per relation.
        self.flush().await?;
        let entry = self
            .relations
            .get(&relation_id)
            .ok_or(ApplyError::UnknownRelation(relation_id))?;
        let (namespace, name) = (entry.source.namespace.clone(), entry.source.name.clone());
        let client = self.client.clone();
        let mut found = self.catalog.table(&client, &namespace, &name).await?;
        let dropped_here =
            found.is_none() && dropped::table_was_dropped(&self.client, &namespace, &name).await?;
        // The captured renames, read once, only where a table or column is missing.
        let mut renames = None;
        if found.is_none() && !dropped_here {
            // Renamed here since the upstream wrote the change (a cut during the rename).
            let captured = renamed::captured_renames(&self.client).await?;
            if let Some(new) = crate::ddl::renamed_table(&captured, &namespace, &name) {
                found = self.catalog.table(&client, &namespace, &new).await?;
            }
            renames = Some(captured);
        }
        if let Some(target) = self.unchanged_after_ddl(relation_id, found.as_ref()) {
            return Ok(target);
        }
        let Some(catalog::CatalogEntry {
            table: target,
            per_node_columns,
        }) = found
        else {
            if dropped_here {
                self.set_gone(relation_id, Gone::Table);
                return Ok(Target::Dropped);
            }
            return Err(ApplyError::MissingTable {
                table: format!("{namespace}.{name}"),
            });
        };
        let entry = self.relations.get(&relation_id).expect("checked above");
        let (mut source, gone) =
            dropped::without_dropped_columns(&self.client, &entry.source, &target).await?;
        if renamed::lacks_a_column(&source, &target) {
            let renames = match renames {
                Some(r) => r,
                None => renamed::captured_renames(&self.client).await?,
            };
            source = renamed::with_renamed_columns(source, &target, &renames);
        }
        let map = Arc::new(RelationMap::new(&source, target).map_err(|e| match e {
            StatementError::MissingColumn { column, .. } => ApplyError::MissingColumn {
                table: format!("{namespace}.{name}"),
                column,
            },
            e => e.into(),
        })?);
        let key = (entry.source.namespace.clone(), entry.source.name.clone());
        let mut policy = match self.policies.get(&key) {
            Some(p) => RelationPolicy {
                counters: map.source_indexes_of(&p.counters),
                local_columns: map.source_indexes_of(&p.local_columns),
                per_node_columns: Vec::new(),
                park_unique: p.park_unique.clone(),
                merge_unique: p.merge_unique.clone(),
                on_rename: p
                    .on_rename
                    .iter()
                    .filter_map(|(name, value)| {
                        let column = map.target.columns.iter().position(|c| c == name);
                        if column.is_none() {
                            tracing::warn!(table = %map.target.qualified(), column = %name, "[[tables]] on_rename names a column this table does not have; ignored");
                        }
                        Some((column?, value.clone()))
                    })
                    .collect(),
                rule: Rule {
                    prefer: p.prefer.as_deref().map(|n| format!("walsync_{n}")),
                },
                merge_columns: p.merge == MergeMode::Columns,
            },
            None => RelationPolicy::default(),
        };
        policy.per_node_columns = map.source_indexes_of(&per_node_columns);
        let target = Target::of(relation_id, map.clone(), &gone);
        if let Some(e) = self.relations.get_mut(&relation_id) {
            e.map = Some(map);
            e.stale = false;
            e.policy = Arc::new(policy);
            e.gone = gone;
        }
        Ok(target)
    }

    /// For a map made before a DDL replay (`stale`): the relation's target as it was, if
    /// the catalog shows its table unchanged (`found`: the table as read now) and no DDL
    /// warning changed which of its columns are per node. Otherwise the map and every
    /// statement that writes the relation are dropped, for the caller to make them anew.
    fn unchanged_after_ddl(
        &mut self,
        relation_id: u32,
        found: Option<&catalog::CatalogEntry>,
    ) -> Option<Target> {
        let entry = self.relations.get_mut(&relation_id)?;
        if !entry.stale {
            return None;
        }
        entry.stale = false;
        let map = entry.map.take()?;
        if let Some(found) = found {
            if found.table == map.target
                && map.source_indexes_of(&found.per_node_columns) == entry.policy.per_node_columns
            {
                entry.map = Some(map.clone());
                return Some(Target::of(relation_id, map, &entry.gone));
            }
        }
        entry.gone = Gone::Nothing;
        self.statements.retain(|(id, _), _| *id != relation_id);
        self.combined.forget(Some(relation_id));
        None
    }

    /// The prepared statement of `shape` on this relation. Prepared before it is pushed,
    /// so that pushing sends the request itself (a statement prepared inside the
    /// pushed future would let later requests overtake it).
    pub(super) async fn statement(
        &mut self,
        mapped: &Mapped,
        shape: Shape,
    ) -> Result<Statement, ApplyError> {
        let key = (mapped.id, shape);
        if let Some(stmt) = self.statements.get(&key) {
            return Ok(stmt.clone());
        }
        // Direct requests wait for everything in flight (see `begin`); once per shape.
        self.flush().await?;
        let sql = mapped.sql(&key.1);
        let stmt = self
            .client
            .prepare(&sql)
            .await
            .map_err(SqlError::of(format!("preparing {sql}")))?;
        self.statements.insert(key, stmt.clone());
        Ok(stmt)
    }

    /// The table policies this link applies with (the same on every node).
    pub fn set_policies(&mut self, tables: &[TablePolicy]) {
        self.policies = tables.iter().map(|t| (t.qualified(), t.clone())).collect();
        for e in self.relations.values_mut() {
            e.travels = travels(&self.policies, &e.source);
        }
    }

    pub(super) fn policy_of(&self, relation_id: u32) -> Arc<RelationPolicy> {
        self.relations
            .get(&relation_id)
            .map(|e| e.policy.clone())
            .unwrap_or_default()
    }

    pub(super) fn table_name(&self, relation_id: u32) -> String {
        self.relations
            .get(&relation_id)
            .map(|e| format!("{}.{}", e.source.namespace, e.source.name))
            .unwrap_or_else(|| format!("relation {relation_id}"))
    }

    /// The text of column `name` of an inserted row (walsync's own rows: a DDL log entry,
    /// a merge note); `None` if the relation has no such column or it is NULL.
    pub(super) fn field_of(&self, ins: &Insert, name: &str) -> Option<String> {
        let entry = self.relations.get(&ins.relation_id)?;
        let i = entry.source.columns.iter().position(|c| c.name == name)?;
        ins.new.0.get(i)?.as_text().map(str::to_string)
    }
}
