//! Ordinary schema never stops the chain: table shapes and DDL a real database sees
//! (tables without a primary key, tables made from a query) replicate, and what cannot
//! be applied is recorded while the links go on.

mod support;

use support::*;

/// A sale on `node` reaches every node: the links from it still flow.
fn sale_reaches_everyone(c: &TestCluster, node: &str, name: &str) {
    c.node(node)
        .sql(&format!("INSERT INTO pos_order (name) VALUES ('{name}')"));
    for n in &c.nodes {
        c.wait_rows(&n.name, &format!("pos_order WHERE name = '{name}'"), 1);
    }
}

#[test]
fn a_table_without_a_primary_key_replicates_and_a_row_not_found_is_recorded() {
    let mut c = TestCluster::new(
        "keyless",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    // An insert-only log, and the application's UPDATE right after the CREATE in its
    // transaction: PostgreSQL refuses an UPDATE of a published table without a replica
    // identity, so the table must have one from the creating statement on.
    c.node("main").sql(
        "BEGIN;
         CREATE TABLE audit (msg text, at timestamptz DEFAULT now(), n integer);
         INSERT INTO audit (msg, n) SELECT 'event ' || g, g FROM generate_series(1, 10) g;
         UPDATE audit SET msg = 'first event' WHERE n = 1;
         COMMIT;",
    );
    // Two equal rows: a delete of one of them takes one, not both.
    c.node("main")
        .sql("INSERT INTO audit (msg, at, n) VALUES ('twin', '2026-01-01', 0), ('twin', '2026-01-01', 0)");
    c.node("main")
        .sql("DELETE FROM audit WHERE ctid = (SELECT ctid FROM audit WHERE msg = 'twin' LIMIT 1)");
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "audit", 11);
    }
    c.wait_converged("audit");
    c.node("branch1")
        .sql("UPDATE audit SET msg = 'seen at branch1' WHERE n = 2");
    c.node("branch2").sql("DELETE FROM audit WHERE n = 3");
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "audit WHERE msg = 'twin'", 1);
        c.wait_rows(n, "audit WHERE msg = 'seen at branch1'", 1);
        c.wait_rows(n, "audit", 10);
    }
    c.wait_converged("audit");
    assert_eq!(
        c.node("branch2").count("audit WHERE msg = 'first event'"),
        1
    );
    sale_reaches_everyone(&c, "main", "after the log");

    // During a cut, branch1 deletes a row main changes: no row is equal to what either
    // change was made on, and each side records it; the links go on.
    c.stop();
    c.node("branch1").sql("DELETE FROM audit WHERE n = 5");
    c.node("main")
        .sql("UPDATE audit SET msg = 'changed on main' WHERE n = 5");
    c.start();
    c.wait_rows(
        "branch1",
        "walsync.conflicts WHERE kind = 'update_missing' AND table_name = 'audit'",
        1,
    );
    c.wait_rows(
        "main",
        "walsync.conflicts WHERE kind = 'delete_missing' AND table_name = 'audit'",
        1,
    );
    let detail = c.node("branch1").sql(
        "SELECT outcome || ' ' || (remote_row->>'msg') FROM walsync.conflicts WHERE kind = 'update_missing'",
    );
    assert_eq!(detail, "skipped changed on main");
    sale_reaches_everyone(&c, "branch1", "after the cut");
    c.assert_no_link_stopped();

    // An unlogged table writes no WAL: its schema replicates, its rows cannot, and
    // status says so by name.
    c.node("main")
        .sql("CREATE UNLOGGED TABLE scratch (id int); INSERT INTO scratch VALUES (1)");
    c.wait_rows("branch1", "pg_tables WHERE tablename = 'scratch'", 1);
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(
        status.contains("unlogged table(s) public.scratch"),
        "{status}"
    );
}

