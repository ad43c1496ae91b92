//! Logging: lowercase fragments with fields, to stderr. `WALSYNC_LOG` (or `RUST_LOG`) sets
//! the filter, e.g. `WALSYNC_LOG=walsync=debug`; `WALSYNC_LOG_FORMAT=json` writes one JSON
//! object a line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `default` applies when neither variable is set.
pub fn init_tracing(default: &str) {
    let filter = std::env::var("WALSYNC_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .map(EnvFilter::new)
        .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // One JSON object a line for log shippers; otherwise text for people.
    let _ = if std::env::var("WALSYNC_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().with_ansi(false).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
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
