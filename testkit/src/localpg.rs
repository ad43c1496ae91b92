//! Throwaway local PostgreSQL clusters, for integration tests and for `walsync-demo`.
//!
//! A [`LocalCluster`] owns one directory: `initdb` puts the data in `dir/data`, the server
//! log goes to `dir/postgres.log` and the Unix socket to `dir` itself. The server listens
//! on `127.0.0.1` only, on a port from [`free_port`], trusts every local connection
//! (user `postgres`, no password) and is configured for walsync: `wal_level=logical`,
//! `track_commit_timestamp=on`, 20 replication slots and WAL senders. `fsync` is off for
//! speed: [`LocalCluster::crash`] (an immediate shutdown) loses nothing that was committed,
//! only an OS crash would, and that does not happen in a test.
//!
//! Guarantees:
//! - [`LocalCluster::start`] returns only once the server accepts connections (it polls, it
//!   never sleeps a fixed time), or fails within 60 s with the tail of the server log in the
//!   error. A failed start leaves nothing behind: no server, no directory.
//! - Dropping a `LocalCluster` stops its server (immediate mode) and deletes its whole
//!   directory. Drop never panics; problems are reported through `tracing`. Set the
//!   environment variable `WALSYNC_LOCALPG_KEEP=1` to keep the directory (for debugging).
//! - Ports handed out by [`free_port`] are never handed out twice in one process, so
//!   tests running in parallel threads do not race for a port. If another process takes
//!   the port before the server binds it, `start` retries with a new port.
//! - The directory must be fresh: `start` refuses a non-empty directory, because the
//!   cluster deletes it when dropped.
//!
//! Running as root: PostgreSQL refuses to run as root, so when the effective uid is 0 the
//! server programs (`initdb`, `pg_ctl`, `postgres`) run as the `postgres` system user, which
//! then owns the cluster directory. Every parent of the directory must be traversable by
//! that user (world-executable, like `/tmp`); `start` checks this and says which parent is
//! not. `psql` and `pg_isready` are clients and run as the current user.
//!
//! The Unix socket path (`dir/.s.PGSQL.<port>`) must fit in 107 bytes, so keep `dir` short
//! (a directory under `/tmp` is fine).

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long starting (and stopping) a server may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between readiness checks while a server starts.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Server log, in the cluster directory.
const LOG_FILE: &str = "postgres.log";
/// Our settings, in the data directory, included from `postgresql.conf`.
const CONF_FILE: &str = "walsync_localpg.conf";
/// How many ports `start` tries when the chosen one is taken by another process.
const PORT_ATTEMPTS: usize = 5;
/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Lines of server log quoted in start errors.
const ERROR_LOG_LINES: usize = 20;
/// Set to keep the cluster directory when a `LocalCluster` is dropped.
const KEEP_ENV: &str = "WALSYNC_LOCALPG_KEEP";
/// Programs a PostgreSQL bin directory must contain to be usable here.
const REQUIRED_PROGRAMS: [&str; 5] = ["initdb", "pg_ctl", "postgres", "psql", "pg_isready"];

/// What went wrong with a local cluster. Messages say what failed and what to do about it;
/// the underlying `io::Error` or the command's stderr is part of the message.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server programs not found ({detail}); install postgresql \
         (apt-get install postgresql) or put a bin directory with initdb, pg_ctl, postgres, \
         psql and pg_isready on PATH"
    )]
    NotInstalled { detail: String },

    #[error(
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
         system user to run it as ({detail}); create one (useradd --system postgres, or \
         apt-get install postgresql) or run as a normal user"
    )]
    NoPostgresUser { detail: String },

    #[error("cannot use {dir} as a cluster directory: {problem}")]
    BadDir { dir: PathBuf, problem: String },

    #[error("{what} not found (tried {}); {hint}", .tried.join(", "))]
    NotFound {
        what: String,
        tried: Vec<String>,
        hint: String,
    },

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot run {program}: {source}; check the PostgreSQL installation")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{what} failed ({status}): {output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },

    #[error(
        "cluster {name} did not start on port {port}: {reason}\n\
         --- last lines of {log} ---\n{log_tail}"
    )]
    Start {
        name: String,
        port: u16,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },

    #[error(
        "cluster {name}: 127.0.0.1:{port} is taken by another process, and a server started \
         without it would leave its clients reaching that one\n\
         --- last lines of {log} ---\n{log_tail}"
    )]
    PortTaken {
        name: String,
        port: u16,
        log: PathBuf,
        log_tail: String,
    },

    #[error("cluster {name} (port {port}) is stopped; call restart() before {action}")]
    NotRunning {
        name: String,
        port: u16,
        action: &'static str,
    },

    #[error("psql on cluster {name} (port {port}) failed: {stderr}\nstatement: {sql}")]
    Sql {
        name: String,
        port: u16,
        sql: String,
        stderr: String,
    },
}

