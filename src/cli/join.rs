//! `walsync join --config NEW.toml [--from PEER] [--restart]`: makes an empty database a
//! new node of a running cluster, with no downtime anywhere.
//!
//! 1. On the source (the hub of a star, or `--from`), a replication session creates the
//!    slot `walsync_to_<new>` and exports the snapshot the slot starts at.
//! 2. `pg_dump --snapshot` copies schema and data as of that very snapshot, and
//!    `pg_restore` loads it here (the source's event triggers and publication left out:
//!    this node gets its own).
//! 3. `walsync init` runs here: migrations, identity, publication, slots for the peers,
//!    sequences partitioned for this node above everything copied.
//!
//! The slot holds every change committed after the snapshot, so once this node's sidecar
//! runs (its link with the source set to `links = "both"`, or the source's sidecar told
//! about it), nothing is missed and nothing comes twice. `walsync.join_state` says whether
//! the copy finished: `walsync run` refuses a node whose join did not, and `--restart`
//! drops what a stopped join copied and starts over.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use pgwire_replication::ReplicationClient;
use tokio_postgres::Client;

use super::{CliResult, ConfigArg};
use crate::config::{Config, NodeRef, Topology};
use crate::lsn::Lsn;
use crate::names::PgName;
use crate::node::connect::connect;
use crate::node::setup::init_node;
use crate::stream::replication_config;

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The running node to copy from (default: the hub of a star).
    #[arg(long)]
    pub from: Option<String>,
    /// Drop what an earlier, stopped join copied here and start over.
    #[arg(long)]
    pub restart: bool,
    /// Grant ROLE what a sidecar needs on the new node once it is set up, as
    /// `walsync init --grant-to` does, so that its `walsync run` needs no superuser.
    #[arg(long, value_name = "ROLE")]
    pub grant_to: Option<String>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

