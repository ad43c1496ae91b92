//! The real thing: Odoo 16's Point of Sale install (2,863 DDL strings, as Odoo sent them)
//! on main while branch2 is cut off, on databases restored from a real Odoo dump
//! (tests/fixtures/odoo, see its README).

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use support::*;
use walsync::localpg::LocalCluster;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/odoo")
}

fn psql_odoo(pg: &LocalCluster, sql: &str) -> String {
    pg.psql_in("odoo", sql).unwrap_or_else(|e| panic!("{e}"))
}

/// A database created as Odoo creates it, with the base-only Odoo dump restored.
fn restore_odoo_base(pg: &LocalCluster) {
    pg.psql("CREATE ROLE odoo LOGIN").unwrap();
    pg.psql("CREATE DATABASE odoo OWNER odoo TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C.UTF-8'")
        .unwrap();
    let dump = std::fs::File::open(fixtures().join("odoo16_base.sql.gz"))
        .expect("fixture odoo16_base.sql.gz");
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
                let (a, b) = (main_schema(), schema(&node.pg));
                let diff: Vec<String> = a
                    .lines()
                    .zip(b.lines())
                    .filter(|(x, y)| x != y)
                    .take(10)
                    .map(|(x, y)| format!("main: {x}\n{n}: {y}"))
                    .collect();
                format!(
                    "{} vs {} lines; first differences:\n{}\n{}",
                    a.lines().count(),
                    b.lines().count(),
                    diff.join("\n"),
                    c.logs()
                )
            },
        );
    }
    for n in &c.nodes {
        assert_eq!(
            psql_odoo(&n.pg, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"),
            "441",
            "{}",
            n.name
        );
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
