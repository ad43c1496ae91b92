//! The command line: one file per subcommand.

pub mod conflicts;
pub mod ddl_replay;
pub mod init;
pub mod join;
pub mod remove_node;
pub mod run;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};

#[derive(Debug, Parser)]
#[command(
    name = "walsync",
    version,
    about = "Two-way PostgreSQL replication for stores that lose their link",
    after_help = "Exit status: 0 all is well; 1 something needs a person (status: a stopped or long-down link, \
a parked row, ...); 2 an error (bad config, unreachable node, failed command).\n\
Logs go to stderr: WALSYNC_LOG sets the filter (e.g. walsync=debug), WALSYNC_LOG_FORMAT=json one JSON object a line."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The sidecar's TOML config (every key can be overridden by WALSYNC_<SECTION>_<KEY>).
    #[arg(long, short = 'c', env = "WALSYNC_CONFIG")]
    pub config: PathBuf,
}

impl ConfigArg {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&self.config, std::env::vars())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prepare this node: check settings, create schema walsync, publication, slots, origins.
    Init(init::InitArgs),
    /// Run the sidecar: stream and apply this node's links until stopped (Ctrl-C / SIGTERM).
    Run(ConfigArg),
    /// This node at a glance: links and their state, slots, conflicts, clock offsets, sequence headroom.
    Status(status::StatusArgs),
    /// List the conflicts this node decided, show one, or write a losing version again.
    Conflicts(conflicts::ConflictsArgs),
    /// Show the captured DDL this node has not applied yet, or skip one that cannot run here.
    DdlReplay(ddl_replay::DdlReplayArgs),
    /// Make an empty database a new node: copy a running node at a slot's snapshot, then init.
    Join(join::JoinArgs),
    /// Forget a node on this node and its peers: its slots, origin and links' progress.
    RemoveNode(remove_node::RemoveNodeArgs),
}

impl Cli {
    pub fn default_log_filter(&self) -> &'static str {
        "walsync=info,warn"
    }
}

pub fn run(cli: Cli) -> ExitCode {
    block_on(async {
        match cli.command {
            Command::Init(a) => init::run(&a).await,
            Command::Run(c) => run::run(&c).await,
            Command::Conflicts(a) => conflicts::run(a).await,
            Command::Status(a) => status::run(a).await,
            Command::DdlReplay(a) => ddl_replay::run(a).await,
            Command::Join(a) => join::run(a).await,
            Command::RemoveNode(a) => remove_node::run(a).await,
        }
    })
}

/// Runs a command's future on a new runtime; its error is printed with its causes and
/// exits 2.
pub fn block_on(command: impl std::future::Future<Output = CliResult>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(command);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", crate::observability::error_chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

pub type CliResult = Result<ExitCode, Box<dyn std::error::Error + Send + Sync>>;

/// Prints a line on stdout; a reader that went away (`walsync conflicts --json | head`)
/// ends the command quietly instead of a panic on the broken pipe.
pub fn print_out(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(2);
    }
}
