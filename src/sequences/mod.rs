//! Per-node sequence partitioning: on node `k` of a cluster with `step` slots, every
//! sequence hands out only values `v ≡ k (mod step)`, so two nodes never make the same id.
//!
//! [`next_partitioned`] is the pure rule; [`partition_all`] applies it to the sequences of
//! a node (at init, at join, and in the sidecar's guard). A sequence already partitioned
//! for this node is left as it is.
//!
//! What a sequence hands out next is read from the sequence relation itself
//! ([`read_all`]), never from `pg_sequences.last_value`: that view shows NULL for a
//! sequence not called since its last `setval(.., false)` or `RESTART`, which is exactly
//! how a partitioned sequence is left before its first use, and how a copy of it (a
//! `walsync join`, a pg_dump) arrives on another node still in the first node's class.

use tokio_postgres::Client;

/// The smallest value above `above` that belongs to node `id` (`1..=step`).
pub fn next_partitioned(above: i64, id: u32, step: u32) -> i64 {
    let step = step as i64;
    let want = id as i64 % step;
    let base = above + 1;
    base + (want - base).rem_euclid(step)
}

/// Values a sequence about to hand out `next` can still give before `max_value`.
pub fn ids_left(next: i64, increment: i64, max_value: i64) -> i64 {
    if increment <= 0 || next > max_value {
        return 0;
    }
    (max_value - next) / increment + 1
}

/// Whether a sequence with this increment, about to hand out `next`, already serves node `id`.
pub fn is_partitioned(increment: i64, next: i64, id: u32, step: u32) -> bool {
    increment == step as i64 && next.rem_euclid(step as i64) == (id as i64 % step as i64)
}

/// One sequence of a node as the sequence relation itself shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceState {
    /// `schema.name`, quoted where needed (usable in SQL as it is).
    pub name: String,
    pub increment: i64,
    pub max_value: i64,
    /// The sequence's own `last_value` and `is_called`; `None` when this role may not
    /// read it (no SELECT or USAGE on it).
    pub last: Option<(i64, bool)>,
}

impl SequenceState {
    /// The value `nextval` hands out next: `last_value` itself while the sequence was not
    /// called since its last `setval(.., false)` / `RESTART`, else one increment above it.
    pub fn next(&self) -> Option<i64> {
        self.last.map(|(last_value, is_called)| {
            if is_called {
                last_value.saturating_add(self.increment)
            } else {
                last_value
            }
        })
    }

    /// Whether its next value is node `id`'s, with the cluster's step as increment.
    /// An unreadable sequence is not known to serve the node.
    pub fn serves(&self, id: u32, step: u32) -> bool {
        self.next()
            .is_some_and(|next| is_partitioned(self.increment, next, id, step))
    }
}

/// At most this many sequences are read by one `UNION ALL` query (a few KiB of SQL).
const READ_BATCH: usize = 200;

/// Every sequence of the node outside schema walsync, in name order, with its state read
/// from the sequence itself: two round trips for a few hundred sequences.
pub async fn read_all(client: &Client) -> Result<Vec<SequenceState>, SequenceError> {
    let listing = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), s.seqincrement, s.seqmax, \
                    has_sequence_privilege(c.oid, 'SELECT') \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname <> 'walsync' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1",
            &[],
        )
        .await
        .map_err(|source| SequenceError {
            sequence: "(listing pg_sequence)".into(),
            source,
        })?;
    let mut states: Vec<SequenceState> = listing
        .iter()
        .map(|r| SequenceState {
            name: r.get(0),
            increment: r.get(1),
            max_value: r.get(2),
            last: None,
        })
        .collect();
    let readable: Vec<usize> = listing
        .iter()
        .enumerate()
        .filter(|(_, r)| r.get::<_, bool>(3))
        .map(|(i, _)| i)
        .collect();
    for batch in readable.chunks(READ_BATCH) {
        let sql = batch
            .iter()
            .map(|&i| format!("SELECT {i}, last_value, is_called FROM {}", states[i].name))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = client
            .query(&sql, &[])
            .await
            .map_err(|source| SequenceError {
                sequence: states[batch[0]].name.clone(),
                source,
            })?;
        for r in rows {
            let i: i32 = r.get(0);
            states[i as usize].last = Some((r.get(1), r.get(2)));
        }
    }
    Ok(states)
}

#[derive(Debug, thiserror::Error)]
#[error("partitioning sequence {sequence}")]
pub struct SequenceError {
    pub sequence: String,
    #[source]
    pub source: tokio_postgres::Error,
}

