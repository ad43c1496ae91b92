//! `walsync-demo`: walsync on three throwaway local PostgreSQL clusters: write, cut, heal,
//! converge. The README's first command (`./scripts/demo`) runs it.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = walsync_testkit::demo::DemoArgs::parse();
    // The demo narrates on stdout; its sidecars only speak up about problems.
    walsync::observability::init_tracing("error");
    walsync::cli::block_on(walsync_testkit::demo::run(args))
}
