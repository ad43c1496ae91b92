//! Changes outside their author's write scope (`[[peers]] writes`, `merge::scope`): not
//! applied here, recorded whole in `walsync.conflicts` (`out_of_scope`), and the rest of
//! the transaction and of the link goes on. A stolen store's rows thus reach only the
//! tables a store writes anyway.

use super::Change;
use super::{ApplyError, ApplyWorker};
use crate::merge::conflict::{ConflictKind, WRITE_SCOPE};
use crate::merge::scope::WriteScopes;
use crate::pgoutput::{OldTuple, Truncate, Tuple};

impl ApplyWorker {
    /// What each author may write here (`[[peers]] writes` of this node's config).
    pub fn set_write_scopes(&mut self, scopes: WriteScopes) {
        self.writes = std::sync::Arc::new(scopes);
    }

    /// Whether the open transaction's author may change this relation here.
    fn in_scope(&self, relation_id: u32) -> bool {
        let (Some(txn), Some(entry)) = (&self.open, self.relations.get(&relation_id)) else {
            return true;
        };
        let source = &entry.source;
        self.writes
            .allows(&txn.origin, &source.namespace, &source.name)
    }

    /// `change` as far as its author may write it here: `None` once everything outside
    /// the scope is recorded and nothing is left to apply.
    pub(super) async fn within_scope(
        &mut self,
        change: &Change,
    ) -> Result<Option<Change>, ApplyError> {
        let row: &Tuple = match change {
            Change::Insert(i) => &i.new,
            Change::Update(u) => &u.new,
            Change::Delete(d) => match &d.old {
                OldTuple::Key(t) | OldTuple::Full(t) => t,
            },
            Change::Truncate(t) => return self.truncate_within_scope(t).await,
            Change::SetAside(_) => return Ok(Some(change.clone())),
        };
        let (id, verb) = match change {
            Change::Insert(i) => (i.relation_id, "INSERT"),
            Change::Update(u) => (u.relation_id, "UPDATE"),
            Change::Delete(d) => (d.relation_id, "DELETE"),
            Change::Truncate(_) | Change::SetAside(_) => unreachable!("returned above"),
        };
        if self.in_scope(id) {
            return Ok(Some(change.clone()));
        }
        // Mapped where the table is here, so that the record names its row by its key.
        match self.ensure_map(id).await {
            Ok(_) | Err(ApplyError::MissingTable { .. } | ApplyError::MissingColumn { .. }) => {}
            Err(e) => return Err(e),
        }
        let detail = self.out_of_scope_detail(id, verb);
        self.record_row(id, ConflictKind::OutOfScope, WRITE_SCOPE, row, detail)
            .await?;
        Ok(None)
    }

    /// A TRUNCATE goes whole or not at all: one that names (or cascades to) a table
    /// outside the scope is recorded for each table it names and not applied.
    async fn truncate_within_scope(&mut self, t: &Truncate) -> Result<Option<Change>, ApplyError> {
        let refused: Vec<String> = t
            .relation_ids
            .iter()
            .filter(|&&id| !self.in_scope(id))
            .map(|&id| self.table_name(id))
            .collect();
        if refused.is_empty() {
            return Ok(Some(Change::Truncate(t.clone())));
        }
        let verb = format!("TRUNCATE (of {})", refused.join(", "));
        for &id in &t.relation_ids {
            let detail = self.out_of_scope_detail(id, &verb);
            let nothing = Tuple(Vec::new());
            self.record_row(id, ConflictKind::OutOfScope, WRITE_SCOPE, &nothing, detail)
                .await?;
        }
        Ok(None)
    }

    fn out_of_scope_detail(&self, relation_id: u32, verb: &str) -> String {
        let author = self
            .open
            .as_ref()
            .map(|t| t.origin.trim_start_matches("walsync_").to_string())
            .unwrap_or_default();
        format!(
            "{verb} on {} by {author}, which may not write that on this node \
             ([[peers]] writes of {author} in this node's config); not applied",
            self.table_name(relation_id)
        )
    }
}
