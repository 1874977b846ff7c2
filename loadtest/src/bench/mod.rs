//! `cellgate-bench`: the benchmark runner of the load-and-performance issue (see
//! loadtest/bench/README.md). Starts a loopback cluster with the harness, loads pgbench's
//! accounts, starts the release cellgate as a separate process per part, and measures:
//!
//! * pairs (G1–G3): alternating direct (pgbench -S, tokio-postgres) and proxied (h2load,
//!   hyper HTTP/1.1) point reads at the same concurrency, then a rate-limited pass of each at half
//!   the pair's direct ceiling;
//! * streams (G4): h2load with 100 connections × 1,000 streams against a saturated pool;
//! * g7: point reads and area searches at a fixed offered rate while 100,000 other streams are
//!   parked inside cellgate;
//! * cache (opt-in, `--cache`): L1 and L2 hits of a cached point read next to direct
//!   `pgbench -S` and the uncached proxied read, on a Redis the runner starts (cache.rs);
//! * tls (opt-in, `--tls`): the proxied point read with HTTPS clients and/or TLS to PostgreSQL
//!   as ratios to cleartext, and TLS handshakes per second per cellgate core (tls.rs).
//!
//! Writes a markdown report and an SVG chart. Every child is stopped by PID at the end, also on
//! error and Ctrl-C; the cluster cleans up on drop.

pub mod args;
pub mod cache;
pub mod clients;
pub mod procs;
pub mod report;
pub mod setup;
pub mod stats;
pub mod svg;
pub mod tls;
pub mod tools;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use cellgate_harness::Cluster;

use args::{Args, Part};
use procs::{Sampler, Samples};
use setup::{Cellgate, Profile};
use stats::{H2Summary, Lat};

/// One measured run.
#[derive(Debug, Clone)]
pub struct Run {
    pub tool: &'static str,
    pub direct: bool,
    /// Offered total rate (rate-limited runs).
    pub offered: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub lat: Lat,
    pub cpu_us_per_req: Option<f64>,
    pub samples: Samples,
    pub command: String,
}

impl Run {
    pub fn noisy(&self, threshold: f64) -> bool {
        self.samples.noise.cores() > threshold
    }
}

/// One alternating pair: direct runs, then proxied runs, then both at half the direct ceiling.
#[derive(Debug, Clone)]
pub struct Pair {
    pub idx: usize,
    pub pgbench: Run,
    pub tokio_pg: Run,
    pub h2load: Run,
    pub hyper: Run,
    pub pgbench_half: Run,
    pub h2load_half: Run,
}

impl Pair {
    pub fn runs(&self) -> [&Run; 6] {
        [&self.pgbench, &self.tokio_pg, &self.h2load, &self.hyper, &self.pgbench_half, &self.h2load_half]
    }
    pub fn noisy(&self, threshold: f64) -> bool {
        self.runs().iter().any(|r| r.noisy(threshold))
    }
    pub fn g1(&self) -> f64 {
        self.h2load.rps / self.pgbench.rps
    }
    pub fn g1_rust(&self) -> f64 {
        self.hyper.rps / self.tokio_pg.rps
    }
    pub fn g2(&self) -> f64 {
        self.h2load.cpu_us_per_req.unwrap_or(f64::NAN)
    }
    pub fn added_p50_full(&self) -> f64 {
        self.h2load.lat.p50 - self.pgbench.lat.p50
    }
    pub fn added_p50_half(&self) -> f64 {
        self.h2load_half.lat.p50 - self.pgbench_half.lat.p50
    }
    pub fn p99_ratio_half(&self) -> f64 {
        self.h2load_half.lat.p99 / self.pgbench_half.lat.p99
    }
    /// The proxied rate-limited run did not reach 95 % of the offered rate.
    pub fn half_saturated(&self) -> bool {
        self.h2load_half.offered.is_some_and(|o| self.h2load_half.rps < 0.95 * o)
    }
}

