//! Faults on the path between a sidecar and the PostgreSQL it reaches remotely, and the
//! chaos scenarios: each a named sequence of steps on a three-node star under a seeded
//! retail workload, then every invariant checked and reported (docs/testing.md).
//! `WALSYNC_CHAOS_SEED` replays a run; `WALSYNC_CHAOS_SOAK_SECS` makes the soak run long.
//!
//! Scenario: a_black_holed_link_is_noticed_and_resumes_after_heal
//!   1. while the path to main is black-holed, branch1's link says so (state `retrying`);
//!   2. after heal, every row main wrote meanwhile reaches branch1, with no operator action;
//!   3. after a cut too short to be noticed, the dead stream is replaced and rows flow again.
//!
//! Mechanics: branch1's sidecar reaches main through a FaultProxy; `cut` stalls every
//! connection without closing it (as a dead WAN or a lost NAT mapping does) and the
//! connections open during the cut stay dead after `heal`.

mod support;

use std::time::{Duration, Instant};

use support::chaos::{Chaos, NODES};
use support::fault_proxy::FaultProxy;
use support::*;

#[test]
fn a_black_holed_link_is_noticed_and_resumes_after_heal() {
    let mut c = TestCluster::new(
        "blackhole",
        Topology::Star,
        &["main", "branch1"],
        RETAIL_SCHEMA,
    );
    let proxy = FaultProxy::start(c.node("main").pg.port());
    let cfg = c.node("branch1").config.clone();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let main_port = format!("port={} ", c.node("main").pg.port());
    assert!(text.contains(&main_port));
    std::fs::write(
        &cfg,
        text.replace(&main_port, &format!("port={} ", proxy.port())),
    )
    .unwrap();
    c.start();
    c.node("main")
        .sql("INSERT INTO partner (id, name) VALUES (1, 'before the cut')");
    c.wait_rows("branch1", "partner", 1);

    proxy.cut();
    c.node("main").sql(
        "INSERT INTO partner (id, name) SELECT g, 'during the cut' FROM generate_series(2, 11) g",
    );
    let cfg = cfg.to_str().unwrap().to_string();
    wait_for(
        "branch1's link to notice the black hole",
        DEADLINE,
        || {
            walsync(&["status", "--config", &cfg])
                .1
                .contains("retrying")
        },
        || format!("{}\n{}", walsync(&["status", "--config", &cfg]).1, c.logs()),
    );

    proxy.heal();
    c.wait_rows("branch1", "partner", 11);
    c.wait_converged("partner");
    wait_for(
        "the link to stream again",
        DEADLINE,
        || walsync(&["status", "--config", &cfg]).0,
        || walsync(&["status", "--config", &cfg]).1,
    );

    // 3. A cut that heals before anyone notices leaves the stream's connection dead but
    //    the path working: the link must find out, let go of the dead stream (it never
    //    answers a goodbye) and resume.
    //    The cut comes while rows trickle over a slow path: the stream is then nearly
    //    always waiting for the rest of a message, the worst moment to lose the path.
    proxy.throttle(64 * 1024);
    c.node("main").sql(
        "DO $$ BEGIN FOR g IN 12..5011 LOOP \
           INSERT INTO partner (id, name) VALUES (g, 'over a slow path'); COMMIT; \
         END LOOP; END $$",
    );
    wait_for(
        "the first rows over the slow path",
        DEADLINE,
        || c.node("branch1").count("partner") > 11,
        || c.logs(),
    );
    proxy.cut();
    proxy.heal();
    proxy.throttle(0);
    c.wait_rows("branch1", "partner", 5011);
}

#[test]
fn long_backlog_one_branch_cut_while_everyone_sells() {
    let mut x = Chaos::new("long_backlog");
    x.write_on("main", 10);
    x.cut("branch1");
    // Far more changes than a sidecar buffers (1,024 events): it must stream them.
    for _ in 0..4 {
        x.write_on("main", 40);
        x.write_on("branch1", 40);
        x.write_on("branch2", 20);
    }
    x.import_on("main", 30_000);
    x.assert_converged();
}

