//! Conflict decisions: pure, so that every node decides the same from the same inputs.
//!
//! A version of a row is its last writer's replication origin and commit time. When an
//! incoming change meets a local row written by another origin, and the change was not
//! made on top of that very row (its old image, sent under REPLICA IDENTITY FULL, differs
//! or is unknown), the two versions are concurrent. Between two writes a preferred node
//! (table policy `prefer`) wins, else the later commit time, ties broken by origin name;
//! a delete and a concurrent update too: the node that deleted keeps the delete's version
//! in a tombstone, and a later update brings the row back there (decision 0016, which
//! replaces decision 0003's "a delete always wins"). Two rows that meet on
//! a unique key other than the primary key both stay: the loser's value is renamed
//! ([`renamed`], decision 0004). Both versions are recorded, whoever wins.

use serde_json::{Map, Value as Json};

use crate::pgoutput::{OldTuple, Tuple, Update, Value};

/// Conflict kinds, named as PostgreSQL 18 names them (`pg_stat_subscription_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    InsertExists,
    UpdateOriginDiffers,
    UpdateExists,
    UpdateMissing,
    DeleteOriginDiffers,
    DeleteMissing,
    MultipleUniqueConflicts,
    /// walsync's own: a change for a table this node dropped (a peer was cut off when
    /// the DROP ran). Not applied, recorded.
    TableDropped,
    /// walsync's own: a change that set columns this node dropped; the rest is applied.
    ColumnDropped,
    /// walsync's own: a row of walsync's replicated bookkeeping (a merge note) naming as
    /// its author a node that neither wrote nor forwarded the transaction carrying it.
    /// Not applied, recorded.
    ForgedRecord,
    /// walsync's own: a change to a table its author may not write on this node
    /// (`[[peers]] writes`). Not applied, recorded.
    OutOfScope,
    /// An update for a row deleted here (a tombstone holds the delete's time): decided
    /// by time, a later update brings the row back whole (PostgreSQL 19's name).
    UpdateDeleted,
    /// walsync's own: a delete of a row that rows its author did not know still refer
    /// to here. The row stays, and is sent again to every node (decision 0016).
    DeleteReferenced,
}

impl ConflictKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert_exists",
            ConflictKind::UpdateOriginDiffers => "update_origin_differs",
            ConflictKind::UpdateExists => "update_exists",
            ConflictKind::UpdateMissing => "update_missing",
            ConflictKind::DeleteOriginDiffers => "delete_origin_differs",
            ConflictKind::DeleteMissing => "delete_missing",
            ConflictKind::MultipleUniqueConflicts => "multiple_unique_conflicts",
            ConflictKind::TableDropped => "table_dropped",
            ConflictKind::ColumnDropped => "column_dropped",
            ConflictKind::ForgedRecord => "forged_record",
            ConflictKind::OutOfScope => "out_of_scope",
            ConflictKind::UpdateDeleted => "update_deleted",
            ConflictKind::DeleteReferenced => "delete_referenced",
        }
    }

    pub const ALL: [ConflictKind; 13] = [
        ConflictKind::InsertExists,
        ConflictKind::UpdateOriginDiffers,
        ConflictKind::UpdateExists,
        ConflictKind::UpdateMissing,
        ConflictKind::DeleteOriginDiffers,
        ConflictKind::DeleteMissing,
        ConflictKind::MultipleUniqueConflicts,
        ConflictKind::TableDropped,
        ConflictKind::ColumnDropped,
        ConflictKind::ForgedRecord,
        ConflictKind::OutOfScope,
        ConflictKind::UpdateDeleted,
        ConflictKind::DeleteReferenced,
    ];

    /// The kind named `s` (as `as_str` writes it).
    pub fn parse(s: &str) -> Option<ConflictKind> {
        ConflictKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// What a conflict's decision did, as `walsync.conflicts.outcome` stores it (the check of
/// migration 0011) and `walsync conflicts` reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The incoming version was written over the local one.
    RemoteApplied,
    /// The local version stayed; the incoming one is recorded.
    LocalKept,
    /// Nothing to write (the row is gone here).
    Skipped,
    /// Each side's changed columns were kept (`merge = "columns"`).
    ColumnsMerged,
    /// Both rows stay; the local one's unique value was renamed.
    LocalRenamed,
    /// Both rows stay; the incoming one's unique value was renamed.
    RemoteRenamed,
    /// The incoming row collides on a key no rule settles: not written here.
    Parked,
    /// The two rows were one entity: one stays, the other's references point at it and
    /// it goes (decision 0008; `detail` says which stayed).
    Merged,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::RemoteApplied,
        Outcome::LocalKept,
        Outcome::Skipped,
        Outcome::ColumnsMerged,
        Outcome::LocalRenamed,
        Outcome::RemoteRenamed,
        Outcome::Parked,
        Outcome::Merged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::RemoteApplied => "remote_applied",
            Outcome::LocalKept => "local_kept",
            Outcome::Skipped => "skipped",
            Outcome::ColumnsMerged => "columns_merged",
            Outcome::LocalRenamed => "local_renamed",
            Outcome::RemoteRenamed => "remote_renamed",
            Outcome::Parked => "parked",
            Outcome::Merged => "merged",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whose version the row holds afterwards: the incoming one's author (`Some(true)`),
    /// the local one's (`Some(false)`), or neither alone.
    pub fn remote_won(self) -> Option<bool> {
        match self {
            Outcome::RemoteApplied | Outcome::LocalRenamed => Some(true),
            Outcome::LocalKept | Outcome::RemoteRenamed => Some(false),
            _ => None,
        }
    }
}

