//! `walsync run --config FILE`: the sidecar, until SIGINT or SIGTERM.

use std::process::ExitCode;

use tracing::info;

use super::{CliResult, ConfigArg};
use crate::node::connect::connect;
use crate::node::setup::check_initialised;
use crate::runtime::{metrics, run_sidecar, shutdown_channel};

pub async fn run(arg: &ConfigArg) -> CliResult {
    let config = arg.load()?;
    check_initialised(&config).await?;
    refuse_if_removed(&config).await?;
    check_rights(&config).await?;
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
    run_sidecar(&config, rx).await;
    Ok(ExitCode::SUCCESS)
}

/// A sidecar whose role is not a superuser needs the rights crate::node::rights lists on
/// its node; it refuses to start without them, naming each with its GRANT.
async fn check_rights(config: &crate::config::Config) -> Result<(), String> {
    let me = config.this_node();
    let Ok(client) = connect(&me.dsn, "walsync run check").await else {
        return Ok(()); // unreachable now: the links say so and retry
    };
    let missing = crate::node::rights::missing(&client)
        .await
        .map_err(|e| format!("checking the sidecar's rights on node {}: {e}", me.name))?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the sidecar's role lacks rights on node {} (run these as a superuser there, or walsync init --grant-to ROLE):\n  - {}",
        me.name,
        missing.join("\n  - ")
    ))
}

/// A removed node's sidecar exits instead of resuming, when its own database or any
/// peer it reaches (within a few seconds) records the removal (crate::node::fence).
async fn refuse_if_removed(config: &crate::config::Config) -> Result<(), String> {
    let me = config.this_node();
    let mut dsns = vec![me.dsn.clone()];
    dsns.extend(config.peer_nodes().into_iter().map(|(p, _)| p.dsn));
    let checks = dsns.iter().map(|dsn| async {
        let check = async {
            let client = connect(dsn, "walsync run check").await.ok()?;
            crate::node::fence::removed(&client, &[me.name.as_str()])
                .await
                .ok()?
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), check)
            .await
            .ok()
            .flatten()
    });
    match futures_util::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .next()
    {
        Some(removal) => Err(removal.to_string()),
        None => Ok(()),
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
