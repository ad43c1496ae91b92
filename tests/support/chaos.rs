//! Chaos scenarios: a star of three nodes (main, branch1, branch2) whose every link runs
//! through a [`FaultProxy`], a seeded retail workload shaped like Odoo's Point of Sale,
//! the steps scenarios are built from (`cut`, `heal`, `reset`, `write_on`,
//! `kill_sidecar`, `crash_postgres`, ...) and the invariants checked after each scenario,
//! each reported on its own (docs/testing.md).
//!
//! Every link `a -> b` is run by b's sidecar, which reaches a through the proxy
//! `(b, a)`: cutting a node cuts every proxy it is on either side of. The workload and the
//! checks talk to the servers directly.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use super::fault_proxy::FaultProxy;
use super::netns::Netns;
use super::*;

/// The memory a sidecar may reach (docs/benchmarks.md: rows under 8 kB).
pub const MEMORY_BOUND_KIB: u64 = 128 * 1024;

pub const CHAOS_SCHEMA: &str = "
CREATE TABLE pos_payment (id serial PRIMARY KEY, order_id integer NOT NULL REFERENCES pos_order(id) ON DELETE CASCADE, amount numeric(12,2) NOT NULL);
CREATE TABLE stock_quant (id serial PRIMARY KEY, product_id integer NOT NULL REFERENCES product(id), quantity numeric NOT NULL);
INSERT INTO product (id, name, price) SELECT g, 'product ' || g, g FROM generate_series(1, 5) g;
SELECT setval('product_id_seq', 5);
INSERT INTO stock_quant (id, product_id, quantity) VALUES (1, 1, 1000);
SELECT setval('stock_quant_id_seq', 1);
CREATE TABLE account_move (id serial PRIMARY KEY, name varchar NOT NULL DEFAULT '/', journal_id integer NOT NULL,
  state varchar NOT NULL DEFAULT 'draft', sequence_number integer);
CREATE UNIQUE INDEX account_move_unique_name ON account_move (name, journal_id) WHERE state = 'posted' AND name <> '/';
CREATE TABLE ir_filters (id serial PRIMARY KEY, name varchar NOT NULL, user_id integer);
CREATE UNIQUE INDEX ir_filters_name_uid ON ir_filters (lower(name), COALESCE(user_id, -1));
CREATE TABLE res_users_settings (id serial PRIMARY KEY, user_id integer NOT NULL UNIQUE, lang varchar);
CREATE TABLE res_users_settings_volumes (id serial PRIMARY KEY,
  user_setting_id integer NOT NULL REFERENCES res_users_settings (id), partner_id integer NOT NULL, volume numeric,
  UNIQUE (user_setting_id, partner_id));
";

/// Stock quantities are counters: sold on branches, received on main, all adding up. As in
/// Odoo, they live in their own table (stock_quant), not with the product's price: see
/// docs/conflicts.md on what a counter table's other columns can and cannot do.
/// Stock is a counter; slots whose peer is away more than 3 s (or 1 MiB behind) are
/// spooled, so every scenario also spools, hands over and replays under its faults.
const POLICY: &str = "[[tables]]\nname = \"stock_quant\"\ncounters = [\"quantity\"]\n\
    [spool]\nafter_bytes = 1048576\nafter_s = 3\nsegment_bytes = 131072\n";

pub const NODES: [&str; 3] = ["main", "branch1", "branch2"];

/// xorshift64*: seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed of this run: `WALSYNC_CHAOS_SEED`, else one from the clock. Printed, so that
/// a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("WALSYNC_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("WALSYNC_CHAOS_SEED={seed}");
    eprintln!("WALSYNC_CHAOS_SEED={seed}");
    seed
}

/// What the workload committed, to compare with what every node ends with.
#[derive(Default)]
pub struct Ledger {
    /// Orders committed per author node (each with 3 lines and 1 payment).
    pub orders: BTreeMap<String, u64>,
    /// Net stock change of product 1's quant (sales on branches, receipts on main).
    pub stock_moved: i64,
    /// Rows written in all.
    pub rows: u64,
}

