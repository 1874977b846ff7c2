//! Every row of the error table (design §3) with its status and JSON shape, auth, limits, and
//! the secrets check (a canary password never leaves the process), against real PostgreSQL.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str, retryable: bool) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    assert_eq!(e["retryable"], retryable, "{body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code() {
    let st = Stack::start(1, 1, |c| *c = c.replace("max_in_flight = 1000", "max_in_flight = 3")).await;
    let madrid = json!({"lat": MADRID.0, "lng": MADRID.1});
    let q = "/v1/sql/core/query";
    let x = "/v1/sql/core/execute";
    let mut seen = Vec::new();
    let mut check = |s: u16, v: &Value, want: u16, code: &str, retryable: bool| {
        assert_error(s, v, want, code, retryable);
        seen.push(code.to_string());
    };

    // 400s
    let r = st
        .http
        .post(format!("{}{q}", st.data()))
        .bearer_auth(READ_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    check(s, &r.json().await.unwrap(), 400, "invalid_json", false);
    let (s, v, _) = st.post(q, Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT 1", "bogus": 1})).await;
    check(s, &v, 400, "invalid_json", false);
    for region in [
        json!({"lat": 91, "lng": 0}),
        json!({"lat": 0, "lng": -180.5}),
        json!({"cell": "zzzz"}),
        json!({"cell": "ffffffffffffffff"}),
        json!({"lat": 1}),
        json!({"lat": 1, "lng": 1, "radius_km": 0}),
        json!({"lat": "north", "lng": 1}),
    ] {
        let (s, v, _) = st.post(q, Some(READ_TOKEN), &json!({"region": region, "sql": "SELECT 1"})).await;
        check(s, &v, 400, "invalid_region", false);
    }
    // Strict request JSON (probe): a Madrid region with a second, Tokyo `lat` was routed by the
    // last key; an array was read positionally; messages named Rust types.
    let strict = [
        (
            format!(r#"{{"region": {{"lat": {}, "lng": {}, "lat": 35.68}}, "sql": "SELECT 1"}}"#, MADRID.0, MADRID.1),
            "region: duplicate key `lat`",
        ),
        (
            format!(r#"[{{"lat": {}, "lng": {}}}, "SELECT 1", [], null, null, null]"#, MADRID.0, MADRID.1),
            "expected an object, got an array",
        ),
        (
            format!(
                r#"{{"region": {{"lat": {}, "lng": {}}}, "sql": "SELECT 1", "merge": {{"limit": "5"}}}}"#,
                MADRID.0, MADRID.1
            ),
            "merge.limit: expected a non-negative integer, got a string",
        ),
    ];
    for (body, want) in strict {
        let r = st
            .http
            .post(format!("{}{q}", st.data()))
            .bearer_auth(READ_TOKEN)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        check(s, &v, 400, "invalid_json", false);
        assert!(v["error"]["message"].as_str().unwrap().contains(want), "{body}: {v}");
    }
    let (s, v, _) =
        st.post(q, Some(READ_TOKEN), &json!({"region": {"lat": "north", "lng": MADRID.1}, "sql": "SELECT 1"})).await;
    check(s, &v, 400, "invalid_region", false);
    assert!(v["error"]["message"].as_str().unwrap().contains("region.lat: expected a number, got a string"), "{v}");

    // 415: the body must be declared JSON (a charset parameter is fine), before it is read.
    let body = json!({"region": madrid, "sql": "SELECT 1"}).to_string();
    for ct in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let mut req = st.http.post(format!("{}{q}", st.data())).bearer_auth(READ_TOKEN).body(body.clone());
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        let s = r.status().as_u16();
        check(s, &r.json().await.unwrap(), 415, "unsupported_media_type", false);
    }
    let r = st
        .http
        .post(format!("{}{q}", st.data()))
        .bearer_auth(READ_TOKEN)
        .header("content-type", "Application/JSON; charset=UTF-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (s, v, _) = st.post(q, Some(READ_TOKEN), &json!({"sql": "SELECT 1"})).await;
    check(s, &v, 400, "region_required", false);
    let (s, v, _) = st
        .post(
            x,
            Some(WRITE_TOKEN),
            &json!({"region": {"lat": 40.0, "lng": -3.0, "radius_km": 10}, "sql": "DELETE FROM items"}),
        )
        .await;
    check(s, &v, 400, "area_write", false);
    let (s, v, _) = st
        .post(q, Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT $1::int4 AS x", "params": ["abc"]}))
        .await;
    check(s, &v, 400, "invalid_params", false);
    assert!(v["error"]["message"].as_str().unwrap().contains("$1"), "{v}");
    let (s, v, _) =
        st.post(q, Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT $1::int4 AS x", "params": []})).await;
    check(s, &v, 400, "invalid_params", false);

    // 401 / 403
    let (s, v, _) = st.post(q, None, &json!({"region": madrid, "sql": "SELECT 1"})).await;
    check(s, &v, 401, "unauthorized", false);
    let (s, v, _) = st.post(q, Some("wrong-token"), &json!({"region": madrid, "sql": "SELECT 1"})).await;
    check(s, &v, 401, "unauthorized", false);
    let (s, v, _) = st.post(x, Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT 1"})).await;
    check(s, &v, 403, "forbidden", false);
    let (s, v, _) = st.post(q, Some(ADMIN_TOKEN), &json!({"region": madrid, "sql": "SELECT 1"})).await;
    check(s, &v, 403, "forbidden", false);
    for path in ["/admin/map", "/admin/shards", "/metrics", "/admin/locate?lat=1&lng=1"] {
        let r = st.http.get(format!("{}{path}", st.admin())).bearer_auth(WRITE_TOKEN).send().await.unwrap();
        let s = r.status().as_u16();
        check(s, &r.json().await.unwrap(), 403, "forbidden", false);
        let r = st.http.get(format!("{}{path}", st.admin())).send().await.unwrap();
        let s = r.status().as_u16();
        check(s, &r.json().await.unwrap(), 401, "unauthorized", false);
    }

    // 404
    let (s, v, _) =
        st.post("/v1/sql/nope/query", Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT 1"})).await;
    check(s, &v, 404, "unknown_database", false);
    let (s, v, _) =
        st.post(q, Some(READ_TOKEN), &json!({"region": {"lat": NOWHERE.0, "lng": NOWHERE.1}, "sql": "SELECT 1"})).await;
    check(s, &v, 404, "no_shard_for_region", false);

    // 413: by Content-Length, and chunked without a length (never buffered past the limit).
    let big = "x".repeat(70_000);
    let (s, v, _) = st.post(q, Some(READ_TOKEN), &json!({"region": madrid, "sql": big})).await;
    check(s, &v, 413, "body_too_large", false);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..100).map(|_| Ok(vec![b' '; 1000])).collect();
    let r = st
        .http
        .post(format!("{}{q}", st.data()))
        .bearer_auth(READ_TOKEN)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    check(s, &r.json().await.unwrap(), 413, "body_too_large", false);

    // 431 and 408 on raw connections.
    let addr = st.server.as_ref().unwrap().data_addr;
    let head = format!("POST {q} HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(40_000));
    let out = raw(addr, head.as_bytes(), Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(out.contains("\"headers_too_large\""), "{out}");
    let mut extra = vec!["headers_too_large".to_string()];
    // Every 431 carries the JSON body: a head just over the limit that arrives whole, more
    // headers than hyper parses (first request, and a later one on a kept-alive connection), and
    // a malformed head hyper answers itself.
    let ok_head = "GET /nope HTTP/1.1\r\nhost: x\r\n\r\n";
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases = [
        (
            "one segment",
            format!("POST {q} HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(16 * 1024)),
            431,
            "headers_too_large",
        ),
        ("150 headers", format!("POST {q} HTTP/1.1\r\nhost: x\r\n{many}\r\n"), 431, "headers_too_large"),
        (
            "150 headers, kept alive",
            format!("{ok_head}POST {q} HTTP/1.1\r\nhost: x\r\n{many}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            "big head, kept alive",
            format!("{ok_head}POST {q} HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(40_000)),
            431,
            "headers_too_large",
        ),
        ("malformed", format!("POST {q} HTTP/1.1\r\nhost x\r\n\r\n"), 400, "malformed_request"),
        ("malformed, kept alive", format!("{ok_head}GE T / HTTP/1.1\r\nhost: x\r\n\r\n"), 400, "malformed_request"),
    ];
    for (what, bytes, status, code) in cases {
        let out = raw(addr, bytes.as_bytes(), Duration::from_secs(3)).await;
        // The last answer on the connection is the refusal; earlier ones are the kept-alive 404s.
        let last = out.rfind("HTTP/1.1 ").map(|i| &out[i..]).unwrap_or("");
        assert!(last.starts_with(&format!("HTTP/1.1 {status} ")), "{what}: {out}");
        let (head, body) = last.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{what}: {out}"));
        assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{what}: {head}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body:?}"));
        assert_error(status, &v, status, code, false);
    }
    extra.push("malformed_request".into());
    let t = Instant::now();
    let out = raw(addr, b"POST /v1/sql/core/query HTTP/1.1\r\nhost: x\r\n", Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("\"request_timeout\""), "{out}");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    extra.push("request_timeout".into());

    // 422
    let (s, v, _) =
        st.post(q, Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT * FROM no_such_table"})).await;
    check(s, &v, 422, "database_error", false);
    assert_eq!(v["error"]["sqlstate"], "42P01");
    let (s, v, _) =
        st.post(x, Some(WRITE_TOKEN), &json!({"region": madrid, "sql": "INSERT INTO items (id) VALUES (1)"})).await;
    check(s, &v, 422, "database_error", false);
    assert_eq!(v["error"]["sqlstate"], "23502");

    // 504: the request deadline (3 s) passes.
    let t = Instant::now();
    let (s, v, _) = st.post(q, Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT pg_sleep(10)"})).await;
    check(s, &v, 504, "timeout", true);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // 429: more requests in flight than max_in_flight (3).
    let slow = json!({"region": madrid, "sql": "SELECT pg_sleep(0.5)", "consistency": "primary"});
    let futs = (0..8).map(|_| st.post(q, Some(READ_TOKEN), &slow));
    let results = futures_util::future::join_all(futs).await;
    let over: Vec<_> = results.iter().filter(|(s, _, _)| *s == 429).collect();
    assert!(!over.is_empty(), "no 429 among {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    for (s, v, retry) in over {
        assert_error(*s, v, 429, "overloaded", true);
        assert!(retry.is_some(), "Retry-After on 429");
    }
    extra.push("overloaded".into());

    // 503: the shard's only endpoints are down.
    st.cluster.shards[0].replicas[0].kill().unwrap();
    st.cluster.shards[0].primary.kill().unwrap();
    let (s, v, retry) = st.post(q, Some(READ_TOKEN), &json!({"region": madrid, "sql": "SELECT 1"})).await;
    check(s, &v, 503, "shard_unavailable", true);
    assert!(retry.is_some());
    assert_eq!(v["error"]["shard"], "a");

    seen.extend(extra);
    seen.sort();
    seen.dedup();
    eprintln!("error codes exercised: {seen:?}");
    // 18 of the 19 codes exercised here (`uri_too_long` is hyper's, covered by the unit test of
    // the rewrite); `cells_frozen` belongs to live migration (the migration issue).
    assert_eq!(seen.len(), 18, "{seen:?}");
    st.stop().await;
}

/// A write sent to an endpoint that is really a replica fails with 503 and triggers an
/// immediate role re-check (visible in /admin/shards as the observed role).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_primary_is_detected() {
    let st = Stack::start(1, 1, |_| {}).await;
    // Point the map's primary at the replica: swap the ports in the map file, restart cellgate.
    let sh = &st.cluster.shards[0];
    let map = map_toml(&st.cluster, None).replace(
        &format!("primary = \"{}\"", sh.primary.app_url("core")),
        &format!("primary = \"{}\"", sh.replicas[0].app_url("core")),
    );
    let path = st.dir.join("map-ro.toml");
    std::fs::write(&path, map).unwrap();
    let snap = cellgate::server::load_snapshot(&path, &st.server.as_ref().unwrap().state.config).unwrap();
    // Publish before the first probe: the prober has not yet seen that this "primary" is a replica.
    st.server.as_ref().unwrap().state.snapshot.store(std::sync::Arc::new(snap));
    let (s, v) = st.execute(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "INSERT INTO items (id, name, h3) VALUES (1, 'x', 1)"})).await;
    assert_error(s, &v, 503, "shard_unavailable", true);
    let t = Instant::now();
    loop {
        let (_, body) = st.admin_get("/admin/shards").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["shards"][0]["databases"]["core"]["endpoints"][0]["observed_role"] == "replica" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "role not re-checked: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    st.stop().await;
}

/// The canary password of the shard map never appears in logs (trace level), error bodies,
/// metrics or admin output, including failed-connection paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leak() {
    // An extra replica on a dead port with the canary password exercises connect failures.
    let dead = format!("postgres://app:{CANARY}@127.0.0.1:1/core");
    let st = Stack::start_with(1, 1, Some(&dead), |_| {}).await;
    let mut seen = String::new();
    let madrid = json!({"lat": MADRID.0, "lng": MADRID.1});
    for _ in 0..5 {
        let (_, v) = st.query(json!({"region": madrid, "sql": "SELECT 1 AS one"})).await;
        seen += &v.to_string();
    }
    let (_, v) = st.query(json!({"region": madrid, "sql": "SELECT * FROM nope"})).await;
    seen += &v.to_string();
    tokio::time::sleep(Duration::from_millis(600)).await; // a few failed probes of the dead replica
    for path in ["/admin/map", "/admin/shards", "/metrics", "/admin/locate?lat=40.4&lng=-3.7"] {
        let (s, body) = st.admin_get(path).await;
        assert_eq!(s, 200, "{path}: {body}");
        seen += &body;
    }
    let (_, shards) = st.admin_get("/admin/shards").await;
    assert!(shards.contains("127.0.0.1:1/core"), "dead endpoint listed by label: {shards}");
    assert!(shards.contains("last_error"), "{shards}");
    let (_, map) = st.admin_get("/admin/map").await;
    assert!(map.contains("\"***\""), "secrets shown as ***: {map}");
    // Metrics carry shard ids, never cells.
    let (_, metrics) = st.admin_get("/metrics").await;
    assert!(metrics.contains("cellgate_requests_total{"), "{metrics}");
    assert!(metrics.contains("shard=\"a\""), "{metrics}");
    assert!(metrics.contains("cellgate_request_duration_seconds_bucket"), "histogram, not summary");
    assert!(!metrics.contains("85390cb3fffffff"), "no cell labels");
    st.stop().await;
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(logs.contains("endpoint unreachable endpoint=\"127.0.0.1:1/core\""), "failed connects were logged");
    assert!(!seen.contains(CANARY), "canary in responses/admin/metrics");
    assert!(!logs.contains(CANARY), "canary in logs");
}

#[tokio::test]
async fn refuses_non_loopback_without_tokens() {
    let cfg = cellgate::config::Config::parse(
        "map = { path = \"shard-maps/demo.toml\" }\n[listen]\ndata = \"0.0.0.0:0\"\nadmin = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    match cellgate::server::start(cfg, false).await {
        Err(cellgate::server::StartError::NoAuth(_)) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started without tokens on 0.0.0.0"),
    }
}
