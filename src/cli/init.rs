//! `walsync init --config FILE`: prepare this node (idempotent).

use std::process::ExitCode;

use super::{CliResult, ConfigArg};
use crate::node::setup::init_node;

pub async fn run(arg: &ConfigArg) -> CliResult {
    let config = arg.load()?;
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
    // What a cut will do with this setup, with the fixes (best effort: init succeeded).
    let me = config.this_node();
    if let Ok(client) = crate::node::connect::connect(&me.dsn, "walsync init").await {
        if let Ok(setup) = crate::advice::gather(&client, &config).await {
            super::status::print_setup(&setup);
        }
    }
    Ok(ExitCode::SUCCESS)
}
