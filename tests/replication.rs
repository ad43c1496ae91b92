//! End-to-end: real PostgreSQL clusters, the real `walsync` binary, data in both directions.
//!
//! Ids are chosen per node (node k writes ids k*100000 + n) until sequence partitioning
//! makes that automatic.

mod support;

use support::*;

#[test]
fn two_nodes_write_both_ways() {
    let mut c = TestCluster::new("two-nodes", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (100001, 'Ana'), (100002, 'Ben')");
    c.node("b")
        .sql("INSERT INTO partner (id, name) VALUES (200001, 'Cleo')");
    c.wait_rows("a", "partner", 3);
    c.wait_rows("b", "partner", 3);
    c.node("b")
        .sql("UPDATE partner SET email = 'ana@example.com' WHERE id = 100001");
    c.node("a").sql("DELETE FROM partner WHERE id = 200001");
    c.wait_converged("partner");
    assert_eq!(
        c.node("a")
            .sql("SELECT email FROM partner WHERE id = 100001"),
        "ana@example.com"
    );
    assert_eq!(c.node("b").count("partner"), 2);

    // The row keeps its author: b's copy of a's row carries origin walsync_a and a's commit time.
    assert_eq!(c.node("b").author_of("partner", 100002), "walsync_a");
    let t_a = c
        .node("a")
        .sql("SELECT pg_xact_commit_timestamp(xmin) FROM partner WHERE id = 100002");
    let t_b = c
        .node("b")
        .sql("SELECT pg_xact_commit_timestamp(xmin) FROM partner WHERE id = 100002");
    assert_eq!(t_a, t_b, "the applied row keeps the author's commit time");
}

/// Updates and deletes that are no conflict apply on the fast path (one guarded
/// statement each, no read of the row first): on rows last written by the change's
/// author, on rows as the author saw them though another node wrote them, and on rows
/// written earlier in the same transaction. None is recorded as a conflict, and none
/// sends its transaction to the careful path.
#[test]
fn updates_and_deletes_that_are_no_conflict_take_the_fast_path() {
    let mut c = TestCluster::new("fast-updates", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a").sql(
        "INSERT INTO product (id, name, price) VALUES (1, 'Soap', 2), (2, 'Tea', 4), (3, 'Rice', 1)",
    );
    c.wait_rows("b", "product", 3);
    // On b, these rows were last written by a, the author of what follows.
    c.node("a").sql(
        "BEGIN;
         INSERT INTO product (id, name, price) VALUES (10, 'Salt', 1), (11, 'Oil', 5);
         UPDATE product SET price = 1.5 WHERE id = 10;
         UPDATE product SET qty_available = 7 WHERE id = 10;
         DELETE FROM product WHERE id = 11;
         UPDATE product SET price = 2.5 WHERE id = 1;
         COMMIT",
    );
    // Updates of one shape travel together; one on a row already changed in the batch,
    // or on the key another gave its row, comes after it.
    c.node("a").sql(
        "BEGIN;
         UPDATE product SET price = price + 1 WHERE id IN (1, 2, 3);
         UPDATE product SET price = price + 1 WHERE id = 1;
         UPDATE product SET id = 20 WHERE id = 10;
         UPDATE product SET price = 9 WHERE id = 20;
         COMMIT",
    );
    c.wait_converged("product");
    // On a, these rows were last written by a itself, not by b, the author: each is
    // applied because it is exactly what b saw.
    c.node("b").sql(
        "UPDATE product SET price = 4.5, qty_available = 3 WHERE id = 2; DELETE FROM product WHERE id = 3",
    );
    wait_for(
        "b's update and delete on a",
        DEADLINE,
        || {
            c.node("a").sql("SELECT string_agg(id || ':' || price || ':' || qty_available, ' ' ORDER BY id) FROM product")
            == "1:4.50:0 2:4.50:3 20:9.00:7"
        },
        || c.logs(),
    );
    c.wait_converged("product");
    for n in &c.nodes {
        assert_eq!(n.count("walsync.conflicts"), 0, "no conflict on {}", n.name);
    }
    c.assert_no_careful_pass("a change without a conflict");
}

/// A sidecar next to its node reaches it over the node's Unix socket (`host=/dir`), as
/// libpq programs do: no TLS is tried on it, whatever sslmode says (PostgreSQL offers none
/// there), and rows flow both ways.
#[test]
fn a_sidecar_reaches_its_own_node_over_a_unix_socket() {
    let mut c = TestCluster::new("unix-socket", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    for name in ["a", "b"] {
        let n = c.node(name);
        let text = std::fs::read_to_string(&n.config).unwrap();
        let node_line = format!("dsn = \"{}\"", n.pg.dsn_for("postgres"));
        let socket_line = format!(
            "dsn = \"{} sslmode=require\"",
            n.pg.socket_dsn_for("postgres")
        );
        assert!(text.contains(&node_line), "config of {name}:\n{text}");
        std::fs::write(&n.config, text.replacen(&node_line, &socket_line, 1)).unwrap();
        let (ok, out) = walsync(&["init", "--config", n.config.to_str().unwrap()]);
        assert!(ok, "walsync init over the socket on {name} failed:\n{out}");
    }
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (100001, 'Ana')");
    c.node("b")
        .sql("INSERT INTO partner (id, name) VALUES (200001, 'Ben')");
    c.wait_rows("a", "partner", 2);
    c.wait_rows("b", "partner", 2);
    c.wait_converged("partner");
    for name in ["a", "b"] {
        // A connection over a Unix socket has no client address; the applier has one
        // session per `[apply] sessions`, and a catalog reader with more than one.
        assert_eq!(
            c.node(name).sql(
                "SELECT count(*) > 0 AND count(client_addr) = 0 FROM pg_stat_activity \
                 WHERE application_name LIKE 'walsync % apply'"
            ),
            "t",
            "{name}'s applier connects over the socket"
        );
    }
}

#[test]
fn star_forwards_a_branch_write_to_the_other_branch_and_nothing_loops() {
    let mut c = TestCluster::new(
        "star",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("branch1")
        .sql("INSERT INTO product (id, name, price) VALUES (200001, 'Soap', 2.50)");
    c.wait_rows("branch2", "product", 1);
    c.node("main")
        .sql("INSERT INTO product (id, name, price) VALUES (100001, 'Tea', 4.00)");
    c.node("branch2")
        .sql("INSERT INTO product (id, name, price) VALUES (300001, 'Rice', 1.10)");
    c.wait_converged("product");
    for n in ["main", "branch1", "branch2"] {
        assert_eq!(c.node(n).count("product"), 3, "{n}");
    }
    // Each node applied exactly the transactions written elsewhere: no echo, no loop.
    wait_for(
        "applied transaction counts to settle",
        DEADLINE,
        || {
            c.node("main").applied_transactions() == 2
                && c.node("branch1").applied_transactions() == 2
                && c.node("branch2").applied_transactions() == 2
        },
        || {
            format!(
                "main {} branch1 {} branch2 {}\n{}",
                c.node("main").applied_transactions(),
                c.node("branch1").applied_transactions(),
                c.node("branch2").applied_transactions(),
                c.logs()
            )
        },
    );
    // The forwarded row names its real author on branch2, not the hub.
    assert_eq!(
        c.node("branch2").author_of("product", 200001),
        "walsync_branch1"
    );
}

#[test]
fn mesh_of_three_converges() {
    let mut c = TestCluster::new("mesh3", Topology::Mesh, &["a", "b", "c"], RETAIL_SCHEMA);
    c.start();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let base = (i + 1) * 100000;
        c.node(n).sql(&format!(
            "INSERT INTO partner (id, name) SELECT {base} + g, 'p' || g FROM generate_series(1, 50) g"
        ));
    }
    c.wait_converged("partner");
    assert_eq!(c.node("c").count("partner"), 150);
    c.node("c")
        .sql("UPDATE partner SET active = false WHERE id % 2 = 0");
    c.wait_converged("partner");
    assert_eq!(
        c.node("a")
            .sql("SELECT count(*) FROM partner WHERE NOT active"),
        "75"
    );
    wait_for(
        "every node applied each transaction written elsewhere exactly once (a: 1, b: 1, c: 2)",
        DEADLINE,
        || {
            c.nodes
                .iter()
                .map(|n| n.applied_transactions())
                .collect::<Vec<_>>()
                == [3, 3, 2]
        },
        || {
            format!(
                "{:?}",
                c.nodes
                    .iter()
                    .map(|n| n.applied_transactions())
                    .collect::<Vec<_>>()
            )
        },
    );
}

#[test]
fn every_odoo_column_type_round_trips() {
    let schema = "CREATE TABLE typed (
        id serial PRIMARY KEY, i4 int4, i8 int8, num numeric(20,6), txt text, vc varchar(20), js jsonb,
        flag bool, d date, ts timestamp, tstz timestamptz, raw bytea, ints int4[], texts text[],
        f8 double precision, big text)";
    let mut c = TestCluster::new("types", Topology::Mesh, &["a", "b"], schema);
    c.node("a").sql("ALTER TABLE typed REPLICA IDENTITY FULL");
    c.node("b").sql("ALTER TABLE typed REPLICA IDENTITY FULL");
    c.start();
    c.node("a").sql(
        "INSERT INTO typed VALUES
          (1, -2147483648, 9223372036854775807, 12345678901234.123456, E'multi\\nline ''quoted'' \\\\ tab\\t', 'varchar',
           '{\"k\": [1, 2.5, null, \"é\"]}', true, '2026-11-25', '2026-11-25 13:14:15.123456', '2026-11-25 13:14:15.654321+05:30',
           '\\x00ff10', '{1,NULL,-3}', '{\"a b\",NULL,\"c,d\"}', 0.1, repeat(md5('x'), 1000)),
          (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    );
    c.wait_converged("typed");
    // An update that leaves the large (TOASTed) column untouched keeps it on the target.
    c.node("a").sql("UPDATE typed SET i4 = 7 WHERE id = 1");
    c.wait_converged("typed");
    assert_eq!(
        c.node("b")
            .sql("SELECT length(big) FROM typed WHERE id = 1"),
        "32000"
    );
    assert_eq!(c.node("b").sql("SELECT f8 = 0.1 AND num = 12345678901234.123456 AND i8 = 9223372036854775807 FROM typed WHERE id = 1"), "t");
    // Back from b: on a, the rows were last written here, not by b, so each update is
    // applied only once every value of a's row is compared equal to the old image b sent,
    // in the text form the walsender prints; a type compared wrongly would send the
    // transaction to the careful path (decided row by row, and logged).
    c.node("b")
        .sql("UPDATE typed SET i4 = 8 WHERE id = 1; UPDATE typed SET txt = 'set' WHERE id = 2");
    wait_for(
        "b's updates on a",
        DEADLINE,
        || {
            c.node("a").sql(
                "SELECT count(*) FROM typed WHERE (id = 1 AND i4 = 8) OR (id = 2 AND txt = 'set')",
            ) == "2"
        },
        || c.logs(),
    );
    c.wait_converged("typed");
    c.assert_no_careful_pass("an update made on the row a holds");
    // TRUNCATE travels too.
    c.node("b").sql("TRUNCATE typed");
    c.wait_rows("a", "typed", 0);
}

/// Requests are pipelined: the transactions after one that fails on the target are already
/// on their way when it fails. None of them may commit past it out of order: the failed
/// one is set aside whole, with every later one of its table behind it (the link goes
/// on with the rest); once the cause is fixed, all arrive once, in order.
#[test]
fn nothing_commits_past_a_transaction_that_fails_on_the_target() {
    let mut c = TestCluster::new("failed-txn", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    // The target refuses a price the source accepts (schema drift).
    c.node("b")
        .sql("ALTER TABLE product ADD CONSTRAINT b_price_below_1000 CHECK (price < 1000)");
    // A backlog, so that the failing transaction and the ones after it leave together.
    c.node("a").sql(
        "INSERT INTO product (id, name, price) SELECT g, 'p' || g, 1 FROM generate_series(100001, 100049) g",
    );
    // A one-row transaction before the failing one, of its shape: the failing one goes
    // to b in one statement (decision 0013).
    c.node("a")
        .sql("INSERT INTO product (id, name, price) VALUES (100050, 'p100050', 1)");
    c.node("a")
        .sql("INSERT INTO product (id, name, price) VALUES (100051, 'too dear for b', 5000)");
    for i in 0..20 {
        c.node("a").sql(&format!(
            "INSERT INTO product (id, name, price) VALUES ({}, 'after', 2)",
            100100 + i
        ));
    }
    c.start();
    let b = c.node("b");
    // The failing transaction is set aside whole, and the later ones of its table wait
    // behind it: only the transactions before it are applied.
    c.wait_rows("b", "walsync.set_aside", 21);
    assert_eq!(
        b.count("product"),
        50,
        "only the transactions before the failed one"
    );
    assert_eq!(
        b.sql("SELECT count(*) FROM product WHERE name = 'after'"),
        "0"
    );
    let (_, status) = b.walsync(&["status"]);
    assert!(
        status.contains("waiting for public.product (a row does not fit:")
            && status.contains("b_price_below_1000"),
        "the status names the table and the constraint:\n{status}"
    );
    b.sql("ALTER TABLE product DROP CONSTRAINT b_price_below_1000");
    c.wait_rows("b", "product", 71);
    c.wait_converged("product");
    assert_eq!(
        c.node("b").sql("SELECT count(DISTINCT id) FROM product"),
        "71"
    );
}

#[test]
fn sidecar_killed_mid_transaction_resumes_with_nothing_lost_or_doubled() {
    let mut c = TestCluster::new("kill9", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO product (id, name, price) VALUES (1, 'Soap', 1)");
    c.wait_rows("b", "product", 1);
    // One large source transaction; kill b's sidecar while it is being applied.
    c.node("a").sql(
        "INSERT INTO pos_order (id, name) SELECT g, 'Shop/' || g FROM generate_series(1, 200000) g",
    );
    let b = c.node("b");
    wait_for(
        "b to be inside the large transaction",
        DEADLINE,
        || {
            b.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walsync a->b apply' AND state <> 'idle' AND xact_start IS NOT NULL")
                != "0"
        },
        || c.logs(),
    );
    c.node_mut("b").kill_sidecar();
    assert_eq!(
        c.node("b").count("pos_order"),
        0,
        "the interrupted transaction is not visible"
    );
    c.node_mut("b").start_sidecar();
    c.wait_rows("b", "pos_order", 200000);
    c.node("a")
        .sql("INSERT INTO pos_order (id, name) VALUES (200001, 'after')");
    c.wait_rows("b", "pos_order", 200001);
    assert_eq!(
        c.node("b").sql("SELECT count(DISTINCT id) FROM pos_order"),
        "200001"
    );
    c.wait_converged("pos_order");
}

/// A sidecar stopped cleanly (SIGTERM) acknowledges everything it applied before it
/// goes: the upstream's slot is left at the target's recorded progress, so a restart
/// neither decodes nor sends those transactions again.
#[test]
fn a_cleanly_stopped_sidecar_leaves_its_slot_acknowledged_up_to_what_it_applied() {
    let mut c = TestCluster::new("clean-stop", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a").sql(
        "DO $$ BEGIN FOR i IN 1..300 LOOP \
           INSERT INTO pos_order (id, name) VALUES (i, 'Shop/' || i); COMMIT; \
         END LOOP; END $$",
    );
    c.wait_rows("b", "pos_order", 300);
    // At once: the last commits' acknowledgements are still on their way.
    c.node_mut("b").stop_sidecar();
    let applied = c
        .node("b")
        .sql("SELECT source_lsn FROM walsync.link_progress WHERE link = 'a->b'");
    let confirmed = c.node("a").sql(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'walsync_to_b'",
    );
    assert_eq!(
        c.node("a").sql(&format!(
            "SELECT '{confirmed}'::pg_lsn >= '{applied}'::pg_lsn"
        )),
        "t",
        "the slot was left at {confirmed}, behind what b applied ({applied})\n{}",
        c.logs()
    );
    c.node_mut("b").start_sidecar();
    c.node("a")
        .sql("INSERT INTO pos_order (id, name) VALUES (301, 'after')");
    c.wait_rows("b", "pos_order", 301);
}

#[test]
fn peer_down_for_a_while_then_back_converges() {
    let mut c = TestCluster::new(
        "peer-down",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (id, name) VALUES (100001, 'before')");
    c.wait_rows("branch1", "partner", 1);
    // main's PostgreSQL goes away; both sides keep writing.
    c.node_mut("main").pg.stop().unwrap();
    c.node("branch1").sql("INSERT INTO partner (id, name) SELECT 200000 + g, 'cut ' || g FROM generate_series(1, 100) g");
    let b1 = c.node("branch1");
    wait_for(
        "branch1's sidecar to notice main is gone",
        DEADLINE,
        || b1.sidecar_log().contains("link interrupted"),
        || c.logs(),
    );
    c.node_mut("main").pg.restart().unwrap();
    c.node("main").sql("INSERT INTO partner (id, name) SELECT 100001 + g, 'main ' || g FROM generate_series(1, 100) g");
    c.wait_converged("partner");
    assert_eq!(c.node("main").count("partner"), 201);
}

#[test]
fn init_is_idempotent_and_refuses_bad_setups() {
    let c = TestCluster::new("init", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    let cfg = c.node("a").config.to_str().unwrap().to_string();
    let (ok, out) = walsync(&["init", "--config", &cfg]);
    assert!(ok, "{out}");
    assert!(out.contains("nothing to do"), "{out}");

    // A table without a key is no reason to refuse: it replicates, its whole old row
    // finding the row (docs/schema-changes.md), which init makes sure of.
    c.node("a")
        .sql("CREATE TABLE nokey (a int); ALTER TABLE nokey REPLICA IDENTITY DEFAULT");
    let (ok, out) = walsync(&["init", "--config", &cfg]);
    assert!(ok, "{out}");
    assert_eq!(
        c.node("a")
            .sql("SELECT relreplident FROM pg_class WHERE relname = 'nokey'"),
        "f"
    );
    c.node("a").sql("DROP TABLE nokey");

    // A config pointed at the wrong database is refused.
    let wrong = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen("id = 1", "id = 3", 1);
    let wrong_path = c.dir.join("wrong.toml");
    std::fs::write(&wrong_path, wrong).unwrap();
    let (ok, out) = walsync(&["init", "--config", wrong_path.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("was initialised as node \"a\""), "{out}");

    // Unreachable server: a clear message, no panic.
    let unreachable = std::fs::read_to_string(&cfg).unwrap().replacen(
        &format!("port={}", c.node("a").pg.port()),
        "port=1",
        1,
    );
    std::fs::write(&wrong_path, unreachable).unwrap();
    let (ok, out) = walsync(&["init", "--config", wrong_path.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("unreachable"), "{out}");

    // Settings missing: wal_level and track_commit_timestamp named with their fix.
    let mut plain =
        walsync_testkit::localpg::LocalCluster::start(&c.dir.join("plain"), "plain").unwrap();
    plain.psql("ALTER SYSTEM SET wal_level = replica").unwrap();
    plain
        .psql("ALTER SYSTEM SET track_commit_timestamp = off")
        .unwrap();
    plain.restart().unwrap();
    let text =
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replacen(&c.node("a").pg.dsn(), &plain.dsn(), 1);
    std::fs::write(&wrong_path, text).unwrap();
    let (ok, out) = walsync(&["init", "--config", wrong_path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("wal_level")
            && out.contains("track_commit_timestamp")
            && out.contains("restart"),
        "{out}"
    );
    assert_eq!(
        plain
            .psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'walsync'")
            .unwrap(),
        "0",
        "a refused init changes nothing"
    );
}

#[test]
fn wrong_password_and_bad_config_get_clear_errors() {
    let c = TestCluster::new("auth", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    let a = c.node("a");
    a.sql("CREATE ROLE sync LOGIN SUPERUSER PASSWORD 'right'");
    // Password authentication for TCP connections of role sync.
    let hba = a.pg.dir().join("data/pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all sync 127.0.0.1/32 scram-sha-256\n{text}"),
    )
    .unwrap();
    a.sql("SELECT pg_reload_conf()");
    let cfg = std::fs::read_to_string(&a.config).unwrap().replacen(
        "user=postgres",
        "user=sync password=wrong",
        1,
    );
    let path = c.dir.join("badpw.toml");
    std::fs::write(&path, &cfg).unwrap();
    let (ok, out) = walsync(&["init", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("password authentication failed"), "{out}");
    assert!(
        !out.contains("wrong"),
        "the password is never printed: {out}"
    );

    std::fs::write(&path, cfg.replace("[node]", "[node]\ncolour = \"blue\"")).unwrap();
    let (ok, out) = walsync(&["init", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("colour"), "{out}");
}

/// Peak resident set size of a process in KiB, from /proc/PID/status.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The documented bound (docs/benchmarks.md): stream buffer, in-flight requests and one
/// COPY run, whatever the size of the source transaction.
const SIDECAR_RSS_BOUND_KIB: u64 = 128 * 1024;

#[test]
fn a_large_transaction_applies_in_bounded_memory() {
    let mut c = TestCluster::new("bigtxn", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.node("a").sql(
        "INSERT INTO pos_order (id, name, note) SELECT g, 'Shop/' || g, jsonb_build_object('line', g) FROM generate_series(1, 500000) g",
    );
    c.start();
    c.wait_rows("b", "pos_order", 500000);
    let pid = c.node("b").sidecar.as_ref().unwrap().pid();
    let peak = peak_rss_kib(pid);
    eprintln!(
        "sidecar peak RSS after a 500,000-row transaction: {} MiB",
        peak / 1024
    );
    assert!(
        peak < SIDECAR_RSS_BOUND_KIB,
        "peak RSS {peak} KiB is over the bound {SIDECAR_RSS_BOUND_KIB} KiB"
    );
}

#[test]
fn run_on_a_node_that_was_never_initialised_says_so() {
    let dir = scratch_dir("not-init");
    let pg = walsync_testkit::localpg::LocalCluster::start(&dir.join("a"), "a").unwrap();
    let peer = walsync_testkit::localpg::LocalCluster::start(&dir.join("b"), "b").unwrap();
    let cfg = format!(
        "[cluster]\ntopology = \"mesh\"\n[node]\nname = \"a\"\nid = 1\ndsn = \"{}\"\n[[peers]]\nname = \"b\"\nid = 2\ndsn = \"{}\"\n",
        pg.dsn(),
        peer.dsn()
    );
    let path = dir.join("a.toml");
    std::fs::write(&path, cfg).unwrap();
    let (ok, out) = walsync(&["run", "--config", path.to_str().unwrap()]);
    assert!(!ok, "run must refuse: {out}");
    assert!(out.contains("run walsync init"), "{out}");
    drop((pg, peer));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_shows_links_and_what_needs_a_human() {
    let mut c = TestCluster::new(
        "status",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (name) VALUES ('x')");
    c.wait_rows("branch1", "partner", 1);
    let cfg = c.node("branch1").config.to_str().unwrap().to_string();
    wait_for(
        "branch1's status to show its link streaming",
        DEADLINE,
        || {
            walsync(&["status", "--config", &cfg])
                .1
                .contains("streaming")
        },
        || walsync(&["status", "--config", &cfg]).1,
    );
    let (ok, out) = walsync(&["status", "--config", &cfg]);
    assert!(ok, "{out}");
    assert!(
        out.contains("main->branch1") && out.contains("nothing needs attention"),
        "{out}"
    );
    assert!(out.contains("(0 not partitioned for this node)"), "{out}");

    // A DDL statement that fails on the target (an object of that name exists there,
    // made outside walsync): its transaction waits set aside, status says why and exits 1.
    c.node("branch1")
        .sql("SET session_replication_role = replica; CREATE TABLE clash (id int PRIMARY KEY)");
    c.node("main").sql("CREATE TABLE clash (id int PRIMARY KEY, note text); INSERT INTO clash VALUES (1, 'after the ddl')");
    wait_for(
        "status to need a person",
        DEADLINE,
        || !walsync(&["status", "--config", &cfg]).0,
        || walsync(&["status", "--config", &cfg]).1,
    );
    let (_, out) = walsync(&["status", "--config", &cfg]);
    assert!(
        out.contains("1 transaction(s) set aside, waiting for ddl main/")
            && out.contains("relation \"clash\" already exists"),
        "{out}"
    );
    // The operator removes the stray table: the statement runs at the next try, nothing
    // lost.
    c.node("branch1")
        .sql("SET session_replication_role = replica; DROP TABLE clash");
    c.wait_rows("branch1", "clash", 1);
    assert_eq!(
        c.node("branch1").sql("SELECT note FROM clash"),
        "after the ddl"
    );
    wait_for(
        "status to be clean again",
        DEADLINE,
        || walsync(&["status", "--config", &cfg]).0,
        || walsync(&["status", "--config", &cfg]).1,
    );
    let (_, out) = walsync(&["status", "--config", &cfg, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(report["links_in"][0]["state"], "streaming", "{out}");
}

/// Parallel apply (`[apply] sessions = 4`) of a seeded backlog where dependent and
/// independent transactions interleave: the same rows updated in consecutive
/// transactions, unique values moving between rows, rows deleted and inserted again
/// under the same key, and new rows nobody else touches. The sidecar is killed -9 while
/// it applies; the branch ends with exactly the source's rows, and its log shows the
/// transactions spread over more than one session. `WALSYNC_CHAOS_SEED` replays a run.
#[test]
fn a_backlog_applied_on_four_sessions_ends_as_the_source_even_through_a_kill9() {
    const SCHEMA: &str = "
        CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL);
        CREATE TABLE tag (id int PRIMARY KEY, code text UNIQUE);
        CREATE TABLE line (id int PRIMARY KEY, acct int NOT NULL, qty int NOT NULL);
        INSERT INTO acct SELECT g, 0 FROM generate_series(1, 20) g;
        INSERT INTO tag SELECT g, CASE WHEN g <= 5 THEN 'T' || g END FROM generate_series(1, 10) g;";
    const TXNS: usize = 3000;
    let seed = support::chaos::seed();
    let mut rng = support::chaos::Rng::new(seed);
    let mut c = TestCluster::new("parallel", Topology::Mesh, &["a", "b"], SCHEMA);
    c.node("b").set_apply_sessions(4);

    // The backlog, written on a while b's sidecar (which runs a->b) is down.
    c.node_mut("a").start_sidecar();
    let a = c.node("a");
    let mut sql = String::new();
    let mut lines: Vec<i32> = Vec::new();
    let mut deleted: Vec<i32> = Vec::new();
    let mut next_line = 1;
    // Tag codes: which tag row holds code k (1..=5); rows 6..=10 start without one.
    let mut holder: Vec<i32> = (1..=5).collect();
    for _ in 0..TXNS {
        sql.push_str("BEGIN;\n");
        for _ in 0..1 + rng.below(4) {
            match rng.below(6) {
                0 => sql.push_str(&format!(
                    "UPDATE acct SET balance = balance + {} WHERE id = {};\n",
                    1 + rng.below(9),
                    1 + rng.below(20)
                )),
                1 if !lines.is_empty() => {
                    let id = lines[rng.below(lines.len() as u64) as usize];
                    sql.push_str(&format!("UPDATE line SET qty = qty + 1 WHERE id = {id};\n"));
                }
                2 if !lines.is_empty() => {
                    let id = lines.swap_remove(rng.below(lines.len() as u64) as usize);
                    sql.push_str(&format!("DELETE FROM line WHERE id = {id};\n"));
                    deleted.push(id);
                }
                3 if !deleted.is_empty() => {
                    // The same key again, in a later transaction.
                    let id = deleted.swap_remove(rng.below(deleted.len() as u64) as usize);
                    sql.push_str(&format!(
                        "INSERT INTO line VALUES ({id}, {}, 7);\n",
                        1 + rng.below(20)
                    ));
                    lines.push(id);
                }
                4 => {
                    // A unique code moves to a row that has none.
                    let k = rng.below(5) as usize;
                    let free: Vec<i32> = (1..=10).filter(|r| !holder.contains(r)).collect();
                    let to = free[rng.below(free.len() as u64) as usize];
                    sql.push_str(&format!(
                        "UPDATE tag SET code = NULL WHERE id = {from};\n\
                         UPDATE tag SET code = 'T{code}' WHERE id = {to};\n",
                        from = holder[k],
                        code = k + 1
                    ));
                    holder[k] = to;
                }
                _ => {
                    sql.push_str(&format!(
                        "INSERT INTO line VALUES ({next_line}, {}, {});\n",
                        1 + rng.below(20),
                        1 + rng.below(5)
                    ));
                    lines.push(next_line);
                    next_line += 1;
                }
            }
        }
        sql.push_str("COMMIT;\n");
        if sql.len() > 64 * 1024 {
            a.sql(&std::mem::take(&mut sql));
        }
    }
    a.sql(&sql);

    // b catches up on four sessions, and is killed -9 on the way.
    c.node_mut("b").start_sidecar();
    let b = c.node("b");
    wait_for(
        "b to apply part of the backlog",
        DEADLINE,
        || b.applied_transactions() > 200,
        || c.logs(),
    );
    c.node_mut("b").kill_sidecar();
    let applied = c.node("b").applied_transactions();
    println!("b had applied {applied} of {TXNS} transactions when killed");
    c.node_mut("b").start_sidecar();
    for table in ["acct", "tag", "line"] {
        c.wait_converged(table);
    }
    // Only a wrote: a change applied out of order would have met a row it did not
    // expect, and been recorded as a conflict; a commit out of order, refused.
    assert_eq!(
        c.node("b").sql("SELECT count(*) FROM walsync.conflicts"),
        "0",
        "seed {seed}"
    );
    let log = c.node("b").sidecar_log();
    assert!(
        !log.contains("the transaction before it did not commit"),
        "a commit was refused for its order; seed {seed}"
    );
    let sessions_used = (0..4)
        .filter(|s| log.contains(&format!("apply_session={s} ")))
        .count();
    assert!(
        sessions_used > 1,
        "the backlog went to {sessions_used} session(s); seed {seed}"
    );
}
