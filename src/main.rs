use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = walsync::cli::Cli::parse();
    walsync::observability::init_tracing(cli.default_log_filter());
    walsync::cli::run(cli)
}
