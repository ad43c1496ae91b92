//! Transactions set aside by a link (decision 0014, migration 0020): a source transaction
//! that changes a table not here (its DDL refused by `ddl_from`, or still on its way
//! from another node), sets a column not here, writes values the table no longer takes,
//! or runs a DDL that fails here, does not stop the link. It is kept whole in
//! `walsync.set_aside`, committed with the link's progress past it, and the link goes
//! on; a later transaction that changes a table a set-aside one changes is set aside
//! behind it (each table's changes stay in order), and after a failed DDL so is every
//! later DDL. Every few seconds, and when the link starts, the set-aside transactions
//! are applied again in order on a session of their own, as their author's, until one
//! still cannot be.
//!
//! Which transaction to set aside is known at its first change only when its table is
//! already known to wait; one found out later (after some of its changes were applied)
//! makes the session start over (`LinkError::SetAside`), told to set that transaction
//! aside from its first change ([`Hint`]). Its DDL rows are applied when it is set aside,
//! as every DDL is applied in stream order (a refused statement is recorded for a person
//! to accept), unless a DDL failed: then they wait with it.

use std::collections::{BTreeSet, HashMap, HashSet};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::apply::{Applier, ApplyError, ApplyWorker, Change, RemoteTxn, SetAsideTxn};
use crate::lsn::Lsn;
use crate::pgoutput::{self, Message};
use crate::sql_error::SqlError;

/// A transaction larger than this is not set aside: its link stops on it, as before.
pub const SET_ASIDE_BYTES: usize = 64 << 20;

/// What a session that started over is told by the one before it.
#[derive(Debug, Default, Clone)]
pub struct Hint {
    /// Tables found missing (or missing a column), with what is missing: a transaction
    /// whose first change is on one is set aside.
    pub tables: HashMap<String, String>,
    /// The transaction to set aside from its first change.
    pub txn: Option<Told>,
}

/// A transaction the session before could not set aside in time.
#[derive(Debug, Clone)]
pub struct Told {
    pub final_lsn: Lsn,
    /// What it waits for.
    pub waits_for: String,
    /// Its DDL failed here: its DDL rows are set aside with it (and every later DDL
    /// waits behind it), not applied.
    pub with_ddl: bool,
    /// The table its failed DDL changes: later changes to it wait behind it too.
    pub table: Option<String>,
}

/// The set-aside transaction being read from the stream.
struct Collecting {
    waits_for: String,
    /// Its DDL rows are set aside too (see [`Told::with_ddl`]).
    with_ddl: bool,
    messages: Vec<Vec<u8>>,
    /// Relations whose Relation message is already in `messages`.
    described: HashSet<u32>,
    tables: BTreeSet<String>,
    changes: i32,
    bytes: usize,
}

/// The link's set-aside transactions and the one it may be collecting.
pub struct SetAside {
    link: String,
    /// Tables a set-aside transaction changes or that were found missing, each with the
    /// missing table it waits for (itself, or the one an earlier transaction waits for).
    waiting: HashMap<String, String>,
    /// The transaction the session before this one could not set aside in time.
    next: Option<Told>,
    /// Set-aside transactions not applied yet.
    pending: usize,
    /// The latest Relation message of each relation, as received, with its table.
    relations: HashMap<u32, (Vec<u8>, String)>,
    collecting: Option<Collecting>,
}

/// What the link does with one change of an applied transaction.
pub enum Route {
    /// Apply it.
    Apply,
    /// It went into the set-aside transaction.
    Kept,
}

impl SetAside {
    /// The link's set-aside state as the target holds it, with what the session before
    /// found out. Transactions applied again before a crash (the set-aside progress is
    /// past them) are deleted first.
    pub async fn load(target: &Client, link: &str, hint: Hint) -> Result<SetAside, SqlError> {
        let progress_link = progress_link(link);
        target
            .execute(
                "DELETE FROM walsync.set_aside s USING walsync.link_progress p \
                 WHERE s.link = $1 AND p.link = $2 AND s.end_lsn <= p.source_lsn",
                &[&link, &progress_link],
            )
            .await
            .map_err(SqlError::of_bookkeeping("reading walsync.set_aside"))?;
        let rows = waiting_tables(target, link).await?;
        let mut waiting = hint.tables;
        waiting.extend(rows.iter().cloned());
        let pending = pending_count(target, link).await?;
        Ok(SetAside {
            link: link.to_string(),
            waiting,
            next: hint.txn,
            pending,
            relations: HashMap::new(),
            collecting: None,
        })
    }

    pub fn pending(&self) -> usize {
        self.pending
    }

    /// A Relation message, kept raw for the set-aside transactions that need it.
    pub fn described(&mut self, id: u32, raw: &[u8], namespace: &str, name: &str) {
        self.relations
            .insert(id, (raw.to_vec(), format!("{namespace}.{name}")));
    }

