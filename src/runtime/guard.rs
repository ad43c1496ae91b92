//! The node guard: keeps what `walsync init` set up true for objects created later.
//!
//! Every [`GUARD_EVERY`] it partitions any sequence of this node that does not hand out
//! this node's ids (a serial column from a module install, a sequence the application
//! creates or restarts at run time) and sets REPLICA IDENTITY FULL on new tables. Both
//! steps are idempotent and change nothing when all is in order.
//!
//! DDL is covered at once by the event trigger of migration 0008, in the creating
//! transaction; what is left for the guard is what DDL does not show (`setval`) and
//! objects from before that migration.

use std::time::Duration;

use tracing::{debug, info};

use crate::config::Config;
use crate::node::connect::connect;
use crate::node::setup::set_replica_identity_full;
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
        match set_replica_identity_full(client, &me).await {
            Ok(0) => {}
            Ok(n) => info!(node = %me.name, tables = n, "set REPLICA IDENTITY FULL on new tables"),
            Err(e) => debug!(node = %me.name, error = %e, "guard could not set replica identity"),
        }
    }
}
