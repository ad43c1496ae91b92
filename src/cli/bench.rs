//! `walsync bench`: catch-up speed against PostgreSQL's native logical replication, in the
//! same run on the same machine, and the sidecar's peak memory on one huge transaction.
//!
//! Catch-up: a source cluster gets a backlog of `--rows` order lines in transactions of
//! `--txn-rows` while both consumers are stopped (a native subscription, disabled, and a
//! walsync link, not running), each on its own target cluster. Then each consumer in turn
//! is started and timed until its target holds every row. The ratio is
//! walsync rows/s ÷ native rows/s (above 1.0: walsync is faster). Absolute numbers depend
//! on the machine; the ratio is what to compare.
//!
//! Memory (`--big-txn N`): one source transaction of N rows is applied by a `walsync run`
//! child process, whose peak RSS (VmHWM) is read from /proc when it is done.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use super::CliResult;
use crate::config::{Config, Dsn};
use crate::localpg::LocalCluster;
use crate::node::connect::connect;
use crate::node::setup::init_node;
use crate::runtime::{run_sidecar, shutdown_channel};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Rows in the catch-up backlog (0 skips the catch-up comparison).
    #[arg(long, default_value_t = 200_000)]
    pub rows: u64,
    /// Rows per source transaction in the backlog.
    #[arg(long, default_value_t = 100)]
    pub txn_rows: u64,
    /// Rounds of catch-up (a new backlog each); the median ratio is the result.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
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
    native: LocalCluster,
    walsync: LocalCluster,
    config: Config,
    config_path: PathBuf,
}

