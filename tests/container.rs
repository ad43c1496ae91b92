//! The sidecar image as users get it, built and run: docker/Dockerfile's runtime stage (fed
//! the binary built here: no Rust image can be pulled), docker/compose.yaml's seed topology
//! (main, branch1, branch2: each a PostgreSQL container and its sidecar container), run by
//! podman-compose, or `docker compose` where a Docker engine answers.
//!
//! Scenario: every node sells; branch2 is cut off the `wan` network (its sidecar, which
//! runs both of branch2's links, `network disconnect`) while every node sells again; the
//! network is healed; then every table is identical on the three nodes and nothing is lost.
//! Assertions, in order:
//!  1. every sidecar initialises its node and every link streams (`walsync status --json`,
//!     run in the container); `/healthz` and `/readyz` answer on the node's network, no
//!     port is published on the host; the image's health check passes;
//!  2. DDL run on main (the tables) reaches the branches; sales made on every node reach
//!     every node; `bus_bus` (local in the configs, as docs/odoo.md says) stays local;
//!  3. during the cut, branch2 and the rest diverge, and both sides' status says so
//!     (branch2: its link from main is not streaming; main: its slot for branch2 is not read);
//!  4. after the heal: `pos_order`, `pos_order_line` and `stock_quant` identical on all
//!     three, every order of every round on every node with its line, ids of their author's
//!     class (`id % 16`), the stock counter down by every sale (`counters` policy), every
//!     link streaming and `walsync status` exiting 0 in every sidecar;
//!  5. every container stops well within `stop`'s 10 s timeout (PID 1 handles SIGTERM).
//!
//! Mechanics: images come from scripts/container-images (a debootstrapped
//! `debian:bookworm-slim` when missing, a `postgres:15` stand-in, the sidecar image under a
//! tag of this run). The compose project has a name of this run; a guard removes its
//! containers, volumes, networks and the sidecar image at the end, also on failure, and a
//! run first removes what a killed earlier run left. With neither podman nor a Docker
//! engine the test says what it skipped and passes; podman present and failing is a
//! failure.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use support::{tail, wait_for, walsync_bin};

const NODES: [&str; 3] = ["main", "branch1", "branch2"];
/// `[node] id` in docker/config/<node>.toml.
const NODE_IDS: [i64; 3] = [1, 2, 3];
const SALES_PER_ROUND: usize = 10;
const STOCK_START: i64 = 1000;
/// Each sale moves 2 units of stock.
const UNITS_PER_SALE: i64 = 2;
/// A container must stop within this (podman's and docker's stop timeout is 10 s).
const STOP_WITHIN: Duration = Duration::from_secs(5);
/// From `compose up` to every link streaming: init, then links retrying with backoff
/// (up to 10 s) until their upstream is initialised.
const START_DEADLINE: Duration = Duration::from_secs(180);
const CONVERGE_DEADLINE: Duration = Duration::from_secs(180);
/// Branch2's link notices a cut by its probe (about 10 s); main's slot for branch2 goes
/// inactive when main's walsender gives up on the dead connection (`wal_sender_timeout`,
/// 60 s by default).
const CUT_NOTICED_DEADLINE: Duration = Duration::from_secs(150);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Engine {
    Podman,
    Docker,
}

impl Engine {
    fn bin(self) -> &'static str {
        match self {
            Engine::Podman => "podman",
            Engine::Docker => "docker",
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Runs `cmd`; stdout on success, else a message with the command, its status and output.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{cmd:?} exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            tail(&stdout, 60),
            tail(&String::from_utf8_lossy(&out.stderr), 60)
        ))
    }
}

/// Docker where an engine answers and has compose; else podman if installed; else none.
fn pick_engine() -> Option<Engine> {
    if on_path("docker") {
        let engine_up = run(Command::new("timeout").args(["30", "docker", "info"])).is_ok();
        if engine_up {
            if run(Command::new("docker").args(["compose", "version"])).is_ok() {
                return Some(Engine::Docker);
            }
            if !on_path("podman") {
                panic!("a Docker engine runs here but `docker compose` is missing: install the compose plugin (or podman and podman-compose)");
            }
        }
    }
    if on_path("podman") {
        assert!(
            on_path("podman-compose"),
            "podman is installed but podman-compose is not: apt-get install podman-compose (scripts/setup --test)"
        );
        return Some(Engine::Podman);
    }
    None
}

