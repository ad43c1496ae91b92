//! Steady load with branches pulling, and what each branch costs main.
//!
//! Main runs a fixed rate of POS transactions (one order and its five lines in one
//! statement, pgbench at `--load-tps` with 4 clients, `synchronous_commit = on`) for
//! `--load-secs` while the first `n` targets of one kind pull from it, for each `n` of
//! `--branches`: native subscriptions first, then walsync sidecars, one kind at a time on
//! the same clusters. Before the load, each target is caught up (a marker order has
//! arrived); after it, each target holds the last order. Reported per kind and `n`:
//!
//! - **main's own transactions**: the rate pgbench reached, mean and p99 latency (from
//!   its per-transaction log);
//! - **lag**: for every order on every target, `arrived - created`: the order's row is
//!   stamped on main when written and on the target when applied (a target-only column
//!   default), with the one clock of this machine; p50 and p99;
//! - **main's walsender CPU per branch**, in % of a core over the load;
//! - **CPU per 100,000 applied rows**, every process of the path (as the catch-up counts);
//! - **WAL retained**: the most WAL any of the kind's slots held back (restart_lsn to
//!   main's insert position), sampled every 500 ms.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{median, sql, wait_row, Bench, BoxError, Kind, PathCpu, Processes, Sidecars};
use crate::localpg::LocalCluster;
use walsync::config::Dsn;
use walsync::node::connect::connect;

/// One POS sale: the order and its five lines, one statement, one transaction.
const SALE: &str =
    "WITH o AS (INSERT INTO pos_order (name, amount) VALUES ('POS order', 59.95) RETURNING id)
INSERT INTO pos_order_line (order_id, product_id, qty, price_unit, name)
SELECT o.id, 1 + g % 40, 1, 9.99, 'Product ' || g FROM o, generate_series(1, 5) g;
";

/// Rows one sale writes.
const ROWS_PER_SALE: f64 = 6.0;

/// What one kind did under the load with `n` targets pulling.
struct Measured {
    tps: f64,
    latency_mean_ms: f64,
    latency_p99_ms: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    /// Main's walsenders, per branch, in % of one core.
    sender_core_pct: f64,
    cpu: PathCpu,
    wal_retained: i64,
}

const HEADER: &str = "n   kind          tps   latency ms      p99 ms     lag p50     lag p99 \
                      sender %/branch   CPU/100k rows    WAL kB max";

impl Measured {
    /// One line under [`HEADER`].
    fn row(&self, n: usize, kind: Kind) -> String {
        format!(
            "{:<4}{:<9}{:>8.0}{:>13.1}{:>12.1}{:>12.1}{:>12.1}{:>16.1}{:>16.2}{:>14}",
            n,
            kind.name(),
            self.tps,
            self.latency_mean_ms,
            self.latency_p99_ms,
            self.lag_p50_ms,
            self.lag_p99_ms,
            self.sender_core_pct,
            self.cpu.total(),
            self.wal_retained / 1024
        )
    }
}

/// Runs the steady load for each branch count and prints what each kind cost.
pub(super) async fn curve(b: &Bench, counts: &[u32], tps: u32, secs: u32) -> Result<(), BoxError> {
    println!(
        "\nsteady load: {tps} POS transactions/s on main (1 order + 5 lines each, pgbench, 4 clients, \
         synchronous_commit on) for {secs} s while n targets pull"
    );
    let mut rows = Vec::new();
    for &n in counts {
        let n = (n.max(1) as usize).min(b.natives.len());
        for kind in [Kind::Native, Kind::Walsync] {
            println!("\n{} targets pulling: {}", n, kind.name());
            let m = steady(b, kind, n, tps, secs).await?;
            println!("{HEADER}\n{}", m.row(n, kind));
            rows.push((n, kind, m));
        }
    }
    println!("\n{HEADER}");
    for (n, kind, m) in &rows {
        println!("{}", m.row(*n, *kind));
    }
    Ok(())
}

async fn steady(
    b: &Bench,
    kind: Kind,
    n: usize,
    tps: u32,
    secs: u32,
) -> Result<Measured, BoxError> {
    let targets = &b.targets(kind)[..n];
    let sidecars = match kind {
        Kind::Native => {
            for t in targets {
                sql(t, "ALTER SUBSCRIPTION bench_native ENABLE").await?;
            }
            None
        }
        Kind::Walsync => Some(Sidecars::start(b, n)),
    };
    let result = measure(b, kind, targets, tps, secs).await;
    match sidecars {
        Some(s) => s.stop().await,
        None => {
            for t in targets {
                sql(t, "ALTER SUBSCRIPTION bench_native DISABLE").await?;
            }
        }
    }
    result
}

