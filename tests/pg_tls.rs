//! PostgreSQL over TLS against real PostgreSQL with `ssl = on` and a `hostssl`-only pg_hba: a
//! test CA and a server certificate for `localhost` (rcgen); verify-full reads, writes and
//! health through cellgate over TLS (checked server-side in pg_stat_ssl); verify-ca skips the
//! name; wrong host name, unknown CA and plaintext are refused with clear, password-free
//! errors; `[tls] backends` refuses weaker endpoints at startup and on reload.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellgate::config::Config;
use cellgate::server;
use cellgate_harness::{Cluster, ClusterSpec, Node};
use serde_json::{Value, json};
use support::*;

/// A CA and what it signed; `other_ca` signed nothing the server uses.
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: String,
    server_key: String,
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    (p, rcgen::KeyPair::generate().unwrap())
}

/// The server certificate names `localhost` only (not 127.0.0.1): connecting by IP is the
/// wrong-host-name case.
fn pki(dir: &Path) -> Pki {
    let (ca_params, ca_key) = ca("cellgate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut sp = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let server = sp.signed_by(&key, &issuer).unwrap();
    let (other_params, other_key) = ca("some other CA");
    let other = other_params.self_signed(&other_key).unwrap();
    let (ca, other_ca) = (dir.join("root.crt"), dir.join("other-root.crt"));
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&other_ca, other.pem()).unwrap();
    Pki { ca, other_ca, server_cert: server.pem(), server_key: key.serialize_pem() }
}

/// Write `name` into the node's data dir, mode 0600, owned like the data dir (the postgres user
/// when the tests run as root).
fn write_private(node: &Node, name: &str, text: &str) {
    let path = node.data_dir.join(name);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    let meta = std::fs::metadata(&node.data_dir).unwrap();
    std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid())).unwrap();
}

