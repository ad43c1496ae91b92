//! DDL follows the data: captured by the event trigger, replayed in the stream.

mod support;

use support::*;

#[test]
fn a_multi_statement_string_with_ddl_and_inserts_arrives_once_everywhere() {
    let mut c = TestCluster::new(
        "ddl-multi",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    // branch1's schema changes are trusted too (a star runs only the hub's by default).
    c.set_cluster_option("ddl_from = [\"main\", \"branch1\"]");
    c.start();
    // As Odoo sends it: one string, DDL and DML mixed, in one transaction.
    c.node("main").sql(
        "CREATE TABLE loyalty_program (id serial PRIMARY KEY, name varchar NOT NULL, points integer); \
         COMMENT ON TABLE loyalty_program IS 'Loyalty Program'; \
         COMMENT ON COLUMN loyalty_program.name IS 'Program Name'; \
         INSERT INTO loyalty_program (name, points) VALUES ('Gold', 100), ('Silver', 50); \
         CREATE INDEX loyalty_program_name_index ON loyalty_program (name); \
         INSERT INTO loyalty_program (name, points) VALUES ('Bronze', 10)",
    );
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "loyalty_program", 3);
    }
    c.wait_converged("loyalty_program");
    for n in ["branch1", "branch2"] {
        let node = c.node(n);
        assert_eq!(
            node.sql("SELECT obj_description('loyalty_program'::regclass)"),
            "Loyalty Program"
        );
        assert_eq!(
            node.sql("SELECT col_description('loyalty_program'::regclass, 2)"),
            "Program Name"
        );
        assert_eq!(
            node.sql(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'loyalty_program_name_index'"
            ),
            "1"
        );
        assert_eq!(
            node.sql("SELECT count(DISTINCT name) FROM loyalty_program"),
            "3",
            "each row exactly once"
        );
    }
    // The new table's sequence serves each node's own ids (partitioned on arrival).
    for n in &c.nodes {
        wait_for(
            &format!("loyalty_program_id_seq partitioned on {}", n.name),
            DEADLINE,
            || {
                n.sql("SELECT increment_by FROM pg_sequences WHERE sequencename = 'loyalty_program_id_seq'") == "16"
            },
            || c.logs(),
        );
    }
    // A trusted branch's DDL reaches the other branch through the hub, and rows written
    // with it.
    c.node("branch1")
        .sql("ALTER TABLE loyalty_program ADD COLUMN expires date");
    c.node("branch1")
        .sql("INSERT INTO loyalty_program (name, expires) VALUES ('Branch promo', '2026-12-31')");
    c.wait_rows("branch2", "loyalty_program", 4);
    assert_eq!(
        c.node("branch2")
            .sql("SELECT expires FROM loyalty_program WHERE name = 'Branch promo'"),
        "2026-12-31"
    );
    c.wait_converged("loyalty_program");
}

