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
