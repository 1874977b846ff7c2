//! Cluster harness for cellgate's tests, demo and benchmarks: owns throwaway PostgreSQL clusters (one temp root per cluster, free loopback ports, the postgres processes it starts, one watchdog child per cluster) and must not touch any other PostgreSQL instance, `/var/run/postgresql`, system configuration, or files outside its own temp root.
//!
//! [`Cluster::start`] creates `N` shards, each a primary plus `k` streaming replicas, on
//! `127.0.0.1` with password (SCRAM) authentication, and returns once every replica is
//! streaming. Dropping the [`Cluster`] (also while a test panics) stops every node and removes
//! the temp root; a watchdog child does the same if the owning process is SIGKILLed.
//!
//! The API is synchronous (std::process); from async code call it in `spawn_blocking` or
//! before the runtime work starts.
//!
//! When the process runs as root, every PostgreSQL program (initdb, pg_ctl, postgres,
//! pg_basebackup) runs as the `postgres` OS user, because PostgreSQL refuses to run as root.
//!
//! ```no_run
//! use cellgate_harness::{Cluster, ClusterSpec};
//!
//! let cluster = Cluster::start(ClusterSpec { shards: 2, ..ClusterSpec::default() })?;
//! let primary = &cluster.shards[0].primary;
//! primary.psql("core", "CREATE TABLE t (id int)")?;
//! let url = primary.app_url("core"); // postgres://app:app-password@127.0.0.1:PORT/core
//! # let _ = url;
//! cluster.stop()?;
//! # Ok::<(), cellgate_harness::HarnessError>(())
//! ```

#![warn(missing_docs)]

mod process;
mod watchdog;

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::watchdog::Watchdog;

/// Longest the harness waits for any node to start, a base backup to finish, or a replica to
/// reach `streaming`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How often readiness conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Default timeout of [`Node::psql`] and [`Node::psql_as`].
pub const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable naming the directory with the PostgreSQL programs (initdb, pg_ctl,
/// postgres, pg_basebackup, psql). Without it the newest `/usr/lib/postgresql/*/bin` is used,
/// then `pg_config --bindir`.
pub const BINDIR_ENV: &str = "CELLGATE_PG_BINDIR";

/// Environment variable naming the directory under which cluster roots are created (default:
/// the system temp dir). Keep it short: Unix socket paths are limited to ~100 bytes.
pub const TMPDIR_ENV: &str = "CELLGATE_HARNESS_TMPDIR";

/// Name of the PostgreSQL superuser created by initdb on every primary.
pub const SUPERUSER: &str = "postgres";

/// Programs the harness needs from the PostgreSQL bin directory.
const REQUIRED_PROGRAMS: [&str; 5] = ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"];

/// What to start: shard count, replicas per shard, credentials, databases and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of shards (each an independent primary with its replicas). Default 1; at least 1.
    pub shards: usize,
    /// Streaming replicas per shard. Default 1; 0 is allowed.
    pub replicas_per_shard: usize,
    /// LOGIN role (password auth) that owns every database in [`ClusterSpec::databases`].
    /// Default `"app"`. It has no SUPERUSER and no REPLICATION attribute.
    pub app_user: String,
    /// Password of [`ClusterSpec::app_user`]. Default `"app-password"`.
    pub app_password: String,
    /// Password of the superuser `postgres` (created by `initdb -U postgres`), used over TCP
    /// with SCRAM and for the replicas' replication connections. Default `"postgres-password"`.
    pub superuser_password: String,
    /// Databases created on each primary, owned by `app_user`, replicated to its replicas.
    /// Default `["core"]`.
    pub databases: Vec<String>,
    /// PostgreSQL's `fsync` setting. Default `false`: fsync only protects against an OS crash
    /// or power loss, never against a PostgreSQL process crash ([`Node::kill`] is still a
    /// faithful crash test), and these clusters are thrown away anyway; turning it off makes
    /// commit-heavy tests much faster on slow CI disks. Turn it on for benchmarks that should
    /// reflect durable commits.
    pub fsync: bool,
    /// Extra `postgresql.conf` settings for every node, as `(name, value)`. Values are written
    /// single-quoted (PostgreSQL accepts that for every setting), so pass them bare, e.g.
    /// `("shared_preload_libraries", "pg_stat_statements")` or `("work_mem", "8MB")`.
    /// Node-specific settings (`port`, `unix_socket_directories`, `cluster_name`) always win.
    pub extra_conf: Vec<(String, String)>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            shards: 1,
            replicas_per_shard: 1,
            app_user: "app".to_string(),
            app_password: "app-password".to_string(),
            superuser_password: "postgres-password".to_string(),
            databases: vec!["core".to_string()],
            fsync: false,
            extra_conf: Vec::new(),
        }
    }
}