#[test]
fn a_table_made_from_a_query_arrives_as_its_structure_with_the_authors_rows() {
    let mut c = TestCluster::new(
        "from-query",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (name, email) SELECT 'partner ' || g, 'p' || g || '@x' FROM generate_series(1, 5) g");
    c.wait_converged("partner");
    // branch1 has a customer main has not seen yet: a re-run of main's query there
    // would copy it too.
    c.stop();
    c.node("branch1")
        .sql("INSERT INTO partner (name) VALUES ('only at branch1 yet')");
    // A DBA's copies before a risky change, in both spellings, and one in a multi-
    // statement string with an index after it.
    c.node("main")
        .sql("CREATE TABLE partner_copy AS SELECT * FROM partner");
    c.node("main")
        .sql("SELECT id, name INTO partner_names FROM partner WHERE id % 2 = 1");
    c.node("main").sql(
        "CREATE TABLE partner_emails AS SELECT email FROM partner WHERE email IS NOT NULL; \
         CREATE INDEX partner_emails_email ON partner_emails (email)",
    );
    c.start();
    for t in ["partner_copy", "partner_names", "partner_emails"] {
        for n in ["branch1", "branch2"] {
            c.wait_rows(n, t, c.node("main").count(t));
        }
        c.wait_converged(t);
    }
    assert_eq!(
        c.node("branch1")
            .count("partner_copy WHERE name = 'only at branch1 yet'"),
        0
    );
    assert_eq!(
        c.node("branch2")
            .sql("SELECT count(*) FROM pg_indexes WHERE indexname = 'partner_emails_email'"),
        "1"
    );
    // The captured statement is the table's structure, not the query.
    let captured = c
        .node("branch2")
        .sql("SELECT query FROM walsync.ddl_log WHERE command_tag = 'CREATE TABLE AS' ORDER BY seq LIMIT 1");
    assert!(
        captured.starts_with(
            "CREATE TABLE public.partner_copy (id integer, name text, email character varying(120)"
        ),
        "{captured}"
    );
    // The copies are tables like any other: changes to them flow.
    c.node("main")
        .sql("UPDATE partner_copy SET name = 'renamed in the copy' WHERE id = 1");
    c.wait_rows(
        "branch2",
        "partner_copy WHERE name = 'renamed in the copy'",
        1,
    );
    c.wait_converged("partner");
    sale_reaches_everyone(&c, "main", "after the copies");
    c.assert_no_link_stopped();
    for n in &c.nodes {
        assert_eq!(n.count("walsync.conflicts"), 0, "{}", n.name);
    }
}

#[test]
fn rows_written_under_an_old_column_or_table_name_during_a_cut_arrive_under_the_new_one() {
    let mut c = TestCluster::new(
        "renamed",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.node("main")
        .sql("CREATE TABLE loyalty (id serial PRIMARY KEY, points int)");
    c.start();
    c.wait_rows("branch1", "loyalty", 0);
    c.stop();
    // branch1 keeps selling in the shape it knows.
    for i in 1..=5 {
        c.node("branch1").sql(&format!(
            "INSERT INTO pos_order (name, amount_total) VALUES ('cut {i}', {i}); \
             INSERT INTO loyalty (points) VALUES ({i})"
        ));
    }
    // main's module upgrade renames a column and a table, and adds a NOT NULL column.
    c.node("main").sql(
        "ALTER TABLE pos_order RENAME COLUMN amount_total TO amount; \
         ALTER TABLE pos_order ADD COLUMN state text NOT NULL DEFAULT 'draft'; \
         ALTER TABLE loyalty RENAME TO loyalty_card; \
         ALTER TABLE loyalty_card RENAME COLUMN points TO balance",
    );
    c.node("main").sql(
        "INSERT INTO pos_order (name, amount, state) VALUES ('main after the upgrade', 9, 'paid')",
    );
    c.start();
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "pos_order", 6);
        c.wait_rows(n, "loyalty_card", 5);
    }
    c.wait_converged("pos_order");
    c.wait_converged("loyalty_card");
    let b2 = c.node("branch2");
    assert_eq!(
        b2.sql("SELECT sum(amount)::int FROM pos_order WHERE name LIKE 'cut %'"),
        "15"
    );
    assert_eq!(b2.sql("SELECT sum(balance)::int FROM loyalty_card"), "15");
    assert_eq!(
        b2.count("pos_order WHERE state = 'draft'"),
        5,
        "the new column's default"
    );
    c.assert_no_link_stopped();
    sale_reaches_everyone(&c, "branch1", "after the upgrade");
}