const PROJECT_PREFIX: &str = "walsync-test-";

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// The images of this run, made by scripts/container-images; the sidecar image (a tag of
/// this run) is removed on drop, the base and PostgreSQL images stay as a cache.
struct Images {
    engine: Engine,
    walsync: String,
    postgres: String,
}

impl Images {
    fn build(engine: Engine) -> Images {
        // A real local postgres:15 is used as it is; the stand-in is built otherwise.
        let postgres = if image_exists(engine, "postgres:15") {
            "postgres:15".to_string()
        } else {
            "localhost/walsync-postgres:15".to_string()
        };
        let images = Images {
            engine,
            walsync: format!("localhost/walsync-test:{}-{}", std::process::id(), nanos()),
            postgres,
        };
        let out = run(Command::new(repo("scripts/container-images")).args([
            engine.bin(),
            walsync_bin().to_str().unwrap(),
            &images.walsync,
            &images.postgres,
        ]))
        .unwrap_or_else(|e| panic!("scripts/container-images failed:\n{e}"));
        eprint!("{out}");
        images
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let _ = run(Command::new(self.engine.bin()).args(["rmi", "-f", &self.walsync]));
    }
}

/// A compose project of this run and everything it made; removed on drop.
struct Project {
    engine: Engine,
    name: String,
    /// The compose file, from the repository root.
    file: &'static str,
    /// Its nodes; with one node the services are `db` and `sync`, else `<node>_db`, `<node>_sync`.
    nodes: Vec<&'static str>,
    password: String,
    env: Vec<(String, String)>,
}