/// Partitions every sequence outside schema walsync that does not hand out this node's
/// ids; returns how many were changed. Cheap when all is in order: two queries.
///
/// The restart point is above the sequence's next value and above the largest value in
/// the column that owns it (explicit ids inserted by hand), so no existing id is handed
/// out again. Nodes are expected to start from the same data (cloned), so the local
/// maximum is every node's maximum. A sequence this role may not read is left alone
/// (`walsync status` counts it).
pub async fn partition_all(client: &Client, id: u32, step: u32) -> Result<usize, SequenceError> {
    let mut changed = 0;
    for s in read_all(client).await? {
        let Some(next) = s.next() else { continue };
        if s.serves(id, step) {
            continue;
        }
        let err = |source| SequenceError {
            sequence: s.name.clone(),
            source,
        };
        // The column the sequence fills (serial or identity), for ids written by hand.
        let column_max_sql: Option<String> = client
            .query_one(
                "SELECT (SELECT format('SELECT max(%I)::int8 FROM %I.%I', a.attname, n.nspname, c.relname) \
                   FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace \
                   JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                  WHERE d.objid = $1::text::regclass AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1)",
                &[&s.name],
            )
            .await
            .map_err(err)?
            .get(0);
        let mut above = next - 1;
        if let Some(sql) = column_max_sql {
            let col_max: Option<i64> = client.query_one(&sql, &[]).await.map_err(err)?.get(0);
            above = above.max(col_max.unwrap_or(i64::MIN));
        }
        let restart = next_partitioned(above, id, step);
        let sql = format!(
            "ALTER SEQUENCE {} INCREMENT BY {step} MINVALUE 1 MAXVALUE {} RESTART WITH {restart}",
            s.name, s.max_value
        );
        client.batch_execute(&sql).await.map_err(err)?;
        changed += 1;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_value_is_above_and_in_the_nodes_class() {
        assert_eq!(next_partitioned(0, 1, 16), 1);
        assert_eq!(next_partitioned(1, 1, 16), 17);
        assert_eq!(next_partitioned(40, 2, 16), 50);
        assert_eq!(
            next_partitioned(40, 16, 16),
            48,
            "id == step takes the values divisible by step"
        );
        for above in 0..200 {
            for id in 1..=16 {
                let v = next_partitioned(above, id, 16);
                assert!(v > above && v - above <= 16);
                assert_eq!(v % 16, id as i64 % 16);
            }
        }
    }

    #[test]
    fn ids_left_counts_this_nodes_values_up_to_the_maximum() {
        assert_eq!(ids_left(1, 16, 2147483647), 134_217_728);
        assert_eq!(ids_left(2147483647, 16, 2147483647), 1);
        assert_eq!(ids_left(2147483648, 16, 2147483647), 0);
    }

    #[test]
    fn partitioned_sequences_are_recognised() {
        assert!(is_partitioned(16, 33, 1, 16));
        assert!(!is_partitioned(16, 34, 1, 16));
        assert!(
            !is_partitioned(1, 33, 1, 16),
            "right class by chance, wrong increment"
        );
        assert!(is_partitioned(16, 32, 16, 16));
    }

    fn state(increment: i64, last: Option<(i64, bool)>) -> SequenceState {
        SequenceState {
            name: "public.app_user_id_seq".into(),
            increment,
            max_value: i32::MAX as i64,
            last,
        }
    }

    #[test]
    fn a_sequence_not_called_since_its_restart_hands_out_its_last_value() {
        // How init leaves a sequence on main (id 1, step 16) before its first use, and how
        // a copy of it arrives on a joined node (id 4): main's class, not the new node's.
        let copied = state(16, Some((17, false)));
        assert_eq!(copied.next(), Some(17));
        assert!(copied.serves(1, 16));
        assert!(
            !copied.serves(4, 16),
            "17 is main's id: the joined node must restart it"
        );
        assert!(state(16, Some((20, false))).serves(4, 16));
        // Called once: the next value is one increment on.
        let used = state(16, Some((17, true)));
        assert_eq!(used.next(), Some(33));
        assert!(used.serves(1, 16) && !used.serves(4, 16));
    }

    #[test]
    fn an_unreadable_sequence_is_not_taken_as_partitioned() {
        let hidden = state(16, None);
        assert_eq!(hidden.next(), None);
        assert!(!hidden.serves(1, 16));
    }

    #[test]
    fn the_next_value_saturates_at_the_top_of_int8() {
        assert_eq!(state(16, Some((i64::MAX - 3, true))).next(), Some(i64::MAX));
    }
}
