//! The sidecar's tasks: one per link, each named, all stopped through one shutdown channel.

pub mod backoff;
pub mod guard;
pub mod link;
pub mod set_aside;

use std::collections::HashMap;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

use crate::apply::merged::SharedKeys;
use crate::config::Config;

/// Sends `true` once to stop every task.
pub type ShutdownTx = watch::Sender<bool>;
pub type ShutdownRx = watch::Receiver<bool>;

pub fn shutdown_channel() -> (ShutdownTx, ShutdownRx) {
    watch::channel(false)
}

/// Runs every link of this sidecar, and the node guard, until `shutdown` fires; returns
/// when all have stopped.
pub async fn run_sidecar(config: &Config, shutdown: ShutdownRx) {
    let mut tasks = JoinSet::new();
    let links = config.links();
    if links.is_empty() {
        info!(node = %config.node.name, "no links to run here (every peer runs its links with this node)");
    }
    // The appliers into one node share the merges known there (decision 0008).
    let mut merges: HashMap<String, SharedKeys> = HashMap::new();
    for spec in links {
        info!(link = %spec.name(), from = %spec.from.dsn, to = %spec.to.dsn, "starting link");
        let shared = merges.entry(spec.to.name.to_string()).or_default().clone();
        tasks.spawn(link::run_link(
            spec,
            config.apply.clone(),
            config.tables.clone(),
            shared,
            shutdown.clone(),
        ));
    }
    tasks.spawn(guard::run_guard(config.clone(), shutdown.clone()));
    tasks.spawn(crate::spool::run_spooler(config.clone(), shutdown.clone()));
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            tracing::error!(error = %e, "link task failed");
        }
    }
}