/// Role of a node within its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Read-write primary.
    Primary,
    /// Hot-standby streaming replica of its shard's primary (physical replication slot).
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// Everything that can go wrong in the harness.
#[derive(Debug)]
#[non_exhaustive]
pub enum HarnessError {
    /// The environment or the spec is unusable: PostgreSQL programs missing, running as root
    /// without a `postgres` OS user, invalid spec values, temp path too long.
    Setup {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A filesystem or process operation of the harness itself failed.
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Something about one node failed or timed out (initdb, start, stop, base backup, psql,
    /// replication wait).
    Node {
        /// Node name, e.g. `shard0-replica1`.
        node: String,
        /// The node's port (0 if none was assigned yet).
        port: u16,
        /// What failed, including the program's stderr where there was one.
        message: String,
        /// Last lines of the node's server log (may be empty).
        log_tail: String,
    },
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::Setup { message } => write!(f, "cellgate-harness setup: {message}"),
            HarnessError::Io { context, source } => write!(f, "{context}: {source}"),
            HarnessError::Node { node, port, message, log_tail } => {
                write!(f, "node {node} (127.0.0.1:{port}): {message}")?;
                if !log_tail.trim().is_empty() {
                    write!(f, "\n--- last lines of the {node} server log ---\n{}", log_tail.trim_end())?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HarnessError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn setup_err(message: impl Into<String>) -> HarnessError {
    HarnessError::Setup { message: message.into() }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// Lines of server log attached to node errors.
const ERROR_LOG_LINES: usize = 30;

/// Environment variable: when set (to anything but `0`), the harness prints each startup step
/// with its elapsed time to stderr.
pub const TRACE_ENV: &str = "CELLGATE_HARNESS_TRACE";

fn trace(node: &str, step: &str, since: Instant) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os(TRACE_ENV).is_some_and(|v| v != "0")) {
        eprintln!("cellgate-harness: {node}: {step} ({:?})", since.elapsed());
    }
}

/// Directory holding the PostgreSQL programs: `$CELLGATE_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`. Fails with a message saying what
/// was searched when none has all of initdb, pg_ctl, postgres, pg_basebackup and psql.
pub fn pg_bindir() -> Result<PathBuf, HarnessError> {
    let has_all = |dir: &Path| REQUIRED_PROGRAMS.iter().all(|p| dir.join(p).is_file());
    let mut searched = Vec::new();

    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        if has_all(&dir) {
            return Ok(dir);
        }
        let missing: Vec<&str> = REQUIRED_PROGRAMS.iter().copied().filter(|p| !dir.join(p).is_file()).collect();
        return Err(setup_err(format!("{BINDIR_ENV}={} lacks {}", dir.display(), missing.join(", "))));
    }

    let mut versioned: Vec<(Vec<u64>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let version: Option<Vec<u64>> = name.split('.').map(|p| p.parse().ok()).collect();
                    Some((version?, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versioned.sort();
    for (_, dir) in versioned.into_iter().rev() {
        if has_all(&dir) {
            return Ok(dir);
        }
        searched.push(dir.display().to_string());
    }
    if searched.is_empty() {
        searched.push("/usr/lib/postgresql/*/bin (none)".to_string());
    }

    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_all(&dir) {
                return Ok(dir);
            }
            searched.push(format!("{} (from pg_config --bindir)", dir.display()));
        }
        _ => searched.push("pg_config --bindir (not runnable)".to_string()),
    }

    Err(setup_err(format!(
        "PostgreSQL server programs ({}) not found; searched: {}. Install them \
         (Debian: apt-get install postgresql) or set {BINDIR_ENV} to their directory",
        REQUIRED_PROGRAMS.join(", "),
        searched.join("; ")
    )))
}

/// OS user the PostgreSQL programs run as (only set when we are root).
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn server_user() -> Result<Option<RunAs>, HarnessError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user("postgres").map(Some).ok_or_else(|| {
        setup_err(
            "running as root, but PostgreSQL refuses to run as root and there is no \
             `postgres` OS user to run it as (Debian's postgresql package creates one; or \
             run as a non-root user)",
        )
    })
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the given lengths; result is checked before use.
    let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(RunAs { uid: pwd.pw_uid, gid: pwd.pw_gid })
}

/// State shared by the nodes of one cluster.
struct Ctx {
    bindir: PathBuf,
    run_as: Option<RunAs>,
    root: PathBuf,
    app_user: String,
    app_password: String,
    superuser_password: String,
}

impl Ctx {
    /// A command for a PostgreSQL program with a clean environment (no inherited PG*
    /// variables, C locale, HOME = cluster root). `as_server_user` drops to the `postgres`
    /// OS user when we are root.
    fn command(&self, program: &str, as_server_user: bool) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("LC_ALL", "C").env("HOME", &self.root).current_dir(&self.root);
        if as_server_user && let Some(r) = self.run_as {
            cmd.uid(r.uid).gid(r.gid);
        }
        cmd
    }

    /// Gives `path` to the server user (no-op unless running as root).
    fn own(&self, path: &Path) -> Result<(), HarnessError> {
        if let Some(r) = self.run_as {
            std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))
                .map_err(io_err(format!("chown {} to postgres", path.display())))?;
        }
        Ok(())
    }
}

