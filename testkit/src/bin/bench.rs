//! `walsync-bench`: catch-up speed and CPU against native logical replication, and peak
//! memory on one huge transaction (docs/benchmarks.md).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = walsync_testkit::bench::BenchArgs::parse();
    walsync::observability::init_tracing("error");
    walsync::cli::block_on(walsync_testkit::bench::run(args))
}