/// The system user the server programs run as when we are root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A PostgreSQL server in a directory it owns; stopped and deleted on drop.
#[derive(Debug)]
pub struct LocalCluster {
    dir: PathBuf,
    port: u16,
    bindir: PathBuf,
    name: String,
    running: bool,
    /// `Some` when we are root and run the server as the `postgres` user.
    run_as: Option<RunAs>,
    /// A clock offset for the server (libfaketime's `FAKETIME`, e.g. `+30s`).
    clock_offset: Option<String>,
    /// The network namespace the server runs in (`ip netns` name), if not the caller's.
    netns: Option<String>,
    /// Addresses listened on besides 127.0.0.1.
    extra_listen: Vec<String>,
}

impl LocalCluster {
    /// Runs `initdb` in `dir/data` and starts the server; returns once it accepts
    /// connections. `dir` is created if missing and must be empty if it exists: the
    /// cluster owns it and deletes it on drop. `name` appears in messages and as the
    /// server's `cluster_name`.
    pub fn start(dir: &Path, name: &str) -> Result<LocalCluster, LocalPgError> {
        Self::start_on_port(dir, name, free_port())
    }

    /// [`LocalCluster::start`] trying `port` first (tests use it to provoke a port clash).
    fn start_on_port(dir: &Path, name: &str, port: u16) -> Result<LocalCluster, LocalPgError> {
        let bindir = bindir()?;
        let run_as = if effective_uid()? == 0 {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = std::path::absolute(dir).map_err(|e| io_err("resolve", dir, e))?;
        check_socket_path(&dir)?;
        check_fresh(&dir)?;
        fs::create_dir_all(&dir).map_err(|e| io_err("create directory", &dir, e))?;

        // From here on, a failure drops `cluster`, which stops any server and removes `dir`.
        let mut cluster = LocalCluster {
            dir,
            port,
            bindir,
            name: name.to_owned(),
            running: false,
            run_as,
            clock_offset: None,
            netns: None,
            extra_listen: Vec::new(),
        };
        if let Some(user) = run_as {
            check_traversable(&cluster.dir, user)?;
            chown_tree(&cluster.dir, user)?;
        }
        cluster.initdb()?;
        cluster.first_start()?;
        tracing::debug!(name, port = cluster.port, dir = %cluster.dir.display(), "local cluster started");
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `host=127.0.0.1 port=N user=postgres dbname=postgres`
    pub fn dsn(&self) -> String {
        self.dsn_for("postgres")
    }

    /// The DSN of database `dbname` on this cluster (quoted if it needs to be).
    pub fn dsn_for(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            self.port,
            conninfo_value(dbname)
        )
    }

    /// The DSN of database `dbname` over this cluster's Unix socket (its directory is
    /// `unix_socket_directories`), as a program next to the server connects.
    pub fn socket_dsn_for(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={}",
            conninfo_value(&self.dir.to_string_lossy()),
            self.port,
            conninfo_value(dbname)
        )
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast -w`). Does nothing if it is stopped.
    pub fn stop(&mut self) -> Result<(), LocalPgError> {
        self.stop_mode("fast")
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate -w`): no
    /// checkpoint, the next start runs crash recovery. Does nothing if it is stopped.
    pub fn crash(&mut self) -> Result<(), LocalPgError> {
        self.stop_mode("immediate")
    }

    /// Starts the server again on the same port (and so with the same DSN) and waits until
    /// it accepts connections. A running server is stopped (fast) first.
    pub fn restart(&mut self) -> Result<(), LocalPgError> {
        if self.running {
            self.stop()?;
        }
        self.start_server()
    }

    /// Runs `sql` with `psql -X -v ON_ERROR_STOP=1 -At` as user `postgres` on database
    /// `postgres`; returns its stdout, trimmed (rows on lines, columns separated by `|`).
    pub fn psql(&self, sql: &str) -> Result<String, LocalPgError> {
        self.psql_in("postgres", sql)
    }

