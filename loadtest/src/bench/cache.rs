//! The cache part (`--cache`, issue 17 "Measure"): cached point reads next to direct
//! `pgbench -S`. Starts a real Redis (`redis-server` on a free loopback port, a random password in
//! a 0600 config file, no persistence) and two cellgates on it with `[cache] enabled = true`:
//!
//! * A: the default L1 (64 MiB). It serves (b) the runner's proxied point read without `cache`
//!   (such a read never touches the cache) and (c) the same read with `"cache": {"ttl_ms": …}`,
//!   repeated: after the first request every one is an L1 hit;
//! * B: `l1_bytes = 1`, so its L1 holds nothing (every entry weighs more than the level) and each
//!   of its hits comes from Redis — (d) L2 hits of the entry A filled (the same key: same Redis
//!   run id, generation, cell and shard versions). B cannot fill L2 itself: a fill that L1
//!   refuses is not sent to L2 either, so A primes the entry before every L2 run.
//!
//! Each pair runs (a) `pgbench -S -M prepared` on the replica, (b), (c), (d) with h2load exactly as
//! the pairs' proxied run (`--h1 -c C -m 1`), and (e) L1 hits over h2c with 32 streams per
//! connection (not comparable with the target; it shows how much of an L1 hit's CPU is the
//! per-request socket work of HTTP/1.1), in rotated order. `/admin/cache` counters are read before
//! and after every cellgate run: the hits of the level measured ÷ the requests answered is the
//! run's hit fraction. CPU per request of cellgate, the load generator (`getrusage` of the ended
//! child), the replica (postmaster and backends), Redis and the whole machine.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellgate_harness::Cluster;
use serde_json::Value;

use super::procs::{self, Guard};
use super::report::{self, command_block, elide_hash, f0, f1, f2, first_line, machine, met};
use super::setup::{self, Cellgate, Profile};
use super::stats::median;
use super::{Ctx, Run, h2_run, measure, per_req, pgbench_run, say, tools};

/// The issue's targets: L1-hit throughput ≥ 1.5 × direct PostgreSQL (pgbench -S), and ≤ 10 µs of
/// cellgate CPU per L1 hit.
pub const TARGET_L1_RATIO: f64 = 1.5;
pub const TARGET_L1_CPU_US: f64 = 10.0;

/// The entries' TTL and `[cache] max_ttl_ms`: longer than any invocation, so nothing expires
/// during a run.
const TTL_MS: u64 = 3_600_000;

/// Streams per connection of the multiplexed L1 variant (e).
const MUX_STREAMS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Uncached,
    L1,
    L2,
    L1Mux,
    /// The same h2load run against a path cellgate answers 404 before auth or body: its CPU
    /// floor per HTTP request.
    Floor,
}

#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub key: &'static str,
    pub name: &'static str,
    pub tool: &'static str,
    pub kind: Kind,
}

pub const VARIANTS: [Variant; 6] = [
    Variant { key: "a", name: "direct: pgbench -S on the replica", tool: "pgbench -S", kind: Kind::Direct },
    Variant { key: "b", name: "through cellgate, no cache", tool: "h2load (b) uncached", kind: Kind::Uncached },
    Variant { key: "c", name: "L1 hit", tool: "h2load (c) L1", kind: Kind::L1 },
    Variant { key: "d", name: "L2 hit (Redis)", tool: "h2load (d) L2", kind: Kind::L2 },
    Variant { key: "e", name: "L1 hit, h2c 32 streams per connection", tool: "h2load (e) L1 h2c", kind: Kind::L1Mux },
    Variant { key: "f", name: "HTTP floor: 404 before auth, no work", tool: "h2load (f) 404 floor", kind: Kind::Floor },
];

/// `/admin/cache` counters (or their change over a run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub hits_l1: u64,
    pub hits_l2: u64,
    pub stale: u64,
    pub misses: u64,
    pub merges: u64,
    pub bypassed: u64,
    pub not_stored: u64,
    pub redis_errors: u64,
    pub sessions: u64,
    pub generation: u64,
    /// L1 entries at the end (not a delta).
    pub l1_entries: u64,
}

impl Counters {
    pub fn from_json(v: &Value) -> Counters {
        let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        Counters {
            hits_l1: n("/counters/hits_l1"),
            hits_l2: n("/counters/hits_l2"),
            stale: n("/counters/stale_served"),
            misses: n("/counters/misses"),
            merges: n("/counters/single_flight_merges"),
            bypassed: n("/counters/bypassed"),
            not_stored: n("/counters/not_stored"),
            redis_errors: n("/redis/errors"),
            sessions: n("/redis/sessions"),
            generation: n("/redis/generation"),
            l1_entries: n("/l1/entries"),
        }
    }
    /// `after − self`, with `after`'s L1 entries.
    pub fn delta(&self, after: &Counters) -> Counters {
        Counters {
            hits_l1: after.hits_l1.saturating_sub(self.hits_l1),
            hits_l2: after.hits_l2.saturating_sub(self.hits_l2),
            stale: after.stale.saturating_sub(self.stale),
            misses: after.misses.saturating_sub(self.misses),
            merges: after.merges.saturating_sub(self.merges),
            bypassed: after.bypassed.saturating_sub(self.bypassed),
            not_stored: after.not_stored.saturating_sub(self.not_stored),
            redis_errors: after.redis_errors.saturating_sub(self.redis_errors),
            sessions: after.sessions.saturating_sub(self.sessions),
            generation: after.generation.saturating_sub(self.generation),
            l1_entries: after.l1_entries,
        }
    }
    /// Cached lookups counted: hits of any level, stale, misses, merges, bypasses.
    pub fn lookups(&self) -> u64 {
        self.hits_l1 + self.hits_l2 + self.stale + self.misses + self.merges + self.bypassed
    }
    pub fn describe(&self) -> String {
        format!(
            "L1 {} / L2 {} hits, {} misses, {} bypassed, {} stale; Redis: {} errors, {} new sessions, generation +{}; L1 entries {}",
            self.hits_l1,
            self.hits_l2,
            self.misses,
            self.bypassed,
            self.stale,
            self.redis_errors,
            self.sessions,
            self.generation,
            self.l1_entries
        )
    }
}

