//! `cellgate-cluster`: command-line front end of the cluster harness for the demo script and
//! benchmarks. Owns only the cluster it starts and the state file it is told to write.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cellgate_harness::{Cluster, ClusterSpec, Node};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

const HELP: &str = "\
cellgate-cluster: start throwaway PostgreSQL shards (primary + streaming replicas) on 127.0.0.1

USAGE:
    cellgate-cluster up [OPTIONS]
    cellgate-cluster --help

OPTIONS (for `up`):
    --shards N                 number of shards (default 1)
    --replicas K               streaming replicas per shard (default 1)
    --app-user NAME            app role owning the databases (default app)
    --app-password-file PATH   file holding the app role's password (one line; the file must
                               not be readable by group or others). Default: a random password
    --superuser-password-file PATH
                               same, for the superuser `postgres`. Default: a random password
    --db NAME                  database to create on every primary; repeatable (default core)
    --fsync                    run with fsync=on (default off: faster, fine for throwaway data)
    --conf NAME=VALUE          extra postgresql.conf setting for every node; repeatable
    --state-file PATH          also write the JSON description to PATH (atomically; removed
                               again on shutdown)

`up` starts the cluster, prints one JSON document describing it to stdout (and the state
file), prints `cellgate-cluster ready` to stderr, then waits for SIGTERM or SIGINT, stops
every node and removes all its files, and exits 0.

Passwords are never taken from the command line (every local user sees it in `ps`); the
state file and stdout carry them in the nodes' URLs, and the state file is written mode 0600.

ENVIRONMENT:
    CELLGATE_CLUSTER_APP_PASSWORD         app role password (instead of --app-password-file)
    CELLGATE_CLUSTER_SUPERUSER_PASSWORD   superuser password (instead of --superuser-password-file)
    CELLGATE_PG_BINDIR         directory with initdb, pg_ctl, postgres, pg_basebackup, psql
    CELLGATE_HARNESS_TMPDIR    where cluster directories are created (default: temp dir)
";

#[derive(Serialize)]
struct State {
    /// PID of this process; SIGTERM it to stop the cluster.
    pid: u32,
    root_dir: String,
    app_user: String,
    databases: Vec<String>,
    shards: Vec<ShardState>,
}

#[derive(Serialize)]
struct ShardState {
    index: usize,
    primary: NodeState,
    replicas: Vec<NodeState>,
}

#[derive(Serialize)]
struct NodeState {
    name: String,
    role: String,
    port: u16,
    /// App-credential URL of the first database (or `postgres` if none).
    url: String,
    /// Superuser URL of the same database.
    admin_url: String,
    data_dir: String,
    log_file: String,
    pid: Option<u32>,
}

fn node_state(n: &Node, db: &str) -> NodeState {
    NodeState {
        name: n.name.clone(),
        role: n.role.to_string(),
        port: n.port,
        url: n.app_url(db),
        admin_url: n.admin_url(db),
        data_dir: n.data_dir.display().to_string(),
        log_file: n.log_path().display().to_string(),
        pid: n.pid(),
    }
}

struct Args {
    spec: ClusterSpec,
    state_file: Option<PathBuf>,
}

enum Parsed {
    Help,
    Up(Box<Args>),
}

const APP_PASSWORD_ENV: &str = "CELLGATE_CLUSTER_APP_PASSWORD";
const SUPERUSER_PASSWORD_ENV: &str = "CELLGATE_CLUSTER_SUPERUSER_PASSWORD";

/// A password from a file that only its owner can read (first line, without the newline).
fn read_password_file(flag: &str, path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{flag} {}: mode {mode:o} lets other users read the password; chmod 600 it",
            path.display()
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        return Err(format!("{flag} {}: the file is empty", path.display()));
    }
    Ok(pw)
}

/// 128 random bits as hex: a throwaway cluster's password when none is given.
fn random_password() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Password for one role: file flag, else environment variable, else random.
fn password(
    flag: &str,
    file: Option<PathBuf>,
    env_name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    match (file, env(env_name).filter(|v| !v.is_empty())) {
        (Some(_), Some(_)) => Err(format!("give the password by {flag} or {env_name}, not both")),
        (Some(path), None) => read_password_file(flag, &path),
        (None, Some(v)) => Ok(v),
        (None, None) => random_password(),
    }
}

