//! Test support: real local PostgreSQL clusters on 127.0.0.1 and the real `walsync` binary.
//!
//! Waits are conditions with a deadline ([`wait_for`]), never fixed sleeps.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod chaos;
pub mod fault_proxy;
pub mod netns;

use walsync_testkit::localpg::LocalCluster;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// A fresh directory under /tmp that the postgres user can traverse.
pub fn scratch_dir(test: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "walsync-test-{test}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `cond` until it holds or `deadline` passes; panics with `what` and `diag()` then.
pub fn wait_for(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> bool,
    diag: impl Fn() -> String,
) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > deadline {
            panic!(
                "timed out after {deadline:?} waiting for {what}\n{}",
                diag()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Node {
    pub name: String,
    pub id: u32,
    pub pg: LocalCluster,
    pub config: PathBuf,
    pub sidecar: Option<Sidecar>,
    /// The network namespace its sidecar runs in (its PostgreSQL too), if not this one.
    pub netns: Option<String>,
    /// Variables its sidecar runs with, over what the test process has.
    pub sidecar_env: Vec<(String, String)>,
}

impl Node {
    pub fn sql(&self, sql: &str) -> String {
        self.pg
            .psql(sql)
            .unwrap_or_else(|e| panic!("on {}: {e}", self.name))
    }

    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        self.pg.psql(sql).map_err(|e| e.to_string())
    }

    pub fn count(&self, table: &str) -> i64 {
        self.sql(&format!("SELECT count(*) FROM {table}"))
            .parse()
            .unwrap()
    }

    /// The replication origin that last wrote row `id` of `table` here (empty: this node).
    pub fn author_of(&self, table: &str, id: i64) -> String {
        self.sql(&format!(
            "SELECT coalesce(o.roname, '') FROM {table} t \
             LEFT JOIN pg_replication_origin o ON o.roident = (pg_xact_commit_timestamp_origin(t.xmin)).roident \
             WHERE t.id = {id}"
        ))
    }

    /// Rows of database `db` that refer to a row that does not exist, over every
    /// foreign key outside schema walsync: `constraint: count` for each key with any.
    pub fn dangling_references_in(&self, db: &str) -> Vec<String> {
        let sql = |q: &str| {
            self.pg
                .psql_in(db, q)
                .unwrap_or_else(|e| panic!("on {}: {e}", self.name))
        };
        let checks = sql(
            "SELECT pg_catalog.format('SELECT %L || '': '' || count(*) FROM %s c WHERE %s AND NOT EXISTS (SELECT 1 FROM %s p WHERE %s)', \
                 con.conrelid::regclass || '.' || con.conname, con.conrelid::regclass, \
                 string_agg(pg_catalog.format('c.%I IS NOT NULL', ca.attname), ' AND '), con.confrelid::regclass, \
                 string_agg(pg_catalog.format('p.%I = c.%I', pa.attname, ca.attname), ' AND ')) \
               FROM pg_catalog.pg_constraint con \
               CROSS JOIN LATERAL unnest(con.conkey, con.confkey) k(c, p) \
               JOIN pg_catalog.pg_attribute ca ON ca.attrelid = con.conrelid AND ca.attnum = k.c \
               JOIN pg_catalog.pg_attribute pa ON pa.attrelid = con.confrelid AND pa.attnum = k.p \
              WHERE con.contype = 'f' AND con.connamespace <> 'walsync'::regnamespace \
              GROUP BY con.oid, con.conrelid, con.confrelid, con.conname",
        );
        checks
            .lines()
            .filter(|q| !q.is_empty())
            .map(sql)
            .filter(|r| !r.ends_with(": 0"))
            .collect()
    }

    /// [`Node::dangling_references_in`] the default database.
    pub fn dangling_references(&self) -> Vec<String> {
        self.dangling_references_in("postgres")
    }

    /// Order-independent content checksum of a table.
    pub fn checksum(&self, table: &str) -> String {
        self.sql(&format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '-') FROM {table} t"
        ))
    }

    pub fn start_sidecar(&mut self) {
        assert!(
            self.sidecar.is_none(),
            "sidecar of {} already running",
            self.name
        );
        self.sidecar = Some(Sidecar::start(
            &self.config,
            &self.pg.dir().join(format!("sidecar-{}.log", self.name)),
            self.netns.as_deref(),
            &self.sidecar_env,
        ));
    }

    pub fn kill_sidecar(&mut self) {
        if let Some(mut s) = self.sidecar.take() {
            s.kill9();
        }
    }

    /// SIGTERM and wait: the clean way a sidecar stops.
    pub fn stop_sidecar(&mut self) {
        if let Some(mut s) = self.sidecar.take() {
            s.terminate();
        }
    }

    /// `walsync <args>` with this node's config, from the node's network namespace.
    pub fn walsync(&self, args: &[&str]) -> (bool, String) {
        let config = self.config.to_str().unwrap();
        let args: Vec<&str> = args.iter().copied().chain(["--config", config]).collect();
        output_text(walsync_command(self.netns.as_deref()).args(args))
    }

    /// Its sidecar applies on one session, whatever `WALSYNC_APPLY_SESSIONS` the suite
    /// runs with (a test of what only one session does).
    pub fn one_apply_session(&mut self) {
        self.sidecar_env
            .push(("WALSYNC_APPLY_SESSIONS".into(), "1".into()));
    }

    /// `[apply] sessions = n` in this node's config: its links apply on `n` sessions.
    pub fn set_apply_sessions(&self, n: usize) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(text.contains("[apply]\n"), "no [apply] section in {text}");
        let text = text.replacen("[apply]\n", &format!("[apply]\nsessions = {n}\n"), 1);
        std::fs::write(&self.config, text).unwrap();
    }

    /// Gives this node's sidecar a metrics endpoint on 127.0.0.1:`port`.
    pub fn listen_metrics(&self, port: u16) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        )
        .unwrap();
    }

    pub fn sidecar_log(&self) -> String {
        std::fs::read_to_string(self.pg.dir().join(format!("sidecar-{}.log", self.name)))
            .unwrap_or_default()
    }

    /// Source transactions this node applied from all its incoming links.
    pub fn applied_transactions(&self) -> i64 {
        self.sql("SELECT coalesce(sum(transactions), 0) FROM walsync.link_progress")
            .parse()
            .unwrap()
    }
}

