//! Cache warming against a real Redis (started here, on a free port, without persistence) and real
//! PostgreSQL (the harness): the plain cached reads an instance answers are recorded in Redis (and
//! read-your-writes reads are not); a new instance prefills the hottest of them on start, bounded
//! in count and in time (pg_stat_statements counts the backend executions, `Cache-Status` shows
//! what the first client reads found); after a live migration the hot reads of the moved cell are
//! refilled from the new owner. A missing `redis-server` fails every test here, with a message.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// A redis-server of this test: a free loopback port, no persistence, killed on drop.
struct Redis {
    port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Redis {
    async fn start() -> Redis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cellgate-redis-warm-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): the cache tests need a real Redis (Debian: apt-get install redis-server)")
            });
        let r = Redis { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.conn().await.is_none() {
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer in 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let c = redis::Client::open(self.url()).ok()?;
        let mut c = c.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING").query_async::<String>(&mut c).await.ok()?;
        Some(c)
    }

    /// The hot set of `db`, hottest first: (member, score).
    async fn hot(&self, db: &str) -> Vec<(String, f64)> {
        let mut c = self.conn().await.unwrap();
        redis::cmd("ZREVRANGE")
            .arg(format!("cellgate:warm:{db}"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// The descriptions of `db`'s hot set.
    async fn descriptions(&self, db: &str) -> Vec<Value> {
        let mut c = self.conn().await.unwrap();
        let all: Vec<String> =
            redis::cmd("HVALS").arg(format!("cellgate:warm:{db}:d")).query_async(&mut c).await.unwrap();
        all.iter().map(|d| serde_json::from_str(d).unwrap()).collect()
    }

    /// Put a description into `db`'s hot set, as a hostile or stale recorder could.
    async fn inject(&self, db: &str, member: &str, score: f64, description: &Value) {
        let mut c = self.conn().await.unwrap();
        let _: () = redis::cmd("ZADD")
            .arg(format!("cellgate:warm:{db}"))
            .arg(score)
            .arg(member)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg(format!("cellgate:warm:{db}:d"))
            .arg(member)
            .arg(description.to_string())
            .query_async(&mut c)
            .await
            .unwrap();
    }

    /// Delete every stored entry (L2): what an instance then holds it must have read itself.
    async fn drop_entries(&self) {
        let mut c = self.conn().await.unwrap();
        let script =
            "local ks = redis.call('KEYS', ARGV[1]) for _, k in ipairs(ks) do redis.call('DEL', k) end return #ks";
        let _: i64 = redis::cmd("EVAL").arg(script).arg(0).arg("cellgate:e:*").query_async(&mut c).await.unwrap();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn with_cache(redis: &Redis, extra: &str) -> impl Fn(&mut String) {
    let text = format!("\n[cache]\nenabled = true\nredis = \"{}\"\nredis_timeout_ms = 200\n{extra}", redis.url());
    move |cfg: &mut String| cfg.push_str(&text)
}

/// Status, `Cache-Status`, body.
async fn query(http: &reqwest::Client, base: &str, body: &Value) -> (u16, String, Value) {
    let resp = http.post(format!("{base}/v1/sql/core/query")).bearer_auth(READ_TOKEN).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let cache = resp.headers().get("cache-status").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, cache, resp.json().await.unwrap())
}

async fn cache_status(http: &reqwest::Client, admin: &str) -> Value {
    let r = http.get(format!("{admin}/admin/cache")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn wait_serving(http: &reqwest::Client, admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache_status(http, admin).await["serving"] != true {
        assert!(Instant::now() < deadline, "cache not serving within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The instance's last warming run once it has one for `reason` after `runs_before` runs.
async fn warm_run(http: &reqwest::Client, admin: &str, reason: &str, runs_before: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cache_status(http, admin).await;
        let w = &s["warm"];
        if w["runs"].as_u64().unwrap_or(0) > runs_before && w["last"]["reason"] == reason {
            return w["last"].clone();
        }
        assert!(Instant::now() < deadline, "no {reason} warming run: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cached read of item `id` at `at`; the `AS warmed` alias names it in pg_stat_statements.
fn read(id: i64, at: (f64, f64)) -> Value {
    json!({"region": {"lat": at.0, "lng": at.1}, "sql": "SELECT id, v, 'w' AS warmed FROM items WHERE id = $1",
           "params": [id], "cache": {"ttl_ms": 60000}})
}

/// Executions of the warmed statement over every node (reads go to replicas).
fn calls(stack: &Stack) -> i64 {
    stack
        .cluster
        .nodes()
        .map(|n| {
            let q = "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%AS warmed%'";
            n.psql("core", q).unwrap().parse::<i64>().unwrap()
        })
        .sum()
}

fn reset_calls(stack: &Stack) {
    for n in stack.cluster.nodes() {
        n.psql("core", "SELECT pg_stat_statements_reset()").unwrap();
    }
}

/// K + 5 reads (each in its own cell) served through A, the first K three times each: Redis
/// records all of them (and not a read-your-writes read), hottest first. A write put on top of
/// the set by hand is skipped by the read check (its row is still there). With the entries gone
/// from Redis, B started with `warm_keys = K + 1` fills exactly the K hottest reads from the
/// backend on start (one execution each): its first reads of them are L1 hits that execute
/// nothing, the 5 colder ones are misses. C, with a ~0 time budget, is cut short: it reports what it did not
/// finish, and its L1 holds exactly what it reports as filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_prefills_the_hottest_recorded_reads() {
    const K: i64 = 6;
    let redis = Redis::start().await;
    let conf = vec![("shared_preload_libraries".to_string(), "pg_stat_statements".to_string())];
    let mut stack = Stack::start_conf(1, 1, None, conf, with_cache(&redis, "")).await;
    let http = stack.http.clone();
    wait_serving(&http, &stack.admin()).await;
    stack.cluster.shards[0].primary.psql("core", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements").unwrap();
    // One cell (at the map resolution) per read, 22 km apart.
    let at = |i: i64| (MADRID.0 + 0.2 * i as f64, MADRID.1);
    for i in 0..K + 5 {
        stack.insert(500 + i, "warm", at(i)).await;
    }
    let a = stack.data();
    for i in 0..K + 5 {
        let times = if i < K { 3 } else { 1 };
        for _ in 0..times {
            let (s, cache, body) = query(&http, &a, &read(500 + i, at(i))).await;
            assert_eq!(s, 200, "{body}");
            assert!(cache.starts_with("cellgate; "), "{cache}");
        }
    }
    // A read-your-writes read is one client's: answered from (or into) the cache, never recorded.
    let w = stack
        .execute(json!({"region": {"lat": at(0).0, "lng": at(0).1},
        "sql": "UPDATE items SET v = v WHERE id = $1", "params": [500]}))
        .await;
    let mut ryw = read(500, at(0));
    ryw["sql"] = json!("SELECT id, v, 'ryw' AS warmed_by_token FROM items WHERE id = $1");
    ryw["consistency"] = json!({"after": w.1["token"], "wait_ms": 500});
    let (s, cache, body) = query(&http, &a, &ryw).await;
    assert_eq!(s, 200, "{body}");
    assert!(cache.contains("stored"), "the token read was cached: {cache}");
    // The counts reach Redis with the next flush (every 2 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let hot = loop {
        let hot = redis.hot("core").await;
        if hot.len() as i64 == K + 5 && hot.iter().take(K as usize).all(|(_, s)| *s == 3.0) {
            break hot;
        }
        assert!(Instant::now() < deadline, "not recorded as expected: {hot:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(hot.iter().skip(K as usize).all(|(_, s)| *s == 1.0), "{hot:?}");
    // Nothing else was recorded (no token read), and what was says no more than the read.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(redis.hot("core").await.len() as i64, K + 5, "a read-your-writes read was recorded");
    let descriptions = redis.descriptions("core").await;
    assert!(descriptions.iter().all(|d| d["statement"] == json!(read(0, MADRID)["sql"])), "{descriptions:?}");
    println!("recorded: {hot:?}\nfirst description: {}", descriptions[0]);
    // The hottest of all is a write (as a compromised or confused recorder could put there):
    // warming runs the read check first, and skips it.
    let write = json!({"kind": "sql", "db": "core", "region": {"lat": at(0).0, "lng": at(0).1},
        "statement": "DELETE FROM items WHERE id = $1 RETURNING id", "params": [500], "ttl_ms": 60000});
    redis.inject("core", "00000000000000000000000000000000", 1000.0, &write).await;
    // B must read the backend itself: no entry left in Redis.
    redis.drop_entries().await;
    reset_calls(&stack);
    let b = stack.add_instance(with_cache(&redis, &format!("warm_keys = {}\nwarm_ms = 30000\n", K + 1))).await;
    let (b_data, b_admin) = (stack.data_of(b), stack.admin_of(b));
    let run = warm_run(&http, &b_admin, "start", 0).await;
    let warmed_calls = calls(&stack);
    println!("B's start run: {run}; backend executions: {warmed_calls}");
    assert_eq!((run["asked"].as_i64(), run["filled"].as_i64()), (Some(K + 1), Some(K)), "{run}");
    assert_eq!((run["failed"].as_i64(), run["skipped"].as_i64(), run["cut"].as_i64()), (Some(0), Some(1), Some(0)));
    assert_eq!(warmed_calls, K, "one backend execution per warmed read");
    let left = stack.cluster.shards[0].primary.psql("core", "SELECT count(*) FROM items WHERE id = 500").unwrap();
    assert_eq!(left, "1", "the recorded write ran");
    let mut b_hits = 0;
    for i in 0..K {
        let (s, cache, body) = query(&http, &b_data, &read(500 + i, at(i))).await;
        assert_eq!((s, body["rows"][0]["id"].as_i64()), (200, Some(500 + i)), "{body}");
        assert!(cache.starts_with("cellgate; hit; ttl=") && !cache.contains("l2"), "read {i} on B: {cache}");
        b_hits += 1;
    }
    assert_eq!(calls(&stack), K, "B's first reads of the warmed keys executed nothing");
    for i in K..K + 5 {
        let (_, cache, _) = query(&http, &b_data, &read(500 + i, at(i))).await;
        assert!(cache.starts_with("cellgate; fwd=miss; stored"), "cold read {i} was warmed: {cache}");
    }
    assert_eq!(calls(&stack), K + 5);
    // C: the same ask with a 1 ms budget.
    redis.drop_entries().await;
    let c = stack.add_instance(with_cache(&redis, &format!("warm_keys = {}\nwarm_ms = 1\n", K + 1))).await;
    let (c_data, c_admin) = (stack.data_of(c), stack.admin_of(c));
    let run = warm_run(&http, &c_admin, "start", 0).await;
    let in_l1 = run["filled"].as_i64().unwrap() + run["from_l2"].as_i64().unwrap();
    let mut c_hits = 0;
    for i in 0..K {
        let (_, cache, _) = query(&http, &c_data, &read(500 + i, at(i))).await;
        c_hits += i64::from(cache.starts_with("cellgate; hit") && !cache.contains("l2"));
    }
    println!("B: {b_hits} of {K} first reads were L1 hits; C (warm_ms = 1): {run}, {c_hits} L1 hits");
    assert_eq!(run["asked"].as_i64(), Some(K + 1), "{run}");
    assert!(run["cut"].as_i64().unwrap() > 0, "a 1 ms budget finished every read: {run}");
    assert_eq!(
        run["asked"].as_i64().unwrap(),
        in_l1
            + ["cached", "not_stored", "failed", "skipped", "cut"]
                .iter()
                .map(|k| run[k].as_i64().unwrap())
                .sum::<i64>(),
        "{run}"
    );
    assert_eq!(c_hits, in_l1, "C's L1 holds what its run reports, no more: {run}");
    stack.stop().await;
}

/// Two instances with warming on; hot reads of a cell that a live migration moves and of one it
/// does not. After the cutover each instance runs a migration warming of the moved cell's read
/// only; the orchestrating instance answers its next read of it from L1, filled on the new owner
/// (its primary: the moved cell's floor); the other instance's first read on the new map is a hit
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migration_refills_the_moved_cells_hot_reads() {
    let redis = Redis::start().await;
    let warm = "warm_keys = 4\nwarm_ms = 10000\n";
    let mut stack = Stack::start(2, 1, with_cache(&redis, warm)).await;
    let b = stack.add_instance(with_cache(&redis, warm)).await;
    let (a, http) = (stack.data(), stack.http.clone());
    let (b_data, b_admin) = (stack.data_of(b), stack.admin_of(b));
    wait_ready(&http, &b_admin, Duration::from_secs(30)).await;
    wait_serving(&http, &stack.admin()).await;
    wait_serving(&http, &b_admin).await;
    // Both start runs are done (nothing recorded yet) before the reads below are counted.
    warm_run(&http, &stack.admin(), "start", 0).await;
    warm_run(&http, &b_admin, "start", 0).await;
    assert!(in_moving(MADRID) && !in_moving(BARCELONA));
    stack.insert(61, "moving", MADRID).await;
    stack.insert(62, "staying", BARCELONA).await;
    for body in [read(61, MADRID), read(62, BARCELONA)] {
        for _ in 0..2 {
            let (s, _, v) = query(&http, &a, &body).await;
            assert_eq!((s, &v["shards"][0]["id"]), (200, &json!("a")), "{v}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis.hot("core").await.len() < 2 {
        assert!(Instant::now() < deadline, "the reads were not recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs = |s: &Value| s["warm"]["runs"].as_u64().unwrap();
    let (a_runs, b_runs) =
        (runs(&cache_status(&http, &stack.admin()).await), runs(&cache_status(&http, &b_admin).await));
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
    let run_a = warm_run(&http, &stack.admin(), "migration", a_runs).await;
    let run_b = warm_run(&http, &b_admin, "migration", b_runs).await;
    println!("after the cutover: A's run {run_a}; B's run {run_b}");
    // The moved cell's read only (the Barcelona read is as hot, and not asked).
    assert_eq!(run_a["asked"], 1, "{run_a}");
    // From the new owner, or from Redis if B's run on the new map stored it first.
    let into_l1 = run_a["filled"].as_u64().unwrap() + run_a["from_l2"].as_u64().unwrap();
    assert_eq!(into_l1, 1, "{run_a}");
    assert_eq!(run_b["asked"], 1, "{run_b}");
    assert_eq!(run_b["failed"], 0, "{run_b}");
    let (s, cache, v) = query(&http, &a, &read(61, MADRID)).await;
    assert_eq!(s, 200);
    assert!(cache.starts_with("cellgate; hit; ttl=") && !cache.contains("l2"), "A after the cutover: {cache} {v}");
    assert_eq!((&v["shards"][0]["id"], &v["shards"][0]["role"]), (&json!("b"), &json!("primary")), "{v}");
    // B learns the new map from the watched file, which may come after the cutover's bump: a
    // run on the old map is run again once the map has changed. Either way, B's first read on
    // the new map is an L1 hit.
    let a_version = stack.admin_value("/admin/map").await["version"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = http.get(format!("{b_admin}/admin/map")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        if v.json::<Value>().await.unwrap()["version"].as_u64() == Some(a_version) {
            break;
        }
        assert!(Instant::now() < deadline, "B never loaded map v{a_version}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The catch-up run (if B needed one) starts within 100 ms of the map change.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b_status = cache_status(&http, &b_admin).await;
    let (s, cache, v) = query(&http, &b_data, &read(61, MADRID)).await;
    println!(
        "B: {} migration run(s), last {}; B's first read on the new map: {cache}",
        b_status["warm"]["runs"].as_u64().unwrap() - b_runs,
        b_status["warm"]["last"]
    );
    assert_eq!((s, &v["shards"][0]["id"]), (200, &json!("b")), "{v}");
    assert!(cache.starts_with("cellgate; hit; ttl=") && !cache.contains("l2"), "B on the new map: {cache} {v}");
    stack.stop().await;
}
