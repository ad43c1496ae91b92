//! Spooling for a peer that is away (docs/decisions/0006), against real servers.
//!
//! Scenario: a_branch_away_is_spooled_on_main_its_wal_released_and_replayed_on_return
//!   1. branch1's sidecar stops (its link from main with it); main keeps selling and
//!      branch1 too (branch1's changes still reach main: main's sidecar pulls them);
//!   2. main's sidecar spools the slot of the absent link into segments and the slot lets
//!      its WAL go: what main retains for branch1 stays far below what main wrote;
//!   3. main's sidecar is killed mid-spool and restarted: spooling resumes;
//!   4. branch1's sidecar comes back: it takes the slot over, replays the segments,
//!      deletes them, and streams live; every table ends identical.

mod support;

use support::*;

/// Spool early and in small segments, so that a test-sized outage exercises it.
const SPOOL: &str = "[spool]\nafter_bytes = 262144\nafter_s = 3600\nsegment_bytes = 65536\n";

fn retained_for_branch1(main: &Node) -> i64 {
    main.sql(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
         FROM pg_replication_slots WHERE slot_name = 'walsync_to_branch1'",
    )
    .parse()
    .unwrap()
}

fn orders(node: &Node, from: i64, to: i64, tag: &str) {
    node.sql(&format!(
        "DO $$ BEGIN FOR g IN {from}..{to} LOOP \
           INSERT INTO partner (name, email) VALUES ('{tag} ' || g, repeat('x', 100)); \
           INSERT INTO pos_order (name, amount_total) VALUES ('{tag}/' || g, g); \
           COMMIT; \
         END LOOP; END $$"
    ));
}

#[test]
fn a_branch_away_is_spooled_on_main_its_wal_released_and_replayed_on_return() {
    let mut c = TestCluster::new_with(
        "spool",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
        SPOOL,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO product (name, price) VALUES ('coffee', 2)");
    c.wait_rows("branch1", "product", 1);

    // 1. branch1's sidecar goes away; both nodes keep selling.
    c.node_mut("branch1").stop_sidecar();
    let main = c.node("main");
    let lsn_at_cut = main.sql("SELECT pg_current_wal_lsn()::text");
    orders(main, 1, 2000, "main");
    orders(c.node("branch1"), 1, 200, "branch1");

    // 2. main spools the absent link's slot; the slot releases its WAL.
    wait_for(
        "main to spool branch1's slot",
        DEADLINE,
        || {
            main.sql(
                "SELECT count(*) FROM walsync.spool_segments WHERE slot = 'walsync_to_branch1'",
            ) != "0"
        },
        || main.sidecar_log(),
    );
    // 3. A kill mid-spool: the new sidecar spools on from the last segment. An import
    //    of 20,000 rows in one transaction makes a segment of several chunks.
    c.node_mut("main").kill_sidecar();
    c.node_mut("main").start_sidecar();
    let main = c.node("main");
    orders(main, 2001, 4000, "main");
    main.sql(
        "INSERT INTO partner (name, email) SELECT 'imported ' || g, repeat('i', 100) \
         FROM generate_series(1, 20000) g",
    );
    let written: i64 = main
        .sql(&format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn_at_cut}')::int8"
        ))
        .parse()
        .unwrap();
    wait_for(
        "the slot to retain a small part of what main wrote since branch1 left",
        DEADLINE,
        || retained_for_branch1(main) < written / 4,
        || {
            format!(
                "retained {} of {written} bytes written; segments: {}\n{}",
                retained_for_branch1(main),
                main.sql("SELECT count(*) || ' segments, ' || coalesce(sum(bytes), 0) || ' bytes' FROM walsync.spool_segments"),
                main.sidecar_log()
            )
        },
    );
    assert!(
        main.sidecar_log()
            .contains("spooling: the slot's peer is away"),
        "main's sidecar says it spools"
    );
    let (_, status) = main.walsync(&["status"]);
    assert!(
        status.contains("spooled for its peer:") && status.contains("walsync_to_branch1"),
        "status shows the spool:\n{status}"
    );

    // 4. branch1 returns: replay, then live.
    c.node_mut("branch1").start_sidecar();
    for t in ["partner", "pos_order", "product"] {
        c.wait_converged(t);
    }
    assert_eq!(c.node("branch1").count("pos_order"), 4000 + 200);
    wait_for(
        "the replayed segments to be deleted",
        DEADLINE,
        || {
            c.node("main")
                .sql("SELECT count(*) FROM walsync.spool_segments")
                == "0"
        },
        || c.logs(),
    );
    // No large object is left behind.
    assert_eq!(
        c.node("main")
            .sql("SELECT count(*) FROM pg_largeobject_metadata"),
        "0"
    );
    assert!(c
        .node("branch1")
        .sidecar_log()
        .contains("replaying what was spooled"));
    // The spooler was still running when branch1 came back: it handed the slot over.
    assert!(c
        .node("branch1")
        .sidecar_log()
        .contains("waiting for it to hand over"));
    assert!(c
        .node("main")
        .sidecar_log()
        .contains("handing the slot over"));
    c.node("main")
        .sql("INSERT INTO product (name, price) VALUES ('tea', 3)");
    c.wait_rows("branch1", "product", 2);
}

/// A damaged segment stops the link before the damaged transactions, naming the segment
/// and what to do; nothing after it is applied.
#[test]
fn a_damaged_spool_segment_stops_the_link_with_an_error_naming_it() {
    let mut c = TestCluster::new_with(
        "spool_damaged",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
        SPOOL,
    );
    c.start();
    c.node_mut("branch1").stop_sidecar();
    let main = c.node("main");
    orders(main, 1, 2000, "main");
    wait_for(
        "main to spool branch1's slot",
        DEADLINE,
        || main.sql("SELECT count(*) FROM walsync.spool_segments") != "0",
        || main.sidecar_log(),
    );
    // One byte of the first (compressed) segment flipped, as a failing disk would.
    main.sql(
        "SELECT lo_put(data, 40, decode(lpad(to_hex(get_byte(lo_get(data, 40, 1), 0) # 1), 2, '0'), 'hex')) \
         FROM (SELECT data FROM walsync.spool_segments ORDER BY end_lsn LIMIT 1) s",
    );
    c.node_mut("branch1").start_sidecar();
    let branch1 = c.node("branch1");
    wait_for(
        "branch1's link to stop on the damaged segment",
        DEADLINE,
        || {
            let (ok, text) = branch1.walsync(&["status"]);
            !ok && text.contains("stopped") && text.contains("spool segment")
        },
        || branch1.walsync(&["status"]).1,
    );
    let (_, text) = branch1.walsync(&["status"]);
    assert!(
        text.contains("spool segment") && text.contains("walsync join"),
        "the error names the segment and the way out:\n{text}"
    );
    assert_eq!(
        branch1.count("pos_order"),
        0,
        "nothing after the damage is applied"
    );
}
