//! PostgreSQL over TLS against real PostgreSQL with `ssl = on` and a `hostssl`-only pg_hba: a
//! test CA and a server certificate for `localhost` (rcgen); verify-full reads, writes, pipelined
//! reads and health through cellgate over TLS (checked server-side in pg_stat_ssl), also on a
//! streaming replica that replicates over TLS itself; verify-ca skips the name; wrong host name,
//! unknown CA, an expired certificate and plaintext are refused with clear, password-free
//! errors; `[tls] backends` refuses weaker endpoints at startup and on reload; client-certificate
//! (`cert`) authentication; SCRAM channel binding (tls-server-end-point) checked by the server;
//! a CA file replaced in place is not re-read by a reload, a new path is.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::future::Future;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cellgate::backend::postgres::tls;
use cellgate::config::Config;
use cellgate::server;
use cellgate_harness::{Cluster, ClusterSpec, Node};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

type Issuer = rcgen::Issuer<'static, rcgen::KeyPair>;

/// A CA and what it signed; `other_ca` signed nothing the server uses. `issuer` signs more
/// certificates (client, expired, rotated) with the CA the server and cellgate trust.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    ca_pem: String,
    server_cert: String,
    server_key: String,
    issuer: Issuer,
    other_issuer: Issuer,
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    (p, rcgen::KeyPair::generate().unwrap())
}

/// A new CA: its certificate (PEM) and its issuer.
fn new_ca(name: &str) -> (String, Issuer) {
    let (params, key) = ca(name);
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(params, key))
}