/// Who last wrote a version: replication origin name (`walsync_<node>`) and commit time
/// in microseconds since 2000-01-01 UTC (`None`: unknown, e.g. written before
/// `track_commit_timestamp` was on; it loses against any known time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub origin: String,
    pub commit_time_us: Option<i64>,
}

/// The rule that decided a conflict, as recorded in `walsync.conflicts.rule`.
pub const LAST_WRITER_WINS: &str = "last_writer_wins";
pub const PREFER_NODE: &str = "prefer_node";
/// A row still referenced here is not deleted (decision 0016).
pub const REFERENCED_ROW_STAYS: &str = "referenced_row_stays";
/// An update that should bring a deleted row back, but did not send all of it.
pub const NOT_WHOLE: &str = "row_not_whole";
pub const NO_LOCAL_ROW: &str = "no_local_row";
pub const COLUMN_MERGE: &str = "column_merge";
pub const DROPPED_HERE: &str = "dropped_here";
/// A node's bookkeeping rows are taken only from that node (or the hub forwarding them).
pub const AUTHOR_ONLY: &str = "author_only";
/// A peer's rows change only the tables its `[[peers]] writes` names.
pub const WRITE_SCOPE: &str = "write_scope";

/// Whether a merge note decided by `decided_by` may be learnt from a transaction written
/// by `author` and received from `upstream`: a node notes its own merges, in its own
/// transactions (the announcement) or in the transaction it was applying when it decided
/// (which only the node that decided it forwards: a star's hub). Pure.
pub fn note_is_authentic(decided_by: &str, author: &str, upstream: &str) -> bool {
    decided_by == author || decided_by == upstream
}

