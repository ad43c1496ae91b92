//! `walsync-bench`: catch-up speed against PostgreSQL's native logical replication, in the
//! same run on the same machine, as a star's hub serves its branches; and the sidecar's
//! peak memory on one huge transaction.
//!
//! Catch-up: one upstream cluster ("main") and, per consumer kind, `--downstream` target
//! clusters that all pull from it at once: native subscriptions (one per target, each
//! with its own slot) and walsync sidecars (one per target, each running its link from
//! main). Every cluster runs with PostgreSQL's default durability (`fsync = on`,
//! `synchronous_commit = on` for clients; native's apply workers commit with the
//! subscription's default `synchronous_commit = off`, walsync's applier likewise, and
//! both acknowledge only what is flushed). For each `--txn-rows` size and each round, a
//! backlog of `--rows` order lines is written on main while every consumer is stopped;
//! then all native subscriptions start at once and are timed until the first target
//! holds the backlog's first row and its last row, then the same for the walsync sidecars.
//! The ratio is walsync rows/s ÷ native rows/s on the first target (above 1.0: walsync is
//! faster); the median over the rounds is reported, with the time to the first row.
//! `--workload update` makes each backlog transaction update existing order lines, and
//! `--workload pos` makes it a sale (an order, its lines, its total written back, the
//! stock of each product counted down); a round's last row is then found by the mark the
//! round writes into it.
//!
//! Memory (`--big-txn N`): one source transaction of N rows is applied by a `walsync run`
//! child process, whose peak RSS (VmHWM) is read from /proc when it is done.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

mod load;

use crate::localpg::LocalCluster;
use crate::RunResult as CliResult;
use walsync::config::{Config, Dsn};
use walsync::node::connect::connect;
use walsync::node::setup::init_node;
use walsync::runtime::{run_sidecar, shutdown_channel};

#[derive(Debug, clap::Parser)]
#[command(
    name = "walsync-bench",
    version,
    about = "Catch-up speed and CPU against native logical replication (and peak memory on one huge transaction)"
)]
pub struct BenchArgs {
    /// Rows in each catch-up backlog (0 skips the catch-up comparison).
    #[arg(long, default_value_t = 200_000)]
    pub rows: u64,
    /// Rows per source transaction in the backlog; several sizes are measured in turn.
    #[arg(long, value_delimiter = ',', default_values_t = [100u64, 10])]
    pub txn_rows: Vec<u64>,
    /// Rounds per size (a new backlog each); the median ratio is the result.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Targets that pull from the one upstream at once, per consumer kind.
    #[arg(long, default_value_t = 2)]
    pub downstream: u32,
    /// Also apply one transaction of this many rows and report the sidecar's peak RSS.
    #[arg(long, default_value_t = 0)]
    pub big_txn: u64,
    /// Steady load: POS transactions per second on main (one order and five lines each,
    /// pgbench with 4 clients) while targets pull; 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub load_tps: u32,
    /// Seconds of steady load per measurement.
    #[arg(long, default_value_t = 30)]
    pub load_secs: u32,
    /// Under steady load: how many targets of each kind pull at once, one measurement
    /// each (1,2,4,8 draws what each branch costs main).
    #[arg(long, value_delimiter = ',', default_values_t = [2u32])]
    pub branches: Vec<u32>,
    /// How each walsync sidecar reaches its own node (the target it applies into): over
    /// the node's Unix socket, as a sidecar next to its node is configured, or over TCP.
    #[arg(long, value_enum, default_value_t = NodeOver::Socket)]
    pub node_over: NodeOver,
    /// `[apply] sessions` of each walsync sidecar: target sessions it applies on.
    #[arg(long, default_value_t = walsync::config::ApplyConfig::default().sessions)]
    pub apply_sessions: usize,
    /// What the catch-up backlog is made of: new order lines, updates of existing ones
    /// (`--rows` of them are written first and caught up, untimed), or sales.
    #[arg(long, value_enum, default_value_t = Workload::Insert)]
    pub workload: Workload,
}

