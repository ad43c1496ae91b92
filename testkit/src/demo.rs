//! `walsync-demo`: the main job on three throwaway local clusters, narrated.
//!
//! It starts main, branch1 and branch2 from the installed PostgreSQL binaries, gives them a
//! small retail schema, runs `init` and a sidecar per node (in this process), writes on
//! every node, cuts branch2 off, writes on both sides of the cut, reconnects, waits for
//! convergence and prints a per-table report. Exit 0 only if every node converged. Every
//! cluster it made is removed at the end, on failure and on Ctrl-C too.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::localpg::LocalCluster;
use crate::RunResult as CliResult;
use walsync::config::{Config, Dsn};
use walsync::node::connect::connect;
use walsync::node::setup::init_node;
use walsync::runtime::{run_sidecar, shutdown_channel, ShutdownTx};

#[derive(Debug, clap::Parser)]
#[command(
    name = "walsync-demo",
    version,
    about = "walsync on three throwaway local PostgreSQL clusters: write, cut, heal, converge"
)]
pub struct DemoArgs {
    /// Orders each node writes in each phase.
    #[arg(long, default_value_t = 25)]
    pub orders: u32,
    /// Seconds to wait for convergence before declaring failure.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

const NODES: [&str; 3] = ["main", "branch1", "branch2"];
const TABLES: [&str; 5] = [
    "res_partner",
    "product",
    "pos_order",
    "pos_order_line",
    "pos_payment",
];

/// The retail schema of the demo: Odoo-like tables with integer serial ids.
pub const DEMO_SCHEMA: &str = "
CREATE TABLE res_users (id serial PRIMARY KEY, login text NOT NULL UNIQUE, name text NOT NULL);
CREATE TABLE res_partner (id serial PRIMARY KEY, name text NOT NULL, email text, create_uid integer REFERENCES res_users(id), write_date timestamp DEFAULT now());
CREATE TABLE product (id serial PRIMARY KEY, name text NOT NULL, list_price numeric(12,2) NOT NULL, qty_available integer NOT NULL DEFAULT 0);
CREATE TABLE pos_order (id serial PRIMARY KEY, name text NOT NULL, partner_id integer REFERENCES res_partner(id), amount_total numeric(12,2) NOT NULL DEFAULT 0, date_order timestamptz NOT NULL DEFAULT now(), note jsonb);
CREATE TABLE pos_order_line (id serial PRIMARY KEY, order_id integer NOT NULL REFERENCES pos_order(id) ON DELETE CASCADE, product_id integer NOT NULL REFERENCES product(id), qty numeric NOT NULL, price_unit numeric(12,2) NOT NULL);
CREATE TABLE pos_payment (id serial PRIMARY KEY, order_id integer NOT NULL REFERENCES pos_order(id) ON DELETE CASCADE, method text NOT NULL, amount numeric(12,2) NOT NULL);
INSERT INTO res_users (login, name) VALUES ('admin', 'Administrator');
INSERT INTO product (name, list_price, qty_available) SELECT 'Product ' || g, (g % 17) + 0.99, 1000 FROM generate_series(1, 40) g;
";

struct DemoNode {
    name: &'static str,
    pg: LocalCluster,
    config: Config,
    sidecar: Option<(ShutdownTx, JoinHandle<()>)>,
}

impl DemoNode {
    fn start_sidecar(&mut self) {
        let (tx, rx) = shutdown_channel();
        let config = self.config.clone();
        let handle = tokio::spawn(async move { run_sidecar(&config, rx).await });
        self.sidecar = Some((tx, handle));
    }

    async fn stop_sidecar(&mut self) {
        if let Some((tx, handle)) = self.sidecar.take() {
            let _ = tx.send(true);
            let _ = handle.await;
        }
    }

    async fn client(&self) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
        Ok(connect(&Dsn::new(self.pg.dsn()), "walsync demo").await?)
    }
}

