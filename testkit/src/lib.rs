//! The walsync test kit: throwaway local PostgreSQL clusters ([`localpg`]: initdb, a server
//! run as user `postgres`, libfaketime clocks, network namespaces) for the integration
//! tests, the demo (`walsync-demo`, the README's first command) and the benchmark
//! (`walsync-bench`). None of it is in the `walsync` binary a user runs.

pub mod bench;
pub mod demo;
pub mod localpg;

/// What a demo or bench run returns: its exit code, or an error to print.
pub type RunResult = walsync::cli::CliResult;