#[test]
fn ddl_on_main_during_a_cut_and_data_in_the_new_column_on_the_branch_after_heal() {
    let mut c = TestCluster::new(
        "ddl-cut",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO product (name, price) VALUES ('Soap', 2)");
    c.wait_rows("branch1", "product", 1);
    c.stop();
    c.node("main")
        .sql("ALTER TABLE product ADD COLUMN barcode varchar");
    c.node("main")
        .sql("UPDATE product SET barcode = '5901234123457'");
    c.node("branch1")
        .sql("INSERT INTO product (name, price) VALUES ('Tea', 4)");
    c.start();
    let b1 = c.node("branch1");
    wait_for(
        "branch1 to get the new column",
        DEADLINE,
        || {
            b1.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'product' AND column_name = 'barcode'") == "1"
        },
        || c.logs(),
    );
    b1.sql("UPDATE product SET barcode = '4006381333931' WHERE name = 'Tea'");
    c.wait_converged("product");
    assert_eq!(
        c.node("main")
            .sql("SELECT barcode FROM product WHERE name = 'Tea'"),
        "4006381333931"
    );
    assert_eq!(
        c.node("branch1")
            .sql("SELECT barcode FROM product WHERE name = 'Soap'"),
        "5901234123457"
    );
}

#[test]
fn ddl_run_by_the_applier_is_not_captured_again_and_temporary_tables_stay_home() {
    let mut c = TestCluster::new("ddl-echo", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("CREATE TEMP TABLE scratch (x int); CREATE TABLE note (id int PRIMARY KEY)");
    c.wait_rows("b", "pg_tables WHERE tablename = 'note'", 1);
    c.node("a").sql("INSERT INTO note VALUES (1)");
    c.wait_rows("b", "note", 1);
    // b logged a's statement (the row travelled) but captured nothing of its own.
    assert_eq!(
        c.node("b")
            .sql("SELECT count(*) FROM walsync.ddl_log WHERE origin = 'b'"),
        "0"
    );
    assert_eq!(
        c.node("a").sql("SELECT count(*) FROM walsync.ddl_log"),
        "1",
        "the temp table was not captured"
    );
    assert_eq!(
        c.node("b")
            .sql("SELECT count(*) FROM walsync.ddl_log WHERE origin = 'a'"),
        "1"
    );
}

#[test]
fn a_ddl_that_fails_on_a_target_waits_set_aside_with_its_table_until_skipped_and_the_rest_flows() {
    let mut c = TestCluster::new("ddl-fail", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    // b already has an object of that name, made outside walsync (not captured), and
    // not as a's (the same definition would count as applied here already).
    c.node("b").sql("SET session_replication_role = replica; CREATE TABLE coupon (id int PRIMARY KEY, code varchar(40))");
    c.node("a")
        .sql("CREATE TABLE coupon (id int PRIMARY KEY, code text)");
    c.node("a").sql("INSERT INTO coupon VALUES (1, 'WELCOME')");
    c.node("a")
        .sql("INSERT INTO partner (id, name) VALUES (1, 'after the failing ddl')");
    // The statement waits on b, set aside with what changes its table; the rest flows.
    c.wait_rows("b", "partner", 1);
    c.wait_rows("b", "walsync.set_aside", 2);
    assert_eq!(
        c.node("b").count("coupon"),
        0,
        "the coupon waits behind its ddl"
    );
    c.assert_no_link_stopped();
    let cfg = c.node("b").config.to_str().unwrap().to_string();
    let (ok, status) = walsync(&["status", "--config", &cfg]);
    assert!(
        !ok && status.contains("waiting for ddl a/1 to run here (it fails:")
            && status.contains("already exists"),
        "{status}"
    );
    let (ok, pending) = walsync(&["ddl-replay", "--config", &cfg]);
    assert!(
        ok && pending.contains("a/1") && pending.contains("CREATE TABLE coupon"),
        "{pending}"
    );

    // The operator checks the table is right, then skips the statement: what waited
    // behind it applies, in order.
    let (ok, out) = walsync(&["ddl-replay", "--config", &cfg, "--skip", "a/1"]);
    assert!(ok, "{out}");
    c.wait_rows("b", "walsync.set_aside", 0);
    c.wait_rows("b", "coupon WHERE code = 'WELCOME'", 1);
    let (ok, out) = walsync(&["ddl-replay", "--config", &cfg]);
    assert!(ok && out.contains("no captured DDL waiting"), "{out}");
    c.node("a").sql("INSERT INTO coupon VALUES (2, 'AGAIN')");
    c.wait_rows("b", "coupon", 2);
}

#[test]
fn rows_before_and_after_an_alter_in_one_transaction_all_arrive() {
    let mut c = TestCluster::new("ddl-mid-txn", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    // Inserts are batched on the target; the ALTER makes the upstream describe the table
    // anew in the middle of the batch.
    c.node("a").sql(
        "BEGIN; \
         INSERT INTO partner (id, name) SELECT g, 'before ' || g FROM generate_series(1, 5) g; \
         ALTER TABLE partner ADD COLUMN vat text; \
         INSERT INTO partner (id, name, vat) SELECT g, 'after ' || g, 'BE' || g FROM generate_series(6, 10) g; \
         COMMIT",
    );
    c.wait_rows("b", "partner", 10);
    c.wait_converged("partner");
    assert_eq!(c.node("b").sql("SELECT count(vat) FROM partner"), "5");
}

/// Small transactions go to the target in one statement each, prepared once for all of
/// one shape (decision 0013); a replayed DDL that renames a column makes that statement
/// anew, and the transactions after it arrive without an error.
#[test]
fn a_statement_made_for_many_small_transactions_is_made_anew_after_a_column_is_renamed() {
    let mut c = TestCluster::new(
        "ddl-one-statement",
        Topology::Mesh,
        &["a", "b"],
        RETAIL_SCHEMA,
    );
    for n in ["a", "b"] {
        c.node_mut(n).one_apply_session();
    }
    c.start();
    let partners = |from: i32, column: &str| -> String {
        (from..from + 3)
            .map(|i| {
                format!("BEGIN; INSERT INTO partner (id, {column}) VALUES ({i}, 'P{i}'); COMMIT;")
            })
            .collect()
    };
    c.node("a").sql(&partners(1, "name"));
    c.wait_rows("b", "partner", 3);
    c.node("a")
        .sql("ALTER TABLE partner RENAME COLUMN name TO display_name");
    c.node("a").sql(&partners(4, "display_name"));
    c.wait_rows("b", "partner", 6);
    c.wait_converged("partner");
    let log = c.node("b").sidecar_log();
    assert!(
        log.contains("sent in one statement"),
        "no transaction went in one statement:\n{}",
        c.logs()
    );
    assert!(
        !log.contains("does not exist"),
        "a statement made before the rename was used after it:\n{}",
        c.logs()
    );
}

/// A unique key added by a replayed DDL statement counts at once on a link that has been
/// writing the table: a row that meets it afterwards is settled as on a key the table had
/// from the start (the older row renamed), not refused. After a DDL replay a link keeps a
/// table's map and statements only if the catalog shows the table unchanged.
#[test]
fn a_unique_key_added_by_ddl_settles_the_next_collision_on_a_running_link() {
    let mut c = TestCluster::new("ddl-unique", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (id, name, email) VALUES (1, 'Ann', 'ann@shop')");
    c.wait_rows("b", "partner", 1);
    // b keeps its link from a (which now knows partner); a's link from b stops, so b's
    // next partner stays on b for now.
    c.node_mut("a").stop_sidecar();
    c.node("b")
        .sql("INSERT INTO partner (id, name, email) VALUES (2, 'Cy at b', 'cy@shop')");
    c.node("a")
        .sql("ALTER TABLE partner ADD CONSTRAINT partner_email_key UNIQUE (email)");
    c.node("a")
        .sql("INSERT INTO partner (id, name, email) VALUES (3, 'Cy at a', 'cy@shop')");
    c.wait_rows("b", "partner", 3);
    c.node_mut("a").start_sidecar();
    c.wait_rows("a", "partner", 3);
    c.wait_converged("partner");
    let emails = c
        .node("b")
        .sql("SELECT email FROM partner WHERE id IN (2, 3) ORDER BY id");
    assert_eq!(
        emails,
        "cy@shop [conflict #c]\ncy@shop",
        "the older row is renamed on the key added by DDL, the later keeps its value:\n{}",
        c.logs()
    );
    let recorded = c.node("b").sql(
        "SELECT count(*) FROM walsync.conflicts WHERE table_name = 'partner' \
         AND detail LIKE '%partner_email_key%'",
    );
    assert_eq!(recorded, "1", "b records the collision:\n{}", c.logs());
}

#[test]
fn a_column_added_with_values_computed_per_node_is_reported() {
    let mut c = TestCluster::new(
        "ddl-volatile",
        Topology::Star,
        &["a", "b", "x"],
        RETAIL_SCHEMA,
    );
    c.start();
    // Rows written on every node: most of them not by the node that will run the DDL.
    for n in ["a", "b", "x"] {
        c.node(n).sql(&format!(
            "INSERT INTO partner (name) SELECT '{n} ' || g FROM generate_series(1, 20) g"
        ));
    }
    for n in ["a", "b", "x"] {
        c.wait_rows(n, "partner", 60);
    }
    c.node("a")
        .sql("ALTER TABLE partner ADD COLUMN seen timestamptz DEFAULT now()");
    c.wait_rows("b", "walsync.ddl_warnings", 1);
    c.wait_rows("x", "walsync.ddl_warnings", 1);
    let cfg = c.node("b").config.to_str().unwrap().to_string();
    let (_, out) = walsync(&["status", "--config", &cfg]);
    assert!(out.contains("seen") && out.contains("UPDATE"), "{out}");
    // The documented fix: set the column on the author; it replicates as data, and the
    // rows that differ on purpose are not a conflict each.
    c.node("a").sql("UPDATE partner SET seen = seen");
    c.wait_converged("partner");
    for n in ["a", "b", "x"] {
        assert_eq!(
            c.node(n).sql("SELECT count(*) FROM walsync.conflicts"),
            "0",
            "{n}: the repair is no conflict storm"
        );
    }
    let id = c
        .node("b")
        .sql("SELECT origin || '/' || seq FROM walsync.ddl_warnings");
    let (ok, out) = walsync(&["ddl-replay", "--config", &cfg, "--resolve-warning", &id]);
    assert!(ok, "{out}");
    let (_, out) = walsync(&["status", "--config", &cfg]);
    assert!(
        !out.contains("filled by this node"),
        "the warning is closed: {out}"
    );
}

#[test]
fn the_same_module_installed_on_two_nodes_during_a_cut_settles_itself() {
    let mut c = TestCluster::new("ddl-twice", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.stop();
    // One module installed on two stores while they are apart: a table, then its
    // columns, a constraint and an index, statement by statement, as Odoo does.
    let install = "CREATE TABLE gift_card (id serial NOT NULL, PRIMARY KEY (id)); \
                   ALTER TABLE gift_card ADD COLUMN code varchar NOT NULL; \
                   ALTER TABLE gift_card ADD COLUMN amount numeric DEFAULT 0; \
                   ALTER TABLE gift_card ADD CONSTRAINT gift_card_code_uniq UNIQUE (code); \
                   CREATE INDEX gift_card_amount_index ON gift_card (amount)";
    c.node("a").sql(install);
    c.node("b").sql(install);
    c.node("a")
        .sql("INSERT INTO gift_card (code, amount) VALUES ('A-1', 10)");
    c.node("b")
        .sql("INSERT INTO gift_card (code, amount) VALUES ('B-2', 20)");
    c.start();
    c.wait_rows("a", "gift_card", 2);
    c.wait_rows("b", "gift_card", 2);
    c.wait_converged("gift_card");
    for n in &c.nodes {
        // Each of the other node's five statements was found here already, and noted.
        assert_eq!(
            n.sql("SELECT count(*) FROM walsync.ddl_warnings WHERE warning LIKE 'already here:%' AND resolved_at IS NOT NULL"),
            "5",
            "{}",
            n.name
        );
        let (ok, status) = n.walsync(&["status"]);
        assert!(ok, "nothing needs a person:\n{status}");
    }
    c.node("a")
        .sql("INSERT INTO gift_card (code, amount) VALUES ('A-3', 30)");
    c.wait_rows("b", "gift_card", 3);
}

#[test]
fn the_same_table_created_differently_on_two_nodes_during_a_cut_waits_for_a_person_while_the_rest_flows(
) {
    let mut c = TestCluster::new("ddl-differ", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    c.start();
    c.stop();
    c.node("a")
        .sql("CREATE TABLE gift_card (id int PRIMARY KEY, code text)");
    c.node("b")
        .sql("CREATE TABLE gift_card (id int PRIMARY KEY, code varchar(20))");
    c.node("a").sql("INSERT INTO gift_card VALUES (1, 'A-1')");
    c.node("b").sql("INSERT INTO gift_card VALUES (2, 'B-2')");
    c.start();
    let (cfg_a, cfg_b) = (
        c.node("a").config.to_str().unwrap().to_string(),
        c.node("b").config.to_str().unwrap().to_string(),
    );
    for cfg in [&cfg_a, &cfg_b] {
        wait_for(
            "the second CREATE TABLE to wait set aside",
            DEADLINE,
            || {
                walsync(&["status", "--config", cfg])
                    .1
                    .contains("already exists")
            },
            || walsync(&["status", "--config", cfg]).1,
        );
    }
    // Everything else flows meanwhile, both ways; no link stops.
    c.node("a")
        .sql("INSERT INTO partner (name) VALUES ('meanwhile on a')");
    c.node("b")
        .sql("INSERT INTO partner (name) VALUES ('meanwhile on b')");
    for n in ["a", "b"] {
        c.wait_rows(n, "partner WHERE name LIKE 'meanwhile%'", 2);
    }
    c.assert_no_link_stopped();
    // A person decides: each node keeps its own column type and skips the other's.
    for (cfg, other) in [(&cfg_a, "b"), (&cfg_b, "a")] {
        let (ok, out) = walsync(&[
            "ddl-replay",
            "--config",
            cfg,
            "--skip",
            &format!("{other}/1"),
        ]);
        assert!(ok, "{out}");
    }
    c.wait_rows("a", "gift_card", 2);
    c.wait_rows("b", "gift_card", 2);
}

#[test]
fn rows_for_a_table_or_column_main_dropped_during_a_cut_are_recorded_and_the_rest_flows() {
    let mut c = TestCluster::new(
        "ddl-drop",
        Topology::Star,
        &["main", "branch1", "branch2"],
        &format!(
            "{RETAIL_SCHEMA}CREATE TABLE loyalty_card (id serial PRIMARY KEY, code text NOT NULL);"
        ),
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (name, email) VALUES ('Ana', 'ana@shop')");
    c.wait_converged("partner");
    c.stop();
    // A module uninstall on main: a table and a column go.
    c.node("main")
        .sql("DROP TABLE loyalty_card; ALTER TABLE partner DROP COLUMN email");
    // Meanwhile the branch still uses both.
    c.node("branch1").sql(
        "INSERT INTO loyalty_card (code) VALUES ('LC-1'), ('LC-2');
         INSERT INTO partner (name, email) VALUES ('Bo', 'bo@shop');
         UPDATE partner SET email = 'ana@home', name = 'Ana Lima' WHERE name = 'Ana';
         INSERT INTO pos_order (name, amount_total) VALUES ('B1/0001', 12);",
    );
    c.start();
    for t in ["partner", "pos_order"] {
        c.wait_converged(t);
    }
    let main = c.node("main");
    assert_eq!(
        main.sql("SELECT string_agg(name, ',' ORDER BY name) FROM partner"),
        "Ana Lima,Bo",
        "the rest of each change was applied"
    );
    assert_eq!(main.count("pos_order"), 1, "later changes were not held up");
    for n in &c.nodes {
        assert_eq!(
            n.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'loyalty_card'"),
            "0",
            "the drop reached {}",
            n.name
        );
    }
    // Nothing vanished silently: main holds what it could not apply, with the values.
    let records = main.sql(
        "SELECT kind || '|' || coalesce(remote_row->>'code', remote_row->>'email') FROM walsync.conflicts \
         WHERE rule = 'dropped_here' ORDER BY 1",
    );
    assert_eq!(
        records,
        "column_dropped|ana@home\ncolumn_dropped|bo@shop\ntable_dropped|LC-1\ntable_dropped|LC-2"
    );
    let (ok, status) = walsync(&["status", "--config", main.config.to_str().unwrap()]);
    assert!(ok, "no link needs a person:\n{status}");
}

#[test]
fn ddl_replay_apply_brings_a_node_whose_schema_is_behind_up_to_date_before_its_links_run() {
    let mut c = TestCluster::new(
        "ddl-apply",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    c.start();
    c.node("main")
        .sql("INSERT INTO product (name, price) VALUES ('Soap', 2)");
    c.wait_converged("product");
    c.node_mut("branch1").stop_sidecar();
    c.node("main").sql(
        "CREATE TABLE coupon (id serial PRIMARY KEY, code text NOT NULL); \
         ALTER TABLE product ADD COLUMN barcode text; \
         INSERT INTO coupon (code) VALUES ('WELCOME')",
    );
    let config = c.node("branch1").config.to_str().unwrap().to_string();
    let (ok, shown) = walsync(&["ddl-replay", "--config", &config]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("CREATE TABLE coupon")
            && shown.contains("ALTER TABLE product ADD COLUMN barcode text")
            && shown.contains("2 statement(s) not applied on node branch1"),
        "{shown}"
    );
    assert_eq!(
        c.node("branch1")
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'coupon'"),
        "0",
        "the default view changes nothing"
    );
    let (ok, out) = walsync(&["ddl-replay", "--config", &config, "--apply"]);
    assert!(ok, "{out}");
    let b1 = c.node("branch1");
    assert_eq!(
        b1.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'product' AND column_name = 'barcode'"),
        "1"
    );
    assert_eq!(
        b1.sql("SELECT increment_by FROM pg_sequences WHERE sequencename = 'coupon_id_seq'"),
        "16",
        "a sequence created by --apply is partitioned for this node"
    );
    let (ok, again) = walsync(&["ddl-replay", "--config", &config]);
    assert!(ok && again.contains("no captured DDL waiting"), "{again}");
    // The link delivers the same statements: they are here already, nothing stops.
    c.node_mut("branch1").start_sidecar();
    c.wait_converged("coupon");
    c.node("main")
        .sql("UPDATE product SET barcode = '4006381333931'");
    c.wait_converged("product");
    assert_eq!(c.node("branch1").count("walsync.conflicts"), 0);
    let (ok, status) = walsync(&["status", "--config", &config]);
    assert!(ok, "{status}");
}

/// Captured DDL is data written by whoever may run DDL on a peer; replaying it must run
/// that one statement and nothing smuggled beside it (docs/security.md).
#[test]
fn hostile_or_unusual_captured_ddl_runs_only_its_own_statement_and_the_links_go_on() {
    let mut c = TestCluster::new(
        "ddl-hostile",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    // A role whose name needs quoting, on every server (roles are not replicated).
    for n in &c.nodes {
        n.sql(
            "SET session_replication_role = replica; \
             CREATE ROLE \"Store \"\"Manager\"\"\"; \
             GRANT CREATE ON SCHEMA public TO \"Store \"\"Manager\"\"\"",
        );
    }
    c.start();
    c.node("main").sql(
        "CREATE TABLE victim (id int PRIMARY KEY, note text); INSERT INTO victim VALUES (1, 'keep me')",
    );
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "victim", 1);
    }

    // 1. SQL smuggled in the search_path: set on main, where it is just an odd schema name.
    c.node("main").sql(
        "SELECT set_config('search_path', 's;DROP/**/TABLE/**/public.victim;--', false); \
         CREATE TABLE public.after_odd_path (id int PRIMARY KEY)",
    );
    // 2. An empty search_path, as a pg_dump script sets it.
    c.node("main").sql(
        "SELECT pg_catalog.set_config('search_path', '', false); \
         CREATE TABLE public.from_dump (id int PRIMARY KEY)",
    );
    // 3. A statement ending in a `--` comment, by a role that needs quoting and may not
    //    write walsync's tables: whatever follows the DDL must run as the applier again.
    c.node("main").sql(
        "SET SESSION AUTHORIZATION \"Store \"\"Manager\"\"\"; \
         CREATE TABLE public.manager_notes (id int PRIMARY KEY, note text) -- the manager's own table",
    );
    // 4. Bodies in dollar quotes, with semicolons inside.
    c.node("main").sql(
        "CREATE FUNCTION public.add_one(i int) RETURNS int LANGUAGE sql AS $$ SELECT i + 1; $$; \
         CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $body$ \
           BEGIN NEW.note := coalesce(NEW.note, '') || ';'; RETURN NEW; END $body$",
    );
    c.node("main")
        .sql("INSERT INTO partner (name) VALUES ('after the odd ddl')");

    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "partner", 1);
        let node = c.node(n);
        assert_eq!(
            node.sql("SELECT note FROM victim"),
            "keep me",
            "{n}: the table named in the search_path survives"
        );
        assert_eq!(
            node.sql(
                "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables \
                 WHERE tablename IN ('after_odd_path', 'from_dump', 'manager_notes')"
            ),
            "after_odd_path,from_dump,manager_notes",
            "{n}: every DDL statement replayed"
        );
        assert_eq!(
            node.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'manager_notes'"),
            "Store \"Manager\"",
            "{n}: replayed as the role that ran it"
        );
        assert_eq!(node.sql("SELECT public.add_one(41)"), "42");
        assert_eq!(
            node.sql("SELECT count(*) FROM pg_proc WHERE proname = 'stamp'"),
            "1"
        );
    }
    // The links go on: rows into the new tables follow.
    c.node("main")
        .sql("INSERT INTO manager_notes VALUES (1, 'count the till')");
    for n in ["branch1", "branch2"] {
        c.wait_rows(n, "manager_notes", 1);
    }
    c.wait_converged("victim");
    c.wait_converged("partner");
}

/// Schema walsync is walsync's own: a user object cannot land there by accident (a role
/// named walsync finds it first in the default search_path), walsync's own objects
/// cannot be dropped from an ordinary session, and re-running init captures nothing.
#[test]
fn schema_walsync_stays_walsyncs_own_and_a_rerun_init_captures_nothing() {
    let mut c = TestCluster::new("ddl-own-schema", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    for n in &c.nodes {
        n.sql("SET session_replication_role = replica; CREATE ROLE walsync SUPERUSER");
    }
    c.start();
    let a = c.node("a");
    let captured = |n: &Node| n.sql("SELECT count(*) FROM walsync.ddl_log WHERE origin = 'a'");
    // The docs' role name, the default search_path: refused, with the way out.
    let err = a
        .try_sql("SET SESSION AUTHORIZATION walsync; CREATE TABLE vouchers (id int PRIMARY KEY)")
        .unwrap_err();
    assert!(
        err.contains("schema walsync holds walsync's own objects") && err.contains("search_path"),
        "{err}"
    );
    let err = a.try_sql("DROP TABLE walsync.conflicts").unwrap_err();
    assert!(err.contains("was not dropped"), "{err}");
    assert_eq!(captured(a), "0");
    // Qualified, it lands in public and replicates.
    a.sql("SET SESSION AUTHORIZATION walsync; CREATE TABLE public.vouchers (id int PRIMARY KEY)");
    c.wait_rows("b", "pg_tables WHERE tablename = 'vouchers'", 1);
    assert_eq!(captured(a), "1");

    // Re-running init on a live node (as an upgrade does) captures none of its own DDL.
    let (ok, out) = walsync(&["init", "--config", a.config.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(
        captured(a),
        "1",
        "init's own statements are not DDL for the peers"
    );
    a.sql("INSERT INTO vouchers VALUES (1)");
    c.wait_rows("b", "vouchers", 1);
    let (ok, status) = c.node("b").walsync(&["status"]);
    assert!(ok, "{status}");
}

/// `[cluster] ddl_from = ["main"]`: a branch cannot push schema changes to main; its
/// statement is recorded and shown there, not run, and the link goes on.
#[test]
fn ddl_from_other_nodes_is_recorded_not_run() {
    let mut c = TestCluster::new(
        "ddl-from",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    c.set_cluster_option("ddl_from = [\"main\"]");
    c.start();
    c.node("branch1")
        .sql("CREATE TABLE public.branch_only (id int PRIMARY KEY)");
    c.node("branch1")
        .sql("INSERT INTO partner (name) VALUES ('after the refused ddl')");
    c.wait_rows("main", "partner", 1);
    assert_eq!(
        c.node("main")
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'branch_only'"),
        "0",
        "not run on main"
    );
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(
        status.contains("accepts schema changes only from main") && status.contains("branch_only"),
        "{status}"
    );
    // Main's own DDL still reaches the branch.
    c.node("main")
        .sql("CREATE TABLE public.from_main (id int PRIMARY KEY)");
    c.wait_rows("branch1", "pg_tables WHERE tablename = 'from_main'", 1);
}

/// A stolen store cannot take the chain: in a star, by default, main runs DDL from main
/// only. A branch superuser's table, function and trigger are recorded on main, not run
/// there nor on the other branch; a `ddl_log` row the branch forges in main's name is
/// refused and not kept; main and the other branch keep trading rows. A person on main
/// accepts the table, which then reaches every node as main's change.
#[test]
fn a_stores_ddl_waits_on_main_for_a_person_and_a_forged_ddl_row_is_refused() {
    let mut c = TestCluster::new(
        "ddl-contained",
        Topology::Star,
        &["main", "branch1", "branch2"],
        RETAIL_SCHEMA,
    );
    a_stolen_store_is_contained(&mut c);
}

/// The same with every sidecar (and the operator's `ddl-replay --accept` on main) as the
/// unprivileged role `init --grant-to` makes, the tables owned by the application's
/// role, and replayed DDL run as that role (`ddl_role`).
#[test]
fn a_stores_ddl_is_contained_with_least_privilege_sidecars() {
    let prepare = |pg: &walsync_testkit::localpg::LocalCluster| owned_by_shop(pg, RETAIL_SCHEMA);
    let mut c = TestCluster::new_in(
        "ddl-contained-lp",
        Topology::Star,
        &["main", "branch1", "branch2"],
        "postgres",
        &prepare,
        "",
    );
    c.run_as_walsync();
    c.set_cluster_option("ddl_role = \"shop\"");
    a_stolen_store_is_contained(&mut c);
    c.assert_sessions_are_walsyncs();
}

fn a_stolen_store_is_contained(c: &mut TestCluster) {
    c.start();
    c.node("branch1").sql(
        "CREATE TABLE branch_audit (msg text, port int); \
         CREATE FUNCTION stolen() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO branch_audit VALUES (NEW.name, inet_server_port()); RETURN NEW; END $$; \
         CREATE TRIGGER stolen AFTER INSERT ON partner FOR EACH ROW EXECUTE FUNCTION stolen()",
    );
    c.node("branch1").sql(
        "INSERT INTO walsync.ddl_log (origin, seq, statement_index, query, command_tag, search_path, role) \
         VALUES ('main', 999, 1, 'CREATE TABLE forged (id int)', 'CREATE TABLE', 'public', 'postgres')",
    );
    c.node("main")
        .sql("INSERT INTO partner (name) VALUES ('from main')");
    c.node("branch2")
        .sql("INSERT INTO partner (name) VALUES ('from branch2')");
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(n, "partner WHERE name IN ('from main', 'from branch2')", 2);
    }
    // A merge note forged in main's name would have every node merge main's customer
    // into branch2's (and delete it).
    let (ours, theirs) = (
        c.node("main")
            .sql("SELECT id FROM partner WHERE name = 'from main'"),
        c.node("main")
            .sql("SELECT id FROM partner WHERE name = 'from branch2'"),
    );
    c.node("branch1").sql(&format!(
        "INSERT INTO walsync.merged_keys (table_schema, table_name, loser_key, winner_key, decided_by) \
         VALUES ('public', 'partner', '[\"{ours}\"]', '[\"{theirs}\"]', 'main')"
    ));
    c.node("branch1")
        .sql("INSERT INTO partner (name) VALUES ('from branch1')");
    c.wait_rows("main", "walsync.conflicts WHERE kind = 'forged_record'", 1);
    // branch1's customer is set aside on main whole (its trigger wrote into a table main
    // refused); the link from branch1 goes on with what does not wait behind it.
    c.wait_rows("main", "walsync.set_aside", 1);
    c.node("branch1")
        .sql("INSERT INTO product (name, price) VALUES ('from branch1', 1)");
    c.wait_rows("main", "product WHERE name = 'from branch1'", 1);
    c.assert_no_link_stopped();
    // main <-> branch2 and main -> branch1 go on.
    c.node("branch2")
        .sql("INSERT INTO partner (name) VALUES ('branch2 later')");
    for n in ["main", "branch1", "branch2"] {
        c.wait_rows(
            n,
            "partner WHERE name IN ('from main', 'from branch2', 'branch2 later')",
            3,
        );
    }
    for n in ["main", "branch2"] {
        assert_eq!(
            c.node(n).count("walsync.merged_keys"),
            0,
            "{n}: the forged note is not kept"
        );
    }
    c.wait_rows("main", "walsync.ddl_warnings WHERE resolved_at IS NULL", 4);
    c.wait_rows(
        "branch2",
        "walsync.ddl_warnings WHERE resolved_at IS NULL",
        3,
    );
    for n in ["main", "branch2"] {
        let node = c.node(n);
        assert_eq!(
            node.sql(
                "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = 'partner'::regclass AND tgname <> 'walsync_tombstone'"
            ),
            "0",
            "{n}: no trigger of branch1's"
        );
        assert_eq!(
            node.sql("SELECT count(*) FROM pg_proc WHERE proname = 'stolen'"),
            "0",
            "{n}"
        );
        assert_eq!(
            node.sql(
                "SELECT count(*) FROM pg_tables WHERE tablename IN ('forged', 'branch_audit')"
            ),
            "0",
            "{n}"
        );
        assert_eq!(
            node.count("walsync.ddl_log WHERE seq = 999"),
            0,
            "{n}: the forged row is not kept"
        );
    }
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(
        status.contains("accepts schema changes only from main")
            && status.contains("branch_audit")
            && status.contains("claiming to be main's DDL")
            && status.contains("1 transaction(s) set aside, waiting for public.branch_audit"),
        "{status}"
    );

    // A person on main accepts the table: it runs there and reaches branch2 as main's;
    // branch1's rows that needed it flow again. The function and trigger stay refused.
    let (ok, out) = c
        .node("main")
        .walsync(&["ddl-replay", "--accept", "branch1/1"]);
    assert!(ok, "{out}");
    c.wait_rows("branch2", "pg_tables WHERE tablename = 'branch_audit'", 1);
    c.wait_rows("main", "walsync.set_aside", 0);
    for n in ["main", "branch2"] {
        c.wait_rows(n, "partner WHERE name = 'from branch1'", 1);
        c.wait_rows(n, "branch_audit", 1);
        assert_eq!(
            c.node(n).sql("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = 'partner'::regclass AND tgname <> 'walsync_tombstone'"),
            "0"
        );
    }
    c.wait_rows(
        "branch2",
        "walsync.ddl_warnings WHERE origin = 'branch1' AND seq = 1 AND resolved_at IS NOT NULL",
        1,
    );
    c.node("branch1")
        .sql("INSERT INTO partner (name) VALUES ('branch1 again')");
    c.wait_rows("branch2", "partner WHERE name = 'branch1 again'", 1);
}

/// `[cluster] ddl_role`: replayed DDL runs as that role, not as whoever ran it on its
/// author (here a superuser): what it creates belongs to the application's role, and a
/// peer's superuser is never borrowed.
#[test]
fn replayed_ddl_runs_as_the_configured_role() {
    let prepare = |pg: &walsync_testkit::localpg::LocalCluster| owned_by_shop(pg, RETAIL_SCHEMA);
    let mut c = TestCluster::new_in(
        "ddl-role",
        Topology::Mesh,
        &["a", "b"],
        "postgres",
        &prepare,
        "",
    );
    c.set_cluster_option("ddl_role = \"shop\"");
    c.start();
    c.node("a")
        .sql("CREATE TABLE voucher (id serial PRIMARY KEY, code text)");
    c.wait_rows("b", "pg_tables WHERE tablename = 'voucher'", 1);
    assert_eq!(
        c.node("a")
            .sql("SELECT tableowner FROM pg_tables WHERE tablename = 'voucher'"),
        "postgres"
    );
    assert_eq!(
        c.node("b")
            .sql("SELECT tableowner FROM pg_tables WHERE tablename = 'voucher'"),
        "shop",
        "replayed as ddl_role, not as a's superuser"
    );
    c.node("a").sql("INSERT INTO voucher (code) VALUES ('V-1')");
    c.wait_rows("b", "voucher", 1);
}
