//! FaultProxy: a TCP proxy on 127.0.0.1 between a sidecar and a PostgreSQL server it
//! reaches remotely, able to cut the path the way a WAN fails.
//!
//! `cut()` black-holes the path: every open connection stops carrying bytes (nothing is
//! refused, nothing is closed: the peers just hear nothing), and new connections are
//! accepted and hang the same way. `heal()` lets new connections through; the ones that
//! were open during the cut stay dead, as they do when a NAT mapping was lost.
//! `reset()` closes every open connection at once (mid-transaction, as a router reboot
//! does; std sends FIN, not RST, which the peers see the same way: the connection ends).
//! `latency(ms, jitter)` delays every chunk, `throttle(bytes/s)` paces them.
//! The test's own control connections go to the server directly, not through here.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

pub struct FaultProxy {
    port: u16,
    state: Arc<State>,
}

struct State {
    /// Bumped by every cut: a connection opened in an earlier epoch than the current one
    /// carries nothing any more.
    epoch: AtomicU64,
    cut: AtomicBool,
    stop: AtomicBool,
    /// Connections of an epoch below this are closed (reset).
    closed_below: AtomicU64,
    latency_ms: AtomicU64,
    jitter_ms: AtomicU64,
    /// 0: unlimited.
    bytes_per_sec: AtomicU64,
}

impl FaultProxy {
    /// Starts forwarding 127.0.0.1:<new port> to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            epoch: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            closed_below: AtomicU64::new(0),
            latency_ms: AtomicU64::new(0),
            jitter_ms: AtomicU64::new(0),
            bytes_per_sec: AtomicU64::new(0),
        });
        let s = state.clone();
        thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let epoch = s.epoch.load(Ordering::SeqCst);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                            continue;
                        };
                        for (from, to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            let s = s.clone();
                            thread::spawn(move || pump(from, to, epoch, &s));
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultProxy { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Black-holes the path: open connections and new ones carry nothing.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// New connections pass again; those open during the cut stay dead.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Closes every open connection now; new ones pass (unless cut).
    pub fn reset(&self) {
        let next = self.state.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.state.closed_below.store(next, Ordering::SeqCst);
    }

    /// Delays every chunk by `ms` plus up to `jitter_ms` (0, 0: none).
    pub fn latency(&self, ms: u64, jitter_ms: u64) {
        self.state.latency_ms.store(ms, Ordering::SeqCst);
        self.state.jitter_ms.store(jitter_ms, Ordering::SeqCst);
    }

    /// Paces each direction of each connection to `bytes_per_sec` (0: unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.state
            .bytes_per_sec
            .store(bytes_per_sec, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies bytes one way while the connection is alive; a dead one holds its sockets
/// open and silent until the proxy stops.
fn pump(mut from: TcpStream, mut to: TcpStream, epoch: u64, s: &State) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if s.stop.load(Ordering::SeqCst) {
            break;
        }
        if epoch < s.closed_below.load(Ordering::SeqCst) {
            break;
        }
        let dead = s.epoch.load(Ordering::SeqCst) != epoch || s.cut.load(Ordering::SeqCst);
        if dead {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                delay(s, n);
                // Bytes read just as the cut began are dropped, as a black hole would.
                if s.epoch.load(Ordering::SeqCst) == epoch
                    && !s.cut.load(Ordering::SeqCst)
                    && to.write_all(&buf[..n]).is_err()
                {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Waits as latency, jitter and bandwidth say for a chunk of `n` bytes.
fn delay(s: &State, n: usize) {
    let mut ms = s.latency_ms.load(Ordering::SeqCst);
    let jitter = s.jitter_ms.load(Ordering::SeqCst);
    if jitter > 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
        ms += nanos % (jitter + 1);
    }
    let rate = s.bytes_per_sec.load(Ordering::SeqCst);
    let paced = (n as u64 * 1_000_000)
        .checked_div(rate)
        .map_or(Duration::ZERO, Duration::from_micros);
    let wait = Duration::from_millis(ms) + paced;
    if !wait.is_zero() {
        thread::sleep(wait);
    }
}