#[test]
fn flapping_link_cut_and_restored_every_few_hundred_ms() {
    let mut x = Chaos::new("flapping_link");
    x.flap("branch1", Duration::from_secs(12));
    x.assert_converged();
}

#[test]
fn connections_reset_in_the_middle_of_a_large_transaction() {
    let mut x = Chaos::new("reset_mid_transaction");
    x.write_on("branch1", 10);
    x.import_on("main", 100_000);
    // While branch1 (and branch2) take the 100,000 rows in: reset their links again and again.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        x.reset("main");
        std::thread::sleep(Duration::from_millis(200 + x.rng.below(300)));
    }
    x.write_on("branch2", 10);
    x.assert_converged();
}

#[test]
fn a_sidecar_killed_mid_apply_resumes_exactly_once() {
    let mut x = Chaos::new("kill_sidecar");
    x.import_on("main", 60_000);
    x.write_on("main", 20);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300 + x.rng.below(400)));
        x.kill_sidecar("branch1");
        x.write_on("branch1", 5);
    }
    x.assert_converged();
}

#[test]
fn a_branch_postgres_crashes_mid_stream_and_recovers() {
    let mut x = Chaos::new("crash_postgres");
    x.import_on("main", 40_000);
    x.write_on("branch2", 20);
    std::thread::sleep(Duration::from_millis(300 + x.rng.below(400)));
    x.crash_postgres("branch2");
    x.write_on("branch2", 20);
    x.write_on("main", 20);
    x.assert_converged();
}

#[test]
fn ddl_on_main_while_a_branch_is_cut_then_data_in_the_new_column() {
    let mut x = Chaos::new("ddl_during_cut");
    x.cut("branch2");
    x.write_on("branch2", 20);
    x.ddl_on_main();
    x.c.node("main")
        .sql("INSERT INTO loyalty_card (code, points) VALUES ('LC-main', 10)");
    x.write_on("main", 20);
    x.heal("branch2");
    let b2 = x.c.node("branch2");
    wait_for(
        "the new column to reach branch2",
        DEADLINE,
        || {
            b2.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'partner' AND column_name = 'loyalty_points'") == "1"
        },
        || x.c.logs(),
    );
    b2.sql("UPDATE partner SET loyalty_points = 7 WHERE id = (SELECT min(id) FROM partner)");
    b2.sql("INSERT INTO loyalty_card (code, points) VALUES ('LC-branch2', 3)");
    x.assert_converged();
    assert_eq!(x.c.node("main").count("loyalty_card"), 2);
}

/// Failed about one run in five under load until the stale row version under concurrent
/// appliers was fixed (docs/testing.md).
#[test]
fn all_nodes_cut_from_each_other_then_healed_in_turn() {
    let mut x = Chaos::new("all_cut");
    for n in NODES {
        x.cut(n);
    }
    for n in NODES {
        x.write_on(n, 30);
    }
    // main and branch2 come back first, branch1 a while later.
    x.heal("main");
    x.heal("branch2");
    x.write_on("branch1", 10);
    x.write_on("branch2", 10);
    x.cut("branch1");
    x.assert_converged();
}

/// Scenario: stores_sharing_a_journal_collide_while_cut_and_no_link_stops
///   1. while every node is cut off, each posts entries in the journal they share (the
///      same names on several nodes, on a partial unique index) and saves filters whose
///      names differ only in case (an index on lower(name)), and the same cashiers log
///      in for the first time (one settings row per user, with a volume row pointing at
///      it), amid its usual sales;
///   2. after the heal every collision is settled the same way on every node: entries and
///      filters renamed, each user's settings merged into one row with one volume: every
///      table is identical, nothing is lost, no link stopped.
///
/// Mechanics: all three nodes cut, as in all_cut; the collisions come back through the
/// hub, which settles and forwards them while the branches settle their own.
#[test]
fn stores_sharing_a_journal_collide_while_cut_and_no_link_stops() {
    let mut x = Chaos::new("unique_collisions");
    for n in NODES {
        x.cut(n);
    }
    for user in 1..=3 {
        for n in NODES {
            x.post_entry_on(n);
            x.login_on(n, user);
            x.write_on(n, 5);
        }
    }
    x.heal("main");
    x.heal("branch1");
    x.post_entry_on("branch2");
    x.assert_converged();
    for n in NODES {
        let posted =
            x.c.node(n)
                .sql("SELECT count(*) FROM account_move WHERE state = 'posted'");
        assert_eq!(posted, "10", "{n}: every posted entry kept");
        let n = x.c.node(n);
        assert_eq!(
            n.sql("SELECT count(*) || ' ' || count(DISTINCT user_id) FROM res_users_settings"),
            "3 3",
            "{}: one settings row per user",
            n.name
        );
        assert_eq!(
            n.sql("SELECT count(*) FROM res_users_settings_volumes v JOIN res_users_settings s ON s.id = v.user_setting_id"),
            "3",
            "{}: one volume per user's settings, none pointing at a row merged away",
            n.name
        );
    }
}

