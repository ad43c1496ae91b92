//! `walsync-demo` is the first thing a newcomer runs (`./scripts/demo`): it must converge
//! and say so, and leave nothing behind.

use std::process::Command;

#[test]
fn demo_converges_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_walsync-demo"))
        .args(["--orders", "10"])
        .output()
        .expect("run walsync-demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "demo failed:\n{text}");
    assert!(
        text.contains("converged") && !text.contains("NOT converged"),
        "{text}"
    );
    assert!(text.contains("equal"), "the report is printed: {text}");
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("Working directory "))
        .and_then(|l| l.split(' ').next())
        .expect("the demo names its working directory");
    assert!(
        !std::path::Path::new(dir).exists(),
        "the demo removed {dir}"
    );
}
