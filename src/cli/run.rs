//! `walsync run --config FILE`: the sidecar, until SIGINT or SIGTERM.

use std::process::ExitCode;

use tracing::{info, warn};

use super::{CliResult, ConfigArg};
use crate::node::connect::connect;
use crate::node::setup::check_initialised;
use crate::observability::error_chain;
use crate::runtime::{run_sidecar, shutdown_channel};
use crate::sql_error::SqlError;
use crate::status::metrics;

pub async fn run(arg: &ConfigArg) -> CliResult {
    let config = arg.load()?;
    match check_initialised(&config).await {
        // The node went away while asked (a restart, a cut): like a node not reached,
        // the check is skipped and the links say so and retry.
        Err(e) if e.is_connection_lost() => {
            warn!(error = %error_chain(&e), "could not finish the start-up checks on this node; going on")
        }
        r => r?,
    }
    check_rights_and_fence(&config).await?;
    let (tx, rx) = shutdown_channel();
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            format!("metrics.listen = {addr}: cannot listen there ({e}); choose a free address or remove [metrics] listen")
        })?;
        info!(%addr, "metrics endpoint: /metrics, /healthz, /readyz");
        tokio::spawn(metrics::serve(listener, config.clone(), rx.clone()));
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        let _ = tx.send(true);
    });
    info!(node = %config.node.name, id = config.node.id, "sidecar starting");
    if config.node.dsn.is_tcp_loopback() {
        info!(
            "[node] dsn reaches this node over TCP on the loopback: its Unix socket \
             (host=/var/run/postgresql or wherever unix_socket_directories points) carries every \
             applied row for less CPU (docs/configuration.md)"
        );
    }
    run_sidecar(&config, rx).await;
    Ok(ExitCode::SUCCESS)
}

/// Before starting: a removed node's sidecar exits instead of resuming, when its own
/// database or any peer it reaches (within a few seconds) records the removal
/// (crate::node::fence); and a sidecar whose role is not a superuser needs the rights
/// crate::node::rights lists on its node, each missing one named with its GRANT. Its
/// own node is asked both over one connection; a node it cannot reach, or whose
/// connection is lost while it is asked (a restart), is skipped (the links say so and
/// retry).
async fn check_rights_and_fence(config: &crate::config::Config) -> Result<(), String> {
    let me = config.this_node();
    let name = me.name.as_str();
    let own = async {
        let Ok(client) = connect(&me.dsn, "walsync run check").await else {
            return Ok(());
        };
        if let Ok(Some(removal)) = crate::node::fence::removed(&client, &[name]).await {
            return Err(removal.to_string());
        }
        let missing = match crate::node::rights::missing(&client).await {
            Ok(missing) => missing,
            Err(e) => {
                let e = SqlError::new(format!("checking the sidecar's rights on node {name}"), e);
                if !e.is_connection_lost() {
                    return Err(error_chain(&e));
                }
                // The node went away while asked: as if not reached (the links retry).
                warn!(node = %name, error = %error_chain(&e), "could not finish checking the sidecar's rights; going on");
                return Ok(());
            }
        };
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the sidecar's role lacks rights on node {name} (run these as a superuser there, or walsync init --grant-to ROLE):\n  - {}",
            missing.join("\n  - ")
        ))
    };
    let peers: Vec<_> = config.peer_nodes().into_iter().map(|(p, _)| p).collect();
    let fenced_by_peers = crate::node::fence::removal_seen_by(
        &peers,
        name,
        "walsync run check",
        std::time::Duration::from_secs(10),
    );
    let (own, fenced) = tokio::join!(own, fenced_by_peers);
    match fenced {
        Some(removal) => Err(removal.to_string()),
        None => own,
    }
}

pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
