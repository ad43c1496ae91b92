//! A delete that races with a sale (decision 0016): no row is left pointing at nothing,
//! on any node, and the nodes converge.

mod support;

use support::*;

/// The id a `... RETURNING id` printed (psql adds the command tag).
fn id(out: String) -> String {
    out.lines().next().unwrap_or_default().to_string()
}

/// Before a cut main makes a customer, a product and an order with a line. During the
/// cut main deletes them all (the order's line goes with it, ON DELETE CASCADE), while
/// branch1 sells to the customer and adds a line to the order, and branch2 sells the
/// product. After the heal every sale is on every node, and so is every row a sale
/// refers to; the order's old line, which no store kept, stays deleted. Beside it, main
/// deletes two more customers, one edited on branch1 after the delete (it comes back
/// with the edit) and one edited on branch2 before it (it stays deleted).
#[test]
fn a_customer_and_a_product_deleted_on_main_while_stores_sell_them_come_back_everywhere() {
    let mut c = TestCluster::new(
        "references",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    let customer = id(c
        .node("main")
        .sql("INSERT INTO partner (name) VALUES ('a duplicate customer') RETURNING id"));
    let product = id(c
        .node("main")
        .sql("INSERT INTO product (name, price) VALUES ('entered by mistake', 3) RETURNING id"));
    let order = id(c.node("main").sql(&format!(
        "INSERT INTO pos_order (name, partner_id) VALUES ('main/1', {customer}) RETURNING id"
    )));
    let old_line = id(c.node("main").sql(
        &format!(
            "INSERT INTO pos_order_line (order_id, product_id, qty, price_unit) VALUES ({order}, {product}, 1, 3) RETURNING id"
        ),
    ));
    c.node("main")
        .sql("INSERT INTO partner (name) VALUES ('edited later'), ('deleted later')");
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "pos_order_line", 1);
        c.wait_rows(n, "partner", 3);
    }
    c.stop();
    // A delete and an update racing, in both orders of commit time: the later one wins.
    c.node("main")
        .sql("DELETE FROM partner WHERE name = 'edited later'");
    c.node("branch1")
        .sql("UPDATE partner SET email = 'new@shop' WHERE name = 'edited later'");
    c.node("branch2")
        .sql("UPDATE partner SET email = 'old@shop' WHERE name = 'deleted later'");
    c.node("main")
        .sql("DELETE FROM partner WHERE name = 'deleted later'");
    c.node("main")
        .sql(&format!("DELETE FROM pos_order WHERE id = {order}"));
    c.node("main")
        .sql(&format!("DELETE FROM partner WHERE id = {customer}"));
    c.node("main")
        .sql(&format!("DELETE FROM product WHERE id = {product}"));
    assert_eq!(
        c.node("main").count("pos_order_line"),
        0,
        "the cascade ran on main"
    );
    let new_line = id(c.node("branch1").sql(
        &format!(
            "INSERT INTO pos_order_line (order_id, product_id, qty, price_unit) VALUES ({order}, {product}, 2, 3) RETURNING id"
        ),
    ));
    c.node("branch1").sql(&format!(
        "INSERT INTO pos_order (name, partner_id) VALUES ('branch1/1', {customer})"
    ));
    c.node("branch2").sql(
        &format!(
            "WITH o AS (INSERT INTO pos_order (name) VALUES ('branch2/1') RETURNING id) \
             INSERT INTO pos_order_line (order_id, product_id, qty, price_unit) SELECT id, {product}, 1, 3 FROM o"
        ),
    );
    c.start();

    for table in ["partner", "product", "pos_order", "pos_order_line"] {
        c.wait_converged(table);
    }
    for n in &c.nodes {
        assert_eq!(n.dangling_references(), Vec::<String>::new(), "{}", n.name);
        assert_eq!(
            n.sql("SELECT string_agg(name, ',' ORDER BY name) FROM pos_order"),
            "branch1/1,branch2/1,main/1",
            "{}: every sale, and the order a store added to",
            n.name
        );
        assert_eq!(
            n.sql(&format!(
                "SELECT (SELECT name FROM partner WHERE id = {customer}) || ',' || (SELECT name FROM product WHERE id = {product})"
            )),
            "a duplicate customer,entered by mistake",
            "{}",
            n.name
        );
        assert_eq!(
            n.sql(&format!(
                "SELECT string_agg(id::text, ',') FROM pos_order_line WHERE order_id = {order}"
            )),
            new_line,
            "{}: the store's new line stays, main's deleted line does not come back",
            n.name
        );
        assert_eq!(
            n.sql("SELECT string_agg(name || ' ' || coalesce(email, '-'), ',' ORDER BY name) FROM partner WHERE name LIKE '%later'"),
            "edited later new@shop",
            "{}: the update made after the delete brought the row back; the delete made after the update stays",
            n.name
        );
        assert_eq!(
            n.sql(&format!(
                "SELECT count(*) FROM pos_order_line WHERE id = {old_line}"
            )),
            "0",
            "{}",
            n.name
        );
    }
    // Each delete that would have left a sale pointing at nothing is recorded where it
    // was refused, and the row's return where it had been deleted.
    let kinds = |n: &str| {
        c.node(n).sql(
            "SELECT string_agg(table_name || ' ' || kind || ' ' || outcome, ', ' ORDER BY table_name, kind) \
             FROM walsync.conflicts WHERE kind IN ('delete_referenced', 'update_deleted')",
        )
    };
    assert_eq!(
        kinds("branch1"),
        "partner delete_referenced local_kept, pos_order delete_referenced local_kept, \
         product delete_referenced local_kept"
    );
    assert_eq!(kinds("branch2"), "product delete_referenced local_kept");
    let on_main = kinds("main");
    for table in ["partner", "pos_order", "product"] {
        assert!(
            on_main.contains(&format!("{table} update_deleted remote_applied")),
            "{on_main}"
        );
    }
    let race = |n: &str, kind: &str| {
        c.node(n).sql(&format!(
            "SELECT string_agg(remote_row->>'name' || ' ' || outcome, ',' ORDER BY remote_row->>'name') \
             FROM walsync.conflicts WHERE kind = '{kind}' AND remote_row->>'name' LIKE '%later'"
        ))
    };
    assert_eq!(
        race("main", "update_deleted"),
        "deleted later skipped,edited later remote_applied"
    );
    assert_eq!(
        race("branch1", "delete_origin_differs"),
        "edited later local_kept"
    );
    assert_eq!(
        race("branch2", "delete_origin_differs"),
        "deleted later remote_applied"
    );
    c.assert_no_link_stopped();
}