pub async fn run(args: BenchArgs) -> CliResult {
    let dir = std::env::temp_dir().join(format!("walsync-bench-{}", std::process::id()));
    let result = bench(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn start(dir: &Path, name: &'static str) -> Result<LocalCluster, BoxError> {
    let path = dir.join(name);
    Ok(tokio::task::spawn_blocking(move || LocalCluster::start(&path, name)).await??)
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

/// Polls until the target holds the row with id `last` (the backlog's last row: source
/// transactions apply in commit order, so every earlier row is there too); returns the
/// time taken from `since`. An index probe, so that polling costs the target nothing.
async fn wait_row(
    pg: &LocalCluster,
    last: i32,
    since: Instant,
    deadline: Duration,
) -> Result<Duration, BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    let probe = c
        .prepare("SELECT EXISTS (SELECT 1 FROM pos_order_line WHERE id = $1)")
        .await?;
    loop {
        let there: bool = c.query_one(&probe, &[&last]).await?.get(0);
        if there {
            return Ok(since.elapsed());
        }
        if since.elapsed() > deadline {
            return Err(format!(
                "{} lacks row {last} after {} s",
                pg.name(),
                deadline.as_secs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn max_id(pg: &LocalCluster) -> Result<i32, BoxError> {
    let c = connect(&Dsn::new(pg.dsn()), "walsync bench").await?;
    Ok(
        c.query_one("SELECT coalesce(max(id), 0) FROM pos_order_line", &[])
            .await?
            .get(0),
    )
}

async fn setup(dir: &Path) -> Result<Bench, BoxError> {
    std::fs::create_dir_all(dir)?;
    let source = start(dir, "source").await?;
    let native = start(dir, "native").await?;
    let walsync = start(dir, "walsync").await?;
    for pg in [&source, &native, &walsync] {
        sql(pg, SCHEMA).await?;
    }
    let text = format!(
        "[cluster]\ntopology = \"mesh\"\n[node]\nname = \"target\"\nid = 2\ndsn = \"{}\"\n\
         [[peers]]\nname = \"source\"\nid = 1\ndsn = \"{}\"\nlinks = \"pull\"\n",
        walsync.dsn(),
        source.dsn()
    );
    let config_path = dir.join("target.toml");
    std::fs::write(&config_path, &text)?;
    let config = Config::from_toml(&text, &config_path, std::iter::empty())?;
    let source_text = format!(
        "[cluster]\ntopology = \"mesh\"\n[node]\nname = \"source\"\nid = 1\ndsn = \"{}\"\n\
         [[peers]]\nname = \"target\"\nid = 2\ndsn = \"{}\"\nlinks = \"none\"\n",
        source.dsn(),
        walsync.dsn()
    );
    init_node(&Config::from_toml(
        &source_text,
        &config_path,
        std::iter::empty(),
    )?)
    .await?;
    init_node(&config).await?;
    // The launcher starts a subscription's worker at most once per
    // wal_retrieve_retry_interval (5 s by default): without this, every round after the
    // first would charge native with that wait.
    sql(
        &native,
        "ALTER SYSTEM SET wal_retrieve_retry_interval = '50ms'",
    )
    .await?;
    sql(&native, "SELECT pg_reload_conf()").await?;
    // The native subscription gets its own publication and slot on the source.
    sql(
        &source,
        "CREATE PUBLICATION bench_native FOR TABLE pos_order_line",
    )
    .await?;
    sql(
        &native,
        &format!(
            "CREATE SUBSCRIPTION bench_native CONNECTION '{}' PUBLICATION bench_native WITH (copy_data = false, enabled = false)",
            source.dsn()
        ),
    )
    .await?;
    Ok(Bench {
        dir: dir.to_path_buf(),
        source,
        native,
        walsync,
        config,
        config_path,
    })
}

async fn bench(args: &BenchArgs, dir: &Path) -> CliResult {
    println!("walsync bench: catch-up of a backlog, walsync vs native logical replication, same machine, same run");
    let b = setup(dir).await?;
    println!("clusters in {}", b.dir.display());

    let mut ok = true;
    if args.rows > 0 {
        let mut ratios = Vec::new();
        for round in 1..=args.rounds.max(1) {
            println!("\nround {round} of {}", args.rounds.max(1));
            let (equal, ratio) = catch_up(&b, args).await?;
            ok &= equal;
            ratios.push(ratio);
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        println!(
            "\nratio walsync/native over {} rounds: median {median:.2} (all: {})",
            ratios.len(),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
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

/// One round: returns whether both targets hold every row, and the ratio.
async fn catch_up(b: &Bench, args: &BenchArgs) -> Result<(bool, f64), BoxError> {
    let txns = args.rows.div_ceil(args.txn_rows);
    println!("backlog: {} rows in {txns} transactions of {} rows, written while both consumers are stopped", args.rows, args.txn_rows);
    let start_count = count(&b.source).await?;
    sql(
        &b.source,
        &format!(
            "DO $$ BEGIN FOR t IN 1..{txns} LOOP
               INSERT INTO pos_order_line (order_id, product_id, qty, price_unit, name)
               SELECT t, 1 + g % 40, 1 + g % 3, 9.99, 'Product ' || g FROM generate_series(1, {}) g;
               COMMIT;
             END LOOP; END $$",
            args.txn_rows
        ),
    )
    .await?;
    let rows = count(&b.source).await?;
    let new_rows = rows - start_count;
    let last = max_id(&b.source).await?;
    let deadline = Duration::from_secs(1800);

    // Native first, then walsync: one at a time, so neither competes for the 2 cores.
    let t0 = Instant::now();
    sql(&b.native, "ALTER SUBSCRIPTION bench_native ENABLE").await?;
    let native = wait_row(&b.native, last, t0, deadline).await?;
    sql(&b.native, "ALTER SUBSCRIPTION bench_native DISABLE").await?;

    let (tx, rx) = shutdown_channel();
    let config = b.config.clone();
    let t0 = Instant::now();
    let sidecar = tokio::spawn(async move { run_sidecar(&config, rx).await });
    let walsync = wait_row(&b.walsync, last, t0, deadline).await;
    let _ = tx.send(true);
    let _ = sidecar.await;
    let walsync = walsync?;

    let native_rate = new_rows as f64 / native.as_secs_f64();
    let walsync_rate = new_rows as f64 / walsync.as_secs_f64();
    println!("{:<28}{:>12}{:>14}", "consumer", "seconds", "rows/s");
    println!(
        "{:<28}{:>12.2}{:>14.0}",
        "native (subscription)",
        native.as_secs_f64(),
        native_rate
    );
    println!(
        "{:<28}{:>12.2}{:>14.0}",
        "walsync",
        walsync.as_secs_f64(),
        walsync_rate
    );
    let ratio = walsync_rate / native_rate;
    println!("ratio walsync/native: {ratio:.2}");
    let (n, w) = (count(&b.native).await?, count(&b.walsync).await?);
    let equal = n == rows && w == rows;
    println!(
        "both targets hold all {rows} rows: {} (native {n}, walsync {w})",
        if equal { "yes" } else { "NO" }
    );
    Ok((equal, ratio))
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
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["run", "--config"])
        .arg(&b.config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let t0 = Instant::now();
    let mut peak_kb = 0u64;
    let last = max_id(&b.source).await?;
    let c = connect(&Dsn::new(b.walsync.dsn()), "walsync bench").await?;
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
