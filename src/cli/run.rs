//! `walsync run --config FILE`: the sidecar, until SIGINT or SIGTERM.

use std::process::ExitCode;

use tracing::info;

use super::{CliResult, ConfigArg};
use crate::node::setup::check_initialised;
use crate::runtime::{metrics, run_sidecar, shutdown_channel};

pub async fn run(arg: &ConfigArg) -> CliResult {
    let config = arg.load()?;
    check_initialised(&config).await?;
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