/// A running cluster. Dropping it stops every node (immediate shutdown) and removes the temp
/// root, also during panic unwinding; see [`Cluster::stop`] for a graceful stop.
pub struct Cluster {
    /// The shards, index `i` at position `i`.
    pub shards: Vec<Shard>,
    spec: ClusterSpec,
    ctx: Arc<Ctx>,
    guard: Guard,
}

/// One shard: a primary and its streaming replicas.
#[derive(Debug)]
pub struct Shard {
    /// Shard index, `0..spec.shards`.
    pub index: usize,
    /// The read-write primary.
    pub primary: Node,
    /// Streaming replicas of `primary`, each with its own physical replication slot.
    pub replicas: Vec<Node>,
}

/// One PostgreSQL server (primary or replica). All methods take `&self`; start/stop/kill of
/// the same node are serialized internally.
pub struct Node {
    /// Node name, `shard{i}-primary` or `shard{i}-replica{j}`; also its `cluster_name` (and so
    /// the `application_name` of a replica's WAL receiver).
    pub name: String,
    /// Index of the shard this node belongs to.
    pub shard: usize,
    /// Primary or replica.
    pub role: Role,
    /// TCP port on 127.0.0.1; stays the same across [`Node::stop`]/[`Node::start`].
    pub port: u16,
    /// The PostgreSQL data directory (`PGDATA`).
    pub data_dir: PathBuf,
    /// Replication slot on the primary used by this replica (`None` for primaries).
    pub slot: Option<String>,
    dir: PathBuf,
    ctx: Arc<Ctx>,
    op: Mutex<()>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("shard", &self.shard)
            .field("role", &self.role)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("slot", &self.slot)
            .finish()
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster").field("root", &self.ctx.root).field("shards", &self.shards).finish()
    }
}

impl Cluster {
    /// Starts the cluster described by `spec` and returns once every node accepts connections
    /// and every replica shows up with state `streaming` in `pg_stat_replication` on its
    /// primary. Shards start in parallel. On error, everything started so far is removed.
    pub fn start(spec: ClusterSpec) -> Result<Cluster, HarnessError> {
        validate(&spec)?;
        let bindir = pg_bindir()?;
        let run_as = server_user()?;
        let root = create_root(run_as)?;
        // From here on `guard` removes the root (and stops anything under it) on any return.
        let mut guard = Guard { root: root.clone(), watchdog: None, done: false };
        guard.watchdog = Some(Watchdog::spawn(&root).map_err(io_err("starting the cluster watchdog (/bin/sh)"))?);
        let ctx = Arc::new(Ctx {
            bindir,
            run_as,
            root,
            app_user: spec.app_user.clone(),
            app_password: spec.app_password.clone(),
            superuser_password: spec.superuser_password.clone(),
        });

        let results: Vec<Result<Shard, HarnessError>> = thread::scope(|s| {
            let handles: Vec<_> = (0..spec.shards)
                .map(|i| {
                    let ctx = &ctx;
                    let spec = &spec;
                    s.spawn(move || start_shard(ctx, spec, i))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join().unwrap_or_else(|_| Err(setup_err(format!("thread starting shard {i} panicked"))))
                })
                .collect()
        });
        let mut shards = Vec::with_capacity(results.len());
        for r in results {
            shards.push(r?);
        }
        Ok(Cluster { shards, spec, ctx, guard })
    }

    /// Graceful stop: `pg_ctl stop -m fast` on every node (replicas first, in parallel), then
    /// removes the temp root. Cleanup happens even if a stop fails; the first error is returned.
    pub fn stop(mut self) -> Result<(), HarnessError> {
        let mut first: Option<HarnessError> = None;
        let replicas: Vec<&Node> = self.shards.iter().flat_map(|s| &s.replicas).collect();
        let primaries: Vec<&Node> = self.shards.iter().map(|s| &s.primary).collect();
        for group in [replicas, primaries] {
            let errors: Vec<HarnessError> = thread::scope(|s| {
                let handles: Vec<_> = group.iter().map(|n| s.spawn(|| n.stop())).collect();
                handles
                    .into_iter()
                    .filter_map(|h| match h.join() {
                        Ok(r) => r.err(),
                        Err(_) => Some(setup_err("thread stopping a node panicked")),
                    })
                    .collect()
            });
            if first.is_none() {
                first = errors.into_iter().next();
            }
        }
        let cleanup = self.guard.cleanup();
        match first {
            Some(e) => Err(e),
            None => cleanup,
        }
    }

