//! Command-line interface (design §4): argument types, the offline commands (`map`, `locate`)
//! and the admin API clients (`map push`, `migrate`, with `migrate start --wait` polling until
//! the migration ends), and the etcd clients of fleet mode (`map push --etcd`, `fleet status`). Must not start servers itself: `serve` is handed to the server module.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::geo;
use crate::shardmap::{self, ShardMap, diff};

#[derive(Debug, Parser)]
#[command(name = "cellgate", version, about = "Geo-sharded data router: H3 cells to database shards")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Shard-map tools.
    #[command(subcommand)]
    Map(MapCommand),
    /// Show which cell and shard a location maps to.
    Locate(LocateArgs),
    /// Run the router: data and admin listeners from the process config.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Allow a non-loopback listener without tokens (never in production).
        #[arg(long)]
        insecure_no_auth: bool,
        /// Log lines as text (colours only on a terminal) or JSON objects for log shippers.
        #[arg(long, value_enum, env = "CELLGATE_LOG_FORMAT", default_value_t = crate::telemetry::LogFormat::Text)]
        log_format: crate::telemetry::LogFormat,
    },
    /// Print the SHA-256 digest of a token, for `[[tokens]] sha256 = ...` in cellgate.toml.
    /// Without TOKEN the token is read from stdin (one line), which keeps it out of `ps`.
    TokenHash { token: Option<String> },
    /// Demo data tools.
    #[command(subcommand)]
    Demo(DemoCommand),
    /// GET <ADMIN>/livez; exit 0 on 200, else 1. For container health checks in images
    /// without a shell or curl (Dockerfile HEALTHCHECK, exec probes).
    Healthcheck {
        /// Admin base URL.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Fleet mode on etcd (docs/fleet.md).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Live migration of cells between shards, PostgreSQL and MongoDB databases (admin API).
    Migrate {
        /// Admin base URL, e.g. http://127.0.0.1:9090
        #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Admin token (or CELLGATE_ADMIN_TOKEN).
        #[arg(long, global = true, env = "CELLGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Read the admin token from this file: the bare token, or a line
        /// `authorization: Bearer <token>` (a header file for `curl -H @FILE`). Keeps the token
        /// off the command line; used instead of --token / CELLGATE_ADMIN_TOKEN.
        #[arg(long, global = true, value_name = "PATH")]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        action: MigrateAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Move CELLS (hex, resolution <= R, all owned by one shard today) to shard --to.
    Start {
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 2000)]
        hold_ms: u64,
        /// Poll until the migration ends (progress on stderr); print its final record and exit 0
        /// only if it is `done`. Also stops when it halts in a state that needs the operator.
        #[arg(long)]
        wait: bool,
        #[arg(required = true)]
        cells: Vec<String>,
    },
    /// One migration, or all of them.
    Status { id: Option<String> },
    /// Abort a migration that has not published its map yet.
    Abort { id: String },
    /// Resume a migration interrupted by a crash of its orchestrator.
    Resume { id: String },
}

/// The admin token of `migrate`: from `--token-file` when given (then `--token` and
/// CELLGATE_ADMIN_TOKEN are not used), else `--token` / CELLGATE_ADMIN_TOKEN.
pub fn admin_token(token: Option<String>, token_file: Option<&Path>) -> Result<Option<String>, String> {
    match token_file {
        None => Ok(token),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("--token-file {}: {e}", path.display()))?;
            token_from_file(&text).map(Some).map_err(|e| format!("--token-file {}: {e}", path.display()))
        }
    }
}

/// The token in a token file: the bare token (one non-empty line), or the value of its one
/// `authorization: Bearer <token>` line (header name and scheme case-insensitive; other header
/// lines are ignored). Errors never quote the file, which holds a secret.
fn token_from_file(text: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    fn header(l: &str) -> Option<&str> {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("authorization").then(|| value.trim())
    }
    let auth: Vec<&str> = lines.iter().filter_map(|l| header(l)).collect();
    let token = match (auth.as_slice(), lines.as_slice()) {
        ([value], _) => {
            let (scheme, token) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err("the authorization line is not `authorization: Bearer <token>`".into());
            }
            token.trim()
        }
        ([], [one]) if !one.contains(':') => one,
        ([], _) => return Err("expected the token alone, or a line `authorization: Bearer <token>`".into()),
        _ => return Err("more than one authorization line".into()),
    };
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err("the token is empty or contains whitespace".into());
    }
    Ok(token.to_string())
}

