//! The read cache against a real Redis (started here, on a free port, without persistence) and
//! real PostgreSQL (the harness): writes through one instance seen by another, read-your-writes
//! across instances, single flight counted with pg_stat_statements, area invalidation by cell,
//! Redis killed under load, the L1 byte bound, the HTTP semantics. A missing `redis-server`
//! fails every test here, with a message saying so.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// A redis-server of this test: a free loopback port, no persistence, killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Redis {
    fn start() -> Redis {
        let dir = std::env::temp_dir().join(format!("cellgate-redis-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis { port: free_port(), child: None, dir };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): the cache tests need a real Redis — install it \
                     (Debian: apt-get install redis-server)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING in 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no goodbye to any client, everything it held is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new redis-server on the same port (a new `run_id`, empty).
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `[cache]` section every instance of a test gets.
fn with_cache(redis: Option<&Redis>, extra: &str) -> impl Fn(&mut String) {
    let url = redis.map(|r| format!("redis = \"{}\"\n", r.url())).unwrap_or_default();
    let text = format!("\n[cache]\nenabled = true\n{url}redis_timeout_ms = 200\n{extra}");
    move |cfg: &mut String| cfg.push_str(&text)
}

/// One answer: status, `Cache-Status`, `Age`, body.
#[derive(Debug)]
struct Got {
    status: u16,
    cache: String,
    age: Option<u64>,
    body: Value,
}

async fn post(http: &reqwest::Client, base: &str, path: &str, token: &str, body: &Value, cc: Option<&str>) -> Got {
    let mut req = http.post(format!("{base}{path}")).bearer_auth(token).json(body);
    if let Some(cc) = cc {
        req = req.header("cache-control", cc);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let h = |n: &str| resp.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    let (cache, age) = (h("cache-status").unwrap_or_default(), h("age").map(|a| a.parse().unwrap()));
    let text = resp.text().await.unwrap();
    Got { status, cache, age, body: serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text})) }
}

async fn query(http: &reqwest::Client, base: &str, body: &Value) -> Got {
    post(http, base, "/v1/sql/core/query", READ_TOKEN, body, None).await
}

async fn execute(http: &reqwest::Client, base: &str, body: &Value) -> Got {
    post(http, base, "/v1/sql/core/execute", WRITE_TOKEN, body, None).await
}

async fn cache_status(http: &reqwest::Client, admin: &str) -> Value {
    let r = http.get(format!("{admin}/admin/cache")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Wait until the instance's cache serves (its Redis link is live).
async fn wait_serving(http: &reqwest::Client, admin: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = cache_status(http, admin).await;
        if s["serving"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "cache not serving within {within:?}: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value `v` of row `id` as a read through `base` answers it.
fn v_of(g: &Got) -> i64 {
    assert_eq!(g.status, 200, "{g:?}");
    g.body["rows"][0]["v"].as_i64().unwrap_or_else(|| panic!("no v: {g:?}"))
}

fn read_v(id: i64, at: (f64, f64)) -> Value {
    json!({"region": {"lat": at.0, "lng": at.1}, "sql": "SELECT id, v FROM items WHERE id = $1",
           "params": [id], "cache": {"ttl_ms": 60000}})
}

fn set_v(id: i64, at: (f64, f64), v: i64) -> Value {
    json!({"region": {"lat": at.0, "lng": at.1}, "sql": "UPDATE items SET v = $2 WHERE id = $1", "params": [id, v]})
}

fn token_read(id: i64, at: (f64, f64), token: &str) -> Value {
    let mut b = read_v(id, at);
    b["consistency"] = json!({"after": token, "wait_ms": 100});
    b
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Three instances on one Redis, the old row cached on B and C before each of 1,000 writes
/// through A: B's plain reads show the new row as soon as the bump's message arrived — never a
/// read sent later than 3 heartbeats after the acknowledgement (the rule's bound) — and C's
/// token read, sent at once, never shows the old row. The delay from A's acknowledgement to B's
/// first read showing the row is reported; its p99 target (≤ 100 ms) is asserted in release
/// builds (a debug build on a busy 2-core machine measures the scheduler more than the cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_through_a_read_through_b() {
    let redis = Redis::start();
    let mut stack = Stack::start(1, 1, with_cache(Some(&redis), "")).await;
    stack.add_instance(with_cache(Some(&redis), "")).await;
    stack.add_instance(with_cache(Some(&redis), "")).await;
    let (a, b, c, http) = (stack.data(), stack.data_of(0), stack.data_of(1), stack.http.clone());
    for admin in [stack.admin(), stack.admin_of(0), stack.admin_of(1)] {
        wait_ready(&http, &admin, Duration::from_secs(30)).await;
        wait_serving(&http, &admin, Duration::from_secs(10)).await;
    }
    // The config's heartbeat_ms default: a plain read sent 3 heartbeats after a write's
    // acknowledgement must show it.
    let bound = Duration::from_millis(3 * 100);
    stack.insert(1, "row", MADRID).await;
    let mut delays_ms = Vec::new();
    let (mut stale_token, mut hits_before_write, mut late_stale) = (0, 0, Vec::new());
    for i in 1..=1000i64 {
        // The old row is cached on B and C (filled now or earlier).
        for base in [&b, &c] {
            let before = query(&http, base, &read_v(1, MADRID)).await;
            assert_eq!(v_of(&before), if i == 1 { 1 } else { i - 1 }, "{before:?}");
            hits_before_write += usize::from(before.cache.contains("hit"));
        }
        let w = execute(&http, &a, &set_v(1, MADRID, i)).await;
        assert_eq!(w.status, 200, "{w:?}");
        let acked = Instant::now();
        let by_token = token_read(1, MADRID, w.body["token"].as_str().unwrap());
        let poll = async {
            let seen = async {
                loop {
                    let sent = acked.elapsed();
                    let g = query(&http, &b, &read_v(1, MADRID)).await;
                    if v_of(&g) == i {
                        return acked.elapsed();
                    }
                    if sent >= bound {
                        late_stale.push((i, sent));
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), seen).await.expect("the new row never showed through B")
        };
        let (delay, with_token) = tokio::join!(poll, query(&http, &c, &by_token));
        if v_of(&with_token) != i {
            stale_token += 1;
        }
        delays_ms.push(delay.as_secs_f64() * 1000.0);
    }
    delays_ms.sort_by(f64::total_cmp);
    let (p50, p99, max) = (pct(&delays_ms, 0.5), pct(&delays_ms, 0.99), delays_ms[delays_ms.len() - 1]);
    let server = cache_status(&http, &stack.admin_of(0)).await;
    println!(
        "bump-to-visible over {} trials: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (A's acknowledgement to \
         B's first plain read showing the row); pub/sub delay seen by B: {}; stale token reads through C: \
         {stale_token}; stale plain reads sent later than {bound:?} after the acknowledgement: {}; reads of the old \
         row that were hits: {hits_before_write} of 2000",
        delays_ms.len(),
        server["redis"]["bump_to_visible_ms"],
        late_stale.len()
    );
    assert_eq!(stale_token, 0, "token reads served a row older than their write");
    assert!(late_stale.is_empty(), "plain reads stale past the heartbeat bound: {late_stale:?}");
    if !cfg!(debug_assertions) {
        assert!(p99 <= 100.0, "bump-to-visible p99 {p99:.2} ms > 100 ms");
    }
    // The old row was cached before most writes, so every trial could have gone stale.
    assert!(hits_before_write > 1800, "only {hits_before_write} reads were hits: the cache was not exercised");
    stack.stop().await;
}

/// 10,000 write-then-read pairs with tokens, alternating which instance writes and which reads,
/// each read's row cached (stale) on the reading instance before the write: 0 violations.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_across_instances() {
    let pairs: i64 = std::env::var("CELLGATE_RYW_PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let redis = Redis::start();
    let mut stack = Stack::start(1, 1, with_cache(Some(&redis), "")).await;
    stack.add_instance(with_cache(Some(&redis), "")).await;
    let bases = [stack.data(), stack.data_of(0)];
    let http = stack.http.clone();
    wait_ready(&http, &stack.admin_of(0), Duration::from_secs(30)).await;
    wait_serving(&http, &stack.admin(), Duration::from_secs(10)).await;
    wait_serving(&http, &stack.admin_of(0), Duration::from_secs(10)).await;
    const WORKERS: i64 = 8;
    // One cell (at the map resolution, ~250 km²) per worker, 22 km apart: a worker's write does
    // not invalidate another's entry.
    let at = |w: i64| (MADRID.0 + 0.2 * w as f64, MADRID.1);
    for w in 0..WORKERS {
        stack.insert(100 + w, "ryw", at(w)).await;
    }
    let started = Instant::now();
    let violations = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (http, bases, violations, hits) = (http.clone(), bases.clone(), violations.clone(), hits.clone());
        let (id, at) = (100 + w, at(w));
        tasks.push(tokio::spawn(async move {
            for k in (w..pairs).step_by(WORKERS as usize) {
                let flip = (k / WORKERS + w) % 2 == 0;
                let (writer, reader) = if flip { (&bases[0], &bases[1]) } else { (&bases[1], &bases[0]) };
                // The reader holds the row cached before the write.
                let old = query(&http, reader, &read_v(id, at)).await;
                assert_eq!(old.status, 200, "{old:?}");
                hits.fetch_add(u64::from(old.cache.contains("hit")), Ordering::Relaxed);
                let wr = execute(&http, writer, &set_v(id, at, k + 1_000_000)).await;
                assert_eq!(wr.status, 200, "{wr:?}");
                let t = wr.body["token"].as_str().unwrap();
                let got = query(&http, reader, &token_read(id, at, t)).await;
                if v_of(&got) != k + 1_000_000 {
                    violations.fetch_add(1, Ordering::Relaxed);
                    eprintln!("violation: wrote {} through {writer}, read {got:?} through {reader}", k + 1_000_000);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = violations.load(Ordering::Relaxed);
    let mut owed = 0;
    for a in [stack.admin(), stack.admin_of(0)] {
        owed += cache_status(&http, &a).await["redis"]["bumps_owed_total"].as_u64().unwrap();
    }
    println!(
        "read-your-writes: {pairs} pairs in {:.1} s, {v} violations; {} of the pre-write reads were hits; \
         bumps owed (Redis unreachable for a writer): {owed}",
        started.elapsed().as_secs_f64(),
        hits.load(Ordering::Relaxed)
    );
    assert_eq!(v, 0);
    assert!(hits.load(Ordering::Relaxed) > pairs as u64 / 2, "the reads before the writes were not cached");
    stack.stop().await;
}

/// Calls of statements matching `pattern` over every node (reads go to replicas).
fn calls(stack: &Stack, pattern: &str) -> i64 {
    stack
        .cluster
        .nodes()
        .map(|n| {
            let q = format!("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%{pattern}%'");
            n.psql("core", &q).unwrap().parse::<i64>().unwrap()
        })
        .sum()
}

/// 100 identical concurrent misses run the statement once (pg_stat_statements on every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_concurrent_misses_run_once() {
    let redis = Redis::start();
    let conf = vec![("shared_preload_libraries".to_string(), "pg_stat_statements".to_string())];
    let stack = Stack::start_conf(1, 1, None, conf, with_cache(Some(&redis), "")).await;
    wait_serving(&stack.http, &stack.admin(), Duration::from_secs(10)).await;
    let primary = &stack.cluster.shards[0].primary;
    primary.psql("core", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements").unwrap();
    stack.cluster.shards[0].wait_for_replicas(Duration::from_secs(30)).unwrap();
    stack.insert(7, "sf", MADRID).await;
    for n in stack.cluster.nodes() {
        n.psql("core", "SELECT pg_stat_statements_reset()").unwrap();
    }
    // Slow enough (300 ms) that all 100 arrive while the first is still at the backend.
    let body = json!({"region": {"lat": MADRID.0, "lng": MADRID.1},
        "sql": "SELECT i.id, i.v FROM items i, pg_sleep(0.3) WHERE i.id = $1", "params": [7],
        "cache": {"ttl_ms": 60000}});
    let (http, base) = (stack.http.clone(), stack.data());
    let answers = futures_util::future::join_all((0..100).map(|_| {
        let (http, base, body) = (http.clone(), base.clone(), body.clone());
        async move { query(&http, &base, &body).await }
    }))
    .await;
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for g in &answers {
        assert_eq!(v_of(g), 7, "{g:?}");
        *kinds.entry(g.cache.clone()).or_default() += 1;
    }
    let executions = calls(&stack, "pg_sleep");
    let s = cache_status(&http, &stack.admin()).await;
    println!(
        "100 identical concurrent misses: {executions} backend execution(s); Cache-Status: {kinds:?}; merges: {}",
        s["counters"]["single_flight_merges"]
    );
    assert_eq!(executions, 1, "{kinds:?}");
    assert_eq!(kinds.get("cellgate; fwd=miss; stored; ttl=60"), Some(&1), "{kinds:?}");
    assert!(s["counters"]["single_flight_merges"].as_u64().unwrap() >= 90, "{s}");
    stack.stop().await;
}

/// An area read is cached; a write to one of its cells makes it a miss (with the new row); a
/// write to a cell outside it leaves it a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn area_reads_are_invalidated_by_their_cells_only() {
    let redis = Redis::start();
    let stack = Stack::start(1, 1, with_cache(Some(&redis), "")).await;
    wait_serving(&stack.http, &stack.admin(), Duration::from_secs(10)).await;
    let near = (MADRID.0 + 0.05, MADRID.1 + 0.05);
    stack.insert(21, "center", MADRID).await;
    stack.insert(22, "near", near).await;
    stack.insert(23, "far", BARCELONA).await;
    // The SQL reads the area's rows only (the contract of a cached area read).
    let area = json!({"region": {"lat": MADRID.0, "lng": MADRID.1, "radius_km": 20},
        "sql": "SELECT id, v FROM items WHERE lat BETWEEN 40.2 AND 40.7 AND lng BETWEEN -4.0 AND -3.4 ORDER BY id",
        "cache": {"ttl_ms": 60000}});
    let (http, base) = (&stack.http, stack.data());
    let first = query(http, &base, &area).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["rows"], json!([{"id": 21, "v": 21}, {"id": 22, "v": 22}]));
    assert!(first.cache.starts_with("cellgate; fwd=miss; stored"), "{first:?}");
    let again = query(http, &base, &area).await;
    assert!(again.cache.starts_with("cellgate; hit"), "{again:?}");
    // Outside the area: still a hit.
    assert_eq!(execute(http, &base, &set_v(23, BARCELONA, 99)).await.status, 200);
    let after_far = query(http, &base, &area).await;
    assert!(after_far.cache.starts_with("cellgate; hit"), "{after_far:?}");
    // Inside: a miss, and the new value.
    assert_eq!(execute(http, &base, &set_v(22, near, 77)).await.status, 200);
    let after_near = query(http, &base, &area).await;
    assert!(after_near.cache.starts_with("cellgate; fwd=miss; stored"), "{after_near:?}");
    assert_eq!(after_near.body["rows"], json!([{"id": 21, "v": 21}, {"id": 22, "v": 77}]));
    assert!(query(http, &base, &area).await.cache.starts_with("cellgate; hit"));
    stack.stop().await;
}

/// Readers and writers on two instances; Redis is killed under them, then a new one starts on
/// the same port. No request fails, no token read and no primary read through the writer shows
/// a row older than an acknowledged write, and the cache serves again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load() {
    let mut redis = Redis::start();
    let mut stack = Stack::start(1, 1, with_cache(Some(&redis), "")).await;
    stack.add_instance(with_cache(Some(&redis), "")).await;
    let bases = [stack.data(), stack.data_of(0)];
    let admins = [stack.admin(), stack.admin_of(0)];
    let http = stack.http.clone();
    wait_ready(&http, &admins[1], Duration::from_secs(30)).await;
    for a in &admins {
        wait_serving(&http, a, Duration::from_secs(10)).await;
    }
    for w in 0..6i64 {
        stack.insert(300 + w, "load", (MADRID.0 + 0.01 * w as f64, MADRID.1 - 0.01)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (failed, stale, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for w in 0..6i64 {
        let (http, bases, stop) = (http.clone(), bases.clone(), stop.clone());
        let (failed, stale, done) = (failed.clone(), stale.clone(), done.clone());
        let (id, at) = (300 + w, (MADRID.0 + 0.01 * w as f64, MADRID.1 - 0.01));
        tasks.push(tokio::spawn(async move {
            let mut k = 0i64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let (me, other) = if k % 2 == 0 { (&bases[0], &bases[1]) } else { (&bases[1], &bases[0]) };
                let v = w * 1_000_000 + k;
                let ok = |g: &Got| {
                    done.fetch_add(1, Ordering::Relaxed);
                    if g.status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {g:?}");
                        return false;
                    }
                    true
                };
                // A cached read on each instance, the write, then the checks.
                for b in [me, other] {
                    ok(&query(&http, b, &read_v(id, at)).await);
                }
                let wr = execute(&http, me, &set_v(id, at, v)).await;
                if !ok(&wr) {
                    continue;
                }
                let t = wr.body["token"].as_str().unwrap().to_string();
                let by_token = query(&http, other, &token_read(id, at, &t)).await;
                let mut primary = read_v(id, at);
                primary["consistency"] = json!("primary");
                let own = query(&http, me, &primary).await;
                for g in [by_token, own] {
                    if ok(&g) && v_of(&g) != v {
                        stale.fetch_add(1, Ordering::Relaxed);
                        eprintln!("stale after the acknowledged write of {v}: {g:?}");
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = done.load(Ordering::Relaxed);
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = done.load(Ordering::Relaxed) - before;
    for a in &admins {
        let s = cache_status(&http, a).await;
        assert_eq!(s["serving"], false, "serving without Redis: {s}");
    }
    redis.restart();
    let back = Instant::now();
    for a in &admins {
        wait_serving(&http, a, Duration::from_secs(10)).await;
    }
    let back_in = back.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Serving again: a hit on each instance.
    for b in &bases {
        let body = read_v(300, (MADRID.0, MADRID.1 - 0.01));
        query(&http, b, &body).await;
        let g = query(&http, b, &body).await;
        assert!(g.cache.starts_with("cellgate; hit"), "not serving after Redis came back: {g:?}");
    }
    let s = cache_status(&http, &admins[0]).await;
    println!(
        "redis killed under load: {} requests ({during} while Redis was down), {} failed, {} stale; both instances \
         serving again {:.0} ms after the new Redis answered; link: {}",
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        stale.load(Ordering::Relaxed),
        back_in.as_secs_f64() * 1000.0,
        s["redis"]
    );
    assert!(during > 50, "too little load while Redis was down ({during})");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert_eq!(stale.load(Ordering::Relaxed), 0);
    stack.stop().await;
}

/// A flood of large distinct results keeps L1 within `l1_bytes` (entries evicted, the oldest
/// then answered from Redis, lz4-compressed there); a result over `max_entry_bytes` is served
/// but not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l1_stays_within_its_bytes() {
    let redis = Redis::start();
    let limits = "l1_bytes = 1048576\nmax_entry_bytes = 262144\ncompress_above_bytes = 1024\n";
    let mut stack = Stack::start(1, 1, with_cache(Some(&redis), limits)).await;
    wait_serving(&stack.http, &stack.admin(), Duration::from_secs(10)).await;
    let (http, base) = (&stack.http.clone(), stack.data());
    let big = |k: i64, n: i64| {
        json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT $1::int AS k, repeat('x', $2::int) AS big",
               "params": [k, n], "cache": {"ttl_ms": 60000}})
    };
    for k in 0..120 {
        let g = query(http, &base, &big(k, 50_000)).await;
        assert_eq!(g.status, 200, "{g:?}");
        assert!(g.cache.contains("stored"), "{g:?}");
    }
    let s = cache_status(http, &stack.admin()).await;
    let l1 = &s["l1"];
    println!("after 120 results of ~50 KB into a 1 MiB L1: {l1}");
    assert!(l1["bytes"].as_u64().unwrap() <= 1_048_576, "{s}");
    assert!(l1["evicted"].as_u64().unwrap() > 0, "{s}");
    assert!(l1["entries"].as_u64().unwrap() < 40, "{s}");
    // The first one left L1 long ago; Redis still has it (compressed: 50 KB of 'x').
    let g = query(http, &base, &big(0, 50_000)).await;
    assert!(g.cache.starts_with("cellgate; hit; ttl=") && g.cache.ends_with("; detail=l2"), "{g:?}");
    assert_eq!(g.body["rows"][0]["big"].as_str().unwrap().len(), 50_000);
    // Over max_entry_bytes: served, not stored.
    let g = query(http, &base, &big(1000, 300_000)).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.cache, "cellgate; fwd=miss", "{g:?}");
    // An instance whose whole L1 is smaller than one entry still stores it in Redis (and, on
    // the next read, answers it from there).
    let i = stack.add_instance(with_cache(Some(&redis), "l1_bytes = 4096\nmax_entry_bytes = 262144\n")).await;
    wait_serving(http, &stack.admin_of(i), Duration::from_secs(10)).await;
    let small = stack.data_of(i);
    let g = query(http, &small, &big(2000, 50_000)).await;
    assert_eq!((g.status, g.cache.as_str()), (200, "cellgate; fwd=miss; stored; ttl=60"));
    let t0 = Instant::now();
    loop {
        let g = query(http, &small, &big(2000, 50_000)).await;
        if g.cache.ends_with("; detail=l2") {
            assert_eq!(g.body["rows"][0]["big"].as_str().unwrap().len(), 50_000);
            break;
        }
        // The L2 write runs in the background after the answer.
        assert!(t0.elapsed() < Duration::from_secs(5), "never stored in Redis: {} {}", g.status, g.cache);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cache_status(http, &stack.admin_of(i)).await["l1"]["entries"], 0);
    stack.stop().await;
}

/// Cache-Status and Age; only-if-cached (504 on a miss), no-store, no-cache; stale-while-
/// revalidate after a write that bypassed cellgate (bounded by the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_semantics() {
    let redis = Redis::start();
    let stack = Stack::start(1, 1, with_cache(Some(&redis), "")).await;
    wait_serving(&stack.http, &stack.admin(), Duration::from_secs(10)).await;
    let (http, base) = (&stack.http, stack.data());
    stack.insert(41, "h", MADRID).await;
    let q = |cc: Option<&'static str>, body: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move { post(&http, &base, "/v1/sql/core/query", READ_TOKEN, &body, cc).await }
    };
    let body = read_v(41, MADRID);
    // only-if-cached on a miss: 504.
    let g = q(Some("only-if-cached"), body.clone()).await;
    assert_eq!((g.status, g.body["error"]["code"].as_str()), (504, Some("not_cached")), "{g:?}");
    assert_eq!(g.cache, "cellgate; fwd=miss; detail=only-if-cached");
    // no-store: answered, not stored.
    let g = q(Some("no-store"), body.clone()).await;
    assert_eq!((g.status, g.cache.as_str()), (200, "cellgate; fwd=miss"), "{g:?}");
    assert_eq!(q(Some("only-if-cached"), body.clone()).await.status, 504);
    // A plain miss stores; the next is a hit with Age.
    let g = q(None, body.clone()).await;
    assert_eq!(g.cache, "cellgate; fwd=miss; stored; ttl=60", "{g:?}");
    assert_eq!(g.age, None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let g = q(Some("only-if-cached"), body.clone()).await;
    assert_eq!((g.status, g.cache.as_str()), (200, "cellgate; hit; ttl=58"), "{g:?}");
    assert_eq!(g.age, Some(1));
    // A write that bypasses cellgate is not seen while the entry is fresh...
    stack.cluster.shards[0].primary.psql("core", "UPDATE items SET v = 4242 WHERE id = 41").unwrap();
    stack.cluster.shards[0].wait_for_replicas(Duration::from_secs(10)).unwrap();
    assert_eq!(v_of(&q(None, body.clone()).await), 41);
    // ...no-cache reads the backend and stores the answer.
    let g = q(Some("no-cache"), body.clone()).await;
    assert_eq!((v_of(&g), g.cache.as_str()), (4242, "cellgate; fwd=request; stored; ttl=60"), "{g:?}");
    assert_eq!(v_of(&q(Some("only-if-cached"), body.clone()).await), 4242);
    // Stale-while-revalidate: past its TTL the entry is served (ttl < 0) while one refresh runs.
    // (The TTL is not part of the key: no-cache replaces the 60 s entry with a 300 ms one.)
    let mut swr = read_v(41, MADRID);
    swr["cache"] = json!({"ttl_ms": 300, "swr_ms": 30000});
    assert_eq!(q(Some("no-cache"), swr.clone()).await.cache, "cellgate; fwd=request; stored; ttl=0");
    stack.cluster.shards[0].primary.psql("core", "UPDATE items SET v = 4343 WHERE id = 41").unwrap();
    stack.cluster.shards[0].wait_for_replicas(Duration::from_secs(10)).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let g = q(None, swr.clone()).await;
    assert_eq!(v_of(&g), 4242, "{g:?}");
    assert!(g.cache.starts_with("cellgate; hit; ttl=-"), "{g:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let g = q(Some("only-if-cached"), swr.clone()).await;
        if v_of(&g) == 4343 {
            assert!(g.cache.starts_with("cellgate; hit"), "{g:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the refresh never landed: {g:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not opted in: no header. A bad opt-in: 400.
    let plain = json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT 1 AS one"});
    assert_eq!(q(None, plain).await.cache, "");
    let bad = json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT 1 AS one", "cache": {"ttl_ms": 0}});
    assert_eq!(q(None, bad).await.status, 400);
    stack.stop().await;
}

/// A cached read of a cell that a live migration moves: after the cutover the entry filled on
/// the old owner is not served (the cutover bumped the moved cells), the read is answered by the
/// new owner's primary (its replicas may not hold the copy yet), and writes on the new owner are
/// seen at once through a second instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migration_cutover_bumps_the_moved_cells() {
    let redis = Redis::start();
    let mut stack = Stack::start(2, 1, with_cache(Some(&redis), "")).await;
    stack.add_instance(with_cache(Some(&redis), "")).await;
    let (a, b, http) = (stack.data(), stack.data_of(0), stack.http.clone());
    wait_ready(&http, &stack.admin_of(0), Duration::from_secs(30)).await;
    wait_serving(&http, &stack.admin(), Duration::from_secs(10)).await;
    wait_serving(&http, &stack.admin_of(0), Duration::from_secs(10)).await;
    assert!(in_moving(MADRID));
    stack.insert(61, "moving", MADRID).await;
    stack.insert(62, "staying", BARCELONA).await;
    for base in [&a, &b] {
        query(&http, base, &read_v(61, MADRID)).await;
        let g = query(&http, base, &read_v(61, MADRID)).await;
        assert!(g.cache.starts_with("cellgate; hit"), "{g:?}");
        assert_eq!(g.body["shards"][0]["id"], "a");
    }
    query(&http, &a, &read_v(62, BARCELONA)).await;
    let r = http
        .post(format!("{}/admin/migrations", stack.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"cells": [moving_cell()], "to": "b", "hold_ms": 5000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = stack.admin_value(&format!("/admin/migrations/{id}")).await;
        if d["state"] == "done" {
            break;
        }
        assert!(d["state"] != "failed" && Instant::now() < deadline, "migration: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The instance that did not orchestrate learns the map by the push; wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    for base in [&a, &b] {
        loop {
            let g = query(&http, base, &read_v(61, MADRID)).await;
            assert_eq!(v_of(&g), 61);
            if g.body["shards"][0]["id"] == "b" {
                // Filled on the new owner, from its primary (the moved cell's floor): by this
                // read (A), or by A's read and found in Redis (B).
                let expect = if base == &a { "cellgate; fwd=miss" } else { "cellgate; hit; ttl=" };
                assert!(g.cache.starts_with(expect), "{g:?}");
                assert_eq!(g.body["shards"][0]["role"], "primary", "{g:?}");
                break;
            }
            // Still the old entry only while this instance has not published the new map.
            assert!(Instant::now() < deadline, "still served from shard a: {g:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A cell outside the move kept its entry.
    assert!(query(&http, &a, &read_v(62, BARCELONA)).await.cache.starts_with("cellgate; hit"));
    // Writes on the new owner: seen through the other instance, with a token and without.
    let w = execute(&http, &a, &set_v(61, MADRID, 6161)).await;
    assert_eq!(w.status, 200, "{w:?}");
    let t = w.body["token"].as_str().unwrap();
    assert_eq!(v_of(&query(&http, &b, &token_read(61, MADRID, t)).await), 6161);
    let deadline = Instant::now() + Duration::from_secs(2);
    while v_of(&query(&http, &b, &read_v(61, MADRID)).await) != 6161 {
        assert!(Instant::now() < deadline, "the write on the new owner never showed through B");
    }
    stack.stop().await;
}

/// The document API: find, count and aggregate are cached; an update through cellgate makes
/// them misses with the new document; a token read sees the update (SecantusDB: operation-time
/// tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documents_are_cached_and_invalidated() {
    use support::mongo::{DocStack, Peer, PeerKind};
    let redis = Redis::start();
    let (pa, pb) = (Peer::start(PeerKind::Secantus), Peer::start(PeerKind::Secantus));
    let st =
        DocStack::start_map_conf(&support::mongo::map_toml(&[pa.uri(), pb.uri()]), with_cache(Some(&redis), "")).await;
    wait_serving(&st.http, &st.admin(), Duration::from_secs(10)).await;
    let (http, base) = (&st.http, st.data());
    let region = json!({"lat": MADRID.0, "lng": MADRID.1});
    let ins = json!({"documents": [
        {"name": "ana", "n": 1, "loc": {"type": "Point", "coordinates": [MADRID.1, MADRID.0]}},
        {"name": "bea", "n": 5, "loc": {"type": "Point", "coordinates": [MADRID.1, MADRID.0]}}]});
    let g = post(http, &base, "/v1/docs/profiles/people/insert", WRITE_TOKEN, &ins, None).await;
    assert_eq!(g.status, 200, "{g:?}");
    let reads = [
        (
            "find",
            json!({"region": region, "filter": {"name": "ana"}, "projection": {"_id": 0}, "cache": {"ttl_ms": 60000}}),
        ),
        ("count", json!({"region": region, "filter": {"n": {"$gte": 2}}, "cache": {"ttl_ms": 60000}})),
        (
            "aggregate",
            json!({"region": region, "pipeline": [{"$group": {"_id": null, "total": {"$sum": "$n"}}}],
            "cache": {"ttl_ms": 60000}}),
        ),
    ];
    let read = |op: &str, body: &Value| {
        let (http, base, path, body) =
            (http.clone(), base.clone(), format!("/v1/docs/profiles/people/{op}"), body.clone());
        async move { post(&http, &base, &path, READ_TOKEN, &body, None).await }
    };
    let mut first = Vec::new();
    for (op, body) in &reads {
        let miss = read(op, body).await;
        assert!(miss.cache.starts_with("cellgate; fwd=miss; stored"), "{op}: {miss:?}");
        let hit = read(op, body).await;
        assert!(hit.cache.starts_with("cellgate; hit"), "{op}: {hit:?}");
        assert_eq!(hit.body, miss.body, "{op}: the entry answers exactly what the backend did");
        first.push(hit.body);
    }
    assert_eq!(
        first[0]["documents"],
        json!([{"name": "ana", "n": 1, "loc": {"type": "Point", "coordinates": [MADRID.1, MADRID.0]}}])
    );
    assert_eq!(first[1]["count"], 1);
    assert_eq!(first[2]["documents"][0]["total"], 6);
    let up = json!({"region": region, "filter": {"name": "ana"}, "update": {"$set": {"n": 3}}});
    let w = post(http, &base, "/v1/docs/profiles/people/update", WRITE_TOKEN, &up, None).await;
    assert_eq!((w.status, &w.body["modified"]), (200, &json!(1)), "{w:?}");
    for (op, body) in &reads {
        let g = read(op, body).await;
        assert!(g.cache.starts_with("cellgate; fwd=miss; stored"), "{op} after the update: {g:?}");
    }
    let mut by_token = reads[0].1.clone();
    by_token["consistency"] = json!({"after": w.body["token"], "wait_ms": 500});
    let g = read("find", &by_token).await;
    assert_eq!(g.body["documents"][0]["n"], 3, "{g:?}");
    assert_eq!(read("count", &reads[1].1).await.body["count"], 2);
    assert_eq!(read("aggregate", &reads[2].1).await.body["documents"][0]["total"], 8);
    st.stop().await;
}