pub struct Chaos {
    pub c: TestCluster,
    /// `(reader, remote)`: the proxy `reader`'s sidecar reaches `remote` through.
    proxies: Vec<((String, String), FaultProxy)>,
    /// In network-layer mode, each branch's namespace (its PostgreSQL and sidecar run
    /// there; dropped after the clusters, which stop through it).
    namespaces: Vec<(String, Netns)>,
    pub ledger: Ledger,
    pub rng: Rng,
    pub seed: u64,
    name: String,
    order_no: u64,
    /// Extra tables the scenario created (DDL), checked like the others.
    pub extra_tables: Vec<String>,
}

impl Chaos {
    /// The star with a fault proxy on every path a sidecar takes to a remote server.
    pub fn new(name: &str) -> Chaos {
        let c = Self::cluster(name);
        let mut proxies = Vec::new();
        for reader in &c.nodes {
            let mut text = std::fs::read_to_string(&reader.config).unwrap();
            for remote in &c.nodes {
                let port = format!("port={} ", remote.pg.port());
                if remote.name == reader.name || !text.contains(&port) {
                    continue;
                }
                let proxy = FaultProxy::start(remote.pg.port());
                text = text.replace(&port, &format!("port={} ", proxy.port()));
                proxies.push(((reader.name.clone(), remote.name.clone()), proxy));
            }
            std::fs::write(&reader.config, text).unwrap();
        }
        Self::started(name, c, proxies, Vec::new())
    }

    /// The star with each branch in a network namespace of its own, joined to main's by a
    /// veth link: faults are made by the kernel (links down, shaped bandwidth), not a
    /// proxy. Needs root: see [`Netns::unavailable`].
    pub fn new_netns(name: &str) -> Chaos {
        let mut c = Self::cluster(name);
        let main_port = c.node("main").pg.port();
        let mut namespaces = Vec::new();
        for branch in &NODES[1..] {
            let ns = Netns::create();
            let node = c.node_mut(branch);
            node.pg
                .set_network(Some(&ns.name), &[&ns.ns_ip])
                .expect("restart the branch's PostgreSQL in its namespace");
            node.netns = Some(ns.name.clone());
            // The branch reaches main over the link; main reaches the branch the same way.
            let from = format!("host=127.0.0.1 port={main_port} ");
            rewrite(
                &node.config,
                &from,
                &format!("host={} port={main_port} ", ns.host_ip),
            );
            let port = node.pg.port();
            let from = format!("host=127.0.0.1 port={port} ");
            let main = c.node("main");
            rewrite(
                &main.config,
                &from,
                &format!("host={} port={port} ", ns.ns_ip),
            );
            namespaces.push((branch.to_string(), ns));
        }
        let host_ips: Vec<&str> = namespaces.iter().map(|(_, n)| n.host_ip.as_str()).collect();
        c.node_mut("main")
            .pg
            .set_network(None, &host_ips)
            .expect("restart main's PostgreSQL listening on the links");
        Self::started(name, c, Vec::new(), namespaces)
    }

    fn cluster(name: &str) -> TestCluster {
        let schema = format!("{RETAIL_SCHEMA}{CHAOS_SCHEMA}");
        TestCluster::new_with(name, Topology::Star, &NODES, &schema, POLICY)
    }

    fn started(
        name: &str,
        c: TestCluster,
        proxies: Vec<((String, String), FaultProxy)>,
        namespaces: Vec<(String, Netns)>,
    ) -> Chaos {
        let seed = seed();
        let mut chaos = Chaos {
            c,
            proxies,
            namespaces,
            ledger: Ledger::default(),
            rng: Rng::new(seed),
            seed,
            name: name.to_string(),
            order_no: 0,
            extra_tables: Vec::new(),
        };
        chaos.c.start();
        chaos
    }

