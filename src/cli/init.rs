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
    Ok(ExitCode::SUCCESS)
}
