//! Ids that never collide and conflicts decided the same everywhere, on real servers.
//!
//! A "cut" here stops every sidecar (no link runs), both sides write, and "heal" starts
//! them again: the same backlog a WAN outage leaves.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::*;

fn cut(c: &mut TestCluster) {
    c.stop();
}

fn heal(c: &mut TestCluster) {
    c.start();
}

/// An integer key as a renamed value spells it: digits as letters (0 -> a ... 9 -> j).
fn spelled(key: &str) -> String {
    key.chars()
        .map(|c| match c.to_digit(10) {
            Some(d) => char::from(b'a' + d as u8),
            None => c,
        })
        .collect()
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
    // A row with a boolean: compared in the walsender's text form ('t', not 'true').
    c.node("a")
        .sql("INSERT INTO partner (id, name, active) VALUES (1, 'Ana', true)");
    c.wait_rows("b", "product", 1);
    c.wait_rows("b", "partner", 1);
    c.node("b").sql("UPDATE product SET price = 3 WHERE id = 1");
    c.node("b")
        .sql("UPDATE partner SET name = 'Ana B' WHERE id = 1");
    wait_for(
        "a to see b's edits",
        DEADLINE,
        || {
            c.node("a").sql("SELECT price FROM product") == "3.00"
                && c.node("a").sql("SELECT name FROM partner") == "Ana B"
        },
        || c.logs(),
    );
    c.node("a").sql("UPDATE product SET price = 4 WHERE id = 1");
    c.node("a")
        .sql("UPDATE partner SET name = 'Ana A' WHERE id = 1");
    wait_for(
        "b to see a's edits",
        DEADLINE,
        || {
            c.node("b").sql("SELECT price FROM product") == "4.00"
                && c.node("b").sql("SELECT name FROM partner") == "Ana A"
        },
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
    // Each edit was made on the row the other node holds, so it applied on the fast path:
    // no transaction had to be decided again row by row.
    c.assert_no_careful_pass("an edit in sequence");
}

/// A change whose old image equals the local row was not necessarily made on it: here a
/// edited the row away and back (A-B-A) after b's edit, which was made on a's first
/// version. b's edit committed before a's last one, so it is a conflict a wins, decided
/// and recorded (the fast path's guard compares commit times, not only values), and both
/// nodes end with a's row.
#[test]
fn an_older_edit_made_on_values_a_node_wrote_again_later_is_a_conflict() {
    let mut c = TestCluster::new("aba", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (1, 'Ana')");
    c.wait_rows("b", "partner", 1);
    cut(&mut c);
    c.node("b")
        .sql("UPDATE partner SET name = 'Ana from b' WHERE id = 1");
    c.node("a")
        .sql("UPDATE partner SET name = 'Ana away' WHERE id = 1");
    c.node("a")
        .sql("UPDATE partner SET name = 'Ana' WHERE id = 1"); // latest: wins
    heal(&mut c);
    c.wait_converged("partner");
    assert_eq!(
        c.node("b").sql("SELECT name FROM partner WHERE id = 1"),
        "Ana"
    );
    wait_for(
        "a to record b's older edit",
        DEADLINE,
        || !conflicts(c.node("a"), "update_origin_differs").is_empty(),
        || c.logs(),
    );
    assert_eq!(
        conflicts(c.node("a"), "update_origin_differs"),
        ["local_kept|Ana|Ana from b"]
    );
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

/// One point-of-sale sale: an order, two lines, the order's total written back and the
/// stock of two products counted down, in one transaction.
fn sale(order: i32, products: [i32; 2]) -> String {
    let [p, q] = products;
    format!(
        "BEGIN;
         INSERT INTO pos_order (id, name, amount_total) VALUES ({order}, 'Order {order}', 0);
         INSERT INTO pos_order_line (id, order_id, product_id, qty, price_unit)
           VALUES ({order}1, {order}, {p}, 1, 2), ({order}2, {order}, {q}, 1, 4);
         UPDATE pos_order SET amount_total = 6 WHERE id = {order};
         UPDATE product SET qty_available = qty_available - 1 WHERE id IN ({p}, {q});
         COMMIT;"
    )
}

/// Small transactions of several tables go to the target in one statement each on one
/// apply session (decision 0013), and a conflict inside one, an insert meeting a key or
/// an update meeting a changed row, is still decided and recorded, the same on both
/// nodes.
#[test]
fn sales_go_in_one_statement_each_and_their_conflicts_are_still_settled() {
    let mut c = TestCluster::new("one-statement", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    // Parallel apply holds no transaction back (decision 0013).
    for n in ["a", "b"] {
        c.node_mut(n).one_apply_session();
    }
    c.start();
    c.node("a").sql(
        "INSERT INTO product (id, name, price, qty_available) SELECT g, 'P' || g, 1, 100 FROM generate_series(1, 5) g",
    );
    c.wait_rows("b", "product", 5);
    let sales: String = (1..=10).map(|o| sale(o, [1, 3])).collect();
    c.node("a").sql(&sales);
    for table in ["pos_order", "pos_order_line", "product"] {
        c.wait_converged(table);
    }
    // Each order's total, written right after its insert, arrived with it.
    assert_eq!(
        c.node("b")
            .sql("SELECT count(*) FROM pos_order WHERE amount_total = 6"),
        "10"
    );
    assert_eq!(
        c.node("b")
            .sql("SELECT string_agg(qty_available::text, ' ' ORDER BY id) FROM product"),
        "90 100 90 100 100"
    );
    let in_one_statement = || {
        c.node("b")
            .sidecar_log()
            .matches("sent in one statement")
            .count()
    };
    let sent = in_one_statement();
    assert!(
        sent > 0,
        "b applied no sale in one statement:\n{}",
        c.logs()
    );
    // Tables written in several runs of one transaction, each run on other rows, go in
    // one statement too; a row written by two runs makes it go the usual way.
    let interleaved = |o: i32| {
        format!(
            "BEGIN;
             INSERT INTO partner (id, name) VALUES ({o}, 'P{o}');
             INSERT INTO product (id, name, price) VALUES ({o}, 'P{o}', 1);
             INSERT INTO partner (id, name) VALUES ({o}1, 'P{o}1');
             UPDATE product SET qty_available = qty_available + 1 WHERE id = 2;
             INSERT INTO partner (id, name) VALUES ({o}2, 'P{o}2');
             UPDATE product SET qty_available = qty_available + 1 WHERE id = 4;
             COMMIT;
             BEGIN;
             UPDATE product SET price = price + 1 WHERE id = 5;
             INSERT INTO partner (id, name) VALUES ({o}3, 'P{o}3');
             UPDATE product SET price = price + 1 WHERE id = 5;
             COMMIT;"
        )
    };
    c.node("a").sql(&(interleaved(100) + &interleaved(200)));
    for table in ["partner", "product"] {
        c.wait_converged(table);
    }
    assert_eq!(
        c.node("b")
            .sql("SELECT string_agg(id || ':' || qty_available || ':' || price, ' ' ORDER BY id) FROM product WHERE id < 6"),
        "1:90:1.00 2:102:1.00 3:90:1.00 4:102:1.00 5:100:5.00"
    );
    assert!(
        in_one_statement() > sent,
        "the interleaved transaction did not go in one statement:\n{}",
        c.logs()
    );
    c.assert_no_careful_pass("sales without a conflict");

    cut(&mut c);
    // a -> b: the second sale's order meets b's own order 12 (b's is later: it wins).
    c.node("a").sql(&(sale(11, [1, 3]) + &sale(12, [1, 3])));
    // b -> a: the second sale counts down a product a changes meanwhile.
    c.node("b").sql(&(sale(21, [4, 2]) + &sale(22, [4, 5])));
    c.node("b")
        .sql("INSERT INTO pos_order (id, name, amount_total) VALUES (12, 'Order 12 from b', 1)");
    c.node("a").sql("UPDATE product SET price = 9 WHERE id = 5");
    heal(&mut c);
    for table in ["pos_order", "pos_order_line", "product"] {
        c.wait_converged(table);
    }
    assert_eq!(
        c.node("a").sql("SELECT name FROM pos_order WHERE id = 12"),
        "Order 12 from b",
        "the later insert of order 12 wins"
    );
    wait_for(
        "both conflicts recorded",
        DEADLINE,
        || {
            !conflicts(c.node("b"), "insert_exists").is_empty()
                && c.node("a")
                    .sql("SELECT count(*) FROM walsync.conflicts WHERE table_name = 'product'")
                    != "0"
        },
        || c.logs(),
    );
    assert_eq!(
        conflicts(c.node("b"), "insert_exists"),
        ["local_kept|Order 12 from b|Order 12"]
    );
    // The second sale of each side was sent in one statement (the first, of a shape not
    // seen yet since the restart, the usual way), met its conflict there, and was
    // applied again carefully.
    for n in ["a", "b"] {
        let log = c.node(n).sidecar_log();
        let after_heal = &log[log.rfind("sidecar starting").unwrap_or(0)..];
        assert!(
            after_heal.contains("sent in one statement")
                && after_heal.contains("applied carefully"),
            "{n}:\n{}",
            c.logs()
        );
    }
    assert_eq!(
        c.node("a").sql(
            "SELECT string_agg(id || ':' || qty_available, ' ' ORDER BY id) FROM product WHERE id < 5"
        ),
        "1:88 2:101 3:88 4:100",
        "every sale's stock count arrived"
    );
}

/// A delete and a concurrent update of one row are decided by their commit times, the
/// same on both nodes (decision 0016): a later update brings the row back where it was
/// deleted, a later delete stays. Two deletes of one row meet as nothing to do.
#[test]
fn delete_against_update_by_time_and_delete_against_delete_converge() {
    let mut c = TestCluster::new("deletes", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (1, 'one'), (2, 'two'), (3, 'three')");
    c.wait_rows("b", "partner", 3);
    cut(&mut c);
    c.node("a").sql("DELETE FROM partner WHERE id = 1");
    c.node("b")
        .sql("UPDATE partner SET name = 'one, edited' WHERE id = 1"); // later: wins
    c.node("b")
        .sql("UPDATE partner SET name = 'three, edited' WHERE id = 3");
    c.node("a").sql("DELETE FROM partner WHERE id = 3"); // later: wins
    c.node("a").sql("DELETE FROM partner WHERE id = 2");
    c.node("b").sql("DELETE FROM partner WHERE id = 2");
    heal(&mut c);
    let names = |n: &str| {
        c.node(n)
            .sql("SELECT string_agg(id || ':' || name, ',' ORDER BY id) FROM partner")
    };
    wait_for(
        "the row updated last to be back on a, and the row deleted last gone from b",
        DEADLINE,
        || names("a") == "1:one, edited" && names("b") == "1:one, edited",
        || format!("a: {}, b: {}\n{}", names("a"), names("b"), c.logs()),
    );
    wait_for(
        "the conflicts to be recorded",
        DEADLINE,
        || {
            c.node("b").count("walsync.conflicts") >= 3
                && c.node("a").count("walsync.conflicts") >= 3
        },
        || c.logs(),
    );
    assert_eq!(
        conflicts(c.node("a"), "update_deleted"),
        ["remote_applied|-|one, edited", "skipped|-|three, edited"]
    );
    assert_eq!(
        conflicts(c.node("b"), "delete_origin_differs"),
        [
            "local_kept|one, edited|one",
            "remote_applied|three, edited|three"
        ]
    );
    assert_eq!(conflicts(c.node("a"), "delete_missing").len(), 1);
    assert_eq!(conflicts(c.node("b"), "delete_missing").len(), 1);

    // The losing edit can be brought back by hand, and it then replicates.
    let id = c.node("a").sql(
        "SELECT id FROM walsync.conflicts WHERE kind = 'update_deleted' AND outcome = 'skipped'",
    );
    let cfg = c.node("a").config.to_str().unwrap().to_string();
    let (ok, out) = walsync(&["conflicts", "--config", &cfg, "reapply", &id]);
    assert!(ok, "{out}");
    c.wait_rows("b", "partner", 2);
    assert_eq!(names("b"), "1:one, edited,3:three, edited");
    // Twice would write over whatever was edited since: refused.
    let (ok, out) = walsync(&["conflicts", "--config", &cfg, "reapply", &id]);
    assert!(!ok && out.contains("already"), "{out}");
    // A kind that does not exist is an error, not an empty list.
    let (ok, out) = walsync(&["conflicts", "--config", &cfg, "--kind", "bogus"]);
    assert!(!ok && out.contains("update_origin_differs"), "{out}");
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

const USERS: &str = "
CREATE TABLE res_users (id serial PRIMARY KEY, login varchar(64) NOT NULL UNIQUE, barcode text UNIQUE, name text);
CREATE TABLE sale (id serial PRIMARY KEY, user_id integer NOT NULL REFERENCES res_users(id), amount numeric NOT NULL);
";

#[test]
fn users_created_on_two_branches_with_the_same_login_both_stay_and_the_older_is_renamed() {
    let schema = format!("{RETAIL_SCHEMA}{USERS}");
    let mut c = TestCluster::new(
        "samelogin",
        Topology::Star,
        &["main", "branch1", "branch2"],
        &schema,
    );
    c.start();
    cut(&mut c);
    // branch1 first: alice (badge B1) and bob (badge B2), each selling.
    c.node("branch1").sql(
        "INSERT INTO res_users (login, barcode, name) VALUES ('alice', 'B1', 'Alice at 1'), ('bob', 'B2', 'Bob');
         INSERT INTO sale (user_id, amount) SELECT id, 10 FROM res_users;",
    );
    // branch2 later: another alice, with bob's badge: two unique keys meet at once.
    c.node("branch2").sql(
        "INSERT INTO res_users (login, barcode, name) VALUES ('alice', 'B2', 'Alice at 2');
         INSERT INTO sale (user_id, amount) SELECT id, 20 FROM res_users;",
    );
    heal(&mut c);
    for t in ["res_users", "sale"] {
        c.wait_converged(t);
    }
    let main = c.node("main");
    assert_eq!(main.count("res_users"), 3, "no user is thrown away");
    assert_eq!(main.count("sale"), 3, "every sale is there");
    assert_eq!(
        main.sql("SELECT count(*) FROM sale s JOIN res_users u ON u.id = s.user_id"),
        "3",
        "every sale still points at its user"
    );
    let id_of = |name: &str| main.sql(&format!("SELECT id FROM res_users WHERE name = '{name}'"));
    let (alice1, bob) = (spelled(&id_of("Alice at 1")), spelled(&id_of("Bob")));
    // The later writer keeps both values; each older row is renamed where it lost.
    assert_eq!(
        main.sql("SELECT login || '/' || barcode FROM res_users ORDER BY name"),
        format!("alice [conflict #{alice1}]/B1\nalice/B2\nbob/B2 [conflict #{bob}]")
    );
    // Every decision is on record, with the rule and what was renamed.
    let records = |n: &Node| {
        n.sql(
            "SELECT kind || '|' || rule || '|' || outcome || '|' || detail FROM walsync.conflicts \
             WHERE table_name = 'res_users' ORDER BY detail",
        )
    };
    wait_for(
        "main to record both collisions",
        DEADLINE,
        || records(c.node("main")).lines().count() == 2,
        || c.logs(),
    );
    let at_main = records(c.node("main"));
    assert!(
        at_main.contains("|last_writer_wins|")
            && at_main
                .contains("_renamed|unique key res_users_login_key: login = \"alice [conflict #"),
        "{at_main}"
    );
    assert!(
        at_main.contains("_renamed|unique key res_users_barcode_key: barcode = \"B2 [conflict #"),
        "{at_main}"
    );
}

#[test]
fn an_update_onto_a_login_another_node_just_created_is_settled_the_same_everywhere() {
    let schema = format!("{RETAIL_SCHEMA}{USERS}");
    let mut c = TestCluster::new("updexists", Topology::Mesh, &["a", "b"], &schema);
    c.start();
    c.node("a")
        .sql("INSERT INTO res_users (id, login, name) VALUES (1, 'bob', 'Bob')");
    c.wait_rows("b", "res_users", 1);
    cut(&mut c);
    c.node("a")
        .sql("UPDATE res_users SET login = 'carol' WHERE id = 1");
    c.node("b")
        .sql("INSERT INTO res_users (id, login, name) VALUES (2, 'carol', 'Carol')"); // later: wins
    heal(&mut c);
    c.wait_converged("res_users");
    assert_eq!(
        c.node("a")
            .sql("SELECT id || '=' || login FROM res_users ORDER BY id"),
        "1=carol [conflict #b]\n2=carol"
    );
    wait_for(
        "b to record update_exists",
        DEADLINE,
        || !conflicts(c.node("b"), "update_exists").is_empty(),
        || c.logs(),
    );
    assert_eq!(
        conflicts(c.node("b"), "update_exists"),
        ["remote_renamed|Carol|Bob"]
    );
}

#[test]
fn a_preferred_node_wins_its_conflicts_whatever_the_clock_says() {
    let policy = "[[tables]]\nname = \"product\"\nprefer = \"main\"\n";
    let mut c = TestCluster::new_with(
        "prefer",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
        policy,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO product (id, name, price) VALUES (1, 'Soap', 2)");
    c.wait_converged("product");
    cut(&mut c);
    c.node("main")
        .sql("UPDATE product SET price = 3 WHERE id = 1");
    c.node("branch1")
        .sql("UPDATE product SET price = 9 WHERE id = 1"); // later, but main is preferred
    heal(&mut c);
    c.wait_converged("product");
    assert_eq!(
        c.node("branch2")
            .sql("SELECT price FROM product WHERE id = 1"),
        "3.00"
    );
    wait_for(
        "branch1 to record the decision",
        DEADLINE,
        || {
            c.node("branch1")
                .sql("SELECT rule || '|' || outcome FROM walsync.conflicts")
                == "prefer_node|remote_applied"
        },
        || c.logs(),
    );
}

#[test]
fn column_merge_keeps_concurrent_edits_of_different_fields_of_one_record() {
    let policy = "[[tables]]\nname = \"partner\"\nmerge = \"columns\"\n";
    let mut c = TestCluster::new_with(
        "colmerge",
        Topology::Mesh,
        &["a", "b"],
        RETAIL_SCHEMA,
        policy,
    );
    c.start();
    c.node("a").sql(
        "INSERT INTO partner (id, name, email) VALUES (1, 'Ana', 'ana@shop'), (2, 'Bo', 'bo@shop')",
    );
    c.wait_rows("b", "partner", 2);
    cut(&mut c);
    c.node("a").sql(
        "UPDATE partner SET name = 'Ana Lima' WHERE id = 1; UPDATE partner SET email = 'bo@a' WHERE id = 2",
    );
    c.node("b").sql(
        "UPDATE partner SET email = 'ana@home' WHERE id = 1; UPDATE partner SET email = 'bo@b' WHERE id = 2",
    );
    heal(&mut c);
    c.wait_converged("partner");
    assert_eq!(
        c.node("a")
            .sql("SELECT name || ' ' || email FROM partner ORDER BY id"),
        "Ana Lima ana@home\nBo bo@b",
        "different fields both survive; the same field goes to the later writer"
    );
    wait_for(
        "the same-field edit to be recorded on both nodes",
        DEADLINE,
        || {
            c.nodes.iter().all(|n| {
                n.sql("SELECT count(*) FROM walsync.conflicts WHERE rule = 'column_merge' AND key->>'id' = '2'")
                    == "1"
            })
        },
        || c.logs(),
    );
    for n in &c.nodes {
        assert_eq!(
            n.sql("SELECT count(*) FROM walsync.conflicts WHERE key->>'id' = '1'"),
            "0",
            "edits of different fields are no conflict on {}",
            n.name
        );
    }
}

#[test]
fn a_sequence_is_partitioned_in_the_transaction_that_creates_or_restarts_it() {
    // No sidecar runs: only what walsync init installed in the database acts.
    let c = TestCluster::new("seq-at-once", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    let b = c.node("b"); // node id 2
    let ids = b.sql(
        "BEGIN;
         CREATE SEQUENCE ir_sequence_031;
         CREATE TABLE pos_config (id serial PRIMARY KEY, name text, code int GENERATED BY DEFAULT AS IDENTITY);
         INSERT INTO pos_config (name) VALUES ('Shop 1'), ('Shop 2');
         SELECT string_agg((id % 16)::text || '/' || (code % 16)::text, ',') FROM pos_config;
         SELECT nextval('ir_sequence_031') % 16;
         ALTER SEQUENCE ir_sequence_031 RESTART WITH 1000;
         SELECT nextval('ir_sequence_031') >= 1000 AND nextval('ir_sequence_031') % 16 = 2;
         ALTER SEQUENCE ir_sequence_031 INCREMENT BY 1;
         SELECT nextval('ir_sequence_031') % 16;
         COMMIT;",
    );
    assert_eq!(
        ids.lines()
            .filter(|l| !l.is_empty()
                && *l != "BEGIN"
                && *l != "COMMIT"
                && !l.starts_with("CREATE")
                && !l.starts_with("INSERT")
                && !l.starts_with("ALTER"))
            .collect::<Vec<_>>(),
        ["2/2,2/2", "2", "t", "2"],
        "{ids}"
    );
    assert_eq!(
        b.sql("SELECT relreplident FROM pg_class WHERE relname = 'pos_config'"),
        "f",
        "a new table gets REPLICA IDENTITY FULL at once too"
    );
    // The partition is this node's own business: it is not captured as DDL for the peers.
    assert_eq!(
        b.sql("SELECT count(*) FROM walsync.ddl_log WHERE query LIKE '%INCREMENT BY 16%'"),
        "0"
    );
}

#[test]
fn node_local_tables_and_columns_stay_on_each_node() {
    let schema = format!(
        "{RETAIL_SCHEMA}
         CREATE TABLE ir_cron (id serial PRIMARY KEY, name text NOT NULL, nextcall timestamp, lastcall timestamp);
         CREATE TABLE bus_bus (id serial PRIMARY KEY, message text);"
    );
    let policy = "[[tables]]\nname = \"ir_cron\"\nlocal_columns = [\"nextcall\", \"lastcall\"]\n\
                  [[tables]]\nname = \"bus_bus\"\nlocal = true\n";
    let mut c = TestCluster::new_with("local", Topology::Mesh, &["a", "b"], &schema, policy);
    c.start();
    c.node("a").sql(
        "INSERT INTO ir_cron (id, name, nextcall) VALUES (1, 'Mail queue', '2026-01-01 10:00')",
    );
    c.wait_converged("ir_cron");
    // Each node's scheduler runs the job on its own schedule; an edit of the job itself travels.
    c.node("a").sql(
        "UPDATE ir_cron SET nextcall = '2026-01-01 11:00', lastcall = '2026-01-01 10:00' WHERE id = 1;
         INSERT INTO bus_bus (message) VALUES ('a1'), ('a2'), ('a3')",
    );
    c.node("b").sql(
        "UPDATE ir_cron SET nextcall = '2026-01-01 10:30', lastcall = '2026-01-01 10:00' WHERE id = 1;
         INSERT INTO bus_bus (message) VALUES ('b1'), ('b2')",
    );
    c.node("a")
        .sql("UPDATE ir_cron SET name = 'Mail queue (every 5 min)' WHERE id = 1");
    // A marker written after everything else: once it arrives, so did the rest.
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (1, 'marker a')");
    c.node("b")
        .sql("INSERT INTO partner (id, name) VALUES (2, 'marker b')");
    c.wait_rows("a", "partner", 2);
    c.wait_rows("b", "partner", 2);
    wait_for(
        "the job's new name to reach b",
        DEADLINE,
        || c.node("b").sql("SELECT name FROM ir_cron") == "Mail queue (every 5 min)",
        || c.logs(),
    );
    assert_eq!(
        c.node("a").sql("SELECT nextcall FROM ir_cron"),
        "2026-01-01 11:00:00"
    );
    assert_eq!(
        c.node("b").sql("SELECT nextcall FROM ir_cron"),
        "2026-01-01 10:30:00"
    );
    assert_eq!(
        c.node("a")
            .sql("SELECT string_agg(message, ',' ORDER BY message) FROM bus_bus"),
        "a1,a2,a3"
    );
    assert_eq!(
        c.node("b")
            .sql("SELECT string_agg(message, ',' ORDER BY message) FROM bus_bus"),
        "b1,b2"
    );
    for n in &c.nodes {
        assert_eq!(n.count("walsync.conflicts"), 0, "{}", n.name);
    }
}

/// Odoo's shapes of unique index: a partial one (`account_move_unique_name`), one on an
/// expression (`ir_filters_name_model_uid_unique_action_index`), and a key with no text
/// column (`res_users_settings (user_id)`).
const INDEXES: &str = "
CREATE TABLE account_move (id serial PRIMARY KEY, name varchar NOT NULL DEFAULT '/', journal_id integer NOT NULL,
  state varchar NOT NULL DEFAULT 'draft', sequence_prefix varchar, sequence_number integer);
CREATE UNIQUE INDEX account_move_unique_name ON account_move (name, journal_id) WHERE state = 'posted' AND name <> '/';
CREATE TABLE ir_filters (id serial PRIMARY KEY, name varchar NOT NULL, user_id integer);
CREATE UNIQUE INDEX ir_filters_name_uid ON ir_filters (lower(name), COALESCE(user_id, -1));
CREATE TABLE res_users_settings (id serial PRIMARY KEY, user_id integer NOT NULL UNIQUE, lang varchar);
CREATE TABLE settings_tag (id serial PRIMARY KEY, setting_id integer NOT NULL REFERENCES res_users_settings (id),
  tag integer NOT NULL, UNIQUE (setting_id, tag));
";

#[test]
fn collisions_on_partial_and_expression_indexes_are_renamed_and_one_entity_twice_is_merged_without_stopping_a_link(
) {
    let schema = format!("{RETAIL_SCHEMA}{INDEXES}");
    let mut c = TestCluster::new(
        "partialidx",
        Topology::Star,
        &["main", "branch1", "branch2"],
        &schema,
    );
    c.start();
    // A setting of user 8 with a tag, made on branch2 and known everywhere.
    c.node("branch2").sql(
        "WITH s AS (INSERT INTO res_users_settings (user_id, lang) VALUES (8, 'branch2') RETURNING id) \
         INSERT INTO settings_tag (setting_id, tag) SELECT id, 1 FROM s",
    );
    for n in ["main", "branch1"] {
        c.wait_rows(n, "settings_tag", 1);
    }
    cut(&mut c);
    // Two stores close their sessions: each posts the next entry of the shared journal,
    // as Odoo does (a draft, then posted under the name computed from its own copy).
    for (n, filter) in [("branch1", "Big Sales"), ("branch2", "big sales")] {
        c.node(n)
            .sql("INSERT INTO account_move (journal_id) VALUES (1) RETURNING id");
        c.node(n).sql(
            "UPDATE account_move SET state = 'posted', name = 'POSS/2026/0001', \
               sequence_prefix = 'POSS/2026/', sequence_number = 1",
        );
        c.node(n).sql(&format!(
            "INSERT INTO ir_filters (name, user_id) VALUES ('{filter}', 5)"
        ));
    }
    // User 7's settings, with the same tag, made on branch1; on branch2 the settings of
    // user 8 are given to user 7: the same entity twice, each with its own tag row.
    c.node("branch1").sql(
        "WITH s AS (INSERT INTO res_users_settings (user_id, lang) VALUES (7, 'branch1') RETURNING id) \
         INSERT INTO settings_tag (setting_id, tag) SELECT id, 1 FROM s",
    );
    c.node("branch2")
        .sql("UPDATE res_users_settings SET user_id = 7 WHERE user_id = 8");
    // A draft with the default name is not in the partial index: no collision.
    c.node("main")
        .sql("INSERT INTO account_move (journal_id) VALUES (1)");
    heal(&mut c);
    for t in ["account_move", "ir_filters"] {
        c.wait_converged(t);
    }
    let main = c.node("main");
    assert_eq!(
        main.count("account_move"),
        3,
        "no journal entry is thrown away"
    );
    // branch2 posted later: its entry keeps the name; branch1's is renamed everywhere.
    let branch1_move = c
        .node("branch1")
        .sql("SELECT id FROM account_move WHERE state = 'posted' AND id % 16 = 2");
    assert_eq!(
        main.sql(
            "SELECT string_agg(name, ',' ORDER BY name) FROM account_move WHERE state = 'posted'"
        ),
        format!(
            "POSS/2026/0001,POSS/2026/0001 [conflict #{}]",
            spelled(&branch1_move)
        )
    );
    assert_eq!(
        main.sql("SELECT string_agg(DISTINCT sequence_prefix || sequence_number, ',') FROM account_move WHERE state = 'posted'"),
        "POSS/2026/1",
        "without an on_rename policy the renamed entry keeps its number"
    );
    assert_eq!(
        main.sql("SELECT count(*) FROM ir_filters WHERE name LIKE 'Big Sales [conflict #%'"),
        "1",
        "the older filter is renamed"
    );
    // The settings of user 7 on two stores are one entity: the row with the smaller key
    // (branch1's, the first id branch1 handed out) stays on every node, the tag rows that
    // became the same merge the same way, nothing points at the row merged away.
    for t in ["res_users_settings", "settings_tag"] {
        c.wait_converged(t);
    }
    let kept = c
        .node("branch1")
        .sql("SELECT min(id) FROM res_users_settings");
    for n in &c.nodes {
        assert_eq!(
            n.sql("SELECT string_agg(id || ':' || user_id || ':' || lang, ',') FROM res_users_settings"),
            format!("{kept}:7:branch1"),
            "{}: one settings row, the smaller key's",
            n.name
        );
        assert_eq!(
            n.sql("SELECT string_agg(setting_id || ':' || tag, ',') FROM settings_tag"),
            format!("{kept}:1"),
            "{}: one tag row, on the row that stayed",
            n.name
        );
        assert_eq!(
            n.sql(
                "SELECT count(*) FROM walsync.merged_keys WHERE table_name = 'res_users_settings'"
            ),
            "1",
            "{}: the merge is known here",
            n.name
        );
        assert_eq!(
            n.sql("SELECT count(*) FROM walsync.conflicts WHERE outcome = 'parked'"),
            "0"
        );
        let (_, status) = n.walsync(&["status"]);
        assert!(!status.contains("stopped"), "{}: {status}", n.name);
    }
}

/// The loser's own node changed the row's unique key before the other row reached it:
/// it never meets the collision itself. The node that decided the merge announces it to
/// every node, and that node merges its row away too.
#[test]
fn a_merge_reaches_the_node_that_moved_its_losing_row_away_from_the_key() {
    let schema = format!("{RETAIL_SCHEMA}{INDEXES}");
    let mut c = TestCluster::new(
        "announce",
        Topology::Star,
        &["main", "branch1", "branch2"],
        &schema,
    );
    c.start();
    cut(&mut c);
    // branch1 hands out the smaller first id: its row stays wherever the two meet.
    c.node("branch1").sql(
        "WITH s AS (INSERT INTO res_users_settings (user_id, lang) VALUES (7, 'branch1') RETURNING id) \
         INSERT INTO settings_tag (setting_id, tag) SELECT id, 1 FROM s",
    );
    c.node("branch2").sql(
        "WITH s AS (INSERT INTO res_users_settings (user_id, lang) VALUES (7, 'branch2') RETURNING id) \
         INSERT INTO settings_tag (setting_id, tag) SELECT id, 2 FROM s",
    );
    // Still cut off, branch2 gives its row another user: it will never collide there.
    c.node("branch2")
        .sql("UPDATE res_users_settings SET user_id = 9 WHERE user_id = 7");
    heal(&mut c);
    for t in ["res_users_settings", "settings_tag"] {
        c.wait_converged(t);
    }
    let kept = c
        .node("branch1")
        .sql("SELECT id FROM res_users_settings WHERE lang = 'branch1'");
    for n in &c.nodes {
        assert_eq!(
            n.sql("SELECT string_agg(id || ':' || user_id, ',') FROM res_users_settings"),
            format!("{kept}:7"),
            "{}: branch2's row was merged away on every node",
            n.name
        );
        assert_eq!(
            n.sql(
                "SELECT string_agg(setting_id || ':' || tag, ',' ORDER BY tag) FROM settings_tag"
            ),
            format!("{kept}:1,{kept}:2"),
            "{}: both tags point at the row that stayed",
            n.name
        );
    }
    // Whichever node met the two rows (main, or branch1 through main, depending on which
    // branch main heard first) decided and announced the merge.
    let announced: i64 = c
        .nodes
        .iter()
        .map(|n| {
            n.sql("SELECT count(*) FROM walsync.merged_keys WHERE announced")
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert!(announced >= 1, "the deciding node announced the merge");
}

/// A store updates its row after main merged it away, before it hears of the merge.
/// Which row main met first decides what the update finds there: if main merged the
/// store's row as it arrived (it never held it, so it keeps no tombstone), the update is
/// recorded (`update_missing`); if main held it and merged it away when the other
/// arrived, its delete left a tombstone, and the later update brings the row back, to be
/// merged again. One row stays, everywhere.
#[test]
fn an_update_of_a_row_merged_away_elsewhere_is_recorded_and_one_row_stays() {
    let schema = format!("{RETAIL_SCHEMA}{INDEXES}");
    let mut c = TestCluster::new(
        "merged-then-updated",
        Topology::Star,
        &["main", "branch1", "branch2"],
        &schema,
    );
    c.start();
    cut(&mut c);
    c.node("branch1")
        .sql("INSERT INTO res_users_settings (user_id, lang) VALUES (7, 'branch1')");
    c.node("branch2")
        .sql("INSERT INTO res_users_settings (user_id, lang) VALUES (7, 'branch2')");
    // Only main's sidecar runs: it pulls both rows and merges them; the branches hear
    // nothing.
    c.node_mut("main").start_sidecar();
    c.wait_rows("main", "walsync.merged_keys", 1);
    c.node("branch2")
        .sql("UPDATE res_users_settings SET lang = 'branch2, later' WHERE user_id = 7");
    for n in ["branch1", "branch2"] {
        c.node_mut(n).start_sidecar();
    }
    c.wait_converged("res_users_settings");
    let kept = c
        .node("branch1")
        .sql("SELECT id FROM res_users_settings WHERE lang = 'branch1'");
    for n in &c.nodes {
        assert_eq!(
            n.sql("SELECT string_agg(id || ':' || user_id, ',') FROM res_users_settings"),
            format!("{kept}:7"),
            "{}: one row for the user, branch1's",
            n.name
        );
    }
    let on_main = c.node("main").sql(
        "SELECT string_agg(kind || ' ' || outcome, ',' ORDER BY id) FROM walsync.conflicts \
         WHERE table_name = 'res_users_settings' AND link = 'branch2->main'",
    );
    assert!(
        [
            "insert_exists merged,update_missing skipped",
            "update_deleted merged"
        ]
        .contains(&on_main.as_str()),
        "{on_main}"
    );
    c.assert_no_link_stopped();
}

/// Two links into one node settle the same unique value at the same time: the careful
/// insert's lookup runs while another session's commit is still to come, and that
/// commit lands a colliding row between the lookup and the insert. The row is settled
/// against it (renamed, here), not parked.
#[test]
fn a_colliding_row_committed_during_a_careful_insert_is_settled_not_parked() {
    let c = tag_race_cluster("commit-race");
    // A first collision puts the link b->a in careful mode.
    c.node("b").sql("INSERT INTO tag VALUES (2, 'TODAY')");
    let a = c.node("a");
    wait_for(
        "b's first tag on a",
        DEADLINE,
        || a.sql("SELECT count(*) FROM tag WHERE id = 2") == "1",
        || c.logs(),
    );
    // Another session on a moves Alpha away and takes its value, and does not commit yet.
    let holder = Holder::open(
        &c,
        "a",
        "UPDATE tag SET name = 'Alpha moved' WHERE id = 10; INSERT INTO tag VALUES (11, 'ALPHA');",
    );
    // b's 'alpha' arrives: the careful lookup finds Alpha and waits for the holder's lock.
    c.node("b").sql("INSERT INTO tag VALUES (12, 'alpha')");
    wait_for_applier_lock(&c, "a", "b->a");
    // The holder commits: Alpha no longer matches, and ALPHA (11) is there now.
    holder.commit();
    wait_for(
        "b's alpha on a",
        DEADLINE,
        || a.sql("SELECT count(*) FROM tag WHERE id = 12") == "1",
        || format!("{}\n{}", a.sql("SELECT * FROM walsync.conflicts"), c.logs()),
    );
    assert_eq!(
        a.sql("SELECT count(*) FROM walsync.conflicts WHERE outcome = 'parked'"),
        "0"
    );
    // The holder committed later: its ALPHA stays, b's alpha is renamed.
    assert_eq!(
        a.sql("SELECT id || ':' || name FROM tag WHERE id IN (11, 12) ORDER BY id"),
        format!("11:ALPHA\n12:alpha [conflict #{}]", spelled("12"))
    );
}

/// The same race on the update path: an update's careful lookups run while another
/// session's commit is still to come, and that commit lands a colliding row before the
/// update is written. The update is settled against it, not parked (a chaos run of
/// `stores_sharing_a_journal…` parked one so, with seed 1796036751026744994).
#[test]
fn a_colliding_row_committed_during_a_careful_update_is_settled_not_parked() {
    let c = tag_race_cluster("commit-race-update");
    // A first collision puts the link b->a in careful mode; b's row 12 arrives as well.
    c.node("b")
        .sql("INSERT INTO tag VALUES (2, 'TODAY'), (12, 'beta')");
    let a = c.node("a");
    wait_for(
        "b's first tags on a",
        DEADLINE,
        || a.sql("SELECT count(*) FROM tag WHERE id IN (2, 12)") == "2",
        || c.logs(),
    );
    let holder = Holder::open(
        &c,
        "a",
        "UPDATE tag SET name = 'Alpha moved' WHERE id = 10; INSERT INTO tag VALUES (11, 'ALPHA');",
    );
    // b renames its row to 'alpha': the careful lookup finds Alpha and waits for the holder.
    c.node("b")
        .sql("UPDATE tag SET name = 'alpha' WHERE id = 12");
    wait_for_applier_lock(&c, "a", "b->a");
    holder.commit();
    wait_for(
        "b's update on a",
        DEADLINE,
        || a.sql("SELECT name FROM tag WHERE id = 12") != "beta",
        || format!("{}\n{}", a.sql("SELECT * FROM walsync.conflicts"), c.logs()),
    );
    assert_eq!(
        a.sql("SELECT count(*) FROM walsync.conflicts WHERE outcome = 'parked'"),
        "0",
        "{}",
        a.sql("SELECT * FROM walsync.conflicts")
    );
    // The holder committed later: its ALPHA stays, b's alpha is renamed.
    assert_eq!(
        a.sql("SELECT id || ':' || name FROM tag WHERE id IN (11, 12) ORDER BY id"),
        format!("11:ALPHA\n12:alpha [conflict #{}]", spelled("12"))
    );
}

/// A psql session on one node that runs some SQL in a transaction it keeps open, its
/// locks held, until [`Holder::commit`].
struct Holder {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
}

impl Holder {
    fn open(c: &TestCluster, node: &str, sql: &str) -> Holder {
        let n = c.node(node);
        let psql = walsync_testkit::localpg::bindir().unwrap().join("psql");
        let mut child = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(n.pg.port().to_string())
            .arg("postgres")
            .env("PGAPPNAME", "holder")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "BEGIN; {sql}").unwrap();
        wait_for(
            "the holder's transaction to be open",
            DEADLINE,
            || {
                n.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'holder' AND state = 'idle in transaction'")
                    == "1"
            },
            || c.logs(),
        );
        Holder { child, stdin }
    }

    fn commit(mut self) {
        writeln!(self.stdin, "COMMIT;").unwrap();
        drop(self.stdin);
        assert!(self.child.wait().unwrap().success());
    }
}

/// Waits until the applier of `link` on `node` waits for a lock.
fn wait_for_applier_lock(c: &TestCluster, node: &str, link: &str) {
    let n = c.node(node);
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'walsync {link} apply' AND wait_event_type = 'Lock'"
    );
    wait_for(
        "the applier to wait for the holder",
        DEADLINE,
        || n.sql(&sql) == "1",
        || c.logs(),
    );
}

/// Two nodes whose tags are unique case-insensitively; a holds 'Today' (1) and 'Alpha'
/// (10). b's sidecar is stopped: a's writes stay on a, b's reach a through a's sidecar
/// (link b->a).
fn tag_race_cluster(test: &str) -> TestCluster {
    let schema = format!(
        "{RETAIL_SCHEMA}
         CREATE TABLE tag (id integer PRIMARY KEY, name text NOT NULL);
         CREATE UNIQUE INDEX tag_name ON tag (lower(name));"
    );
    let mut c = TestCluster::new(test, Topology::Mesh, &["a", "b"], &schema);
    c.start();
    c.node_mut("b").stop_sidecar();
    c.node("a")
        .sql("INSERT INTO tag VALUES (1, 'Today'), (10, 'Alpha')");
    c
}

/// With several apply sessions, a wait cycle through a local writer is one the server
/// sees, so its deadlock detector breaks it and the link goes on. A local transaction
/// on b holds row 1, which a's first transaction (on one session) must update; a's
/// second transaction (on another session) updates row 2, which the local transaction
/// then wants. The second waits for the first to end (commit order), the first for the
/// local transaction, the local transaction for the second. A session that told its
/// granted order lock only after its job (here: never, the job waits on the server)
/// kept the second's commit in the sidecar: nobody saw the cycle and everyone waited for
/// ever.
#[test]
fn a_wait_cycle_through_a_local_writer_and_two_apply_sessions_is_broken_by_the_server() {
    wait_cycle("wait-cycle", false);
}

/// As above, with a second transaction on row 1 between the two: it waits in its
/// session's queue behind the first, so the commit of row 2 waits in the sidecar for it
/// to start, which the server cannot see. After `ORDER_WAIT` (5 s) the link restarts and
/// applies one transaction at a time; the local transaction goes on and the nodes
/// converge.
#[test]
fn a_commit_held_in_the_sidecar_behind_a_blocked_session_gives_up_and_applies_serially() {
    wait_cycle("wait-cycle-queued", true);
}

/// A small transaction on one of several sessions writes its rows before it waits for
/// the transaction before it, as one in the usual form does: the sessions' work
/// overlaps. The second session is first shown the transaction's shape twice (the second
/// time it is prepared as one statement), then the cycle above runs through that
/// statement: row 2 is written (the session has a transaction id) while the statement
/// waits for the first transaction's order lock, the local transaction then waits for
/// row 2, and the server breaks the cycle. A statement that waited before it wrote would
/// hold nothing while it waits.
#[test]
fn a_small_transaction_on_a_second_session_writes_its_rows_before_it_waits_for_the_first() {
    let schema = "CREATE TABLE t (id integer PRIMARY KEY, v integer NOT NULL);
                  INSERT INTO t VALUES (1, 0), (2, 0);";
    let mut c = TestCluster::new("write-then-wait", Topology::Mesh, &["a", "b"], schema);
    c.node("b").set_apply_sessions(2);
    c.node_mut("a").start_sidecar();
    // Row 1's transaction goes to the first session (the least busy, the first on a
    // tie) and waits for the local one; both of row 2's go to the second, one after the
    // other.
    c.node("a").sql("UPDATE t SET v = 1 WHERE id = 1");
    c.node("a").sql("UPDATE t SET v = 2 WHERE id = 2");
    c.node("a").sql("UPDATE t SET v = 3 WHERE id = 2");
    // Row 2 written while its transaction waits for row 1's (`wait_event` 'advisory'),
    // row 1's transaction waiting for the local one.
    let row_2_written_while_waiting = |c: &TestCluster| {
        c.node("b").sql(
            "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock' AND wait_event <> 'advisory') > 0 \
                AND count(*) FILTER (WHERE wait_event = 'advisory' AND backend_xid IS NOT NULL) > 0 \
             FROM pg_stat_activity WHERE application_name = 'walsync a->b apply'",
        ) == "t"
    };
    let mut warm = Holder::open(&c, "b", "UPDATE t SET v = 100 WHERE id = 1;");
    c.node_mut("b").start_sidecar();
    wait_for(
        "the first of row 2's transactions, in the usual form, to write row 2 and wait for row 1's",
        DEADLINE,
        || row_2_written_while_waiting(&c),
        || c.logs(),
    );
    writeln!(warm.stdin, "ROLLBACK;").unwrap();
    drop(warm.stdin);
    warm.child.wait().unwrap();
    c.wait_converged("t");

    let mut holder = Holder::open(&c, "b", "UPDATE t SET v = 100 WHERE id = 1;");
    c.node("a").sql("UPDATE t SET v = 11 WHERE id = 1");
    c.node("a").sql("UPDATE t SET v = 22 WHERE id = 2");
    wait_for(
        "row 2's transaction, now one statement, to write row 2 and wait for row 1's",
        DEADLINE,
        || row_2_written_while_waiting(&c),
        || c.logs(),
    );
    writeln!(holder.stdin, "UPDATE t SET v = 200 WHERE id = 2; COMMIT;").unwrap();
    drop(holder.stdin);
    holder.child.wait().unwrap();
    c.wait_converged("t");
}

fn wait_cycle(test: &str, extra_on_row_1: bool) {
    let schema = "CREATE TABLE t (id integer PRIMARY KEY, v integer NOT NULL);
                  INSERT INTO t VALUES (1, 0), (2, 0);";
    let mut c = TestCluster::new(test, Topology::Mesh, &["a", "b"], schema);
    c.node("b").set_apply_sessions(2);
    c.node_mut("a").start_sidecar();
    c.node("a").sql("UPDATE t SET v = 11 WHERE id = 1");
    if extra_on_row_1 {
        // On the first transaction's session, queued behind it: the second row's
        // commit waits, in the sidecar, for this one to start.
        c.node("a").sql("UPDATE t SET v = 12 WHERE id = 1");
    }
    c.node("a").sql("UPDATE t SET v = 22 WHERE id = 2");
    let mut holder = Holder::open(&c, "b", "UPDATE t SET v = 100 WHERE id = 1;");
    c.node_mut("b").start_sidecar();
    let b = c.node("b");
    wait_for(
        "a's first transaction to wait for the local one, and its second to hold row 2",
        DEADLINE,
        || {
            b.sql(
                "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock') > 0 \
                    AND count(backend_xid) > 0 \
                 FROM pg_stat_activity WHERE application_name = 'walsync a->b apply'",
            ) == "t"
        },
        || c.logs(),
    );
    writeln!(holder.stdin, "UPDATE t SET v = 200 WHERE id = 2; COMMIT;").unwrap();
    drop(holder.stdin);
    let deadline = std::time::Instant::now() + DEADLINE;
    let ended = loop {
        if let Some(status) = holder.child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = holder.child.kill();
            panic!("the wait cycle was never broken:\n{}", c.logs());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    println!("the local transaction ended with {ended}");
    c.wait_converged("t");
}