/// What to do with an incoming change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not a conflict: apply it.
    Apply,
    /// A conflict the incoming change wins: apply it, record the local version.
    ApplyAndRecord(ConflictKind, &'static str),
    /// A conflict the local version wins (or nothing to apply to): skip, record the change.
    SkipAndRecord(ConflictKind, &'static str),
}

impl Decision {
    /// Whether the incoming change is written, and what is recorded (kind, rule and
    /// outcome), given whether a local row was there to decide against.
    pub fn plan(self, local_exists: bool) -> (bool, Option<(ConflictKind, &'static str, Outcome)>) {
        match self {
            Decision::Apply => (true, None),
            Decision::ApplyAndRecord(kind, rule) => {
                let outcome = if rule == COLUMN_MERGE {
                    Outcome::ColumnsMerged
                } else {
                    Outcome::RemoteApplied
                };
                (true, Some((kind, rule, outcome)))
            }
            Decision::SkipAndRecord(kind, rule) => {
                let outcome = if local_exists {
                    Outcome::LocalKept
                } else {
                    Outcome::Skipped
                };
                (false, Some((kind, rule, outcome)))
            }
        }
    }

    /// The kind recorded when the server still refuses a write this decision applies (a
    /// unique key no lookup found): the decision's own, or `update_exists`.
    pub fn refused_kind(self) -> ConflictKind {
        match self {
            Decision::Apply => ConflictKind::UpdateExists,
            Decision::ApplyAndRecord(kind, _) | Decision::SkipAndRecord(kind, _) => kind,
        }
    }

    /// An update of a table with counter columns: the counters move whatever else
    /// happened to the row; when the update changed nothing else there is nothing to
    /// decide against a row that is there.
    pub fn with_counters(self, local_exists: bool, others_changed: bool) -> Decision {
        if local_exists && !others_changed {
            Decision::Apply
        } else {
            self
        }
    }
}

/// `t` with the values at `columns` (source column indexes) marked as not sent
/// (unchanged TOAST): neither written nor compared. How node-local columns, counters and
/// columns each node filled itself are left out of a decision.
pub fn as_unsent(t: &Tuple, columns: &[usize]) -> Tuple {
    Tuple(
        t.0.iter()
            .enumerate()
            .map(|(i, v)| {
                if columns.contains(&i) {
                    Value::UnchangedToast
                } else {
                    v.clone()
                }
            })
            .collect(),
    )
}

/// How one table's conflicts are decided: its `[[tables]]` policy, the same on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Origin name (`walsync_<node>`) of the node whose versions win, if any.
    pub prefer: Option<String>,
}

impl Rule {
    /// Whether the remote version beats the local one, and the rule that said so: the
    /// preferred node if exactly one of the two is it, else the later commit time, then
    /// the greater origin name.
    pub fn remote_wins(&self, remote: &Version, local: &Version) -> (bool, &'static str) {
        if let Some(p) = &self.prefer {
            match (&remote.origin == p, &local.origin == p) {
                (true, false) => return (true, PREFER_NODE),
                (false, true) => return (false, PREFER_NODE),
                _ => {}
            }
        }
        (
            (remote.commit_time_us, &remote.origin) > (local.commit_time_us, &local.origin),
            LAST_WRITER_WINS,
        )
    }

    /// An update or delete meeting the local row (`None`: no such row here).
    /// `made_on_local` says whether the change's old image equals the local row, i.e. its
    /// author saw exactly this version (only known under REPLICA IDENTITY FULL).
    pub fn decide_change(
        &self,
        is_delete: bool,
        remote: &Version,
        local: Option<&Version>,
        made_on_local: bool,
    ) -> Decision {
        let (missing, differs) = if is_delete {
            (
                ConflictKind::DeleteMissing,
                ConflictKind::DeleteOriginDiffers,
            )
        } else {
            (
                ConflictKind::UpdateMissing,
                ConflictKind::UpdateOriginDiffers,
            )
        };
        let Some(local) = local else {
            return Decision::SkipAndRecord(missing, NO_LOCAL_ROW);
        };
        // Equal values alone do not prove the change was made on this version: a node may
        // have written the very values the change started from (A-B-A). A change made on
        // a version commits after it; one that committed before cannot have been.
        let made_before_local = matches!(
            (remote.commit_time_us, local.commit_time_us),
            (Some(r), Some(l)) if r < l
        );
        if local.origin == remote.origin || (made_on_local && !made_before_local) {
            return Decision::Apply;
        }
        // A delete meets a concurrent update like any other write: the later one wins
        // (decision 0016). The node that deleted decides the same with the delete's
        // tombstone ([`Rule::decide_update_deleted`]).
        match self.remote_wins(remote, local) {
            (true, rule) => Decision::ApplyAndRecord(differs, rule),
            (false, rule) => Decision::SkipAndRecord(differs, rule),
        }
    }

    /// An update for a row that is not here; `deleted`: the version of its delete here
    /// (a tombstone), if one is kept. A later update brings the row back (applied as an
    /// insert of its new image); a later delete stays. Without a tombstone nothing is
    /// known of the row: recorded, as before tombstones.
    pub fn decide_update_deleted(&self, remote: &Version, deleted: Option<&Version>) -> Decision {
        let Some(deleted) = deleted else {
            return Decision::SkipAndRecord(ConflictKind::UpdateMissing, NO_LOCAL_ROW);
        };
        match self.remote_wins(remote, deleted) {
            (true, rule) => Decision::ApplyAndRecord(ConflictKind::UpdateDeleted, rule),
            (false, rule) => Decision::SkipAndRecord(ConflictKind::UpdateDeleted, rule),
        }
    }

    /// An insert whose key exists here: the winning version stays.
    pub fn decide_insert_exists(&self, remote: &Version, local: &Version) -> Decision {
        match self.remote_wins(remote, local) {
            (true, rule) => Decision::ApplyAndRecord(ConflictKind::InsertExists, rule),
            (false, rule) => Decision::SkipAndRecord(ConflictKind::InsertExists, rule),
        }
    }
}

/// The whole row an update leaves, to insert where the row was deleted: its new image,
/// with each TOASTed value it did not touch (sent as unchanged) taken from the whole old
/// image (REPLICA IDENTITY FULL). `None` if a value is known from neither.
pub fn whole_new_row(old: Option<&OldTuple>, new: &Tuple) -> Option<Tuple> {
    let old = match old {
        Some(OldTuple::Full(old)) => Some(old),
        _ => None,
    };
    let values = new
        .0
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::UnchangedToast => match old.and_then(|o| o.0.get(i)) {
                Some(v @ (Value::Text(_) | Value::Binary(_) | Value::Null)) => Some(v.clone()),
                _ => None,
            },
            v => Some(v.clone()),
        })
        .collect::<Option<Vec<Value>>>()?;
    Some(Tuple(values))
}

/// Of rows that hold one value of a unique key on this node when a unique index is
/// built over it (`versions` in the order a peer applied them: commit time, then primary
/// key), the one that keeps the value: each row in turn meets the one kept so far as an
/// incoming row meets a local one, so a peer that met them one by one as inserts kept
/// the same row. The others' values are renamed.
pub fn keeps_the_value(rule: &Rule, versions: &[Version]) -> usize {
    (1..versions.len()).fold(0, |kept, i| {
        if rule.remote_wins(&versions[i], &versions[kept]).0 {
            i
        } else {
            kept
        }
    })
}

/// What an update or a delete is decided against: the table's rule, the incoming
/// version and the local row with its key, in source column order.
pub struct Against<'a> {
    pub rule: &'a Rule,
    pub remote: &'a Version,
    /// The local row's values (source column order) and version; `None`: no row here.
    pub local: Option<(&'a [Option<String>], &'a Version)>,
    /// Source columns each node filled with its own values (an open DDL warning): they
    /// differ on purpose and are not compared.
    pub per_node: &'a [usize],
}

