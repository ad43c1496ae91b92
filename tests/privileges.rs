//! A cluster whose sidecars connect with no superuser: `init --grant-to` gives the
//! sidecar's role what it needs and says so, and `run` names a missing right.

mod support;

use support::*;
use walsync_testkit::localpg::LocalCluster;

#[test]
fn a_cluster_runs_with_no_superuser_in_the_sidecars_dsns() {
    // The tables belong to an application role, as Odoo's belong to odoo.
    let prepare = |pg: &LocalCluster| owned_by_shop(pg, RETAIL_SCHEMA);
    let mut c = TestCluster::new_in(
        "least-privilege",
        Topology::Mesh,
        &["a", "b"],
        "postgres",
        &prepare,
        "",
    );
    // init ran as a superuser; it grants the sidecar's role its rights and prints them.
    for out in c.run_as_walsync() {
        assert!(
            out.contains("GRANT SET ON PARAMETER session_replication_role TO \"walsync\"")
                && out.contains("GRANT \"shop\" TO \"walsync\""),
            "{out}"
        );
    }
    // A right missing: the sidecar refuses to start and names it with its GRANT.
    c.node("a")
        .sql("REVOKE SET ON PARAMETER session_replication_role FROM walsync");
    let (ok, out) = walsync(&["run", "--config", c.node("a").config.to_str().unwrap()]);
    assert!(
        !ok && out.contains("GRANT SET ON PARAMETER session_replication_role TO \"walsync\""),
        "{out}"
    );
    c.node("a")
        .sql("GRANT SET ON PARAMETER session_replication_role TO walsync");

    // The sidecar's role may run init again on a node already set up (a container's
    // entrypoint does at every start), but not set one up: nothing is changed then.
    let (ok, out) = walsync(&["init", "--config", c.node("a").config.to_str().unwrap()]);
    assert!(ok, "{out}");
    c.node("a").sql("CREATE DATABASE fresh");
    let fresh = c.dir.join("a-fresh.toml");
    std::fs::write(
        &fresh,
        std::fs::read_to_string(&c.node("a").config)
            .unwrap()
            .replacen("dbname=postgres", "dbname=fresh", 1),
    )
    .unwrap();
    // The origin functions' rights are per database: given there, only the superuser's
    // part of the setup is left.
    c.node("a")
        .pg
        .psql_in(
            "fresh",
            "GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text), \
             pg_replication_origin_session_reset(), \
             pg_replication_origin_xact_setup(pg_lsn, timestamptz), pg_replication_origin_create(text) TO walsync",
        )
        .unwrap();
    let (ok, out) = walsync(&["init", "--config", fresh.to_str().unwrap()]);
    assert!(!ok && out.contains("needs a superuser once"), "{out}");
    assert_eq!(
        c.node("a")
            .pg
            .psql_in(
                "fresh",
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'walsync'"
            )
            .unwrap(),
        "0",
        "a refused init changes nothing"
    );

    c.start();
    c.node("a")
        .sql("SET SESSION AUTHORIZATION shop; INSERT INTO partner (name) VALUES ('sold at a')");
    c.node("b")
        .sql("SET SESSION AUTHORIZATION shop; INSERT INTO partner (name) VALUES ('sold at b')");
    c.wait_rows("a", "partner", 2);
    c.wait_rows("b", "partner", 2);
    // DDL by the application's role replays as that role.
    c.node("a").sql(
        "SET SESSION AUTHORIZATION shop; ALTER TABLE partner ADD COLUMN loyalty integer; \
         UPDATE partner SET loyalty = 1",
    );
    c.wait_converged("partner");
    assert_eq!(
        c.node("b")
            .sql("SELECT count(*) FROM partner WHERE loyalty = 1"),
        "2"
    );
    c.assert_sessions_are_walsyncs();
    for n in &c.nodes {
        let (ok, out) = n.walsync(&["status"]);
        assert!(ok, "{out}");
    }
}