    fn proxies_of(&self, node: &str) -> impl Iterator<Item = &FaultProxy> {
        let node = node.to_string();
        self.proxies
            .iter()
            .filter(move |((a, b), _)| *a == node || *b == node)
            .map(|(_, p)| p)
    }

    /// The namespace links `node`'s traffic crosses: a branch's own, or all for main.
    fn links_of(&self, node: &str) -> impl Iterator<Item = &Netns> {
        let node = node.to_string();
        self.namespaces
            .iter()
            .filter(move |(b, _)| node == "main" || *b == node)
            .map(|(_, n)| n)
    }

    /// Black-holes every link of `node`.
    pub fn cut(&self, node: &str) {
        self.proxies_of(node).for_each(FaultProxy::cut);
        self.links_of(node).for_each(Netns::cut);
    }

    pub fn heal(&self, node: &str) {
        self.proxies_of(node).for_each(FaultProxy::heal);
        self.links_of(node).for_each(Netns::heal);
    }

    /// Every node sells (a few transactions each, again and again) until `done` holds;
    /// fails, with the sidecars' logs, if it does not within `within`.
    pub fn sell_until(&mut self, what: &str, within: Duration, done: impl Fn(&Chaos) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}:\n{}",
                self.c.logs()
            );
            for n in NODES {
                self.write_on(n, 5);
            }
        }
    }

    /// `node`'s links cut and restored every 100-400 ms (seeded) for `how_long`, while
    /// branch1 and main sell during each cut and branch2 between cuts.
    pub fn flap(&mut self, node: &str, how_long: Duration) {
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            self.cut(node);
            self.write_on("branch1", 3);
            self.write_on("main", 3);
            self.heal(node);
            self.write_on("branch2", 2);
            let pause = 100 + self.rng.below(300);
            std::thread::sleep(Duration::from_millis(pause));
        }
    }

    /// Limits the bandwidth of `node`'s links to `kbit` kbit/s (`None`: unlimited);
    /// network-layer mode only.
    pub fn throttle_link(&self, node: &str, kbit: Option<u32>) {
        assert!(
            !self.namespaces.is_empty(),
            "throttle_link needs Chaos::new_netns"
        );
        self.links_of(node).for_each(|n| n.throttle(kbit));
    }

    /// Closes every connection of `node`'s links now.
    pub fn reset(&self, node: &str) {
        self.proxies_of(node).for_each(FaultProxy::reset);
    }

    /// Proxy mode only (the kernel here may lack `tc netem`).
    pub fn latency(&self, node: &str, ms: u64, jitter_ms: u64) {
        self.proxies_of(node).for_each(|p| p.latency(ms, jitter_ms));
    }

    pub fn kill_sidecar(&mut self, node: &str) {
        let n = self.c.node_mut(node);
        n.kill_sidecar();
        n.start_sidecar();
    }

    /// An immediate-mode crash of `node`'s PostgreSQL, then its restart (crash recovery).
    pub fn crash_postgres(&mut self, node: &str) {
        let n = self.c.node_mut(node);
        n.pg.crash().expect("crash PostgreSQL");
        n.pg.restart().expect("restart PostgreSQL after the crash");
    }

    /// `txns` Point-of-Sale transactions on `node`, seeded: mostly orders (with 3 lines,
    /// a payment and the stock moved), some partners created, edited or deleted, a price
    /// edited now and then.
    pub fn write_on(&mut self, node: &str, txns: u32) {
        for _ in 0..txns {
            match self.rng.below(10) {
                0 => {
                    let sql = match self.rng.below(3) {
                        0 => format!("INSERT INTO partner (name, email) VALUES ('{node} customer', '{node}@shop')"),
                        1 => format!(
                            "UPDATE partner SET email = '{node}-{}@shop', write_date = now() \
                             WHERE id = (SELECT id FROM partner ORDER BY id OFFSET {} LIMIT 1)",
                            self.rng.below(1000),
                            self.rng.below(5)
                        ),
                        // A customer no sale here refers to, while another node,
                        // cut off, may be selling to it (decision 0016).
                        _ => format!(
                            "DELETE FROM partner WHERE id = (SELECT max(id) FROM partner p WHERE name = '{node} customer' \
                             AND NOT EXISTS (SELECT 1 FROM pos_order o WHERE o.partner_id = p.id))"
                        ),
                    };
                    self.c.node(node).sql(&sql);
                    self.ledger.rows += 1;
                }
                1 => {
                    let price = 1 + self.rng.below(50);
                    self.c.node(node).sql(&format!(
                        "UPDATE product SET price = {price} WHERE id = {}",
                        1 + self.rng.below(5)
                    ));
                    self.ledger.rows += 1;
                }
                _ => self.order_on(node),
            }
        }
    }

    /// One order (to one of the 3 newest customers here, whichever node made it: another
    /// node may be deleting it meanwhile), 3 lines, a payment, and product 1's stock moved (sold
    /// on a branch, received on main), in one transaction.
    pub fn order_on(&mut self, node: &str) {
        self.order_no += 1;
        let customer = self.rng.below(3);
        let moved: i64 = if node == "main" { 5 } else { -1 };
        self.c.node(node).sql(&format!(
            "BEGIN;
             WITH o AS (INSERT INTO pos_order (name, amount_total, partner_id)
                        VALUES ('{node}/{n}', 30, (SELECT id FROM partner ORDER BY id DESC OFFSET {customer} LIMIT 1))
                        RETURNING id),
                  l AS (INSERT INTO pos_order_line (order_id, product_id, qty, price_unit)
                        SELECT o.id, p, 1, 10 FROM o, generate_series(1, 3) p RETURNING 1)
             INSERT INTO pos_payment (order_id, amount) SELECT id, 30 FROM o;
             UPDATE stock_quant SET quantity = quantity + ({moved}) WHERE id = 1;
             COMMIT;",
            n = self.order_no
        ));
        *self.ledger.orders.entry(node.to_string()).or_default() += 1;
        self.ledger.stock_moved += moved;
        self.ledger.rows += 6;
    }

    /// Closing a session as Odoo does with a journal shared by every store: a draft entry,
    /// then posted under the next number of the journal as this node sees it (two nodes
    /// cut off from each other post the same name), and a saved filter whose name may
    /// differ from another node's only in case. Unique collisions, settled by renaming.
    pub fn post_entry_on(&mut self, node: &str) {
        let n = self.c.node(node);
        let id = n.sql("INSERT INTO account_move (journal_id) VALUES (1) RETURNING id");
        let id = id.lines().next().unwrap_or("").to_string();
        n.sql(&format!(
            "UPDATE account_move SET state = 'posted', \
               sequence_number = (SELECT coalesce(max(sequence_number), 0) + 1 FROM account_move WHERE state = 'posted'), \
               name = 'POSS/' || lpad(((SELECT coalesce(max(sequence_number), 0) + 1 FROM account_move WHERE state = 'posted'))::text, 5, '0') \
             WHERE id = {id}"
        ));
        // The same name on every node but for its case: main "Today 1", branch1
        // "today 1", ...; unique on each node, colliding between them.
        let case = NODES.iter().position(|x| *x == node).unwrap_or(0);
        let filter = ["Today", "today", "TODAY"][case];
        n.sql(&format!(
            "INSERT INTO ir_filters (name, user_id) \
             SELECT '{filter} ' || (count(*) + 1), 2 FROM ir_filters"
        ));
        self.ledger.rows += 3;
        if !self.extra_tables.iter().any(|t| t == "account_move") {
            self.extra_tables.push("account_move".into());
            self.extra_tables.push("ir_filters".into());
        }
    }

    /// A cashier's first login at this store, as Odoo's mail module does it: their
    /// settings row (one per user) and a partner's call volume in it. Two stores cut off
    /// from each other create the same user's settings twice: one entity, merged.
    pub fn login_on(&mut self, node: &str, user: u32) {
        self.c.node(node).sql(&format!(
            "INSERT INTO res_users_settings (user_id, lang) VALUES ({user}, '{node}') ON CONFLICT (user_id) DO NOTHING; \
             INSERT INTO res_users_settings_volumes (user_setting_id, partner_id, volume) \
             SELECT id, 1, 0.5 FROM res_users_settings WHERE user_id = {user} ON CONFLICT DO NOTHING"
        ));
        if !self.extra_tables.iter().any(|t| t == "res_users_settings") {
            self.extra_tables.push("res_users_settings".into());
            self.extra_tables.push("res_users_settings_volumes".into());
        }
    }

    /// An import of `rows` partners in one transaction.
    pub fn import_on(&mut self, node: &str, rows: u32) {
        self.c.node(node).sql(&format!(
            "INSERT INTO partner (name, email) SELECT 'imported ' || g, 'import@shop' FROM generate_series(1, {rows}) g"
        ));
        self.ledger.rows += rows as u64;
    }

    /// A module install on main: a new table, a new column.
    pub fn ddl_on_main(&mut self) {
        self.c.node("main").sql(
            "CREATE TABLE loyalty_card (id serial PRIMARY KEY, code text NOT NULL, points integer NOT NULL DEFAULT 0); \
             ALTER TABLE partner ADD COLUMN loyalty_points integer",
        );
        self.extra_tables.push("loyalty_card".into());
    }

    fn tables(&self) -> Vec<String> {
        let mut t: Vec<String> = [
            "partner",
            "product",
            "stock_quant",
            "pos_order",
            "pos_order_line",
            "pos_payment",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        t.extend(self.extra_tables.iter().cloned());
        t
    }

    /// Heals everything, waits until every node holds the same data, then checks every
    /// invariant, writes the scenario's row to the report and panics if any failed.
    pub fn assert_converged(&mut self) {
        for n in NODES {
            self.heal(n);
            self.latency(n, 0, 0);
        }
        let healed = Instant::now();
        let tables = self.tables();
        let identical = wait_until(Duration::from_secs(120), || {
            tables.iter().all(|t| {
                let sums: Vec<String> = self.c.nodes.iter().map(|n| n.checksum(t)).collect();
                sums.windows(2).all(|w| w[0] == w[1])
            })
        });
        let converge_s = healed.elapsed().as_secs_f64();
        let mut checks: Vec<(&str, Result<(), String>)> = Vec::new();
        checks.push((
            "identical",
            if identical {
                Ok(())
            } else {
                Err(tables
                    .iter()
                    .map(|t| {
                        let sums: Vec<String> = self
                            .c
                            .nodes
                            .iter()
                            .map(|n| format!("{}={}", n.name, n.checksum(t)))
                            .collect();
                        // A small table that differs: its rows, node by node.
                        let rows: Vec<String> = self
                            .c
                            .nodes
                            .iter()
                            .filter(|n| n.count(t) <= 10)
                            .map(|n| {
                                let r = n.sql(&format!("SELECT string_agg(t::text, ' ' ORDER BY t::text) FROM {t} t"));
                                let c = n.sql(&format!(
                                    "SELECT string_agg(link || ' ' || kind || ' ' || key::text || ' local ' || coalesce(local_origin, '-') || '@' || coalesce(local_commit_time::text, '-') || ' ' || coalesce(local_row::text, '-') || ' remote ' || remote_origin || '@' || remote_commit_time::text || ' ' || coalesce(remote_row::text, '-') || ' -> ' || outcome, ' ;; ' ORDER BY id) FROM walsync.conflicts WHERE table_name = '{t}'"
                                ));
                                format!("{}: {r} [conflicts: {c}]", n.name)
                            })
                            .collect();
                        format!("{t}: {} {}", sums.join(" "), rows.join(" | "))
                    })
                    .collect::<Vec<_>>()
                    .join("; "))
            },
        ));
        checks.push(("ledger", self.check_ledger()));
        checks.push(("ids", self.check_ids()));
        checks.push(("stock", self.check_stock()));
        checks.push(("links", self.check_links()));
        checks.push(("slots", self.check_slots()));
        checks.push(("memory", self.check_memory()));
        checks.push(("references", self.check_references()));
        let conflicts: i64 = self
            .c
            .nodes
            .iter()
            .map(|n| n.count("walsync.conflicts"))
            .sum();
        let row = format!(
            "| {} | {} | {} | {} | {:.1} | {} |\n",
            self.name,
            self.seed,
            self.ledger.rows,
            conflicts,
            converge_s,
            checks
                .iter()
                .map(|(_, r)| if r.is_ok() { "pass" } else { "FAIL" })
                .collect::<Vec<_>>()
                .join(" | ")
        );
        report(&row);
        print!("{}{row}", REPORT_HEAD);
        let failed: Vec<String> = checks
            .iter()
            .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
            .collect();
        if !failed.is_empty() || std::env::var_os("WALSYNC_CHAOS_KEEP_LOGS").is_some() {
            // The whole sidecar logs outlive the clusters, for the post-mortem.
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
            for n in &self.c.nodes {
                let file = dir.join(format!("chaos-{}-{}-{}.log", self.name, self.seed, n.name));
                let _ = std::fs::write(&file, format!("{}\n{}", server_state(n), n.sidecar_log()));
            }
        }
        assert!(
            failed.is_empty(),
            "scenario {} failed (replay with WALSYNC_CHAOS_SEED={}):\n{}\n{}",
            self.name,
            self.seed,
            failed.join("\n"),
            tail(&self.c.logs(), 80)
        );
    }

    /// No row on any node refers to a row that does not exist there (decision 0016).
    fn check_references(&self) -> Result<(), String> {
        let dangling: Vec<String> = self
            .c
            .nodes
            .iter()
            .flat_map(|n| {
                n.dangling_references()
                    .into_iter()
                    .map(move |d| format!("{}: {d}", n.name))
            })
            .collect();
        if dangling.is_empty() {
            Ok(())
        } else {
            Err(format!("rows pointing at nothing: {}", dangling.join(", ")))
        }
    }

    /// Every order the workload committed is on every node, with its lines and payment.
    fn check_ledger(&self) -> Result<(), String> {
        let total: u64 = self.ledger.orders.values().sum();
        for n in &self.c.nodes {
            for (author, want) in &self.ledger.orders {
                let got: u64 = n
                    .sql(&format!(
                        "SELECT count(*) FROM pos_order WHERE name LIKE '{author}/%'"
                    ))
                    .parse()
                    .unwrap();
                if got != *want {
                    return Err(format!(
                        "{} holds {got} of {author}'s {want} orders",
                        n.name
                    ));
                }
            }
            let lines = n.count("pos_order_line") as u64;
            let payments = n.count("pos_payment") as u64;
            if lines != 3 * total || payments != total {
                return Err(format!(
                    "{}: {lines} lines and {payments} payments for {total} orders",
                    n.name
                ));
            }
        }
        Ok(())
    }

    /// Every order has an id of its author's class: no node handed out another's ids.
    fn check_ids(&self) -> Result<(), String> {
        let main = self.c.node("main");
        for (i, author) in NODES.iter().enumerate() {
            let wrong = main.sql(&format!(
                "SELECT count(*) FROM pos_order WHERE name LIKE '{author}/%' AND id % 16 <> {}",
                i + 1
            ));
            if wrong != "0" {
                return Err(format!(
                    "{wrong} of {author}'s orders carry another node's ids"
                ));
            }
        }
        Ok(())
    }

    /// Stock sold and received on every node adds up (counter column).
    fn check_stock(&self) -> Result<(), String> {
        let want = 1000 + self.ledger.stock_moved;
        for n in &self.c.nodes {
            let got: i64 = n
                .sql("SELECT quantity FROM stock_quant WHERE id = 1")
                .parse()
                .unwrap();
            if got != want {
                return Err(format!(
                    "{} holds {got} of product 1, the moves add up to {want}",
                    n.name
                ));
            }
        }
        Ok(())
    }

    /// Every link streams again, without operator action.
    fn check_links(&self) -> Result<(), String> {
        let streaming = wait_until(Duration::from_secs(30), || {
            self.c.nodes.iter().all(|n| {
                n.sql("SELECT count(*) FROM walsync.link_status WHERE state <> 'streaming'") == "0"
                    && n.walsync(&["status"]).0
            })
        });
        if streaming {
            return Ok(());
        }
        Err(self
            .c
            .nodes
            .iter()
            .map(|n| n.walsync(&["status"]).1)
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn check_slots(&self) -> Result<(), String> {
        for n in &self.c.nodes {
            let lost = n.sql("SELECT count(*) FROM pg_replication_slots WHERE wal_status = 'lost'");
            if lost != "0" {
                return Err(format!("{}: {lost} slot(s) invalidated", n.name));
            }
        }
        Ok(())
    }

    /// Each running sidecar's peak resident memory stayed within the bound.
    fn check_memory(&self) -> Result<(), String> {
        for n in &self.c.nodes {
            let Some(pid) = n.sidecar.as_ref().map(|s| s.pid()) else {
                continue;
            };
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let peak: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
            if peak > MEMORY_BOUND_KIB {
                return Err(format!("{}'s sidecar peaked at {peak} KiB", n.name));
            }
        }
        Ok(())
    }
}

/// The report table's header (also printed by scripts/test).
pub const REPORT_HEAD: &str = include_str!("../chaos-report-head.md");

/// Replaces `from` with `to` in the file at `path`, which must contain it.
fn rewrite(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

/// What a node's server was doing when a scenario failed: sessions and their waits,
/// walsenders, slots, origins and link progress (a stuck link shows here).
fn server_state(n: &Node) -> String {
    let queries = [
        ("wal", "SELECT pg_current_wal_lsn()::text"),
        ("sessions", "SELECT string_agg(format('%s pid=%s state=%s wait=%s/%s xact_age=%s query=%s', coalesce(nullif(application_name, ''), backend_type), pid, state, wait_event_type, wait_event, now() - xact_start, left(query, 120)), E'\\n' ORDER BY pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"),
        ("walsenders", "SELECT string_agg(format('%s pid=%s state=%s sent=%s flush=%s reply_age=%s', application_name, pid, state, sent_lsn, flush_lsn, now() - reply_time), E'\\n') FROM pg_stat_replication"),
        ("slots", "SELECT string_agg(format('%s active=%s restart=%s confirmed=%s', slot_name, active_pid, restart_lsn, confirmed_flush_lsn), E'\\n') FROM pg_replication_slots"),
        ("origins", "SELECT string_agg(format('%s remote=%s local=%s', external_id, remote_lsn, local_lsn), E'\\n') FROM pg_replication_origin_status s JOIN pg_replication_origin o ON o.roident = s.local_id"),
        ("progress", "SELECT string_agg(format('%s source=%s txns=%s at=%s', link, source_lsn, transactions, applied_at), E'\\n') FROM walsync.link_progress"),
    ];
    let mut out = format!("===== server state of {} at failure =====\n", n.name);
    for (what, sql) in queries {
        let text = n
            .try_sql(sql)
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        out.push_str(&format!("--- {what}\n{text}\n"));
    }
    out
}

/// Appends a row to target/chaos-report.md (one write: rows from tests running at the
/// same time do not mix). `scripts/test` prints the table at the end.
fn report(row: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos-report.md");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(row.as_bytes());
    }
}

/// Polls `cond` until it holds or `deadline` passes.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