fn parse(args: Vec<String>, env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, String> {
    let mut it = args.into_iter().peekable();
    match it.next().as_deref() {
        None => return Err("missing command; try `cellgate-cluster --help`".into()),
        Some("-h" | "--help" | "help") => return Ok(Parsed::Help),
        Some("up") => {}
        Some(other) => return Err(format!("unknown command {other:?}; try --help")),
    }
    let mut spec = ClusterSpec::default();
    let mut dbs: Vec<String> = Vec::new();
    let mut state_file = None;
    let (mut app_pw_file, mut su_pw_file) = (None, None);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().ok_or_else(|| format!("{name} needs a value")),
            }
        };
        let number = |name: &str, v: String| -> Result<usize, String> {
            v.parse().map_err(|_| format!("{name} expects a number, got {v:?}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--shards" => spec.shards = number("--shards", value("--shards")?)?,
            "--replicas" => spec.replicas_per_shard = number("--replicas", value("--replicas")?)?,
            "--app-user" => spec.app_user = value("--app-user")?,
            "--app-password" | "--superuser-password" => {
                return Err(format!(
                    "{flag} is not accepted: a password on the command line is visible to every local \
                     user (ps); use {flag}-file PATH (mode 0600) or the environment ({APP_PASSWORD_ENV} / \
                     {SUPERUSER_PASSWORD_ENV})"
                ));
            }
            "--app-password-file" => app_pw_file = Some(PathBuf::from(value("--app-password-file")?)),
            "--superuser-password-file" => su_pw_file = Some(PathBuf::from(value("--superuser-password-file")?)),
            "--db" => dbs.push(value("--db")?),
            "--fsync" if inline.is_none() => spec.fsync = true,
            "--conf" => {
                let kv = value("--conf")?;
                let (k, v) = kv.split_once('=').ok_or_else(|| format!("--conf expects NAME=VALUE, got {kv:?}"))?;
                spec.extra_conf.push((k.trim().to_string(), v.trim().to_string()));
            }
            "--state-file" => state_file = Some(PathBuf::from(value("--state-file")?)),
            other => return Err(format!("unknown option {other:?}; try --help")),
        }
    }
    if !dbs.is_empty() {
        spec.databases = dbs;
    }
    spec.app_password = password("--app-password-file", app_pw_file, APP_PASSWORD_ENV, env)?;
    spec.superuser_password = password("--superuser-password-file", su_pw_file, SUPERUSER_PASSWORD_ENV, env)?;
    Ok(Parsed::Up(Box::new(Args { spec, state_file })))
}

/// Writes `text` to `path` via a temp file in the same directory + rename; mode 0600, since the
/// text holds the nodes' passwords.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("state file path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn up(args: Args) -> Result<(), String> {
    // Register first so a signal during startup is not lost (it is acted on once the cluster
    // is up, and then stops it right away).
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("installing signal handlers: {e}"))?;

    let cluster = Cluster::start(args.spec).map_err(|e| e.to_string())?;
    let db = cluster.spec().databases.first().cloned().unwrap_or_else(|| "postgres".to_string());
    let state = State {
        pid: std::process::id(),
        root_dir: cluster.root_dir().display().to_string(),
        app_user: cluster.spec().app_user.clone(),
        databases: cluster.spec().databases.clone(),
        shards: cluster
            .shards
            .iter()
            .map(|s| ShardState {
                index: s.index,
                primary: node_state(&s.primary, &db),
                replicas: s.replicas.iter().map(|r| node_state(r, &db)).collect(),
            })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{json}").and_then(|_| out.flush()).map_err(|e| format!("writing stdout: {e}"))?;
    }
    if let Some(path) = &args.state_file {
        write_atomically(path, &format!("{json}\n"))
            .map_err(|e| format!("writing state file {}: {e}", path.display()))?;
    }
    eprintln!("cellgate-cluster ready");

    let sig = signals.forever().next();
    eprintln!("cellgate-cluster: got signal {}, stopping", sig.map(|s| s.to_string()).unwrap_or_default());
    if let Some(path) = &args.state_file {
        let _ = fs::remove_file(path);
    }
    cluster.stop().map_err(|e| e.to_string())?;
    eprintln!("cellgate-cluster: stopped");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(args, &|k| std::env::var(k).ok()) {
        Ok(Parsed::Help) => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Ok(Parsed::Up(args)) => match up(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cellgate-cluster: error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("cellgate-cluster: {e}");
            ExitCode::from(2)
        }
    }
}
