//! Per-node sequence partitioning: on node `k` of a cluster with `step` slots, every
//! sequence hands out only values `v ≡ k (mod step)`, so two nodes never make the same id.
//!
//! [`next_partitioned`] is the pure rule; [`partition_all`] applies it to the sequences of
//! a node at init. A sequence already partitioned for this node is left as it is.

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

#[derive(Debug, thiserror::Error)]
#[error("partitioning sequence {sequence}")]
pub struct SequenceError {
    pub sequence: String,
    #[source]
    pub source: tokio_postgres::Error,
}

/// Partitions every sequence outside schema walsync; returns how many were changed.
/// Cheap when all is in order: one catalog query finds the sequences that may not serve
/// this node (another increment, or a last value of another node's class).
///
/// The restart point is above the sequence's last value and above the largest value in
/// the column that owns it (explicit ids inserted by hand), so no existing id is handed
/// out again. Nodes are expected to start from the same data (cloned), so the local
/// maximum is every node's maximum.
pub async fn partition_all(client: &Client, id: u32, step: u32) -> Result<usize, SequenceError> {
    let rows = client
        .query(
            "SELECT format('%I.%I', s.schemaname, s.sequencename), s.increment_by, s.max_value, \
                    (SELECT format('SELECT max(%I)::int8 FROM %I.%I', a.attname, n.nspname, c.relname) \
                       FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace \
                       JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                      WHERE d.objid = format('%I.%I', s.schemaname, s.sequencename)::regclass \
                        AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1) \
             FROM pg_sequences s WHERE s.schemaname <> 'walsync' \
               AND (s.increment_by <> $1 OR (s.last_value IS NOT NULL AND mod(mod(s.last_value, $1) + $1, $1) <> $2)) \
             ORDER BY 1",
            &[&(step as i64), &((id % step) as i64)],
        )
        .await
        .map_err(|source| SequenceError { sequence: "(listing pg_sequences)".into(), source })?;
    let mut changed = 0;
    for r in rows {
        let name: String = r.get(0);
        let increment: i64 = r.get(1);
        let max_value: i64 = r.get(2);
        let column_max_sql: Option<String> = r.get(3);
        let err = |source| SequenceError {
            sequence: name.clone(),
            source,
        };
        // The sequence relation itself tells the next value, also after a RESTART.
        let state = client
            .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
            .await
            .map_err(err)?;
        let (last_value, is_called): (i64, bool) = (state.get(0), state.get(1));
        let next = if is_called {
            last_value + increment
        } else {
            last_value
        };
        if is_partitioned(increment, next, id, step) {
            continue;
        }
        let err = |source| SequenceError {
            sequence: name.clone(),
            source,
        };
        let mut above = next - 1;
        if let Some(sql) = column_max_sql {
            let col_max: Option<i64> = client.query_one(&sql, &[]).await.map_err(err)?.get(0);
            above = above.max(col_max.unwrap_or(i64::MIN));
        }
        let next = next_partitioned(above, id, step);
        let sql = format!(
            "ALTER SEQUENCE {name} INCREMENT BY {step} MINVALUE 1 MAXVALUE {max_value} RESTART WITH {next}"
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
}