pub async fn run(args: JoinArgs) -> CliResult {
    let config = args.config.load()?;
    let me = config.this_node();
    let source = source_node(&config, args.from.as_deref())?;
    let here = connect(&me.dsn, "walsync join").await?;
    prepare_here(&here, &me, &source, args.restart).await?;

    let slot = PgName::slot_to(&me.name);
    let src = connect(&source.dsn, "walsync join").await?;
    // A node removed earlier comes back with this fresh copy: its peers stop refusing it.
    if crate::node::fence::clear_removal(&src, me.name.as_str()).await? {
        println!(
            "{}: no longer refuses {} (it was removed earlier)",
            source.name, me.name
        );
    }
    for (p, _) in config.peer_nodes() {
        if p.name == source.name {
            continue;
        }
        let cleared = async {
            let client = connect(&p.dsn, "walsync join").await?;
            Ok::<_, Error>(crate::node::fence::clear_removal(&client, me.name.as_str()).await?)
        };
        match tokio::time::timeout(std::time::Duration::from_secs(20), cleared).await {
            Ok(Ok(true)) => println!("{}: no longer refuses {}", p.name, me.name),
            Ok(Ok(false)) => {}
            _ => println!(
                "{}: not reachable now; if {} was removed earlier, run walsync join again once it is",
                p.name, me.name
            ),
        }
    }
    let existing: bool = src
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?
        .get(0);
    if existing {
        if !args.restart {
            return Err(format!(
                "slot {slot} exists on {} already: node {} was joined before. \
                 If that join stopped halfway, run walsync join --restart; to remove the node, walsync remove-node {}",
                source.name, me.name, me.name
            )
            .into());
        }
        src.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(|e| {
                format!(
                    "dropping the slot {slot} of the stopped join on {}: {e}",
                    source.name
                )
            })?;
    }

    // The slot and the snapshot it starts at, exported by a replication session that
    // stays open (and idle) until pg_dump has imported the snapshot.
    let rcfg = replication_config(&source.dsn, &slot, Lsn::ZERO, "walsync join")?;
    let mut session = ReplicationClient::connect_gated(rcfg).await?;
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT 'export')"
        ))
        .await
        .map_err(|e| format!("creating slot {slot} on {}: {e}", source.name))?;
    let field = |i: usize| -> Option<String> {
        let row = rows.first()?;
        let v = row.get(i)?.as_ref()?;
        Some(String::from_utf8_lossy(v).into_owned())
    };
    let (start, snapshot) = match (field(1), field(2)) {
        (Some(l), Some(s)) => (l, s),
        _ => return Err("CREATE_REPLICATION_SLOT answered without a snapshot name".into()),
    };
    println!(
        "slot {slot} created on {} at {start}; copying the data of that moment",
        source.name
    );

    let estimates = row_estimates(&src).await?;
    let dir = std::env::temp_dir().join(format!("walsync-join-{}-{}", me.name, std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dump = dir.join("source.dump");
    let copied = tokio::task::spawn_blocking({
        let (source, me, dump) = (source.clone(), me.clone(), dump.clone());
        move || copy(&source, &me, &snapshot, &dump, &estimates)
    })
    .await?;
    // Ends the exporting session (a gated session ends when dropped before it starts).
    drop(session);
    let _ = std::fs::remove_dir_all(&dir);
    copied?;

    let report = init_node(&config).await?;
    for a in &report.actions {
        println!("  {a}");
    }
    if let Some(role) = &args.grant_to {
        super::init::grant_sidecar_rights(&here, me.name.as_str(), role).await?;
    }
    here.execute(
        "UPDATE walsync.join_state SET finished_at = now(), start_lsn = $1",
        &[&start],
    )
    .await?;
    println!(
        "node {} joined from {}: start its sidecar (walsync run); changes since {start} arrive through slot {slot}",
        me.name, source.name
    );
    print_source_entry(&config, &source);
    Ok(ExitCode::SUCCESS)
}

/// What the source's config must say of the new node, so that `remove-node` and
/// `status --cluster` run there reach it, and each link with it runs exactly once.
fn print_source_entry(config: &Config, source: &NodeRef) {
    let me = config.this_node();
    let Some(links) = config
        .peer_nodes()
        .into_iter()
        .find(|(p, _)| p.name == source.name)
        .map(|(_, links)| links)
    else {
        return;
    };
    println!(
        "\nnow add {} to {}'s config, so that walsync remove-node and status --cluster run there reach it:\n\n\
         [[peers]]\nname = \"{}\"\nid = {}\ndsn = \"...\"        # how {} reaches {}'s PostgreSQL\n\
         links = \"{}\"{}\n\n\
         {}'s sidecar reads it at its next start; until then nothing changes for the links.",
        me.name,
        source.name,
        me.name,
        me.id,
        source.name,
        me.name,
        links.counterpart().as_str(),
        match links.counterpart() {
            crate::config::LinkRun::None => format!("       # {}'s sidecar runs both links", me.name),
            _ => String::new(),
        },
        source.name,
    );
}

fn source_node(config: &Config, from: Option<&str>) -> Result<NodeRef, Error> {
    let name = match (from, config.cluster.topology, &config.cluster.hub) {
        (Some(f), _, _) => f.to_string(),
        (None, Topology::Star, Some(hub)) if *hub != config.node.name => hub.clone(),
        _ => return Err("which node to copy from? give --from PEER".into()),
    };
    config
        .peer_nodes()
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| n.name.as_str() == name)
        .ok_or_else(|| format!("--from {name}: not a peer in this node's config").into())
}