pub struct Sidecar {
    child: Child,
}

impl Sidecar {
    /// `walsync run` with `config`, logging to `log`, in network namespace `netns`.
    pub fn start(
        config: &Path,
        log: &Path,
        netns: Option<&str>,
        env: &[(String, String)],
    ) -> Sidecar {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = walsync_command(netns)
            .args(["run", "--config"])
            .arg(config)
            .env("WALSYNC_LOG", "walsync=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn walsync run");
        Sidecar { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!("sidecar did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn walsync_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walsync"))
}

/// The walsync binary, run in network namespace `netns` (`nsenter` execs it: same pid).
fn walsync_command(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(walsync_bin());
            cmd
        }
        None => Command::new(walsync_bin()),
    }
}

/// Runs `walsync <args>` to completion; returns (success, stdout + stderr).
pub fn walsync(args: &[&str]) -> (bool, String) {
    output_text(Command::new(walsync_bin()).args(args))
}

fn output_text(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run walsync");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Topology {
    /// First node is the hub.
    Star,
    Mesh,
}

/// A set of nodes with the same schema, initialised and (after `start`) replicating.
pub struct TestCluster {
    pub nodes: Vec<Node>,
    pub topology: Topology,
    pub dir: PathBuf,
    /// The database walsync replicates on every node.
    pub db: String,
}

impl TestCluster {
    /// Starts one PostgreSQL per name, runs `schema` on each, writes the configs and runs
    /// `walsync init` on every node. Sidecars are not started yet.
    pub fn new(test: &str, topology: Topology, names: &[&str], schema: &str) -> TestCluster {
        Self::new_with(test, topology, names, schema, "")
    }

    /// Like [`TestCluster::new`], with `extra` appended to every node's config.
    pub fn new_with(
        test: &str,
        topology: Topology,
        names: &[&str],
        schema: &str,
        extra: &str,
    ) -> TestCluster {
        let prepare = |pg: &LocalCluster| {
            pg.psql(schema)
                .unwrap_or_else(|e| panic!("schema on {}: {e}", pg.name()));
        };
        Self::new_in(test, topology, names, "postgres", &prepare, extra)
    }