/// What a catch-up backlog's transactions do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Each inserts `--txn-rows` new order lines.
    Insert,
    /// Each updates `--txn-rows` existing order lines (every row once per round).
    Update,
    /// Each is a point-of-sale sale: an order, its `--txn-rows` lines, the order's total
    /// written back, and the stock of each product sold counted down.
    Pos,
}

/// How a sidecar reaches the node it sits next to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeOver {
    Socket,
    Tcp,
}

const SCHEMA: &str = "CREATE TABLE pos_order_line (
    id serial PRIMARY KEY, order_id integer NOT NULL, product_id integer NOT NULL,
    qty numeric NOT NULL, price_unit numeric(12,2) NOT NULL, name text, create_date timestamp NOT NULL DEFAULT now());
  CREATE TABLE pos_order (
    id serial PRIMARY KEY, name text NOT NULL, amount numeric(12,2) NOT NULL,
    created timestamptz NOT NULL DEFAULT clock_timestamp());
  CREATE TABLE stock_quant (id integer PRIMARY KEY, product_id integer NOT NULL, quantity numeric NOT NULL);
  INSERT INTO stock_quant SELECT g, g, 1000000 FROM generate_series(1, 40) g";

/// On the targets only: when each order arrived there (the steady-load lag is `arrived -
/// created`, both read from the one clock of this machine).
const ARRIVED: &str =
    "ALTER TABLE pos_order ADD COLUMN arrived timestamptz DEFAULT clock_timestamp()";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The consumers of one kind: native subscriptions or walsync sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Native,
    Walsync,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Native => "native",
            Kind::Walsync => "walsync",
        }
    }

    /// The slot on main that target `i` (from 0) of this kind reads.
    fn slot(self, i: usize) -> String {
        match self {
            Kind::Native => format!("bench_native_{}", i + 1),
            Kind::Walsync => format!("walsync_to_branch{}", i + 1),
        }
    }

    /// The processes on a target that apply what its slot sends.
    fn appliers_sql(self) -> &'static str {
        match self {
            Kind::Native => "SELECT pid FROM pg_stat_subscription WHERE pid IS NOT NULL",
            Kind::Walsync => {
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'walsync %->% apply'"
            }
        }
    }
}

struct Bench {
    dir: PathBuf,
    source: LocalCluster,
    natives: Vec<LocalCluster>,
    walsyncs: Vec<LocalCluster>,
    /// One sidecar config per walsync target.
    configs: Vec<Config>,
    config_paths: Vec<PathBuf>,
}

impl Bench {
    fn targets(&self, kind: Kind) -> &[LocalCluster] {
        match kind {
            Kind::Native => &self.natives,
            Kind::Walsync => &self.walsyncs,
        }
    }
}