#[test]
fn partitioned_tables_generated_columns_enums_and_truncate_replicate() {
    let mut c = TestCluster::new(
        "shapes",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main").sql(
        "CREATE TYPE order_state AS ENUM ('draft', 'paid'); \
         CREATE TABLE sale_log (id serial, day date NOT NULL, state order_state NOT NULL DEFAULT 'draft', \
           amount numeric NOT NULL, amount_taxed numeric GENERATED ALWAYS AS (amount * 1.2) STORED, \
           PRIMARY KEY (id, day)) PARTITION BY RANGE (day); \
         CREATE TABLE sale_log_2026 PARTITION OF sale_log FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         CREATE TABLE sale_log_2027 (LIKE sale_log INCLUDING DEFAULTS INCLUDING GENERATED); \
         ALTER TABLE sale_log ATTACH PARTITION sale_log_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
    );
    c.node("main")
        .sql("ALTER TYPE order_state ADD VALUE 'refunded'");
    c.node("main").sql(
        "INSERT INTO sale_log (day, amount) VALUES ('2026-05-01', 10), ('2027-02-01', 20); \
         UPDATE sale_log SET state = 'refunded' WHERE day = '2027-02-01'",
    );
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "sale_log WHERE state = 'refunded'", 1);
    }
    c.node("branch1")
        .sql("INSERT INTO sale_log (day, amount, state) VALUES ('2026-06-01', 5, 'paid')");
    for n in ["main", "branch2"] {
        c.wait_rows(n, "sale_log", 3);
    }
    c.wait_converged("sale_log");
    assert_eq!(
        c.node("branch2")
            .sql("SELECT sum(amount_taxed)::int FROM sale_log"),
        "42",
        "generated columns computed on each node"
    );
    // TRUNCATE replicates (pgoutput carries it) and the links go on.
    c.node("main").sql("TRUNCATE pos_order_line");
    c.node("main")
        .sql("INSERT INTO pos_order (name) VALUES ('before truncate')");
    c.node("main").sql("TRUNCATE pos_order CASCADE");
    sale_reaches_everyone(&c, "main", "after truncate");
    for n in &c.nodes {
        assert_eq!(n.count("pos_order"), 1, "{}", n.name);
    }
    c.assert_no_link_stopped();
}

/// A store's rows for a table main does not have (its CREATE refused by `ddl_from`) are
/// set aside on main whole, with every later change to the tables they touch, in order;
/// everything else from the store flows meanwhile and no link stops. Once main has the
/// table (a DBA creates it), they apply by themselves, in their order.
#[test]
fn rows_for_a_table_not_here_wait_set_aside_in_order_and_apply_once_it_is_here() {
    let mut c = TestCluster::new(
        "set-aside",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    let b1 = c.node("branch1");
    b1.sql("CREATE TABLE till_log (id int PRIMARY KEY, msg text)");
    b1.sql("INSERT INTO till_log VALUES (1, 'opened')");
    b1.sql(
        "BEGIN; INSERT INTO partner (name) VALUES ('regular'); \
         INSERT INTO till_log VALUES (2, 'customer created'); COMMIT",
    );
    // Touches only a table that waits behind the one above: set aside too, after it.
    b1.sql("UPDATE partner SET email = 'regular@example.com' WHERE name = 'regular'");
    // Touches nothing that waits: applied at once.
    b1.sql("INSERT INTO product (name, price) VALUES ('branch tea', 2)");
    c.wait_rows("main", "product WHERE name = 'branch tea'", 1);
    c.wait_rows("main", "walsync.set_aside", 3);
    assert_eq!(
        c.node("main").count("partner"),
        0,
        "the customer waits whole"
    );
    c.assert_no_link_stopped();
    sale_reaches_everyone(&c, "branch1", "B1/0001");
    sale_reaches_everyone(&c, "branch2", "B2/0001");
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(
        status.contains(
            "link branch1->main: 3 transaction(s) set aside, waiting for public.till_log"
        ),
        "{status}"
    );

    // A DBA creates the table on main (the same definition): the set-aside transactions
    // apply in order, and reach branch2 as branch1's.
    c.node("main")
        .sql("CREATE TABLE till_log (id int PRIMARY KEY, msg text)");
    c.wait_rows("main", "walsync.set_aside", 0);
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "till_log", 2);
        c.wait_rows(
            n,
            "partner WHERE name = 'regular' AND email = 'regular@example.com'",
            1,
        );
    }
    assert_eq!(
        c.node("main").count("walsync.conflicts"),
        0,
        "applied in their order, nothing met a conflict"
    );
    c.assert_no_link_stopped();
    sale_reaches_everyone(&c, "branch1", "B1/0002");
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(!status.contains("transaction(s) set aside"), "{status}");

    // A column main does not have: the same, until main has it.
    let b1 = c.node("branch1");
    b1.sql("ALTER TABLE product ADD COLUMN barcode text");
    b1.sql("INSERT INTO product (name, price, barcode) VALUES ('scanned', 1, '4006381333931')");
    c.wait_rows("main", "walsync.set_aside", 1);
    sale_reaches_everyone(&c, "branch1", "B1/0003");
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(
        status.contains(
            "1 transaction(s) set aside, waiting for public.product (its column barcode)"
        ),
        "{status}"
    );
    let cfg = c.node("main").config.to_str().unwrap().to_string();
    let (ok, listed) = walsync(&["conflicts", "--config", &cfg, "set-aside"]);
    assert!(
        ok && listed.contains("branch1->main")
            && listed.contains("public.product (its column barcode)"),
        "{listed}"
    );
    let (_, conflicts) = c.node("main").walsync(&["conflicts"]);
    assert!(
        conflicts.contains("1 transaction(s) set aside, waiting for their table"),
        "{conflicts}"
    );
    c.node("main")
        .sql("ALTER TABLE product ADD COLUMN barcode text");
    c.wait_rows("main", "walsync.set_aside", 0);
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "product WHERE barcode = '4006381333931'", 1);
    }
    c.assert_no_link_stopped();
}

