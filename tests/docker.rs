//! The container files, checked without a container engine: the configs in docker/config load
//! with walsync's own loader (with the variables the compose files set) and carry
//! docs/odoo.md's `[[tables]]` policies, and docker/entrypoint.sh configures a node from
//! variables alone, waits for a PostgreSQL that is not up yet, initialises it and
//! replicates. tests/container.rs builds the images and runs the compose files.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use support::*;
use walsync::config::{Config, Topology as Shape};
use walsync_testkit::localpg::LocalCluster;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_compose_configs_load_and_form_a_star_around_main() {
    // What compose sets on top of the files (docker/compose.yaml).
    let dsn = |host: &str| format!("host={host} port=5432 user=odoo password=pw dbname=odoo");
    for (node, id, vars) in [
        (
            "main",
            1,
            vec![
                ("WALSYNC_NODE_DSN", dsn("main_db")),
                ("WALSYNC_PEER_BRANCH1_DSN", dsn("branch1_db")),
                ("WALSYNC_PEER_BRANCH2_DSN", dsn("branch2_db")),
            ],
        ),
        (
            "branch1",
            2,
            vec![
                ("WALSYNC_NODE_DSN", dsn("branch1_db")),
                ("WALSYNC_PEER_MAIN_DSN", dsn("main_db")),
            ],
        ),
        (
            "branch2",
            3,
            vec![
                ("WALSYNC_NODE_DSN", dsn("branch2_db")),
                ("WALSYNC_PEER_MAIN_DSN", dsn("main_db")),
            ],
        ),
    ] {
        let path = repo(&format!("docker/config/{node}.toml"));
        let env = vars.into_iter().map(|(k, v)| (k.to_string(), v));
        let c = Config::load(&path, env).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(c.node.name, node);
        assert_eq!(c.node.id, id);
        assert_eq!(c.cluster.topology, Shape::Star);
        assert_eq!(c.cluster.hub.as_deref(), Some("main"));
        let peers: Vec<&str> = c.peers.iter().map(|p| p.name.as_str()).collect();
        let expected: &[&str] = if node == "main" {
            &["branch1", "branch2"]
        } else {
            &["main"]
        };
        assert_eq!(peers, expected, "{node}");
        // As stores behind NAT: each branch's sidecar runs both of its links, main's none.
        let branch_runs_them = node != "main";
        for p in &c.peers {
            assert_eq!(
                (p.links.pulls(), p.links.pushes()),
                (branch_runs_them, branch_runs_them),
                "{node}: links with {}",
                p.name
            );
        }
    }
}

/// The `[[tables]]` of a TOML text.
fn tables_of(text: &str, what: &str) -> toml::Value {
    let doc: toml::Value = toml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    doc.get("tables")
        .cloned()
        .unwrap_or_else(|| panic!("{what} has no [[tables]]"))
}

