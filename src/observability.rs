//! Logging: lowercase fragments with fields, to stderr. `WALSYNC_LOG` (or `RUST_LOG`) sets
//! the filter, e.g. `WALSYNC_LOG=walsync=debug`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `default` applies when neither variable is set.
pub fn init_tracing(default: &str) {
    let filter = std::env::var("WALSYNC_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .map(EnvFilter::new)
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// The full cause chain of an error, on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