    /// The temp root holding every node's directory (`<root>/<node name>/data`, its log and
    /// socket). Gone after the cluster is stopped or dropped.
    pub fn root_dir(&self) -> &Path {
        &self.ctx.root
    }

    /// The spec the cluster was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// All nodes, shard by shard, primary first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.shards.iter().flat_map(|s| s.nodes())
    }

    /// The PostgreSQL bin directory in use.
    pub fn bindir(&self) -> &Path {
        &self.ctx.bindir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let guard = &mut self.guard;
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guard.cleanup()));
    }
}

impl Shard {
    /// The primary followed by the replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.primary).chain(&self.replicas)
    }

    /// Waits until every replica of this shard is `streaming` again (e.g. after a primary
    /// or replica restart), polling the primary's `pg_stat_replication`.
    pub fn wait_for_replicas(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        for r in &self.replicas {
            wait_streaming(&self.primary, r, deadline)?;
        }
        Ok(())
    }
}

impl Node {
    /// `postgres://user:password@127.0.0.1:PORT/db`, percent-encoding the parts.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{}:{}@127.0.0.1:{}/{}", pct(user), pct(password), self.port, pct(db))
    }

    /// URL with the spec's app credentials.
    pub fn app_url(&self, db: &str) -> String {
        self.url(&self.ctx.app_user, &self.ctx.app_password, db)
    }

    /// URL with the superuser (`postgres`) credentials.
    pub fn admin_url(&self, db: &str) -> String {
        self.url(SUPERUSER, &self.ctx.superuser_password, db)
    }

    /// Runs `sql` (one or more statements) with `psql -X -q -At -v ON_ERROR_STOP=1` as the
    /// superuser over TCP and returns stdout trimmed: one line per result row, columns
    /// separated by `|`; command tags are suppressed (`-q`). Statements run one by one (not in
    /// one transaction), so `CREATE DATABASE` works. Times out after [`PSQL_TIMEOUT`].
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, HarnessError> {
        self.psql_as(SUPERUSER, &self.ctx.superuser_password, db, sql)
    }

    /// Like [`Node::psql`] but as `user`/`password` (e.g. the app role).
    pub fn psql_as(&self, user: &str, password: &str, db: &str, sql: &str) -> Result<String, HarnessError> {
        self.psql_with_timeout(user, password, db, sql, PSQL_TIMEOUT)
    }

    /// Like [`Node::psql_as`] with an explicit timeout (psql is killed when it passes).
    pub fn psql_with_timeout(
        &self,
        user: &str,
        password: &str,
        db: &str,
        sql: &str,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        let mut cmd = self.ctx.command("psql", false);
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(user)
            .arg("-d")
            .arg(db)
            .args(["-f", "-"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGAPPNAME", "cellgate-harness");
        let out = process::run(cmd, Some(sql.to_string()), timeout).map_err(|m| self.error(format!("psql: {m}")))?;
        if !out.status.success() {
            return Err(self.error(format!(
                "psql as {user} on database {db} failed ({}): {}\nSQL: {}",
                out.status,
                out.stderr.trim(),
                abbreviate(sql, 500)
            )));
        }
        Ok(out.stdout.trim().to_string())
    }

    /// PID of the running postmaster (from `postmaster.pid`, checked to be alive).
    pub fn pid(&self) -> Option<u32> {
        process::running_postmaster(&self.data_dir)
    }

    /// True if the postmaster is running.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// SIGKILLs the postmaster (a crash, for fault tests) and waits until it is gone. Its
    /// backends notice the postmaster's death and exit by themselves shortly after.
    /// Fails if the node is not running.
    pub fn kill(&self) -> Result<(), HarnessError> {
        let _op = self.op.lock().unwrap_or_else(PoisonError::into_inner);
        let pid = self.pid().ok_or_else(|| self.error("kill: node is not running".to_string()))?;
        process::signal(pid, libc::SIGKILL);
        let left = process::wait_gone(&[pid], Duration::from_secs(10));
        if !left.is_empty() {
            return Err(self.error(format!("kill: postmaster {pid} still alive after SIGKILL")));
        }
        Ok(())
    }

    /// `pg_ctl stop -m fast`, waiting up to [`STARTUP_TIMEOUT`]. No-op if not running.
    pub fn stop(&self) -> Result<(), HarnessError> {
        let _op = self.op.lock().unwrap_or_else(PoisonError::into_inner);
        if self.pid().is_none() {
            return Ok(());
        }
        let mut cmd = self.ctx.command("pg_ctl", true);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t"])
            .arg(STARTUP_TIMEOUT.as_secs().to_string())
            .arg("stop");
        let out = process::run(cmd, None, STARTUP_TIMEOUT + Duration::from_secs(10))
            .map_err(|m| self.error(format!("pg_ctl stop: {m}")))?;
        if !out.status.success() && self.pid().is_some() {
            return Err(self.error(format!(
                "pg_ctl stop failed ({}): {}{}",
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    /// Starts the node again after [`Node::stop`] or [`Node::kill`], on the same port, and
    /// waits (up to [`STARTUP_TIMEOUT`]) until it accepts connections (read-only ones for a
    /// replica). Retries while the previous incarnation's backends still hold its shared
    /// memory. No-op if already running.
    pub fn start(&self) -> Result<(), HarnessError> {
        let _op = self.op.lock().unwrap_or_else(PoisonError::into_inner);
        if self.pid().is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.start_once(deadline) {
                Ok(()) => break,
                Err((StartFailure::Fatal, e)) => return Err(e),
                Err((_, e)) => {
                    if Instant::now() + POLL_INTERVAL >= deadline {
                        return Err(e);
                    }
                    thread::sleep(POLL_INTERVAL);
                }
            }
        }
        self.wait_accepting(deadline)
    }

    /// The last `lines` lines of the node's server log (`pg_ctl -l` file), for diagnostics.
    pub fn log_tail(&self, lines: usize) -> String {
        let path = self.log_path();
        match fs::read(&path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(no log at {}: {e})", path.display()),
        }
    }

    /// Path of the node's server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Directory of the node's Unix socket (also holds its log and data dir).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn error(&self, message: String) -> HarnessError {
        HarnessError::Node {
            node: self.name.clone(),
            port: self.port,
            message,
            log_tail: if self.log_path().exists() { self.log_tail(ERROR_LOG_LINES) } else { String::new() },
        }
    }

    fn create(ctx: &Arc<Ctx>, shard: usize, role: Role, name: String) -> Result<Node, HarnessError> {
        let dir = ctx.root.join(&name);
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        ctx.own(&dir)?;
        Ok(Node {
            data_dir: dir.join("data"),
            slot: None,
            name,
            shard,
            role,
            port: 0,
            dir,
            ctx: Arc::clone(ctx),
            op: Mutex::new(()),
        })
    }

    /// Writes `data/node.conf` (included last by postgresql.conf): the node's own port, socket
    /// directory and cluster name.
    fn write_node_conf(&self) -> Result<(), HarnessError> {
        let path = self.data_dir.join("node.conf");
        let text = format!(
            "# written by cellgate-harness for node {name}\n\
             port = {port}\n\
             unix_socket_directories = {dir}\n\
             cluster_name = {name_q}\n",
            name = self.name,
            port = self.port,
            dir = conf_quote(&self.dir.to_string_lossy()),
            name_q = conf_quote(&self.name),
        );
        fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
        self.ctx.own(&path)
    }

    /// First start of a fresh node: pick a free port, start; if the port got taken in the
    /// meantime, pick another (a few times).
    fn start_new(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = free_port()?;
            self.write_node_conf()?;
            match self.start_once(deadline) {
                Ok(()) => break,
                Err((StartFailure::PortInUse, e)) if attempt < 5 => drop(e),
                Err((_, e)) => return Err(e),
            }
        }
        self.wait_accepting(deadline)
    }

    /// One `pg_ctl start -w`; classifies failures from the log lines it produced.
    fn start_once(&self, deadline: Instant) -> Result<(), (StartFailure, HarnessError)> {
        let log = self.log_path();
        let offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let secs = deadline.saturating_duration_since(Instant::now()).as_secs().max(1);
        let mut cmd = self.ctx.command("pg_ctl", true);
        cmd.arg("-D").arg(&self.data_dir).arg("-l").arg(&log).args(["-w", "-t"]).arg(secs.to_string()).arg("start");
        let out = match process::run(cmd, None, Duration::from_secs(secs + 10)) {
            Ok(out) => out,
            Err(m) => {
                return Err((StartFailure::Fatal, self.error(format!("pg_ctl start: {m}"))));
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let new_log = read_from(&log, offset);
        let kind = if new_log.contains("Address already in use") {
            StartFailure::PortInUse
        } else if new_log.contains("pre-existing shared memory block")
            || (new_log.contains("lock file") && new_log.contains("already exists"))
        {
            StartFailure::Transient
        } else {
            StartFailure::Fatal
        };
        Err((
            kind,
            self.error(format!("pg_ctl start failed ({}): {} {}", out.status, out.stdout.trim(), out.stderr.trim())),
        ))
    }

    /// Polls `SELECT 1` over TCP until it works or `deadline` passes.
    fn wait_accepting(&self, deadline: Instant) -> Result<(), HarnessError> {
        loop {
            match self.psql_with_timeout(
                SUPERUSER,
                &self.ctx.superuser_password,
                "postgres",
                "SELECT 1",
                Duration::from_secs(15),
            ) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(match e {
                        HarnessError::Node { node, port, message, log_tail } => HarnessError::Node {
                            node,
                            port,
                            message: format!("not accepting connections after {STARTUP_TIMEOUT:?}: {message}"),
                            log_tail,
                        },
                        other => other,
                    });
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartFailure {
    /// Someone else took the port.
    PortInUse,
    /// Leftovers of a killed incarnation (shared memory / lock file) still around.
    Transient,
    /// Anything else: report at once.
    Fatal,
}

fn validate(spec: &ClusterSpec) -> Result<(), HarnessError> {
    if spec.shards == 0 {
        return Err(setup_err("spec.shards must be at least 1"));
    }
    if spec.shards > 100 || spec.replicas_per_shard > 100 {
        return Err(setup_err("spec.shards and spec.replicas_per_shard must be <= 100"));
    }
    for (what, v) in [
        ("app_user", &spec.app_user),
        ("app_password", &spec.app_password),
        ("superuser_password", &spec.superuser_password),
    ] {
        if v.is_empty() || v.contains('\0') || v.contains('\n') {
            return Err(setup_err(format!("spec.{what} must be non-empty and contain no NUL or newline")));
        }
    }
    for db in &spec.databases {
        if db.is_empty() || db.contains('\0') || db.len() > 63 {
            return Err(setup_err(format!("spec.databases: invalid database name {db:?}")));
        }
    }
    for (k, v) in &spec.extra_conf {
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            return Err(setup_err(format!("spec.extra_conf: invalid setting name {k:?}")));
        }
        if v.contains('\n') || v.contains('\0') {
            return Err(setup_err(format!("spec.extra_conf: value of {k} contains a newline or NUL")));
        }
    }
    Ok(())
}

/// Creates the cluster's temp root: `<tmp>/cg-<pid>-<seq>-<rand>`, traversable by the
/// `postgres` user when we run as root (0755), else private (0700).
fn create_root(run_as: Option<RunAs>) -> Result<PathBuf, HarnessError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let base = std::env::var_os(TMPDIR_ENV).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    // Longest socket path: <root>/shard99-replica99/.s.PGSQL.65535 (+ ".lock"); sun_path is 108.
    let probe = base.join("cg-4294967295-999-ffffff/shard99-replica99/.s.PGSQL.65535.lock");
    if probe.as_os_str().len() > 107 {
        return Err(setup_err(format!(
            "temp dir {} is too long for PostgreSQL's Unix socket paths; set {TMPDIR_ENV}=/tmp",
            base.display()
        )));
    }
    if let Some(r) = run_as {
        check_traversable(&base, r)?;
    }
    for _ in 0..100 {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let root = base.join(format!("cg-{}-{seq}-{:06x}", std::process::id(), nanos & 0xff_ffff));
        match fs::DirBuilder::new().mode(0o700).create(&root) {
            Ok(()) => {
                let mode = if run_as.is_some() { 0o755 } else { 0o700 };
                if let Err(e) = fs::set_permissions(&root, fs::Permissions::from_mode(mode)) {
                    let _ = fs::remove_dir(&root);
                    return Err(io_err(format!("chmod {}", root.display()))(e));
                }
                return Ok(root);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", root.display()))(e)),
        }
    }
    Err(setup_err(format!("could not create a unique temp dir under {}", base.display())))
}

/// Fails with a clear message if the server user cannot reach `dir` (e.g. TMPDIR under /root).
fn check_traversable(dir: &Path, r: RunAs) -> Result<(), HarnessError> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors() {
        let Ok(meta) = fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.mode();
        let ok = if meta.uid() == r.uid {
            mode & 0o100 != 0
        } else if meta.gid() == r.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(setup_err(format!(
                "the postgres OS user cannot traverse {} (mode {:o}), so it cannot reach cluster \
                 directories under {}; set {TMPDIR_ENV} (or TMPDIR) to a directory like /tmp",
                ancestor.display(),
                mode & 0o7777,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bind :0, read, release), never handed out twice by this
/// process so parallel clusters in one test binary don't race each other.
fn free_port() -> Result<u16, HarnessError> {
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    for _ in 0..100 {
        let listener =
            TcpListener::bind(("127.0.0.1", 0)).map_err(io_err("binding 127.0.0.1:0 to find a free port"))?;
        let port = listener.local_addr().map_err(io_err("reading the free port"))?.port();
        drop(listener);
        let mut used = USED.lock().unwrap_or_else(PoisonError::into_inner);
        if !used.contains(&port) {
            used.push(port);
            return Ok(port);
        }
    }
    Err(setup_err("could not find a free port on 127.0.0.1"))
}

/// Settings appended to every primary's postgresql.conf (replicas inherit them via the base
/// backup), followed by the spec's extra settings and the include of the per-node file.
fn base_conf(spec: &ClusterSpec) -> String {
    let mut s = String::from(
        "\n# ---- cellgate-harness ----\n\
         listen_addresses = '127.0.0.1'\n\
         max_connections = 200\n\
         shared_buffers = '32MB'\n\
         password_encryption = 'scram-sha-256'\n\
         wal_level = logical\n\
         max_wal_senders = 20\n\
         max_replication_slots = 20\n\
         max_worker_processes = 16\n\
         max_logical_replication_workers = 8\n\
         max_sync_workers_per_subscription = 2\n\
         hot_standby = on\n\
         hot_standby_feedback = on\n\
         wal_keep_size = '64MB'\n\
         wal_retrieve_retry_interval = '1s'\n\
         synchronous_commit = on\n\
         logging_collector = off\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n",
    );
    s.push_str(&format!("fsync = {}\n", if spec.fsync { "on" } else { "off" }));
    for (k, v) in &spec.extra_conf {
        s.push_str(&format!("{k} = {}\n", conf_quote(v)));
    }
    s.push_str("include_if_exists = 'node.conf'\n");
    s
}

const PG_HBA: &str = "# written by cellgate-harness\n\
local all all trust\n\
host all all 127.0.0.1/32 scram-sha-256\n\
host replication all 127.0.0.1/32 scram-sha-256\n";

fn start_shard(ctx: &Arc<Ctx>, spec: &ClusterSpec, index: usize) -> Result<Shard, HarnessError> {
    let primary = init_primary(ctx, spec, index)?;
    let mut replicas = Vec::with_capacity(spec.replicas_per_shard);
    for r in 0..spec.replicas_per_shard {
        replicas.push(start_replica(ctx, &primary, index, r)?);
    }
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    for r in &replicas {
        wait_streaming(&primary, r, deadline)?;
    }
    Ok(Shard { index, primary, replicas })
}

fn init_primary(ctx: &Arc<Ctx>, spec: &ClusterSpec, index: usize) -> Result<Node, HarnessError> {
    let t = Instant::now();
    let mut node = Node::create(ctx, index, Role::Primary, format!("shard{index}-primary"))?;

    let pwfile = node.dir.join("superuser.pw");
    // 0600 from the start: the file holds the superuser password until initdb has read it.
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&pwfile)
        .and_then(|mut f| f.write_all(format!("{}\n", spec.superuser_password).as_bytes()))
        .map_err(io_err(format!("writing {}", pwfile.display())))?;
    ctx.own(&pwfile)?;
    let mut cmd = ctx.command("initdb", true);
    cmd.arg("-D")
        .arg(&node.data_dir)
        .args(["-U", SUPERUSER, "--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .args(["--no-sync", "-E", "UTF8", "--locale=C"]);
    let out = process::run(cmd, None, STARTUP_TIMEOUT);
    let _ = fs::remove_file(&pwfile);
    let out = out.map_err(|m| node.error(format!("initdb: {m}")))?;
    if !out.status.success() {
        return Err(node.error(format!("initdb failed ({}): {}", out.status, out.stderr.trim())));
    }

    let conf = node.data_dir.join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut f| f.write_all(base_conf(spec).as_bytes()))
        .map_err(io_err(format!("appending to {}", conf.display())))?;
    let hba = node.data_dir.join("pg_hba.conf");
    fs::write(&hba, PG_HBA).map_err(io_err(format!("writing {}", hba.display())))?;
    trace(&node.name, "initdb done", t);

    node.start_new()?;
    trace(&node.name, "started", t);

    let mut sql = String::new();
    if spec.app_user != SUPERUSER {
        sql.push_str(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {};\n",
            ident(&spec.app_user),
            literal(&spec.app_password)
        ));
    }
    for db in &spec.databases {
        if db == "postgres" {
            sql.push_str(&format!("ALTER DATABASE postgres OWNER TO {};\n", ident(&spec.app_user)));
        } else {
            sql.push_str(&format!("CREATE DATABASE {} OWNER {};\n", ident(db), ident(&spec.app_user)));
        }
    }
    if !sql.is_empty() {
        node.psql("postgres", &sql)?;
    }
    trace(&node.name, "roles and databases created", t);
    Ok(node)
}

fn start_replica(ctx: &Arc<Ctx>, primary: &Node, shard: usize, r: usize) -> Result<Node, HarnessError> {
    let t = Instant::now();
    let mut node = Node::create(ctx, shard, Role::Replica, format!("shard{shard}-replica{r}"))?;
    let slot = format!("shard{shard}_replica{r}");
    let mut cmd = ctx.command("pg_basebackup", true);
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(primary.port.to_string())
        .args(["-U", SUPERUSER, "-D"])
        .arg(&node.data_dir)
        .args(["-R", "-X", "stream", "-C", "-S"])
        .arg(&slot)
        .args(["--checkpoint=fast", "--no-sync", "-w"])
        .env("PGPASSWORD", &ctx.superuser_password);
    let out = process::run(cmd, None, STARTUP_TIMEOUT).map_err(|m| node.error(format!("pg_basebackup: {m}")))?;
    if !out.status.success() {
        return Err(node.error(format!(
            "pg_basebackup from {} failed ({}): {}",
            primary.name,
            out.status,
            out.stderr.trim()
        )));
    }
    node.slot = Some(slot);
    trace(&node.name, "base backup done", t);
    node.start_new()?;
    trace(&node.name, "started", t);
    Ok(node)
}

/// Polls until `replica` is streaming: its WAL receiver reports `streaming`
/// (`pg_stat_wal_receiver`, so a restarted replica is judged by its new incarnation) and
/// `primary`'s `pg_stat_replication` shows it (application_name = its cluster_name) with state
/// `streaming`.
fn wait_streaming(primary: &Node, replica: &Node, deadline: Instant) -> Result<(), HarnessError> {
    let start = Instant::now();
    let on_primary = format!(
        "SELECT count(*) > 0 FROM pg_stat_replication WHERE application_name = {} AND state = 'streaming'",
        literal(&replica.name)
    );
    let on_replica = "SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), 'none')";
    loop {
        let last = match replica.psql("postgres", on_replica) {
            Ok(s) if s == "streaming" => match primary.psql("postgres", &on_primary) {
                Ok(t) if t == "t" => {
                    trace(&replica.name, "streaming", start);
                    return Ok(());
                }
                Ok(_) => format!("not (yet) in pg_stat_replication of {} as streaming", primary.name),
                Err(e) => e.to_string(),
            },
            Ok(s) => format!("WAL receiver status {s:?}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(replica.error(format!(
                "not streaming from {} (port {}) in time; last check: {last}",
                primary.name, primary.port
            )));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Owns the temp root: stops whatever postmaster runs under it and removes it, once.
struct Guard {
    root: PathBuf,
    watchdog: Option<Watchdog>,
    done: bool,
}

impl Guard {
    /// Immediate-stops every postmaster under the root (SIGQUIT, what `pg_ctl stop -m
    /// immediate` sends; SIGKILL after 10 s), removes the root, then disarms the watchdog. If
    /// removal fails, the watchdog is triggered instead so it retries in the background.
    fn cleanup(&mut self) -> Result<(), HarnessError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        stop_all_immediate(&self.root);
        let removed = remove_dir_retry(&self.root);
        if let Some(w) = self.watchdog.take() {
            if removed.is_ok() {
                w.disarm();
            } else {
                // Closing its stdin makes it stop and remove everything on its own.
                drop(w);
            }
        }
        removed
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.cleanup()));
    }
}

fn stop_all_immediate(root: &Path) {
    let mut pids = Vec::new();
    if let Ok(rd) = fs::read_dir(root) {
        for entry in rd.flatten() {
            if let Some(pid) = process::running_postmaster(&entry.path().join("data"))
                && process::signal(pid, libc::SIGQUIT)
            {
                pids.push(pid);
            }
        }
    }
    let left = process::wait_gone(&pids, Duration::from_secs(10));
    for &pid in &left {
        process::signal(pid, libc::SIGKILL);
    }
    process::wait_gone(&left, Duration::from_secs(5));
}

fn remove_dir_retry(root: &Path) -> Result<(), HarnessError> {
    let mut last = None;
    for _ in 0..20 {
        match fs::remove_dir_all(root) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        thread::sleep(POLL_INTERVAL);
    }
    Err(HarnessError::Io {
        context: format!("removing {}", root.display()),
        source: last.unwrap_or_else(|| io::Error::other("unknown error")),
    })
}

/// Bytes of `path` from `offset` on (lossy UTF-8), empty if unreadable.
fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// SQL identifier quoting.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL string literal quoting (standard_conforming_strings is on).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// postgresql.conf value quoting.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn abbreviate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding() {
        assert_eq!(pct("app"), "app");
        assert_eq!(pct("p@ss:w/rd"), "p%40ss%3Aw%2Frd");
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(conf_quote("a'b\\c"), "'a''b\\\\c'");
    }

    #[test]
    fn spec_validation() {
        assert!(validate(&ClusterSpec::default()).is_ok());
        let bad = ClusterSpec { shards: 0, ..ClusterSpec::default() };
        assert!(validate(&bad).is_err());
        let bad = ClusterSpec { extra_conf: vec![("work mem".into(), "1MB".into())], ..ClusterSpec::default() };
        assert!(validate(&bad).is_err());
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Cluster>();
        check::<Node>();
        check::<HarnessError>();
    }

    #[test]
    fn free_ports_are_distinct() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
    }
}