/// A store's rows reach main only for the tables its `writes` scope names: a price it
/// changed, a product it made and one it deleted are recorded on main and
/// not applied, in the same transactions as its sales, which do arrive; every link goes on.
#[test]
fn a_stores_rows_outside_its_write_scope_are_recorded_on_main_not_applied() {
    let mut c = TestCluster::new(
        "write-scope",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.set_peer_option(
        "main",
        "branch1",
        "writes = [\"pos_*\", \"public.partner\"]",
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO product (name, price) VALUES ('tea', 3.50), ('cake', 4.00)");
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "product", 2);
    }
    c.node("branch1").sql(
        "BEGIN; \
         INSERT INTO partner (name) VALUES ('walk-in'); \
         INSERT INTO pos_order (name, partner_id, amount_total) \
           SELECT 'B1/0001', id, 3.50 FROM partner WHERE name = 'walk-in'; \
         INSERT INTO pos_order_line (order_id, product_id, qty, price_unit) \
           SELECT o.id, p.id, 1, 3.50 FROM pos_order o, product p WHERE o.name = 'B1/0001' AND p.name = 'tea'; \
         UPDATE product SET price = 0.01 WHERE name = 'cake'; \
         INSERT INTO product (name, price) VALUES ('free lunch', 0); \
         COMMIT",
    );
    for n in ["main", "branch2"] {
        c.wait_rows(n, "pos_order_line", 1);
        c.wait_rows(n, "partner WHERE name = 'walk-in'", 1);
    }
    c.wait_rows("main", "walsync.conflicts WHERE kind = 'out_of_scope'", 2);
    c.node("branch1")
        .sql("DELETE FROM product WHERE name = 'cake'");
    c.wait_rows("main", "walsync.conflicts WHERE kind = 'out_of_scope'", 3);
    // The store's sales go on arriving after everything it sent out of scope.
    c.node("branch1")
        .sql("INSERT INTO pos_order (name, amount_total) VALUES ('B1/0002', 4.00)");
    for n in ["main", "branch2"] {
        c.wait_rows(n, "pos_order WHERE name = 'B1/0002'", 1);
        let node = c.node(n);
        assert_eq!(
            node.sql("SELECT string_agg(name || ' ' || price, ', ' ORDER BY name) FROM product"),
            "cake 4.00, tea 3.50",
            "{n}: the catalogue is main's"
        );
    }
    // main -> branch1 and main <-> branch2 go on.
    c.node("main")
        .sql("INSERT INTO product (name, price) VALUES ('scone', 2.50)");
    c.node("branch2")
        .sql("INSERT INTO partner (name) VALUES ('from branch2')");
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "product WHERE name = 'scone'", 1);
        c.wait_rows(n, "partner WHERE name = 'from branch2'", 1);
    }
    assert_eq!(
        c.node("branch2").count("walsync.conflicts"),
        0,
        "branch2 never saw the store's out-of-scope rows"
    );
    let main = c.node("main");
    assert_eq!(
        main.sql(
            "SELECT string_agg(remote_row->>'name', ', ' ORDER BY id) \
             FROM walsync.conflicts WHERE kind = 'out_of_scope' AND rule = 'write_scope'"
        ),
        "cake, free lunch, cake"
    );
    let (ok, list) = main.walsync(&["conflicts"]);
    assert!(ok && list.matches("out_of_scope").count() == 3, "{list}");
    let id = main.sql("SELECT min(id) FROM walsync.conflicts");
    let cfg = main.config.to_str().unwrap();
    let (ok, shown) = walsync(&["conflicts", "--config", cfg, "show", &id]);
    assert!(
        ok && shown
            .contains("UPDATE on public.product by branch1, which may not write that on this node"),
        "{shown}"
    );
    // A person on main who wants the store's product and its delete writes them again:
    // they replicate as main's edits.
    for kind in ["INSERT", "DELETE"] {
        let id = main.sql(&format!(
            "SELECT id FROM walsync.conflicts WHERE kind = 'out_of_scope' AND detail LIKE '{kind} %'"
        ));
        let (ok, out) = walsync(&["conflicts", "--config", cfg, "reapply", &id]);
        assert!(ok, "{out}");
    }
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "product WHERE name = 'free lunch'", 1);
        c.wait_rows(n, "product WHERE name IN ('tea', 'scone', 'free lunch')", 3);
        c.wait_rows(n, "product", 3);
    }
}
