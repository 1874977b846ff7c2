//! Fleet mode on etcd (docs/fleet.md), against a real `etcd` started here on free ports and real
//! PostgreSQL shards (tests/support `Stack`): three instances on one etcd; a push reaches all and
//! `--wait` returns only once the last one applied it; of two concurrent pushes exactly one wins;
//! an invalid map written straight into etcd is refused by every instance, which keep serving;
//! etcd stopped under read/write load: no failed request, `/admin/fleet` says since when, a push
//! fails clearly, and a map pushed right after etcd returns is applied everywhere within 1 s.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::etcd::Etcd;
use support::*;

const PREFIX: &str = "/cellgate/test";

/// The test map with another version (and, to make texts differ, a tag in a comment).
fn map_v(stack: &Stack, version: u64, tag: &str) -> String {
    let base = map_toml(&stack.cluster, None);
    format!("# {tag}\n{}", base.replacen("version = 1\n", &format!("version = {version}\n"), 1))
}

/// Start `n` instances reading their map from etcd (each registered as `i<k>`).
async fn etcd_instances(stack: &mut Stack, etcd: &Etcd, n: usize) -> Vec<usize> {
    let mut ids = Vec::new();
    for k in 0..n {
        let line = format!(
            "map = {{ etcd = {{ endpoints = [\"{}\"], prefix = \"{PREFIX}\", instance_id = \"i{k}\", timeout_ms = 1000 }} }}",
            etcd.url()
        );
        let i = stack
            .add_instance(|c| {
                *c = c
                    .lines()
                    .map(|l| if l.starts_with("map = ") { line.clone() } else { l.to_string() })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .await;
        wait_ready(&stack.http, &stack.admin_of(i), Duration::from_secs(30)).await;
        ids.push(i);
    }
    ids
}

async fn admin_json(stack: &Stack, i: usize, path: &str) -> Value {
    let r = stack.http.get(format!("{}{path}", stack.admin_of(i))).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn served_version(stack: &Stack, i: usize) -> u64 {
    admin_json(stack, i, "/admin/map").await["version"].as_u64().unwrap()
}

/// Poll until every instance serves `version`; returns how long it took. Fails after `within`.
async fn all_serve(stack: &Stack, ids: &[usize], version: u64, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let mut all = true;
        for &i in ids {
            all &= served_version(stack, i).await == version;
        }
        if all {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "not every instance serves version {version} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run the CLI binary; returns (exit code, stdout, stderr).
async fn cli(args: Vec<String>) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cellgate")).args(args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn push_args(etcd: &Etcd, file: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["map", "push", &file.display().to_string(), "--etcd", &etcd.url(), "--prefix", PREFIX]
        .map(String::from)
        .into();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn write_map(stack: &Stack, name: &str, text: &str) -> PathBuf {
    let p = stack.dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn read_madrid(stack: &Stack, i: usize) -> (u16, Value) {
    let r = stack
        .http
        .post(format!("{}/v1/sql/core/query", stack.data_of(i)))
        .bearer_auth(READ_TOKEN)
        .json(&json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT count(*) AS n FROM items"}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_push_wait_conflict_and_invalid_map() {
    let etcd = tokio::task::block_in_place(Etcd::start);
    let mut stack = Stack::start(2, 0, |_| {}).await;
    let target = etcd.target(PREFIX);

    // Without a map in etcd an instance does not start, and says why.
    let cfg = config_text(&stack.dir).replace(
        &format!("map = {{ path = \"{}\" }}", stack.dir.join("map.toml").display()),
        &format!("map = {{ etcd = {{ endpoints = [\"{}\"], prefix = \"{PREFIX}\" }} }}", etcd.url()),
    );
    let err = cellgate::server::start(cellgate::config::Config::parse(&cfg).unwrap(), false).await.err().unwrap();
    assert!(err.to_string().contains("no shard map in etcd at /cellgate/test/map"), "{err}");

    let first = cellgate::etcd::push_map(&target, &map_v(&stack, 1, "v1"), None).await.unwrap();
    assert_eq!((first.version, first.previous_version), (1, None));
    let ids = etcd_instances(&mut stack, &etcd, 3).await;
    for &i in &ids {
        assert_eq!(served_version(&stack, i).await, 1);
        assert_eq!(read_madrid(&stack, i).await.0, 200);
    }

    // Every instance registers; /admin/fleet shows the link and the fleet.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let f = admin_json(&stack, ids[0], "/admin/fleet").await;
        if f["fleet"]["instances"].as_array().map(Vec::len) == Some(3) {
            assert_eq!(f["mode"], "etcd");
            assert_eq!(f["instance_id"], "i0");
            assert_eq!(f["etcd"]["connected"], true, "{f}");
            assert!(f["etcd"]["lost_since"].is_null());
            assert_eq!(f["fleet"]["agree"], true);
            assert_eq!(f["registration"]["map_version"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "fleet not complete: {f}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = cellgate::etcd::fleet_status(&target).await.unwrap();
    assert!(status.agree && status.instances.len() == 3 && status.map_version == Some(1), "{status:?}");

    // A local push or reload on an etcd instance is refused: etcd is the one truth.
    let r = stack
        .http
        .put(format!("{}/admin/map", stack.admin_of(ids[1])))
        .bearer_auth(ADMIN_TOKEN)
        .body(map_v(&stack, 9, "local"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("cellgate map push FILE --etcd"));

    // 1. Push v2 with --wait: when the CLI returns, every instance already serves it.
    let v2 = write_map(&stack, "v2.toml", &map_v(&stack, 2, "v2"));
    let (code, out, errs) = cli(push_args(&etcd, &v2, &["--wait=10s"])).await;
    assert_eq!(code, 0, "stdout {out}\nstderr {errs}");
    for &i in &ids {
        assert_eq!(served_version(&stack, i).await, 2, "instance {i} after --wait returned");
    }
    let applied: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(applied["applied"]["instances"].as_array().unwrap().len(), 3, "{out}");
    let (code, out, _) =
        cli(["fleet", "status", "--etcd", &etcd.url(), "--prefix", PREFIX].map(String::from).into()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"agree\": true"), "{out}");

    // 2. Two concurrent pushes of version 3 (different texts): exactly one wins, the other
    //    gets a version conflict (exit 3) and wrote nothing.
    let a = write_map(&stack, "v3a.toml", &map_v(&stack, 3, "v3a"));
    let b = write_map(&stack, "v3b.toml", &map_v(&stack, 3, "v3b"));
    let (ra, rb) = tokio::join!(cli(push_args(&etcd, &a, &[])), cli(push_args(&etcd, &b, &[])));
    let mut codes = [ra.0, rb.0];
    codes.sort();
    assert_eq!(codes, [0, 3], "a: {ra:?}\nb: {rb:?}");
    let loser = if ra.0 == 3 { &ra } else { &rb };
    assert!(loser.2.contains("version conflict"), "{}", loser.2);
    let winner_tag = if ra.0 == 0 { "# v3a" } else { "# v3b" };
    all_serve(&stack, &ids, 3, Duration::from_secs(5)).await;
    for &i in &ids {
        let m = admin_json(&stack, i, "/admin/map").await;
        let sha = m["sha256"].as_str().unwrap().to_string();
        let want = cellgate::state::text_sha256(&map_v(&stack, 3, &winner_tag[2..]));
        assert_eq!(sha, want, "instance {i} serves the winner's text");
    }
    // --if-version names a version that is not the stored one: conflict, exit 3.
    let v4 = write_map(&stack, "v4.toml", &map_v(&stack, 4, "v4"));
    let (code, _, errs) = cli(push_args(&etcd, &v4, &["--if-version", "2"])).await;
    assert_eq!(code, 3, "{errs}");
    assert!(errs.contains("--if-version 2 but etcd holds version 3"), "{errs}");
    // An invalid map file is never written.
    let bad = write_map(&stack, "bad.toml", &map_v(&stack, 4, "bad").replace("shard = \"b\"", "shard = \"zz\""));
    let (code, _, errs) = cli(push_args(&etcd, &bad, &[])).await;
    assert_eq!(code, 1, "{errs}");
    assert!(errs.contains("the map is invalid, nothing was written"), "{errs}");
    assert!(errs.contains("zz"), "the error names the unknown shard: {errs}");

    // 3. An invalid map written straight into etcd: every instance refuses it, keeps version 3
    //    and serves; /admin/map shows the refusal, the metric counts it.
    let invalid = map_v(&stack, 4, "invalid").replace("shard = \"b\"", "shard = \"zz\"");
    etcd.put_raw(&format!("{PREFIX}/map"), &invalid).await;
    for &i in &ids {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = admin_json(&stack, i, "/admin/map").await;
            if m["last_reload"]["result"] == "rejected" {
                assert!(m["last_reload"]["trigger"].as_str().unwrap().starts_with("etcd@"), "{m}");
                assert!(!m["last_reload"]["errors"].as_array().unwrap().is_empty(), "{m}");
                assert_eq!(m["version"], 3);
                break;
            }
            assert!(Instant::now() < deadline, "instance {i} did not refuse the invalid map: {m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(read_madrid(&stack, i).await.0, 200);
    }
    let (_, metrics) = stack.admin_get("/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("cellgate_map_reloads_total{result=\"rejected\"}")),
        "no rejected reload counted"
    );
    // The fleet disagrees with etcd now, and fleet status says so (exit 4).
    let (code, _, errs) =
        cli(["fleet", "status", "--etcd", &etcd.url(), "--prefix", PREFIX].map(String::from).into()).await;
    assert_eq!(code, 4, "{errs}");
    assert!(errs.contains("i0 (serves 3"), "{errs}");
    // A valid push after it (version above the invalid one's) is applied everywhere.
    let v5 = write_map(&stack, "v5.toml", &map_v(&stack, 5, "v5"));
    let (code, _, errs) = cli(push_args(&etcd, &v5, &["--wait=10s"])).await;
    assert_eq!(code, 0, "{errs}");

    // 4. A stopped instance leaves the fleet at once (its lease revoked), so --wait does not
    //    wait for it.
    let gone = stack.extra.remove(ids[2]);
    gone.shutdown().await;
    let status = cellgate::etcd::fleet_status(&target).await.unwrap();
    assert_eq!(status.instances.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["i0", "i1"]);

    // 5. --wait names the instances that do not apply in time: an instance registered by hand
    //    (as a stuck one would be) at version 5.
    let stuck = json!({"id": "stuck", "data": "127.0.0.1:1", "admin": "127.0.0.1:2", "map_version": 5,
                       "healthy": true, "started_at": 0, "updated_at": 0});
    etcd.put_raw(&format!("{PREFIX}/instances/stuck"), &stuck.to_string()).await;
    let v6 = write_map(&stack, "v6.toml", &map_v(&stack, 6, "v6"));
    let t0 = Instant::now();
    let (code, _, errs) = cli(push_args(&etcd, &v6, &["--wait=1500ms"])).await;
    assert_eq!(code, 4, "{errs}");
    assert!(errs.contains("not applied by: stuck (serves 5"), "{errs}");
    assert!(!errs.contains("i0 ("), "{errs}");
    assert!(t0.elapsed() < Duration::from_secs(8));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_loss_under_load_then_catch_up() {
    let outage = Duration::from_secs(
        std::env::var("CELLGATE_TEST_ETCD_OUTAGE_S").ok().and_then(|v| v.parse().ok()).unwrap_or(30),
    );
    let mut etcd = tokio::task::block_in_place(Etcd::start);
    let mut stack = Stack::start(2, 0, |_| {}).await;
    let target = etcd.target(PREFIX);
    cellgate::etcd::push_map(&target, &map_v(&stack, 1, "v1"), None).await.unwrap();
    let ids = etcd_instances(&mut stack, &etcd, 3).await;
    all_serve(&stack, &ids, 1, Duration::from_secs(5)).await;

    // Read/write load through the three instances for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for w in 0..6u64 {
        let (stop, ok, failed, failures) = (stop.clone(), ok.clone(), failed.clone(), failures.clone());
        let (data, http) = (stack.data_of(ids[w as usize % 3]), stack.http.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let at = if n % 2 == 0 { MADRID } else { PARIS };
                let (path, token, body) = if w % 2 == 0 {
                    let id = (w as i64) * 1_000_000 + n;
                    (
                        "execute",
                        WRITE_TOKEN,
                        json!({"region": {"lat": at.0, "lng": at.1},
                        "sql": "INSERT INTO items (id, name, v, lat, lng, h3) VALUES ($1, 'load', 0, $2, $3, $4)",
                        "params": [id, at.0, at.1, h3_of(at.0, at.1)]}),
                    )
                } else {
                    (
                        "query",
                        READ_TOKEN,
                        json!({"region": {"lat": at.0, "lng": at.1}, "sql": "SELECT count(*) AS n FROM items"}),
                    )
                };
                let r = http.post(format!("{data}/v1/sql/core/{path}")).bearer_auth(token).json(&body).send().await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let line = format!("{path}: {} {}", r.status(), r.text().await.unwrap_or_default());
                        failures.lock().unwrap().push(line);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push(format!("{path}: {e}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. etcd dies. Every instance notices, says since when, stays ready and keeps serving.
    let killed_at = std::time::SystemTime::now();
    etcd.kill();
    for &i in &ids {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let f = admin_json(&stack, i, "/admin/fleet").await;
            if f["etcd"]["connected"] == false {
                let since = f["etcd"]["lost_since"].as_u64().unwrap();
                let killed = killed_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                assert!(since + 1 >= killed, "lost_since {since} before the kill {killed}");
                assert!(f["etcd"]["last_error"].as_str().unwrap().contains("etcd unreachable"), "{f}");
                break;
            }
            assert!(Instant::now() < deadline, "instance {i} did not notice etcd is gone: {f}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = stack.http.get(format!("{}/readyz", stack.admin_of(i))).send().await.unwrap();
        assert_eq!(r.status(), 200, "readyz while etcd is down");
    }
    let (_, metrics) = stack.admin_get("/metrics").await;
    assert!(metrics.lines().any(|l| l == "cellgate_etcd_connected 0"), "connected gauge not 0");
    assert!(
        metrics.lines().any(|l| l.starts_with("cellgate_etcd_lost_since_seconds ") && !l.ends_with(" 0")),
        "lost-since gauge not set"
    );

    // 2. A push while etcd is down fails clearly, within its deadlines.
    let v9 = write_map(&stack, "v9.toml", &map_v(&stack, 9, "down"));
    let t0 = Instant::now();
    let (code, _, errs) = cli(push_args(&etcd, &v9, &["--etcd-timeout-ms", "1000"])).await;
    assert_eq!(code, 1, "{errs}");
    assert!(errs.contains("etcd unreachable"), "{errs}");
    assert!(t0.elapsed() < Duration::from_secs(5), "push took {:?}", t0.elapsed());

    // 3. The rest of the outage under load.
    let left = outage.saturating_sub(killed_at.elapsed().unwrap());
    tokio::time::sleep(left).await;

    // 4. etcd returns; a map pushed right away is applied by every instance within 1 s.
    tokio::task::block_in_place(|| etcd.spawn());
    let pushed = cellgate::etcd::push_map(&target, &map_v(&stack, 2, "after"), None).await.unwrap();
    assert_eq!(pushed.version, 2);
    let took = all_serve(&stack, &ids, 2, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(1), "applied everywhere {took:?} after the push");

    // 5. They re-register: the fleet agrees again and each link is up.
    let within = Instant::now() + Duration::from_secs(5);
    loop {
        let s = cellgate::etcd::fleet_status(&target).await.unwrap();
        if s.agree && s.instances.len() == 3 {
            break;
        }
        assert!(Instant::now() < within, "fleet did not re-register: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The registration is written before the session's watches are up and the link is marked
    // connected; a session that fails then (a slow etcd just after its restart) is retried.
    for &i in &ids {
        loop {
            let f = admin_json(&stack, i, "/admin/fleet").await;
            if f["etcd"]["connected"] == true {
                break;
            }
            assert!(Instant::now() < within, "link of instance {i} not up again: {f}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("load: {ok} ok, {failed} failed over an etcd outage of {outage:?}; catch-up push applied in {took:?}");
    assert_eq!(failed, 0, "failed requests: {:?}", failures.lock().unwrap());
    assert!(ok > 1000, "too little load to mean anything: {ok}");
    stack.stop().await;
}

/// Push-to-all-applied over 100 pushes with three instances: each push is written to etcd (the
/// CAS push the CLI uses) and every instance's `/admin/map` is polled until all three serve it.
/// Every push must reach every instance; the distribution is printed for the closing note
/// (`cargo test --release --test etcd push_to_all -- --nocapture`), not asserted: timing belongs
/// to measurements, and this machine is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_to_all_applied_over_100_pushes() {
    let etcd = tokio::task::block_in_place(Etcd::start);
    let mut stack = Stack::start(1, 0, |_| {}).await;
    let target = etcd.target(PREFIX);
    cellgate::etcd::push_map(&target, &map_v(&stack, 1, "v1"), None).await.unwrap();
    let ids = etcd_instances(&mut stack, &etcd, 3).await;
    let mut took = Vec::new();
    for v in 2..=101u64 {
        let text = map_v(&stack, v, &format!("v{v}"));
        let t0 = Instant::now();
        let pushed = cellgate::etcd::push_map(&target, &text, Some(v - 1)).await.unwrap();
        assert_eq!(pushed.version, v);
        loop {
            let mut all = true;
            for &i in &ids {
                all &= served_version(&stack, i).await == v;
            }
            if all {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "push {v} not applied by every instance in 10 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        took.push(t0.elapsed());
    }
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "push-to-all-applied over {} pushes, 3 instances: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        took.len(),
        ms(took[took.len() / 2]),
        ms(took[took.len() * 99 / 100 - 1]),
        ms(took[took.len() - 1])
    );
    stack.stop().await;
}
