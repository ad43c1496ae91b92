//! Adding a branch to a running cluster in one command, and removing it again.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use support::*;
use walsync_testkit::localpg::LocalCluster;

/// The new branch: an empty database on its own server, and a config naming main as its
/// only peer with both links run by its own sidecar.
fn new_branch2(c: &TestCluster) -> (LocalCluster, std::path::PathBuf) {
    let pg = LocalCluster::start(&c.dir.join("branch2"), "branch2").expect("start branch2");
    let config = c.dir.join("branch2.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\ntopology = \"star\"\nhub = \"main\"\n\n[node]\nname = \"branch2\"\nid = 3\ndsn = \"{}\"\n\n\
             [apply]\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n\n\
             [[peers]]\nname = \"main\"\nid = 1\ndsn = \"{}\"\nlinks = \"both\"\n",
            pg.dsn(),
            c.node("main").pg.dsn()
        ),
    )
    .unwrap();
    (pg, config)
}

#[test]
fn a_branch_joins_a_running_cluster_while_orders_are_written_and_ends_identical() {
    let mut c = TestCluster::new("join", Topology::Star, &["main", "branch1"], RETAIL_SCHEMA);
    c.start();
    c.node("main").sql(
        "INSERT INTO product (name, price) SELECT 'product ' || g, g FROM generate_series(1, 200) g;
         INSERT INTO partner (name) SELECT 'partner ' || g FROM generate_series(1, 500) g;",
    );
    c.wait_converged("product");
    let (pg, config) = new_branch2(&c);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let out = std::thread::scope(|s| {
        // Both running nodes sell all along: orders with lines, each one transaction.
        for n in ["main", "branch1"] {
            let (node, stop, written) = (c.node(n), &stop, &written);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    node.sql(&format!(
                        "WITH o AS (INSERT INTO pos_order (name, amount_total) VALUES ('{n}/' || clock_timestamp(), 10) RETURNING id)
                         INSERT INTO pos_order_line (order_id, product_id, qty, price_unit)
                         SELECT o.id, p.id, 1, 5 FROM o, (SELECT id FROM product ORDER BY id LIMIT 3) p"
                    ));
                    written.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let out = walsync(&["join", "--config", config.to_str().unwrap()]);
        stop.store(true, Ordering::Relaxed);
        out
    });
    let (ok, text) = out;
    assert!(ok, "walsync join failed:\n{text}");
    assert!(
        text.contains("copied") && text.contains("tables"),
        "progress is shown:\n{text}"
    );
    assert!(written.load(Ordering::Relaxed) > 0);
    c.adopt("branch2", 3, pg, &config);
    c.node_mut("branch2").start_sidecar();
    c.node("branch2")
        .sql("INSERT INTO pos_order (name, amount_total) VALUES ('branch2/first', 7)");
    for t in ["product", "partner", "pos_order", "pos_order_line"] {
        c.wait_converged(t);
    }
    let b2 = c.node("branch2");
    assert_eq!(
        b2.sql("SELECT id % 16 FROM pos_order WHERE name = 'branch2/first'"),
        "3",
        "the new node hands out its own ids"
    );
    assert_eq!(
        b2.sql(
            "SELECT count(*) FROM pg_sequences WHERE schemaname = 'public' AND increment_by <> 16"
        ),
        "0"
    );
    for n in &c.nodes {
        assert_eq!(n.count("walsync.conflicts"), 0, "{}", n.name);
    }
    // Main's config does not list the new branch; its cluster view still shows it.
    let main_cfg = c.node("main").config.to_str().unwrap().to_string();
    let (_, cluster) = walsync(&["status", "--cluster", "--config", &main_cfg]);
    assert!(
        cluster.contains("== branch2: in the cluster") && cluster.contains("not in this config"),
        "{cluster}"
    );
    let (ok, again) = walsync(&["join", "--config", config.to_str().unwrap()]);
    assert!(!ok && again.contains("joined from main already"), "{again}");

    // Removing it: its sidecar stops, main forgets its slot and origin.
    c.node_mut("branch2").stop_sidecar();
    let main_config = c.node("main").config.to_str().unwrap().to_string();
    let (ok, removed) = walsync(&["remove-node", "--config", &main_config, "branch2"]);
    assert!(ok, "{removed}");
    let main = c.node("main");
    assert_eq!(
        main.sql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walsync_to_branch2'"
        ),
        "0"
    );
    assert_eq!(
        main.sql("SELECT count(*) FROM pg_replication_origin WHERE roname = 'walsync_branch2'"),
        "0"
    );

    // Fenced: its sidecar, restarted as a service manager would, exits and says why;
    // nothing of it reaches main, and its origin is not made again there.
    c.node("branch2")
        .sql("INSERT INTO partner (name) VALUES ('written after the removal')");
    let (ok, run) = walsync(&["run", "--config", config.to_str().unwrap()]);
    assert!(
        !ok && run.contains("node branch2 was removed from the cluster")
            && run.contains("walsync join"),
        "{run}"
    );
    let main = c.node("main");
    assert_eq!(
        main.count("partner WHERE name = 'written after the removal'"),
        0
    );
    assert_eq!(
        main.sql("SELECT count(*) FROM pg_replication_origin WHERE roname = 'walsync_branch2'"),
        "0"
    );

    // Bringing it back: its database made anew, a fresh join.
    let fresh =
        LocalCluster::start(&c.dir.join("branch2-again"), "branch2").expect("start branch2");
    let again = c.dir.join("branch2-again.toml");
    std::fs::write(
        &again,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&c.node("branch2").pg.dsn(), &fresh.dsn()),
    )
    .unwrap();
    let (ok, joined) = walsync(&["join", "--config", again.to_str().unwrap()]);
    assert!(
        ok && joined.contains("main: no longer refuses branch2"),
        "{joined}"
    );
    let node = c.node_mut("branch2");
    node.pg = fresh;
    node.config = again;
    node.start_sidecar();
    c.node("branch2")
        .sql("INSERT INTO partner (name) VALUES ('back again')");
    c.wait_rows("main", "partner WHERE name = 'back again'", 1);
}