pub async fn run(args: DemoArgs) -> CliResult {
    let dir = std::env::temp_dir().join(format!("walsync-demo-{}", std::process::id()));
    let mut nodes: Vec<DemoNode> = Vec::new();
    let outcome = tokio::select! {
        r = demo(&args, &dir, &mut nodes) => r,
        _ = walsync::cli::run::wait_for_signal() => {
            println!("\ninterrupted: stopping and removing the demo clusters");
            Ok(ExitCode::from(130))
        }
    };
    for n in &mut nodes {
        n.stop_sidecar().await;
    }
    drop(nodes); // stops every cluster and removes its directory
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

async fn demo(args: &DemoArgs, dir: &Path, nodes: &mut Vec<DemoNode>) -> CliResult {
    println!("walsync demo: a main store server and two branches, each with its own PostgreSQL.");
    println!(
        "Working directory {} (removed at the end).\n",
        dir.display()
    );

    println!(
        "[1/6] starting three PostgreSQL clusters from {}",
        crate::localpg::bindir()?.display()
    );
    let mut clusters = Vec::new();
    for name in NODES {
        let path = dir.join(name);
        let pg = tokio::task::spawn_blocking(move || LocalCluster::start(&path, name)).await??;
        println!("      {name:<8} 127.0.0.1:{}", pg.port());
        clusters.push(pg);
    }
    let ports: Vec<u16> = clusters.iter().map(|c| c.port()).collect();
    for (i, pg) in clusters.into_iter().enumerate() {
        let config = Config::from_toml(
            &demo_config(i, &ports),
            &dir.join("demo.toml"),
            std::iter::empty(),
        )?;
        nodes.push(DemoNode {
            name: NODES[i],
            pg,
            config,
            sidecar: None,
        });
    }

    println!("\n[2/6] same retail schema on every node (users, partners, 40 products, orders, lines, payments); walsync init");
    for n in nodes.iter() {
        n.client().await?.batch_execute(DEMO_SCHEMA).await?;
        let report = init_node(&n.config).await?;
        println!("      {:<8} {}", n.name, report.actions.join("; "));
    }
    println!("      (star topology: main is the hub; branch2 runs both of its links with main, as a store behind NAT would)");

    println!(
        "\n[3/6] sidecars running; every node sells {} orders",
        args.orders
    );
    for n in nodes.iter_mut() {
        n.start_sidecar();
    }
    for n in nodes.iter() {
        sell(&n.client().await?, n.name, args.orders).await?;
    }
    let t = Instant::now();
    wait_converged(nodes, Duration::from_secs(args.timeout_s)).await?;
    println!("      converged in {:.1} s", t.elapsed().as_secs_f64());

    println!("\n[4/6] branch2's link is cut (its sidecar stops); both sides keep working");
    nodes[2].stop_sidecar().await;
    {
        let main = nodes[0].client().await?;
        main.batch_execute(
            "INSERT INTO res_partner (name, email) VALUES ('New supplier', 'supplier@example.com'); \
             UPDATE product SET list_price = list_price + 1 WHERE id <= 10",
        )
        .await?;
        sell(&main, "main", args.orders * 2).await?;
        sell(&nodes[1].client().await?, "branch1", args.orders).await?;
        sell(&nodes[2].client().await?, "branch2", args.orders * 2).await?;
    }
    println!("      main raised 10 prices and added a partner; every node kept selling. Rows now:");
    print_counts(nodes).await?;

    println!("\n[5/6] link restored; waiting for every node to converge");
    nodes[2].start_sidecar();
    let t = Instant::now();
    let converged = wait_converged(nodes, Duration::from_secs(args.timeout_s)).await;
    let took = t.elapsed();

    println!("\n[6/6] report");
    let ok = print_report(nodes).await?;
    match (converged, ok) {
        (Ok(()), true) => {
            println!(
                "\nconverged {:.1} s after the link returned: every table holds the same rows on all three nodes,",
                took.as_secs_f64()
            );
            println!("with no id collision (each node hands out its own ids) and no order lost on either side of the cut.");
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), _) => {
            println!("\nNOT converged: {e}");
            Ok(ExitCode::from(1))
        }
        (Ok(()), false) => {
            println!("\nNOT converged: the checksums differ");
            Ok(ExitCode::from(1))
        }
    }
}