impl Project {
    /// `suffix` tells two projects of one run apart.
    fn new(
        engine: Engine,
        images: &Images,
        file: &'static str,
        suffix: &str,
        nodes: &[&'static str],
    ) -> Project {
        let n = nanos();
        let password = format!("pw{n}");
        Project {
            engine,
            name: format!("{PROJECT_PREFIX}{}-{n}{suffix}", std::process::id()),
            file,
            nodes: nodes.to_vec(),
            env: vec![
                ("POSTGRES_PASSWORD".into(), password.clone()),
                ("WALSYNC_IMAGE".into(), images.walsync.clone()),
                ("WALSYNC_POSTGRES_IMAGE".into(), images.postgres.clone()),
            ],
            password,
        }
    }

    fn with_env(mut self, key: &str, value: &str) -> Project {
        self.env.push((key.into(), value.into()));
        self
    }

    fn db(&self, node: &str) -> String {
        if self.nodes.len() == 1 {
            "db".into()
        } else {
            format!("{node}_db")
        }
    }

    fn sync(&self, node: &str) -> String {
        if self.nodes.len() == 1 {
            "sync".into()
        } else {
            format!("{node}_sync")
        }
    }

    fn engine_cmd(&self) -> Command {
        Command::new(self.engine.bin())
    }

    /// `podman-compose` or `docker compose` on the project's file, with its settings.
    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = match self.engine {
            Engine::Podman => Command::new("podman-compose"),
            Engine::Docker => {
                let mut c = Command::new("docker");
                c.arg("compose");
                c
            }
        };
        cmd.arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(repo(self.file))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The container of a service (compose's own naming: podman-compose `P_s_1`, docker `P-s-1`).
    fn container(&self, service: &str) -> String {
        match self.engine {
            Engine::Podman => format!("{}_{service}_1", self.name),
            Engine::Docker => format!("{}-{service}-1", self.name),
        }
    }

    fn wan(&self) -> String {
        format!("{}_wan", self.name)
    }

    /// `psql` as compose's role in a node's database container, SQL on stdin.
    fn sql(&self, node: &str, sql: &str) -> Result<String, String> {
        let mut child = self
            .engine_cmd()
            .args(["exec", "-i", &self.container(&self.db(node))])
            .args(["psql", "-U", "odoo", "-d", "odoo", "-X", "-q", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "psql on {node}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn sql_ok(&self, node: &str, sql: &str) -> String {
        self.sql(node, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `walsync status --json` run in a node's sidecar container: (exit code, report).
    fn status(&self, node: &str) -> Result<(i32, Json), String> {
        let out = self
            .engine_cmd()
            .args(["exec", &self.container(&self.sync(node))])
            .args(["walsync", "status", "--json"])
            .output()
            .map_err(|e| e.to_string())?;
        let code = out.status.code().unwrap_or(-1);
        let text = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str(&text) {
            Ok(report) => Ok((code, report)),
            Err(_) => Err(format!(
                "status on {node} exited {code}: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// The state of each link into `node`, by name (`branch2->main`: `streaming`).
    fn link_states(&self, node: &str) -> Vec<(String, String)> {
        let Ok((_, report)) = self.status(node) else {
            return Vec::new();
        };
        report["links_in"]
            .as_array()
            .map(|links| {
                links
                    .iter()
                    .map(|l| {
                        (
                            l["link"].as_str().unwrap_or("").to_string(),
                            l["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn all_links_streaming(&self) -> bool {
        NODES.iter().all(|node| {
            let links = self.link_states(node);
            let expected = if *node == "main" { 2 } else { 1 };
            links.len() == expected && links.iter().all(|(_, s)| s == "streaming")
        })
    }

    fn logs(&self, service: &str) -> String {
        let out = self
            .engine_cmd()
            .args(["logs", &self.container(service)])
            .output();
        match out {
            Ok(o) => tail(
                &format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                25,
            ),
            Err(e) => e.to_string(),
        }
    }

    /// What a failure shows: every sidecar's log tail and link states.
    fn diag(&self) -> String {
        let mut s = String::new();
        for node in &self.nodes {
            s += &format!(
                "--- {}: links {:?}\n{}\n",
                self.sync(node),
                self.link_states(node),
                self.logs(&self.sync(node))
            );
        }
        s
    }

    /// The container's address on network `network` of the project.
    fn address_on(&self, service: &str, network: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}_{network}\").IPAddress}}}}",
            self.name
        );
        run(self
            .engine_cmd()
            .args(["inspect", "--format", &format, &self.container(service)]))
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string()
    }

    /// Runs the image's health check once (podman, without systemd, runs it on demand
    /// only) or reads its last result (docker): true when healthy.
    fn healthy(&self, service: &str) -> bool {
        let container = self.container(service);
        match self.engine {
            Engine::Podman => {
                run(self.engine_cmd().args(["healthcheck", "run", &container])).is_ok()
            }
            Engine::Docker => run(self.engine_cmd().args([
                "inspect",
                "--format",
                "{{.State.Health.Status}}",
                &container,
            ]))
            .is_ok_and(|s| s.trim() == "healthy"),
        }
    }

    /// Takes `container` off `wan` (`connect = false`) or puts it back under its service
    /// name, which the peers' dsns use.
    fn wan_link(&self, service: &str, connect: bool) {
        let container = self.container(service);
        let wan = self.wan();
        let mut cmd = self.engine_cmd();
        if connect {
            cmd.args(["network", "connect", "--alias", service, &wan, &container]);
        } else {
            cmd.args(["network", "disconnect", &wan, &container]);
        }
        run(&mut cmd).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Everything named after `project`: containers (with their anonymous volumes),
    /// volumes, networks. podman-compose's `down` leaves the networks.
    fn remove_everything_of(engine: Engine, project: &str) {
        let list = |what: &[&str]| -> Vec<String> {
            run(Command::new(engine.bin()).args(what))
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|n| {
                    n.strip_prefix(project)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['_', '-']))
                })
                .map(String::from)
                .collect()
        };
        let containers = list(&["ps", "-a", "--format", "{{.Names}}"]);
        if !containers.is_empty() {
            let _ = run(Command::new(engine.bin())
                .args(["rm", "-f", "-v"])
                .args(&containers));
        }
        for volume in list(&["volume", "ls", "--format", "{{.Name}}"]) {
            let _ = run(Command::new(engine.bin()).args(["volume", "rm", "-f", &volume]));
        }
        for network in list(&["network", "ls", "--format", "{{.Name}}"]) {
            let _ = run(Command::new(engine.bin()).args(["network", "rm", &network]));
        }
    }

    /// What runs of this test that were killed (a timeout) left behind, by project name.
    fn remove_leftovers(engine: Engine) {
        let names = run(Command::new(engine.bin()).args(["ps", "-a", "--format", "{{.Names}}"]))
            .unwrap_or_default()
            + &run(Command::new(engine.bin()).args(["network", "ls", "--format", "{{.Name}}"]))
                .unwrap_or_default();
        let mut dead = std::collections::BTreeSet::new();
        for name in names.lines() {
            let Some(rest) = name.trim().strip_prefix(PROJECT_PREFIX) else {
                continue;
            };
            let mut parts = rest.splitn(3, ['-', '_']);
            let (Some(pid), Some(nanos)) = (parts.next(), parts.next()) else {
                continue;
            };
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            if !alive {
                dead.insert(format!("{PROJECT_PREFIX}{pid}-{nanos}"));
            }
        }
        for project in dead {
            eprintln!("removing what a killed earlier run left: {project}");
            Project::remove_everything_of(engine, &project);
        }
        let images = run(Command::new(engine.bin()).args([
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ]))
        .unwrap_or_default();
        for image in images.lines() {
            let Some(tag) = image.trim().strip_prefix("localhost/walsync-test:") else {
                continue;
            };
            let pid = tag.split('-').next().unwrap_or("");
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run(Command::new(engine.bin()).args(["rmi", "-f", image.trim()]));
            }
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = run(&mut self.compose(&["down", "-v"]));
        Project::remove_everything_of(self.engine, &self.name);
    }
}

fn image_exists(engine: Engine, image: &str) -> bool {
    match engine {
        Engine::Podman => run(Command::new("podman").args(["image", "exists", image])).is_ok(),
        Engine::Docker => run(Command::new("docker").args(["image", "inspect", image])).is_ok(),
    }
}

/// One HTTP/1.0 GET: (status line, body).
fn http_get(addr: &str, path: &str) -> Result<(String, String), String> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let status = response.lines().next().unwrap_or("").to_string();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `n` sales on `node` in round `round`: each one transaction with an order, its line and
/// the stock it moves (as a till does).
fn sales_sql(node: &str, round: &str, n: usize) -> String {
    (1..=n)
        .map(|i| {
            format!(
                "BEGIN;\n\
                 WITH o AS (INSERT INTO pos_order (node, ref, amount) VALUES ('{node}', '{node}-{round}-{i}', 12.50) RETURNING id)\n\
                 INSERT INTO pos_order_line (order_id, qty) SELECT id, {UNITS_PER_SALE} FROM o;\n\
                 UPDATE stock_quant SET quantity = quantity - {UNITS_PER_SALE} WHERE product_id = 1;\n\
                 COMMIT;\n"
            )
        })
        .collect()
}

const SCHEMA: &str = "
CREATE TABLE pos_order (id serial PRIMARY KEY, node text NOT NULL, ref text NOT NULL UNIQUE, amount numeric NOT NULL);
CREATE TABLE pos_order_line (id serial PRIMARY KEY, order_id int NOT NULL REFERENCES pos_order, qty int NOT NULL);
CREATE TABLE stock_quant (id serial PRIMARY KEY, product_id int NOT NULL UNIQUE, quantity numeric NOT NULL, reserved_quantity numeric NOT NULL DEFAULT 0);
CREATE TABLE bus_bus (id serial PRIMARY KEY, channel text NOT NULL, message text);
";

const CHECKED_TABLES: [&str; 3] = ["pos_order", "pos_order_line", "stock_quant"];

fn checksum_sql(table: &str) -> String {
    format!(
        "SELECT count(*) || ':' || coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '-') FROM {table} t"
    )
}

/// The engine to run, or `None` after saying what was skipped and why.
fn engine_or_skip(what: &str) -> Option<Engine> {
    let engine = pick_engine();
    if engine.is_none() {
        println!(
            "SKIPPED: neither podman nor a Docker engine (with compose) is on this machine, so \
             docker/Dockerfile and {what} were not built or run (scripts/setup --test installs \
             podman, podman-compose, runc and debootstrap)"
        );
    }
    engine
}

#[test]
fn the_compose_topology_in_containers_converges_after_a_branch_is_cut_off_and_healed() {
    let Some(engine) = engine_or_skip("docker/compose.yaml") else {
        return;
    };
    let started = Instant::now();
    Project::remove_leftovers(engine);
    let images = Images::build(engine);
    let images_s = started.elapsed().as_secs_f64();
    let project = Project::new(engine, &images, "docker/compose.yaml", "", &NODES);
    eprintln!("engine {}, project {}", engine.bin(), project.name);

    // --- 1. up: the databases and the sidecars, not the Odoo profile.
    let services = ["main_sync", "branch1_sync", "branch2_sync"];
    let mut up = vec!["up", "-d", "--no-build"];
    up.extend(services);
    run(&mut project.compose(&up)).unwrap_or_else(|e| panic!("compose up failed:\n{e}"));
    let up_at = Instant::now();
    wait_for(
        "every sidecar to initialise its node and every link to stream",
        START_DEADLINE,
        || project.all_links_streaming(),
        || project.diag(),
    );
    let streaming_s = up_at.elapsed().as_secs_f64();

    for node in NODES {
        let service = format!("{node}_sync");
        let address = format!(
            "{}:9187",
            project.address_on(&service, &format!("{node}_lan"))
        );
        for (path, expected) in [("/healthz", "ok"), ("/readyz", "ready")] {
            let (status, body) = http_get(&address, path)
                .unwrap_or_else(|e| panic!("GET http://{address}{path} ({service}): {e}"));
            assert!(
                status.contains("200") && body.trim() == expected,
                "GET http://{address}{path} ({service}): {status}\n{body}"
            );
        }
        let ports = run(project
            .engine_cmd()
            .args(["port", &project.container(&service)]))
        .unwrap_or_default();
        assert!(
            ports.trim().is_empty(),
            "{service} publishes ports on the host: {ports}"
        );
        wait_for(
            &format!("the image's health check to pass on {service}"),
            Duration::from_secs(60),
            || project.healthy(&service),
            || project.diag(),
        );
    }

    // --- 2. the schema, on main only (DDL replicates), then a round of sales everywhere.
    project.sql_ok(
        "main",
        &format!(
            "{SCHEMA}\nINSERT INTO stock_quant (product_id, quantity) VALUES (1, {STOCK_START});"
        ),
    );
    wait_for(
        "main's tables and stock to reach the branches",
        Duration::from_secs(60),
        || {
            NODES.iter().all(|n| {
                project.sql(n, "SELECT quantity FROM stock_quant WHERE product_id = 1")
                    == Ok(STOCK_START.to_string())
            })
        },
        || project.diag(),
    );
    for node in NODES {
        project.sql_ok(
            node,
            &format!(
                "{}INSERT INTO bus_bus (channel, message) VALUES ('{node}', 'only here');",
                sales_sql(node, "a", SALES_PER_ROUND)
            ),
        );
    }
    let counts = || -> Vec<String> {
        NODES
            .iter()
            .map(|n| {
                project
                    .sql(n, "SELECT count(*) FROM pos_order")
                    .unwrap_or_else(|e| e)
            })
            .collect()
    };
    let round_a = (3 * SALES_PER_ROUND).to_string();
    wait_for(
        "round a's sales on every node",
        Duration::from_secs(60),
        || counts().iter().all(|c| *c == round_a),
        || format!("orders per node {:?}\n{}", counts(), project.diag()),
    );

    // --- 3. branch2 off the wan; everyone sells.
    let cut_at = Instant::now();
    project.wan_link("branch2_sync", false);
    for node in NODES {
        project.sql_ok(node, &sales_sql(node, "b", SALES_PER_ROUND));
    }
    let main_side = (5 * SALES_PER_ROUND).to_string();
    let branch2_side = (4 * SALES_PER_ROUND).to_string();
    wait_for(
        "main's and branch1's round b to reach each other, not branch2",
        Duration::from_secs(60),
        || {
            let c = counts();
            c[0] == main_side && c[1] == main_side
        },
        || format!("orders per node {:?}\n{}", counts(), project.diag()),
    );
    assert_eq!(
        project.sql_ok("branch2", "SELECT count(*) FROM pos_order"),
        branch2_side,
        "branch2 received orders while cut off"
    );
    let branch2_link_down = || {
        project
            .link_states("branch2")
            .iter()
            .any(|(l, s)| l == "main->branch2" && s != "streaming")
    };
    let mains_slot_for_branch2_idle = || {
        project.status("main").is_ok_and(|(_, r)| {
            r["slots"].as_array().is_some_and(|slots| {
                slots
                    .iter()
                    .any(|s| s["slot"] == "walsync_to_branch2" && s["active"] == false)
            })
        })
    };
    // When each side first said so, in seconds after the cut (for the summary).
    let mut noticed: [Option<f64>; 2] = [None, None];
    wait_for(
        "main's status to show its slot for branch2 not read and branch2's its link from main not streaming",
        CUT_NOTICED_DEADLINE,
        || {
            if noticed[0].is_none() && mains_slot_for_branch2_idle() {
                noticed[0] = Some(cut_at.elapsed().as_secs_f64());
            }
            if noticed[1].is_none() && branch2_link_down() {
                noticed[1] = Some(cut_at.elapsed().as_secs_f64());
            }
            noticed.iter().all(Option::is_some)
        },
        || project.diag(),
    );
    assert_eq!(
        counts(),
        vec![main_side.clone(), main_side, branch2_side],
        "orders per node (main, branch1, branch2) changed during the cut"
    );
    let cut_s = cut_at.elapsed().as_secs_f64();

    // --- 4. heal, converge, check.
    project.wan_link("branch2_sync", true);
    let healed_at = Instant::now();
    let checksums = || -> Vec<Vec<String>> {
        NODES
            .iter()
            .map(|n| {
                CHECKED_TABLES
                    .iter()
                    .map(|t| project.sql(n, &checksum_sql(t)).unwrap_or_else(|e| e))
                    .collect()
            })
            .collect()
    };
    let total = 6 * SALES_PER_ROUND;
    wait_for(
        "every table identical on the three nodes after the heal",
        CONVERGE_DEADLINE,
        || {
            let c = checksums();
            c[0][0].starts_with(&format!("{total}:")) && c.iter().all(|n| *n == c[0])
        },
        || format!("checksums {:?}\n{}", checksums(), project.diag()),
    );
    let converge_s = healed_at.elapsed().as_secs_f64();

    let expected_refs: Vec<String> = {
        let mut refs: Vec<String> = NODES
            .iter()
            .flat_map(|n| {
                ["a", "b"].into_iter().flat_map(move |round| {
                    (1..=SALES_PER_ROUND).map(move |i| format!("{n}-{round}-{i}"))
                })
            })
            .collect();
        refs.sort();
        refs
    };
    let class_of = NODES
        .iter()
        .zip(NODE_IDS)
        .map(|(n, id)| format!("WHEN '{n}' THEN {id}"))
        .collect::<Vec<_>>()
        .join(" ");
    let stock_end = STOCK_START - UNITS_PER_SALE * total as i64;
    for node in NODES {
        let refs = project.sql_ok(node, "SELECT ref FROM pos_order ORDER BY ref COLLATE \"C\"");
        let refs: Vec<String> = refs.lines().map(String::from).collect();
        let mut sorted = refs.clone();
        sorted.sort();
        assert_eq!(sorted, expected_refs, "the orders on {node}");
        assert_eq!(
            project.sql_ok(
                node,
                &format!("SELECT count(*) FROM pos_order o WHERE (SELECT count(*) FROM pos_order_line l WHERE l.order_id = o.id) <> 1 \
                          OR o.id % 16 <> CASE o.node {class_of} END")
            ),
            "0",
            "on {node}: orders without exactly one line, or with an id of another node's class"
        );
        assert_eq!(
            project.sql_ok(
                node,
                "SELECT quantity FROM stock_quant WHERE product_id = 1"
            ),
            stock_end.to_string(),
            "stock on {node}: every sale on every node moves it (counters)"
        );
        assert_eq!(
            project.sql_ok(node, "SELECT string_agg(channel, ',') FROM bus_bus"),
            node,
            "bus_bus on {node} is local (docker/config: local = true)"
        );
    }
    wait_for(
        "every link streaming again",
        Duration::from_secs(60),
        || project.all_links_streaming(),
        || project.diag(),
    );
    for node in NODES {
        let (code, report) = project
            .status(node)
            .unwrap_or_else(|e| panic!("walsync status in {node}_sync: {e}"));
        assert_eq!(
            code, 0,
            "walsync status in {node}_sync says something needs a person: {}",
            report["problems"]
        );
        assert!(
            project.healthy(&format!("{node}_sync")),
            "{node}_sync is not healthy\n{}",
            project.diag()
        );
    }

    // --- 5. every container stops fast on the stop signal, in compose's order: the
    // sidecars, then the databases they depend on.
    let mut stops = Vec::new();
    for role in ["sync", "db"] {
        for node in NODES {
            let service = format!("{node}_{role}");
            let container = project.container(&service);
            let t = Instant::now();
            run(project.engine_cmd().args(["stop", "-t", "10", &container]))
                .unwrap_or_else(|e| panic!("{e}"));
            let took = t.elapsed();
            assert!(
                took < STOP_WITHIN,
                "{container} took {took:?} to stop (more than {STOP_WITHIN:?}): its PID 1 does not act on the stop signal in time\n{}",
                project.logs(&service)
            );
            stops.push(format!("{service} {:.1}s", took.as_secs_f64()));
        }
    }

    eprintln!(
        "container test: images {images_s:.0} s, links streaming {streaming_s:.0} s after up, \
         cut noticed by main after {:.0} s and by branch2 after {:.0} s, cut {cut_s:.0} s, \
         converged {converge_s:.1} s after the heal, stops [{}], {:.0} s in all",
        noticed[0].unwrap_or_default(),
        noticed[1].unwrap_or_default(),
        stops.join(", "),
        started.elapsed().as_secs_f64()
    );
}

/// Main and a store each with their own compose file, as docs/docker.md runs them at two
/// sites: docker/main.compose.yaml (main's database published on a port of the host) and
/// docker/branch.compose.yaml (a store's database and sidecar; main reached at that port
/// through the host, as over the internet). The branch is copied from main with
/// `compose run --rm sync join` while main sells, then runs both of its links.
/// Assertions: join succeeds; sales on both sides reach the other; both tables identical;
/// ids of their author's class; the stock counter; both links streaming in the branch's
/// sidecar and `walsync status` exiting 0 on both sides.
#[test]
fn a_store_with_its_own_compose_file_joins_main_at_another_site_and_both_sell() {
    let Some(engine) = engine_or_skip("docker/main.compose.yaml and docker/branch.compose.yaml")
    else {
        return;
    };
    let started = Instant::now();
    Project::remove_leftovers(engine);
    let images = Images::build(engine);
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let main = Project::new(
        engine,
        &images,
        "docker/main.compose.yaml",
        "-main",
        &["main"],
    )
    .with_env("WALSYNC_MAIN_PORT", &port.to_string());
    // The host as the store's containers reach it: what an address on the internet is here.
    let host = match engine {
        Engine::Podman => "host.containers.internal".to_string(),
        Engine::Docker => run(Command::new("docker").args([
            "network",
            "inspect",
            "bridge",
            "--format",
            "{{(index .IPAM.Config 0).Gateway}}",
        ]))
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string(),
    };
    let main_dsn = format!(
        "host={host} port={port} user=odoo password={} dbname=odoo",
        main.password
    );
    let store = Project::new(
        engine,
        &images,
        "docker/branch.compose.yaml",
        "-branch3",
        &["branch3"],
    )
    .with_env("WALSYNC_NODE_NAME", "branch3")
    .with_env("WALSYNC_NODE_ID", "4")
    .with_env("WALSYNC_MAIN_DSN", &main_dsn);
    eprintln!(
        "engine {}, projects {} and {}",
        engine.bin(),
        main.name,
        store.name
    );

    // Main: up (not the Odoo profile), initialised, tables, stock and a round of sales.
    run(&mut main.compose(&["up", "-d", "--no-build", "db", "sync"]))
        .unwrap_or_else(|e| panic!("compose up of main failed:\n{e}"));
    wait_for(
        "main's sidecar to initialise main",
        START_DEADLINE,
        || matches!(main.status("main"), Ok((0, r)) if r["node"]["name"] == "main"),
        || main.diag(),
    );
    main.sql_ok(
        "main",
        &format!(
            "{SCHEMA}\nINSERT INTO stock_quant (product_id, quantity) VALUES (1, {STOCK_START});\n{}",
            sales_sql("main", "a", SALES_PER_ROUND)
        ),
    );

    // The store: its database, the copy from main, then its sidecar.
    run(&mut store.compose(&["up", "-d", "--no-build", "db"]))
        .unwrap_or_else(|e| panic!("compose up of the store's database failed:\n{e}"));
    wait_for(
        "the store's database to accept connections",
        START_DEADLINE,
        || store.sql("branch3", "SELECT 1").is_ok(),
        || store.logs("db"),
    );
    let joined = run(&mut store.compose(&["run", "--rm", "sync", "join"]))
        .unwrap_or_else(|e| panic!("join failed:\n{e}\n{}", main.diag()));
    assert!(joined.contains("branch3 joined from main"), "{joined}");
    run(&mut store.compose(&["up", "-d", "--no-build", "db", "sync"]))
        .unwrap_or_else(|e| panic!("compose up of the store failed:\n{e}"));

    main.sql_ok("main", &sales_sql("main", "b", SALES_PER_ROUND));
    store.sql_ok("branch3", &sales_sql("branch3", "a", SALES_PER_ROUND));
    let total = 3 * SALES_PER_ROUND;
    let checksums = || -> Vec<Vec<String>> {
        [(&main, "main"), (&store, "branch3")]
            .iter()
            .map(|(p, n)| {
                CHECKED_TABLES
                    .iter()
                    .map(|t| p.sql(n, &checksum_sql(t)).unwrap_or_else(|e| e))
                    .collect()
            })
            .collect()
    };
    wait_for(
        "main's and the store's tables identical",
        CONVERGE_DEADLINE,
        || {
            let c = checksums();
            c[0][0].starts_with(&format!("{total}:")) && c[0] == c[1]
        },
        || {
            format!(
                "checksums {:?}\n{}{}",
                checksums(),
                main.diag(),
                store.diag()
            )
        },
    );
    let stock_end = STOCK_START - UNITS_PER_SALE * total as i64;
    for (p, node) in [(&main, "main"), (&store, "branch3")] {
        assert_eq!(
            p.sql_ok(
                node,
                "SELECT count(*) FROM pos_order WHERE id % 16 <> CASE node WHEN 'main' THEN 1 WHEN 'branch3' THEN 4 END"
            ),
            "0",
            "on {node}: an order with an id of another node's class"
        );
        assert_eq!(
            p.sql_ok(
                node,
                "SELECT quantity FROM stock_quant WHERE product_id = 1"
            ),
            stock_end.to_string(),
            "stock on {node}"
        );
    }
    let streaming = |p: &Project, node: &str, link: &str| {
        p.link_states(node)
            .iter()
            .any(|(l, s)| l == link && s == "streaming")
    };
    wait_for(
        "both links streaming, each seen where it applies",
        Duration::from_secs(60),
        || {
            streaming(&store, "branch3", "main->branch3")
                && streaming(&main, "main", "branch3->main")
        },
        || format!("{}{}", main.diag(), store.diag()),
    );
    for (p, node) in [(&main, "main"), (&store, "branch3")] {
        let (code, report) = p
            .status(node)
            .unwrap_or_else(|e| panic!("walsync status on {node}: {e}"));
        assert_eq!(code, 0, "status on {node}: {}", report["problems"]);
    }
    eprintln!("site test: {:.0} s in all", started.elapsed().as_secs_f64());
}
