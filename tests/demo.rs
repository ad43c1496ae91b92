//! `walsync demo` is the first thing a newcomer runs: it must converge and say so.

mod support;

#[test]
fn demo_converges_and_cleans_up() {
    let (ok, out) = support::walsync(&["demo", "--orders", "10"]);
    assert!(ok, "demo failed:\n{out}");
    assert!(
        out.contains("converged") && !out.contains("NOT converged"),
        "{out}"
    );
    assert!(out.contains("equal"), "the report is printed: {out}");
    let dir = out
        .lines()
        .find_map(|l| l.strip_prefix("Working directory "))
        .and_then(|l| l.split(' ').next())
        .expect("the demo names its working directory");
    assert!(
        !std::path::Path::new(dir).exists(),
        "the demo removed {dir}"
    );
}
