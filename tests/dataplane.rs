//! The data plane against real PostgreSQL primaries and streaming replicas (harness), cellgate
//! in-process. Each test starts its own cluster and cleans up.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

fn port(v: &Value) -> u16 {
    v["rows"][0]["port"].as_u64().unwrap() as u16
}

/// Reads land on a replica and writes on the primary, proven from the database side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_replica_writes_on_primary() {
    let st = Stack::start(2, 1, |_| {}).await;
    let a = &st.cluster.shards[0];

    let w = st.insert(1, "madrid-1", MADRID).await;
    assert_eq!(port(&w), a.primary.port, "the write ran on shard a's primary: {w}");
    assert_eq!(w["shards"][0]["id"], "a");
    assert_eq!(w["shards"][0]["role"], "primary");
    assert_eq!(w["rows_affected"], 1);
    assert!(w["token"].is_string());
    assert_eq!(w["map_version"], 1);
    // The row exists on the primary (read directly, not through cellgate).
    assert_eq!(a.primary.psql("core", "SELECT name FROM items WHERE id = 1").unwrap(), "madrid-1");
    assert_eq!(st.cluster.shards[1].primary.psql("core", "SELECT count(*) FROM items").unwrap(), "0");

    let sql = "SELECT pg_is_in_recovery() AS rec, inet_server_port() AS port";
    let (s, r) = st.query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": sql})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["rows"][0]["rec"], true, "a replica answered: {r}");
    assert_eq!(port(&r), a.replicas[0].port);
    assert_eq!(r["shards"][0]["role"], "replica");
    assert_eq!(r["columns"], json!([{"name": "rec", "type": "bool"}, {"name": "port", "type": "int4"}]));

    let (_, r) =
        st.query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": sql, "consistency": "primary"})).await;
    assert_eq!(r["rows"][0]["rec"], false);
    assert_eq!(port(&r), a.primary.port);

    // A cell region and array rows.
    let cell = cellgate::geo::owning_cell(cellgate::geo::point(PARIS.0, PARIS.1).unwrap(), h3o::Resolution::Nine);
    let (_, r) = st.query(json!({"region": {"cell": cell.to_string()}, "sql": sql, "row_format": "array"})).await;
    assert_eq!(r["rows"][0], json!([true, st.cluster.shards[1].replicas[0].port]));
    assert_eq!(r["shards"][0]["id"], "b");
    st.stop().await;
}

/// An area read across both shards with merge equals the same query run directly on the
/// shards and merged by the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn area_read_merges_across_shards() {
    let st = Stack::start(2, 1, |_| {}).await;
    let mut id = 100;
    for (lat, lng) in [MADRID, PARIS, (41.3874, 2.1686), (45.764, 4.8357), (43.2965, 5.3698), (38.7223, -9.1393)] {
        for k in 0..5 {
            id += 1;
            st.insert(id, &format!("item-{id}"), (lat + k as f64 * 0.01, lng)).await;
        }
    }
    for sh in &st.cluster.shards {
        sh.wait_for_replicas(Duration::from_secs(10)).unwrap();
    }
    let sql = "SELECT id, name, v FROM items ORDER BY v DESC, id LIMIT 12";
    let body = json!({
        "region": {"lat": 44.0, "lng": 0.0, "radius_km": 700},
        "sql": sql,
        "merge": {"order_by": [{"column": "v", "desc": true}, {"column": "id"}], "limit": 12},
        "consistency": "primary",
    });
    let (s, r) = st.query(body).await;
    assert_eq!(s, 200, "{r}");
    let ids: Vec<&str> = r["shards"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b"], "both shards asked: {r}");
    // Direct: the same query on each primary, merged here.
    let mut direct: Vec<(i64, i64)> = Vec::new();
    for sh in &st.cluster.shards {
        let out = sh.primary.psql("core", "SELECT id, v FROM items ORDER BY v DESC, id LIMIT 12").unwrap();
        for line in out.lines() {
            let (i, v) = line.split_once('|').unwrap();
            direct.push((i.parse().unwrap(), v.parse().unwrap()));
        }
    }
    direct.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    direct.truncate(12);
    let got: Vec<(i64, i64)> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["id"].as_i64().unwrap(), row["v"].as_i64().unwrap()))
        .collect();
    assert_eq!(got, direct);
    // Without merge: rows are concatenated, all of them.
    let (_, r) = st
        .query(json!({"region": {"lat": 44.0, "lng": 0.0, "radius_km": 700}, "sql": "SELECT id FROM items", "consistency": "primary"}))
        .await;
    assert_eq!(r["rows"].as_array().unwrap().len(), 30);
    st.stop().await;
}