async fn measure(
    b: &Bench,
    kind: Kind,
    targets: &[LocalCluster],
    tps: u32,
    secs: u32,
) -> Result<Measured, BoxError> {
    let n = targets.len();
    let main = connect(&Dsn::new(b.source.dsn()), "walsync bench").await?;
    // Caught up first: a marker order has arrived everywhere (earlier runs' backlogs too).
    let marker: i32 = main
        .query_one(
            "INSERT INTO pos_order (name, amount) VALUES ('marker', 0) RETURNING id",
            &[],
        )
        .await?
        .get(0);
    for t in targets {
        wait_row(
            t,
            "pos_order",
            marker,
            Instant::now(),
            Duration::from_secs(900),
        )
        .await?;
    }
    let procs = Processes::of(b, kind, n).await?;
    let cpu_before = procs.cpu();

    // WAL the kind's slots hold back, sampled while the load runs.
    let slots: Vec<String> = (0..n).map(|i| kind.slot(i)).collect();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let dsn = b.source.dsn();
        tokio::spawn(async move {
            let c = connect(&Dsn::new(dsn), "walsync bench").await?;
            let mut most = 0i64;
            loop {
                let held: i64 = c
                    .query_one(
                        "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_insert_lsn(), restart_lsn)), 0)::int8 \
                         FROM pg_replication_slots WHERE slot_name = ANY($1)",
                        &[&slots],
                    )
                    .await?
                    .get(0);
                most = most.max(held);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop_rx.changed() => return Ok::<i64, BoxError>(most),
                }
            }
        })
    };

    let t0 = Instant::now();
    let latencies = pgbench(b, kind, n, tps, secs).await;
    let _ = stop_tx.send(true);
    let wal_retained = sampler.await??;
    let latencies = latencies?;
    let last: i32 = main
        .query_one("SELECT max(id) FROM pos_order", &[])
        .await?
        .get(0);
    for t in targets {
        wait_row(t, "pos_order", last, t0, Duration::from_secs(900)).await?;
    }
    let cpu = procs.cpu().minus(cpu_before);

    let mut lags = Vec::new();
    for t in targets {
        let c = connect(&Dsn::new(t.dsn()), "walsync bench").await?;
        for r in c
            .query(
                "SELECT (extract(epoch FROM arrived - created) * 1000)::float8 FROM pos_order \
                 WHERE id > $1 AND id <= $2 AND name <> 'marker'",
                &[&marker, &last],
            )
            .await?
        {
            lags.push(r.get::<_, f64>(0));
        }
    }
    let sales = latencies.len() as f64;
    Ok(Measured {
        tps: sales / secs as f64,
        latency_mean_ms: latencies.iter().sum::<f64>() / sales.max(1.0),
        latency_p99_ms: percentile(&latencies, 0.99),
        lag_p50_ms: median(&lags),
        lag_p99_ms: percentile(&lags, 0.99),
        sender_core_pct: cpu.senders / n as f64 / secs as f64 * 100.0,
        cpu: cpu.per_100k(sales * ROWS_PER_SALE * n as f64),
        wal_retained,
    })
}

/// Runs pgbench on main at `tps` for `secs`; returns every transaction's latency in ms.
async fn pgbench(
    b: &Bench,
    kind: Kind,
    n: usize,
    tps: u32,
    secs: u32,
) -> Result<Vec<f64>, BoxError> {
    let dir = b.dir.join(format!("pgbench-{}-{n}", kind.name()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("sale.sql");
    std::fs::write(&script, SALE)?;
    let exe = crate::localpg::bindir()?.join("pgbench");
    let prefix = dir.join("log");
    let out = tokio::process::Command::new(&exe)
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-c",
            "4",
            "-j",
            "2",
        ])
        .arg("-p")
        .arg(b.source.port().to_string())
        .arg("-R")
        .arg(tps.to_string())
        .arg("-T")
        .arg(secs.to_string())
        .arg("-f")
        .arg(&script)
        .arg("-l")
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg("postgres")
        .current_dir(&dir)
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    // One log per thread: `client transaction latency_us script epoch epoch_us [lag_us]`.
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path: PathBuf = entry?.path();
        if !path
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("log."))
        {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
            {
                latencies.push(us / 1000.0);
            }
        }
    }
    Ok(latencies)
}

/// The `q` quantile (nearest rank) of `v`; 0 for none.
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