#[test]
fn a_join_that_stopped_halfway_is_refused_until_restarted() {
    let mut c = TestCluster::new(
        "join-again",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    c.start();
    let (pg, config) = new_branch2(&c);
    // A copy cut short: part of the schema is there, the join never finished.
    pg.psql("CREATE SCHEMA walsync; CREATE TABLE walsync.join_state ( \
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), source text NOT NULL, \
             started_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, start_lsn text); \
             INSERT INTO walsync.join_state (source) VALUES ('main'); CREATE TABLE partner (id int)")
        .unwrap();
    let cfg = config.to_str().unwrap();
    let (ok, run) = walsync(&["run", "--config", cfg]);
    assert!(
        !ok && run.contains("did not finish"),
        "a partial node never runs:\n{run}"
    );
    let (ok, refused) = walsync(&["join", "--config", cfg]);
    assert!(!ok && refused.contains("--restart"), "{refused}");
    let (ok, joined) = walsync(&["join", "--config", cfg, "--restart"]);
    assert!(ok, "{joined}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'partner'")
            .unwrap()
            .trim(),
        "5",
        "the partial table was replaced by the copy"
    );
}

/// The operator's path of docs/operations.md and docs/security.md, as written: init as a
/// superuser with `--grant-to`, sidecars as the unprivileged role, a branch joined with
/// `join --grant-to`, main's config told of it as join prints, then `remove-node`.
///
/// The sequences main partitioned at init and never used (`is_called = false`, which
/// `pg_sequences.last_value` shows as NULL) arrive on the joined node in main's class:
/// join must restart every one of them for the new node before its first insert.
#[test]
fn a_branch_joined_with_least_privilege_hands_out_its_own_ids_and_its_removal_reaches_it() {
    const SCHEMA: &str = "
        CREATE TABLE app_user (id serial PRIMARY KEY, login text NOT NULL);
        CREATE SEQUENCE ir_sequence_001;";
    let prepare = |pg: &LocalCluster| owned_by_shop(pg, &format!("{RETAIL_SCHEMA} {SCHEMA}"));
    let mut c = TestCluster::new_in(
        "join-least-privilege",
        Topology::Star,
        &["main", "branch1"],
        "postgres",
        &prepare,
        "",
    );
    c.run_as_walsync();
    c.start();
    // Main has customers; every other sequence it partitioned at init was never called.
    c.node("main")
        .sql("INSERT INTO partner (name) SELECT 'partner ' || g FROM generate_series(1, 20) g");
    c.wait_converged("partner");

    // The new branch: the roles the copied objects belong to, and the sidecar's role.
    let (pg, config) = new_branch2(&c);
    pg.psql("CREATE ROLE shop LOGIN; CREATE ROLE walsync LOGIN")
        .unwrap();
    let main_dsn = c.node("main").pg.dsn();
    let main_as_walsync = main_dsn.replace("user=postgres", "user=walsync");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(&main_dsn, &main_as_walsync)).unwrap();
    // The new node's DSN is a superuser's for the join; main's is the sidecar's role.
    let (ok, joined) = walsync(&[
        "join",
        "--config",
        config.to_str().unwrap(),
        "--grant-to",
        "walsync",
    ]);
    assert!(ok, "walsync join failed:\n{joined}");
    assert!(
        joined.contains("GRANT \"shop\" TO \"walsync\"") && joined.contains("granted walsync"),
        "join --grant-to grants the sidecar's role its rights:\n{joined}"
    );
    assert!(
        joined.contains("[[peers]]\nname = \"branch2\"\nid = 3")
            && joined.contains("links = \"none\""),
        "join prints what main's config must say:\n{joined}"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replacen("user=postgres", "user=walsync", 1)).unwrap();
    // Main's config told of the new branch as join printed (branch2 runs both links).
    let main_config = c.node("main").config.clone();
    let mut main_text = std::fs::read_to_string(&main_config).unwrap();
    main_text.push_str(&format!(
        "\n[[peers]]\nname = \"branch2\"\nid = 3\ndsn = \"{}\"\nlinks = \"none\"\n",
        pg.dsn().replace("user=postgres", "user=walsync")
    ));
    std::fs::write(&main_config, main_text).unwrap();
    c.node_mut("main").stop_sidecar();
    c.node_mut("main").start_sidecar();
    c.adopt("branch2", 3, pg, &config);

    // Before its sidecar even starts, every sequence hands out branch2's ids: the
    // new node's first insert can never take an id main will hand out too.
    let b2 = c.node("branch2");
    let (_, status) = b2.walsync(&["status", "--json"]);
    let report: serde_json::Value =
        serde_json::from_str(&status).unwrap_or_else(|e| panic!("{e}: {status}"));
    let sequences = report["sequences"].as_array().unwrap();
    assert_eq!(sequences.len(), 6, "{status}");
    for s in sequences {
        assert_eq!(s["partitioned"], true, "{s}");
        assert_eq!(s["next"].as_i64().unwrap() % 16, 3, "{s}");
    }
    assert!(
        !report["problems"].to_string().contains("sequence"),
        "{status}"
    );

    c.node_mut("branch2").start_sidecar();
    // Every sequence: first on the new branch, then on main.
    let sell = |node: &str, tag: &str| {
        c.node(node).sql(&format!(
            "SET SESSION AUTHORIZATION shop;
             INSERT INTO app_user (login) VALUES ('{tag}');
             INSERT INTO product (name, price) VALUES ('{tag}', 1);
             INSERT INTO partner (name) VALUES ('{tag}');
             WITH o AS (INSERT INTO pos_order (name, partner_id, amount_total)
                        SELECT '{tag}', id, 1 FROM partner WHERE name = '{tag}' RETURNING id)
             INSERT INTO pos_order_line (order_id, product_id, qty, price_unit)
             SELECT o.id, p.id, 1, 1 FROM o, product p WHERE p.name = '{tag}';
             SELECT nextval('ir_sequence_001');"
        ))
    };
    let b2_counter = sell("branch2", "branch2/first");
    let main_counter = sell("main", "main/after");
    assert_eq!(
        b2_counter.lines().last().unwrap().parse::<i64>().unwrap() % 16,
        3,
        "{b2_counter}"
    );
    assert_eq!(
        main_counter.lines().last().unwrap().parse::<i64>().unwrap() % 16,
        1,
        "{main_counter}"
    );
    for t in [
        "app_user",
        "product",
        "partner",
        "pos_order",
        "pos_order_line",
    ] {
        c.wait_converged(t);
        let main = c.node("main");
        assert_eq!(
            main.sql(&format!(
                "SELECT string_agg(DISTINCT (id % 16)::text, ',' ORDER BY (id % 16)::text) FROM {t}"
            )),
            "1,3",
            "{t}: main's rows in main's class, branch2's in branch2's"
        );
    }
    for n in &c.nodes {
        assert_eq!(n.count("walsync.conflicts"), 0, "{}", n.name);
    }

    // Removal from main reaches the joined node through main's config: its status says so.
    c.node_mut("branch2").stop_sidecar();
    let (ok, removed) = walsync(&[
        "remove-node",
        "--config",
        main_config.to_str().unwrap(),
        "branch2",
    ]);
    assert!(
        ok && removed.contains("branch2: recorded its removal there too"),
        "{removed}"
    );
    let (ok, status) = c.node("branch2").walsync(&["status"]);
    assert!(
        !ok && status.contains("node branch2 was removed from the cluster"),
        "{status}"
    );
    // A joined node main's config never listed holds no record of its own; its status
    // still finds the removal on main.
    c.node("branch2").sql("DELETE FROM walsync.removed_nodes");
    let (ok, status) = c.node("branch2").walsync(&["status"]);
    assert!(
        !ok && status.contains("node branch2 was removed from the cluster"),
        "{status}"
    );
}
