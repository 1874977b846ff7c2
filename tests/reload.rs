//! Live map changes: ≥ 100 swaps under continuous reads and writes with 0 failed requests;
//! invalid pushes rejected with every error while the old map keeps serving; versions only move
//! forward; If-Match; file watch; pools of unchanged endpoints reused.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

async fn put_map(st: &Stack, body: String, if_match: Option<u64>, json_body: bool) -> (u16, Value) {
    let mut req = st.http.put(format!("{}/admin/map", st.admin())).bearer_auth(ADMIN_TOKEN).body(body);
    if json_body {
        req = req.header("content-type", "application/json");
    }
    if let Some(v) = if_match {
        req = req.header("if-match", format!("\"{v}\""));
    }
    let r = req.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

fn with_version(map: &str, v: u64) -> String {
    map.replacen("version = 1\n", &format!("version = {v}\n"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_under_load_fail_nothing() {
    let st = Arc::new(Stack::start(2, 1, |_| {}).await);
    let base = map_toml(&st.cluster, None);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..4 {
        let (st, stop, ok, failed) = (st.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let at = if i % 2 == 0 { MADRID } else { PARIS };
                let (s, v) = if w % 2 == 0 {
                    let id = w as i64 * 1_000_000 + i;
                    st.execute(json!({"region": {"lat": at.0, "lng": at.1},
                        "sql": "INSERT INTO items (id, name, h3) VALUES ($1, 'load', $2)", "params": [id, h3_of(at.0, at.1)]}))
                        .await
                } else {
                    st.query(json!({"region": {"lat": at.0, "lng": at.1}, "sql": "SELECT count(*) AS n FROM items"})).await
                };
                if s == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed during swaps: {s} {v}");
                }
            }
        }));
    }
    // 100 valid swaps: alternate between two equivalent layouts (an extra, finer assignment of
    // Madrid's cell to the same shard), each a new version.
    let finer = "[[assign]]\nshard = \"a\"\ncells = [\"85390cb3fffffff\"]\n";
    let t = Instant::now();
    for v in 2..=101u64 {
        let mut m = with_version(&base, v);
        if v % 2 == 0 {
            m += finer;
        }
        let (s, out) = put_map(&st, m, None, false).await;
        assert_eq!(s, 200, "{out}");
        assert_eq!(out["result"], "published");
        assert_eq!(out["version"], v);
    }
    let swaps_took = t.elapsed();
    // Invalid pushes, each kind of error: rejected with every error, old map kept.
    let bad: Vec<(String, Vec<&str>)> = vec![
        (with_version(&base, 200).replace("shard = \"b\"", "shard = \"zz\""), vec!["unknown shard id \"zz\""]),
        (
            with_version(&base, 200) + "[[assign]]\nshard = \"a\"\ncells = [\"not-a-cell\", \"8a390cb1a4dffff\"]\n",
            vec!["invalid H3 cell", "finer than the map resolution"],
        ),
        (
            with_version(&base, 200) + "[[assign]]\nshard = \"b\"\ncells = [\"8039fffffffffff\"]\n",
            vec!["assigned twice"],
        ),
        (
            with_version(&base, 200)
                .replace("mode = \"reject\"", "mode = \"hash\"\nshards = [\"ghost\"]\nresolution = 2"),
            vec!["unknown shard id \"ghost\""],
        ),
        (with_version(&base, 200) + "[tables.nope.t]\ncell_column = \"h3\"\n", vec!["names database \"nope\""]),
        (with_version(&base, 200).replacen("id = \"b\"", "id = \"a\"", 1), vec!["duplicate shard id"]),
        (
            with_version(&base, 200).replace("primary = \"postgres://", "primary = \"mysql://"),
            vec!["connection string must start"],
        ),
        ("this is not toml".to_string(), vec!["syntax"]),
        (with_version(&base, 50), vec!["not greater than the current version"]),
        (with_version(&base, 101) + "# same version, different bytes\n", vec!["not greater than the current version"]),
    ];
    for (m, wants) in bad {
        let (s, out) = put_map(&st, m, None, false).await;
        assert!(s == 422 || s == 409, "{out}");
        let errors = out["errors"].as_array().unwrap();
        for want in &wants {
            assert!(errors.iter().any(|e| e.as_str().unwrap().contains(want)), "{want:?} not in {out}");
        }
        assert_eq!(out["previous_version"], 101);
    }
    // A map whose new endpoint cannot be reached is refused before publishing.
    let unreachable = with_version(&base, 300).replace(
        &format!("\"{}\"", st.cluster.shards[1].replicas[0].app_url("core")),
        "\"postgres://app:x@127.0.0.1:1/core\"",
    );
    let (s, out) = put_map(&st, unreachable, None, false).await;
    assert_eq!(s, 422, "{out}");
    assert!(out["errors"][0].as_str().unwrap().contains("127.0.0.1:1/core"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (_, m) = st.admin_get("/admin/map").await;
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["version"], 101, "old map kept after rejected pushes");
    assert!(m["last_reload"]["errors"].as_array().is_some_and(|e| !e.is_empty()), "{m}");
    eprintln!(
        "100 swaps in {swaps_took:?}; requests during swaps: {} ok, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let st = Arc::try_unwrap(st).ok().unwrap();
    st.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_json_file_watch_and_pool_reuse() {
    // One shared read connection per endpoint, so two reads on a kept endpoint see the same backend.
    let st = Stack::start(1, 1, |c| *c = c.replace("[pool]\n", "[pool]\npipeline_connections = 1\n")).await;
    let base = map_toml(&st.cluster, None);
    // Warm a pooled connection and remember its backend pid: reuse keeps it.
    let pid_sql = json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT pg_backend_pid() AS pid", "consistency": "primary"});
    let (_, r) = st.query(pid_sql.clone()).await;
    let pid = r["rows"][0]["pid"].as_i64().unwrap();

    let (s, out) = put_map(&st, with_version(&base, 2), Some(7), false).await;
    assert_eq!(s, 409, "{out}");
    assert!(out["errors"][0].as_str().unwrap().contains("If-Match"));
    let (s, out) = put_map(&st, with_version(&base, 2), Some(1), false).await;
    assert_eq!(s, 200, "{out}");

    // The same map as JSON.
    let as_json = serde_json::to_string(&toml::from_str::<toml::Value>(&with_version(&base, 3)).unwrap()).unwrap();
    let (s, out) = put_map(&st, as_json, None, true).await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["version"], 3);
    let (_, r) = st.query(pid_sql.clone()).await;
    assert_eq!(r["rows"][0]["pid"].as_i64().unwrap(), pid, "unchanged endpoint kept its pooled connection");
    assert_eq!(r["map_version"], 3);

    // The pushed map was persisted: the file holds version 3 now.
    let path = st.dir.join("map.toml");
    assert!(std::fs::read_to_string(&path).unwrap().contains("version = 3"));
    // File watch: an edited file is published by itself.
    cellgate::reload::write_atomic(&path, &with_version(&base, 4)).unwrap();
    let t = Instant::now();
    loop {
        let (_, m) = st.admin_get("/admin/map").await;
        let m: Value = serde_json::from_str(&m).unwrap();
        if m["version"] == 4 {
            assert_eq!(m["last_reload"]["trigger"], "watch", "{m}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "file change not picked up: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // POST /admin/map/reload re-reads the file: same bytes → unchanged.
    let r = st.http.post(format!("{}/admin/map/reload", st.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["result"], "unchanged", "{out}");
    // A broken file is refused and the old map keeps serving.
    std::fs::write(&path, "version = 5\nresolution = 99\n").unwrap();
    let r = st.http.post(format!("{}/admin/map/reload", st.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let (s, r) = st.query(pid_sql).await;
    assert_eq!(s, 200);
    assert_eq!(r["map_version"], 4);

    // `cellgate map push` uses the same API.
    let f = st.dir.join("push.toml");
    std::fs::write(&f, with_version(&base, 6)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["map", "push", f.to_str().unwrap(), "--admin", &st.admin(), "--token", ADMIN_TOKEN])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"published\""));
    st.stop().await;
}

/// Fleet: a map published on one instance is pushed to every peer; the response lists each
/// peer's acknowledged version, and a peer that does not answer is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_push_reaches_every_peer() {
    let mut st = Stack::start(1, 0, |_| {}).await;
    // The peer runs on its own copy of the map file (another machine, in effect).
    let peer_dir = st.dir.join("peer");
    std::fs::create_dir_all(&peer_dir).unwrap();
    std::fs::copy(st.dir.join("map.toml"), peer_dir.join("map.toml")).unwrap();
    let peer_map = peer_dir.join("map.toml").display().to_string();
    let own_map = st.dir.join("map.toml").display().to_string();
    let peer = st.add_instance(|c| *c = c.replace(&own_map, &peer_map)).await;
    let dead = "http://127.0.0.1:1";
    let peer_admin = st.admin_of(peer);
    let first = st.server.take().unwrap();
    first.shutdown().await;
    let cfg =
        format!("peers = [\"{peer_admin}\", \"{dead}\"]\npeer_token = \"{ADMIN_TOKEN}\"\n{}", config_text(&st.dir));
    st.server = Some(cellgate::server::start(cellgate::config::Config::parse(&cfg).unwrap(), false).await.unwrap());
    st.wait_ready().await;

    let base = map_toml(&st.cluster, None);
    let (s, out) = put_map(&st, with_version(&base, 2), None, false).await;
    assert_eq!(s, 200, "{out}");
    let peers = out["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{out}");
    let ok = peers.iter().find(|p| p["peer"] == peer_admin.as_str()).unwrap();
    assert_eq!(ok["acknowledged"], true, "{out}");
    assert_eq!(ok["version"], 2);
    let bad = peers.iter().find(|p| p["peer"] == dead).unwrap();
    assert_eq!(bad["acknowledged"], false);
    assert!(bad["error"].as_str().is_some_and(|e| !e.is_empty()), "{out}");
    let r = st.http.get(format!("{peer_admin}/admin/map")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], 2, "the peer serves the pushed map");
    assert!(
        std::fs::read_to_string(peer_dir.join("map.toml")).unwrap().contains("version = 2"),
        "persisted on the peer"
    );
    st.stop().await;
}