fn demo_config(i: usize, ports: &[u16]) -> String {
    let dsn = |p: u16| format!("host=127.0.0.1 port={p} user=postgres dbname=postgres");
    let mut s = format!(
        "[cluster]\ntopology = \"star\"\nhub = \"main\"\n[node]\nname = \"{}\"\nid = {}\ndsn = \"{}\"\n[apply]\nreconnect_min_ms = 100\nreconnect_max_ms = 2000\n",
        NODES[i],
        i + 1,
        dsn(ports[i])
    );
    let peer = |j: usize, links: &str| {
        format!(
            "[[peers]]\nname = \"{}\"\nid = {}\ndsn = \"{}\"\nlinks = \"{links}\"\n",
            NODES[j],
            j + 1,
            dsn(ports[j])
        )
    };
    match i {
        0 => {
            s.push_str(&peer(1, "pull"));
            s.push_str(&peer(2, "none"));
        }
        1 => s.push_str(&peer(0, "pull")),
        _ => s.push_str(&peer(0, "both")),
    }
    s
}

/// One PoS-like transaction per order: a partner now and then, the order, 1-3 lines, a payment.
async fn sell(client: &Client, node: &str, orders: u32) -> Result<(), tokio_postgres::Error> {
    for i in 0..orders {
        let partner = if i % 5 == 0 {
            "(SELECT id FROM ins_partner)"
        } else {
            "NULL"
        };
        let sql = format!(
            "BEGIN;
             WITH ins_partner AS (INSERT INTO res_partner (name) SELECT 'Customer of {node} ' || {i} WHERE {i} % 5 = 0 RETURNING id),
                  o AS (INSERT INTO pos_order (name, partner_id, note) VALUES ('{node}/{i}', {partner}, '{{\"till\": 1}}') RETURNING id),
                  l AS (INSERT INTO pos_order_line (order_id, product_id, qty, price_unit)
                        SELECT o.id, p.id, 1 + g % 3, p.list_price FROM o, generate_series(1, 1 + {i} % 3) g
                        JOIN product p ON p.id = (SELECT id FROM product ORDER BY id OFFSET ({i} * 7 + g) % 40 LIMIT 1)
                        RETURNING order_id, qty * price_unit AS total)
             INSERT INTO pos_payment (order_id, method, amount) SELECT order_id, 'cash', sum(total) FROM l GROUP BY order_id;
             COMMIT;"
        );
        client.batch_execute(&sql).await?;
    }
    Ok(())
}

async fn table_state(client: &Client, table: &str) -> Result<(i64, String), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!("SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '-') FROM {table} t"),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

async fn states(
    nodes: &[DemoNode],
) -> Result<Vec<Vec<(i64, String)>>, Box<dyn std::error::Error + Send + Sync>> {
    let mut out = Vec::new();
    for n in nodes {
        let c = n.client().await?;
        let mut per = Vec::new();
        for t in TABLES {
            per.push(table_state(&c, t).await?);
        }
        out.push(per);
    }
    Ok(out)
}

async fn wait_converged(
    nodes: &[DemoNode],
    deadline: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let start = Instant::now();
    loop {
        let s = states(nodes).await?;
        if s.windows(2).all(|w| w[0] == w[1]) {
            return Ok(());
        }
        if start.elapsed() > deadline {
            return Err(format!("nodes still differ after {} s", deadline.as_secs()).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn print_counts(nodes: &[DemoNode]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let s = states(nodes).await?;
    println!(
        "      {:<16}{:>9}{:>9}{:>9}",
        "table", "main", "branch1", "branch2"
    );
    for (i, t) in TABLES.iter().enumerate() {
        println!(
            "      {:<16}{:>9}{:>9}{:>9}",
            t, s[0][i].0, s[1][i].0, s[2][i].0
        );
    }
    Ok(())
}

/// Prints rows and checksum per node and table; true if every table is equal everywhere.
async fn print_report(
    nodes: &[DemoNode],
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let s = states(nodes).await?;
    println!(
        "      {:<16}{:>9}{:>9}{:>9}   {:<10}{:<10}{:<10} equal",
        "table", "main", "branch1", "branch2", "md5 main", "branch1", "branch2"
    );
    let mut all = true;
    for (i, t) in TABLES.iter().enumerate() {
        let equal = s[0][i] == s[1][i] && s[1][i] == s[2][i];
        all &= equal;
        println!(
            "      {:<16}{:>9}{:>9}{:>9}   {:<10}{:<10}{:<10} {}",
            t,
            s[0][i].0,
            s[1][i].0,
            s[2][i].0,
            &s[0][i].1[..8.min(s[0][i].1.len())],
            &s[1][i].1[..8.min(s[1][i].1.len())],
            &s[2][i].1[..8.min(s[2][i].1.len())],
            if equal { "yes" } else { "NO" }
        );
    }
    Ok(all)
}
