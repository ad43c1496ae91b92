//! Faults on the path between a sidecar and the PostgreSQL it reaches remotely.
//!
//! Scenario: a_black_holed_link_is_noticed_and_resumes_after_heal
//!   1. while the path to main is black-holed, branch1's link says so (state `retrying`);
//!   2. after heal, every row main wrote meanwhile reaches branch1, with no operator action.
//!
//! Mechanics: branch1's sidecar reaches main through a FaultProxy; `cut` stalls every
//! connection without closing it (as a dead WAN or a lost NAT mapping does) and the
//! connections open during the cut stay dead after `heal`.

mod support;

use support::fault_proxy::FaultProxy;
use support::*;

#[test]
fn a_black_holed_link_is_noticed_and_resumes_after_heal() {
    let mut c = TestCluster::new(
        "blackhole",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    let proxy = FaultProxy::start(c.node("main").pg.port());
    let cfg = c.node("branch1").config.clone();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let main_port = format!("port={} ", c.node("main").pg.port());
    assert!(text.contains(&main_port));
    std::fs::write(
        &cfg,
        text.replace(&main_port, &format!("port={} ", proxy.port())),
    )
    .unwrap();
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (id, name) VALUES (1, 'before the cut')");
    c.wait_rows("branch1", "partner", 1);

    proxy.cut();
    c.node("main").sql(
        "INSERT INTO partner (id, name) SELECT g, 'during the cut' FROM generate_series(2, 11) g",
    );
    let cfg = cfg.to_str().unwrap().to_string();
    wait_for(
        "branch1's link to notice the black hole",
        DEADLINE,
        || {
            walsync(&["status", "--config", &cfg])
                .1
                .contains("retrying")
        },
        || format!("{}\n{}", walsync(&["status", "--config", &cfg]).1, c.logs()),
    );

    proxy.heal();
    c.wait_rows("branch1", "partner", 11);
    c.wait_converged("partner");
    wait_for(
        "the link to stream again",
        DEADLINE,
        || walsync(&["status", "--config", &cfg]).0,
        || walsync(&["status", "--config", &cfg]).1,
    );
}
