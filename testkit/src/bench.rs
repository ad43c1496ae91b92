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
//!
//! Memory (`--big-txn N`): one source transaction of N rows is applied by a `walsync run`
//! child process, whose peak RSS (VmHWM) is read from /proc when it is done.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

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
}

const SCHEMA: &str = "CREATE TABLE pos_order_line (
    id serial PRIMARY KEY, order_id integer NOT NULL, product_id integer NOT NULL,
    qty numeric NOT NULL, price_unit numeric(12,2) NOT NULL, name text, create_date timestamp NOT NULL DEFAULT now())";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Bench {
    dir: PathBuf,
    source: LocalCluster,
    natives: Vec<LocalCluster>,
    walsyncs: Vec<LocalCluster>,
    /// One sidecar config per walsync target.
    configs: Vec<Config>,
    config_paths: Vec<PathBuf>,
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

/// Polls until the target holds the row with id `id`; returns the time taken from
/// `since`. An index probe, so that polling costs the target nothing.
async fn wait_row(
    pg: &LocalCluster,
    id: i32,
    since: Instant,
    deadline: Duration,
) -> Result<Duration, BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    let probe = c
        .prepare("SELECT EXISTS (SELECT 1 FROM pos_order_line WHERE id = $1)")
        .await?;
    loop {
        let there: bool = c.query_one(&probe, &[&id]).await?.get(0);
        if there {
            return Ok(since.elapsed());
        }
        if since.elapsed() > deadline {
            return Err(format!(
                "{} lacks row {id} after {} s",
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
    first: i32,
    last: i32,
    t0: Instant,
) -> Result<(Duration, Duration), BoxError> {
    let deadline = Duration::from_secs(1800);
    let first_row = wait_row(&targets[0], first, t0, deadline).await?;
    let mut all = Vec::new();
    for t in targets {
        all.push(wait_row(t, last, t0, deadline).await?);
    }
    Ok((first_row, all[0]))
}

async fn id_range(pg: &LocalCluster, above: i32) -> Result<(i32, i32), BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    let r = c
        .query_one(
            "SELECT coalesce(min(id), 0), coalesce(max(id), 0) FROM pos_order_line WHERE id > $1",
            &[&above],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

async fn setup(dir: &Path, downstream: u32) -> Result<Bench, BoxError> {
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
             [[peers]]\nname = \"main\"\nid = 1\ndsn = \"{}\"\nlinks = \"pull\"\n",
            pg.dsn(),
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
        "CREATE PUBLICATION bench_native FOR TABLE pos_order_line",
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
    native_cpu: Vec<f64>,
    walsync_cpu: Vec<f64>,
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

/// The server processes on `pg` whose `application_name` is like `pattern`, or the
/// subscription workers when `pattern` is None.
async fn pids(pg: &LocalCluster, sql: &str) -> Result<Vec<i32>, BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    Ok(c.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect())
}

/// CPU seconds the processes of every path of one consumer kind have used: the
/// walsenders on main and, on each target, `target_sql`'s processes.
async fn path_cpu(
    source: &LocalCluster,
    sender_like: &str,
    targets: &[LocalCluster],
    target_sql: &str,
) -> Result<f64, BoxError> {
    let mut total = 0.0;
    for pid in pids(
        source,
        &format!("SELECT pid FROM pg_stat_replication WHERE application_name LIKE '{sender_like}'"),
    )
    .await?
    {
        total += cpu_seconds(pid);
    }
    for t in targets {
        for pid in pids(t, target_sql).await? {
            total += cpu_seconds(pid);
        }
    }
    Ok(total)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench(args: &BenchArgs, dir: &Path) -> CliResult {
    println!(
        "walsync bench: catch-up of a backlog by {} targets pulling from one upstream at once, walsync vs native logical replication, same machine, same run, fsync on",
        args.downstream.max(1)
    );
    let b = setup(dir, args.downstream.max(1)).await?;
    println!("clusters in {}", b.dir.display());

    let mut ok = true;
    let mut summary = Vec::new();
    if args.rows > 0 {
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
                ok &= catch_up(&b, args.rows, size, &mut r).await?;
            }
            summary.push((size, r));
        }
        println!(
            "\nCPU seconds per 100,000 applied rows, every process of every path (median): native \
             walsenders and apply workers; walsync walsenders, sidecars and apply backends"
        );
        for (size, r) in &summary {
            println!(
                "{:<16}native {:>6.2}   walsync {:>6.2}   ({:.2}x native)",
                format!("{size} rows"),
                median(&r.native_cpu),
                median(&r.walsync_cpu),
                median(&r.walsync_cpu) / median(&r.native_cpu)
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
/// every row.
async fn catch_up(b: &Bench, rows: u64, txn_rows: u64, r: &mut Rounds) -> Result<bool, BoxError> {
    let txns = rows.div_ceil(txn_rows);
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
    let total = count(&b.source).await?;
    let (first, last) = id_range(&b.source, before).await?;
    let new_rows = (txns * txn_rows) as f64;

    // Native first, then walsync: one kind at a time, so they do not compete for the cores.
    let t0 = Instant::now();
    for n in &b.natives {
        sql(n, "ALTER SUBSCRIPTION bench_native ENABLE").await?;
    }
    let native = time_targets(&b.natives, first, last, t0).await;
    // The processes started with the subscriptions: their CPU so far is the catch-up's.
    let native_cpu = path_cpu(
        &b.source,
        "bench_native%",
        &b.natives,
        "SELECT pid FROM pg_stat_subscription WHERE pid IS NOT NULL",
    )
    .await?;
    for n in &b.natives {
        sql(n, "ALTER SUBSCRIPTION bench_native DISABLE").await?;
    }
    let (native_first, native_all) = native?;

    let (tx, rx) = shutdown_channel();
    // The sidecars run in this process: its CPU over the catch-up is theirs (and the
    // polling for rows, which costs next to nothing).
    let own_cpu_before = cpu_seconds(std::process::id() as i32);
    let t0 = Instant::now();
    let sidecars: Vec<_> = b
        .configs
        .iter()
        .map(|c| {
            let (config, rx) = (c.clone(), rx.clone());
            tokio::spawn(async move { run_sidecar(&config, rx).await })
        })
        .collect();
    let walsync = time_targets(&b.walsyncs, first, last, t0).await;
    let walsync_cpu = path_cpu(
        &b.source,
        "walsync main->%",
        &b.walsyncs,
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'walsync %->% apply'",
    )
    .await?
        + (cpu_seconds(std::process::id() as i32) - own_cpu_before);
    let _ = tx.send(true);
    for s in sidecars {
        let _ = s.await;
    }
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
    let applied = new_rows * b.natives.len() as f64;
    r.native_cpu.push(native_cpu / applied * 100_000.0);
    r.walsync_cpu.push(walsync_cpu / applied * 100_000.0);
    println!(
        "CPU per 100,000 applied rows: native {:.2} s, walsync {:.2} s",
        native_cpu / applied * 100_000.0,
        walsync_cpu / applied * 100_000.0
    );
    let mut equal = true;
    for t in b.natives.iter().chain(&b.walsyncs) {
        let n = count(t).await?;
        if n != total {
            println!("{} holds {n} rows of {total}", t.name());
            equal = false;
        }
    }
    Ok(equal)
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