    /// [`LocalCluster::psql`] on database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> Result<String, LocalPgError> {
        if !self.running {
            return Err(LocalPgError::NotRunning {
                name: self.name.clone(),
                port: self.port,
                action: "running SQL",
            });
        }
        let port = self.port.to_string();
        let mut cmd = self.client_command("psql");
        cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(&port)
            .args(["-U", "postgres", "-d", db, "-c"])
            .arg(sql);
        let out = spawn_output(&mut cmd, &self.program("psql"))?;
        if !out.status.success() {
            return Err(LocalPgError::Sql {
                name: self.name.clone(),
                port: self.port,
                sql: abbreviate(sql, 300),
                stderr: command_output_text(&out),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Restarts the server inside network namespace `netns` (`ip netns` name; `None`: the
    /// caller's), listening on `extra_listen` besides 127.0.0.1 and trusting clients on
    /// the networks it is directly connected to (`samenet`). The DSN stays the same; `psql`
    /// reaches the server through its Unix socket whatever its namespace. For tests of
    /// faults at the network layer; needs root (`nsenter`).
    pub fn set_network(
        &mut self,
        netns: Option<&str>,
        extra_listen: &[&str],
    ) -> Result<(), LocalPgError> {
        if self.running {
            self.stop()?;
        }
        self.netns = netns.map(str::to_string);
        self.extra_listen = extra_listen.iter().map(|a| a.to_string()).collect();
        let hba = self.data_dir().join("pg_hba.conf");
        let text = fs::read_to_string(&hba).map_err(|e| io_err("read", &hba, e))?;
        const SAMENET: &str = "host all all samenet trust";
        if !text.contains(SAMENET) {
            fs::write(
                &hba,
                format!("{text}\n# added by walsync::localpg\n{SAMENET}\n"),
            )
            .map_err(|e| io_err("write", &hba, e))?;
        }
        self.write_settings()?;
        self.start_server()
    }

    /// The last `lines` lines of the server log, for failure messages. Never fails: if the
    /// log cannot be read, says so instead.
    pub fn log_tail(&self, lines: usize) -> String {
        let path = self.log_path();
        match fs::read(&path) {
            Ok(bytes) => last_lines(&String::from_utf8_lossy(&bytes), lines),
            Err(e) => format!("(cannot read {}: {e})", path.display()),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// A server-side program (`initdb`, `pg_ctl`), run as the `postgres` user if we are root,
    /// in the cluster directory, with a clean environment for PostgreSQL.
    fn server_command(&self, program: &str) -> Command {
        let mut cmd = match &self.netns {
            // nsenter enters the namespace as root, then becomes the server's user.
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}"));
                if let Some(user) = self.run_as {
                    cmd.args(["-S", &user.uid.to_string(), "-G", &user.gid.to_string()]);
                }
                cmd.arg("--").arg(self.program(program));
                cmd
            }
            None => {
                let mut cmd = Command::new(self.program(program));
                if let Some(user) = self.run_as {
                    cmd.gid(user.gid).uid(user.uid);
                }
                cmd
            }
        };
        clean_pg_env(&mut cmd);
        cmd.current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        cmd
    }

    /// A client program (`psql`, `pg_isready`), run as the current user.
    fn client_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.program(program));
        clean_pg_env(&mut cmd);
        cmd.env("LC_ALL", "C")
            .env("PGCLIENTENCODING", "UTF8")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `initdb`, then writes our settings and includes them from `postgresql.conf`.
    fn initdb(&mut self) -> Result<(), LocalPgError> {
        let data = self.data_dir();
        let run = |ctype: Option<&str>| -> Result<Output, LocalPgError> {
            let mut cmd = self.server_command("initdb");
            cmd.args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data);
            if let Some(ctype) = ctype {
                cmd.arg(format!("--lc-ctype={ctype}"));
            }
            spawn_output(&mut cmd, &self.program("initdb"))
        };
        // C.UTF-8 gives upper()/lower() and regex classes for non-ASCII text; not every
        // system has that locale, and initdb says so ("invalid locale name").
        let mut out = run(Some("C.UTF-8"))?;
        if !out.status.success() && command_output_text(&out).contains("C.UTF-8") {
            tracing::debug!(name = %self.name, "initdb does not accept --lc-ctype=C.UTF-8; using C");
            if data.exists() {
                fs::remove_dir_all(&data).map_err(|e| io_err("remove", &data, e))?;
            }
            out = run(None)?;
        }
        if !out.status.success() {
            return Err(LocalPgError::Command {
                what: format!("initdb for cluster {} in {}", self.name, data.display()),
                status: out.status.to_string(),
                output: command_output_text(&out),
            });
        }
        self.write_settings()?;
        let main_conf = data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&main_conf)
            .map_err(|e| io_err("open", &main_conf, e))?;
        writeln!(f, "\n# added by walsync::localpg\ninclude '{CONF_FILE}'")
            .map_err(|e| io_err("write", &main_conf, e))?;
        Ok(())
    }

    /// (Re)writes our settings file, with the current port.
    fn write_settings(&self) -> Result<(), LocalPgError> {
        let path = self.data_dir().join(CONF_FILE);
        let text = settings(self.port, &self.dir, &self.name, &self.extra_listen);
        fs::write(&path, text).map_err(|e| io_err("write", &path, e))?;
        if let Some(user) = self.run_as {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                .map_err(|e| io_err("change the owner of", &path, e))?;
        }
        Ok(())
    }

    /// The first start: if another process took the port meanwhile, retry on a new one.
    fn first_start(&mut self) -> Result<(), LocalPgError> {
        let mut attempt = 1;
        loop {
            self.write_settings()?;
            match self.start_server() {
                Ok(()) => return Ok(()),
                Err(e @ LocalPgError::PortTaken { .. }) if attempt < PORT_ATTEMPTS => {
                    let old = self.port;
                    self.port = free_port();
                    tracing::debug!(name = %self.name, old, new = self.port, error = %e, "port taken; retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the log written since `offset` says the port was in use.
    fn port_was_taken(&self, offset: u64) -> bool {
        let mut new = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            let _ = f.seek(SeekFrom::Start(offset));
            let _ = f.read_to_string(&mut new);
        }
        new.contains("Address already in use")
    }

    /// Restarts the server with its clock moved by `offset` (libfaketime's syntax: `+30s`,
    /// `-2m`), or back to the real clock with `None`: a node whose clock is off, for tests.
    /// Needs the `faketime` package.
    pub fn restart_with_clock_offset(&mut self, offset: Option<&str>) -> Result<(), LocalPgError> {
        if offset.is_some() {
            faketime_library()?;
        }
        self.clock_offset = offset.map(str::to_string);
        self.restart()
    }

    /// `pg_ctl start -w`, then polls `pg_isready` until the server accepts connections.
    /// A start whose log says the port was in use is [`LocalPgError::PortTaken`], whether
    /// the server failed or came up on its other addresses only (then it is stopped).
    fn start_server(&mut self) -> Result<(), LocalPgError> {
        let log_before = file_len(&self.log_path());
        let started = self.start_and_wait();
        if self.port_was_taken(log_before) {
            if started.is_ok() {
                let _ = self.stop();
            }
            return Err(LocalPgError::PortTaken {
                name: self.name.clone(),
                port: self.port,
                log: self.log_path(),
                log_tail: self.log_tail(ERROR_LOG_LINES),
            });
        }
        started
    }

    fn start_and_wait(&mut self) -> Result<(), LocalPgError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let timeout = START_TIMEOUT.as_secs().to_string();
        let mut cmd = self.server_command("pg_ctl");
        if let Some(offset) = &self.clock_offset {
            cmd.env("LD_PRELOAD", faketime_library()?)
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        cmd.args(["start", "-w", "-t", &timeout, "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path());
        let out = spawn_output(&mut cmd, &self.program("pg_ctl"))?;
        if !out.status.success() {
            return Err(self.start_error(format!(
                "pg_ctl start failed ({}): {}",
                out.status,
                command_output_text(&out)
            )));
        }
        self.running = true;
        self.wait_ready(deadline)
    }

    fn wait_ready(&self, deadline: Instant) -> Result<(), LocalPgError> {
        let port = self.port.to_string();
        let pid_file = self.data_dir().join("postmaster.pid");
        loop {
            let mut cmd = self.client_command("pg_isready");
            cmd.args(["-q", "-h"])
                .arg(&self.dir)
                .args(["-p", &port, "-U", "postgres", "-d", "postgres"])
                .args(["-t", "2"]);
            let out = spawn_output(&mut cmd, &self.program("pg_isready"))?;
            if out.status.success() {
                return Ok(());
            }
            if !pid_file.exists() {
                return Err(self.start_error("the server exited while starting".to_owned()));
            }
            if Instant::now() >= deadline {
                return Err(self.start_error(format!(
                    "not accepting connections after {} s (pg_isready {})",
                    START_TIMEOUT.as_secs(),
                    out.status
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn start_error(&self, reason: String) -> LocalPgError {
        LocalPgError::Start {
            name: self.name.clone(),
            port: self.port,
            reason,
            log: self.log_path(),
            log_tail: self.log_tail(ERROR_LOG_LINES),
        }
    }

    fn stop_mode(&mut self, mode: &str) -> Result<(), LocalPgError> {
        if !self.running {
            return Ok(());
        }
        match self.pg_ctl_stop(mode) {
            Ok(()) => {
                self.running = false;
                Ok(())
            }
            Err(e) if !self.server_alive() => {
                tracing::warn!(name = %self.name, error = %e, "server was already gone when stopping it");
                self.running = false;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), LocalPgError> {
        let timeout = START_TIMEOUT.as_secs().to_string();
        let mut cmd = self.server_command("pg_ctl");
        cmd.args(["stop", "-w", "-t", &timeout, "-m", mode, "-D"])
            .arg(self.data_dir());
        let out = spawn_output(&mut cmd, &self.program("pg_ctl"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(LocalPgError::Command {
            what: format!(
                "pg_ctl stop -m {mode} of cluster {} (port {})",
                self.name, self.port
            ),
            status: out.status.to_string(),
            output: format!(
                "{}\n--- last lines of {} ---\n{}",
                command_output_text(&out),
                self.log_path().display(),
                self.log_tail(ERROR_LOG_LINES)
            ),
        })
    }

    /// `pg_ctl status`: exit code 3 means no server runs in the data directory.
    fn server_alive(&self) -> bool {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("status").arg("-D").arg(self.data_dir());
        match cmd.output() {
            Ok(out) => out.status.code() != Some(3),
            Err(_) => true,
        }
    }

    /// Last resort when `pg_ctl stop` failed: SIGQUIT (immediate shutdown) to the
    /// postmaster named in `postmaster.pid`, then wait a little for it to go away.
    fn kill_postmaster(&self) {
        let pid_file = self.data_dir().join("postmaster.pid");
        let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-QUIT", &pid.to_string()])
            .stdin(Stdio::null())
            .output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_file.exists() && Instant::now() < deadline {
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Also covers a failed start, where a server may run although `running` is false.
        if self.running || self.data_dir().join("postmaster.pid").exists() {
            if let Err(e) = self.pg_ctl_stop("immediate") {
                if self.server_alive() {
                    tracing::warn!(name = %self.name, error = %e, "cannot stop local cluster; sending SIGQUIT");
                    self.kill_postmaster();
                }
            }
            self.running = false;
        }
        if std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
            tracing::info!(name = %self.name, dir = %self.dir.display(), "{KEEP_ENV} set: keeping the cluster directory");
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(name = %self.name, dir = %self.dir.display(), error = %e, "cannot remove local cluster directory");
            }
        }
    }
}

/// The bin directory of the PostgreSQL installation to use (see
/// [`walsync::node::pgbin::bindir`]); it must contain initdb, pg_ctl, postgres, psql and
/// pg_isready.
pub fn bindir() -> Result<PathBuf, LocalPgError> {
    walsync::node::pgbin::bindir(&REQUIRED_PROGRAMS)
        .map_err(|detail| LocalPgError::NotInstalled { detail })
}

/// A TCP port on 127.0.0.1 that is free right now and that this process has not handed out
/// before, so parallel tests never pick the same port. It lies below the kernel's
/// ephemeral range (`ip_local_port_range`), from which the OS gives every outgoing
/// connection its local port: a server port in that range can be taken by a client
/// connection (or another test's pick) while its server restarts, and the server then
/// comes back without its TCP listener, its clients reaching whatever holds the port.
/// Another process can still take the port before it is used; [`LocalCluster::start`]
/// retries in that case.
///
/// # Panics
/// If no port can be bound on 127.0.0.1 at all (no loopback interface).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let (low, high) = (10_000u16, ephemeral_low().max(10_000 + 1_000));
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    let mut last_error = None;
    for _ in 0..1000 {
        // xorshift64: spread over the range, different in every process.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = low + (state % u64::from(high - low)) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => {
                handed_out.insert(port);
                return port;
            }
            Err(e) => last_error = Some(e),
        }
    }
    panic!(
        "walsync::localpg::free_port: no free TCP port on 127.0.0.1 after 1000 tries \
         (last error: {last_error:?}); is the loopback interface up?"
    )
}

/// The first port of the kernel's ephemeral range (32768 if it cannot be read).
fn ephemeral_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The server settings, for the included configuration file.
fn settings(port: u16, dir: &Path, name: &str, extra_listen: &[String]) -> String {
    let mut s = String::from("# written by walsync::localpg; the cluster is deleted on drop\n");
    let mut set = |key: &str, value: &dyn fmt::Display| {
        s.push_str(&format!("{key} = {value}\n"));
    };
    let listen: Vec<&str> = std::iter::once("127.0.0.1")
        .chain(extra_listen.iter().map(String::as_str))
        .collect();
    set("listen_addresses", &conf_string(&listen.join(",")));
    set("port", &port);
    set(
        "unix_socket_directories",
        &conf_string(&dir.to_string_lossy()),
    );
    set("cluster_name", &conf_string(name));
    set("wal_level", &"logical");
    set("track_commit_timestamp", &"on");
    set("max_replication_slots", &20);
    set("max_wal_senders", &20);
    set("max_connections", &60);
    set("fsync", &"off");
    set("shared_buffers", &"'32MB'");
    set("logging_collector", &"off");
    set("log_min_messages", &"warning");
    set("wal_sender_timeout", &"'30s'");
    s
}

/// A quoted string for `postgresql.conf`.
fn conf_string(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A value for a libpq key=value connection string, quoted if needed.
fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\' || c == '=');
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Removes `PG*` variables that would change how the programs behave (PGDATA, PGPORT,
/// PGOPTIONS, PGSSLMODE, ...): everything they need is passed explicitly.
/// libfaketime's preload library, from the `faketime` package.
fn faketime_library() -> Result<PathBuf, LocalPgError> {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| LocalPgError::NotFound {
            what: "libfaketime (to move a test server's clock)".into(),
            tried: candidates.iter().map(|s| s.to_string()).collect(),
            hint: "install the faketime package (apt-get install faketime)".into(),
        })
}

fn clean_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

fn spawn_output(cmd: &mut Command, program: &Path) -> Result<Output, LocalPgError> {
    cmd.output().map_err(|source| LocalPgError::Spawn {
        program: program.to_path_buf(),
        source,
    })
}

/// stderr of a finished command, or its stdout if stderr is empty, trimmed.
fn command_output_text(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(&out.stdout)
    } else {
        stderr
    };
    let text = text.trim();
    if text.is_empty() {
        "(no output)".to_owned()
    } else {
        text.to_owned()
    }
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> LocalPgError {
    LocalPgError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn abbreviate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`), else
/// from `id -u`.
fn effective_uid() -> Result<u32, LocalPgError> {
    let from_proc = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|euid| euid.parse().ok())
        });
    if let Some(uid) = from_proc {
        return Ok(uid);
    }
    id_number(&["-u"]).map_err(|detail| LocalPgError::Command {
        what: "finding the current user id (id -u)".to_owned(),
        status: "no result".to_owned(),
        output: detail,
    })
}

/// uid and gid of the `postgres` system user.
fn postgres_user() -> Result<RunAs, LocalPgError> {
    let uid =
        id_number(&["-u", "postgres"]).map_err(|detail| LocalPgError::NoPostgresUser { detail })?;
    let gid =
        id_number(&["-g", "postgres"]).map_err(|detail| LocalPgError::NoPostgresUser { detail })?;
    if uid == 0 {
        return Err(LocalPgError::NoPostgresUser {
            detail: "user postgres has uid 0".to_owned(),
        });
    }
    Ok(RunAs { uid, gid })
}

/// Runs `id ARGS` and parses the number it prints.
fn id_number(args: &[&str]) -> Result<u32, String> {
    let out = Command::new("id")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run id: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "id {}: {}",
            args.join(" "),
            command_output_text(&out)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .map_err(|_| format!("id {} printed {:?}", args.join(" "), text.trim()))
}

/// The socket `dir/.s.PGSQL.<port>` must fit in `sun_path`.
fn check_socket_path(dir: &Path) -> Result<(), LocalPgError> {
    let len = dir.as_os_str().len() + "/.s.PGSQL.65535".len();
    if len > MAX_SOCKET_PATH {
        return Err(LocalPgError::BadDir {
            dir: dir.to_path_buf(),
            problem: format!(
                "the path is too long for the server's Unix socket ({len} > {MAX_SOCKET_PATH} \
                 bytes); use a shorter directory, e.g. under /tmp"
            ),
        });
    }
    Ok(())
}

/// The directory must not exist, or be an empty directory: the cluster deletes it on drop.
fn check_fresh(dir: &Path) -> Result<(), LocalPgError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("inspect", dir, e)),
        Ok(meta) if !meta.is_dir() => Err(LocalPgError::BadDir {
            dir: dir.to_path_buf(),
            problem: "it exists and is not a directory; give a fresh directory".to_owned(),
        }),
        Ok(_) => {
            let mut entries = fs::read_dir(dir).map_err(|e| io_err("read directory", dir, e))?;
            if entries.next().is_some() {
                return Err(LocalPgError::BadDir {
                    dir: dir.to_path_buf(),
                    problem: "it is not empty, and the cluster deletes its directory when \
                              dropped; give a fresh (missing or empty) directory"
                        .to_owned(),
                });
            }
            Ok(())
        }
    }
}

/// When the server runs as `user`, every parent of `dir` must let that user through.
/// (Spawning with a uid drops supplementary groups, so only the primary gid counts.)
fn check_traversable(dir: &Path, user: RunAs) -> Result<(), LocalPgError> {
    for parent in dir.ancestors().skip(1) {
        let meta = fs::metadata(parent).map_err(|e| io_err("inspect", parent, e))?;
        let mode = meta.mode();
        let ok = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if !ok {
            return Err(LocalPgError::BadDir {
                dir: dir.to_path_buf(),
                problem: format!(
                    "running as root, the server runs as user postgres, which cannot enter \
                     {} (mode {:o}); use a directory whose parents are all world-executable \
                     (e.g. under /tmp) or chmod o+x {}",
                    parent.display(),
                    mode & 0o7777,
                    parent.display()
                ),
            });
        }
    }
    Ok(())
}

/// `chown -R`, without following symlinks.
fn chown_tree(path: &Path, user: RunAs) -> Result<(), LocalPgError> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| io_err("change the owner of", path, e))?;
    let meta = fs::symlink_metadata(path).map_err(|e| io_err("inspect", path, e))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(|e| io_err("read directory", path, e))? {
            let entry = entry.map_err(|e| io_err("read directory", path, e))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    /// A fresh, not yet existing directory under /tmp.
    fn test_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        PathBuf::from(format!(
            "/tmp/walsync-lpg-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ))
    }

    fn start(tag: &str) -> LocalCluster {
        let dir = test_dir(tag);
        LocalCluster::start(&dir, tag).unwrap_or_else(|e| panic!("start {tag}: {e}"))
    }

    #[test]
    fn settings_crash_restart_and_drop() {
        let mut c = start("main");
        let dir = c.dir().to_path_buf();
        assert!(dir.join("data").join("PG_VERSION").is_file());
        assert!(dir.join(LOG_FILE).is_file());
        assert_eq!(c.name(), "main");
        assert_eq!(
            c.dsn(),
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                c.port()
            )
        );

        let show = |c: &LocalCluster, what: &str| {
            c.psql(&format!("SHOW {what}"))
                .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(20)))
        };
        assert_eq!(show(&c, "wal_level"), "logical");
        assert_eq!(show(&c, "track_commit_timestamp"), "on");
        assert_eq!(show(&c, "max_replication_slots"), "20");
        assert_eq!(show(&c, "max_wal_senders"), "20");
        assert_eq!(show(&c, "max_connections"), "60");
        assert_eq!(show(&c, "fsync"), "off");
        assert_eq!(show(&c, "listen_addresses"), "127.0.0.1");
        assert_eq!(show(&c, "server_encoding"), "UTF8");
        assert_eq!(show(&c, "cluster_name"), "main");
        assert_eq!(show(&c, "port"), c.port().to_string());
        assert_eq!(c.psql("SELECT current_user").unwrap(), "postgres");

        // psql errors carry the server's message.
        let err = c.psql("SELEKT 1").unwrap_err();
        assert!(matches!(err, LocalPgError::Sql { .. }), "{err:?}");
        assert!(err.to_string().contains("syntax error"), "{err}");

        // A committed row survives a crash.
        c.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'kept')")
            .unwrap();
        let port = c.port();
        c.crash().unwrap();
        assert!(matches!(
            c.psql("SELECT 1"),
            Err(LocalPgError::NotRunning { .. })
        ));
        c.crash().unwrap(); // stopping a stopped cluster is a no-op
        c.restart().unwrap();
        assert_eq!(c.port(), port);
        assert_eq!(c.psql("SELECT v FROM t WHERE id = 1").unwrap(), "kept");

        // Clean stop, restart; restart of a running cluster.
        c.psql("INSERT INTO t VALUES (2, 'also')").unwrap();
        c.stop().unwrap();
        c.restart().unwrap();
        c.restart().unwrap();
        assert_eq!(c.psql("SELECT count(*) FROM t").unwrap(), "2");
        assert!(c.log_tail(5).lines().count() <= 5);

        drop(c);
        assert!(!dir.exists(), "{} still exists after drop", dir.display());
    }

    #[test]
    fn two_clusters_at_once_get_different_ports() {
        let handles: Vec<_> = ["left", "right"]
            .into_iter()
            .map(|tag| std::thread::spawn(move || start(tag)))
            .collect();
        let clusters: Vec<LocalCluster> = handles
            .into_iter()
            .map(|h| h.join().expect("start thread panicked"))
            .collect();
        assert_ne!(clusters[0].port(), clusters[1].port());
        for c in &clusters {
            assert_eq!(c.psql("SELECT 1").unwrap(), "1");
            assert_eq!(c.psql("SHOW cluster_name").unwrap(), c.name());
        }
        let dirs: Vec<PathBuf> = clusters.iter().map(|c| c.dir().to_path_buf()).collect();
        drop(clusters);
        for dir in dirs {
            assert!(!dir.exists());
        }
    }

    #[test]
    fn port_taken_by_someone_else_is_replaced() {
        let blocker = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = blocker.local_addr().unwrap().port();
        let c = LocalCluster::start_on_port(&test_dir("clash"), "clash", taken)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(c.port(), taken);
        assert_eq!(c.psql("SHOW port").unwrap(), c.port().to_string());
        assert!(c.log_tail(100).contains("Address already in use"));
    }

    #[test]
    fn ctype_is_utf8_when_available() {
        let c = start("ctype");
        let (collate, ctype) = (
            c.psql("SELECT datcollate FROM pg_database WHERE datname = 'postgres'")
                .unwrap(),
            c.psql("SELECT datctype FROM pg_database WHERE datname = 'postgres'")
                .unwrap(),
        );
        assert_eq!(collate, "C");
        assert!(ctype == "C.UTF-8" || ctype == "C", "{ctype}");
        assert_eq!(
            c.psql("SELECT upper('é')").unwrap(),
            if ctype == "C" { "é" } else { "É" }
        );
    }

    #[test]
    fn failed_restart_reports_the_log() {
        let mut c = start("broken");
        c.stop().unwrap();
        let conf = c.dir().join("data").join(CONF_FILE);
        let mut f = fs::OpenOptions::new().append(true).open(&conf).unwrap();
        writeln!(f, "shared_buffers = 'lots'").unwrap();
        drop(f);
        let err = c.restart().unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LocalPgError::Start { .. }), "{err:?}");
        assert!(text.contains("shared_buffers"), "{text}");
        let dir = c.dir().to_path_buf();
        drop(c);
        assert!(!dir.exists());
    }

    #[test]
    fn drop_stopped_cluster_removes_dir() {
        let mut c = start("stopped");
        let dir = c.dir().to_path_buf();
        c.stop().unwrap();
        drop(c);
        assert!(!dir.exists());
    }

    #[test]
    fn refuses_non_empty_dir_and_leaves_it_alone() {
        let dir = test_dir("busy");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("precious"), "x").unwrap();
        let err = LocalCluster::start(&dir, "busy").unwrap_err();
        assert!(matches!(err, LocalPgError::BadDir { .. }), "{err:?}");
        assert!(err.to_string().contains("not empty"), "{err}");
        assert!(dir.join("precious").is_file());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn as_root_refuses_a_dir_postgres_cannot_reach() {
        if effective_uid().unwrap() != 0 {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let parent = test_dir("private");
        fs::create_dir_all(&parent).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o700)).unwrap();
        let err = LocalCluster::start(&parent.join("c"), "private").unwrap_err();
        assert!(matches!(err, LocalPgError::BadDir { .. }), "{err:?}");
        assert!(err.to_string().contains("chmod o+x"), "{err}");
        assert!(
            !parent.join("c").exists(),
            "the refused cluster left its directory"
        );
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn refuses_too_long_dir() {
        let dir = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
        let err = LocalCluster::start(&dir, "long").unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        assert!(!dir.exists());
    }

    #[test]
    fn free_port_never_repeats() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let unique: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|&p| p != 0));
        // Below the ephemeral range, where no outgoing connection takes them meanwhile.
        if ephemeral_low() > 11_000 {
            assert!(ports.iter().all(|&p| p < ephemeral_low()), "{ports:?}");
        }
    }

    #[test]
    fn bindir_has_the_programs() {
        let dir = bindir().unwrap();
        for program in REQUIRED_PROGRAMS {
            assert!(
                dir.join(program).is_file(),
                "{} lacks {program}",
                dir.display()
            );
        }
    }

    #[test]
    fn dsn_quoting() {
        assert_eq!(conninfo_value("app"), "app");
        assert_eq!(conninfo_value("my db"), "'my db'");
        assert_eq!(conninfo_value("it's"), r"'it\'s'");
        assert_eq!(conninfo_value(r"a\b"), r"'a\\b'");
        assert_eq!(conninfo_value(""), "''");
    }

    #[test]
    fn settings_text() {
        let s = settings(5433, Path::new("/tmp/o'k"), "n", &[]);
        assert!(s.contains("port = 5433\n"));
        assert!(s.contains("unix_socket_directories = '/tmp/o''k'\n"));
        assert!(s.contains("wal_level = logical\n"));
        assert!(s.contains("track_commit_timestamp = on\n"));
        assert!(s.contains("listen_addresses = '127.0.0.1'\n"));
    }

    #[test]
    fn tail_of_text() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
        assert_eq!(abbreviate("héllo", 2), "hé...");
    }
}