    /// Whether any of these relations is walsync's DDL log.
    pub fn is_ddl(&self, ids: &[u32]) -> bool {
        ids.iter().any(|&id| self.table(id) == DDL_LOG)
    }

    fn table(&self, id: u32) -> &str {
        self.relations.get(&id).map_or("", |(_, t)| t.as_str())
    }

    /// Where a change of transaction `final_lsn` on relations `ids` goes; `raw` is its
    /// message. `applied_any`: some change of the transaction was applied already (then
    /// it can only be set aside by starting over).
    pub fn route(
        &mut self,
        final_lsn: Lsn,
        ids: &[u32],
        raw: &[u8],
        applied_any: bool,
    ) -> Result<Route, SetAsideNeeded> {
        if self.collecting.is_none() && self.next.is_none() && self.waiting.is_empty() {
            return Ok(Route::Apply);
        }
        let ddl = self.is_ddl(ids);
        // The first of its tables that waits, and what for.
        let waits = ids.iter().find_map(|&id| {
            let table = self.table(id);
            let what = self.waiting.get(table)?;
            Some((table.to_string(), what.clone()))
        });
        if self.collecting.is_none() {
            let told = self
                .next
                .as_ref()
                .filter(|t| t.final_lsn == final_lsn)
                .cloned();
            let told_to = told.is_some();
            if waits.is_none() && !told_to {
                return Ok(Route::Apply);
            }
            if applied_any {
                // Told to set it aside, but its DDL came first and was applied: go on
                // setting the rest aside below. Found waiting only now: start over.
                match waits {
                    Some((table, waits_for)) if !told_to => {
                        return Err(SetAsideNeeded {
                            final_lsn,
                            table: Some(table),
                            waits_for,
                            with_ddl: false,
                            too_large: false,
                        })
                    }
                    _ if !told_to => return Ok(Route::Apply),
                    _ => {}
                }
            }
            let with_ddl =
                told.as_ref().is_some_and(|t| t.with_ddl) || self.waiting.contains_key(DDL_LOG);
            let told_table = told.as_ref().and_then(|t| t.table.clone());
            self.collecting = Some(Collecting {
                with_ddl,
                tables: told_table.into_iter().collect(),
                waits_for: waits
                    .map(|(_, what)| what)
                    .or(told.map(|t| t.waits_for))
                    .unwrap_or_default(),
                messages: Vec::new(),
                described: HashSet::new(),
                changes: 0,
                bytes: 0,
            });
        }
        let c = self.collecting.as_mut().expect("collecting (above)");
        // The DDL of a set-aside transaction is applied now, in stream order, unless a
        // DDL failed here: then it waits behind that one.
        if ddl && !c.with_ddl {
            return Ok(Route::Apply);
        }
        for &id in ids {
            if c.described.insert(id) {
                if let Some((rel, table)) = self.relations.get(&id) {
                    c.bytes += rel.len();
                    c.messages.push(rel.clone());
                    c.tables.insert(table.clone());
                }
            }
        }
        c.bytes += raw.len();
        c.messages.push(raw.to_vec());
        c.changes += 1;
        if c.bytes > SET_ASIDE_BYTES {
            return Err(SetAsideNeeded {
                final_lsn,
                table: None,
                waits_for: String::new(),
                with_ddl: false,
                too_large: true,
            });
        }
        Ok(Route::Kept)
    }

    /// The set-aside transaction read up to its commit (ending at `end`), if any: it is
    /// counted, and its tables wait behind it from now on.
    pub fn finish(&mut self, end: Lsn) -> Option<SetAsideTxn> {
        let c = self.collecting.take()?;
        self.next = None;
        self.pending += 1;
        for t in &c.tables {
            self.waiting
                .entry(t.clone())
                .or_insert_with(|| c.waits_for.clone());
        }
        info!(link = %self.link, waits_for = %c.waits_for, changes = c.changes, lsn = %end,
              "transaction set aside until its table is here (walsync.set_aside)");
        Some(SetAsideTxn {
            end_lsn: end,
            waits_for: c.waits_for,
            tables: c.tables.into_iter().collect(),
            changes: c.changes,
            messages: c.messages,
        })
    }

