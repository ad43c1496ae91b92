//! Ids that never collide and conflicts decided the same everywhere, on real servers.
//!
//! A "cut" here stops every sidecar (no link runs), both sides write, and "heal" starts
//! them again: the same backlog a WAN outage leaves.

mod support;

use support::*;

fn cut(c: &mut TestCluster) {
    for n in &mut c.nodes {
        n.stop_sidecar();
    }
}

fn heal(c: &mut TestCluster) {
    c.start();
}

fn conflicts(n: &Node, kind: &str) -> Vec<String> {
    let out = n.sql(&format!(
        "SELECT outcome || '|' || coalesce(local_row->>'name', '-') || '|' || coalesce(remote_row->>'name', '-') \
         FROM walsync.conflicts WHERE kind = '{kind}' ORDER BY id"
    ));
    out.lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn branches_cut_off_both_sell_and_every_row_arrives_without_collision() {
    let mut c = TestCluster::new(
        "bucardo",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.node("main")
        .sql("INSERT INTO product (name, price) VALUES ('Soap', 2.5), ('Tea', 4)");
    c.start();
    c.wait_converged("product");
    cut(&mut c);
    for b in ["branch1", "branch2"] {
        c.node(b).sql(&format!(
            "INSERT INTO partner (name) SELECT '{b} customer ' || g FROM generate_series(1, 20) g;
             INSERT INTO pos_order (name, partner_id, amount_total)
               SELECT '{b}/' || g, (SELECT min(id) FROM partner WHERE name LIKE '{b}%'), 10 FROM generate_series(1, 30) g;
             INSERT INTO pos_order_line (order_id, product_id, qty, price_unit)
               SELECT o.id, (SELECT min(id) FROM product), 2, 5 FROM pos_order o WHERE o.name LIKE '{b}/%';"
        ));
    }
    c.node("main").sql(
        "INSERT INTO partner (name) SELECT 'main customer ' || g FROM generate_series(1, 5) g",
    );
    heal(&mut c);
    for t in ["partner", "pos_order", "pos_order_line"] {
        c.wait_converged(t);
    }
    for n in &c.nodes {
        assert_eq!(n.count("partner"), 45, "{}", n.name);
        assert_eq!(n.count("pos_order"), 60, "{}", n.name);
        assert_eq!(n.count("pos_order_line"), 60, "{}", n.name);
        assert_eq!(
            n.count("walsync.conflicts"),
            0,
            "no conflict was needed on {}",
            n.name
        );
    }
    // Ids were handed out per node: main ≡ 1, branch1 ≡ 2, branch2 ≡ 3 (mod 16).
    assert_eq!(
        c.node("main").sql("SELECT string_agg(DISTINCT (id % 16)::text, ',' ORDER BY (id % 16)::text) FROM partner"),
        "1,2,3"
    );
}

#[test]
fn concurrent_updates_of_one_row_keep_the_latest_everywhere_and_record_the_other() {
    let mut c = TestCluster::new("lww", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (id, name, email) VALUES (1, 'Ana', 'ana@shop')");
    c.wait_rows("b", "partner", 1);
    cut(&mut c);
    c.node("a")
        .sql("UPDATE partner SET name = 'Ana from a' WHERE id = 1");
    c.node("b")
        .sql("UPDATE partner SET name = 'Ana from b' WHERE id = 1"); // later commit: wins
    heal(&mut c);
    c.wait_converged("partner");
    assert_eq!(
        c.node("a").sql("SELECT name FROM partner WHERE id = 1"),
        "Ana from b"
    );
    wait_for(
        "both nodes to record the conflict",
        DEADLINE,
        || {
            !conflicts(c.node("a"), "update_origin_differs").is_empty()
                && !conflicts(c.node("b"), "update_origin_differs").is_empty()
        },
        || c.logs(),
    );
    // a applied b's newer version and kept its own as the loser; b kept its version and
    // recorded a's as the loser: the full losing image is on both nodes.
    assert_eq!(
        conflicts(c.node("a"), "update_origin_differs"),
        ["remote_applied|Ana from a|Ana from b"]
    );
    assert_eq!(
        conflicts(c.node("b"), "update_origin_differs"),
        ["local_kept|Ana from b|Ana from a"]
    );
    let email = c.node("b").sql(
        "SELECT remote_row->>'email' FROM walsync.conflicts WHERE kind = 'update_origin_differs'",
    );
    assert_eq!(email, "ana@shop", "the recorded image is the whole row");
}

#[test]
fn an_edit_made_after_seeing_the_other_nodes_edit_is_no_conflict() {
    let mut c = TestCluster::new("sequential", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO product (id, name, price) VALUES (1, 'Soap', 2)");
    c.wait_rows("b", "product", 1);
    c.node("b").sql("UPDATE product SET price = 3 WHERE id = 1");
    wait_for(
        "a to see b's price",
        DEADLINE,
        || c.node("a").sql("SELECT price FROM product") == "3.00",
        || c.logs(),
    );
    c.node("a").sql("UPDATE product SET price = 4 WHERE id = 1");
    wait_for(
        "b to see a's price",
        DEADLINE,
        || c.node("b").sql("SELECT price FROM product") == "4.00",
        || c.logs(),
    );
    for n in &c.nodes {
        assert_eq!(
            n.count("walsync.conflicts"),
            0,
            "edits in sequence are not conflicts on {}",
            n.name
        );
    }
}

#[test]
fn the_same_explicit_id_inserted_on_two_nodes_keeps_the_latest_and_records_the_other() {
    let mut c = TestCluster::new("insert-exists", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    cut(&mut c);
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (500, 'from a')");
    c.node("b")
        .sql("INSERT INTO partner (id, name) VALUES (500, 'from b'), (501, 'only b')");
    heal(&mut c);
    c.wait_converged("partner");
    assert_eq!(
        c.node("a").sql("SELECT name FROM partner WHERE id = 500"),
        "from b"
    );
    assert_eq!(
        c.node("a").count("partner"),
        2,
        "the rest of b's transaction arrived too"
    );
    wait_for(
        "both nodes to record insert_exists",
        DEADLINE,
        || {
            !conflicts(c.node("a"), "insert_exists").is_empty()
                && !conflicts(c.node("b"), "insert_exists").is_empty()
        },
        || c.logs(),
    );
    assert_eq!(
        conflicts(c.node("a"), "insert_exists"),
        ["remote_applied|from a|from b"]
    );
    assert_eq!(
        conflicts(c.node("b"), "insert_exists"),
        ["local_kept|from b|from a"]
    );
}

#[test]
fn delete_against_update_and_delete_against_delete_converge() {
    let mut c = TestCluster::new("deletes", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (1, 'one'), (2, 'two')");
    c.wait_rows("b", "partner", 2);
    cut(&mut c);
    c.node("a").sql("DELETE FROM partner WHERE id = 1");
    c.node("b")
        .sql("UPDATE partner SET name = 'one, edited' WHERE id = 1"); // later, still loses to the delete
    c.node("a").sql("DELETE FROM partner WHERE id = 2");
    c.node("b").sql("DELETE FROM partner WHERE id = 2");
    heal(&mut c);
    wait_for(
        "both deletes to settle",
        DEADLINE,
        || c.node("a").count("partner") == 0 && c.node("b").count("partner") == 0,
        || c.logs(),
    );
    wait_for(
        "the conflicts to be recorded",
        DEADLINE,
        || {
            c.node("b").count("walsync.conflicts") >= 2
                && c.node("a").count("walsync.conflicts") >= 2
        },
        || c.logs(),
    );
    assert_eq!(
        conflicts(c.node("a"), "update_missing"),
        ["skipped|-|one, edited"]
    );
    assert_eq!(
        conflicts(c.node("b"), "delete_origin_differs"),
        ["remote_applied|one, edited|one"]
    );
    assert_eq!(conflicts(c.node("a"), "delete_missing").len(), 1);
    assert_eq!(conflicts(c.node("b"), "delete_missing").len(), 1);

    // The losing edit can be brought back by hand, and it then replicates.
    let id = c
        .node("a")
        .sql("SELECT id FROM walsync.conflicts WHERE kind = 'update_missing'");
    let cfg = c.node("a").config.to_str().unwrap().to_string();
    let (ok, out) = walsync(&["conflicts", "--config", &cfg, "reapply", &id]);
    assert!(ok, "{out}");
    c.wait_rows("b", "partner", 1);
    assert_eq!(c.node("b").sql("SELECT name FROM partner"), "one, edited");
    let (ok, out) = walsync(&["conflicts", "--config", &cfg, "--json"]);
    assert!(ok, "{out}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|c| c["reapplied_at"].is_string()),
        "{out}"
    );
}

#[test]
fn a_counter_changed_on_every_node_during_a_cut_ends_with_the_sum_of_the_changes() {
    let policy = "[[tables]]\nname = \"public.product\"\ncounters = [\"qty_available\"]\n";
    let mut c = TestCluster::new_with(
        "counters",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
        policy,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO product (id, name, price, qty_available) VALUES (1, 'Soap', 2, 100)");
    c.wait_converged("product");
    cut(&mut c);
    c.node("branch1")
        .sql("UPDATE product SET qty_available = qty_available - 3 WHERE id = 1");
    c.node("branch2")
        .sql("UPDATE product SET qty_available = qty_available - 5 WHERE id = 1");
    c.node("branch2")
        .sql("UPDATE product SET qty_available = qty_available - 1 WHERE id = 1");
    c.node("main")
        .sql("UPDATE product SET qty_available = qty_available + 10 WHERE id = 1");
    c.node("main")
        .sql("UPDATE product SET price = 3 WHERE id = 1");
    heal(&mut c);
    for n in ["main", "branch1", "branch2"] {
        let node = c.node(n);
        wait_for(
            &format!("{n} to hold 100 - 3 - 5 - 1 + 10"),
            DEADLINE,
            || node.sql("SELECT qty_available FROM product WHERE id = 1") == "101",
            || {
                format!(
                    "{n}: {}\n{}",
                    node.sql("SELECT qty_available FROM product"),
                    c.logs()
                )
            },
        );
    }
    c.wait_converged("product");
    assert_eq!(
        c.node("branch2")
            .sql("SELECT price FROM product WHERE id = 1"),
        "3.00"
    );
    for n in &c.nodes {
        assert_eq!(
            n.count("walsync.conflicts"),
            0,
            "stock moves are not conflicts on {}",
            n.name
        );
    }
}

#[test]
fn a_sequence_created_after_init_is_partitioned_by_the_running_sidecar() {
    let mut c = TestCluster::new("new-seq", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    // A module install on a: a new table with a serial id, and a sequence the application
    // creates and restarts itself (as Odoo does with ir_sequence_NNN). The DDL reaches b.
    c.node("a").sql(
        "CREATE TABLE loyalty_card (id serial PRIMARY KEY, code text); \
         CREATE SEQUENCE ir_sequence_026; ALTER SEQUENCE ir_sequence_026 RESTART WITH 500",
    );
    for n in ["a", "b"] {
        let node = c.node(n);
        wait_for(
            &format!("the new sequences on {n} to be partitioned"),
            DEADLINE,
            || {
                node.sql(
                    "SELECT count(*) FROM pg_sequences WHERE sequencename IN ('loyalty_card_id_seq', 'ir_sequence_026') \
                     AND increment_by = 16",
                ) == "2"
            },
            || c.logs(),
        );
    }
    c.node("a")
        .sql("INSERT INTO loyalty_card (code) SELECT 'a' || g FROM generate_series(1, 20) g");
    c.node("b")
        .sql("INSERT INTO loyalty_card (code) SELECT 'b' || g FROM generate_series(1, 20) g");
    c.wait_rows("a", "loyalty_card", 40);
    c.wait_converged("loyalty_card");
    assert_eq!(
        c.node("a").sql("SELECT nextval('ir_sequence_026') % 16"),
        "1"
    );
    assert_eq!(
        c.node("b").sql("SELECT nextval('ir_sequence_026') % 16"),
        "2"
    );
    assert!(
        c.node("a")
            .sql("SELECT nextval('ir_sequence_026')")
            .parse::<i64>()
            .unwrap()
            > 500
    );
    assert_eq!(
        c.node("a")
            .sql("SELECT relreplident FROM pg_class WHERE relname = 'loyalty_card'"),
        "f",
        "new tables get REPLICA IDENTITY FULL too"
    );
}