impl Against<'_> {
    /// Whether the change's old image is exactly the local row: its author saw this
    /// version (only known under REPLICA IDENTITY FULL).
    pub fn made_on_local(&self, old: Option<&OldTuple>) -> bool {
        let (Some(OldTuple::Full(old)), Some((local, _))) = (old, self.local) else {
            return false;
        };
        if self.per_node.is_empty() {
            old_image_matches(old, local)
        } else {
            old_image_matches(&as_unsent(old, self.per_node), local)
        }
    }

    /// The decision for an update or a delete made on the old image `old`.
    pub fn decide(&self, is_delete: bool, old: Option<&OldTuple>) -> Decision {
        self.rule.decide_change(
            is_delete,
            self.remote,
            self.local.map(|(_, v)| v),
            self.made_on_local(old),
        )
    }
}

/// What the update path writes and records for one incoming update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdatePlan {
    pub decision: Decision,
    /// The new image to write (source column order): under column-level merge, the
    /// columns it must not write are marked as not sent.
    pub new: Tuple,
}

/// Settles an incoming update against the local row: the row-level decision, then, for
/// a table with `merge_columns` and a conflict either way, a column-level merge (only
/// what this update changed and no one else did; a column both changed follows the
/// row-level winner), recorded as `column_merge` if any column conflicted.
pub fn settle_update(
    against: &Against,
    merge_columns_on: bool,
    old: Option<&OldTuple>,
    new: &Tuple,
) -> UpdatePlan {
    let decision = against.decide(false, old);
    let (Some(OldTuple::Full(old)), Some((local, local_version))) = (old, against.local) else {
        return UpdatePlan {
            decision,
            new: new.clone(),
        };
    };
    if !merge_columns_on || decision == Decision::Apply {
        return UpdatePlan {
            decision,
            new: new.clone(),
        };
    }
    let remote_wins = against.rule.remote_wins(against.remote, local_version).0;
    let (write, conflicted) = merge_columns(old, new, local, remote_wins);
    let new = Tuple(
        new.0
            .iter()
            .zip(write)
            .map(|(v, w)| if w { v.clone() } else { Value::UnchangedToast })
            .collect(),
    );
    let decision = if conflicted {
        Decision::ApplyAndRecord(ConflictKind::UpdateOriginDiffers, COLUMN_MERGE)
    } else {
        Decision::Apply
    };
    UpdatePlan { decision, new }
}

/// An update with the node-local columns at `columns` (source indexes) marked as not
/// sent: they are neither written nor compared. `None`: the update changed only such
/// columns (a cron run on the author's node) and is nothing for this node.
pub fn without_local_columns(upd: &Update, columns: &[usize]) -> Option<Update> {
    let mask = |t: &Tuple| as_unsent(t, columns);
    let masked = Update {
        relation_id: upd.relation_id,
        old: upd.old.as_ref().map(|o| match o {
            OldTuple::Full(t) => OldTuple::Full(mask(t)),
            key => key.clone(),
        }),
        new: mask(&upd.new),
    };
    match &masked.old {
        Some(OldTuple::Full(old)) if *old == masked.new => None,
        _ => Some(masked),
    }
}

/// Whether an update of a table with counter columns changed any other column.
pub fn changes_besides_counters(old: &Tuple, new: &Tuple, counters: &[usize]) -> bool {
    new.0
        .iter()
        .zip(&old.0)
        .enumerate()
        .any(|(i, (n, o))| !counters.contains(&i) && !matches!(n, Value::UnchangedToast) && n != o)
}

/// The value the losing row of a unique-key collision gets in its text column: the old
/// value with the loser's primary key appended, so it is unique by construction (the
/// primary key is) and every node computes the same from the row alone. `max_chars` is
/// the column's length limit (`varchar(n)`); the old value is shortened to fit, and
/// `None` comes back when even the suffix alone does not fit.
///
/// An integer key is spelled with letters (0 -> a ... 9 -> j: key 18 is `#bi`): the
/// suffix adds no digits to the value, so an application that reads numbers out of its
/// names (Odoo's journal entry names, `POSS/2026/11/0001`) still reads the old number
/// and not the key (decision 0009).
pub fn renamed(value: &str, loser_key: &[String], max_chars: Option<usize>) -> Option<String> {
    let key: Vec<String> = loser_key.iter().map(|k| spelled(k)).collect();
    let suffix = format!(" [conflict #{}]", key.join(","));
    let keep = match max_chars {
        Some(max) => max.checked_sub(suffix.chars().count())?,
        None => usize::MAX,
    };
    Some(value.chars().take(keep).collect::<String>() + &suffix)
}

/// An integer spelled with letters (`-18` -> `-bi`); anything else as it is.
fn spelled(key: &str) -> String {
    if key.parse::<i128>().is_err() {
        return key.to_string();
    }
    key.chars()
        .map(|c| match c.to_digit(10) {
            Some(d) => char::from(b'a' + d as u8),
            None => c,
        })
        .collect()
}