#[test]
fn every_compose_config_carries_the_table_policies_of_docs_odoo_md() {
    let doc = std::fs::read_to_string(repo("docs/odoo.md")).unwrap();
    let section = doc
        .split("## Node-local tables and columns")
        .nth(1)
        .expect("docs/odoo.md: section Node-local tables and columns");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("docs/odoo.md: a toml block in Node-local tables and columns");
    let expected = tables_of(block, "docs/odoo.md's block");
    for file in ["main", "branch1", "branch2", "site"] {
        let path = repo(&format!("docker/config/{file}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            tables_of(&text, &path.display().to_string()),
            expected,
            "{}: [[tables]] differ from docs/odoo.md",
            path.display()
        );
    }
}

#[test]
fn the_site_config_with_the_site_compose_files_variables_makes_main_and_a_store() {
    // What docker/main.compose.yaml and docker/branch.compose.yaml set on top of the file.
    let path = repo("docker/config/site.toml");
    let dsn = |host: &str| format!("host={host} port=5432 user=odoo password=pw dbname=odoo");
    let main = Config::load(
        &path,
        [
            ("WALSYNC_NODE_NAME".to_string(), "main".to_string()),
            ("WALSYNC_NODE_ID".to_string(), "1".to_string()),
            ("WALSYNC_NODE_DSN".to_string(), dsn("db")),
        ],
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(main.node.name, "main");
    assert_eq!(main.cluster.hub.as_deref(), Some("main"));
    assert!(main.peers.is_empty(), "main at its site lists no branch");
    let store = Config::load(
        &path,
        [
            ("WALSYNC_NODE_NAME".to_string(), "branch3".to_string()),
            ("WALSYNC_NODE_ID".to_string(), "4".to_string()),
            ("WALSYNC_NODE_DSN".to_string(), dsn("db")),
            ("WALSYNC_PEER_MAIN_ID".to_string(), "1".to_string()),
            ("WALSYNC_PEER_MAIN_DSN".to_string(), dsn("main.example.com")),
            ("WALSYNC_PEER_MAIN_LINKS".to_string(), "both".to_string()),
        ],
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!((store.node.name.as_str(), store.node.id), ("branch3", 4));
    assert_eq!(store.cluster.topology, Shape::Star);
    let peers: Vec<&str> = store.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(peers, ["main"]);
    assert!(
        store.peers[0].links.pulls() && store.peers[0].links.pushes(),
        "a store runs both of its links with main"
    );
}

/// `sh docker/entrypoint.sh ARGS` with no config file: only `vars` configure it.
fn entrypoint(dir: &Path, args: &[&str], vars: &[(String, String)], log: &Path) -> Child {
    let bin_dir = walsync_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg(repo("docker/entrypoint.sh"))
        .args(args)
        .env_remove("WALSYNC_CONFIG")
        .env("PATH", path)
        .env("TMPDIR", dir)
        .env("WALSYNC_LOG", "walsync=debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.spawn().expect("run docker/entrypoint.sh")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_entrypoint_waits_for_its_database_then_inits_and_runs_from_variables_alone() {
    if Path::new("/etc/walsync/walsync.toml").exists() {
        panic!("/etc/walsync/walsync.toml exists on this machine: the entrypoint would read it");
    }
    let dir = scratch_dir("entrypoint");
    let schema = "CREATE TABLE note (id serial PRIMARY KEY, body text NOT NULL);";
    let mut pgs = Vec::new();
    for name in ["a", "b"] {
        let pg = LocalCluster::start(&dir.join(name), name).expect("start local PostgreSQL");
        pg.psql(schema).unwrap();
        pgs.push(pg);
    }
    // b's database is down when its container starts.
    pgs[1].stop().unwrap();
    let dsns: Vec<String> = pgs.iter().map(|pg| pg.dsn()).collect();
    let vars = |me: usize| -> Vec<(String, String)> {
        let other = 1 - me;
        let name = |i: usize| ["a", "b"][i];
        vec![
            ("WALSYNC_CLUSTER_TOPOLOGY".into(), "mesh".into()),
            ("WALSYNC_NODE_NAME".into(), name(me).into()),
            ("WALSYNC_NODE_ID".into(), (me + 1).to_string()),
            ("WALSYNC_NODE_DSN".into(), dsns[me].clone()),
            ("WALSYNC_APPLY_RECONNECT_MIN_MS".into(), "100".into()),
            ("WALSYNC_APPLY_RECONNECT_MAX_MS".into(), "1000".into()),
            ("WALSYNC_START_TIMEOUT".into(), "120".into()),
            (
                format!("WALSYNC_PEER_{}_ID", name(other).to_uppercase()),
                (other + 1).to_string(),
            ),
            (
                format!("WALSYNC_PEER_{}_DSN", name(other).to_uppercase()),
                dsns[other].clone(),
            ),
        ]
    };
    let logs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| dir.join(format!("{n}.log")))
        .collect();
    let node_dirs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| dir.join(format!("tmp-{n}")))
        .collect();
    for d in &node_dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let _a = Killed(entrypoint(&node_dirs[0], &[], &vars(0), &logs[0]));
    let mut b = Killed(entrypoint(&node_dirs[1], &[], &vars(1), &logs[1]));
    let log_of = |i: usize| std::fs::read_to_string(&logs[i]).unwrap_or_default();
    let both_logs = || {
        format!(
            "--- a\n{}\n--- b\n{}",
            tail(&log_of(0), 40),
            tail(&log_of(1), 40)
        )
    };
    wait_for(
        "b's entrypoint to say it waits for its PostgreSQL",
        DEADLINE,
        || log_of(1).contains("waiting for this node's PostgreSQL"),
        both_logs,
    );
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "b's entrypoint gave up instead of waiting:\n{}",
        both_logs()
    );
    pgs[1].restart().unwrap();
    // Writes start once walsync is set up on b (its sequences partitioned), as in a store
    // where Odoo starts after the sidecar is healthy.
    wait_for(
        "b's entrypoint to run walsync init",
        DEADLINE,
        || log_of(1).contains("node b: initialised"),
        both_logs,
    );
    pgs[0]
        .psql("INSERT INTO note (body) VALUES ('from a')")
        .unwrap();
    wait_for(
        "a's row to reach b and b's to reach a",
        DEADLINE,
        || {
            let _ = pgs[1].psql("INSERT INTO note (body) SELECT 'from b' WHERE NOT EXISTS (SELECT 1 FROM note WHERE body = 'from b')");
            let count =
                |pg: &LocalCluster| pg.psql("SELECT count(*) FROM note").unwrap_or_default();
            count(&pgs[0]).trim() == "2" && count(&pgs[1]).trim() == "2"
        },
        || {
            let rows = |pg: &LocalCluster| {
                pg.psql("SELECT id, body FROM note ORDER BY id")
                    .unwrap_or_default()
            };
            format!(
                "a: {}\nb: {}\n{}",
                rows(&pgs[0]),
                rows(&pgs[1]),
                both_logs()
            )
        },
    );
    assert!(
        log_of(0).contains("configuring from WALSYNC_* variables only"),
        "{}",
        both_logs()
    );

    // A walsync subcommand runs instead of the sidecar, with the same configuration.
    let status_log = dir.join("status.log");
    let mut status = entrypoint(&node_dirs[0], &["status"], &vars(0), &status_log);
    let code = status.wait().unwrap();
    let out = std::fs::read_to_string(&status_log).unwrap();
    assert!(
        out.contains("node a (id 1 of 16)") && out.contains("b->a") && out.contains("walsync_to_b"),
        "{out}"
    );
    assert!(code.success(), "nothing needs a person here:\n{out}");
}

#[test]
fn the_entrypoint_stops_at_once_on_a_config_error() {
    let dir = scratch_dir("entrypoint-bad");
    let log = dir.join("bad.log");
    let vars = vec![
        ("WALSYNC_CLUSTER_TOPOLOGY".to_string(), "ring".to_string()),
        ("WALSYNC_NODE_NAME".to_string(), "a".to_string()),
        ("WALSYNC_NODE_ID".to_string(), "1".to_string()),
        (
            "WALSYNC_NODE_DSN".to_string(),
            "host=127.0.0.1 port=1 user=postgres".to_string(),
        ),
    ];
    let mut child = entrypoint(&dir, &[], &vars, &log);
    let code = child.wait().unwrap();
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(!code.success(), "{out}");
    assert!(out.contains("ring") && !out.contains("waiting"), "{out}");
}
