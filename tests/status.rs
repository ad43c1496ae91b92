//! Status tells the truth: link states come from facts that age out (a heartbeat per
//! link, each slot's reader), and whatever needs a person makes `status`, `status
//! --cluster` and `/readyz` say so.

mod support;

use support::*;

/// Problems after this long (the default is 60 s; docs/operations.md).
const ALERT: &str = "\n[status]\nalert_after_s = 3\n";

fn link_state(n: &Node, link: &str) -> (String, f64) {
    let (_, out) = n.walsync(&["status", "--json"]);
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"));
    let l = report["links_in"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["link"] == link)
        .unwrap_or_else(|| panic!("no link {link}: {out}"))
        .clone();
    (
        l["state"].as_str().unwrap_or("").to_string(),
        l["seconds_in_state"].as_f64().unwrap_or(-1.0),
    )
}

#[test]
fn a_stopped_or_killed_sidecar_shows_down_everywhere_and_status_exits_1() {
    let mut c = TestCluster::new_with(
        "status-truth",
        Topology::Mesh,
        &["a", "b"],
        RETAIL_SCHEMA,
        ALERT,
    );
    let port = walsync_testkit::localpg::free_port();
    let a_config = c.node("a").config.clone();
    c.node("a").listen_metrics(port);
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (name) VALUES ('first')");
    c.wait_rows("b", "partner", 1);
    for n in &c.nodes {
        let n2 = n;
        wait_for(
            &format!("{} to need no one", n.name),
            DEADLINE,
            || n2.walsync(&["status"]).0,
            || n2.walsync(&["status"]).1,
        );
    }

    // 1. b's sidecar stops: its link a->b is down at once, on b; after the alert time
    //    b's status, a's (its slot has no reader) and the cluster view exit 1.
    c.node_mut("b").stop_sidecar();
    assert_eq!(link_state(c.node("b"), "a->b").0, "down");
    wait_for(
        "b's status to exit 1 for the down link",
        DEADLINE,
        || {
            let (ok, out) = c.node("b").walsync(&["status"]);
            !ok && out.contains("link a->b has been down")
        },
        || c.node("b").walsync(&["status"]).1,
    );
    wait_for(
        "a's status to name its slot without a reader",
        DEADLINE,
        || {
            let (ok, out) = c.node("a").walsync(&["status"]);
            !ok && out.contains("slot walsync_to_b has had no reader")
        },
        || c.node("a").walsync(&["status"]).1,
    );
    let (ok, cluster) = c.node("a").walsync(&["status", "--cluster"]);
    assert!(!ok, "{cluster}");
    assert!(cluster.contains("b: link a->b has been down"), "{cluster}");
    // a's sidecar serves the same facts.
    let (ready, why) = http_get(port, "/readyz");
    assert!(ready.contains("503"), "{ready}: {why}");
    assert!(why.contains("walsync_to_b"), "{why}");
    let metrics = http_get(port, "/metrics").1;
    assert!(metrics.contains("walsync_problems 1"), "{metrics}");
    // A peer away longer than the tombstones are kept (30 days by default) is told what
    // that means for its updates of rows deleted meanwhile, and what to do.
    c.node("a").sql(
        "UPDATE walsync.slot_activity SET inactive_since = now() - interval '31 days' WHERE slot = 'walsync_to_b'",
    );
    let (ok, out) = c.node("a").walsync(&["status"]);
    assert!(
        !ok && out.contains("longer than [cluster] tombstone_days (30 days)")
            && out.contains("walsync join"),
        "{out}"
    );

    // 2. Back: streaming again, `since` restarted, nothing to do.
    c.node_mut("b").start_sidecar();
    wait_for(
        "a->b to stream again",
        DEADLINE,
        || link_state(c.node("b"), "a->b").0 == "streaming",
        || c.logs(),
    );
    let (_, for_s) = link_state(c.node("b"), "a->b");
    assert!(for_s < 30.0, "since restarted with the state: {for_s} s");
    wait_for(
        "every status to need no one again",
        DEADLINE,
        || c.nodes.iter().all(|n| n.walsync(&["status"]).0),
        || c.logs(),
    );

    // 3. kill -9: nothing is written on the way out; the heartbeat ages and the link
    //    shows down with the time of its last heartbeat.
    c.node_mut("b").kill_sidecar();
    wait_for(
        "a->b to show down after its heartbeat went stale",
        DEADLINE,
        || link_state(c.node("b"), "a->b").0 == "down",
        || c.node("b").walsync(&["status"]).1,
    );
    let (ok, out) = c.node("b").walsync(&["status"]);
    assert!(
        !ok && out.contains("no sidecar has run this link since"),
        "{out}"
    );
    c.node_mut("b").start_sidecar();
    wait_for(
        "a->b to stream again after the kill",
        DEADLINE,
        || link_state(c.node("b"), "a->b").0 == "streaming",
        || c.logs(),
    );

    // 4. A node that refuses walsync is told apart from one that cannot be reached.
    let wrong_user = c.dir.join("a-wrong-user.toml");
    let text = std::fs::read_to_string(&a_config).unwrap();
    let b_dsn = c.node("b").pg.dsn();
    std::fs::write(
        &wrong_user,
        text.replace(&b_dsn, &b_dsn.replace("user=postgres", "user=nobody_here")),
    )
    .unwrap();
    let (ok, out) = walsync(&[
        "status",
        "--cluster",
        "--config",
        wrong_user.to_str().unwrap(),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("b: refused walsync's connection"), "{out}");
    c.node_mut("b").pg.stop().unwrap();
    let (ok, out) = c.node("a").walsync(&["status", "--cluster"]);
    assert!(!ok, "{out}");
    assert!(out.contains("b: unreachable"), "{out}");
}

#[test]
fn status_on_a_node_never_initialised_says_so() {
    let dir = scratch_dir("status-uninit");
    let pg = walsync_testkit::localpg::LocalCluster::start(&dir.join("x"), "x").unwrap();
    let config = dir.join("x.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\ntopology = \"mesh\"\n\n[node]\nname = \"x\"\nid = 1\ndsn = \"{}\"\n",
            pg.dsn()
        ),
    )
    .unwrap();
    let (ok, out) = walsync(&["status", "--config", config.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("never initialised") && out.contains("walsync init"),
        "{out}"
    );
    assert!(!out.contains("does not exist"), "{out}");
}
