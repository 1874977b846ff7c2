//! Command-line interface (design §4): argument types and the offline commands (`map`, `locate`).
//! Must not start servers itself: `serve` is handed to the server module.

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Live migration of cells between PostgreSQL shards (admin API).
    Migrate {
        /// Admin base URL, e.g. http://127.0.0.1:9090
        #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Admin token (or CELLGATE_ADMIN_TOKEN).
        #[arg(long, global = true, env = "CELLGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
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

/// `cellgate migrate ...`: one admin API call, the JSON answer printed; exit 1 unless 2xx.
pub fn migrate(admin: &str, token: Option<&str>, action: &MigrateAction) -> ExitCode {
    let (method, path, body) = match action {
        MigrateAction::Start { to, hold_ms, cells } => (
            http::Method::POST,
            "/admin/migrations".to_string(),
            serde_json::json!({"cells": cells, "to": to, "hold_ms": hold_ms}).to_string(),
        ),
        MigrateAction::Status { id: None } => (http::Method::GET, "/admin/migrations".to_string(), String::new()),
        MigrateAction::Status { id: Some(id) } => (http::Method::GET, format!("/admin/migrations/{id}"), String::new()),
        MigrateAction::Abort { id } => (http::Method::POST, format!("/admin/migrations/{id}/abort"), String::new()),
        MigrateAction::Resume { id } => (http::Method::POST, format!("/admin/migrations/{id}/resume"), String::new()),
    };
    let status = matches!(action, MigrateAction::Status { .. });
    admin_call_then(admin, method, &path, "application/json", body, token, |answer| {
        if status {
            print_next_steps(answer);
        }
    })
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
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(crate::fleet::call(
        admin,
        method,
        path,
        content_type,
        bytes::Bytes::from(body),
        token,
        std::time::Duration::from_secs(120),
    ));
    match r {
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
    /// Publish a map on a running instance (PUT /admin/map); prints the outcome, exit 1 unless published.
    Push {
        file: PathBuf,
        /// Admin base URL, e.g. http://127.0.0.1:9090
        #[arg(long)]
        admin: String,
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
            Ok(m) => println!(
                "{}: ok (version {}, resolution {}, {} shards, {} assigned cells)",
                f.display(),
                m.version(),
                u8::from(m.resolution()),
                m.shards().len(),
                m.assigned_count()
            ),
            Err(e) => {
                failed = true;
                eprintln!("{e}");
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
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
