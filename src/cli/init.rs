//! `walsync init --config FILE`: prepare this node (idempotent).

use std::process::ExitCode;

use super::{CliResult, ConfigArg};
use crate::node::setup::init_node;

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Grant ROLE what a sidecar needs here, so that `walsync run` can use it instead of
    /// a superuser (init itself runs as a superuser); the statements are printed.
    #[arg(long, value_name = "ROLE")]
    pub grant_to: Option<String>,
}

pub async fn run(args: &InitArgs) -> CliResult {
    let config = args.config.load()?;
    let report = init_node(&config).await?;
    if report.actions.is_empty() {
        println!(
            "node {}: already initialised, nothing to do",
            config.node.name
        );
    } else {
        println!("node {}: initialised", config.node.name);
        for a in &report.actions {
            println!("  {a}");
        }
    }
    let me = config.this_node();
    let client = crate::node::connect::connect(&me.dsn, "walsync init").await;
    if let Some(role) = &args.grant_to {
        let client = client.as_ref().map_err(|e| e.to_string())?;
        grant_sidecar_rights(client, me.name.as_str(), role).await?;
    }
    // What a cut will do with this setup, with the fixes (best effort: init succeeded).
    if let Ok(client) = &client {
        if let Ok(setup) = crate::advice::gather(client, &config).await {
            super::status::print_setup(&setup);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Grants `role` what a sidecar needs on the node `client` is connected to (as a
/// superuser), printing each statement (`init --grant-to`, `join --grant-to`).
pub(super) async fn grant_sidecar_rights(
    client: &tokio_postgres::Client,
    node: &str,
    role: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Replica mode: these GRANTs are this node's own setup, not DDL for the peers.
    client
        .batch_execute("SET session_replication_role = replica")
        .await?;
    let apps = crate::node::rights::app_roles(client).await?;
    println!("node {node}: granted {role} what a sidecar needs:");
    for statement in crate::node::rights::grant_statements(role, &apps) {
        client
            .batch_execute(&statement)
            .await
            .map_err(|e| format!("{statement}: {}", crate::apply::server_message(&e)))?;
        println!("  {statement};");
    }
    client
        .batch_execute("RESET session_replication_role")
        .await?;
    Ok(())
}