/// A certificate for `names` (SANs) with common name `cn`, signed by `issuer`, after `tweak`
/// edits its parameters: (certificate PEM, key PEM). rcgen's default key is ECDSA P-256 signed
/// with SHA-256, so channel binding hashes with SHA-256.
fn signed(
    issuer: &Issuer,
    names: &[&str],
    cn: &str,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    tweak(&mut p);
    (p.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

/// The server certificate names `localhost` only (not 127.0.0.1): connecting by IP is the
/// wrong-host-name case.
fn pki(dir: &Path) -> Pki {
    let (ca_pem, issuer) = new_ca("cellgate test CA");
    let (server_cert, server_key) = signed(&issuer, &["localhost"], "localhost", |_| {});
    let (other_pem, other_issuer) = new_ca("some other CA");
    let (ca, other_ca) = (dir.join("root.crt"), dir.join("other-root.crt"));
    std::fs::write(&ca, &ca_pem).unwrap();
    std::fs::write(&other_ca, other_pem).unwrap();
    Pki { dir: dir.to_path_buf(), ca, other_ca, ca_pem, server_cert, server_key, issuer, other_issuer }
}

impl Pki {
    /// Write a client certificate and key into the test directory (key mode 0600, as libpq
    /// demands of key files); their paths.
    fn client_files(&self, name: &str, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
        let (c, k) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&k).unwrap();
        std::io::Write::write_all(&mut f, key.as_bytes()).unwrap();
        (c, k)
    }
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

/// TCP over TLS only, SCRAM; streaming replication over TLS too.
const HOSTSSL_ONLY: &str = "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl replication all 127.0.0.1/32 scram-sha-256\n";

/// `ssl = on` with the PKI's server certificate and `hba` as pg_hba.conf.
fn enable_ssl(node: &Node, pki: &Pki, hba: &str) {
    write_private(node, "server.crt", &pki.server_cert);
    write_private(node, "server.key", &pki.server_key);
    write_private(node, "pg_hba.conf", hba);
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

/// Serve a new certificate and key (`ssl_cert_file` is re-read on reload).
fn swap_server_cert(node: &Node, (cert, key): &(String, String)) {
    write_private(node, "server.crt", cert);
    write_private(node, "server.key", key);
    node.psql("postgres", "SELECT pg_reload_conf()").unwrap();
}

/// The physical replication connections to `primary`: (over TLS, total).
fn walsenders(primary: &Node) -> (i64, i64) {
    let out = primary
        .psql(
            "postgres",
            "SELECT count(*) FILTER (WHERE ssl), count(*) FROM pg_stat_ssl JOIN pg_stat_replication USING (pid)",
        )
        .unwrap();
    let (a, b) = out.split_once('|').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// `shards` shards ("a" Madrid, "b" Paris), no replicas, TLS on; cellgate serves the map from
/// `map_for` with the process config edited by `tweak`.
async fn tls_stack(
    shards: usize,
    map_for: impl FnOnce(&Cluster, &Pki) -> String,
    tweak: impl FnOnce(&mut String),
) -> (Stack, Pki) {
    tls_stack_with(shards, 0, HOSTSSL_ONLY, map_for, tweak).await
}

/// Like `tls_stack`, with `replicas` streaming replicas per shard and `hba` as every node's
/// pg_hba.conf. Replicas get the same certificate and hba, and their WAL receivers reconnect
/// so that replication itself runs over TLS (the hba must accept `hostssl replication`).
async fn tls_stack_with(
    shards: usize,
    replicas: usize,
    hba: &'static str,
    map_for: impl FnOnce(&Cluster, &Pki) -> String,
    tweak: impl FnOnce(&mut String),
) -> (Stack, Pki) {
    logs();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("cellgate-pgtls-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki(&dir);
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start(ClusterSpec {
            shards,
            replicas_per_shard: replicas,
            app_password: CANARY.into(),
            ..Default::default()
        })
        .expect("PostgreSQL cluster")
    })
    .await
    .unwrap();
    for sh in &cluster.shards {
        enable_ssl(&sh.primary, &pki, hba);
        for r in &sh.replicas {
            enable_ssl(r, &pki, hba);
        }
        if !sh.replicas.is_empty() {
            // The WAL receivers connected in plaintext before ssl was on: make them reconnect
            // (primary_conninfo has libpq's default sslmode=prefer, so now over TLS).
            sh.primary.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_replication").unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while walsenders(&sh.primary) != (replicas as i64, replicas as i64) {
                assert!(Instant::now() < deadline, "replication not over TLS: {:?}", walsenders(&sh.primary));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        sh.primary.psql_as("app", CANARY, "core", SCHEMA).expect("schema");
        sh.wait_for_replicas(Duration::from_secs(30)).expect("replicas streaming");
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

/// Every `user` session on the node: (over TLS, total).
fn sessions_of(node: &Node, user: &str) -> (i64, i64) {
    let out = node
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FILTER (WHERE ssl), count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE usename = '{user}'"
            ),
        )
        .unwrap();
    let (a, b) = out.split_once('|').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// Every `app` session on the node: (over TLS, total).
fn app_sessions(node: &Node) -> (i64, i64) {
    sessions_of(node, "app")
}

/// A refusal must say why without a secret: no password, no key material.
fn assert_no_secret(text: &str) {
    assert!(!text.contains(CANARY), "password leaked: {text}");
    assert!(!text.contains("PRIVATE KEY"), "key material leaked: {text}");
}

/// One connection outside cellgate's pools, with cellgate's parser and connector (`wrap` may
/// wrap the connector): whether the session is TLS, or the error chain.
async fn connect_direct<M>(conn: &str, wrap: impl FnOnce(tls::Connector) -> M) -> Result<bool, String>
where
    M: MakeTlsConnect<tokio_postgres::Socket>,
    M::Stream: Send + 'static,
{
    let info = tls::parse(conn).map_err(|e| e.to_string())?;
    let connector = info.tls.connector().map_err(|e| e.to_string())?;
    let (client, connection) =
        info.config.connect(wrap(connector)).await.map_err(|e| cellgate::backend::error_chain(&e))?;
    let task = tokio::spawn(connection);
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await;
    drop(client);
    let _ = task.await;
    row.map(|r| r.get::<_, bool>(0)).map_err(|e| cellgate::backend::error_chain(&e))
}

/// A connector whose streams offer channel-binding data that do not match the server's
/// certificate: what a man in the middle (terminating TLS with its own certificate) would
/// present. The server must refuse the SCRAM exchange.
#[derive(Clone)]
struct ForgedBinding<T>(T);

impl<S, M> MakeTlsConnect<S> for ForgedBinding<M>
where
    M: MakeTlsConnect<S>,
    <M::TlsConnect as TlsConnect<S>>::Future: Send + 'static,
{
    type Stream = ForgedBinding<M::Stream>;
    type TlsConnect = ForgedBinding<M::TlsConnect>;
    type Error = M::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        self.0.make_tls_connect(domain).map(ForgedBinding)
    }
}

impl<S, T> TlsConnect<S> for ForgedBinding<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
{
    type Stream = ForgedBinding<T::Stream>;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, T::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let f = self.0.connect(stream);
        Box::pin(async move { f.await.map(ForgedBinding) })
    }
}

impl<T: TlsStream + Unpin> TlsStream for ForgedBinding<T> {
    fn channel_binding(&self) -> ChannelBinding {
        // A SHA-256-sized hash of some other certificate.
        ChannelBinding::tls_server_end_point(vec![0x5a; 32])
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ForgedBinding<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ForgedBinding<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
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

    // Pipelined reads: concurrent plain reads share a few connections. On a primary only the
    // shared read connections are read-only at the session level, so `ro = on` marks a read
    // that ran on one; each read reports its own session's TLS from pg_stat_ssl.
    let sql = "SELECT s.ssl, current_setting('default_transaction_read_only') AS ro, pg_backend_pid() AS pid \
               FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()";
    let reads = (0..32).map(|_| st.query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": sql})));
    let (mut shared_reads, mut shared_pids) = (0, std::collections::BTreeSet::new());
    for (s, v) in futures_util::future::join_all(reads).await {
        assert_eq!(s, 200, "{v}");
        let row = &v["rows"][0];
        assert_eq!(row["ssl"], true, "a read ran without TLS: {v}");
        if row["ro"] == "on" {
            shared_reads += 1;
            shared_pids.insert(row["pid"].as_i64().unwrap());
        }
    }
    // More reads than shared sessions: they shared them (pipeline_connections = 4 by default).
    eprintln!("{shared_reads} of 32 concurrent reads pipelined on {} shared TLS sessions", shared_pids.len());
    assert!(
        shared_pids.len() <= 4 && shared_reads > shared_pids.len(),
        "{shared_reads} pipelined reads on {} shared sessions",
        shared_pids.len()
    );
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

    // An expired certificate from the trusted CA, for the right name: refused by verify-full
    // and verify-ca alike.
    let primary = &st.cluster.shards[0].primary;
    swap_server_cert(
        primary,
        &signed(&pki.issuer, &["localhost"], "localhost", |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }),
    );
    let direct =
        format!("{}?sslmode=verify-full&sslrootcert={ca}", primary.app_url("core").replace("127.0.0.1", "localhost"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_direct(&direct, |c| c).await.is_ok() {
        assert!(Instant::now() < deadline, "the server still serves its valid certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (v, host, params) in [
        (12, "localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
        (13, "127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
    ] {
        let (s, out) = push(&st, bump(&map_with(&st.cluster, host, &params), v)).await;
        let text = out.to_string();
        assert_eq!(s, 422, "{params}: {text}");
        assert!(text.contains("certificate expired"), "{params}: {text}");
        assert_no_secret(&text);
    }
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
        let v = st.admin_value(&format!("/admin/migrations/{id}")).await;
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

/// A shard with a streaming replica, both on TLS (and replicating over TLS): reads are served by
/// the replica over verify-full with channel binding, the prober measures its lag over TLS (a
/// paused replay excludes it, a resumed one readmits it), and every cellgate session on either
/// node is TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_over_tls_serves_reads_and_is_probed() {
    let (st, _pki) = tls_stack_with(
        1,
        1,
        HOSTSSL_ONLY,
        |c, pki| map_with(c, "localhost", &verify_full(pki)),
        |cfg| cfg.push_str("[tls]\nbackends = \"verify-full\"\n"),
    )
    .await;
    let (primary, replica) = (&st.cluster.shards[0].primary, &st.cluster.shards[0].replicas[0]);
    assert_eq!(walsenders(primary), (1, 1), "the replica streams over TLS");

    st.insert(1, "to-replica", MADRID).await;
    let region = json!({"lat": MADRID.0, "lng": MADRID.1});
    let sql = "SELECT s.ssl, pg_is_in_recovery() AS rec, inet_server_port() AS port, \
               (SELECT name FROM items WHERE id = 1) AS name FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()";
    let replica_read = || async {
        // No token: a plain read, pipelined on the replica's shared connections.
        let (s, v) = st.query(json!({"region": region, "sql": sql})).await;
        assert_eq!(s, 200, "{v}");
        v
    };
    let t = Instant::now();
    let v = loop {
        let v = replica_read().await;
        if v["rows"][0]["name"] == "to-replica" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the replica never served the row: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(v["shards"][0]["role"], "replica", "{v}");
    assert_eq!(v["rows"][0]["rec"], true, "{v}");
    assert_eq!(v["rows"][0]["port"].as_i64(), Some(i64::from(replica.port)), "{v}");
    assert_eq!(v["rows"][0]["ssl"], true, "{v}");

    // Health: the replica is probed (its LSN and lag known) over TLS.
    let replica_view = || async {
        let (_, body) = st.admin_get("/admin/shards").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        v["shards"][0]["databases"]["core"]["endpoints"][1].clone()
    };
    let ep = replica_view().await;
    assert_eq!(ep["role"], "replica", "{ep}");
    assert_eq!(ep["observed_role"], "replica", "{ep}");
    assert!(ep["lsn"].is_string() && ep["readable"] == true, "{ep}");
    // Replay paused: the prober sees the lag grow and excludes the replica; resumed: readmitted.
    replica.psql("core", "SELECT pg_wal_replay_pause()").unwrap();
    let t = Instant::now();
    while replica_view().await["readable"] == true {
        st.insert(100 + t.elapsed().as_millis() as i64, "lag", MADRID).await;
        assert!(t.elapsed() < Duration::from_secs(10), "lagging replica still readable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, v) = st.query(json!({"region": region, "sql": sql})).await;
    assert_eq!(v["shards"][0]["role"], "primary", "lagging replica excluded: {v}");
    assert_eq!(v["rows"][0]["ssl"], true, "{v}");
    replica.psql("core", "SELECT pg_wal_replay_resume()").unwrap();
    let t = Instant::now();
    while replica_view().await["readable"] != true {
        assert!(t.elapsed() < Duration::from_secs(10), "replica not readmitted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(replica_read().await["shards"][0]["role"], "replica");

    for node in [primary, replica] {
        let (tls, all) = app_sessions(node);
        assert!(all >= 2 && tls == all, "{}: {tls} of {all} app sessions over TLS", node.name);
    }
    assert_eq!(walsenders(primary), (1, 1), "the replica still streams over TLS");
    st.stop().await;
}

/// pg_hba `cert` for one user: the client certificate (CN = user name, signed by the CA in the
/// server's ssl_ca_file) is the login. The right certificate connects (reads and writes through
/// cellgate, the server sees the CN); another CA's, another user's name, none, a key that does
/// not match, and channel_binding=require (cert login has no SCRAM to bind) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_authentication() {
    const CERT_HBA: &str = "local all all trust\nhostssl all certuser 127.0.0.1/32 cert\n\
                            hostssl all all 127.0.0.1/32 scram-sha-256\nhostssl replication all 127.0.0.1/32 scram-sha-256\n";
    let (st, pki) = tls_stack_with(
        1,
        0,
        CERT_HBA,
        |c, pki| map_with(c, "localhost", &verify_full(pki)),
        |cfg| cfg.push_str("[tls]\nbackends = \"verify-full\"\n"),
    )
    .await;
    let primary = &st.cluster.shards[0].primary;
    write_private(primary, "client-ca.crt", &pki.ca_pem);
    primary.psql("postgres", "ALTER SYSTEM SET ssl_ca_file = 'client-ca.crt'; SELECT pg_reload_conf()").unwrap();
    primary.psql("core", "CREATE ROLE certuser LOGIN; GRANT SELECT, INSERT ON items TO certuser").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while primary.psql("postgres", "SHOW ssl_ca_file").unwrap() != "client-ca.crt" {
        assert!(Instant::now() < deadline, "ssl_ca_file not set: {}", primary.log_tail(20));
        std::thread::sleep(Duration::from_millis(100));
    }

    let good = pki.client_files("certuser", &signed(&pki.issuer, &[], "certuser", |_| {}));
    let foreign = pki.client_files("foreign", &signed(&pki.other_issuer, &[], "certuser", |_| {}));
    let other_user = pki.client_files("app", &signed(&pki.issuer, &[], "app", |_| {}));
    // The right certificate with the key of another.
    let mismatched = (good.0.clone(), other_user.1.clone());
    let app = format!("app:{CANARY}@localhost:{}/core?{}", primary.port, verify_full(&pki));
    let cert_map = |files: Option<&(PathBuf, PathBuf)>, extra: &str, v: u64| {
        let mut params = format!("sslmode=verify-full&sslrootcert={}", pki.ca.display());
        if let Some((c, k)) = files {
            params += &format!("&sslcert={}&sslkey={}", c.display(), k.display());
        }
        let map = map_with(&st.cluster, "localhost", &verify_full(&pki));
        assert!(map.contains(&app));
        bump(&map.replace(&app, &format!("certuser@localhost:{}/core?{params}{extra}", primary.port)), v)
    };

    let (s, out) = push(&st, cert_map(Some(&good), "", 2)).await;
    assert_eq!((s, &out["result"]), (200, &json!("published")), "{out}");
    st.insert(1, "by-cert", MADRID).await;
    let (s, v) = st
        .query(
            json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT current_user AS u, name FROM items"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rows"][0], json!({"u": "certuser", "name": "by-cert"}), "{v}");
    let (tls, all) = sessions_of(primary, "certuser");
    assert!(all >= 1 && tls == all, "{tls} of {all} certuser sessions over TLS");
    let dn = primary
        .psql(
            "postgres",
            "SELECT string_agg(DISTINCT client_dn, ',') FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE usename = 'certuser'",
        )
        .unwrap();
    assert_eq!(dn, "/CN=certuser", "the server authenticated the client certificate");

    let cases = [
        (cert_map(Some(&foreign), "", 3), "UnknownCA"),
        (cert_map(Some(&other_user), "", 4), "certificate authentication failed for user \\\"certuser\\\""),
        (cert_map(None, "", 5), "connection requires a valid client certificate"),
        (cert_map(Some(&mismatched), "", 6), "keys may not be consistent"),
        (cert_map(Some(&good), "&channel_binding=require", 7), "server did not use channel binding"),
    ];
    for (map, want) in cases {
        let (s, out) = push(&st, map).await;
        let text = out.to_string();
        assert_eq!(s, 422, "want {want:?}: {text}");
        assert!(text.contains(want), "want {want:?} in {text}");
        assert_no_secret(&text);
    }
    // The certificate map keeps serving.
    let (s, _) = st.query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT 1"})).await;
    assert_eq!(s, 200);
    st.stop().await;
}

/// SCRAM-SHA-256-PLUS: over TLS the connector hands tokio-postgres the tls-server-end-point
/// hash of the server's certificate, so `channel_binding=require` connects (cellgate's pools,
/// pipeline and prober and a direct connection); over plaintext there is nothing to bind to and
/// the same string is refused. Server side: binding data that do not match the certificate
/// fail the SCRAM exchange at the server ("SCRAM channel binding check failed" in its log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_over_tls() {
    // TLS for everyone, and plaintext too for app: the refusal over plaintext must come from
    // channel binding, not from pg_hba.
    const TLS_OR_PLAIN: &str = "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n\
                                host all app 127.0.0.1/32 scram-sha-256\nhostssl replication all 127.0.0.1/32 scram-sha-256\n";
    let (st, pki) =
        tls_stack_with(1, 0, TLS_OR_PLAIN, |c, pki| map_with(c, "localhost", &verify_full(pki)), |_| {}).await;
    let primary = &st.cluster.shards[0].primary;
    st.insert(1, "bound", MADRID).await;
    let (s, v) = st.query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT name FROM items"})).await;
    assert_eq!(s, 200, "{v}");
    let (tls, all) = app_sessions(primary);
    assert!(all >= 2 && tls == all, "{tls} of {all} app sessions over TLS");

    let url = primary.app_url("core").replace("127.0.0.1", "localhost");
    let vf = format!("sslmode=verify-full&sslrootcert={}", pki.ca.display());
    assert_eq!(connect_direct(&format!("{url}?{vf}&channel_binding=require"), |c| c).await, Ok(true));
    // Forged binding data: the server refuses, and says so in its log.
    let e = connect_direct(&format!("{url}?{vf}&channel_binding=require"), ForgedBinding).await.unwrap_err();
    assert!(e.contains("SCRAM channel binding check failed"), "{e}");
    assert_no_secret(&e);
    assert!(primary.log_tail(50).contains("SCRAM channel binding check failed"), "{}", primary.log_tail(50));
    // ... and only because they were used: without binding the same connector logs in.
    assert_eq!(connect_direct(&format!("{url}?{vf}&channel_binding=disable"), ForgedBinding).await, Ok(true));

    // Plaintext: the same requirement is refused by the client; without it, it connects.
    let plain = "sslmode=disable&channel_binding=require";
    let (s, out) = push(&st, bump(&map_with(&st.cluster, "localhost", plain), 2)).await;
    let text = out.to_string();
    assert_eq!(s, 422, "{text}");
    assert!(text.contains("server did not use channel binding"), "{text}");
    assert_no_secret(&text);
    assert_eq!(connect_direct(&format!("{url}?sslmode=disable"), |c| c).await, Ok(false));
    st.stop().await;
}

/// CA rotation without a restart, both ways. In place: the CA file is replaced and the server
/// switches to a certificate of the new CA; cellgate's next connections read the new file (the
/// connector checks its files before each new connection), with no map change. A new file named
/// in the map (a new path) builds new endpoints, checked before the publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_ca_is_picked_up_in_place_and_by_a_new_path() {
    let (st, pki) = tls_stack(1, |c, pki| map_with(c, "localhost", &verify_full(pki)), |_| {}).await;
    let primary = &st.cluster.shards[0].primary;
    let (new_pem, new_issuer) = new_ca("cellgate test CA 2");
    let madrid = json!({"lat": MADRID.0, "lng": MADRID.1});

    // 1. A broken file in place: refused, the CA read before stays in use (reads go on).
    std::fs::write(&pki.ca, "not a certificate\n").unwrap();
    primary.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'").unwrap();
    let t = Instant::now();
    loop {
        let (s, _) = st.query(json!({"region": madrid, "sql": "SELECT 1 AS one"})).await;
        if s == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "reads stopped after a broken CA file was written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. The new CA in place, then the server's new certificate: no map change, no restart.
    std::fs::write(&pki.ca, &new_pem).unwrap();
    swap_server_cert(primary, &signed(&new_issuer, &["localhost"], "localhost", |_| {}));
    let direct = format!("{}?sslmode=verify-full&sslrootcert={}", primary.app_url("core"), pki.ca.display())
        .replace("127.0.0.1", "localhost");
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_direct(&direct, |c| c).await.is_err() {
        assert!(Instant::now() < deadline, "the server does not serve the new certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every open session goes: cellgate must connect again, and verify with the new CA.
    primary.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'").unwrap();
    let t = Instant::now();
    loop {
        let (s, v) = st.query(json!({"region": madrid, "sql": "SELECT 1 AS one"})).await;
        if s == 200 && app_sessions(primary).1 >= 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "not served with the CA replaced in place: {s} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    st.insert(2, "in-place-ca", MADRID).await;

    // A new path: new endpoints, checked before publish, read the new CA.
    let ca2 = pki.dir.join("root-2.crt");
    std::fs::write(&ca2, &new_pem).unwrap();
    let params = format!("sslmode=verify-full&sslrootcert={}&channel_binding=require", ca2.display());
    let (s, out) = push(&st, bump(&map_with(&st.cluster, "localhost", &params), 3)).await;
    assert_eq!((s, &out["result"]), (200, &json!("published")), "{out}");
    let t = Instant::now();
    loop {
        let (s, v) = st.query(json!({"region": madrid, "sql": "SELECT 1 AS one"})).await;
        if s == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "not served with the new CA: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    st.insert(1, "new-ca", MADRID).await;
    let (tls, all) = app_sessions(primary);
    assert!(all >= 1 && tls == all, "{tls} of {all} app sessions over TLS");
    st.stop().await;
}