    /// Nodes whose database `db` is made ready by `prepare` (run on each cluster before
    /// `walsync init`).
    pub fn new_in(
        test: &str,
        topology: Topology,
        names: &[&str],
        db: &str,
        prepare: &dyn Fn(&LocalCluster),
        extra: &str,
    ) -> TestCluster {
        let dir = scratch_dir(test);
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let pg = LocalCluster::start(&dir.join(name), name).expect("start local PostgreSQL");
            prepare(&pg);
            nodes.push(Node {
                name: name.to_string(),
                id: i as u32 + 1,
                pg,
                config: PathBuf::new(),
                sidecar: None,
                netns: None,
                sidecar_env: Vec::new(),
            });
        }
        let mut cluster = TestCluster {
            nodes,
            topology,
            dir,
            db: db.to_string(),
        };
        for i in 0..cluster.nodes.len() {
            let text = format!("{}\n{extra}", cluster.config_text(i));
            let path = cluster.dir.join(format!("{}.toml", cluster.nodes[i].name));
            std::fs::write(&path, text).unwrap();
            cluster.nodes[i].config = path;
        }
        for n in &cluster.nodes {
            let (ok, out) = walsync(&["init", "--config", n.config.to_str().unwrap()]);
            assert!(ok, "walsync init on {} failed:\n{out}", n.name);
        }
        cluster
    }

    pub fn config_text(&self, i: usize) -> String {
        let me = &self.nodes[i];
        let mut s = String::new();
        match self.topology {
            Topology::Star => s.push_str(&format!(
                "[cluster]\ntopology = \"star\"\nhub = \"{}\"\n",
                self.nodes[0].name
            )),
            Topology::Mesh => s.push_str("[cluster]\ntopology = \"mesh\"\n"),
        }
        s.push_str(&format!(
            "\n[node]\nname = \"{}\"\nid = {}\ndsn = \"{}\"\n",
            me.name,
            me.id,
            me.pg.dsn_for(&self.db)
        ));
        s.push_str("\n[apply]\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n");
        for (j, p) in self.nodes.iter().enumerate() {
            let peer = match self.topology {
                Topology::Star => j != i && (i == 0 || j == 0),
                Topology::Mesh => j != i,
            };
            if peer {
                s.push_str(&format!(
                    "\n[[peers]]\nname = \"{}\"\nid = {}\ndsn = \"{}\"\n",
                    p.name,
                    p.id,
                    p.pg.dsn_for(&self.db)
                ));
            }
        }
        s
    }

    pub fn start(&mut self) {
        for n in &mut self.nodes {
            n.start_sidecar();
        }
    }

    /// Adds `line` (a `key = value`) to the `[cluster]` section of every node's config.
    pub fn set_cluster_option(&self, line: &str) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.config).unwrap();
            std::fs::write(
                &n.config,
                text.replacen("[cluster]\n", &format!("[cluster]\n{line}\n"), 1),
            )
            .unwrap();
        }
    }

    /// No link of any node is stopped.
    pub fn assert_no_link_stopped(&self) {
        for n in &self.nodes {
            assert_eq!(
                n.pg.psql_in(
                    &self.db,
                    "SELECT count(*) FROM walsync.link_status WHERE state = 'stopped'"
                )
                .unwrap_or_else(|e| panic!("on {}: {e}", n.name)),
                "0",
                "{}: a link stopped\n{}",
                n.name,
                self.logs()
            );
        }
    }

    /// Adds `line` (a `key = value`) to `peer`'s `[[peers]]` entry in `node`'s config.
    pub fn set_peer_option(&self, node: &str, peer: &str, line: &str) {
        let config = &self.node(node).config;
        let text = std::fs::read_to_string(config).unwrap();
        let entry = format!("[[peers]]\nname = \"{peer}\"\n");
        assert!(text.contains(&entry), "{node}'s config has no peer {peer}");
        std::fs::write(
            config,
            text.replacen(&entry, &format!("{entry}{line}\n"), 1),
        )
        .unwrap();
    }

    /// `walsync init --grant-to walsync` on every node (as the superuser its config
    /// names), then every config names `walsync`: sidecars and commands run as the
    /// unprivileged role from then on. Returns each node's init output.
    pub fn run_as_walsync(&mut self) -> Vec<String> {
        let mut outputs = Vec::new();
        for n in &self.nodes {
            n.sql("CREATE ROLE walsync LOGIN");
            let (ok, out) = n.walsync(&["init", "--grant-to", "walsync"]);
            assert!(ok, "walsync init --grant-to on {}:\n{out}", n.name);
            outputs.push(out);
        }
        for n in &mut self.nodes {
            let text = std::fs::read_to_string(&n.config).unwrap();
            std::fs::write(&n.config, text.replace("user=postgres", "user=walsync")).unwrap();
        }
        outputs
    }

    /// Every walsync session on every node runs as the unprivileged role `walsync`.
    pub fn assert_sessions_are_walsyncs(&self) {
        for n in &self.nodes {
            assert_eq!(
                n.sql(
                    "SELECT string_agg(DISTINCT usename::text, ',') FROM pg_stat_activity \
                     WHERE application_name LIKE 'walsync%'"
                ),
                "walsync",
                "{}: every walsync session runs as the unprivileged role",
                n.name
            );
        }
    }

    /// Takes a node made outside the cluster (a joined branch) into it, its sidecar not
    /// started.
    pub fn adopt(&mut self, name: &str, id: u32, pg: LocalCluster, config: &std::path::Path) {
        self.nodes.push(Node {
            name: name.into(),
            id,
            pg,
            config: config.to_path_buf(),
            sidecar: None,
            netns: None,
            sidecar_env: Vec::new(),
        });
    }

    /// Stops every sidecar (SIGTERM): no link runs, as in a cut, and both sides can write.
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            n.stop_sidecar();
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Every node's sidecar log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "===== sidecar {} =====\n{}",
                    n.name,
                    tail(&n.sidecar_log(), 40)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts that no sidecar (in its whole log) restarted a link to apply transactions
    /// carefully, row by row: every change went the fast path. `what` names the changes.
    pub fn assert_no_careful_pass(&self, what: &str) {
        for n in &self.nodes {
            let log = n.sidecar_log();
            assert!(
                !log.contains("applied carefully"),
                "{what} took the careful path on {}:\n{}",
                n.name,
                tail(&log, 40)
            );
        }
    }

    /// Waits until `table` has the same checksum on every node and `cond` holds for it.
    pub fn wait_converged(&self, table: &str) {
        wait_for(
            &format!("{table} equal on every node"),
            DEADLINE,
            || {
                let sums: Vec<String> = self.nodes.iter().map(|n| n.checksum(table)).collect();
                sums.windows(2).all(|w| w[0] == w[1])
            },
            || {
                let sums: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("{}: {}", n.name, n.checksum(table)))
                    .collect();
                format!("{}\n{}", sums.join("\n"), self.logs())
            },
        );
    }

    /// Waits until `table` has `rows` rows on `node` (a table that does not exist yet, as
    /// before its DDL arrives, counts as not there yet).
    pub fn wait_rows(&self, node: &str, table: &str, rows: i64) {
        let n = self.node(node);
        let count = || {
            n.try_sql(&format!("SELECT count(*) FROM {table}"))
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
        };
        wait_for(
            &format!("{rows} rows in {table} on {node}"),
            DEADLINE,
            || count() == Some(rows),
            || format!("{node} has {:?} rows\n{}", count(), self.logs()),
        );
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Sidecars first (they would log errors against stopped servers), then the servers
        // (each removes its own directory), then what is left: configs and logs.
        for n in &mut self.nodes {
            n.kill_sidecar();
        }
        self.nodes.clear();
        if std::env::var_os("WALSYNC_LOCALPG_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The small retail schema the tests write into.
pub const RETAIL_SCHEMA: &str = "
CREATE TABLE partner (id serial PRIMARY KEY, name text NOT NULL, email varchar(120), active boolean NOT NULL DEFAULT true, write_date timestamp);
CREATE TABLE product (id serial PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL, qty_available integer NOT NULL DEFAULT 0);
CREATE TABLE pos_order (id serial PRIMARY KEY, name text NOT NULL, partner_id integer REFERENCES partner(id), amount_total numeric(12,2), note jsonb, date_order timestamptz NOT NULL DEFAULT now());
CREATE TABLE pos_order_line (id serial PRIMARY KEY, order_id integer NOT NULL REFERENCES pos_order(id) ON DELETE CASCADE, product_id integer NOT NULL REFERENCES product(id), qty numeric NOT NULL, price_unit numeric(12,2) NOT NULL);
";

/// Prepares a node whose replicated tables belong to an application role `shop` (as
/// Odoo's belong to `odoo`): `schema` runs as that role.
pub fn owned_by_shop(pg: &LocalCluster, schema: &str) {
    pg.psql("CREATE ROLE shop LOGIN; GRANT CREATE ON SCHEMA public TO shop")
        .unwrap();
    pg.psql(&format!("SET ROLE shop; {schema}")).unwrap();
}

/// `GET path` on 127.0.0.1:`port` (a sidecar's metrics endpoint): (status line, body).
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}