/// Which columns an update writes under column-level merge, and whether any column
/// conflicted. A column the update did not change is left alone; one it changed is
/// written when the local value is still the one the author saw (or already the new
/// one); otherwise both nodes changed it and the row-level winner's value stays
/// (`remote_wins`). All three tuples are in source column order.
pub fn merge_columns(
    old: &Tuple,
    new: &Tuple,
    local: &[Option<String>],
    remote_wins: bool,
) -> (Vec<bool>, bool) {
    let mut conflicted = false;
    let write = new
        .0
        .iter()
        .zip(&old.0)
        .zip(local)
        .map(|((n, o), l)| {
            if matches!(n, Value::UnchangedToast) || n == o {
                false
            } else if matches!(o, Value::UnchangedToast) || same(o, l) || same(n, l) {
                true
            } else {
                conflicted = true;
                remote_wins
            }
        })
        .collect();
    (write, conflicted)
}

/// Whether a sent value is the local value (text forms); `UnchangedToast` is not.
fn same(v: &Value, local: &Option<String>) -> bool {
    match (v, local) {
        (Value::Null, None) => true,
        (Value::Text(b), Some(s)) => b.as_ref() == s.as_bytes(),
        _ => false,
    }
}

/// A row image as JSON: column name to its text form (or null), as PostgreSQL prints it,
/// so that a recorded version can be written back through the same input functions.
/// Unchanged TOAST values are left out (the change did not carry them).
pub fn row_image(columns: &[String], values: &[Value]) -> Json {
    let mut m = Map::new();
    for (c, v) in columns.iter().zip(values) {
        match v {
            Value::Null => {
                m.insert(c.clone(), Json::Null);
            }
            Value::Text(b) => {
                m.insert(
                    c.clone(),
                    Json::String(String::from_utf8_lossy(b).into_owned()),
                );
            }
            Value::Binary(b) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                m.insert(c.clone(), Json::String(format!("\\x{hex}")));
            }
            Value::UnchangedToast => {}
        }
    }
    Json::Object(m)
}