#[test]
fn a_slow_jittery_link_still_converges() {
    let mut x = Chaos::new("latency_jitter");
    x.latency("branch2", 30, 40);
    for _ in 0..3 {
        x.write_on("branch2", 10);
        x.write_on("main", 10);
    }
    x.assert_converged();
}

/// A cut long enough for both ends to spool the other's slot (the walsender of a
/// black-holed stream lingers until `wal_sender_timeout`, 30 s here, then the slot is
/// inactive and spooled after 3 s), with main's sidecar killed and main's PostgreSQL
/// crashed while it spools; after the heal both links take their slots over, replay and
/// stream, and every invariant holds.
#[test]
fn a_branch_cut_long_enough_to_be_spooled_while_main_is_killed_and_crashed() {
    let mut x = Chaos::new("spooled_cut");
    x.cut("branch1");
    let spooled = |x: &Chaos, node: &str| {
        x.c.node(node)
            .sql("SELECT count(*) FROM walsync.spool_segments")
            .parse::<i64>()
            .unwrap()
    };
    x.sell_until("both ends to spool", Duration::from_secs(120), |x| {
        spooled(x, "main") > 0 && spooled(x, "branch1") > 0
    });
    x.kill_sidecar("main");
    for n in NODES {
        x.write_on(n, 20);
    }
    x.import_on("main", 3_000);
    x.crash_postgres("main");
    let before = spooled(&x, "main");
    x.sell_until(
        "main to spool again after its crash",
        Duration::from_secs(120),
        |x| spooled(x, "main") > before,
    );
    x.assert_converged();
    for n in NODES {
        assert_eq!(spooled(&x, n), 0, "{n} deleted every replayed segment");
    }
}

/// The same faults made by the kernel instead of a proxy: each branch runs (PostgreSQL and
/// sidecar) in a network namespace of its own, joined to main's by a veth link.
///   1. branch1's link goes down while every node sells and main imports, then comes up;
///   2. branch2's link is shaped to 1 Mbit/s while main imports;
///   3. main's links flap (down and up every few hundred ms) while every node sells.
///
/// Needs root; elsewhere it says it skipped. `tc netem` (delay, loss) is not used: not
/// every kernel has it (this machine's does not), and the proxy scenarios cover delay.
#[test]
fn network_layer_faults_in_namespaces_link_down_slow_and_flapping() {
    if let Some(why) = support::netns::Netns::unavailable() {
        eprintln!("SKIPPED: network namespaces are not available here ({why}); run as root");
        return;
    }
    let mut x = Chaos::new_netns("netns");
    for n in NODES {
        x.write_on(n, 5);
    }
    x.cut("branch1");
    for n in NODES {
        x.write_on(n, 20);
    }
    x.import_on("main", 5_000);
    // The fault is real: main's link from branch1 notices it.
    let main = x.c.node("main");
    wait_for(
        "main's link from branch1 to notice the link is down",
        DEADLINE,
        || {
            main.sql("SELECT state FROM walsync.link_status WHERE link = 'branch1->main'")
                != "streaming"
        },
        || main.walsync(&["status"]).1,
    );
    x.heal("branch1");
    x.assert_converged();

    x.throttle_link("branch2", Some(1024));
    x.import_on("main", 10_000);
    for n in NODES {
        x.write_on(n, 10);
    }
    x.assert_converged();
    x.throttle_link("branch2", None);

    x.flap("main", Duration::from_secs(10));
    x.assert_converged();
}