    /// Applies the set-aside transactions again, in order, on `worker` (a session of its
    /// own whose progress is [`progress_link`]), until one still lacks a table. Returns
    /// how many went through.
    pub async fn reapply(
        &mut self,
        target: &Client,
        worker: ApplyWorker,
    ) -> Result<usize, ApplyError> {
        let rows = target
            .query(
                "SELECT end_lsn::text, origin, origin_lsn::text, \
                        (extract(epoch FROM commit_time - '2000-01-01 00:00:00+00'::timestamptz) * 1000000)::int8, \
                        messages \
                 FROM walsync.set_aside WHERE link = $1 ORDER BY end_lsn",
                &[&self.link],
            )
            .await
            .map_err(SqlError::of_bookkeeping("reading walsync.set_aside"))?;
        let mut apply = Applier::Serial(Box::new(worker));
        let mut done = 0;
        for row in &rows {
            let end: Lsn = row.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO);
            let remote = RemoteTxn {
                origin: row.get(1),
                origin_lsn: row.get::<_, String>(2).parse().unwrap_or(Lsn::ZERO),
                commit_time_us: row.get(3),
            };
            let messages: Vec<Vec<u8>> = row.get(4);
            match apply_one(&mut apply, &remote, messages, end).await {
                Ok(()) => {}
                Err(e) if e.missing().is_some() || matches!(e, ApplyError::Ddl { .. }) => {
                    let missing = e
                        .missing()
                        .map(|(_, what)| what)
                        .unwrap_or_else(|| e.to_string());
                    info!(link = %self.link, %missing, waiting = rows.len() - done,
                          "set-aside transactions still wait for their table");
                    break;
                }
                Err(e) => return Err(e),
            }
            apply.wait_durable().await?;
            target
                .execute(
                    "DELETE FROM walsync.set_aside WHERE link = $1 AND end_lsn = $2::text::pg_lsn",
                    &[&self.link, &end.to_string()],
                )
                .await
                .map_err(SqlError::of("deleting an applied set-aside transaction"))?;
            done += 1;
        }
        if done > 0 {
            info!(link = %self.link, applied = done, left = rows.len() - done,
                  "set-aside transactions applied");
            // The tables that still wait are those of the transactions left.
            self.pending = pending_count(target, &self.link).await?;
            self.waiting = waiting_tables(target, &self.link)
                .await?
                .into_iter()
                .collect();
        }
        Ok(done)
    }
}

/// One set-aside transaction through `apply`, committed with the set-aside progress.
async fn apply_one(
    apply: &mut Applier,
    remote: &RemoteTxn,
    messages: Vec<Vec<u8>>,
    end: Lsn,
) -> Result<(), ApplyError> {
    for raw in messages {
        let change = match pgoutput::decode(&bytes::Bytes::from(raw))
            .map_err(|e| ApplyError::Protocol(format!("a set-aside message: {e}")))?
        {
            Message::Relation(r) => {
                apply.on_relation(r).await?;
                continue;
            }
            Message::Insert(i) => Change::Insert(i),
            Message::Update(u) => Change::Update(u),
            Message::Delete(d) => Change::Delete(d),
            Message::Truncate(t) => Change::Truncate(t),
            _ => continue,
        };
        apply.begin(remote).await?;
        apply.change(change).await?;
    }
    apply.commit(end).await?;
    Ok(())
}

/// Each table the link's set-aside transactions change, with what the oldest of them
/// that changes it waits for.
async fn waiting_tables(target: &Client, link: &str) -> Result<Vec<(String, String)>, SqlError> {
    let rows = target
        .query(
            "SELECT DISTINCT ON (t) t, waits_for FROM walsync.set_aside, unnest(tables) t \
             WHERE link = $1 ORDER BY t, end_lsn",
            &[&link],
        )
        .await
        .map_err(SqlError::of_bookkeeping("reading walsync.set_aside"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn pending_count(target: &Client, link: &str) -> Result<usize, SqlError> {
    let row = target
        .query_one(
            "SELECT count(*) FROM walsync.set_aside WHERE link = $1",
            &[&link],
        )
        .await
        .map_err(SqlError::of_bookkeeping("reading walsync.set_aside"))?;
    Ok(row.get::<_, i64>(0) as usize)
}

/// The progress row of a link's set-aside transactions applied again.
pub fn progress_link(link: &str) -> String {
    format!("{link} set aside")
}

/// A transaction must be set aside, but some of it was applied already: the session
/// starts over and sets it aside from its first change.
#[derive(Debug)]
pub struct SetAsideNeeded {
    pub final_lsn: Lsn,
    /// The table it changes that waits (later transactions that change it wait too).
    pub table: Option<String>,
    /// What it waits for.
    pub waits_for: String,
    /// Its DDL failed here (see [`Told::with_ddl`]).
    pub with_ddl: bool,
    /// It is larger than [`SET_ASIDE_BYTES`]: it cannot be set aside.
    pub too_large: bool,
}

impl SetAsideNeeded {
    /// What the next session is told of it.
    pub fn told(&self) -> Told {
        Told {
            final_lsn: self.final_lsn,
            waits_for: self.waits_for.clone(),
            with_ddl: self.with_ddl,
            table: self.table.clone(),
        }
    }
}

/// walsync's replicated DDL log, as the set-aside state names relations.
const DDL_LOG: &str = "walsync.ddl_log";

/// Logs a set-aside transaction that cannot be applied for a reason other than its table.
pub fn warn_reapply_failed(link: &str, e: &ApplyError) {
    warn!(link = %link, error = %e, "applying set-aside transactions again failed; retrying later");
}