/// A batch whose third statement fails leaves no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_batch_leaves_no_trace() {
    let st = Stack::start(1, 0, |_| {}).await;
    let h3 = h3_of(MADRID.0, MADRID.1);
    let ins = "INSERT INTO items (id, name, h3) VALUES ($1, $2, $3)";
    let (s, r) = st
        .execute(json!({
            "region": {"lat": MADRID.0, "lng": MADRID.1},
            "batch": [
                {"sql": ins, "params": [10, "x", h3]},
                {"sql": ins, "params": [11, "y", h3]},
                {"sql": ins, "params": [10, "dup", h3]},
            ],
        }))
        .await;
    assert_eq!(s, 422, "{r}");
    assert_eq!(r["error"]["code"], "database_error");
    assert_eq!(r["error"]["sqlstate"], "23505");
    assert_eq!(r["error"]["statement"], 2);
    let p = &st.cluster.shards[0].primary;
    assert_eq!(p.psql("core", "SELECT count(*) FROM items").unwrap(), "0");
    // The connection went back clean: the next batch commits.
    let (s, r) = st
        .execute(json!({
            "region": {"lat": MADRID.0, "lng": MADRID.1},
            "batch": [{"sql": ins, "params": [10, "x", h3]}, {"sql": ins, "params": [11, "y", h3]}],
        }))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["rows_affected"], 2);
    assert_eq!(p.psql("core", "SELECT string_agg(name, ',' ORDER BY id) FROM items").unwrap(), "x,y");
    st.stop().await;
}

async fn replica_readable(st: &Stack) -> bool {
    let (_, body) = st.admin_get("/admin/shards").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    v["shards"][0]["databases"]["core"]["endpoints"][1]["readable"].as_bool().unwrap()
}