pub struct PairsOut {
    pub pairs: Vec<Pair>,
    pub config: String,
    pub warmup: String,
}

pub struct StreamsOut {
    pub summary: H2Summary,
    pub lat: Lat,
    pub peak_concurrency: u64,
    pub nominal_streams: u64,
    pub idle_rss_kib: u64,
    pub peak_rss_kib: u64,
    pub idle_fds: u64,
    pub peak_fds: u64,
    pub cpu_us_per_req: Option<f64>,
    pub nofile: Option<(String, String)>,
    pub noise: procs::Noise,
    pub command: String,
    pub config: String,
}

impl StreamsOut {
    pub fn bytes_per_stream(&self) -> f64 {
        (self.peak_rss_kib.saturating_sub(self.idle_rss_kib)) as f64 * 1024.0 / self.nominal_streams as f64
    }
}

/// One offered-load pass of G7.
pub struct G7Load {
    pub tag: &'static str,
    pub point: (H2Summary, Lat),
    pub area: Option<(H2Summary, Lat)>,
    pub samples: Samples,
    pub commands: Vec<String>,
}

pub struct G7Out {
    pub holders: u64,
    pub holders_alive: bool,
    pub holders_finished: u64,
    /// cellgate went idle after the holders arrived (else the wait timed out).
    pub parked: bool,
    pub rss_idle_kib: u64,
    pub rss_holders_kib: u64,
    pub ramp_secs: f64,
    pub offered_point: f64,
    pub offered_area: f64,
    pub baseline: G7Load,
    pub with: G7Load,
    pub area_shards: String,
    pub holder_command: String,
    pub config: String,
}

/// Everything the report needs.
pub struct Ctx {
    pub args: Args,
    pub argv: Vec<String>,
    pub cellgate: String,
    pub h2load: String,
    pub pgbench: String,
    pub work: PathBuf,
    pub token: String,
    pub hash: String,
    pub postmasters: Vec<u32>,
    pub accounts: i64,
    pub nofile: (u64, u64),
    pub started: SystemTime,
    pub shards: usize,
    pub map: PathBuf,
    pub owner_index: usize,
    pub replica_port: u16,
    pub load_commands: Vec<String>,
}

impl Ctx {
    fn roots(&self, cg: Option<&Cellgate>) -> Vec<u32> {
        let mut r = vec![std::process::id()];
        r.extend(&self.postmasters);
        r.extend(cg.map(|c| c.pid()));
        r
    }
    fn show(&self, program: &str, args: &[String]) -> String {
        tools::show(program, args, &self.work, &self.token)
    }
    fn url(&self, cg: &Cellgate) -> String {
        format!("{}://{}/v1/sql/core/query", cg.scheme, cg.data)
    }
    fn body(&self, name: &str, text: &str) -> Result<PathBuf, String> {
        let p = self.work.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    }
}

