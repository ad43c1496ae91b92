//! Source transactions set aside (migration 0020, decision 0014): a transaction that
//! changes a table not here, or a table an earlier set-aside transaction of its link
//! changes, is kept whole in `walsync.set_aside` instead of stopping the link; the link
//! (`runtime::set_aside`) decides which and applies them again once their tables are
//! here. Here: writing one into the open target transaction, which also carries the
//! link's progress past it.

use super::pipeline::Tag;
use super::{ApplyError, ApplyWorker};
use crate::lsn::Lsn;

/// One source transaction kept whole, as `walsync.set_aside` stores it.
#[derive(Debug, Clone)]
pub struct SetAsideTxn {
    pub end_lsn: Lsn,
    /// What it waits for: a table's name, as the upstream calls it.
    pub waits_for: String,
    /// Every table it changes (`schema.table`, as the upstream calls them).
    pub tables: Vec<String>,
    pub changes: i32,
    /// Its pgoutput messages in stream order, each Relation message it needs first.
    pub messages: Vec<Vec<u8>>,
}

impl SetAsideTxn {
    pub fn bytes(&self) -> usize {
        self.messages.iter().map(|m| m.len() + 8).sum()
    }
}

impl ApplyWorker {
    /// Writes `txn` into `walsync.set_aside` in the open target transaction (whose
    /// origin and commit time are the set-aside transaction's).
    pub(super) async fn set_aside(&mut self, txn: &SetAsideTxn) -> Result<(), ApplyError> {
        let remote = self.open_txn();
        let client = self.client.clone();
        let (link, txn) = (self.link.clone(), txn.clone());
        let bytes = txn.bytes();
        self.rows_in_txn += 1;
        self.send(
            Tag::Other {
                what: "setting a transaction aside (walsync.set_aside)",
            },
            bytes,
            async move {
                client
                    .execute(
                        "INSERT INTO walsync.set_aside (link, end_lsn, origin, origin_lsn, commit_time, \
                         waits_for, tables, changes, messages) \
                         VALUES ($1, $2::text::pg_lsn, $3, $4::text::pg_lsn, \
                         '2000-01-01 00:00:00+00'::timestamptz + $5::int8 * interval '1 microsecond', \
                         $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                        &[
                            &link,
                            &txn.end_lsn.to_string(),
                            &remote.origin,
                            &remote.origin_lsn.to_string(),
                            &remote.commit_time_us,
                            &txn.waits_for,
                            &txn.tables,
                            &txn.changes,
                            &txn.messages,
                        ],
                    )
                    .await
            },
        )
        .await
    }
}