/// Random faults, for as long as asked (`WALSYNC_CHAOS_SOAK_SECS`, default 20), with the
/// printed seed. It failed now and then until a link stopped waiting for a dead stream
/// to say goodbye (docs/testing.md).
#[test]
fn soak_random_faults_for_a_while() {
    let secs: u64 = std::env::var("WALSYNC_CHAOS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut x = Chaos::new("soak");
    let until = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0;
    while Instant::now() < until {
        rounds += 1;
        let node = NODES[x.rng.below(3) as usize];
        match x.rng.below(8) {
            0 | 1 => x.cut(node),
            2 | 3 => x.heal(node),
            4 => x.reset(node),
            5 => x.kill_sidecar(node),
            6 if rounds % 10 == 0 => x.crash_postgres(node),
            6 => {
                let (ms, jitter) = (x.rng.below(50), x.rng.below(50));
                x.latency(node, ms, jitter)
            }
            _ => {
                let rows = 1_000 + x.rng.below(5_000) as u32;
                x.import_on(node, rows)
            }
        }
        for n in NODES {
            let txns = x.rng.below(6) as u32;
            x.write_on(n, txns);
        }
        // Now and then, everything heals and must converge before the next faults.
        if rounds % 25 == 0 {
            x.assert_converged();
        }
    }
    x.assert_converged();
}

#[test]
fn a_node_whose_clock_runs_ahead_still_converges_and_the_skew_is_reported() {
    let mut x = Chaos::new("clock_ahead");
    // branch2's server clock runs 30 s ahead (its commit times with it).
    x.c.node_mut("branch2")
        .pg
        .restart_with_clock_offset(Some("+30s"))
        .expect("a server with a clock 30 s ahead (needs the faketime package)");
    x.cut("branch2");
    for n in NODES {
        x.write_on(n, 30);
    }
    x.heal("branch2");
    let main = x.c.node("main");
    let config = main.config.to_str().unwrap().to_string();
    wait_for(
        "main to measure branch2's clock ahead, and status to say so",
        DEADLINE,
        || {
            let (ok, text) = walsync(&["status", "--config", &config]);
            !ok && text.contains("link branch2->main: the upstream's clock is")
                && text.contains("s ahead of this sidecar's")
        },
        || {
            format!(
                "{}\n{}",
                walsync(&["status", "--config", &config]).1,
                x.c.logs()
            )
        },
    );
    // The operator fixes the clock (NTP); every node still holds the same data.
    x.c.node_mut("branch2")
        .pg
        .restart_with_clock_offset(None)
        .unwrap();
    x.assert_converged();
}

/// A seeded adversary of schema changes (decision 0014): main changes its schema at
/// random (new tables with and without a key, tables made from a query, columns added,
/// renamed, unique indexes, tables whose rows refer to another's with ON DELETE CASCADE,
/// SET NULL or RESTRICT) while the branches are cut off and healed at random and every
/// node keeps writing into whatever tables it has (inserts, children of the rows other
/// nodes delete; on tables with a key also updates and deletes racing with the other nodes'),
/// sales included. After the heal every table is identical on every node, every sale is
/// everywhere, no row points at nothing and no link stopped.
/// Replay a failure with the printed `WALSYNC_CHAOS_SEED`.
#[test]
fn seeded_schema_changes_on_main_amid_cuts_and_writes_everywhere_converge() {
    let mut x = Chaos::new("adversary-schema");
    // Tables made on main: (name, has a key, its text column, its counter column).
    let mut made: Vec<(String, bool, String, String)> = Vec::new();
    // Tables with a foreign key into one of `made`'s keyed tables: (child, parent).
    let mut children: Vec<(String, String)> = Vec::new();
    for round in 0..14 {
        let branch = NODES[1 + x.rng.below(2) as usize];
        if x.rng.below(3) == 0 {
            x.heal(branch);
        } else {
            x.cut(branch);
        }
        let keyed: Vec<usize> = (0..made.len()).filter(|&i| made[i].1).collect();
        let pick = |x: &mut Chaos| keyed[x.rng.below(keyed.len() as u64) as usize];
        let ddl = match x.rng.below(7) {
            0 => {
                made.push((format!("t{round}"), true, "v".into(), "n".into()));
                format!("CREATE TABLE t{round} (id serial PRIMARY KEY, v text, n int DEFAULT 0)")
            }
            1 => {
                made.push((format!("log{round}"), false, "msg".into(), "at".into()));
                format!("CREATE TABLE log{round} (msg text, at int)")
            }
            2 => {
                made.push((format!("copy{round}"), false, "name".into(), "qty".into()));
                format!("CREATE TABLE copy{round} AS SELECT name, 0 AS qty FROM product")
            }
            3 if !keyed.is_empty() => {
                let t = &made[pick(&mut x)].0;
                format!("ALTER TABLE {t} ADD COLUMN c{round} text DEFAULT 'x'")
            }
            4 if !keyed.is_empty() => {
                let i = pick(&mut x);
                let (t, counter) = (made[i].0.clone(), made[i].3.clone());
                made[i].3 = format!("n{round}");
                format!("ALTER TABLE {t} RENAME COLUMN {counter} TO n{round}")
            }
            5 if !keyed.is_empty() => {
                let t = &made[pick(&mut x)].0;
                format!("CREATE UNIQUE INDEX {t}_v{round} ON {t} (v)")
            }
            // A table whose rows refer to a keyed table's: the parent's deletes on one
            // node race with new children on another (decision 0016).
            6 if !keyed.is_empty() => {
                let parent = made[pick(&mut x)].0.clone();
                let action = ["CASCADE", "SET NULL", "RESTRICT"][x.rng.below(3) as usize];
                made.push((format!("child{round}"), true, "v".into(), "n".into()));
                children.push((format!("child{round}"), parent.clone()));
                format!(
                    "CREATE TABLE child{round} (id serial PRIMARY KEY, v text, n int DEFAULT 0, \
                     parent_id int REFERENCES {parent} (id) ON DELETE {action})"
                )
            }
            _ => String::new(),
        };
        if !ddl.is_empty() {
            // A unique index main's own rows break is refused on main: nothing to replay.
            let _ = x.c.node("main").try_sql(&ddl);
        }
        for node in NODES {
            for (t, keyed, text, counter) in &made {
                let value = format!("{node}-{round}-{}", x.rng.below(3));
                let offset = x.rng.below(4);
                // Inserts everywhere; on tables with a key also updates and deletes of
                // rows other nodes may change or delete meanwhile. A node cut off before
                // the table (or a renamed column) reached it does not have it yet.
                let sql = match (keyed, x.rng.below(4)) {
                    (true, 0) => format!(
                        "UPDATE {t} SET {counter} = {counter} + 1, {text} = '{value}' \
                         WHERE id = (SELECT id FROM {t} ORDER BY id OFFSET {offset} LIMIT 1)"
                    ),
                    (true, 1) => format!(
                        "DELETE FROM {t} WHERE id = (SELECT id FROM {t} ORDER BY id OFFSET {offset} LIMIT 1)"
                    ),
                    _ => match children.iter().find(|(c, _)| c == t) {
                        Some((_, parent)) => format!(
                            "INSERT INTO {t} ({text}, parent_id) \
                             VALUES ('{value}', (SELECT id FROM {parent} ORDER BY id OFFSET {offset} LIMIT 1))"
                        ),
                        None => format!("INSERT INTO {t} ({text}) VALUES ('{value}')"),
                    },
                };
                let _ = x.c.node(node).try_sql(&sql);
            }
            let txns = x.rng.below(4) as u32;
            x.write_on(node, txns);
            x.order_on(node);
        }
    }
    x.extra_tables
        .extend(made.into_iter().map(|(t, _, _, _)| t));
    x.assert_converged();
}
