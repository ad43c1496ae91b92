//! The node guard: keeps what `walsync init` set up true for objects created later.
//!
//! Every [`GUARD_EVERY`] it partitions any sequence of this node that does not hand out
//! this node's ids (a serial column from a module install, a sequence the application
//! creates or restarts at run time) and sets REPLICA IDENTITY FULL on new tables. Both
//! steps are idempotent and change nothing when all is in order.
//!
//! It also re-points rows that still name a row merged away in the last minutes
//! (`apply::merged::sweep`): rows written while the merge was being decided.
//!
//! DDL is covered at once by the event trigger of migration 0008, in the creating
//! transaction; what is left for the guard is what DDL does not show (`setval`) and
//! objects from before that migration.

use std::time::Duration;

use tracing::{debug, info};

use crate::config::Config;
use crate::node::connect::connect;
use crate::node::setup::{keep_tombstones, set_replica_identity_full};
use crate::runtime::ShutdownRx;
use crate::sequences::partition_all;

/// One catalog query per round when nothing changed.
pub const GUARD_EVERY: Duration = Duration::from_secs(2);

pub async fn run_guard(config: Config, mut shutdown: ShutdownRx) {
    let me = config.this_node();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(GUARD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            // 1. shutdown
            _ = shutdown.changed() => return,
            // 2. one round of checks
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match connect(&me.dsn, "walsync guard").await {
                // Replica mode: its ALTER SEQUENCE / ALTER TABLE are this node's own
                // business and must not be captured as DDL for the peers.
                Ok(c) => match c
                    .batch_execute("SET session_replication_role = replica")
                    .await
                {
                    Ok(()) => Some(c),
                    Err(e) => {
                        debug!(node = %me.name, error = %e, "guard cannot use replica mode; next round");
                        continue;
                    }
                },
                Err(e) => {
                    debug!(node = %me.name, error = %e, "guard cannot reach its node; next round");
                    continue;
                }
            };
        }
        let client = client.as_ref().expect("connected above");
        match partition_all(client, me.id, config.cluster.step).await {
            Ok(0) => {}
            Ok(n) => {
                info!(node = %me.name, sequences = n, "partitioned new or restarted sequences for this node")
            }
            Err(e) => debug!(node = %me.name, error = %e, "guard could not partition sequences"),
        }
        if let Err(e) = track_slot_activity(client).await {
            debug!(node = %me.name, error = %e, "guard could not note which slots have a reader");
        }
        match crate::apply::merged::announce(client, me.name.as_str()).await {
            Ok(0) => {}
            Ok(n) => {
                info!(node = %me.name, merges = n, "announced the merges decided here to every node")
            }
            Err(e) => debug!(node = %me.name, error = %e, "guard could not announce merges"),
        }
        match crate::apply::merged::sweep(client, me.name.as_str()).await {
            Ok(0) => {}
            Ok(n) => {
                info!(node = %me.name, rows = n, "re-pointed rows that still named a row merged away")
            }
            Err(e) => {
                debug!(node = %me.name, error = %e, "guard could not re-point rows of merged keys");
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }
        match set_replica_identity_full(client, &me).await {
            Ok(0) => {}
            Ok(n) => info!(node = %me.name, tables = n, "set REPLICA IDENTITY FULL on new tables"),
            Err(e) => debug!(node = %me.name, error = %e, "guard could not set replica identity"),
        }
        match keep_tombstones(client, &me).await {
            Ok(0) => {}
            Ok(n) => {
                info!(node = %me.name, tables = n, "keeping tombstones of deleted rows on new tables")
            }
            Err(e) => debug!(node = %me.name, error = %e, "guard could not set up tombstones"),
        }
        if let Err(e) = client
            .execute(
                "DELETE FROM walsync.tombstones WHERE deleted_at < now() - make_interval(days => $1)",
                &[&(config.cluster.tombstone_days as i32)],
            )
            .await
        {
            debug!(node = %me.name, error = %e, "guard could not forget old tombstones");
        }
    }
}

/// Notes since when each walsync slot of this node has had no reader
/// (`walsync.slot_activity`), for `walsync status`: PostgreSQL 15 does not keep it.
/// Writes only when a slot's activity changed, so an idle node writes nothing.
async fn track_slot_activity(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "WITH s AS (SELECT slot_name::text AS slot, active FROM pg_replication_slots \
                        WHERE slot_name LIKE 'walsync\\_to\\_%') \
             INSERT INTO walsync.slot_activity AS a (slot, inactive_since) \
             SELECT s.slot, CASE WHEN s.active THEN NULL ELSE now() END FROM s \
             LEFT JOIN walsync.slot_activity o ON o.slot = s.slot \
             WHERE o.slot IS NULL OR s.active <> (o.inactive_since IS NULL) \
             ON CONFLICT (slot) DO UPDATE SET inactive_since = excluded.inactive_since; \
             DELETE FROM walsync.slot_activity a WHERE NOT EXISTS \
               (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = a.slot)",
        )
        .await
}