/// Checks this database can take the copy and records that a join started. An earlier
/// join that stopped halfway is refused, or with `restart` wiped first.
async fn prepare_here(
    here: &Client,
    me: &NodeRef,
    source: &NodeRef,
    restart: bool,
) -> Result<(), Error> {
    // Replica mode: walsync's own objects are never captured DDL (migration 0013 refuses
    // them from an ordinary session once a copy brought the event triggers).
    here.batch_execute(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         CREATE SCHEMA IF NOT EXISTS walsync; \
         CREATE TABLE IF NOT EXISTS walsync.join_state ( \
           singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), source text NOT NULL, \
           started_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, start_lsn text); \
         COMMIT",
    )
    .await?;
    let state = here
        .query_opt(
            "SELECT source, started_at::text, finished_at IS NOT NULL FROM walsync.join_state",
            &[],
        )
        .await?;
    match state {
        Some(r) if r.get::<_, bool>(2) => {
            return Err(format!(
                "node {} joined from {} already; nothing to do. A node removed with walsync remove-node \
                 comes back with a fresh join: recreate its database empty, then run walsync join",
                me.name,
                r.get::<_, String>(0)
            )
            .into())
        }
        Some(r) if !restart => {
            return Err(format!(
                "a walsync join from {} started at {} did not finish on node {}: \
                 run walsync join --restart to drop what it copied and start over",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                me.name
            )
            .into())
        }
        Some(_) => {
            let schemas: Vec<String> = here
                .query(
                    "SELECT nspname::text FROM pg_namespace WHERE nspname NOT IN ('walsync', 'information_schema') \
                     AND nspname NOT LIKE 'pg\\_%'",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for s in schemas {
                here.batch_execute(&format!(
                    "DROP SCHEMA {} CASCADE",
                    crate::names::quote_ident(&s)
                ))
                .await?;
            }
            here.batch_execute(
                "CREATE SCHEMA IF NOT EXISTS public; DELETE FROM walsync.join_state",
            )
            .await?;
            println!("dropped what the stopped join had copied");
        }
        None => {
            let tables: i64 = here
                .query_one(
                    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('walsync', 'information_schema') \
                       AND n.nspname NOT LIKE 'pg\\_%'",
                    &[],
                )
                .await?
                .get(0);
            if tables > 0 {
                return Err(format!(
                    "the database at {} holds {tables} table(s) already: join copies into an empty database; \
                     create a fresh one (createdb) and point [node] dsn at it",
                    me.dsn
                )
                .into());
            }
        }
    }
    here.execute(
        "INSERT INTO walsync.join_state (source) VALUES ($1)",
        &[&source.name.as_str()],
    )
    .await?;
    Ok(())
}