/// The sidecars of the first `n` walsync targets, running in this process.
struct Sidecars {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sidecars {
    fn start(b: &Bench, n: usize) -> Sidecars {
        let (stop, rx) = shutdown_channel();
        let tasks = b.configs[..n]
            .iter()
            .map(|c| {
                let (config, rx) = (c.clone(), rx.clone());
                tokio::spawn(async move {
                    let _ = run_sidecar(&config, rx).await;
                })
            })
            .collect();
        Sidecars { stop, tasks }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub async fn run(args: BenchArgs) -> CliResult {
    let dir = std::env::temp_dir().join(format!("walsync-bench-{}", std::process::id()));
    let result = bench(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn start(dir: &Path, name: String) -> Result<LocalCluster, BoxError> {
    let path = dir.join(&name);
    let pg = tokio::task::spawn_blocking(move || LocalCluster::start(&path, &name)).await??;
    // PostgreSQL's default durability (the local clusters run with fsync off otherwise).
    sql(&pg, "ALTER SYSTEM SET fsync = on").await?;
    sql(&pg, "SELECT pg_reload_conf()").await?;
    Ok(pg)
}

async fn sql(pg: &LocalCluster, sql: &str) -> Result<(), BoxError> {
    Ok(connect(&Dsn::new(pg.dsn()), "walsync bench")
        .await?
        .batch_execute(sql)
        .await?)
}

async fn count(pg: &LocalCluster) -> Result<i64, BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    Ok(c.query_one("SELECT count(*) FROM pos_order_line", &[])
        .await?
        .get(0))
}

/// What a target must hold to equal the source: the order lines' count, their
/// quantities' sum and their names' hash, the orders' count and total, the stock.
async fn contents(pg: &LocalCluster) -> Result<String, BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    Ok(c.query_one(
        "SELECT count(*) || ' lines, qty ' || coalesce(sum(qty), 0) || ', names ' || coalesce(sum(hashtext(name)::bigint), 0) \
           || ', ' || (SELECT count(*) || ' orders, total ' || coalesce(sum(amount), 0) FROM pos_order) \
           || ', stock ' || (SELECT sum(quantity) FROM stock_quant) FROM pos_order_line",
        &[],
    )
    .await?
    .get(0))
}

/// Polls until the target holds the row with id `id`; returns the time taken from
/// `since`. An index probe, so that polling costs the target nothing.
async fn wait_row(
    pg: &LocalCluster,
    table: &str,
    id: i32,
    since: Instant,
    deadline: Duration,
) -> Result<Duration, BoxError> {
    wait_version(pg, table, (id, None), since, deadline).await
}

/// Polls until the target holds the row with id `row.0` and, if `row.1` is given, with
/// that `name` (an update's mark); returns the time taken from `since`.
async fn wait_version(
    pg: &LocalCluster,
    table: &str,
    row: (i32, Option<&str>),
    since: Instant,
    deadline: Duration,
) -> Result<Duration, BoxError> {
    let (id, name) = row;
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    let probe = c
        .prepare(&format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1 AND ($2::text IS NULL OR name = $2))"
        ))
        .await?;
    loop {
        let there: bool = c.query_one(&probe, &[&id, &name]).await?.get(0);
        if there {
            return Ok(since.elapsed());
        }
        if since.elapsed() > deadline {
            return Err(format!(
                "{} lacks {table} row {id} after {} s",
                pg.name(),
                deadline.as_secs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first target's times to the backlog's first and last row, and every target's
/// time to its last row.
async fn time_targets(
    targets: &[LocalCluster],
    (table, first, last): (&str, i32, i32),
    mark: Option<&str>,
    t0: Instant,
) -> Result<(Duration, Duration), BoxError> {
    let deadline = Duration::from_secs(1800);
    let first_row = wait_version(&targets[0], table, (first, mark), t0, deadline).await?;
    let mut all = Vec::new();
    for t in targets {
        all.push(wait_version(t, table, (last, mark), t0, deadline).await?);
    }
    Ok((first_row, all[0]))
}

async fn id_range(pg: &LocalCluster, above: i32) -> Result<(i32, i32), BoxError> {
    let sql = "SELECT coalesce(min(id), 0), coalesce(max(id), 0) FROM pos_order_line WHERE id > $1";
    id_bounds(pg, sql, &above).await
}

/// The two ids a query that takes one parameter answers (the least and the greatest).
async fn id_bounds(
    pg: &LocalCluster,
    sql: &str,
    param: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<(i32, i32), BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    let r = c.query_one(sql, &[param]).await?;
    Ok((r.get(0), r.get(1)))
}

async fn setup(
    dir: &Path,
    downstream: u32,
    node_over: NodeOver,
    sessions: usize,
) -> Result<Bench, BoxError> {
    std::fs::create_dir_all(dir)?;
    let source = start(dir, "main".into()).await?;
    let mut natives = Vec::new();
    let mut walsyncs = Vec::new();
    for i in 1..=downstream {
        natives.push(start(dir, format!("native{i}")).await?);
        walsyncs.push(start(dir, format!("branch{i}")).await?);
    }
    for pg in std::iter::once(&source).chain(&natives).chain(&walsyncs) {
        sql(pg, SCHEMA).await?;
    }
    for pg in natives.iter().chain(&walsyncs) {
        sql(pg, ARRIVED).await?;
    }
    // Main as a star's hub with every walsync target as a branch; each branch's sidecar
    // pulls from main.
    let mut main_text = format!(
        "[cluster]\ntopology = \"star\"\nhub = \"main\"\n[node]\nname = \"main\"\nid = 1\ndsn = \"{}\"\n",
        source.dsn()
    );
    let mut configs = Vec::new();
    let mut config_paths = Vec::new();
    for (i, pg) in walsyncs.iter().enumerate() {
        let (name, id) = (format!("branch{}", i + 1), i + 2);
        main_text.push_str(&format!(
            "[[peers]]\nname = \"{name}\"\nid = {id}\ndsn = \"{}\"\nlinks = \"none\"\n",
            pg.dsn()
        ));
        let text = format!(
            "[cluster]\ntopology = \"star\"\nhub = \"main\"\n[node]\nname = \"{name}\"\nid = {id}\ndsn = \"{}\"\n\
             [apply]\nsessions = {sessions}\n\
             [[peers]]\nname = \"main\"\nid = 1\ndsn = \"{}\"\nlinks = \"pull\"\n",
            match node_over {
                NodeOver::Socket => pg.socket_dsn_for("postgres"),
                NodeOver::Tcp => pg.dsn(),
            },
            source.dsn()
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, &text)?;
        configs.push(Config::from_toml(&text, &path, std::iter::empty())?);
        config_paths.push(path);
    }
    init_node(&Config::from_toml(
        &main_text,
        &dir.join("main.toml"),
        std::iter::empty(),
    )?)
    .await?;
    for c in &configs {
        init_node(c).await?;
    }
    sql(
        &source,
        "CREATE PUBLICATION bench_native FOR TABLE pos_order_line, pos_order, stock_quant",
    )
    .await?;
    for (i, native) in natives.iter().enumerate() {
        // The launcher starts a subscription's worker at most once per
        // wal_retrieve_retry_interval (5 s by default): without this, every round after
        // the first would charge native with that wait.
        sql(
            native,
            "ALTER SYSTEM SET wal_retrieve_retry_interval = '50ms'",
        )
        .await?;
        sql(native, "SELECT pg_reload_conf()").await?;
        sql(
            native,
            &format!(
                "CREATE SUBSCRIPTION bench_native CONNECTION '{}' PUBLICATION bench_native \
                 WITH (copy_data = false, enabled = false, slot_name = 'bench_native_{}')",
                source.dsn(),
                i + 1
            ),
        )
        .await?;
    }
    Ok(Bench {
        dir: dir.to_path_buf(),
        source,
        natives,
        walsyncs,
        configs,
        config_paths,
    })
}

/// One size's results over its rounds.
struct Rounds {
    ratios: Vec<f64>,
    native_rate: Vec<f64>,
    walsync_rate: Vec<f64>,
    native_first: Vec<f64>,
    walsync_first: Vec<f64>,
    /// CPU seconds per 100,000 applied rows, every process of every path counted.
    native_cpu: Vec<PathCpu>,
    walsync_cpu: Vec<PathCpu>,
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks_per_second()
}

/// `getconf CLK_TCK`: 100 on Linux unless configured otherwise.
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The server processes an SQL query on `pg` lists (its first column: pids).
async fn pids(pg: &LocalCluster, sql: &str) -> Result<Vec<i32>, BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    Ok(c.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect())
}

/// CPU seconds one consumer kind's path used, by role.
#[derive(Debug, Default, Clone, Copy)]
struct PathCpu {
    /// The walsenders on main that serve the kind's slots.
    senders: f64,
    /// The target processes that apply (native apply workers; walsync's apply sessions).
    appliers: f64,
    /// The sidecars (walsync only: they run in this process).
    sidecars: f64,
}

impl PathCpu {
    fn total(&self) -> f64 {
        self.senders + self.appliers + self.sidecars
    }

    fn minus(self, before: PathCpu) -> PathCpu {
        PathCpu {
            senders: self.senders - before.senders,
            appliers: self.appliers - before.appliers,
            sidecars: self.sidecars - before.sidecars,
        }
    }

    fn per_100k(self, rows: f64) -> PathCpu {
        let f = 100_000.0 / rows;
        PathCpu {
            senders: self.senders * f,
            appliers: self.appliers * f,
            sidecars: self.sidecars * f,
        }
    }
}

/// The processes of one kind's path while its first `n` targets run.
struct Processes {
    kind: Kind,
    senders: Vec<i32>,
    appliers: Vec<i32>,
}

impl Processes {
    async fn of(b: &Bench, kind: Kind, n: usize) -> Result<Processes, BoxError> {
        let slots: Vec<String> = (0..n).map(|i| kind.slot(i)).collect();
        let c = connect(&Dsn::new(b.source.dsn()), "walsync bench").await?;
        let senders = c
            .query(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = ANY($1) AND active_pid IS NOT NULL",
                &[&slots],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut appliers = Vec::new();
        for t in &b.targets(kind)[..n] {
            appliers.extend(pids(t, kind.appliers_sql()).await?);
        }
        Ok(Processes {
            kind,
            senders,
            appliers,
        })
    }

    /// CPU seconds used so far; the sidecars' is this whole process's.
    fn cpu(&self) -> PathCpu {
        PathCpu {
            senders: self.senders.iter().map(|&p| cpu_seconds(p)).sum(),
            appliers: self.appliers.iter().map(|&p| cpu_seconds(p)).sum(),
            sidecars: match self.kind {
                Kind::Native => 0.0,
                Kind::Walsync => cpu_seconds(std::process::id() as i32),
            },
        }
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench(args: &BenchArgs, dir: &Path) -> CliResult {
    println!(
        "walsync bench: catch-up of a backlog of {} by {} targets pulling from one upstream at once, walsync vs native logical replication, same machine, same run, fsync on; each sidecar reaches its own node over {} and applies on {} session(s)",
        match args.workload {
            Workload::Insert => "inserts",
            Workload::Update => "updates",
            Workload::Pos => "point-of-sale sales",
        },
        args.downstream.max(1),
        match args.node_over {
            NodeOver::Socket => "its Unix socket",
            NodeOver::Tcp => "TCP",
        },
        args.apply_sessions
    );
    let most = args.branches.iter().copied().max().unwrap_or(1);
    let targets = if args.load_tps > 0 {
        args.downstream.max(most)
    } else {
        args.downstream
    };
    let b = setup(dir, targets.max(1), args.node_over, args.apply_sessions).await?;
    println!("clusters in {}", b.dir.display());

    let mut ok = true;
    let mut summary = Vec::new();
    if args.rows > 0 {
        if args.workload == Workload::Update {
            fill(&b, args.downstream.max(1) as usize, args.rows).await?;
        }
        for &size in &args.txn_rows {
            let mut r = Rounds {
                ratios: vec![],
                native_rate: vec![],
                walsync_rate: vec![],
                native_first: vec![],
                walsync_first: vec![],
                native_cpu: vec![],
                walsync_cpu: vec![],
            };
            for round in 1..=args.rounds.max(1) {
                println!(
                    "\n{size}-row transactions, round {round} of {}",
                    args.rounds.max(1)
                );
                let backlog = Backlog {
                    workload: args.workload,
                    rows: args.rows,
                    txn_rows: size,
                };
                ok &= catch_up(&b, args.downstream.max(1) as usize, backlog, &mut r).await?;
            }
            summary.push((size, r));
        }
        println!(
            "\nCPU seconds per 100,000 applied rows, every process of every path (median of each): \
             walsenders on main + appliers on the targets (+ walsync's sidecars)"
        );
        for (size, r) in &summary {
            let m = |v: &[PathCpu], f: fn(&PathCpu) -> f64| {
                median(&v.iter().map(f).collect::<Vec<_>>())
            };
            let (native, walsync) = (
                m(&r.native_cpu, PathCpu::total),
                m(&r.walsync_cpu, PathCpu::total),
            );
            println!(
                "{:<16}native {native:>5.2} ({:.2} + {:.2})   walsync {walsync:>5.2} ({:.2} + {:.2} + {:.2})   ({:.2}x native)",
                format!("{size} rows"),
                m(&r.native_cpu, |c| c.senders),
                m(&r.native_cpu, |c| c.appliers),
                m(&r.walsync_cpu, |c| c.senders),
                m(&r.walsync_cpu, |c| c.appliers),
                m(&r.walsync_cpu, |c| c.sidecars),
                walsync / native
            );
        }
        println!("\nmedian of {} rounds, first target:", args.rounds.max(1));
        println!(
            "{:<16}{:>16}{:>16}{:>8}{:>18}{:>18}",
            "transactions",
            "native rows/s",
            "walsync rows/s",
            "ratio",
            "native 1st row s",
            "walsync 1st row s"
        );
        for (size, r) in &summary {
            println!(
                "{:<16}{:>16.0}{:>16.0}{:>8.2}{:>18.2}{:>18.2}   (ratios: {})",
                format!("{size} rows"),
                median(&r.native_rate),
                median(&r.walsync_rate),
                median(&r.ratios),
                median(&r.native_first),
                median(&r.walsync_first),
                r.ratios
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if args.load_tps > 0 {
        load::curve(&b, &args.branches, args.load_tps, args.load_secs).await?;
    }
    if args.big_txn > 0 {
        big_transaction(&b, args.big_txn).await?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One round: a backlog, then native, then walsync. Returns whether every target holds
/// what the source holds.
async fn catch_up(b: &Bench, n: usize, backlog: Backlog, r: &mut Rounds) -> Result<bool, BoxError> {
    let Backlog {
        workload,
        rows,
        txn_rows,
    } = backlog;
    let txns = rows.div_ceil(txn_rows);
    // A mark no earlier round wrote: the last row shows it once caught up.
    let mark = format!(
        "round {} of {txn_rows}-row {workload:?}",
        r.ratios.len() + 1
    );
    let (rows_of, mark) = match workload {
        Workload::Insert => {
            let (first, last) = write_inserts(b, txns, txn_rows).await?;
            (("pos_order_line", first, last), None)
        }
        Workload::Update => {
            let (first, last) = write_updates(b, txns, txn_rows, &mark).await?;
            (("pos_order_line", first, last), Some(mark))
        }
        Workload::Pos => {
            let (first, last) = write_sales(b, txns, txn_rows, &mark).await?;
            (("pos_order", first, last), Some(mark))
        }
    };
    let mark = mark.as_deref();
    let new_rows = (txns * txn_rows) as f64;
    // A checkpoint logs the running transactions, as PostgreSQL does by itself every 15 s
    // of activity: a slot's restart point can move only past such a record. A backlog
    // written in seconds has none, so without it each round's walsenders would decode
    // every earlier round's backlog again before the new one (both kinds alike; the
    // first row came later and the CPU grew with each round).
    sql(&b.source, "CHECKPOINT").await?;

    // Native first, then walsync: one kind at a time, so they do not compete for the cores.
    let t0 = Instant::now();
    let natives = &b.natives[..n];
    for t in natives {
        sql(t, "ALTER SUBSCRIPTION bench_native ENABLE").await?;
    }
    let native = time_targets(natives, rows_of, mark, t0).await;
    // The processes started with the subscriptions: their CPU so far is the catch-up's.
    let native_cpu = Processes::of(b, Kind::Native, n).await?.cpu();
    for t in natives {
        sql(t, "ALTER SUBSCRIPTION bench_native DISABLE").await?;
    }
    let (native_first, native_all) = native?;

    // The sidecars run in this process: its CPU over the catch-up is theirs (and the
    // polling for rows, which costs next to nothing).
    let before = PathCpu {
        sidecars: cpu_seconds(std::process::id() as i32),
        ..PathCpu::default()
    };
    let t0 = Instant::now();
    let sidecars = Sidecars::start(b, n);
    let walsync = time_targets(&b.walsyncs[..n], rows_of, mark, t0).await;
    let walsync_cpu = Processes::of(b, Kind::Walsync, n)
        .await?
        .cpu()
        .minus(before);
    sidecars.stop().await;
    let (walsync_first, walsync_all) = walsync?;

    let native_rate = new_rows / native_all.as_secs_f64();
    let walsync_rate = new_rows / walsync_all.as_secs_f64();
    let ratio = walsync_rate / native_rate;
    println!(
        "native  {:>8.2} s {:>9.0} rows/s, first row after {:.2} s",
        native_all.as_secs_f64(),
        native_rate,
        native_first.as_secs_f64()
    );
    println!(
        "walsync {:>8.2} s {:>9.0} rows/s, first row after {:.2} s; ratio {ratio:.2}",
        walsync_all.as_secs_f64(),
        walsync_rate,
        walsync_first.as_secs_f64()
    );
    r.ratios.push(ratio);
    r.native_rate.push(native_rate);
    r.walsync_rate.push(walsync_rate);
    r.native_first.push(native_first.as_secs_f64());
    r.walsync_first.push(walsync_first.as_secs_f64());
    let applied = new_rows * n as f64;
    let (native_cpu, walsync_cpu) = (native_cpu.per_100k(applied), walsync_cpu.per_100k(applied));
    println!(
        "CPU per 100,000 applied rows: native {:.2} s, walsync {:.2} s",
        native_cpu.total(),
        walsync_cpu.total()
    );
    r.native_cpu.push(native_cpu);
    r.walsync_cpu.push(walsync_cpu);
    let total = contents(&b.source).await?;
    let mut equal = true;
    for t in natives.iter().chain(&b.walsyncs[..n]) {
        let holds = contents(t).await?;
        if holds != total {
            println!("{} holds {holds}; the source holds {total}", t.name());
            equal = false;
        }
    }
    Ok(equal)
}

/// One round's backlog: what it does, how many rows, how many per transaction.
#[derive(Debug, Clone, Copy)]
struct Backlog {
    workload: Workload,
    rows: u64,
    txn_rows: u64,
}

/// Writes `txns` transactions of `txn_rows` new order lines on the source; returns the
/// first and last new id.
async fn write_inserts(b: &Bench, txns: u64, txn_rows: u64) -> Result<(i32, i32), BoxError> {
    let (_, before) = id_range(&b.source, 0).await?;
    sql(
        &b.source,
        &format!(
            "DO $$ BEGIN FOR t IN 1..{txns} LOOP
               INSERT INTO pos_order_line (order_id, product_id, qty, price_unit, name)
               SELECT t, 1 + g % 40, 1 + g % 3, 9.99, 'Product ' || g FROM generate_series(1, {txn_rows}) g;
               COMMIT;
             END LOOP; END $$"
        ),
    )
    .await?;
    id_range(&b.source, before).await
}

/// Writes `txns` transactions on the source that each update `txn_rows` existing order
/// lines (in id order, each once), setting their name to `mark`; returns the first and
/// last id updated.
async fn write_updates(
    b: &Bench,
    txns: u64,
    txn_rows: u64,
    mark: &str,
) -> Result<(i32, i32), BoxError> {
    let want = (txns * txn_rows) as i64;
    let have = count(&b.source).await?;
    if have < want {
        return Err(format!(
            "the source holds {have} order lines, fewer than the {want} to update"
        )
        .into());
    }
    sql(
        &b.source,
        &format!(
            "DO $$ DECLARE ids int[]; BEGIN
               SELECT array_agg(id ORDER BY id) INTO ids FROM pos_order_line;
               FOR t IN 0..{txns} - 1 LOOP
                 UPDATE pos_order_line SET qty = qty + 1, name = '{mark}'
                  WHERE id = ANY (ids[t * {txn_rows} + 1 : (t + 1) * {txn_rows}]);
                 COMMIT;
               END LOOP; END $$"
        ),
    )
    .await?;
    let sql = "SELECT min(id), max(id) FROM pos_order_line WHERE name = $1";
    id_bounds(&b.source, sql, &mark).await
}

/// Writes `txns` sales on the source, each in its transaction: an order, its
/// `lines` order lines, the order's total and `mark` written back to it, and the stock
/// of each product sold counted down. Returns the first and last order's id.
async fn write_sales(b: &Bench, txns: u64, lines: u64, mark: &str) -> Result<(i32, i32), BoxError> {
    let c = connect(&Dsn::new(b.source.dsn()), "walsync bench").await?;
    let before: i32 = c
        .query_one("SELECT coalesce(max(id), 0) FROM pos_order", &[])
        .await?
        .get(0);
    sql(
        &b.source,
        &format!(
            "DO $$ DECLARE o int; BEGIN FOR t IN 1..{txns} LOOP
               INSERT INTO pos_order (name, amount) VALUES ('draft', 0) RETURNING id INTO o;
               INSERT INTO pos_order_line (order_id, product_id, qty, price_unit, name)
               SELECT o, 1 + (t + g) % 40, 1 + g % 3, 9.99, 'Product ' || g FROM generate_series(1, {lines}) g;
               UPDATE pos_order SET name = '{mark}',
                      amount = (SELECT sum((1 + g % 3) * 9.99) FROM generate_series(1, {lines}) g)
                WHERE id = o;
               UPDATE stock_quant q SET quantity = q.quantity - s.qty
                 FROM (SELECT 1 + (t + g) % 40 AS product_id, sum(1 + g % 3) AS qty
                         FROM generate_series(1, {lines}) g GROUP BY 1) s
                WHERE q.product_id = s.product_id;
               COMMIT;
             END LOOP; END $$"
        ),
    )
    .await?;
    id_bounds(
        &b.source,
        "SELECT min(id), max(id) FROM pos_order WHERE id > $1",
        &before,
    )
    .await
}

/// Before an update workload: `rows` order lines on the source and on every target of
/// both kinds (written in 1,000-row transactions and caught up, untimed).
async fn fill(b: &Bench, n: usize, rows: u64) -> Result<(), BoxError> {
    let have = count(&b.source).await? as u64;
    if have >= rows {
        return Ok(());
    }
    println!(
        "\nwriting {} order lines to update, caught up untimed by both kinds",
        rows - have
    );
    let (_, last) = write_inserts(b, (rows - have).div_ceil(1000), 1000).await?;
    let t0 = Instant::now();
    for t in &b.natives[..n] {
        sql(t, "ALTER SUBSCRIPTION bench_native ENABLE").await?;
    }
    let rows_of = ("pos_order_line", last, last);
    let native = time_targets(&b.natives[..n], rows_of, None, t0).await;
    for t in &b.natives[..n] {
        sql(t, "ALTER SUBSCRIPTION bench_native DISABLE").await?;
    }
    native?;
    let sidecars = Sidecars::start(b, n);
    let walsync = time_targets(&b.walsyncs[..n], rows_of, None, t0).await;
    sidecars.stop().await;
    walsync?;
    Ok(())
}

async fn big_transaction(b: &Bench, rows: u64) -> Result<(), BoxError> {
    println!("\none transaction of {rows} rows, applied by a `walsync run` process");
    sql(
        &b.source,
        &format!(
            "INSERT INTO pos_order_line (order_id, product_id, qty, price_unit, name)
             SELECT g, 1 + g % 40, 1, 9.99, 'Big ' || g FROM generate_series(1, {rows}) g"
        ),
    )
    .await?;
    // The sidecar a user runs, built next to this program (`cargo build --release --workspace`).
    let exe = std::env::current_exe()?.with_file_name("walsync");
    if !exe.is_file() {
        return Err(format!(
            "{} is missing: build the sidecar next to walsync-bench first (cargo build --release --workspace)",
            exe.display()
        )
        .into());
    }
    let mut child = std::process::Command::new(exe)
        .args(["run", "--config"])
        .arg(&b.config_paths[0])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let t0 = Instant::now();
    let mut peak_kb = 0u64;
    let (_, last) = id_range(&b.source, 0).await?;
    let c = connect(&Dsn::new(b.walsyncs[0].dsn()), "walsync bench").await?;
    loop {
        peak_kb = peak_kb.max(vm_hwm_kb(pid).unwrap_or(0));
        let there: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pos_order_line WHERE id = $1)",
                &[&last],
            )
            .await?
            .get(0);
        if there {
            break;
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            let _ = child.kill();
            return Err("the big transaction was not applied within an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    peak_kb = peak_kb.max(vm_hwm_kb(pid).unwrap_or(0));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    println!(
        "applied in {:.1} s ({:.0} rows/s); sidecar peak RSS {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        rows as f64 / t0.elapsed().as_secs_f64(),
        peak_kb as f64 / 1024.0
    );
    Ok(())
}

/// Peak resident set size of a process, from /proc/PID/status.
fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
