//! `walsync demo`: placeholder until the demo lands.

use std::process::ExitCode;

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> CliResult {
    Ok(ExitCode::from(1))
}