/// Estimated rows per table on the source (`schema.table` as pg_restore names it).
async fn row_estimates(src: &Client) -> Result<HashMap<String, f64>, Error> {
    Ok(src
        .query(
            "SELECT n.nspname || ' ' || c.relname, \
                    greatest(c.reltuples, coalesce(pg_stat_get_live_tuples(c.oid), 0), 0)::float8 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('walsync', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A PostgreSQL client program: next to the server binaries if found, else on PATH.
fn pg_program(name: &str) -> PathBuf {
    crate::node::pgbin::bindir(&[name])
        .map(|d| d.join(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

/// Dumps the source at `snapshot` and restores it here, reporting progress.
fn copy(
    source: &NodeRef,
    me: &NodeRef,
    snapshot: &str,
    dump: &Path,
    estimates: &HashMap<String, f64>,
) -> Result<(), Error> {
    let run = |cmd: &mut Command, what: &str| -> Result<(), Error> {
        let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
            format!("{what}: cannot run it ({e}); install the PostgreSQL client programs (postgresql-client)")
        })?;
        if !out.status.success() {
            return Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(())
    };
    // Passwords go to the programs in PGPASSWORD, not on their command lines (which
    // every user of the host can read in the process list).
    let (source_dsn, source_password) = source.dsn.for_libpq()?;
    let (my_dsn, my_password) = me.dsn.for_libpq()?;
    let mut dump_cmd = Command::new(pg_program("pg_dump"));
    if let Some(pw) = &source_password {
        dump_cmd.env("PGPASSWORD", pw);
    }
    run(
        dump_cmd
            .args([
                "--format=custom",
                "--exclude-schema=walsync",
                // Large objects are not replicated (pg_largeobject is a catalog), and the
                // source's spool segments live there.
                "--no-blobs",
                "--snapshot",
                snapshot,
            ])
            .arg("--file")
            .arg(dump)
            .arg("--dbname")
            .arg(&source_dsn),
        &format!("pg_dump of {}", source.name),
    )?;
    // Everything but what belongs to walsync on the source: its event triggers and the
    // tombstone triggers on each table (their functions live in schema walsync) and its
    // publication. Init makes this node's own.
    let list = Command::new(pg_program("pg_restore"))
        .arg("--list")
        .arg(dump)
        .output()?;
    if !list.status.success() {
        return Err(format!(
            "pg_restore --list failed: {}",
            String::from_utf8_lossy(&list.stderr)
        )
        .into());
    }
    let keep: String = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| {
            let tombstones =
                l.contains(" TRIGGER ") && l.split_whitespace().any(|w| w == "walsync_tombstone");
            !(l.contains(" EVENT TRIGGER ") || l.contains(" PUBLICATION ") || tombstones)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let list_file = dump.with_extension("list");
    std::fs::write(&list_file, keep)?;
    let mut restore_cmd = Command::new(pg_program("pg_restore"));
    if let Some(pw) = &my_password {
        restore_cmd.env("PGPASSWORD", pw);
    }
    let mut child = restore_cmd
        .args(["--verbose", "--exit-on-error", "--use-list"])
        .arg(&list_file)
        .arg("--dbname")
        .arg(&my_dsn)
        .arg(dump)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("pg_restore: cannot run it ({e}); install the PostgreSQL client programs")
        })?;
    let total_rows: f64 = estimates.values().sum();
    let total_tables = estimates.len();
    let mut progress = Progress::new(total_tables, total_rows);
    let mut errors = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line?;
        // "pg_restore: processing data for table "public.pos_order""
        if let Some(t) = line.split("processing data for table \"").nth(1) {
            let name = t.trim_end_matches('"').replacen('.', " ", 1);
            progress.table_done(estimates.get(&name).copied().unwrap_or(0.0));
        } else if line.contains("error") || line.contains("ERROR") {
            errors.push(line);
        }
    }
    let status = child.wait()?;
    progress.finish();
    if !status.success() {
        return Err(format!("pg_restore into {} failed: {}", me.name, errors.join("; ")).into());
    }
    Ok(())
}

/// Rows and tables copied, rate and ETA: a bar redrawn in place on a terminal, a plain
/// line at most every 2 seconds otherwise.
struct Progress {
    tables: usize,
    total_tables: usize,
    rows: f64,
    total_rows: f64,
    started: Instant,
    last_line: Option<Instant>,
    tty: bool,
}

impl Progress {
    fn new(total_tables: usize, total_rows: f64) -> Progress {
        Progress {
            tables: 0,
            total_tables,
            rows: 0.0,
            total_rows,
            started: Instant::now(),
            last_line: None,
            tty: std::io::stdout().is_terminal(),
        }
    }

    fn table_done(&mut self, rows: f64) {
        self.tables += 1;
        self.rows += rows;
        let due = self.last_line.is_none_or(|t| t.elapsed().as_secs() >= 2);
        if self.tty || due {
            self.show();
        }
    }

    fn show(&mut self) {
        self.last_line = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.rows / secs;
        let left = (self.total_rows - self.rows).max(0.0);
        let eta = if rate > 0.0 {
            format!("{:.0} s", left / rate)
        } else {
            "-".into()
        };
        let share = if self.total_rows > 0.0 {
            self.rows / self.total_rows
        } else {
            1.0
        };
        let text = format!(
            "copied {}/{} tables, ~{:.0}/~{:.0} rows, {:.0} rows/s, ETA {eta}",
            self.tables, self.total_tables, self.rows, self.total_rows, rate
        );
        if self.tty {
            let filled = (share.min(1.0) * 30.0) as usize;
            print!(
                "\r[{}{}] {text}",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
            let _ = std::io::stdout().flush();
        } else {
            println!("{text}");
        }
    }

    fn finish(&mut self) {
        self.show();
        if self.tty {
            println!();
        }
    }
}