/// main builds a unique index while branch1, cut off, gives two customers one e-mail:
/// after the heal every node renames the same one the same way (main and branch2 as the
/// rows arrive, branch1 as the index arrives over them), the index is built everywhere
/// and no link stops.
#[test]
fn a_unique_index_made_during_a_cut_over_rows_that_violate_it_settles_them_and_is_built() {
    let mut c = TestCluster::new(
        "unique-over-dups",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (name, email) VALUES ('Bob', 'bob@example.com')");
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "partner", 1);
    }
    c.stop();
    c.node("main")
        .sql("CREATE UNIQUE INDEX partner_email ON partner (email)");
    let b1 = c.node("branch1");
    b1.sql("INSERT INTO partner (name, email) VALUES ('Ann', 'ann@example.com')");
    b1.sql("INSERT INTO partner (name, email) VALUES ('Ann B.', 'ann@example.com')");
    b1.sql("INSERT INTO partner (name, email) VALUES ('Bobby', 'bob@example.com')");
    b1.sql("INSERT INTO partner (name, email) VALUES ('no mail', NULL), ('no mail', NULL)");
    c.start();
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "partner", 6);
        c.wait_rows(n, "pg_indexes WHERE indexname = 'partner_email'", 1);
        c.wait_rows(n, "partner WHERE email LIKE '%[conflict #%'", 2);
    }
    let emails = |n: &str| {
        c.node(n)
            .sql("SELECT string_agg(name || '=' || coalesce(email, '-'), ', ' ORDER BY name, id) FROM partner")
    };
    let on_main = emails("main");
    for n in ["branch1", "branch2"] {
        assert_eq!(emails(n), on_main, "{n} and main hold the same customers");
    }
    // The later of two commits keeps the value (decision 0004), as with any collision.
    assert!(
        on_main.contains("Ann B.=ann@example.com") && on_main.contains("Bobby=bob@example.com"),
        "{on_main}"
    );
    assert_eq!(
        c.node("branch1")
            .count("walsync.conflicts WHERE outcome = 'local_renamed' AND detail LIKE '%replayed unique index%'"),
        2,
        "branch1 records what it renamed to build the index"
    );
    c.assert_no_link_stopped();
    sale_reaches_everyone(&c, "branch1", "B1/after");
}