/// `cellgate migrate ...`: one admin API call, the JSON answer printed; exit 1 unless 2xx.
/// `start --wait` then follows the migration to its end ([`wait_for`]).
pub fn migrate(admin: &str, token: Option<&str>, action: &MigrateAction) -> ExitCode {
    let (method, path, body) = match action {
        MigrateAction::Start { to, hold_ms, cells, .. } => (
            http::Method::POST,
            "/admin/migrations".to_string(),
            serde_json::json!({"cells": cells, "to": to, "hold_ms": hold_ms}).to_string(),
        ),
        MigrateAction::Status { id: None } => (http::Method::GET, "/admin/migrations".to_string(), String::new()),
        MigrateAction::Status { id: Some(id) } => (http::Method::GET, format!("/admin/migrations/{id}"), String::new()),
        MigrateAction::Abort { id } => (http::Method::POST, format!("/admin/migrations/{id}/abort"), String::new()),
        MigrateAction::Resume { id } => (http::Method::POST, format!("/admin/migrations/{id}/resume"), String::new()),
    };
    if let MigrateAction::Start { wait: true, .. } = action {
        return match runtime() {
            Ok(rt) => rt.block_on(start_and_wait(admin, token, body)),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let status = matches!(action, MigrateAction::Status { .. });
    admin_call_then(admin, method, &path, "application/json", body, token, |answer| {
        if status {
            print_next_steps(answer);
        }
    })
}

/// `cellgate healthcheck`: one `GET /livez` on the admin listener (open, no token).
pub fn healthcheck(admin: &str, timeout: Duration) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(livez(admin, timeout)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unhealthy: {admin}/livez: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn livez(admin: &str, timeout: Duration) -> Result<(), String> {
    let (status, _) = crate::fleet::call(
        admin,
        &admin_tls(),
        http::Method::GET,
        "/livez",
        "text/plain",
        bytes::Bytes::new(),
        None,
        timeout,
    )
    .await?;
    if status == 200 { Ok(()) } else { Err(format!("answered {status}")) }
}

/// How often `--wait` asks for the migration's record.
const WAIT_POLL: Duration = Duration::from_millis(200);
/// Consecutive failed polls (the admin listener out of reach) after which `--wait` gives up.
const WAIT_MAX_FAILED_POLLS: u32 = 25;

/// `migrate start --wait`: start, then poll `GET /admin/migrations/{id}` until the record is
/// terminal, or stopped without an orchestrator task (`running: false`: it waits for the
/// operator's `resume` or `abort`). Progress on stderr, the final record on stdout.
async fn start_and_wait(admin: &str, token: Option<&str>, body: String) -> ExitCode {
    let (status, answer) =
        match admin_request(admin, http::Method::POST, "/admin/migrations", "application/json", body, token).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {admin}: {e}");
                return ExitCode::FAILURE;
            }
        };
    let started = serde_json::from_slice::<serde_json::Value>(&answer).ok();
    let id = started.as_ref().and_then(|v| v["id"].as_str()).map(str::to_string);
    let (true, Some(id)) = ((200..300).contains(&status), id) else {
        println!("{}", String::from_utf8_lossy(&answer));
        return ExitCode::FAILURE;
    };
    eprintln!("migration {id}: started");
    wait_for(admin, token, &id).await
}

async fn wait_for(admin: &str, token: Option<&str>, id: &str) -> ExitCode {
    let path = format!("/admin/migrations/{id}");
    let mut last_state = None;
    let mut failed_polls = 0;
    loop {
        tokio::time::sleep(WAIT_POLL).await;
        let (status, answer) = match admin_request(
            admin,
            http::Method::GET,
            &path,
            "application/json",
            String::new(),
            token,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                failed_polls += 1;
                if failed_polls >= WAIT_MAX_FAILED_POLLS {
                    eprintln!(
                        "error: {admin}: {e} ({failed_polls} polls in a row failed; the migration may still run: `cellgate migrate status {id}`)"
                    );
                    return ExitCode::FAILURE;
                }
                continue;
            }
        };
        failed_polls = 0;
        let value = serde_json::from_slice::<serde_json::Value>(&answer).ok();
        let doc = value.as_ref().and_then(|v| {
            let mut d = serde_json::from_value::<crate::migrate::Doc>(v.clone()).ok()?;
            // Reported by the server but never deserialised (persisted records do not run).
            d.running = v["running"] == true;
            Some(d)
        });
        let Some(doc) = doc.filter(|_| (200..300).contains(&status)) else {
            println!("{}", String::from_utf8_lossy(&answer));
            eprintln!("error: GET {path} answered {status}");
            return ExitCode::FAILURE;
        };
        if last_state != Some(doc.state) {
            eprintln!("migration {id}: {} (rows copied: {})", doc.state, doc.rows_copied);
            last_state = Some(doc.state);
        }
        if let Some(done) = wait_outcome(&doc) {
            println!("{}", String::from_utf8_lossy(&answer));
            if !done {
                eprintln!("{id} {}: next: {}", doc.state, doc.next_step());
            }
            return if done { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
    }
}

/// Has `--wait` seen the end: `Some(true)` for `done`, `Some(false)` for another terminal state or
/// a migration no task works on (it waits for the operator), `None` while it runs.
fn wait_outcome(doc: &crate::migrate::Doc) -> Option<bool> {
    (doc.terminal() || !doc.running).then_some(doc.state == crate::migrate::State::Done)
}

/// After the JSON of `migrate status`: one line per migration saying what to do next (on
/// stderr, so stdout stays one JSON document for scripts).
fn print_next_steps(answer: &[u8]) {
    let items = match serde_json::from_slice::<serde_json::Value>(answer) {
        Ok(serde_json::Value::Array(a)) => a,
        Ok(v) => vec![v],
        Err(_) => Vec::new(),
    };
    for v in items {
        let Ok(mut d) = serde_json::from_value::<crate::migrate::Doc>(v.clone()) else { continue };
        // Reported by the server but never deserialised (persisted records do not run).
        d.running = v["running"] == true;
        eprintln!("{} {}: next: {}", d.id, d.state, d.next_step());
    }
}

fn admin_call(
    admin: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: String,
    token: Option<&str>,
) -> ExitCode {
    admin_call_then(admin, method, path, content_type, body, token, |_| {})
}

fn admin_call_then(
    admin: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: String,
    token: Option<&str>,
    then: impl FnOnce(&[u8]),
) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(admin_request(admin, method, path, content_type, body, token)) {
        Ok((status, bytes)) => {
            println!("{}", String::from_utf8_lossy(&bytes));
            if !(200..300).contains(&status) {
                return ExitCode::FAILURE;
            }
            then(&bytes);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("tokio runtime: {e}"))
}

/// One admin API request: the status and the body.
async fn admin_request(
    admin: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: String,
    token: Option<&str>,
) -> Result<(u16, bytes::Bytes), String> {
    let body = bytes::Bytes::from(body);
    crate::fleet::call(admin, &admin_tls(), method, path, content_type, body, token, Duration::from_secs(120)).await
}

/// TLS for an `https://` admin URL: the CA bundle in `CELLGATE_ADMIN_CA` (else the Mozilla
/// roots), and a client certificate from `CELLGATE_ADMIN_CERT` / `CELLGATE_ADMIN_KEY` for an
/// admin listener with `client_ca`.
fn admin_tls() -> crate::config::Tls {
    let path = |v: &str| std::env::var_os(v).map(PathBuf::from);
    crate::config::Tls {
        peer_ca: path("CELLGATE_ADMIN_CA"),
        peer_cert: path("CELLGATE_ADMIN_CERT"),
        peer_key: path("CELLGATE_ADMIN_KEY"),
        ..Default::default()
    }
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Generate the musician-marketplace demo and load it into every shard's primary.
    Load {
        #[arg(long)]
        map: PathBuf,
        #[arg(long, default_value = "tests/data/cities15000.csv")]
        cities: PathBuf,
        #[arg(long, default_value = "core")]
        db: String,
        #[arg(long, default_value_t = 50_000)]
        musicians: usize,
        #[arg(long, default_value_t = 5_000)]
        venues: usize,
        #[arg(long, default_value_t = 10_000)]
        gig_requests: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Schema SQL run first on every shard (default: the embedded deploy/local/schema.sql).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
}

pub fn demo_load(
    map: &PathBuf,
    cities: &PathBuf,
    db: &str,
    spec: crate::demo::DemoSpec,
    schema: Option<&PathBuf>,
) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::FAILURE
    };
    let map = match load(map) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let text = match std::fs::read_to_string(cities) {
        Ok(t) => t,
        Err(e) => return fail(format!("{}: {e}", cities.display())),
    };
    let schema_sql = match schema {
        None => crate::demo::SCHEMA_SQL.to_string(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) => s,
            Err(e) => return fail(format!("{}: {e}", p.display())),
        },
    };
    let demo = match crate::demo::read_cities(&text).and_then(|c| crate::demo::generate(&spec, &c)) {
        Ok(d) => d,
        Err(e) => return fail(e.to_string()),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("tokio runtime: {e}")),
    };
    match rt.block_on(crate::demo::load(&map, db, &demo, &schema_sql)) {
        Ok(r) => {
            for s in &r.shards {
                println!(
                    "{}: {} musicians, {} venues, {} gig_requests ({} ms)",
                    s.shard, s.musicians, s.venues, s.gig_requests, s.elapsed_ms
                );
            }
            if r.unrouted > 0 {
                println!("{} rows owned by no shard (reject fallback), not loaded", r.unrouted);
            }
            println!("loaded in {} ms", r.elapsed_ms);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}

#[derive(Debug, Subcommand)]
pub enum MapCommand {
    /// Validate maps; prints every error with its line, exits 1 on any.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Cells that change owner between two maps, per from → to.
    Diff { old: PathBuf, new: PathBuf },
    /// Publish a map on a running instance (PUT /admin/map), or in etcd for a fleet (--etcd);
    /// prints the outcome. Exit 0 published, 3 version conflict (etcd), 4 --wait timed out,
    /// 1 anything else.
    Push {
        file: PathBuf,
        /// Admin base URL, e.g. http://127.0.0.1:9090
        #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
        admin: Option<String>,
        /// Fleet mode: etcd client URLs (comma-separated); the map is written at
        /// `<prefix>/map` with a compare-and-swap.
        #[arg(long, value_delimiter = ',', requires = "prefix")]
        etcd: Vec<String>,
        /// Fleet mode: the fleet's key prefix, e.g. /cellgate/prod.
        #[arg(long, requires = "etcd")]
        prefix: Option<String>,
        /// Fleet mode: return only when every live instance serves the new version (default
        /// timeout 30s; `--wait=2m`, `--wait=500ms`); names the ones that do not.
        #[arg(long, requires = "etcd", num_args = 0..=1, require_equals = true, default_missing_value = "30s", value_name = "TIMEOUT")]
        wait: Option<String>,
        /// Fleet mode: deadline of each etcd call, ms.
        #[arg(long, default_value_t = 2000)]
        etcd_timeout_ms: u64,
        /// (Boxed: five paths and names would make every `MapCommand` this large.)
        #[command(flatten)]
        etcd_access: Box<EtcdAccessArgs>,
        /// Admin token (or CELLGATE_ADMIN_TOKEN).
        #[arg(long, env = "CELLGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Only publish if the running version is this one (If-Match).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Write a synthetic map with many assigned cells (for benchmarks; do not commit the output).
    Synth {
        /// Number of assigned cells.
        #[arg(long, default_value_t = 1_000_000)]
        cells: usize,
        #[arg(long, default_value_t = 16)]
        shards: usize,
        #[arg(long, default_value_t = 7)]
        resolution: u8,
        #[arg(long, default_value_t = 2)]
        fallback_resolution: u8,
        /// Cities CSV (columns include lat,lng) around which cells are placed.
        #[arg(long, default_value = "tests/data/cities15000.csv")]
        cities: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// The live instances registered in etcd and the map version each serves; exit 0 when all
    /// serve the version in etcd, 4 when some do not, 1 when etcd cannot be read.
    Status {
        /// etcd client URLs (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// The fleet's key prefix, e.g. /cellgate/prod.
        #[arg(long)]
        prefix: String,
        /// Deadline of each etcd call, ms.
        #[arg(long, default_value_t = 2000)]
        etcd_timeout_ms: u64,
        #[command(flatten)]
        etcd_access: EtcdAccessArgs,
    },
}

/// TLS and authentication to etcd for the fleet commands, as `map.etcd` gives them to an
/// instance. The password never goes on the command line: CELLGATE_ETCD_PASSWORD or a file.
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdAccessArgs {
    /// PEM bundle of the CA that signed etcd's certificate (https:// endpoints).
    #[arg(long, value_name = "PATH")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth; with --etcd-key.
    #[arg(long, value_name = "PATH")]
    pub etcd_cert: Option<PathBuf>,
    /// Key of --etcd-cert (PEM).
    #[arg(long, value_name = "PATH")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (auth enabled); the password from CELLGATE_ETCD_PASSWORD or --etcd-password-file.
    #[arg(long, value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// Read the etcd user's password from this file (mode 0600 or 0400, at most 64 KiB; trailing
    /// white space trimmed); used instead of CELLGATE_ETCD_PASSWORD.
    #[arg(long, value_name = "PATH")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdAccessArgs {
    /// The access these flags describe, the password read now; errors never quote it.
    pub fn access(&self) -> Result<crate::config::EtcdAccess, String> {
        let password = match &self.etcd_password_file {
            Some(path) => {
                let abs =
                    std::path::absolute(path).map_err(|e| format!("--etcd-password-file {}: {e}", path.display()))?;
                Some(
                    crate::secrets::read_secret_file(&abs.to_string_lossy())
                        .map_err(|e| format!("--etcd-password-file: {e}"))?,
                )
            }
            None => std::env::var("CELLGATE_ETCD_PASSWORD").ok(),
        };
        // A password in the environment for another tool is not an error without --etcd-user.
        let password = if self.etcd_user.is_some() || self.etcd_password_file.is_some() { password } else { None };
        Ok(crate::config::EtcdAccess {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password,
        })
    }
}

#[derive(Debug, Args)]
pub struct LocateArgs {
    #[arg(long)]
    pub map: PathBuf,
    #[arg(long, allow_hyphen_values = true, requires = "lng", conflicts_with = "cell")]
    pub lat: Option<f64>,
    #[arg(long, allow_hyphen_values = true, requires = "lat")]
    pub lng: Option<f64>,
    #[arg(long)]
    pub cell: Option<String>,
    #[arg(long)]
    pub radius_km: Option<f64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn load(path: &PathBuf) -> Result<ShardMap, String> {
    let src = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    shardmap::compile_str(&src).map_err(|errs| {
        let p = path.display();
        let lines: Vec<String> = errs
            .0
            .iter()
            .map(|e| match e.line {
                Some(l) => format!("{p}:{l}: {}", e.kind),
                None => format!("{p}: {}", e.kind),
            })
            .collect();
        lines.join("\n")
    })
}

pub fn map_check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for f in files {
        match load(f) {
            Ok(m) => {
                println!(
                    "{}: ok (version {}, resolution {}, {} shards, {} assigned cells)",
                    f.display(),
                    m.version(),
                    u8::from(m.resolution()),
                    m.shards().len(),
                    m.assigned_count()
                );
                for w in tls_warnings(&m) {
                    eprintln!("{}: warning: {w}", f.display());
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("{e}");
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Endpoints off loopback whose TLS does not verify the server certificate (below `verify-ca`
/// in `[tls] backends` terms: PostgreSQL `sslmode`, MongoDB `tls*` options, SQL Server
/// `encrypt`/`trust_server_certificate`), and connection strings cellgate would refuse. Never
/// shows credentials.
fn tls_warnings(map: &ShardMap) -> Vec<String> {
    use crate::backend::{mongo, mssql, postgres};
    use tokio_postgres::config::Host;
    let mut out = Vec::new();
    let weak = |at: &str, label: &str, setting: String, fix: &str| {
        format!("{at} ({label}): {setting} does not verify the server; {fix}")
    };
    for shard in map.shards() {
        for (db, spec) in &shard.databases {
            let at = |what: &str| format!("shard {} database {db} {what}", shard.id);
            match spec {
                shardmap::DatabaseSpec::Postgres { primary, replicas, admin } => {
                    for (what, conn) in endpoints(primary, replicas).chain(admin.iter().map(|a| ("admin".into(), a))) {
                        let info = match postgres::tls::parse(conn.expose()) {
                            Ok(i) => i,
                            Err(e) => {
                                out.push(format!("{}: {e}", at(&what)));
                                continue;
                            }
                        };
                        let remote = info.config.get_hosts().iter().any(|h| match h {
                            Host::Tcp(h) => !is_loopback_host(h),
                            Host::Unix(_) => false,
                        });
                        if remote && info.tls.mode < postgres::tls::SslMode::VerifyCa {
                            let setting = format!("sslmode={}", info.tls.mode.as_str());
                            let label = postgres::endpoint_label(&info.config);
                            out.push(weak(&at(&what), &label, setting, "use verify-full with sslrootcert"));
                        }
                    }
                }
                shardmap::DatabaseSpec::Sqlserver { primary, replicas } => {
                    for (what, conn) in endpoints(primary, replicas) {
                        let p = match mssql::parse_conn(conn.expose()) {
                            Ok(p) => p,
                            Err(e) => {
                                out.push(format!("{}: {e}", at(&what)));
                                continue;
                            }
                        };
                        if !is_loopback_host(&p.host()) && p.tls.level() < crate::config::SslMode::VerifyCa {
                            let fix = "use encrypt=required (or strict) with ca_file or the system roots";
                            out.push(weak(&at(&what), &p.label, p.tls.describe(), fix));
                        }
                    }
                }
                shardmap::DatabaseSpec::Mongodb { uri } => {
                    let conn = match mongo::parse_uri(uri) {
                        Ok(c) => c,
                        Err(e) => {
                            out.push(format!("{}: {e}", at("uri")));
                            continue;
                        }
                    };
                    let tls = mongo::UriTls::of(&conn);
                    if mongo::hosts(&conn).iter().any(|h| !is_loopback_host(h))
                        && tls.level() < crate::config::SslMode::VerifyCa
                    {
                        let label = mongo::label_of(&conn, db);
                        let setting = format!("MongoDB {}", tls.describe());
                        out.push(weak(&at("uri"), &label, setting, "use tls=true with tlsCAFile"));
                    }
                }
            }
        }
    }
    out
}

/// A SQL database's endpoints, named as errors name them (`primary`, `replica 0`, ...).
fn endpoints<'a>(
    primary: &'a shardmap::Secret,
    replicas: &'a [shardmap::Secret],
) -> impl Iterator<Item = (String, &'a shardmap::Secret)> {
    std::iter::once(("primary".to_string(), primary))
        .chain(replicas.iter().enumerate().map(|(i, r)| (format!("replica {i}"), r)))
}

/// `localhost` or a loopback address: traffic that never leaves the machine.
fn is_loopback_host(h: &str) -> bool {
    h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub fn map_diff(old: &PathBuf, new: &PathBuf) -> ExitCode {
    let (a, b) = match (load(old), load(new)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            for e in [a.err(), b.err()].into_iter().flatten() {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let d = diff::diff(&a, &b);
    println!("version {} -> {} (resolution {})", a.version(), b.version(), d.resolution);
    if d.moves.is_empty() {
        println!("no cell changes owner");
    }
    let name = |o: &Option<String>| o.clone().unwrap_or_else(|| "(none)".into());
    for ((from, to), m) in &d.moves {
        println!(
            "{} -> {}: {} cells at resolution {} ({} compacted):",
            name(from),
            name(to),
            m.count_at_r,
            d.resolution,
            m.cells.len()
        );
        for c in &m.cells {
            println!("  {c} (res {})", u8::from(c.resolution()));
        }
    }
    ExitCode::SUCCESS
}

pub fn locate(args: &LocateArgs) -> ExitCode {
    let map = match load(&args.map) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let region = match geo::region(args.lat, args.lng, args.cell.as_deref(), args.radius_km, map.resolution()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: invalid region: {e}");
            return ExitCode::from(2);
        }
    };
    let out = crate::locate::locate_json(&map, &region);
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    }
    ExitCode::SUCCESS
}

pub fn map_synth(
    cells: usize,
    shards: usize,
    resolution: u8,
    fallback_resolution: u8,
    cities: &PathBuf,
    out: &PathBuf,
) -> ExitCode {
    let csv = match std::fs::read_to_string(cities) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", cities.display());
            return ExitCode::FAILURE;
        }
    };
    let points = match crate::synth::read_cities(&csv) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}: {e}", cities.display());
            return ExitCode::FAILURE;
        }
    };
    let spec = crate::synth::SynthSpec { cells, shards, resolution, fallback_resolution };
    let text = crate::synth::generate_toml(&spec, &points);
    if let Err(e) = std::fs::write(out, text) {
        eprintln!("{}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {}", out.display());
    ExitCode::SUCCESS
}

/// `cellgate map push`: one HTTP/1.1 PUT to the admin listener.
pub fn map_push(file: &PathBuf, admin: &str, token: Option<&str>, if_version: Option<u64>) -> ExitCode {
    let body = match std::fs::read_to_string(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    // The version precondition travels as `?if_match=` (the admin API accepts it like If-Match).
    match if_version {
        None => admin_call(admin, http::Method::PUT, "/admin/map", "application/toml", body, token),
        Some(v) => {
            admin_call(admin, http::Method::PUT, &format!("/admin/map?if_match={v}"), "application/toml", body, token)
        }
    }
}

/// A `--wait` timeout: `30s`, `500ms`, `2m`, or bare seconds.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("timeout {s:?}: expected e.g. 30s, 500ms or 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("timeout {s:?}: unit must be ms, s or m")),
    };
    if d.is_zero() { Err(format!("timeout {s:?} must be > 0")) } else { Ok(d) }
}

fn etcd_target(
    endpoints: &[String],
    prefix: &str,
    timeout_ms: u64,
    access: &EtcdAccessArgs,
) -> Result<crate::etcd::Target, String> {
    let mut errs: Vec<String> = endpoints
        .iter()
        .filter_map(|e| crate::config::etcd_endpoint_problem(e))
        .map(|p| format!("--etcd: {p}"))
        .collect();
    if let Some(p) = crate::config::etcd_prefix_problem(prefix) {
        errs.push(format!("--prefix {prefix:?}: {p}"));
    }
    if timeout_ms == 0 {
        errs.push("--etcd-timeout-ms must be > 0".into());
    }
    let access = access.access()?;
    errs.extend(access.problems(endpoints, |f| match f {
        "endpoints" => "--etcd".into(),
        "password" => "the password (CELLGATE_ETCD_PASSWORD or --etcd-password-file)".into(),
        other => format!("--etcd-{other}"),
    }));
    if !errs.is_empty() {
        return Err(errs.join("; "));
    }
    Ok(crate::etcd::Target {
        endpoints: endpoints.to_vec(),
        prefix: prefix.to_string(),
        timeout: Duration::from_millis(timeout_ms),
        access,
    })
}

/// `cellgate map push FILE --etcd ... --prefix ... [--if-version N] [--wait[=T]]`: write the map
/// with a compare-and-swap (exit 3 when another push won), then optionally wait for the fleet
/// (exit 4 naming the instances that did not apply it in time).
pub fn map_push_etcd(
    file: &Path,
    endpoints: &[String],
    prefix: &str,
    if_version: Option<u64>,
    wait: Option<&str>,
    timeout_ms: u64,
    access: &EtcdAccessArgs,
) -> ExitCode {
    let fail = |code: u8, msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(code)
    };
    let target = match etcd_target(endpoints, prefix, timeout_ms, access) {
        Ok(t) => t,
        Err(e) => return fail(2, e),
    };
    let wait = match wait.map(parse_timeout).transpose() {
        Ok(w) => w,
        Err(e) => return fail(2, format!("--wait: {e}")),
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(1, format!("{}: {e}", file.display())),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(1, e),
    };
    rt.block_on(async {
        let pushed = match crate::etcd::push_map(&target, &text, if_version).await {
            Ok(p) => p,
            Err(e) => return fail(e.exit_code(), e.to_string()),
        };
        println!("{}", serde_json::json!({"pushed": pushed}));
        let Some(within) = wait else { return ExitCode::SUCCESS };
        match crate::etcd::wait_for_version(&target, pushed.version, within).await {
            Ok(view) => {
                if view.instances.is_empty() {
                    eprintln!("warning: no live instance is registered under {prefix}");
                }
                println!("{}", serde_json::json!({"applied": view}));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.exit_code(), e.to_string()),
        }
    })
}

/// `cellgate fleet status`: the registrations and whether they agree with the map in etcd.
pub fn fleet_status(endpoints: &[String], prefix: &str, timeout_ms: u64, access: &EtcdAccessArgs) -> ExitCode {
    let target = match etcd_target(endpoints, prefix, timeout_ms, access) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(crate::etcd::fleet_status(&target)) {
        Ok(view) => {
            println!("{}", serde_json::to_string_pretty(&view).unwrap_or_default());
            if view.agree {
                ExitCode::SUCCESS
            } else {
                eprintln!("not every instance serves map version {:?}: {}", view.map_version, view.behind.join(", "));
                ExitCode::from(4)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_check_warns_about_unverified_remote_postgres() {
        let map = |primary: &str, replica: &str| {
            shardmap::compile_str(&format!(
                "version = 1\nresolution = 3\n[[shards]]\nid = \"a\"\n[shards.databases.core]\nkind = \"postgres\"\n\
                 primary = \"{primary}\"\nreplicas = [\"{replica}\"]\n[fallback]\nmode = \"reject\"\n"
            ))
            .map_err(|e| format!("{:?}", e.0.iter().map(|e| e.kind.to_string()).collect::<Vec<_>>()))
            .unwrap()
        };
        let w = tls_warnings(&map(
            "postgres://u:pw-canary@db.internal:5432/core?sslmode=require",
            "postgres://u:pw-canary@127.0.0.1:5432/core",
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("shard a database core primary (db.internal:5432/core): sslmode=require"), "{w:?}");
        let w = tls_warnings(&map(
            "postgres://u:pw-canary@db.internal/core?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://u:pw-canary@db2.internal/core?sslmode=verify-ca&sslrootcert=/ca.pem",
        ));
        assert!(w.is_empty(), "{w:?}");
        let w = tls_warnings(&map(
            "postgres://u:pw-canary@db.internal/core?sslmode=allow",
            "postgres://u:pw-canary@localhost/core",
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("sslmode \"allow\" is not supported") && !w[0].contains("pw-canary"), "{w:?}");
    }

    #[test]
    fn map_check_warns_about_unverified_remote_mongodb_and_sqlserver() {
        let map = |mongo: &str, primary: &str, replica: &str| {
            shardmap::compile_str(&format!(
                "version = 1\nresolution = 3\n[[shards]]\nid = \"a\"\n[shards.databases.profiles]\nkind = \"mongodb\"\n\
                 uri = \"{mongo}\"\n[shards.databases.orders]\nkind = \"sqlserver\"\nprimary = \"{primary}\"\n\
                 replicas = [\"{replica}\"]\n[fallback]\nmode = \"reject\"\n"
            ))
            .map_err(|e| format!("{:?}", e.0.iter().map(|e| e.kind.to_string()).collect::<Vec<_>>()))
            .unwrap()
        };
        let w = tls_warnings(&map(
            "mongodb://u:pw-canary@db.internal:27017,127.0.0.1:27018/p?tls=true&tlsInsecure=true",
            "sqlserver://u:pw-canary@ms.internal/orders?trust_server_certificate=true",
            "server=tcp:ms2.internal,1433;user id=u;password=pw-canary;database=orders;encrypt=false",
        ));
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w.iter().any(|w| w.contains("shard a database profiles uri (db.internal:27017,127.0.0.1:27018/p): MongoDB TLS without certificate checks")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.contains("database orders primary (ms.internal:1433/orders): encrypt=required with trust_server_certificate=true does not verify")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.contains("database orders replica 0 (ms2.internal:1433/orders): encrypt=off")),
            "{w:?}"
        );
        assert!(!w.iter().any(|w| w.contains("pw-canary")), "{w:?}");
        // Verified, or loopback only: nothing to say.
        let w = tls_warnings(&map(
            "mongodb://u:pw@db.internal/p?tls=true&tlsCAFile=/ca.pem",
            "sqlserver://u:pw@ms.internal/orders?ca_file=/ca.pem",
            "sqlserver://u:pw@127.0.0.1/orders?encrypt=not_supported",
        ));
        assert!(w.is_empty(), "{w:?}");
        let w = tls_warnings(&map(
            "mongodb://localhost/p",
            "sqlserver://u:pw@[::1]/o?encrypt=off",
            "sqlserver://u:pw@localhost/o",
        ));
        assert!(w.is_empty(), "{w:?}");
        // SRV resolves elsewhere: remote; a URI the driver refuses is reported.
        let w = tls_warnings(&map(
            "mongodb+srv://u:pw@cluster0.example.net/p?tls=false",
            "sqlserver://u:pw@localhost/o",
            "sqlserver://u:pw@localhost/o",
        ));
        assert!(w.len() == 1 && w[0].contains("srv:cluster0.example.net/p): MongoDB without TLS"), "{w:?}");
        let w = tls_warnings(&map(
            "mongodb://u:pw-canary@db.internal/p?tlsAllowInvalidHostnames=true",
            "sqlserver://u:pw@localhost/o",
            "sqlserver://u:pw@localhost/o",
        ));
        assert!(w.len() == 1 && w[0].contains("tlsAllowInvalidHostnames is not supported"), "{w:?}");
    }

    #[test]
    fn token_file_holds_the_bare_token_or_an_authorization_header() {
        assert_eq!(token_from_file("demo-abc\n").unwrap(), "demo-abc");
        assert_eq!(token_from_file("  demo-abc  \r\n\n").unwrap(), "demo-abc");
        // The demo's $WORK/auth.header, as `curl -H @FILE` reads it.
        assert_eq!(token_from_file("authorization: Bearer demo-abc\n").unwrap(), "demo-abc");
        assert_eq!(token_from_file("Authorization:bearer   demo-abc\r\n").unwrap(), "demo-abc");
        // Other headers next to it are ignored.
        assert_eq!(token_from_file("accept: application/json\nAUTHORIZATION: BEARER t1\n").unwrap(), "t1");
    }

    #[test]
    fn token_file_errors_never_quote_the_secret() {
        for bad in [
            "",
            "\n\n",
            "two\nlines\n",
            "a token with spaces",
            "authorization: Basic c2VjcmV0\n",
            "authorization: Bearer\n",
            "authorization: Bearer a b\n",
            "authorization: Bearer t1\nauthorization: Bearer t2\n",
            "x-other: secret\n",
        ] {
            let e = token_from_file(bad).expect_err(bad);
            for word in ["secret", "c2VjcmV0", "t1", "t2", "lines"] {
                assert!(!e.contains(word), "{bad:?}: {e}");
            }
        }
    }

    #[test]
    fn token_file_replaces_token_and_env() {
        let dir = std::env::temp_dir().join(format!("cellgate-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("auth.header");
        std::fs::write(&f, "authorization: Bearer from-file\n").unwrap();
        assert_eq!(admin_token(Some("flag".into()), Some(&f)).unwrap().as_deref(), Some("from-file"));
        assert_eq!(admin_token(Some("flag".into()), None).unwrap().as_deref(), Some("flag"));
        assert_eq!(admin_token(None, None).unwrap(), None);
        let missing = dir.join("missing");
        assert!(admin_token(None, Some(&missing)).unwrap_err().contains("--token-file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wait_ends_on_done_on_other_terminal_states_and_on_a_stopped_migration() {
        use crate::migrate::{Doc, State};
        let mut d: Doc = serde_json::from_value(serde_json::json!({
            "id": "m1", "state": "copying", "cells": [], "from": "a", "to": "b", "tables": [],
            "rows_copied": 0, "lag_bytes": null, "hold_ms": 1, "hold_ms_max": null,
            "map_version_before": 1, "map_version_after": null, "error": null, "fenced": false
        }))
        .unwrap();
        d.running = true;
        for s in [State::Planned, State::Copying, State::CatchingUp, State::Cutover, State::Aborting] {
            d.state = s;
            assert_eq!(wait_outcome(&d), None, "{s}");
        }
        d.state = State::Done;
        assert_eq!(wait_outcome(&d), Some(true));
        for s in [State::Aborted, State::Failed] {
            d.state = s;
            assert_eq!(wait_outcome(&d), Some(false), "{s}");
        }
        // Stopped after its fence with no task: it needs `resume` or `abort`, so waiting ends.
        d.state = State::Cutover;
        d.running = false;
        assert_eq!(wait_outcome(&d), Some(false));
    }

    /// A one-connection HTTP server answering `status_line`; its base URL.
    fn answer_once(status_line: &'static str) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = write!(c, "HTTP/1.1 {status_line}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        });
        url
    }

    #[test]
    fn healthcheck_passes_only_on_200() {
        let rt = runtime().unwrap();
        let t = Duration::from_secs(2);
        assert_eq!(rt.block_on(livez(&answer_once("200 OK"), t)), Ok(()));
        assert!(rt.block_on(livez(&answer_once("503 Service Unavailable"), t)).unwrap_err().contains("503"));
        // Nothing listening: a closed port fails, it does not hang.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(rt.block_on(livez(&format!("http://{closed}"), t)).is_err());
        let cli = Cli::try_parse_from(["cellgate", "healthcheck"]).unwrap();
        assert!(
            matches!(cli.command, Command::Healthcheck { ref admin, timeout_ms: 2000 } if admin == "http://127.0.0.1:9090")
        );
    }

    #[test]
    fn migrate_start_takes_wait_and_a_global_token_file() {
        let cli = Cli::try_parse_from([
            "cellgate",
            "migrate",
            "--admin",
            "http://127.0.0.1:1",
            "--token-file",
            "/tmp/auth.header",
            "start",
            "--wait",
            "--to",
            "am-1",
            "8130bffffffffff",
        ])
        .unwrap();
        let Command::Migrate { token_file, action: MigrateAction::Start { wait, to, cells, hold_ms }, .. } =
            cli.command
        else {
            panic!("not migrate start");
        };
        assert_eq!(token_file.as_deref(), Some(Path::new("/tmp/auth.header")));
        assert!(wait);
        assert_eq!((to.as_str(), cells.as_slice(), hold_ms), ("am-1", &["8130bffffffffff".to_string()][..], 2000));
        // The global option also goes after the subcommand.
        let cli = Cli::try_parse_from(["cellgate", "migrate", "status", "--token-file", "f"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Migrate { token_file: Some(_), action: MigrateAction::Status { id: None }, .. }
        ));
    }

    #[test]
    fn wait_timeouts_parse_with_units() {
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "0s", "5h", "s", "-1s", "1.5s"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn map_push_takes_admin_or_etcd_and_wait_only_with_etcd() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["cellgate", "map", "push", "m.toml"], args].concat());
        assert!(parse(&["--admin", "http://a:1"]).is_ok());
        assert!(parse(&[]).is_err(), "needs --admin or --etcd");
        assert!(parse(&["--admin", "http://a:1", "--etcd", "http://e:1", "--prefix", "/p"]).is_err());
        assert!(parse(&["--etcd", "http://e:1"]).is_err(), "--etcd needs --prefix");
        assert!(parse(&["--admin", "http://a:1", "--wait"]).is_err(), "--wait is fleet mode only");
        let Command::Map(MapCommand::Push { etcd, prefix, wait, .. }) =
            parse(&["--etcd", "http://e:1,http://e:2", "--prefix", "/p", "--wait"]).expect("valid").command
        else {
            panic!("not a push")
        };
        assert_eq!((etcd.len(), prefix.as_deref(), wait.as_deref()), (2, Some("/p"), Some("30s")));
        let Command::Map(MapCommand::Push { wait, .. }) =
            parse(&["--etcd", "http://e:1", "--prefix", "/p", "--wait=5s"]).expect("valid").command
        else {
            panic!("not a push")
        };
        assert_eq!(wait.as_deref(), Some("5s"));
    }

    #[test]
    fn etcd_access_flags_are_checked_before_anything_is_dialled() {
        let none = EtcdAccessArgs::default();
        let eps = |e: &[&str]| e.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let t = etcd_target(&eps(&["http://e:1"]), "/p", 100, &none).expect("plain");
        assert!(!t.access.tls() && t.access.user.is_none());
        let err = etcd_target(&eps(&["https://e:1"]), "/p", 100, &none).expect_err("https without a CA");
        assert!(err.contains("--etcd-ca: https endpoints need"), "{err}");
        let ca = EtcdAccessArgs { etcd_ca: Some("/ca.pem".into()), ..Default::default() };
        let err = etcd_target(&eps(&["http://e:1"]), "/p", 100, &ca).expect_err("CA with http");
        assert!(err.contains("https:// endpoints only"), "{err}");
        let err = etcd_target(&eps(&["https://root:pw@e:1"]), "/p", 100, &ca).expect_err("user info");
        assert!(err.contains("user info") && !err.contains("pw@"), "{err}");
        // A password file that is not private is refused, naming the file, never its content.
        let dir = std::env::temp_dir().join(format!("cellgate-cli-etcd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pw = dir.join("pw");
        std::fs::write(&pw, "hunter2-etcd\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let user = EtcdAccessArgs {
            etcd_user: Some("root".into()),
            etcd_password_file: Some(pw.clone()),
            ..Default::default()
        };
        let err = etcd_target(&eps(&["http://e:1"]), "/p", 100, &user).expect_err("world-readable");
        assert!(err.contains("--etcd-password-file") && err.contains("mode 0644") && !err.contains("hunter2"), "{err}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let t = etcd_target(&eps(&["http://e:1"]), "/p", 100, &user).expect("valid");
        assert_eq!(t.access.password.as_deref(), Some("hunter2-etcd"));
        assert!(!format!("{t:?}").contains("hunter2"), "the password in the target's debug form");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
