//! The real thing: Odoo 16's Point of Sale install (2,863 DDL strings, as Odoo sent them)
//! on main while branch2 is cut off, on databases restored from a real Odoo dump
//! (tests/fixtures/odoo, see its README).

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use support::*;
use walsync_testkit::localpg::LocalCluster;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/odoo")
}

fn psql_odoo(pg: &LocalCluster, sql: &str) -> String {
    pg.psql_in("odoo", sql).unwrap_or_else(|e| panic!("{e}"))
}

/// A database created as Odoo creates it, with the base-only Odoo dump restored.
fn restore_odoo_base(pg: &LocalCluster) {
    restore_odoo(pg, "odoo16_base.sql.gz");
}

/// A database created as Odoo creates it, with the Odoo dump `file` restored.
fn restore_odoo(pg: &LocalCluster, file: &str) {
    pg.psql("CREATE ROLE odoo LOGIN").unwrap();
    pg.psql("CREATE DATABASE odoo OWNER odoo TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C.UTF-8'")
        .unwrap();
    let dump = std::fs::File::open(fixtures().join(file))
        .unwrap_or_else(|e| panic!("fixture {file}: {e}"));
    let mut gunzip = Command::new("gunzip")
        .arg("-c")
        .stdin(dump)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
        ])
        .args(["-U", "odoo", "-d", "odoo"])
        .stdin(gunzip.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(gunzip.wait().unwrap().success());
    assert!(
        out.status.success(),
        "restore on {}: {}",
        pg.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_dump --schema-only` without the lines that differ on every dump. While DDL is
/// being replayed a dump can fail (it waits on the same locks): the error text is
/// returned then, which differs from any schema.
fn schema(pg: &LocalCluster) -> String {
    let out = Command::new("pg_dump")
        .args([
            "--schema-only",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "odoo",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return format!("pg_dump failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How `other_schema` (node `other`) differs from `reference` (node `name`): their
/// lengths and the first 10 lines that differ.
fn schema_differences(name: &str, reference: &str, other: &str, other_schema: &str) -> String {
    let diff: Vec<String> = reference
        .lines()
        .zip(other_schema.lines())
        .filter(|(x, y)| x != y)
        .take(10)
        .map(|(x, y)| format!("{name}: {x}\n{other}: {y}"))
        .collect();
    format!(
        "{} vs {} lines; first differences:\n{}",
        reference.lines().count(),
        other_schema.lines().count(),
        diff.join("\n")
    )
}

/// The tables of schema public (441 once the Point of Sale is installed).
fn pos_tables(pg: &LocalCluster) -> String {
    psql_odoo(
        pg,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
}

/// Replays the corpus on `pg` as Odoo sent it: one simple-query call per string, grouped
/// in one transaction per xid, skipping the 4 strings that need data Odoo filled first.
fn install_point_of_sale(pg: &LocalCluster) -> usize {
    let skip: Vec<i64> = {
        let text =
            std::fs::read_to_string(fixtures().join("pos_install_ddl.expected_failures.json"))
                .unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["expected_failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["seq"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(skip, [300, 1429, 1430, 1431]);
    let corpus = std::fs::read_to_string(fixtures().join("pos_install_ddl.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = corpus
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &pg.dsn_for("odoo").replace("user=postgres", "user=odoo"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut sent = 0;
        let mut xid = None;
        for l in &lines {
            let seq = l["seq"].as_i64().unwrap();
            if skip.contains(&seq) {
                continue;
            }
            if xid != l["xid"].as_i64() {
                if xid.is_some() {
                    client.batch_execute("COMMIT").await.unwrap();
                }
                client.batch_execute("BEGIN").await.unwrap();
                xid = l["xid"].as_i64();
            }
            let sql = l["sql"].as_str().unwrap();
            client
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("seq {seq}: {e}"));
            sent += 1;
        }
        client.batch_execute("COMMIT").await.unwrap();
        sent
    })
}

#[test]
fn point_of_sale_installed_on_main_while_a_branch_is_cut_reaches_every_node() {
    let mut c = TestCluster::new_in(
        "odoo-pos",
        Topology::Star,
        &["main", "branch1", "branch2"],
        "odoo",
        &restore_odoo_base,
        "",
    );
    c.start();
    c.node_mut("branch2").stop_sidecar();
    let sent = install_point_of_sale(&c.node("main").pg);
    assert_eq!(sent, 2859);
    c.node_mut("branch2").start_sidecar();

    let deadline = std::time::Duration::from_secs(240);
    // First the cheap condition: every captured statement applied (a pg_dump takes locks
    // that the replayed DDL then waits for); then the schemas.
    let captured = psql_odoo(&c.node("main").pg, "SELECT count(*) FROM walsync.ddl_log");
    for n in ["branch1", "branch2"] {
        let node = c.node(n);
        wait_for(
            &format!("{n} to apply the {captured} captured statements"),
            deadline,
            || psql_odoo(&node.pg, "SELECT count(*) FROM walsync.ddl_log") == captured,
            || c.logs(),
        );
    }
    let main_schema = || schema(&c.node("main").pg);
    for n in ["branch1", "branch2"] {
        let node = c.node(n);
        wait_for(
            &format!("{n}'s schema to equal main's"),
            deadline,
            || schema(&node.pg) == main_schema(),
            || {
                let differences = schema_differences("main", &main_schema(), n, &schema(&node.pg));
                format!("{differences}\n{}", c.logs())
            },
        );
    }
    for n in &c.nodes {
        assert_eq!(pos_tables(&n.pg), "441", "{}", n.name);
        let unpartitioned = psql_odoo(
            &n.pg,
            "SELECT count(*) FROM pg_sequences WHERE schemaname = 'public' AND increment_by <> 16",
        );
        assert_eq!(
            unpartitioned, "0",
            "every sequence partitioned on {}",
            n.name
        );
    }
}

/// Two stores install the Point of Sale while both are cut off (each with `ddl_from`
/// naming every node): each store's install reaches main and the other store, where the
/// same tables already exist. Each statement is recognised as already there, nothing is
/// set aside, no link stops, and the schemas converge.
#[test]
fn point_of_sale_installed_on_two_branches_during_one_cut_converges() {
    let mut c = TestCluster::new_in(
        "odoo-pos-twice",
        Topology::Star,
        &["main", "branch1", "branch2"],
        "odoo",
        &restore_odoo_base,
        "",
    );
    c.set_cluster_option("ddl_from = [\"main\", \"branch1\", \"branch2\"]");
    c.start();
    c.stop();
    for n in ["branch1", "branch2"] {
        assert_eq!(install_point_of_sale(&c.node(n).pg), 2859);
    }
    c.start();

    let deadline = std::time::Duration::from_secs(300);
    let reference = || schema(&c.node("branch1").pg);
    for n in ["main", "branch2"] {
        let node = c.node(n);
        wait_for(
            &format!("{n}'s schema to equal branch1's"),
            deadline,
            || {
                psql_odoo(&node.pg, "SELECT count(*) FROM walsync.set_aside") == "0"
                    && schema(&node.pg) == reference()
            },
            || {
                format!(
                    "set aside: {}; {}\n{}",
                    psql_odoo(&node.pg, "SELECT count(*) FROM walsync.set_aside"),
                    schema_differences("branch1", &reference(), n, &schema(&node.pg)),
                    c.logs()
                )
            },
        );
    }
    c.assert_no_link_stopped();
    for n in &c.nodes {
        assert_eq!(pos_tables(&n.pg), "441", "{}", n.name);
    }
}

/// docs/odoo.md's table policies, as every node's config carries them.
const ODOO_POLICIES: &str = r#"
[[tables]]
name = "bus_bus"
local = true

[[tables]]
name = "bus_presence"
local = true

[[tables]]
name = "ir_cron"
local_columns = ["nextcall", "lastcall"]

[[tables]]
name = "stock_quant"
counters = ["quantity", "reserved_quantity"]

[[tables]]
name = "mail_followers"
merge_unique = ["mail_followers_mail_followers_res_partner_res_model_id_uniq"]

[[tables]]
name = "account_move"
on_rename = { sequence_number = "0" }
"#;

/// What two stores sharing Odoo's default PoS journal do while cut off from each other,
/// on the real Odoo 16 PoS schema: none of it stops a link (issue: never stuck).
#[test]
fn collisions_odoo_makes_during_a_cut_are_renamed_or_merged_and_no_link_stops() {
    let mut c = TestCluster::new_in(
        "odoo-collide",
        Topology::Star,
        &["main", "branch1", "branch2"],
        "odoo",
        &|pg: &LocalCluster| restore_odoo(pg, "odoo16_pos.sql.gz"),
        ODOO_POLICIES,
    );
    c.start();
    fn marker(c: &TestCluster, n: &str, name: &str) {
        psql_odoo(
            &c.node(n).pg,
            &format!(
                "INSERT INTO res_partner (name, active, type) VALUES ('{name}', true, 'contact')"
            ),
        );
    }
    fn has(c: &TestCluster, n: &str, name: &str) -> bool {
        psql_odoo(
            &c.node(n).pg,
            &format!("SELECT count(*) FROM res_partner WHERE name = '{name}'"),
        ) == "1"
    }
    marker(&c, "main", "before the cut");
    for n in ["branch1", "branch2"] {
        wait_for(
            &format!("{n} to stream"),
            DEADLINE,
            || has(&c, n, "before the cut"),
            || c.logs(),
        );
    }
    c.stop();
    for n in ["branch1", "branch2"] {
        let pg = &c.node(n).pg;
        // Closing a session: a draft entry in the shared POSS journal, then posted under
        // the next name each store computed from its own copy of the journal.
        let id = psql_odoo(
            pg,
            "INSERT INTO account_move (journal_id, currency_id, company_id, state, move_type, auto_post, date, name) \
             SELECT j.id, co.currency_id, co.id, 'draft', 'entry', 'no', current_date, '/' \
             FROM account_journal j JOIN res_company co ON co.id = j.company_id WHERE j.code = 'POSS' \
             RETURNING id",
        );
        let id = id.lines().next().unwrap().to_string();
        psql_odoo(
            pg,
            &format!(
                "UPDATE account_move SET state = 'posted', name = 'POSS/2026/11/0001', \
                   sequence_prefix = 'POSS/2026/11/', sequence_number = 1 WHERE id = {id}"
            ),
        );
        // The admin's first login at each store creates their settings, and a call
        // there sets a partner's volume in them; the same follower is added on both,
        // with the default subtype (and on branch2 one more).
        psql_odoo(
            pg,
            "WITH s AS (INSERT INTO res_users_settings (user_id) VALUES (2) RETURNING id) \
             INSERT INTO res_users_settings_volumes (user_setting_id, partner_id, volume) SELECT id, 3, 0.5 FROM s",
        );
        // Each store's manager creates a cashier with the same login.
        psql_odoo(
            pg,
            &format!(
                "WITH p AS (INSERT INTO res_partner (name, active, type) VALUES ('Cashier of {n}', true, 'contact') RETURNING id) \
                 INSERT INTO res_users (login, partner_id, company_id, active, notification_type, share) \
                 SELECT 'cashier', p.id, 1, true, 'email', false FROM p"
            ),
        );
        let extra = if n == "branch2" { ", (2)" } else { "" };
        psql_odoo(
            pg,
            &format!(
                "WITH f AS (INSERT INTO mail_followers (res_model, res_id, partner_id) VALUES ('res.partner', 999999, 3) RETURNING id) \
                 INSERT INTO mail_followers_mail_message_subtype_rel SELECT f.id, s.id FROM f, (VALUES (1){extra}) s(id)"
            ),
        );
    }
    c.start();
    let checksum = |pg: &LocalCluster| {
        [
            "account_move",
            "res_users",
            "res_users_settings",
            "res_users_settings_volumes",
            "mail_followers",
            "mail_followers_mail_message_subtype_rel",
        ]
        .map(|t| {
            psql_odoo(
                pg,
                &format!("SELECT count(*) || ':' || md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))) FROM {t} t"),
            )
        })
        .join(" ")
    };
    wait_for(
        "the tables that collided identical on every node",
        DEADLINE,
        || {
            let sums: Vec<String> = c.nodes.iter().map(|n| checksum(&n.pg)).collect();
            sums.windows(2).all(|w| w[0] == w[1])
        },
        || c.logs(),
    );
    marker(&c, "branch1", "after the collisions");
    for n in ["main", "branch2"] {
        wait_for(
            &format!("{n} to get what branch1 wrote after the collisions"),
            DEADLINE,
            || has(&c, n, "after the collisions"),
            || c.logs(),
        );
    }
    for n in &c.nodes {
        let q = |sql: &str| psql_odoo(&n.pg, sql);
        assert_eq!(
            q("SELECT count(*) FROM account_move WHERE name LIKE 'POSS/2026/11/0001%' AND state = 'posted'"),
            "2",
            "{}: both stores' entries are kept",
            n.name
        );
        // The older one is renamed with no digit added (Odoo reads the number out of the
        // name) and gives up its number (on_rename), so that Odoo's next number in the
        // journal follows the entry that kept the name.
        assert_eq!(
            q("SELECT string_agg(sequence_number || ' ' || (name ~ '^POSS/2026/11/0001 \\[conflict #[a-j]+\\]$'), ',' \
               ORDER BY sequence_number) FROM account_move WHERE name LIKE 'POSS/2026/11/0001%'"),
            "0 true,1 false",
            "{}",
            n.name
        );
        // One settings row, with the partner's volume once, and nothing pointing at
        // the row merged away.
        assert_eq!(
            q("SELECT count(*) FROM res_users_settings WHERE user_id = 2"),
            "1",
            "{}",
            n.name
        );
        assert_eq!(
            q("SELECT count(*) FROM res_users_settings_volumes v JOIN res_users_settings s ON s.id = v.user_setting_id \
               WHERE s.user_id = 2 AND v.partner_id = 3"),
            "1",
            "{}",
            n.name
        );
        assert_eq!(
            q("SELECT count(*) FROM res_users_settings_volumes v \
               WHERE NOT EXISTS (SELECT 1 FROM res_users_settings s WHERE s.id = v.user_setting_id)"),
            "0",
            "{}: no volume left pointing at the merged-away settings",
            n.name
        );
        // Both cashiers stay, each with their own partner; the older one's login renamed.
        assert_eq!(
            q("SELECT string_agg(CASE WHEN u.login = 'cashier' THEN 'kept' ELSE 'renamed' END, ',' ORDER BY u.login) \
               FROM res_users u JOIN res_partner p ON p.id = u.partner_id \
               WHERE u.login LIKE 'cashier%' AND p.name LIKE 'Cashier of %' \
                 AND (u.login = 'cashier' OR u.login = 'cashier [conflict #' || translate(u.id::text, '0123456789', 'abcdefghij') || ']')"),
            "kept,renamed",
            "{}",
            n.name
        );
        // One follower, with both stores' subtypes.
        assert_eq!(
            q("SELECT count(*) FROM mail_followers WHERE res_model = 'res.partner' AND res_id = 999999"),
            "1"
        );
        assert_eq!(
            q("SELECT string_agg(r.mail_message_subtype_id::text, ',' ORDER BY r.mail_message_subtype_id) FROM mail_followers_mail_message_subtype_rel r \
               JOIN mail_followers f ON f.id = r.mail_followers_id WHERE f.res_id = 999999"),
            "1,2",
            "{}",
            n.name
        );
        assert_eq!(
            q(
                "SELECT count(*) FROM mail_followers_mail_message_subtype_rel r \
               WHERE NOT EXISTS (SELECT 1 FROM mail_followers f WHERE f.id = r.mail_followers_id)"
            ),
            "0",
            "{}: no subtype left on the merged-away follower",
            n.name
        );
        let (_, status) = n.walsync(&["status"]);
        assert!(!status.contains(" stopped "), "{}: {status}", n.name);
    }
    let count = |sql: &str| -> i64 {
        c.nodes
            .iter()
            .map(|n| psql_odoo(&n.pg, sql).parse::<i64>().unwrap())
            .sum()
    };
    let merged = count(
        "SELECT count(*) FROM walsync.conflicts WHERE outcome = 'merged' \
         AND table_name IN ('res_users_settings', 'mail_followers')",
    );
    assert!(
        merged >= 2,
        "the settings and the follower are merged where they met: {merged}\n{}",
        c.logs()
    );
    assert_eq!(
        count("SELECT count(*) FROM walsync.conflicts WHERE outcome = 'parked'"),
        0,
        "nothing parked"
    );
    // The merge is known on every node, whoever decided it.
    for n in &c.nodes {
        assert_eq!(
            psql_odoo(
                &n.pg,
                "SELECT count(*) FROM walsync.merged_keys WHERE table_name = 'res_users_settings'"
            ),
            "1",
            "{}",
            n.name
        );
    }
    let (ok, shown) = c
        .node("main")
        .walsync(&["conflicts", "--outcome", "merged"]);
    assert!(ok && shown.contains("res_users_settings"), "{shown}");

    // Seen coming: a second shop made with Odoo's defaults shares the POSS journal, and
    // status and init say what a cut will do with it, and the fix.
    psql_odoo(
        &c.node("main").pg,
        "INSERT INTO pos_config SELECT (jsonb_populate_record(NULL::pos_config, \
           to_jsonb(p) || jsonb_build_object('id', nextval('pos_config_id_seq'), 'name', 'Shop 2'))).* \
         FROM pos_config p WHERE p.name = 'Shop'",
    );
    let (_, status) = c.node("main").walsync(&["status"]);
    assert!(
        status.contains("share the sale journal POSS") && status.contains("its own sale journal"),
        "{status}"
    );
    assert!(status.contains("ir_attachment.location"), "{status}");
    assert!(
        status.contains("settled by renaming") && status.contains("by merging the two rows"),
        "{status}"
    );
    let (_, json) = c.node("main").walsync(&["status", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let listed = |k: &str, index: &str| {
        v["setup"]["unique_keys"][k]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.as_str().unwrap().ends_with(index))
    };
    assert!(listed("renamed", "account_move_unique_name"), "{json}");
    assert!(
        listed("merged", "res_users_settings_unique_user_id"),
        "{json}"
    );
    assert!(
        listed("merged", "mail_followers_res_partner_res_model_id_uniq"),
        "{json}"
    );
    let (ok, init) = c.node("main").walsync(&["init"]);
    assert!(ok && init.contains("share the sale journal POSS"), "{init}");
}

/// A customer deleted on main (a duplicate cleaned up, unreferenced there) while a store,
/// cut off, posts an entry for it, on the real Odoo 16 PoS schema with its hundreds of
/// foreign keys into `res_partner` (decision 0016): after the heal the entry is on every
/// node and so is its customer, and no row of any table points at nothing.
#[test]
fn a_customer_deleted_on_main_while_a_store_bills_it_comes_back_on_every_node() {
    let mut c = TestCluster::new_in(
        "odoo-references",
        Topology::Star,
        &["main", "branch1", "branch2"],
        "odoo",
        &|pg: &LocalCluster| restore_odoo(pg, "odoo16_pos.sql.gz"),
        ODOO_POLICIES,
    );
    c.start();
    let customer = psql_odoo(
        &c.node("main").pg,
        "INSERT INTO res_partner (name, active, type) VALUES ('Duplicate customer', true, 'contact') RETURNING id",
    );
    let customer = customer.lines().next().unwrap().to_string();
    let partner_there = format!("SELECT count(*) FROM res_partner WHERE id = {customer}");
    for n in ["branch1", "branch2"] {
        wait_for(
            &format!("{n} to have the customer"),
            DEADLINE,
            || has(&c, n, &partner_there),
            || c.logs(),
        );
    }
    c.stop();
    psql_odoo(
        &c.node("main").pg,
        &format!("DELETE FROM res_partner WHERE id = {customer}"),
    );
    psql_odoo(
        &c.node("branch1").pg,
        &format!(
            "INSERT INTO account_move (journal_id, currency_id, company_id, state, move_type, auto_post, date, name, partner_id) \
             SELECT j.id, co.currency_id, co.id, 'draft', 'entry', 'no', current_date, '/', {customer} \
             FROM account_journal j JOIN res_company co ON co.id = j.company_id WHERE j.code = 'POSS'"
        ),
    );
    c.start();
    let entry_there = format!("SELECT count(*) FROM account_move WHERE partner_id = {customer}");
    for n in ["main", "branch1", "branch2"] {
        wait_for(
            &format!("{n} to have the entry and its customer"),
            DEADLINE,
            || has(&c, n, &entry_there) && has(&c, n, &partner_there),
            || c.logs(),
        );
    }
    for n in &c.nodes {
        assert_eq!(
            n.dangling_references_in("odoo"),
            Vec::<String>::new(),
            "{}",
            n.name
        );
    }
    assert!(has(
        &c,
        "branch1",
        "SELECT count(*) FROM walsync.conflicts WHERE kind = 'delete_referenced' AND table_name = 'res_partner'"
    ));
    assert!(has(
        &c,
        "main",
        "SELECT count(*) FROM walsync.conflicts WHERE kind = 'update_deleted' AND table_name = 'res_partner' AND outcome = 'remote_applied'"
    ));
    c.assert_no_link_stopped();
}

/// Whether `sql` on `n`'s Odoo database answers 1.
fn has(c: &TestCluster, n: &str, sql: &str) -> bool {
    psql_odoo(&c.node(n).pg, sql) == "1"
}