/// More of what a DBA does on main while a branch is cut off and selling: a table made
/// `LIKE` another, a materialized view, an extension Odoo asks for, a column's type
/// widened under the branch's rows, and a second schema copied in with
/// `pg_dump --schema-only | psql`. After the heal everything is on every node, the
/// branch's sales in the new type, and no link stops.
#[test]
fn a_dbas_everyday_ddl_during_a_cut_reaches_every_node_and_no_link_stops() {
    let mut c = TestCluster::new(
        "dba-ddl",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (name) VALUES ('Bob')");
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "partner", 1);
    }
    c.stop();
    let main = c.node("main");
    main.sql(
        "CREATE TABLE partner_archive (LIKE partner INCLUDING ALL); \
         INSERT INTO partner_archive SELECT * FROM partner",
    );
    main.sql(
        "CREATE MATERIALIZED VIEW orders_per_partner AS \
         SELECT partner_id, count(*) AS orders FROM pos_order GROUP BY partner_id",
    );
    main.sql("CREATE EXTENSION IF NOT EXISTS pg_trgm");
    main.sql("ALTER TABLE pos_order ALTER COLUMN amount_total TYPE numeric(14,3)");
    // A second schema's structure, dumped from another database and restored here.
    main.pg.psql("CREATE DATABASE elsewhere").unwrap();
    main.pg
        .psql_in(
            "elsewhere",
            "CREATE SCHEMA reports; \
             CREATE TABLE reports.daily (id serial PRIMARY KEY, day date NOT NULL UNIQUE, total numeric(12,2)); \
             CREATE TABLE reports.daily_line (id bigserial PRIMARY KEY, \
               daily_id int NOT NULL REFERENCES reports.daily(id) ON DELETE CASCADE, label text); \
             CREATE INDEX ON reports.daily_line (daily_id)",
        )
        .unwrap();
    let bin = walsync_testkit::localpg::bindir().unwrap();
    let dump = std::process::Command::new(bin.join("pg_dump"))
        .args(["--schema-only", "-n", "reports", "-d"])
        .arg(main.pg.dsn_for("elsewhere"))
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let file = c.dir.join("reports.sql");
    std::fs::write(&file, &dump.stdout).unwrap();
    let restore = std::process::Command::new(bin.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(main.pg.dsn_for(&c.db))
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    // branch1 sells meanwhile, in the type it knows.
    c.node("branch1")
        .sql("INSERT INTO pos_order (name, partner_id, amount_total) SELECT 'cut sale', id, 12.5 FROM partner");
    c.start();
    c.node("main").sql(
        "INSERT INTO reports.daily (day, total) VALUES ('2026-12-07', 12.5); \
         INSERT INTO reports.daily_line (daily_id, label) SELECT id, 'cut sale' FROM reports.daily",
    );
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "reports.daily_line", 1);
        c.wait_rows(n, "partner_archive", 1);
        c.wait_rows(
            n,
            "pos_order WHERE name = 'cut sale' AND amount_total = 12.5",
            1,
        );
        c.wait_rows(n, "pg_extension WHERE extname = 'pg_trgm'", 1);
        c.wait_rows(n, "pg_matviews WHERE matviewname = 'orders_per_partner'", 1);
        assert_eq!(
            c.node(n).sql(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = 'pos_order'::regclass AND attname = 'amount_total'"
            ),
            "numeric(14,3)",
            "{n}"
        );
    }
    // The restored schema's sequences hand out each node's own ids, as every other's.
    for n in ["main", "branch1", "branch2"] {
        let (_, status) = c.node(n).walsync(&["status"]);
        assert!(
            status.contains("(0 not partitioned for this node)"),
            "{n}: {status}"
        );
    }
    c.assert_no_link_stopped();
    sale_reaches_everyone(&c, "branch1", "B1/after");
}

/// main adds a CHECK (NOT VALID: the rows there are not checked) while branch1, cut off,
/// writes a row that breaks it: on main that transaction is set aside, naming the
/// constraint, and the rest of branch1's sales flow; once a person on main drops the
/// constraint the row arrives everywhere.
#[test]
fn a_row_that_no_longer_fits_its_table_here_waits_set_aside_until_it_does() {
    let mut c = TestCluster::new(
        "does-not-fit",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.wait_rows("branch1", "product", 0);
    c.stop();
    c.node("main")
        .sql("ALTER TABLE product ADD CONSTRAINT price_not_negative CHECK (price >= 0) NOT VALID");
    c.node("branch1")
        .sql("INSERT INTO product (name, price) VALUES ('refund', -1)");
    c.start();
    c.wait_rows("main", "walsync.set_aside", 1);
    sale_reaches_everyone(&c, "branch1", "B1/0001");
    c.assert_no_link_stopped();
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(
        status.contains("waiting for public.product (a row does not fit:")
            && status.contains("price_not_negative"),
        "{status}"
    );
    c.node("main")
        .sql("ALTER TABLE product DROP CONSTRAINT price_not_negative");
    c.wait_rows("main", "walsync.set_aside", 0);
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "product WHERE name = 'refund'", 1);
    }
    c.assert_no_link_stopped();
}