/// Run `f` while sampling cellgate and the machine; returns its value, cellgate's CPU time (µs)
/// spent meanwhile and the samples.
async fn measure<T>(
    ctx: &Ctx,
    cg: Option<&Cellgate>,
    interval: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<(T, Option<f64>, Samples), String> {
    let sampler = Sampler::start(cg.map(|c| c.pid()), ctx.roots(cg), interval);
    let cpu0 = cg.and_then(|c| procs::cpu_us(c.pid()));
    let r = f.await;
    let cpu1 = cg.and_then(|c| procs::cpu_us(c.pid()));
    let samples = sampler.finish();
    let v = r?;
    Ok((v, cpu0.zip(cpu1).map(|(a, b)| b - a), samples))
}

/// A pgbench run (unthrottled, or at the `offered` rate) as a report row.
fn pgbench_run(
    ctx: &Ctx,
    tool: &'static str,
    offered: Option<f64>,
    r: tools::PgbenchResult,
    cpu: Option<f64>,
    samples: Samples,
) -> Run {
    Run {
        tool,
        direct: true,
        offered,
        requests: r.lat.n,
        errors: r.failed,
        rps: r.tps,
        lat: r.lat,
        cpu_us_per_req: per_req(cpu, r.lat.n),
        samples,
        command: ctx.show(&ctx.pgbench, &r.args),
    }
}

fn per_req(cpu: Option<f64>, n: u64) -> Option<f64> {
    cpu.map(|c| c / n.max(1) as f64)
}

fn say(msg: &str) {
    eprintln!("cellgate-bench: {msg}");
}

pub fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match args::parse(argv.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cellgate-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if args.help {
        print!("{}", args::HELP);
        return ExitCode::SUCCESS;
    }
    let nofile = procs::raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cellgate-bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t = Instant::now();
    let result = rt.block_on(async {
        tokio::select! {
            r = run(args, argv, nofile) => r,
            s = interrupted() => Err(format!("interrupted by {s}: stopped cellgate, the load generators and the cluster")),
        }
    });
    drop(rt);
    match result {
        Ok(()) => {
            say(&format!("done in {:.0} s", t.elapsed().as_secs_f64()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cellgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Removes the work directory on drop unless asked to keep it.
struct WorkDir(PathBuf, bool);
impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("cellgate-bench: work directory kept: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn run(args: Args, argv: Vec<String>, nofile: (u64, u64)) -> Result<(), String> {
    let started = SystemTime::now();
    let t0 = Instant::now();
    // Programs first: fail before starting anything.
    let h2load = procs::find_program("H2LOAD", "h2load", &["/usr/bin/h2load"])
        .ok_or("h2load not found (Debian: apt-get install -y nghttp2-client; or set H2LOAD=/path/to/h2load)")?;
    let pgbench = procs::find_program("PGBENCH", "pgbench", &["/usr/bin/pgbench"])
        .ok_or("pgbench not found (Debian: apt-get install -y postgresql-contrib or postgresql; or set PGBENCH)")?;
    if args.has(Part::Cache)
        && procs::find_program("REDIS_SERVER", "redis-server", &["/usr/bin/redis-server"]).is_none()
    {
        return Err("redis-server not found (Debian: apt-get install -y redis-server; or set REDIS_SERVER)".into());
    }
    if args.build {
        say("cargo build --release -p cellgate");
        let st = std::process::Command::new("cargo")
            .args(["build", "--release", "-p", "cellgate"])
            .current_dir(args::workspace())
            .status()
            .map_err(|e| format!("cargo: {e}"))?;
        if !st.success() {
            return Err("cargo build --release -p cellgate failed".into());
        }
    }
    let cellgate = std::env::var("CELLGATE_BIN")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}/target/release/cellgate", args::workspace()));
    if !Path::new(&cellgate).is_file() {
        return Err(format!(
            "{cellgate} does not exist: run `cargo build --release -p cellgate` (or --build), or set CELLGATE_BIN"
        ));
    }
    let work = std::env::temp_dir().join(format!("cellgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let _work_guard = WorkDir(work.clone(), args.keep_work);

    let shards = if args.has(Part::G7) { 3 } else { 1 };
    say(&format!("starting the cluster: {shards} shard(s) × (primary + 1 replica)"));
    let cluster: Cluster = tokio::task::spawn_blocking(move || setup::start_cluster(shards))
        .await
        .map_err(|e| format!("cluster start panicked: {e}"))??;
    say(&format!("pgbench -i -s {} on every primary", args.scale));
    let load_commands = setup::load_pgbench(&cluster, &pgbench, args.scale).await?;
    let map = setup::write_map(&cluster, &work)?;
    let located = setup::locate(&cellgate, &map, None)?;
    let owner = located["shard"].as_str().ok_or("locate: the point has no shard")?.to_string();
    let owner_index: usize = owner.trim_start_matches('s').parse().map_err(|_| format!("locate: shard {owner}"))?;
    let token = setup::new_token()?;
    let hash = setup::token_hash(&cellgate, &token)?;
    let ctx = Ctx {
        replica_port: cluster.shards[owner_index].replicas[0].port,
        postmasters: setup::postmaster_pids(&cluster),
        accounts: 100_000 * args.scale as i64,
        args: args.clone(),
        argv,
        cellgate,
        h2load,
        pgbench,
        work,
        token,
        hash,
        nofile,
        started,
        shards,
        map,
        owner_index,
        load_commands,
    };

    let pairs = if args.has(Part::Pairs) { Some(run_pairs(&ctx).await?) } else { None };
    let streams = if args.has(Part::Streams) { Some(run_streams(&ctx).await?) } else { None };
    let g7 = if args.has(Part::G7) { Some(run_g7(&ctx).await?) } else { None };
    let cache = if args.has(Part::Cache) { Some(cache::run_cache(&ctx, &cluster).await?) } else { None };
    // Last: it turns ssl on in the cluster (pgbench's default sslmode=prefer would then use TLS).
    let tls = if args.has(Part::Tls) { Some(tls::run_tls(&ctx, &cluster).await?) } else { None };

    let elapsed = t0.elapsed();
    let mut files = Vec::new();
    let report = report::Report { ctx: &ctx, pairs: pairs.as_ref(), streams: streams.as_ref(), g7: g7.as_ref() };
    if args.main_report() {
        let (md, chart) = report.render(&cluster, elapsed);
        files.push((&args.out, md));
        files.push((&args.svg, chart));
    }
    if let Some(c) = &cache {
        files.push((&args.cache_out, cache::render(&ctx, &cluster, c, elapsed)));
    }
    if let Some(t) = &tls {
        files.push((&args.tls_out, tls::render(&ctx, &cluster, t, elapsed)));
    }
    for (path, text) in files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        say(&format!("wrote {}", path.display()));
    }
    if args.main_report() {
        println!("{}", report.summary_lines().join("\n"));
    }
    if let Some(c) = &cache {
        println!("{}", cache::summary_lines(&ctx, c).join("\n"));
    }
    if let Some(t) = &tls {
        println!("{}", tls::summary_lines(&ctx, t).join("\n"));
    }
    say("stopping the cluster");
    tokio::task::spawn_blocking(move || cluster.stop()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    Ok(())
}

fn h2_run(
    tool: &'static str,
    offered: Option<f64>,
    r: &tools::H2Result,
    cpu: Option<f64>,
    s: Samples,
    cmd: String,
) -> Run {
    let lat: Vec<u64> = r.entries.iter().filter(|e| (200..300).contains(&e.status)).map(|e| e.dur_us).collect();
    let done = r.summary.done.max(1);
    Run {
        tool,
        direct: false,
        offered,
        requests: r.summary.succeeded,
        errors: r.summary.failed + r.summary.errored + r.summary.timeout,
        rps: r.summary.s2xx as f64 / r.summary.secs.max(1e-9),
        lat: stats::summarize(lat),
        cpu_us_per_req: per_req(cpu, done),
        samples: s,
        command: cmd,
    }
}

async fn run_pairs(ctx: &Ctx) -> Result<PairsOut, String> {
    let a = &ctx.args;
    let profile = Profile {
        name: "pairs",
        pool_max: a.concurrency,
        max_in_flight: 100_000,
        request_timeout_ms: 5000,
        checkout_timeout_ms: 2000,
    };
    let cg = setup::start_cellgate(&ctx.cellgate, &ctx.work, &ctx.map, &profile, &ctx.hash)?;
    let body = ctx.body("point.json", &clients::point_body(setup::POINT.0, setup::POINT.1, 4242))?;
    setup::preflight(&cg, &ctx.token, &clients::point_body(setup::POINT.0, setup::POINT.1, 4242))?;
    let replica_url =
        format!("postgres://{}:{}@127.0.0.1:{}/core", setup::APP_USER, setup::APP_PASSWORD, ctx.replica_port);
    let secs = a.secs;
    let c = a.concurrency;
    let pg = |rate: Option<f64>, secs: u64, dir: &str| tools::Pgbench {
        bin: &ctx.pgbench,
        port: ctx.replica_port,
        user: setup::APP_USER,
        password: setup::APP_PASSWORD,
        clients: c,
        threads: a.client_threads,
        secs,
        rate,
        dir: ctx.work.join(dir),
    };
    let h2 = |rps_total: Option<f64>, secs: u64, log: &str| tools::H2load {
        bin: &ctx.h2load,
        url: ctx.url(&cg),
        body: body.clone(),
        token: &ctx.token,
        clients: c,
        streams: 1,
        threads: a.client_threads,
        h1: !a.h2c,
        headers: Vec::new(),
        secs: Some(secs),
        requests: None,
        rps_per_client: rps_total.map(|r| r / c as f64),
        log: Some(ctx.work.join(log)),
        limit: Duration::from_secs(secs + 60),
    };
    // Warm both paths (pools, caches, prepared statements); not recorded.
    say("warm-up (2 s each path)");
    pg(None, 2, "warm-pg").run().await?;
    h2(None, 2, "warm-h2.log").run().await?;
    let warmup = "pgbench and h2load, 2 s each, same options, not recorded".to_string();
    let iv = Duration::from_millis(250);
    let mut pairs = Vec::new();
    for i in 1..=a.pairs {
        say(&format!("pair {i}/{}: direct (pgbench, tokio-postgres)", a.pairs));
        let p = pg(None, secs, "pg");
        let (r, cpu, s) = measure(ctx, Some(&cg), iv, p.run()).await?;
        let pgbench = pgbench_run(ctx, "pgbench -S", None, r, cpu, s);
        let (t, _, s) =
            measure(ctx, Some(&cg), iv, clients::direct(&replica_url, c, Duration::from_secs(secs), ctx.accounts))
                .await?;
        let tokio_pg = Run {
            tool: "tokio-postgres",
            direct: true,
            offered: None,
            requests: t.lat.len() as u64,
            errors: t.errors,
            rps: t.lat.len() as f64 / t.secs,
            lat: stats::summarize(t.lat),
            cpu_us_per_req: None,
            samples: s,
            command: format!(
                "in-process: {c} tokio-postgres connections, prepared `{}`, random aid",
                clients::POINT_SQL
            ),
        };
        say(&format!("pair {i}/{}: proxied (h2load, hyper)", a.pairs));
        let hl = h2(None, secs, "h2.log");
        let (r, cpu, s) = measure(ctx, Some(&cg), iv, hl.run()).await?;
        let h2load = h2_run("h2load", None, &r, cpu, s, ctx.show(&ctx.h2load, &r.args));
        let (t, cpu, s) = measure(
            ctx,
            Some(&cg),
            iv,
            clients::proxied(&cg.data, &ctx.token, c, Duration::from_secs(secs), ctx.accounts, setup::POINT),
        )
        .await?;
        let n = t.lat.len() as u64;
        let hyper = Run {
            tool: "hyper h1",
            direct: false,
            offered: None,
            requests: n,
            errors: t.errors,
            rps: n as f64 / t.secs,
            lat: stats::summarize(t.lat),
            cpu_us_per_req: per_req(cpu, n + t.errors),
            samples: s,
            command: format!("in-process: {c} HTTP/1.1 keep-alive connections (hyper), same point read, random aid"),
        };
        let half = pgbench.rps * 0.5;
        say(&format!("pair {i}/{}: both at 50 % of the direct ceiling ({half:.0}/s)", a.pairs));
        let p = pg(Some(half), secs, "pg-half");
        let (r, cpu, s) = measure(ctx, Some(&cg), iv, p.run()).await?;
        let pgbench_half = pgbench_run(ctx, "pgbench -S -R", Some(half), r, cpu, s);
        let hl = h2(Some(half), secs, "h2-half.log");
        let (r, cpu, s) = measure(ctx, Some(&cg), iv, hl.run()).await?;
        let h2load_half = h2_run("h2load --rps", Some(half), &r, cpu, s, ctx.show(&ctx.h2load, &r.args));
        let pair = Pair { idx: i, pgbench, tokio_pg, h2load, hyper, pgbench_half, h2load_half };
        say(&format!(
            "pair {i}: G1 {:.2}, G2 {:.1} µs, added p50 @50% {:.0} µs, p99 ratio @50% {:.2}{}",
            pair.g1(),
            pair.g2(),
            pair.added_p50_half(),
            pair.p99_ratio_half(),
            if pair.noisy(a.noise_threshold) { " (noisy)" } else { "" }
        ));
        pairs.push(pair);
    }
    Ok(PairsOut { pairs, config: cg.config.clone(), warmup })
}

async fn run_streams(ctx: &Ctx) -> Result<StreamsOut, String> {
    let a = &ctx.args;
    let nominal = (a.streams_connections * a.streams_per_conn) as u64;
    let profile = Profile {
        name: "streams",
        pool_max: a.streams_pool,
        max_in_flight: nominal.max(100_000),
        request_timeout_ms: 60_000,
        checkout_timeout_ms: 60_000,
    };
    let cg = setup::start_cellgate(&ctx.cellgate, &ctx.work, &ctx.map, &profile, &ctx.hash)?;
    let body_text = clients::point_body(setup::POINT.0, setup::POINT.1, 4242);
    let body = ctx.body("point.json", &body_text)?;
    setup::preflight(&cg, &ctx.token, &body_text)?;
    let h2 = |clients: usize, streams: usize, n: u64, log: Option<PathBuf>, limit: u64| tools::H2load {
        bin: &ctx.h2load,
        url: ctx.url(&cg),
        body: body.clone(),
        token: &ctx.token,
        clients,
        streams,
        threads: a.client_threads,
        h1: false,
        headers: Vec::new(),
        secs: None,
        requests: Some(n),
        rps_per_client: None,
        log,
        limit: Duration::from_secs(limit),
    };
    say("streams: warm-up (h2c, 8 × 8, 5,000 requests)");
    h2(8, 8, 5000, None, 60).run().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = setup::rss_kib(&cg);
    let idle_fds = procs::fd_count(cg.pid()).unwrap_or(0);
    say(&format!(
        "streams: h2load h2c -c {} -m {} -n {} against pool.max_size {}",
        a.streams_connections, a.streams_per_conn, a.streams_requests, a.streams_pool
    ));
    let run =
        h2(a.streams_connections, a.streams_per_conn, a.streams_requests, Some(ctx.work.join("streams.log")), 600);
    let (r, cpu, s) = measure(ctx, Some(&cg), Duration::from_millis(50), run.run()).await?;
    let hwm = procs::status_kib(cg.pid(), "VmHWM").unwrap_or(0);
    let nofile = procs::nofile_limit(cg.pid());
    let peak_concurrency = stats::peak_concurrency(&r.entries);
    let lat = stats::summarize(r.entries.iter().map(|e| e.dur_us).collect());
    Ok(StreamsOut {
        peak_rss_kib: hwm.max(s.rss_max_kib.unwrap_or(0)),
        peak_fds: s.fds_max.unwrap_or(0),
        summary: r.summary.clone(),
        lat,
        peak_concurrency,
        nominal_streams: nominal,
        idle_rss_kib: idle_rss,
        idle_fds,
        cpu_us_per_req: per_req(cpu, r.summary.done),
        nofile,
        noise: s.noise,
        command: ctx.show(&ctx.h2load, &r.args),
        config: cg.config.clone(),
    })
}

async fn run_g7(ctx: &Ctx) -> Result<G7Out, String> {
    let a = &ctx.args;
    let holders = (a.streams_connections * a.streams_per_conn) as u64;
    let profile = Profile {
        name: "g7",
        pool_max: a.concurrency,
        max_in_flight: holders + 50_000,
        request_timeout_ms: 60_000,
        checkout_timeout_ms: 60_000,
    };
    let cg = setup::start_cellgate(&ctx.cellgate, &ctx.work, &ctx.map, &profile, &ctx.hash)?;
    let (lat, lng) = setup::POINT;
    let point_text = clients::point_body(lat, lng, 4242);
    let area_text = format!(
        r#"{{"region":{{"lat":{lat},"lng":{lng},"radius_km":{}}},"sql":"SELECT aid, abalance FROM pgbench_accounts WHERE aid BETWEEN $1 AND $2 ORDER BY aid","params":[4242,4251],"row_format":"array","merge":{{"order_by":[{{"column":"aid"}}],"limit":10}}}}"#,
        a.g7_radius_km
    );
    let hold_text = |secs: u64| {
        format!(
            r#"{{"region":{{"lat":{lat},"lng":{lng}}},"sql":"SELECT 1 AS x FROM pg_sleep({secs})","consistency":"primary","row_format":"array"}}"#
        )
    };
    let area_shards = setup::locate(&ctx.cellgate, &ctx.map, Some(a.g7_radius_km))?;
    let area_shards = format!("{} cells at R=5 on shards {}", area_shards["cells"], area_shards["shards"]);
    setup::preflight(&cg, &ctx.token, &point_text)?;
    setup::preflight(&cg, &ctx.token, &area_text)?;
    setup::preflight(&cg, &ctx.token, &hold_text(0))?;
    let point = ctx.body("g7-point.json", &point_text)?;
    let area = ctx.body("g7-area.json", &area_text)?;
    // Holders: sleep on the owner's primary until shortly before the request timeout, so none
    // finishes during the measurement; all but pool.max_size of them wait for a connection.
    let hold = ctx.body("g7-hold.json", &hold_text(55))?;
    let h2 = |body: &Path, clients: usize, streams: usize, rps_total: Option<f64>, log: Option<&str>| tools::H2load {
        bin: &ctx.h2load,
        url: ctx.url(&cg),
        body: body.to_path_buf(),
        token: &ctx.token,
        clients,
        streams,
        threads: 1,
        h1: false,
        headers: Vec::new(),
        secs: Some(a.g7_secs),
        requests: None,
        rps_per_client: rps_total.map(|r| r / clients as f64),
        log: log.map(|l| ctx.work.join(l)),
        limit: Duration::from_secs(a.g7_secs + 60),
    };
    say("g7: warm-up (2 s of point reads and area searches)");
    let mut w = h2(&point, 8, 8, None, Some("g7-warm.log"));
    w.secs = Some(2);
    w.run().await?;
    let mut w = h2(&area, 4, 8, None, Some("g7-warm-area.log"));
    w.secs = Some(2);
    w.run().await?;
    let offered_area = a.g7_rps * a.g7_area_share;
    let offered_point = a.g7_rps - offered_area;
    let point_clients = ((offered_point / 500.0).ceil() as usize).clamp(1, 50);
    let area_clients = ((offered_area / 250.0).ceil() as usize).clamp(1, 20);
    // The same offered load twice: without and with the parked streams.
    let offered = |tag: &'static str| {
        let pt = h2(&point, point_clients, 32, Some(offered_point), Some("g7-point.log"));
        let ar = h2(&area, area_clients, 32, Some(offered_area), Some("g7-area.log"));
        let cg = &cg;
        async move {
            let both = async {
                if offered_area > 0.0 {
                    let (p, r) = tokio::join!(pt.run(), ar.run());
                    Ok((p?, Some(r?)))
                } else {
                    Ok((pt.run().await?, None))
                }
            };
            let ((p, r), _, samples) = measure(ctx, Some(cg), Duration::from_millis(100), both).await?;
            let lat_of = |r: &tools::H2Result| {
                stats::summarize(
                    r.entries.iter().filter(|e| (200..300).contains(&e.status)).map(|e| e.dur_us).collect(),
                )
            };
            let mut commands = vec![ctx.show(&ctx.h2load, &p.args)];
            if let Some(r) = &r {
                commands.push(ctx.show(&ctx.h2load, &r.args));
            }
            Ok::<_, String>(G7Load {
                tag,
                point: (p.summary.clone(), lat_of(&p)),
                area: r.as_ref().map(|r| (r.summary.clone(), lat_of(r))),
                samples,
                commands,
            })
        }
    };
    say(&format!(
        "g7: baseline without parked streams: {offered_point:.0} point reads/s + {offered_area:.0} area searches/s for {} s",
        a.g7_secs
    ));
    let baseline = offered("without parked streams").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = setup::rss_kib(&cg);
    let metrics0 = setup::http(&cg.admin, "GET", "/metrics", &ctx.token, None)?.1;
    let holder_tool = tools::H2load {
        secs: None,
        requests: Some(holders),
        limit: Duration::from_secs(120),
        ..h2(&hold, a.streams_connections, a.streams_per_conn, None, None)
    };
    let holder_args = holder_tool.args();
    say(&format!("g7: parking {holders} streams (pg_sleep(55) on the primary of the point's shard)"));
    let t = Instant::now();
    let mut holder_child = tools::spawn(&ctx.h2load, &holder_args)?;
    // Parked = cellgate is idle again (its CPU below 0.05 cores for 1 s) and its RSS stopped
    // growing (< 0.5 % in that second); at least 3 s, at most 30 s.
    let mut quiet_since: Option<Instant> = None;
    let (mut cpu_prev, mut rss_prev) = (procs::cpu_us(cg.pid()).unwrap_or(0.0), setup::rss_kib(&cg));
    let mut parked = false;
    while t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (cpu, rss) = (procs::cpu_us(cg.pid()).unwrap_or(0.0), setup::rss_kib(&cg));
        let cores = (cpu - cpu_prev) / 250_000.0;
        let quiet = cores < 0.05 && (rss as f64) < rss_prev as f64 * 1.005;
        (cpu_prev, rss_prev) = (cpu, rss);
        if !quiet {
            quiet_since = None;
            continue;
        }
        let since = *quiet_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= Duration::from_millis(1000) && t.elapsed() > Duration::from_secs(3) {
            parked = true;
            break;
        }
    }
    let ramp_secs = t.elapsed().as_secs_f64();
    let rss_holders = setup::rss_kib(&cg);
    say(&format!(
        "g7: {} after {ramp_secs:.1} s (RSS {} → {} MiB); the same offered load again",
        if parked { "parked" } else { "still not idle" },
        rss_idle / 1024,
        rss_holders / 1024
    ));
    let with = offered("with parked streams").await?;
    let metrics1 = setup::http(&cg.admin, "GET", "/metrics", &ctx.token, None)?.1;
    let holders_alive = matches!(holder_child.try_wait(), Ok(None));
    // Holders are the only requests that run on a primary; failures before routing have no shard.
    let finished =
        |m: &str| setup::requests_total(m, &["role=\"primary\""]) + setup::requests_total(m, &["shard=\"none\""]);
    let holders_finished = finished(&metrics1).saturating_sub(finished(&metrics0));
    if t.elapsed() > Duration::from_secs(50) {
        say("g7: warning: the holders were parked for more than 50 s; some may have finished");
    }
    let _ = holder_child.kill().await;
    Ok(G7Out {
        holders,
        holders_alive,
        holders_finished,
        parked,
        rss_idle_kib: rss_idle,
        rss_holders_kib: rss_holders,
        ramp_secs,
        offered_point,
        offered_area,
        baseline,
        with,
        area_shards,
        holder_command: ctx.show(&ctx.h2load, &holder_args),
        config: cg.config.clone(),
    })
}
