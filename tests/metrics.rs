//! The sidecar's HTTP endpoint, scraped as Prometheus and a container orchestrator would.

mod support;

use std::net::TcpStream;

use support::*;

#[test]
fn metrics_health_and_readiness_are_served_by_the_sidecar() {
    let mut c = TestCluster::new(
        "metrics",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    let port = walsync_testkit::localpg::free_port();
    c.node("main").listen_metrics(port);
    c.start();
    c.node("branch1")
        .sql("INSERT INTO partner (name) VALUES ('Ana'), ('Bo')");
    c.wait_rows("main", "partner", 2);
    wait_for(
        "the endpoint to answer",
        DEADLINE,
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        || c.logs(),
    );
    assert_eq!(
        http_get(port, "/healthz"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    assert_eq!(http_get(port, "/readyz").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(port, "/nope").0, "HTTP/1.1 404 Not Found");
    // Many scrapers at once: one report, over one connection to the node.
    let main = c.node("main");
    let most = std::sync::atomic::AtomicI64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let scrapers: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..5 {
                        assert!(http_get(port, "/metrics").1.contains("walsync_node_up"));
                    }
                })
            })
            .collect();
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = main
                    .sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walsync metrics'")
                    .parse()
                    .unwrap();
                most.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
            }
        });
        for t in scrapers {
            t.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(
        most.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one metrics connection whatever the number of scrapers"
    );
    let body = std::cell::RefCell::new(String::new());
    wait_for(
        "the link into main to show as streaming with its transaction",
        DEADLINE,
        || {
            let text = http_get(port, "/metrics").1;
            *body.borrow_mut() = text.clone();
            text.contains("walsync_link_state{link=\"branch1->main\",state=\"streaming\"} 1")
                && text.lines().any(|l| {
                    l.starts_with("walsync_link_transactions_total{link=\"branch1->main\"}")
                        && l.split(' ').nth(1).is_some_and(|v| v != "0")
                })
        },
        || format!("{}\n{}", body.borrow(), c.logs()),
    );
    let body = body.into_inner();
    assert!(body.contains("walsync_node_up{node=\"main\"} 1"), "{body}");
    assert!(
        body.contains("walsync_slot_retained_wal_bytes{slot=\"walsync_to_branch1\"}"),
        "{body}"
    );
    assert!(body.contains("walsync_sequences_unpartitioned 0"), "{body}");
    assert!(body.contains("walsync_problems 0"), "{body}");
}

#[test]
fn a_metrics_address_in_use_stops_the_sidecar_with_a_clear_error() {
    let c = TestCluster::new("metrics-busy", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let config = c.node("a").config.clone();
    c.node("a").listen_metrics(port);
    let (ok, out) = walsync(&["run", "--config", config.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "metrics.listen = 127.0.0.1:{port}: cannot listen there"
        )),
        "{out}"
    );
}

#[test]
fn status_cluster_shows_every_node_what_it_lacks_and_who_cannot_be_reached() {
    let mut c = TestCluster::new(
        "status-cluster",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node_mut("branch2").stop_sidecar();
    c.node("main")
        .sql("CREATE TABLE coupon (id serial PRIMARY KEY, code text)");
    c.wait_rows("branch1", "pg_tables WHERE tablename = 'coupon'", 1);
    let config = c.node("main").config.to_str().unwrap().to_string();
    let (ok, text) = walsync(&["status", "--cluster", "--config", &config]);
    assert!(ok, "{text}");
    for line in [
        "== main (id 1): 0 conflict(s) in the last 24 h, 0 DDL statement(s) not applied yet, 0 problem(s)",
        "== branch1 (id 2): 0 conflict(s) in the last 24 h, 0 DDL statement(s) not applied yet, 0 problem(s)",
        "== branch2 (id 3): 0 conflict(s) in the last 24 h, 1 DDL statement(s) not applied yet, 0 problem(s)",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains("walsync_to_branch2"), "{text}");
    c.node_mut("branch2").pg.stop().unwrap();
    let (ok, text) = walsync(&["status", "--cluster", "--json", "--config", &config]);
    assert!(!ok, "a node that cannot be reached needs a person:\n{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let b2 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "branch2")
        .unwrap();
    assert_eq!(b2["reachable"], false, "{text}");
    assert_eq!(b2["refused"], false, "unreachable, not refused: {text}");
    assert!(
        b2["error"].as_str().unwrap().contains("cannot connect"),
        "{text}"
    );
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("branch2: unreachable")),
        "{text}"
    );
}
