//! A store's network at the network layer: a network namespace joined to this one by a
//! veth pair, for faults the kernel makes rather than a proxy.
//!
//! `cut()` takes the link down on both ends: packets in flight and new ones are lost,
//! open TCP connections stay open and retransmit into nothing (and, unlike the proxy's
//! cut, can come back to life when the link does), and new connections fail. `heal()`
//! brings it up again. `throttle(kbit)` shapes both directions with a token bucket
//! (`tc qdisc tbf`). Delay and loss need `tc netem`, which not every kernel has: see
//! [`Netns::netem_available`].
//!
//! Needs root (`ip netns`, `nsenter`). Everything is removed on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    /// This side's address on the link (the host's, as the store sees it).
    pub host_ip: String,
    /// The store's address on the link.
    pub ns_ip: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Why network namespaces cannot be used here, if they cannot (not root, no `ip`).
    pub fn unavailable() -> Option<String> {
        let probe = format!("wsprobe{}", std::process::id());
        match run(&["ip", "netns", "add", &probe]) {
            Ok(()) => {
                let _ = run(&["ip", "netns", "del", &probe]);
                None
            }
            Err(e) => Some(e),
        }
    }

    /// A new namespace with a veth link to this one, addresses on a /30 of its own.
    pub fn create() -> Netns {
        let pid = std::process::id();
        let i = NEXT.fetch_add(1, Ordering::SeqCst);
        // Unique among tests running at once: one /30 per (process, namespace).
        let (a, b) = (pid % 200 + 20, (pid / 200) % 60 * 4 + i % 4);
        let subnet = format!("10.{a}.{b}");
        let n = Netns {
            name: format!("walsync-{pid}-{i}"),
            host_if: format!("wsh{}x{i}", pid % 100_000),
            ns_if: format!("wsn{}x{i}", pid % 100_000),
            host_ip: format!("{subnet}.1"),
            ns_ip: format!("{subnet}.2"),
        };
        let (name, h, s) = (&n.name, &n.host_if, &n.ns_if);
        let steps: Vec<Vec<String>> = vec![
            vec!["ip", "netns", "add", name],
            vec!["ip", "link", "add", h, "type", "veth", "peer", "name", s],
            vec!["ip", "link", "set", s, "netns", name],
            vec!["ip", "addr", "add", &format!("{}/30", n.host_ip), "dev", h],
            vec!["ip", "link", "set", h, "up"],
            vec![
                "ip",
                "-n",
                name,
                "addr",
                "add",
                &format!("{}/30", n.ns_ip),
                "dev",
                s,
            ],
            vec!["ip", "-n", name, "link", "set", s, "up"],
            vec!["ip", "-n", name, "link", "set", "lo", "up"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(str::to_string).collect())
        .collect();
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            run(&args).unwrap_or_else(|e| panic!("setting up namespace {name}: {e}"));
        }
        n
    }

    /// The link goes down on both ends.
    pub fn cut(&self) {
        run(&["ip", "link", "set", &self.host_if, "down"]).unwrap();
        run(&["ip", "-n", &self.name, "link", "set", &self.ns_if, "down"]).unwrap();
    }

    pub fn heal(&self) {
        run(&["ip", "link", "set", &self.host_if, "up"]).unwrap();
        run(&["ip", "-n", &self.name, "link", "set", &self.ns_if, "up"]).unwrap();
    }

    /// Both directions limited to `kbit` kbit/s (`None`: unlimited).
    pub fn throttle(&self, kbit: Option<u32>) {
        for ns in [None, Some(self.name.as_str())] {
            let dev = if ns.is_some() {
                &self.ns_if
            } else {
                &self.host_if
            };
            let mut args = vec!["tc".to_string()];
            if let Some(ns) = ns {
                args.extend(["-n".into(), ns.into()]);
            }
            match kbit {
                Some(k) => args.extend(
                    [
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{k}kbit"),
                        "burst",
                        "32kb",
                        "latency",
                        "400ms",
                    ]
                    .map(String::from),
                ),
                None => args.extend(["qdisc", "del", "dev", dev, "root"].map(String::from)),
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = run(&args) {
                // Deleting a qdisc that is not there is fine.
                assert!(kbit.is_none(), "{e}");
            }
        }
    }

    /// Whether this kernel has `tc netem` (delay, loss): not all do.
    pub fn netem_available(&self) -> bool {
        let ok = run(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.host_if,
            "root",
            "netem",
            "delay",
            "1ms",
        ])
        .is_ok();
        if ok {
            let _ = run(&["tc", "qdisc", "del", "dev", &self.host_if, "root"]);
        }
        ok
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth, and with it the pair.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}