/// Read-your-writes with replay paused; the lagging replica is excluded and readmitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_and_lag_bound() {
    let st = Stack::start(1, 1, |_| {}).await;
    let replica = &st.cluster.shards[0].replicas[0];
    let region = json!({"lat": MADRID.0, "lng": MADRID.1});
    st.insert(1, "before", MADRID).await;
    st.cluster.shards[0].wait_for_replicas(Duration::from_secs(10)).unwrap();
    assert!(replica_readable(&st).await);

    replica.psql("core", "SELECT pg_wal_replay_pause()").unwrap();
    let w = st.insert(2, "after-pause", MADRID).await;
    let token = w["token"].as_str().unwrap().to_string();
    let paused_at = Instant::now();

    // With the token the write is visible (the replica cannot have it: the primary answers).
    let (s, r) = st
        .query(json!({"region": region, "sql": "SELECT name FROM items WHERE id = 2", "consistency": {"after": token, "wait_ms": 100}}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["rows"][0]["name"], "after-pause", "{r}");
    assert_eq!(r["shards"][0]["role"], "primary");

    // The replica is excluded within 2 health intervals of crossing max_lag_ms (600 ms).
    let deadline = paused_at + Duration::from_millis(600 + 2 * 200 + 400);
    while replica_readable(&st).await {
        assert!(Instant::now() < deadline, "lagging replica still readable after {:?}", paused_at.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let excluded_after = paused_at.elapsed();
    // Default reads now go to the primary, never to the stale replica.
    let (_, r) = st.query(json!({"region": region, "sql": "SELECT count(*) AS n FROM items"})).await;
    assert_eq!(r["shards"][0]["role"], "primary", "{r}");
    assert_eq!(r["rows"][0]["n"], 2);

    replica.psql("core", "SELECT pg_wal_replay_resume()").unwrap();
    let resumed = Instant::now();
    while !replica_readable(&st).await {
        assert!(resumed.elapsed() < Duration::from_secs(5), "replica not readmitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, r) = st.query(json!({"region": region, "sql": "SELECT count(*) AS n FROM items"})).await;
    assert_eq!(r["shards"][0]["role"], "replica", "{r}");
    assert_eq!(r["rows"][0]["n"], 2);
    // With a token from before, a caught-up replica serves the read.
    let (_, r) = st
        .query(json!({"region": region, "sql": "SELECT name FROM items WHERE id = 2", "consistency": {"after": token}}))
        .await;
    assert_eq!(r["shards"][0]["role"], "replica", "{r}");
    assert_eq!(r["rows"][0]["name"], "after-pause");
    eprintln!(
        "lagging replica excluded {excluded_after:?} after pause, readmitted {:?} after resume",
        resumed.elapsed()
    );
    st.stop().await;
}

/// Replica killed under a read loop: at most 2 failed reads of 300. Primary killed: writes get
/// 503 + Retry-After within the deadline while reads keep working on the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_replica_then_primary_killed() {
    let st = Stack::start(1, 1, |_| {}).await;
    st.insert(1, "x", MADRID).await;
    st.cluster.shards[0].wait_for_replicas(Duration::from_secs(10)).unwrap();
    let body = json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT name FROM items WHERE id = 1"});
    let mut failed = 0;
    for i in 0..300 {
        if i == 50 {
            st.cluster.shards[0].replicas[0].kill().unwrap();
        }
        let (s, r) = st.query(body.clone()).await;
        if s != 200 || r["rows"][0]["name"] != "x" {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("replica killed: {failed} of 300 reads failed");
    assert!(failed <= 2, "{failed} reads failed");

    // Bring the replica back, then kill the primary.
    st.cluster.shards[0].replicas[0].start().unwrap();
    let t = Instant::now();
    while !replica_readable(&st).await {
        assert!(t.elapsed() < Duration::from_secs(20), "replica not back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    st.cluster.shards[0].primary.kill().unwrap();
    let deadline = Duration::from_millis(3000);
    for i in 0..10 {
        let t = Instant::now();
        let (s, r, retry) = st
            .post(
                "/v1/sql/core/execute",
                Some(WRITE_TOKEN),
                &json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "INSERT INTO items (id, name, h3) VALUES ($1, 'y', 1)", "params": [100 + i]}),
            )
            .await;
        assert_eq!(s, 503, "{r}");
        assert_eq!(r["error"]["code"], "shard_unavailable");
        assert_eq!(r["error"]["retryable"], true);
        assert!(retry.is_some(), "Retry-After");
        assert!(t.elapsed() < deadline, "write took {:?}", t.elapsed());
        let (s, r) = st.query(body.clone()).await;
        assert_eq!(s, 200, "reads continue on the replica: {r}");
        assert_eq!(r["shards"][0]["role"], "replica");
    }
    st.stop().await;
}

/// HTTP/2 cleartext (prior knowledge) on the same port as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_on_the_data_port() {
    use http_body_util::BodyExt;
    let st = Stack::start(1, 0, |_| {}).await;
    let stream = tokio::net::TcpStream::connect(st.server.as_ref().unwrap().data_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let body = json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT 42 AS x"}).to_string();
    let req = http::Request::post(format!("{}/v1/sql/core/query", st.data()))
        .header("authorization", format!("Bearer {READ_TOKEN}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["rows"][0]["x"], 42);
    st.stop().await;
}

/// Graceful shutdown: readiness turns false, new connections are refused, the request in
/// flight completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight() {
    let mut st = Stack::start(1, 0, |_| {}).await;
    let data = st.data();
    let http = st.http.clone();
    let slow = tokio::spawn(async move {
        http.post(format!("{data}/v1/sql/core/query"))
            .bearer_auth(READ_TOKEN)
            .json(&json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT pg_sleep(1) IS NULL AS slept"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = st.server.take().unwrap();
    let state = server.state.clone();
    let data_addr = server.data_addr;
    let t = Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!cellgate::http::admin::ready(&state), "readiness false once shutdown starts");
    assert!(tokio::net::TcpStream::connect(data_addr).await.is_err(), "no new connections");
    assert_eq!(slow.await.unwrap().unwrap(), 200, "in-flight request completed");
    stopping.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Plain reads are pipelined over the shared connections (`pipeline_connections`): 64 concurrent
/// reads reach the replica over one server connection; when the server kills it, the read that
/// hit the dead connection is retried on the primary and the next reads use a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_reads_share_pipelined_connections() {
    // Each read sleeps 10 ms, so 64 of them queue for 640 ms: the stall bound (which sends reads
    // past a slow queue to an exclusive connection, tests/safety.rs) is raised here so the
    // queue itself is what this test observes.
    let st = Stack::start(1, 1, |c| {
        *c = c.replace("[pool]\n", "[pool]\npipeline_connections = 1\npipeline_stall_ms = 5000\n")
    })
    .await;
    let replica = &st.cluster.shards[0].replicas[0];
    let body = json!({"region": {"lat": MADRID.0, "lng": MADRID.1},
        "sql": "SELECT pg_backend_pid() AS pid, inet_server_port() AS port, pg_sleep(0.01)::text AS s"});
    let reads = (0..64).map(|_| st.query(body.clone()));
    let mut pids = std::collections::BTreeSet::new();
    for (s, r) in futures_util::future::join_all(reads).await {
        assert_eq!(s, 200, "{r}");
        assert_eq!(port(&r), replica.port, "read on the replica: {r}");
        pids.insert(r["rows"][0]["pid"].as_i64().unwrap());
    }
    assert_eq!(pids.len(), 1, "64 concurrent reads shared one server connection, saw backends {pids:?}");
    let pid = *pids.first().unwrap();

    replica.psql("core", &format!("SELECT pg_terminate_backend({pid})")).unwrap();
    let mut replica_pids = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let (s, r) = st.query(body.clone()).await;
        assert_eq!(s, 200, "reads keep working after the shared connection was killed: {r}");
        if port(&r) == replica.port {
            replica_pids.insert(r["rows"][0]["pid"].as_i64().unwrap());
        }
    }
    assert!(!replica_pids.is_empty(), "the replica serves reads again over a new connection");
    assert!(!replica_pids.contains(&pid), "the killed backend {pid} was not reused: {replica_pids:?}");
    st.stop().await;
}