/// Whether an old image (as sent) equals the local row (text forms, same column order).
/// Unchanged-TOAST entries of the old image are not compared.
pub fn old_image_matches(old: &Tuple, local: &[Option<String>]) -> bool {
    old.0.len() == local.len()
        && old
            .0
            .iter()
            .zip(local)
            .all(|(o, l)| matches!(o, Value::UnchangedToast) || same(o, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_that_keeps_a_unique_value_is_the_one_a_peer_kept_inserting_them_in_turn() {
        let v = |origin: &str, t: i64| Version {
            origin: origin.into(),
            commit_time_us: Some(t),
        };
        let rule = Rule::default();
        // The later commit keeps it; on a tie the first applied does.
        assert_eq!(
            keeps_the_value(&rule, &[v("walsync_b1", 1), v("walsync_b1", 2)]),
            1
        );
        assert_eq!(
            keeps_the_value(&rule, &[v("walsync_b1", 5), v("walsync_b1", 5)]),
            0
        );
        assert_eq!(
            keeps_the_value(
                &rule,
                &[v("walsync_a", 5), v("walsync_b", 5), v("walsync_a", 4)]
            ),
            1
        );
        let prefer = Rule {
            prefer: Some("walsync_a".into()),
        };
        assert_eq!(
            keeps_the_value(&prefer, &[v("walsync_a", 1), v("walsync_b", 9)]),
            0
        );
    }

    #[test]
    fn a_merge_note_is_learnt_only_from_the_node_that_merged_or_the_hub_forwarding_it() {
        assert!(
            note_is_authentic("branch2", "branch2", "main"),
            "branch2's announcement via main"
        );
        assert!(
            note_is_authentic("main", "branch1", "main"),
            "main merged while applying branch1's"
        );
        assert!(note_is_authentic("a", "a", "a"), "a mesh peer's own");
        assert!(
            !note_is_authentic("main", "branch1", "branch1"),
            "branch1 claiming main's merge"
        );
        assert!(!note_is_authentic("branch2", "branch1", "main"));
    }

    #[test]
    fn outcomes_and_kinds_read_back_as_written() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        for k in ConflictKind::ALL {
            assert_eq!(ConflictKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Outcome::parse("bogus"), None);
        assert_eq!(Outcome::LocalRenamed.remote_won(), Some(true));
        assert_eq!(Outcome::Parked.remote_won(), None);
    }
    use bytes::Bytes;

    fn v(origin: &str, t: i64) -> Version {
        Version {
            origin: origin.into(),
            commit_time_us: Some(t),
        }
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    const LWW: Rule = Rule { prefer: None };

    #[test]
    fn later_commit_wins_and_ties_go_to_the_greater_origin_name() {
        let wins = |r: &Version, l: &Version| LWW.remote_wins(r, l).0;
        assert!(wins(&v("walsync_a", 2), &v("walsync_b", 1)));
        assert!(!wins(&v("walsync_a", 1), &v("walsync_b", 2)));
        assert!(wins(&v("walsync_b", 5), &v("walsync_a", 5)));
        assert!(!wins(&v("walsync_a", 5), &v("walsync_b", 5)));
        let unknown = Version {
            origin: "walsync_z".into(),
            commit_time_us: None,
        };
        assert!(wins(&v("walsync_a", 0), &unknown));
    }

    #[test]
    fn a_preferred_node_wins_whatever_the_times_and_others_fall_back_to_time() {
        let main = Rule {
            prefer: Some("walsync_main".into()),
        };
        assert_eq!(
            main.remote_wins(&v("walsync_main", 1), &v("walsync_b1", 9)),
            (true, PREFER_NODE)
        );
        assert_eq!(
            main.remote_wins(&v("walsync_b1", 9), &v("walsync_main", 1)),
            (false, PREFER_NODE)
        );
        assert_eq!(
            main.remote_wins(&v("walsync_b2", 9), &v("walsync_b1", 1)),
            (true, LAST_WRITER_WINS)
        );
        // A delete by another node loses to a concurrent update from main, whatever the
        // times, and so does the update at the node that deleted (its tombstone).
        assert_eq!(
            main.decide_change(
                true,
                &v("walsync_b1", 9),
                Some(&v("walsync_main", 1)),
                false
            ),
            Decision::SkipAndRecord(ConflictKind::DeleteOriginDiffers, PREFER_NODE)
        );
        assert_eq!(
            main.decide_update_deleted(&v("walsync_main", 1), Some(&v("walsync_b1", 9))),
            Decision::ApplyAndRecord(ConflictKind::UpdateDeleted, PREFER_NODE)
        );
    }

    #[test]
    fn both_nodes_of_a_concurrent_update_pick_the_same_winner() {
        let on_a = v("walsync_a", 10);
        let on_b = v("walsync_b", 20);
        // a receives b's update over its own version; b receives a's over its own.
        let at_a = LWW.decide_change(false, &on_b, Some(&on_a), false);
        let at_b = LWW.decide_change(false, &on_a, Some(&on_b), false);
        assert_eq!(
            at_a,
            Decision::ApplyAndRecord(ConflictKind::UpdateOriginDiffers, LAST_WRITER_WINS)
        );
        assert_eq!(
            at_b,
            Decision::SkipAndRecord(ConflictKind::UpdateOriginDiffers, LAST_WRITER_WINS)
        );
    }

    #[test]
    fn a_row_brought_back_by_an_update_takes_untouched_toast_values_from_the_old_image() {
        let t = |s: &str| Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes()));
        let new = Tuple(vec![t("1"), Value::UnchangedToast, t("new")]);
        let old = OldTuple::Full(Tuple(vec![t("1"), t("long text"), t("old")]));
        assert_eq!(
            whole_new_row(Some(&old), &new),
            Some(Tuple(vec![t("1"), t("long text"), t("new")]))
        );
        assert_eq!(whole_new_row(None, &new), None);
        let key_only = OldTuple::Key(Tuple(vec![t("1"), Value::Null, Value::Null]));
        assert_eq!(whole_new_row(Some(&key_only), &new), None);
        let plain = Tuple(vec![t("1"), t("x"), t("y")]);
        assert_eq!(whole_new_row(None, &plain), Some(plain.clone()));
    }

    #[test]
    fn a_delete_and_a_concurrent_update_are_decided_by_time_the_same_on_both_nodes() {
        // a deletes, b updates, concurrently: a gets the update for a row it deleted (its
        // tombstone holds the delete's version), b gets the delete for a row it changed.
        for (deleted_at, updated_at, row_stays) in [(10, 20, true), (20, 10, false)] {
            let (delete, update) = (v("walsync_a", deleted_at), v("walsync_b", updated_at));
            let at_a = LWW.decide_update_deleted(&update, Some(&delete));
            let at_b = LWW.decide_change(true, &delete, Some(&update), false);
            let kept_at_a = matches!(
                at_a,
                Decision::ApplyAndRecord(ConflictKind::UpdateDeleted, LAST_WRITER_WINS)
            );
            let deleted_at_b = matches!(
                at_b,
                Decision::ApplyAndRecord(ConflictKind::DeleteOriginDiffers, LAST_WRITER_WINS)
            );
            assert_eq!(kept_at_a, row_stays, "{at_a:?}");
            assert_eq!(deleted_at_b, !row_stays, "{at_b:?}");
            assert!(matches!(
                at_a,
                Decision::ApplyAndRecord(..)
                    | Decision::SkipAndRecord(ConflictKind::UpdateDeleted, _)
            ));
            assert!(matches!(
                at_b,
                Decision::ApplyAndRecord(..)
                    | Decision::SkipAndRecord(ConflictKind::DeleteOriginDiffers, _)
            ));
        }
        // No tombstone (kept no longer, or a key of a kind not kept): as before.
        assert_eq!(
            LWW.decide_update_deleted(&v("walsync_b", 20), None),
            Decision::SkipAndRecord(ConflictKind::UpdateMissing, NO_LOCAL_ROW)
        );
    }

    #[test]
    fn a_change_made_on_the_local_version_is_no_conflict() {
        assert_eq!(
            LWW.decide_change(false, &v("walsync_b", 10), Some(&v("walsync_a", 9)), true),
            Decision::Apply
        );
        assert_eq!(
            LWW.decide_change(true, &v("walsync_b", 1), Some(&v("walsync_b", 0)), false),
            Decision::Apply
        );
        assert_eq!(
            LWW.decide_change(true, &v("walsync_b", 1), None, false),
            Decision::SkipAndRecord(ConflictKind::DeleteMissing, NO_LOCAL_ROW)
        );
    }

    #[test]
    fn equal_values_from_a_change_older_than_the_local_version_are_a_conflict() {
        // main wrote 26; branch2 changed it to 20 at t=1; branch1 (not knowing) set 26 again
        // at t=2. branch2's change reaches branch1 with old image 26: equal to the local
        // row, but older than it, so not made on it: the later write (branch1's) stays.
        assert_eq!(
            LWW.decide_change(
                false,
                &v("walsync_branch2", 1),
                Some(&v("walsync_branch1", 2)),
                true
            ),
            Decision::SkipAndRecord(ConflictKind::UpdateOriginDiffers, LAST_WRITER_WINS)
        );
        assert_eq!(
            LWW.decide_change(
                false,
                &v("walsync_branch2", 3),
                Some(&v("walsync_branch1", 2)),
                true
            ),
            Decision::Apply
        );
    }

    #[test]
    fn a_decision_says_what_is_written_and_what_is_recorded() {
        use ConflictKind::*;
        assert_eq!(Decision::Apply.plan(true), (true, None));
        assert_eq!(
            Decision::ApplyAndRecord(UpdateOriginDiffers, COLUMN_MERGE).plan(true),
            (
                true,
                Some((UpdateOriginDiffers, COLUMN_MERGE, Outcome::ColumnsMerged))
            )
        );
        let (write, record) = Decision::SkipAndRecord(UpdateMissing, "delete_wins").plan(false);
        assert!(!write);
        assert_eq!(
            record.map(|r| r.2),
            Some(Outcome::Skipped),
            "nothing was there"
        );
        let (_, record) = Decision::SkipAndRecord(UpdateOriginDiffers, "x").plan(true);
        assert_eq!(record.map(|r| r.2), Some(Outcome::LocalKept));
        assert_eq!(Decision::Apply.refused_kind(), UpdateExists);
        assert_eq!(
            Decision::SkipAndRecord(UpdateOriginDiffers, "x").with_counters(true, false),
            Decision::Apply,
            "a counter-only update moves the counters, nothing to decide"
        );
        assert_eq!(
            Decision::SkipAndRecord(UpdateMissing, "x").with_counters(false, false),
            Decision::SkipAndRecord(UpdateMissing, "x")
        );
    }

    #[test]
    fn unsent_columns_are_neither_written_nor_compared() {
        let t = Tuple(vec![
            Value::Null,
            Value::Text("a".into()),
            Value::Text("b".into()),
        ]);
        assert_eq!(
            as_unsent(&t, &[1]),
            Tuple(vec![
                Value::Null,
                Value::UnchangedToast,
                Value::Text("b".into())
            ])
        );
    }

    #[test]
    fn a_renamed_value_carries_the_losers_key_and_fits_the_column() {
        let key = ["18".to_string()];
        assert_eq!(
            renamed("alice", &key, None).as_deref(),
            Some("alice [conflict #bi]")
        );
        // varchar(16): the old value gives way, the suffix (which makes it unique) stays.
        assert_eq!(
            renamed("alice", &key, Some(16)).as_deref(),
            Some("a [conflict #bi]")
        );
        // No digit is added to a name an application numbers.
        let name = renamed("POSS/2026/11/0001", &["1207".to_string()], None).unwrap();
        assert_eq!(name, "POSS/2026/11/0001 [conflict #bcah]");
        assert_eq!(
            name.chars().filter(char::is_ascii_digit).count(),
            "POSS/2026/11/0001"
                .chars()
                .filter(char::is_ascii_digit)
                .count()
        );
        assert_eq!(
            renamed("x", &["-90".to_string()], None).as_deref(),
            Some("x [conflict #-ja]")
        );
        assert_eq!(renamed("alice", &key, Some(5)), None);
        let two = ["1".to_string(), "x".to_string()];
        assert_eq!(
            renamed("éé", &two, Some(17)).as_deref(),
            Some("é [conflict #b,x]")
        );
    }

    #[test]
    fn column_merge_keeps_concurrent_edits_of_different_columns() {
        // id, name, phone. The author changed the phone; here the name changed meanwhile.
        let old = Tuple(vec![t("1"), t("Ann"), t("111")]);
        let new = Tuple(vec![t("1"), t("Ann"), t("222")]);
        let local = [Some("1".into()), Some("Anna".into()), Some("111".into())];
        assert_eq!(
            merge_columns(&old, &new, &local, false),
            (vec![false, false, true], false)
        );
        // Both changed the phone: the row-level winner's value stays.
        let local = [Some("1".into()), Some("Ann".into()), Some("333".into())];
        assert_eq!(
            merge_columns(&old, &new, &local, true),
            (vec![false, false, true], true)
        );
        assert_eq!(
            merge_columns(&old, &new, &local, false),
            (vec![false, false, false], true)
        );
        // Both set the same value: nothing to decide.
        let local = [Some("1".into()), Some("Ann".into()), Some("222".into())];
        assert_eq!(
            merge_columns(&old, &new, &local, false),
            (vec![false, false, true], false)
        );
        // NULL is a value like any other; an unchanged TOAST value is never written.
        let old = Tuple(vec![t("1"), Value::Null, Value::UnchangedToast]);
        let new = Tuple(vec![t("1"), t("Bo"), Value::UnchangedToast]);
        let local = [Some("1".into()), None, Some("big".into())];
        assert_eq!(
            merge_columns(&old, &new, &local, false),
            (vec![false, true, false], false)
        );
    }

    #[test]
    fn an_update_is_settled_against_the_local_row_whole_or_column_by_column() {
        // id, name, phone. The author (b, at 5) changed the phone from the version it saw.
        let old = OldTuple::Full(Tuple(vec![t("1"), t("Ann"), t("111")]));
        let new = Tuple(vec![t("1"), t("Ann"), t("222")]);
        let remote = v("walsync_b", 5);
        // Here the name changed meanwhile, by a, later (at 7).
        let local_version = v("walsync_a", 7);
        let local = [Some("1".into()), Some("Anna".into()), Some("111".into())];
        let against = Against {
            rule: &LWW,
            remote: &remote,
            local: Some((&local, &local_version)),
            per_node: &[],
        };
        // Row level: the later local version wins and the update is skipped.
        assert_eq!(
            settle_update(&against, false, Some(&old), &new),
            UpdatePlan {
                decision: Decision::SkipAndRecord(
                    ConflictKind::UpdateOriginDiffers,
                    LAST_WRITER_WINS
                ),
                new: new.clone()
            }
        );
        // Column level: the phone is written, the name left alone, nothing conflicted.
        assert_eq!(
            settle_update(&against, true, Some(&old), &new),
            UpdatePlan {
                decision: Decision::Apply,
                new: Tuple(vec![Value::UnchangedToast, Value::UnchangedToast, t("222")])
            }
        );
        // Made on exactly the local version: no conflict, written whole.
        let seen = [Some("1".into()), Some("Ann".into()), Some("111".into())];
        let on_seen = Against {
            local: Some((&seen, &local_version)),
            remote: &v("walsync_b", 9),
            ..against
        };
        assert_eq!(
            settle_update(&on_seen, true, Some(&old), &new).decision,
            Decision::Apply
        );
        // A column each node filled itself differs on purpose and is not compared.
        let filled = [Some("1".into()), Some("Ann".into()), Some("here".into())];
        let per_node = Against {
            local: Some((&filled, &local_version)),
            per_node: &[2],
            ..on_seen
        };
        assert!(per_node.made_on_local(Some(&old)));
        assert!(!Against {
            per_node: &[],
            ..per_node
        }
        .made_on_local(Some(&old)));
        // No local row: nothing to update, skipped and recorded.
        let missing = Against {
            local: None,
            ..against
        };
        assert_eq!(
            settle_update(&missing, true, Some(&old), &new).decision,
            Decision::SkipAndRecord(ConflictKind::UpdateMissing, NO_LOCAL_ROW)
        );
    }

    #[test]
    fn node_local_columns_and_counters_are_left_out_of_an_update() {
        // id, qty (a counter), last_run (node-local).
        let upd = |old: [&str; 3], new: [&str; 3]| Update {
            relation_id: 1,
            old: Some(OldTuple::Full(Tuple(old.iter().map(|x| t(x)).collect()))),
            new: Tuple(new.iter().map(|x| t(x)).collect()),
        };
        // Only the local column changed: nothing for this node.
        assert_eq!(
            without_local_columns(&upd(["1", "5", "mon"], ["1", "5", "tue"]), &[2]),
            None
        );
        let masked = without_local_columns(&upd(["1", "5", "mon"], ["1", "6", "tue"]), &[2])
            .expect("the counter changed");
        assert_eq!(masked.new.0[2], Value::UnchangedToast);
        assert_eq!(
            masked.old,
            Some(OldTuple::Full(Tuple(vec![
                t("1"),
                t("5"),
                Value::UnchangedToast
            ])))
        );
        let (old, new) = (
            Tuple(vec![t("1"), t("5"), t("mon")]),
            Tuple(vec![t("1"), t("6"), t("mon")]),
        );
        assert!(!changes_besides_counters(&old, &new, &[1]));
        assert!(changes_besides_counters(&old, &new, &[]));
    }

    #[test]
    fn images_are_text_and_old_images_compare_by_text() {
        let cols = vec!["id".to_string(), "name".to_string(), "note".to_string()];
        let img = row_image(&cols, &[t("7"), Value::Null, Value::UnchangedToast]);
        assert_eq!(img.to_string(), r#"{"id":"7","name":null}"#);
        let old = Tuple(vec![t("7"), Value::Null, Value::UnchangedToast]);
        assert!(old_image_matches(
            &old,
            &[Some("7".into()), None, Some("x".into())]
        ));
        assert!(!old_image_matches(&old, &[Some("8".into()), None, None]));
        assert!(!old_image_matches(
            &old,
            &[Some("7".into()), Some("".into()), None]
        ));
    }
}