fn counters(cg: &Cellgate, token: &str) -> Result<Counters, String> {
    let (status, body) = setup::http(&cg.admin, "GET", "/admin/cache", token, None)?;
    if status != 200 {
        return Err(format!("GET /admin/cache → {status}: {body}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("/admin/cache: {e}: {body}"))?;
    Ok(Counters::from_json(&v))
}

/// One run of a variant.
#[derive(Debug, Clone)]
pub struct VRun {
    pub run: Run,
    /// Position in the pair's order (1-based).
    pub position: usize,
    /// Requests answered (h2load `done`, pgbench transactions): the per-request divisor.
    pub done: u64,
    /// CPU of the load generator (pgbench or h2load), µs per request.
    pub gen_us_per_req: Option<f64>,
    /// CPU of the replica's postmaster and backends, µs per request.
    pub replica_us_per_req: Option<f64>,
    /// CPU of redis-server, µs per request.
    pub redis_us_per_req: Option<f64>,
    /// Busy CPU of the whole machine per request, µs.
    pub machine_us_per_req: Option<f64>,
    /// `/admin/cache` counter changes over the run (cellgate variants).
    pub counters: Option<Counters>,
    pub secs: f64,
}

impl VRun {
    /// Hits of the level the variant measures ÷ every cached lookup cellgate counted during the
    /// run (hits of any level, stale, misses, single-flight merges, bypasses). h2load's `done`
    /// is not the divisor: a timed h2c run leaves answered streams uncounted at its end.
    pub fn hit_fraction(&self, kind: Kind) -> Option<f64> {
        let c = self.counters.as_ref()?;
        let hits = match kind {
            Kind::L1 | Kind::L1Mux => c.hits_l1,
            Kind::L2 => c.hits_l2,
            Kind::Direct | Kind::Uncached | Kind::Floor => return None,
        };
        Some(hits as f64 / c.lookups().max(1) as f64)
    }
    /// CPU of programs outside the runner's tree (noise), µs per request.
    pub fn others_us_per_req(&self) -> f64 {
        self.run.samples.noise.other_cores * self.secs * 1e6 / self.done.max(1) as f64
    }
    /// The machine's CPU per request without other programs': what this setup spent.
    pub fn ours_us_per_req(&self) -> Option<f64> {
        self.machine_us_per_req.map(|m| m - self.others_us_per_req())
    }
    /// The part of [`Self::ours_us_per_req`] not accounted to cellgate, the load generator, the
    /// replica or Redis: the kernel's interrupt and softirq work (loopback TCP), the primary, the
    /// idle cellgate, the runner.
    pub fn rest_us_per_req(&self) -> Option<f64> {
        let m = self.ours_us_per_req()?;
        Some(
            m - self.run.cpu_us_per_req.unwrap_or(0.0)
                - self.gen_us_per_req.unwrap_or(0.0)
                - self.replica_us_per_req.unwrap_or(0.0)
                - self.redis_us_per_req.unwrap_or(0.0),
        )
    }
    /// Cores this setup kept busy during the run (other programs' CPU left out).
    pub fn busy_cores(&self) -> Option<f64> {
        self.ours_us_per_req().map(|m| m * self.done as f64 / 1e6 / self.secs.max(1e-9))
    }
}

#[derive(Debug, Clone)]
pub struct CachePair {
    pub idx: usize,
    /// Indexes into [`VARIANTS`] in the order they ran.
    pub order: Vec<usize>,
    /// By variant index.
    pub runs: Vec<VRun>,
}

impl CachePair {
    /// req/s of variant `v` ÷ pgbench's tps in this pair.
    pub fn ratio(&self, v: usize) -> f64 {
        self.runs[v].run.rps / self.runs[0].run.rps
    }
    pub fn ratio_to(&self, v: usize, base: usize) -> f64 {
        self.runs[v].run.rps / self.runs[base].run.rps
    }
    pub fn cpu(&self, v: usize) -> f64 {
        self.runs[v].run.cpu_us_per_req.unwrap_or(f64::NAN)
    }
    pub fn noisy(&self, thr: f64) -> bool {
        self.runs.iter().any(|r| r.run.noisy(thr))
    }
}

pub struct CacheOut {
    pub pairs: Vec<CachePair>,
    /// (name, config text with the token hash and the Redis password elided).
    pub configs: Vec<(&'static str, String)>,
    pub redis: String,
    /// What the preflight requests answered (`Cache-Status` lines).
    pub preflight: Vec<String>,
    pub warmup: String,
    pub cached_body: String,
}

/// A redis-server of this part, stopped by PID (SIGINT, then SIGKILL) on drop.
pub struct Redis {
    guard: Guard,
    pub port: u16,
    password: String,
    pub version: String,
    log: PathBuf,
}

impl Redis {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
    fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}", self.password, self.port)
    }
    fn elide(&self, text: &str) -> String {
        text.replace(&self.password, "$REDIS_PASSWORD")
    }
    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// `AUTH` + `PING` answered `+PONG`.
fn redis_ping(port: u16, password: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(format!("AUTH {password}\r\nPING\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.windows(7).any(|w| w == b"+PONG\r\n") {
            return true;
        }
    }
    false
}

/// Debian's redis-server on a free loopback port, no persistence, `requirepass` in a 0600 config
/// file (like deploy/local/demo.sh), in its own process group.
pub fn start_redis(bin: &str, work: &Path) -> Result<Redis, String> {
    let dir = work.join("redis");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let password = format!("redis-{}", setup::new_token()?);
    let conf = work.join("redis.conf");
    super::tls::write_private(&conf, &format!("requirepass {password}\n"))?;
    let port = setup::free_port()?;
    let log = work.join("redis.log");
    let child = {
        use std::os::unix::process::CommandExt;
        Command::new(bin)
            .arg(&conf)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("start {bin}: {e} (Debian: apt-get install -y redis-server; or set REDIS_SERVER)"))?
    };
    let mut r = Redis {
        guard: Guard::new(child, Duration::from_secs(3)),
        port,
        password,
        version: first_line(bin, &["--version"]),
        log,
    };
    let t = Instant::now();
    loop {
        if redis_ping(port, &r.password) {
            return Ok(r);
        }
        if !r.guard.alive() {
            return Err(format!("redis-server exited during startup:\n{}", r.log_tail()));
        }
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!("redis-server did not answer PING within 10 s:\n{}", r.log_tail()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `[cache]` table of a cellgate of this part.
fn cache_section(redis_url: &str, l1_bytes: Option<u64>) -> String {
    let mut s = format!("\n[cache]\nenabled = true\nredis = \"{redis_url}\"\nmax_ttl_ms = {TTL_MS}\n");
    if let Some(b) = l1_bytes {
        s.push_str(&format!("l1_bytes = {b}\n"));
    }
    s
}

/// The point read with `"cache": {"ttl_ms": …}`.
pub fn cached_body(plain: &str) -> String {
    match plain.strip_suffix('}') {
        Some(head) => format!("{head},\"cache\":{{\"ttl_ms\":{TTL_MS}}}}}"),
        None => plain.to_string(),
    }
}

/// Wait until the cellgate's cache serves (its Redis subscription is live).
fn wait_serving(cg: &Cellgate, token: &str) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let (status, body) = setup::http(&cg.admin, "GET", "/admin/cache", token, None)?;
        if status == 200 && serde_json::from_str::<Value>(&body).is_ok_and(|v| v["serving"] == Value::Bool(true)) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(15) {
            return Err(format!("cache not serving within 15 s: {body}\n{}", cg.log_tail()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request; its `Cache-Status` (empty when absent). Fails unless 200 with rows.
fn cache_status(cg: &Cellgate, token: &str, body: &str) -> Result<String, String> {
    let (status, headers, resp) = setup::http_head(&cg.data, "POST", "/v1/sql/core/query", token, Some(body))?;
    if status != 200 || !resp.contains("\"rows\"") {
        return Err(format!("{body} → {status}: {resp}"));
    }
    Ok(headers.into_iter().find(|(k, _)| k == "cache-status").map(|(_, v)| v).unwrap_or_default())
}

/// Put the entry in L2 through A (an L1 miss there fills L1 and, in the background, L2), then
/// wait until B answers from L2. Returns the `Cache-Status` lines seen (A's, B's).
fn prime_l2(a: &Cellgate, b: &Cellgate, token: &str, body: &str) -> Result<(String, String), String> {
    let from_a = cache_status(a, token, body)?;
    let t = Instant::now();
    loop {
        let from_b = cache_status(b, token, body)?;
        if from_b.contains("hit") && from_b.contains("detail=l2") {
            return Ok((from_a, from_b));
        }
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "L2 prime: B never answered from L2 within 10 s (A said {from_a:?}, B said {from_b:?})\n{}",
                b.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
        // The entry may have become unreachable (a new generation after a lost session): A again.
        cache_status(a, token, body)?;
    }
}

pub async fn run_cache(ctx: &Ctx, cluster: &Cluster) -> Result<CacheOut, String> {
    let a = &ctx.args;
    let redis_bin = procs::find_program("REDIS_SERVER", "redis-server", &["/usr/bin/redis-server"])
        .ok_or("redis-server not found (Debian: apt-get install -y redis-server; or set REDIS_SERVER)")?;
    let redis = start_redis(&redis_bin, &ctx.work)?;
    say(&format!("cache: redis-server on 127.0.0.1:{} (pid {})", redis.port, redis.pid()));
    let profile = |name| Profile {
        name,
        pool_max: a.concurrency,
        max_in_flight: 100_000,
        request_timeout_ms: 5000,
        checkout_timeout_ms: 2000,
    };
    let start = |name, l1: Option<u64>| {
        setup::start_cellgate_extra(
            &ctx.cellgate,
            &ctx.work,
            &ctx.map,
            &profile(name),
            &ctx.hash,
            None,
            &cache_section(&redis.url(), l1),
        )
    };
    let cg_a = start("cache-a", None)?;
    let cg_b = start("cache-b", Some(1))?;
    wait_serving(&cg_a, &ctx.token)?;
    wait_serving(&cg_b, &ctx.token)?;
    say("cache: cellgate A (L1 64 MiB) and B (l1_bytes = 1) serving on one Redis");

    let plain_text = super::clients::point_body(setup::POINT.0, setup::POINT.1, 4242);
    let cached_text = cached_body(&plain_text);
    let plain = ctx.body("point.json", &plain_text)?;
    let cached = ctx.body("point-cached.json", &cached_text)?;
    setup::preflight(&cg_a, &ctx.token, &plain_text)?;

    // Preflight: A misses then hits in L1; B hits in L2 and keeps nothing in L1.
    let mut preflight = Vec::new();
    let first = cache_status(&cg_a, &ctx.token, &cached_text)?;
    let second = cache_status(&cg_a, &ctx.token, &cached_text)?;
    if !second.starts_with("cellgate; hit") || second.contains("detail=l2") {
        return Err(format!("cache preflight: A's second request was not an L1 hit: {first:?} then {second:?}"));
    }
    preflight.push(format!("A, first request: `Cache-Status: {first}`; second: `{second}`"));
    let (pa, pb) = prime_l2(&cg_a, &cg_b, &ctx.token, &cached_text)?;
    let b_again = cache_status(&cg_b, &ctx.token, &cached_text)?;
    let b_count = counters(&cg_b, &ctx.token)?;
    if !b_again.contains("detail=l2") || b_count.l1_entries != 0 {
        return Err(format!(
            "cache preflight: B should answer from L2 and hold nothing in L1: {b_again:?}, {}",
            b_count.describe()
        ));
    }
    preflight.push(format!(
        "B after A's fill (A said `{pa}`): `Cache-Status: {pb}`, again `{b_again}`; B's L1 holds {} entries",
        b_count.l1_entries
    ));
    let plain_status = cache_status(&cg_a, &ctx.token, &plain_text)?;
    preflight.push(format!(
        "A, the read without `cache`: {}",
        if plain_status.is_empty() {
            "no `Cache-Status` (the cache is not touched)".to_string()
        } else {
            format!("`Cache-Status: {plain_status}`")
        }
    ));

    let c = a.concurrency;
    let pg = |secs: u64, dir: &str| tools::Pgbench {
        bin: &ctx.pgbench,
        port: ctx.replica_port,
        user: setup::APP_USER,
        password: setup::APP_PASSWORD,
        clients: c,
        threads: a.client_threads,
        secs,
        rate: None,
        dir: ctx.work.join(dir),
    };
    let h2 = |kind: Kind, secs: u64, log: Option<&str>| {
        let (cg, body) = match kind {
            Kind::Uncached => (&cg_a, &plain),
            Kind::L2 => (&cg_b, &cached),
            _ => (&cg_a, &cached),
        };
        let mux = kind == Kind::L1Mux;
        let url =
            if kind == Kind::Floor { format!("{}://{}/v1/sql/core/none", cg.scheme, cg.data) } else { ctx.url(cg) };
        tools::H2load {
            bin: &ctx.h2load,
            url,
            body: body.clone(),
            token: &ctx.token,
            clients: c,
            streams: if mux { MUX_STREAMS } else { 1 },
            threads: a.client_threads,
            h1: !mux && !a.h2c,
            headers: Vec::new(),
            secs: Some(secs),
            requests: None,
            rps_per_client: None,
            log: log.map(|l| ctx.work.join(l)),
            limit: Duration::from_secs(secs + 60),
        }
    };
    say("cache: warm-up (2 s per variant)");
    pg(2, "cache-warm-pg").run().await?;
    for v in &VARIANTS[1..] {
        if v.kind == Kind::L2 {
            prime_l2(&cg_a, &cg_b, &ctx.token, &cached_text)?;
        }
        h2(v.kind, 2, None).run().await?;
    }
    let replica = cluster.shards[ctx.owner_index].replicas[0].pid();
    let iv = Duration::from_millis(250);
    let mut pairs = Vec::new();
    for i in 1..=a.pairs {
        let order: Vec<usize> = (0..VARIANTS.len()).map(|k| (k + i - 1) % VARIANTS.len()).collect();
        say(&format!(
            "cache pair {i}/{}: order {}",
            a.pairs,
            order.iter().map(|&v| VARIANTS[v].key).collect::<Vec<_>>().join(" ")
        ));
        let mut runs: Vec<Option<VRun>> = vec![None; VARIANTS.len()];
        for (pos, &v) in order.iter().enumerate() {
            let kind = VARIANTS[v].kind;
            let cg = match kind {
                Kind::Direct => None,
                Kind::L2 => Some(&cg_b),
                _ => Some(&cg_a),
            };
            match kind {
                Kind::L2 => {
                    prime_l2(&cg_a, &cg_b, &ctx.token, &cached_text)?;
                }
                Kind::L1 | Kind::L1Mux => {
                    cache_status(&cg_a, &ctx.token, &cached_text)?;
                }
                _ => {}
            }
            let c0 = cg.map(|g| counters(g, &ctx.token)).transpose()?;
            let rep = replica.map(|pid| procs::ChildrenCpu::start(pid, Duration::from_millis(100)));
            let (gen0, red0, box0) = (procs::children_cpu_us(), procs::cpu_us(redis.pid()), procs::machine_busy_us());
            let (run, done, secs) = if kind == Kind::Direct {
                let p = pg(a.secs, "cache-pg");
                let (r, cpu, s) = measure(ctx, None, iv, p.run()).await?;
                let n = r.lat.n;
                (pgbench_run(ctx, VARIANTS[v].tool, None, r, cpu, s), n, a.secs as f64)
            } else {
                let tool = h2(kind, a.secs, Some("cache-h2.log"));
                let (r, cpu, s) = measure(ctx, cg, iv, tool.run()).await?;
                let mut run = h2_run(VARIANTS[v].tool, None, &r, cpu, s, ctx.show(&ctx.h2load, &r.args));
                if kind == Kind::Floor {
                    // Every answer is a 404: count and time them all.
                    if r.summary.s4xx != r.summary.done {
                        return Err(format!(
                            "cache: the 404 floor run answered {} of {} requests with 4xx",
                            r.summary.s4xx, r.summary.done
                        ));
                    }
                    run.requests = r.summary.done;
                    // h2load counts a 4xx as failed; here they are the answers asked for.
                    run.errors = r.summary.errored + r.summary.timeout;
                    run.rps = r.summary.done as f64 / r.summary.secs.max(1e-9);
                    run.lat = super::stats::summarize(r.entries.iter().map(|e| e.dur_us).collect());
                }
                (run, r.summary.done, r.summary.secs)
            };
            let (gen1, red1, box1) = (procs::children_cpu_us(), procs::cpu_us(redis.pid()), procs::machine_busy_us());
            let rep_us = rep.and_then(procs::ChildrenCpu::finish);
            let d = |x: Option<f64>, y: Option<f64>| per_req(x.zip(y).map(|(x, y)| y - x), done);
            let counters = match (cg, c0) {
                (Some(g), Some(c0)) => Some(c0.delta(&counters(g, &ctx.token)?)),
                _ => None,
            };
            runs[v] = Some(VRun {
                run,
                position: pos + 1,
                done,
                gen_us_per_req: d(gen0, gen1),
                replica_us_per_req: per_req(rep_us, done),
                redis_us_per_req: d(red0, red1),
                machine_us_per_req: d(box0, box1),
                counters,
                secs,
            });
        }
        let runs: Vec<VRun> =
            runs.into_iter().map(|r| r.ok_or("cache: a variant did not run")).collect::<Result<_, _>>()?;
        let pair = CachePair { idx: i, order, runs };
        say(&format!(
            "cache pair {i}: ÷ pgbench -S: uncached {:.2}, L1 {:.2}, L2 {:.2}; cellgate µs/req: {:.1} / {:.1} / {:.1}; hit fractions L1 {:.3}, L2 {:.3}{}",
            pair.ratio(1),
            pair.ratio(2),
            pair.ratio(3),
            pair.cpu(1),
            pair.cpu(2),
            pair.cpu(3),
            pair.runs[2].hit_fraction(Kind::L1).unwrap_or(f64::NAN),
            pair.runs[3].hit_fraction(Kind::L2).unwrap_or(f64::NAN),
            if pair.noisy(a.noise_threshold) { " (noisy)" } else { "" }
        ));
        pairs.push(pair);
    }
    let configs = vec![("A: (b), (c), (e), (f)", redis.elide(&cg_a.config)), ("B: (d)", redis.elide(&cg_b.config))];
    let redis_desc = format!(
        "{} on a free loopback port, started by the runner: `redis-server $WORK/redis.conf --bind 127.0.0.1 --port PORT --save '' --appendonly no --dir $WORK/redis --logfile $WORK/redis.log --daemonize no` with `requirepass` (random per run) in the 0600 `redis.conf`, as `deploy/local/demo.sh` does; stopped by PID at the end",
        redis.version
    );
    drop(cg_b);
    drop(cg_a);
    drop(redis);
    Ok(CacheOut {
        pairs,
        configs,
        redis: redis_desc,
        preflight,
        warmup: "pgbench and h2load, 2 s per variant, same options, not recorded".into(),
        cached_body: cached_text,
    })
}

/// Medians of a per-pair value over all pairs and over the quiet ones (`None` when every pair is
/// quiet or none is), and the number of quiet pairs.
fn med(t: &CacheOut, thr: f64, f: &dyn Fn(&CachePair) -> f64) -> (f64, Option<f64>, usize) {
    let all: Vec<f64> = t.pairs.iter().map(f).collect();
    let quiet: Vec<f64> = t.pairs.iter().filter(|p| !p.noisy(thr)).map(f).collect();
    let q = (quiet.len() != all.len() && !quiet.is_empty()).then(|| median(&quiet));
    (median(&all), q, quiet.len())
}

fn quiet_note(q: Option<f64>, n: usize, fmt: fn(f64) -> String) -> String {
    match q {
        Some(v) => format!("{} ({n} quiet pairs)", fmt(v)),
        None if n == 0 => "– (every pair noisy)".into(),
        None => "same (no noisy pair)".into(),
    }
}

fn opt(v: Option<f64>, fmt: fn(f64) -> String) -> String {
    v.filter(|x| x.is_finite()).map(fmt).unwrap_or_else(|| "–".into())
}

/// Smallest hit fraction of variant `v` over the pairs.
fn min_hits(t: &CacheOut, v: usize) -> f64 {
    t.pairs.iter().filter_map(|p| p.runs[v].hit_fraction(VARIANTS[v].kind)).fold(f64::INFINITY, f64::min)
}

pub fn summary_lines(ctx: &Ctx, t: &CacheOut) -> Vec<String> {
    let thr = ctx.args.noise_threshold;
    let (l1, _, _) = med(t, thr, &|p| p.ratio(2));
    let (l1_cpu, _, _) = med(t, thr, &|p| p.cpu(2));
    let (l2, _, _) = med(t, thr, &|p| p.ratio(3));
    let (l2_cpu, _, _) = med(t, thr, &|p| p.cpu(3));
    vec![
        format!(
            "L1 hits/s ÷ pgbench -S tps (median of {} pairs): {} (target ≥ {TARGET_L1_RATIO}) {}; cellgate CPU per L1 hit {} µs (target ≤ {TARGET_L1_CPU_US}) {}",
            t.pairs.len(),
            f2(l1),
            met(l1.is_finite().then_some(l1 >= TARGET_L1_RATIO)),
            f1(l1_cpu),
            met(l1_cpu.is_finite().then_some(l1_cpu <= TARGET_L1_CPU_US)),
        ),
        format!("L2 hits/s ÷ pgbench -S tps: {}; cellgate CPU per L2 hit {} µs", f2(l2), f1(l2_cpu)),
    ]
}

pub fn render(ctx: &Ctx, cluster: &Cluster, t: &CacheOut, elapsed: Duration) -> String {
    let a = &ctx.args;
    let thr = a.noise_threshold;
    let work = ctx.work.display().to_string();
    let unwork = |s: &str| s.replace(&work, "$WORK");
    let mut m = String::new();
    let _ = writeln!(m, "# Performance runner: cached point reads\n");
    let _ = writeln!(
        m,
        "Generated by `cellgate-bench --cache` (`loadtest/src/bench/cache.rs`, see `loadtest/bench/README.md`) on {}; the whole invocation took {:.0} s. Rerun it to refresh this file; do not edit by hand. Hand-written analysis lives in `docs/cache.md` (*Measured*).\n",
        report::utc(ctx.started),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(m, "{}", command_block(ctx));

    let _ = writeln!(m, "## Result\n");
    let _ = writeln!(
        m,
        "Medians of the per-pair values; every ratio divides by the same pair's direct `pgbench -S` (a). \"Quiet pairs\" repeats them without the pairs in which other programs (or hypervisor steal) took more than {thr} cores during any of the pair's runs.\n"
    );
    let _ = writeln!(m, "| what | measured | quiet pairs | target | |\n|---|---|---|---|---|");
    let row = |m: &mut String,
               what: &str,
               f: &dyn Fn(&CachePair) -> f64,
               fmt: fn(f64) -> String,
               target: &str,
               ok: Option<&dyn Fn(f64) -> bool>| {
        let (x, q, n) = med(t, thr, f);
        let verdict = ok.map(|ok| met(x.is_finite().then(|| ok(x)))).unwrap_or("");
        let _ = writeln!(m, "| {what} | {} | {} | {target} | {verdict} |", fmt(x), quiet_note(q, n, fmt));
    };
    row(
        &mut m,
        "(c) L1 hits/s ÷ (a) pgbench -S tps",
        &|p| p.ratio(2),
        f2,
        &format!("≥ {TARGET_L1_RATIO}"),
        Some(&|x| x >= TARGET_L1_RATIO),
    );
    row(
        &mut m,
        "(c) cellgate CPU per L1 hit, µs",
        &|p| p.cpu(2),
        f1,
        &format!("≤ {TARGET_L1_CPU_US}"),
        Some(&|x| x <= TARGET_L1_CPU_US),
    );
    row(&mut m, "(d) L2 hits/s ÷ (a)", &|p| p.ratio(3), f2, "–", None);
    row(&mut m, "(d) cellgate CPU per L2 hit, µs", &|p| p.cpu(3), f1, "–", None);
    row(&mut m, "(d) Redis CPU per L2 hit, µs", &|p| p.runs[3].redis_us_per_req.unwrap_or(f64::NAN), f1, "–", None);
    row(&mut m, "(b) uncached proxied reads/s ÷ (a) (the pairs' G1, this run)", &|p| p.ratio(1), f2, "–", None);
    row(&mut m, "(b) cellgate CPU per uncached read, µs", &|p| p.cpu(1), f1, "–", None);
    row(&mut m, "(c) L1 ÷ (b) uncached, req/s", &|p| p.ratio_to(2, 1), f2, "–", None);
    row(&mut m, "(d) L2 ÷ (b) uncached, req/s", &|p| p.ratio_to(3, 1), f2, "–", None);
    row(&mut m, "(e) L1 hits over h2c, 32 streams per connection: req/s ÷ (a)", &|p| p.ratio(4), f2, "–", None);
    row(&mut m, "(e) cellgate CPU per L1 hit over h2c ×32, µs", &|p| p.cpu(4), f1, "–", None);
    row(
        &mut m,
        "(f) cellgate CPU per request answered 404 before auth (HTTP/1.1 as (b)–(d)), µs: the floor of any request",
        &|p| p.cpu(5),
        f1,
        "–",
        None,
    );
    let _ = writeln!(
        m,
        "| hit fraction, lowest of the pairs: (c) L1 / (d) L2 / (e) L1 (hits of that level ÷ cached lookups cellgate counted, `/admin/cache`) | {} / {} / {} | | – | |\n",
        f2(min_hits(t, 2)),
        f2(min_hits(t, 3)),
        f2(min_hits(t, 4))
    );

    // Where the CPU goes.
    let _ = writeln!(m, "## Where the CPU goes\n");
    let _ = writeln!(
        m,
        "CPU per request by process, medians of the pairs (µs). Machine = busy time of all cores (/proc/stat: user, nice, system, irq, softirq) ÷ requests; others = programs outside the runner's tree (the noise sampler); ours = machine − others; rest = ours − the named processes (interrupt and softirq work of loopback TCP, which no process is charged for, the primary, the idle cellgate, the runner). Busy cores = ours × req/s; with {} cores the box is saturated when busy cores plus the others' share reach that figure, and then req/s ≈ the cores left ÷ ours per request.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let _ = writeln!(
        m,
        "| variant | req/s | machine | others | ours | cellgate | load generator | PostgreSQL replica | Redis | rest | busy cores (ours) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mv = |v: usize, f: &dyn Fn(&VRun) -> Option<f64>| {
        let xs: Vec<f64> = t.pairs.iter().filter_map(|p| f(&p.runs[v])).filter(|x| x.is_finite()).collect();
        if xs.is_empty() { None } else { Some(median(&xs)) }
    };
    for (v, var) in VARIANTS.iter().enumerate() {
        let _ = writeln!(
            m,
            "| ({}) {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            var.key,
            var.name,
            opt(mv(v, &|r| Some(r.run.rps)), f0),
            opt(mv(v, &|r| r.machine_us_per_req), f1),
            opt(mv(v, &|r| Some(r.others_us_per_req())), f1),
            opt(mv(v, &|r| r.ours_us_per_req()), f1),
            opt(mv(v, &|r| r.run.cpu_us_per_req), f1),
            opt(mv(v, &|r| r.gen_us_per_req), f1),
            opt(mv(v, &|r| r.replica_us_per_req), f1),
            opt(mv(v, &|r| r.redis_us_per_req), f1),
            opt(mv(v, &|r| r.rest_us_per_req()), f1),
            opt(mv(v, &|r| r.busy_cores()), f2),
        );
    }
    let (ma, mc) = (mv(0, &|r| r.ours_us_per_req()), mv(2, &|r| r.ours_us_per_req()));
    let (ga, gc) = (mv(0, &|r| r.gen_us_per_req), mv(2, &|r| r.gen_us_per_req));
    if let (Some(ma), Some(mc), Some(ga), Some(gc)) = (ma, mc, ga, gc) {
        let cg = mv(2, &|r| r.run.cpu_us_per_req).unwrap_or(f64::NAN);
        let ra = mv(0, &|r| r.replica_us_per_req).unwrap_or(f64::NAN);
        let (rest_a, rest_c) =
            (mv(0, &|r| r.rest_us_per_req()).unwrap_or(f64::NAN), mv(2, &|r| r.rest_us_per_req()).unwrap_or(f64::NAN));
        let need = ma / TARGET_L1_RATIO;
        let others = |v: usize| mv(v, &|r| Some(r.run.samples.noise.other_cores)).unwrap_or(f64::NAN);
        let (ours_a, ours_c) =
            (mv(0, &|r| r.busy_cores()).unwrap_or(f64::NAN), mv(2, &|r| r.busy_cores()).unwrap_or(f64::NAN));
        let measured = med(t, thr, &|p| p.ratio(2)).0;
        let _ = writeln!(
            m,
            "\nOn one saturated box req/s follows the cores left to this setup ÷ its CPU per request (ours). A direct `pgbench -S` read costs {} µs: pgbench {}, the replica's backend {}, rest {}. An L1 hit costs {} µs: cellgate {}, h2load {}, rest {}. With the same cores for both, (c) ÷ (a) would be {} ÷ {} = {}; measured {}, with other programs taking {} cores during (a) and {} during (c) (this setup kept {} and {} busy). For (c) to reach {TARGET_L1_RATIO} × (a) on this box an L1 hit would have to cost ≤ {} µs in all{}.\n",
            f1(ma),
            f1(ga),
            f1(ra),
            f1(rest_a),
            f1(mc),
            f1(cg),
            f1(gc),
            f1(rest_c),
            f1(ma),
            f1(mc),
            f2(ma / mc),
            f2(measured),
            f2(others(0)),
            f2(others(2)),
            f2(ours_a),
            f2(ours_c),
            f1(need),
            if gc + rest_c >= need {
                format!(
                    "; h2load and the rest alone take {} µs of that, so not even a cellgate that cost nothing would get there with this client on these cores",
                    f1(gc + rest_c)
                )
            } else {
                format!(", i.e. cellgate ≤ {} µs with h2load and the rest as measured", f1(need - gc - rest_c))
            },
        );
    }

    let _ = writeln!(m, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in machine(cluster, ctx) {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    let _ = writeln!(
        m,
        "\nEverything (PostgreSQL, Redis, two cellgates of which one is loaded at a time, pgbench or h2load) runs on this one machine over 127.0.0.1, so the load generator competes with cellgate for the same cores. Ratios within a pair are the comparable figures.\n"
    );

    let _ = writeln!(m, "## Setup\n");
    let _ = writeln!(
        m,
        "- Cluster, data, map and point read as in `docs/performance-runner.md` (*Setup*): {} shard(s) × (primary + 1 streaming replica), `pgbench -i -s {}`, the point read `{}`; through cellgate with `aid` 4242 in h2load's body file, to the replica of shard `s{}`; pgbench `-S` draws a random `aid` per transaction (all rows are in shared buffers).",
        ctx.shards,
        a.scale,
        super::clients::POINT_SQL,
        ctx.owner_index
    );
    let _ = writeln!(m, "- Redis: {}.", t.redis);
    let _ = writeln!(
        m,
        "- Two cellgates on that Redis (the config of each below): A with the default L1 (64 MiB), B with `l1_bytes = 1` — every entry weighs more than that, so B's L1 holds nothing and each of its hits comes from Redis. Before every L2 run the runner sends the cached read to A (an L1 miss there fills L1 and, in the background, L2) and waits until B answers `detail=l2`. Both keys are the same: one Redis run id and generation, the same cell and shard versions (nothing writes during the part)."
    );
    let _ = writeln!(
        m,
        "- Variants: (a) `pgbench -S -M prepared` on the replica; (b) the runner's proxied point read (no `cache` member: it never touches the cache) to A; (c) the same body with `\"cache\": {{\"ttl_ms\": {TTL_MS}}}` to A — after the first request every one is an L1 hit; (d) that body to B — L2 hits; (e) as (c) with h2c, {MUX_STREAMS} streams on each of the {} connections (not comparable with the target: it shows how much of an L1 hit's CPU is per-request socket work, which HTTP/2 batches); (f) the h2load run of (b)–(d) against `/v1/sql/core/none` on A, which cellgate answers 404 before auth, body or any data-plane work: the CPU floor of one HTTP/1.1 request (accept loop, hyper, the task, the error response, metrics). Cached body: `{}`.",
        a.concurrency, t.cached_body
    );
    let _ = writeln!(m, "- Preflight (single requests before the runs):");
    for p in &t.preflight {
        let _ = writeln!(m, "  - {p}");
    }
    let _ = writeln!(
        m,
        "- Pairs: {} pairs; in each, the six variants run {} s each with {} clients (`pgbench -c {} -j {}`; h2load `{}-c {} -m 1 -t {}` for (b)–(d) and (f), like the pairs' proxied run; (e) `-c {} -m {MUX_STREAMS}` h2c) in rotated order (pair 1: a b c d e f, pair 2: b c d e f a, …). Warm-up: {}. cellgate CPU per request = utime+stime delta of the loaded cellgate ÷ the requests answered; load generator = `getrusage(RUSAGE_CHILDREN)` delta over the run (pgbench or h2load, all threads, after it ended); replica = its postmaster and every backend; Redis = redis-server; machine = busy time of all cores. Hit fraction = `/admin/cache` hits of the level measured (before → after the run) ÷ every cached lookup counted meanwhile (hits, stale, misses, merges, bypasses; h2load's own count misses the streams still open when a timed h2c run ends).",
        t.pairs.len(),
        a.secs,
        a.concurrency,
        a.concurrency,
        a.client_threads.min(a.concurrency),
        if a.h2c { "" } else { "--h1 " },
        a.concurrency,
        a.client_threads.min(a.concurrency),
        a.concurrency,
        t.warmup
    );
    for (name, cfg) in &t.configs {
        let _ = writeln!(m, "\ncellgate {name} (the token hash elided):\n\n```toml\n{}```", unwork(&elide_hash(cfg)));
    }
    if let Some(first) = t.pairs.first() {
        let _ = writeln!(m, "\nCommands of pair 1 (ports are picked at run time):\n\n```");
        for &v in &first.order {
            let _ = writeln!(m, "{}", unwork(&first.runs[v].run.command));
        }
        let _ = writeln!(m, "```\n");
    }

    let _ = writeln!(m, "## Runs\n");
    let _ = writeln!(
        m,
        "| pair | variant | ran | requests | req/s | errors | p50 µs | p99 µs | p99.9 µs | cellgate CPU µs/req | load generator µs/req | replica µs/req | Redis µs/req | machine µs/req | hit fraction | cache counters (run) | noise |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &t.pairs {
        for (v, (var, r)) in VARIANTS.iter().zip(&p.runs).enumerate() {
            let _ = writeln!(
                m,
                "| {} | ({}) {} | {}. | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
                p.idx,
                var.key,
                var.name,
                r.position,
                r.run.requests,
                f0(r.run.rps),
                r.run.errors,
                f0(r.run.lat.p50),
                f0(r.run.lat.p99),
                f0(r.run.lat.p999),
                opt(r.run.cpu_us_per_req, f1),
                opt(r.gen_us_per_req, f1),
                opt(r.replica_us_per_req, f1),
                opt(r.redis_us_per_req, f1),
                opt(r.machine_us_per_req, f1),
                r.hit_fraction(VARIANTS[v].kind).map(|h| format!("{h:.3}")).unwrap_or_else(|| "–".into()),
                r.counters.as_ref().map(Counters::describe).unwrap_or_else(|| "–".into()),
                if r.run.noisy(thr) { "**noisy**: " } else { "" },
                r.run.samples.noise.describe()
            );
        }
    }
    let _ = writeln!(m, "\nPer-pair ratios (req/s ÷ (a) of the same pair) and cellgate CPU per request:\n");
    let _ = writeln!(
        m,
        "| pair | order | (b) uncached | (c) L1 | (d) L2 | (e) L1 h2c | (b) µs | (c) µs | (d) µs | (e) µs | (f) 404 µs | noisy |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &t.pairs {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.idx,
            p.order.iter().map(|&v| VARIANTS[v].key).collect::<Vec<_>>().join(" "),
            f2(p.ratio(1)),
            f2(p.ratio(2)),
            f2(p.ratio(3)),
            f2(p.ratio(4)),
            f1(p.cpu(1)),
            f1(p.cpu(2)),
            f1(p.cpu(3)),
            f1(p.cpu(4)),
            f1(p.cpu(5)),
            if p.noisy(thr) { "yes" } else { "no" }
        );
    }
    let mm = |f: &dyn Fn(&CachePair) -> f64, fmt: fn(f64) -> String| fmt(med(t, thr, f).0);
    let _ = writeln!(
        m,
        "| **median** | | {} | **{}** | {} | {} | {} | **{}** | {} | {} | {} | |",
        mm(&|p| p.ratio(1), f2),
        mm(&|p| p.ratio(2), f2),
        mm(&|p| p.ratio(3), f2),
        mm(&|p| p.ratio(4), f2),
        mm(&|p| p.cpu(1), f1),
        mm(&|p| p.cpu(2), f1),
        mm(&|p| p.cpu(3), f1),
        mm(&|p| p.cpu(4), f1),
        mm(&|p| p.cpu(5), f1),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_body_adds_the_cache_member() {
        let plain = super::super::clients::point_body(40.0, -3.0, 7);
        let c = cached_body(&plain);
        let v: Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["cache"]["ttl_ms"], TTL_MS);
        assert_eq!(v["params"][0], 7);
    }

    #[test]
    fn counters_from_admin_cache() {
        let before = Counters::from_json(&serde_json::json!({
            "l1": {"entries": 1},
            "counters": {"hits_l1": 10, "hits_l2": 2, "misses": 1, "bypassed": 0},
            "redis": {"errors": 0, "sessions": 1, "generation": 0}
        }));
        let after = Counters::from_json(&serde_json::json!({
            "l1": {"entries": 1},
            "counters": {"hits_l1": 110, "hits_l2": 2, "misses": 1, "bypassed": 3},
            "redis": {"errors": 1, "sessions": 1, "generation": 0}
        }));
        let d = before.delta(&after);
        assert_eq!((d.hits_l1, d.hits_l2, d.bypassed, d.redis_errors, d.sessions), (100, 0, 3, 1, 0));
        let r = VRun {
            run: Run {
                tool: "x",
                direct: false,
                offered: None,
                requests: 100,
                errors: 0,
                rps: 1.0,
                lat: super::super::stats::summarize(vec![1]),
                cpu_us_per_req: Some(10.0),
                samples: Default::default(),
                command: String::new(),
            },
            position: 1,
            done: 200,
            gen_us_per_req: Some(5.0),
            replica_us_per_req: None,
            redis_us_per_req: Some(1.0),
            machine_us_per_req: Some(20.0),
            counters: Some(d),
            secs: 1.0,
        };
        // 100 L1 hits of 103 lookups (3 bypassed); h2load's 200 answered are not the divisor.
        assert_eq!(r.hit_fraction(Kind::L1), Some(100.0 / 103.0));
        assert_eq!(r.hit_fraction(Kind::Uncached), None);
        assert_eq!(r.rest_us_per_req(), Some(4.0));
        assert_eq!(r.busy_cores(), Some(20.0 * 200.0 / 1e6));
    }
}