/// `ssl = on` with the PKI's server certificate, and a pg_hba that accepts TCP over TLS only.
fn enable_ssl(node: &Node, pki: &Pki) {
    write_private(node, "server.crt", &pki.server_cert);
    write_private(node, "server.key", &pki.server_key);
    write_private(
        node,
        "pg_hba.conf",
        "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl replication all 127.0.0.1/32 scram-sha-256\n",
    );
    node.psql(
        "postgres",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'; ALTER SYSTEM SET ssl_key_file = 'server.key'; \
         ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf()",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.psql("postgres", "SHOW ssl").unwrap() != "on" {
        assert!(Instant::now() < deadline, "ssl not on: {}", node.log_tail(20));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `shards` shards ("a" Madrid, "b" Paris), no replicas, TLS on; cellgate serves the map from
/// `map_for` with the process config edited by `tweak`.
async fn tls_stack(
    shards: usize,
    map_for: impl FnOnce(&Cluster, &Pki) -> String,
    tweak: impl FnOnce(&mut String),
) -> (Stack, Pki) {
    logs();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("cellgate-pgtls-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki(&dir);
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start(ClusterSpec { shards, replicas_per_shard: 0, app_password: CANARY.into(), ..Default::default() })
            .expect("PostgreSQL cluster")
    })
    .await
    .unwrap();
    for sh in &cluster.shards {
        enable_ssl(&sh.primary, &pki);
        sh.primary.psql_as("app", CANARY, "core", SCHEMA).expect("schema");
    }
    std::fs::write(dir.join("map.toml"), map_for(&cluster, &pki)).unwrap();
    let mut cfg = config_text(&dir);
    tweak(&mut cfg);
    let server = server::start(Config::parse(&cfg).unwrap(), false).await.expect("cellgate starts");
    let st = Stack { cluster, server: Some(server), http: reqwest::Client::new(), dir, extra: Vec::new() };
    st.wait_ready().await;
    (st, pki)
}

/// The test map with `params` on every PostgreSQL URL, reached via `host`.
fn map_with(cluster: &Cluster, host: &str, params: &str) -> String {
    map_toml(cluster, None)
        .replace("@127.0.0.1:", &format!("@{host}:"))
        .replace("/core\"", &format!("/core?{params}\""))
}

/// verify-full, and SCRAM must bind to the TLS channel (tls-server-end-point) or fail.
fn verify_full(pki: &Pki) -> String {
    format!("sslmode=verify-full&sslrootcert={}&channel_binding=require", pki.ca.display())
}

async fn push(st: &Stack, map: String) -> (u16, Value) {
    let r = st.http.put(format!("{}/admin/map", st.admin())).bearer_auth(ADMIN_TOKEN).body(map).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn bump(map: &str, v: u64) -> String {
    map.replacen("version = 1\n", &format!("version = {v}\n"), 1)
}

/// Every `app` session on the node: (over TLS, total).
fn app_sessions(node: &Node) -> (i64, i64) {
    let out = node
        .psql(
            "postgres",
            "SELECT count(*) FILTER (WHERE ssl), count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE usename = 'app'",
        )
        .unwrap();
    let (a, b) = out.split_once('|').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_reads_writes_and_health_over_tls() {
    let (st, pki) = tls_stack(
        1,
        |c, pki| map_with(c, "localhost", &verify_full(pki)),
        |cfg| cfg.push_str("[tls]\nbackends = \"verify-full\"\n"),
    )
    .await;
    let primary = &st.cluster.shards[0].primary;

    // Write and read through cellgate.
    st.insert(1, "over-tls", MADRID).await;
    let (s, v) = st
        .query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT name FROM items WHERE id = 1"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v.to_string().contains("over-tls"), "{v}");
    // Health: the prober's connection reached the primary (ready needs a probed, healthy shard).
    let (s, body) = st.admin_get("/readyz").await;
    assert_eq!(s, 200, "{body}");

    // Server side: every cellgate session (pool, pipeline, prober) is TLS.
    let (tls, all) = app_sessions(primary);
    assert!(all >= 2, "expected pooled and probe sessions, saw {all}");
    assert_eq!(tls, all, "a session of app is not TLS");
    let version = primary
        .psql(
            "postgres",
            "SELECT string_agg(DISTINCT version, ',') FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE usename = 'app'",
        )
        .unwrap();
    assert!(version.starts_with("TLSv1."), "TLS version: {version}");

    // The minimum refuses a weaker endpoint on reload; the old map keeps serving.
    let weaker =
        bump(&map_with(&st.cluster, "localhost", &format!("sslmode=require&sslrootcert={}", pki.ca.display())), 2);
    let (s, out) = push(&st, weaker).await;
    assert_eq!(s, 422, "{out}");
    let text = out.to_string();
    assert!(text.contains("sslmode=require is weaker than the minimum [tls] backends = \\\"verify-full\\\""), "{text}");
    assert!(!text.contains(CANARY), "password leaked: {text}");
    let (s, _) = st.query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT 1"})).await;
    assert_eq!(s, 200);

    // ... and at startup: a second instance on a `require` map does not start.
    let other = st.dir.join("weak");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("map.toml"), map_with(&st.cluster, "localhost", "sslmode=require")).unwrap();
    let cfg = config_text(&other) + "[tls]\nbackends = \"verify-full\"\n";
    let e = server::start(Config::parse(&cfg).unwrap(), false).await.err().expect("refused at startup").to_string();
    assert!(e.contains("weaker than the minimum"), "{e}");
    assert!(!e.contains(CANARY), "password leaked: {e}");

    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(!logs.contains(CANARY), "password in the logs");
    st.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_plaintext_are_refused() {
    // No minimum: each refusal below comes from the connection itself.
    let (st, pki) = tls_stack(1, |c, pki| map_with(c, "localhost", &verify_full(pki)), |_| {}).await;
    let ca = pki.ca.display().to_string();
    let other = pki.other_ca.display().to_string();
    let cases = [
        // The certificate names localhost, not 127.0.0.1.
        ("127.0.0.1", format!("sslmode=verify-full&sslrootcert={ca}"), "certificate not valid for name"),
        ("localhost", format!("sslmode=verify-full&sslrootcert={other}"), "UnknownIssuer"),
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={other}"), "UnknownIssuer"),
        ("localhost", "sslmode=disable".to_string(), "no encryption"),
    ];
    for (i, (host, params, want)) in cases.iter().enumerate() {
        let (s, out) = push(&st, bump(&map_with(&st.cluster, host, params), 2 + i as u64)).await;
        let text = out.to_string();
        assert_eq!(s, 422, "{host} {params}: {text}");
        assert!(text.contains(want), "{host} {params}: want {want:?} in {text}");
        assert!(!text.contains(CANARY), "password leaked: {text}");
    }
    // verify-ca checks the chain only: by IP (not in the certificate) it connects; so does
    // require (no verification).
    for (v, params) in [(10, format!("sslmode=verify-ca&sslrootcert={ca}")), (11, "sslmode=require".to_string())] {
        let (s, out) = push(&st, bump(&map_with(&st.cluster, "127.0.0.1", &params), v)).await;
        assert_eq!(s, 200, "{params}: {out}");
        assert_eq!(out["result"], "published", "{out}");
        st.insert(v as i64, "still-tls", MADRID).await;
    }
    let (tls, all) = app_sessions(&st.cluster.shards[0].primary);
    assert!(all >= 1 && tls == all, "{tls} of {all} app sessions over TLS");
    st.stop().await;
}

/// A live migration between two TLS shards: cellgate's admin connections use verify-full, and the
/// subscription the target opens to the source (libpq, in the target server) carries the
/// source's sslmode and sslrootcert and runs over TLS (the source accepts `hostssl` only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_between_tls_shards_replicates_over_tls() {
    let (st, _pki) = tls_stack(2, |c, pki| map_with(c, "localhost", &verify_full(pki)), |_| {}).await;
    for id in 1..=20 {
        st.insert(id, "moves", MADRID).await;
    }
    let cell = cellgate::geo::owning_cell(cellgate::geo::point(MADRID.0, MADRID.1).unwrap(), h3o::Resolution::Three);
    let r = st
        .http
        .post(format!("{}/admin/migrations", st.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"cells": [cell.to_string()], "to": "b", "hold_ms": 2000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let doc: Value = r.json().await.unwrap();
    let id = doc["id"].as_str().unwrap().to_string();

    // While it runs: the subscription's conninfo (target) and the walsender's TLS (source).
    let (mut conninfo_tls, mut walsender_tls, mut walsender_plain) = (false, false, false);
    let t = Instant::now();
    loop {
        let (src, dst) = (&st.cluster.shards[0].primary, &st.cluster.shards[1].primary);
        let info = dst.psql("core", "SELECT subconninfo FROM pg_subscription").unwrap();
        conninfo_tls |= info.contains("sslmode=verify-full") && info.contains("sslrootcert=");
        let ws = src
            .psql(
                "postgres",
                "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE backend_type = 'walsender'",
            )
            .unwrap();
        walsender_tls |= ws.lines().any(|l| l == "t");
        walsender_plain |= ws.lines().any(|l| l == "f");
        let v: Value = st
            .http
            .get(format!("{}/admin/migrations/{id}", st.admin()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match v["state"].as_str().unwrap_or("") {
            "done" => break,
            "failed" | "aborted" => panic!("migration did not finish: {v}"),
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(60), "migration not done: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(conninfo_tls, "the subscription's conninfo never carried sslmode=verify-full and sslrootcert");
    assert!(walsender_tls && !walsender_plain, "walsender over TLS: seen {walsender_tls}, plaintext {walsender_plain}");
    let moved = st.cluster.shards[1].primary.psql("core", "SELECT count(*) FROM items WHERE name = 'moves'").unwrap();
    assert_eq!(moved, "20");
    // Reads and writes follow the cells to b, still over TLS.
    st.insert(21, "after", MADRID).await;
    let (tls, all) = app_sessions(&st.cluster.shards[1].primary);
    assert!(all >= 1 && tls == all, "{tls} of {all} app sessions over TLS");
    st.stop().await;
}
