//! MongoDB over TLS against SecantusDB started TLS-only by the test (not a MongoDB server; see
//! docs/mongodb.md): a test CA and a server certificate for `localhost` (rcgen); verified TLS
//! (`tls=true&tlsCAFile=…`) reads and writes through cellgate; unknown CA, wrong host name and a
//! plaintext client are refused with clear, password-free errors, both on a request (503 naming
//! the shard) and on a map push (422, the old map keeps serving); a client certificate
//! (`tlsCertificateKeyFile`) against a server that requires one; `[tls] backends` refuses a
//! weaker URI on push and at startup.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cellgate::config::Config;
use cellgate::server;
use serde_json::{Value, json};
use support::mongo::{DocStack, Peer, map_toml};
use support::{ADMIN_TOKEN, CANARY, MADRID, config_text, logs};

/// A CA and what it signed; `other_ca` signed nothing any server uses.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    /// The server's certificate (names `localhost` only: 127.0.0.1 is the wrong-name case).
    server_cert: PathBuf,
    server_key: PathBuf,
    /// A client certificate and its key in one PEM file (the driver's `tlsCertificateKeyFile`).
    client: PathBuf,
    /// The same, signed by `other_ca`.
    stranger: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    (p, rcgen::KeyPair::generate().unwrap())
}

fn leaf(names: &[&str], client: bool, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
    p.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    (p.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

/// Owner-only (0600), as key files should be.
fn write_private(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
}

fn pki() -> Pki {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("cellgate-mongotls-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_params, ca_key) = ca("cellgate test CA");
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let (other_params, other_key) = ca("some other CA");
    let other_pem = other_params.self_signed(&other_key).unwrap().pem();
    let other_issuer = rcgen::Issuer::new(other_params, other_key);
    let p = Pki {
        ca: dir.join("root.crt"),
        other_ca: dir.join("other-root.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client: dir.join("client.pem"),
        stranger: dir.join("stranger.pem"),
        dir,
    };
    std::fs::write(&p.ca, ca_pem).unwrap();
    std::fs::write(&p.other_ca, other_pem).unwrap();
    let (cert, key) = leaf(&["localhost"], false, &issuer);
    std::fs::write(&p.server_cert, cert).unwrap();
    write_private(&p.server_key, &key);
    let (cert, key) = leaf(&["cellgate-client"], true, &issuer);
    write_private(&p.client, &format!("{cert}{key}"));
    let (cert, key) = leaf(&["cellgate-client"], true, &other_issuer);
    write_private(&p.stranger, &format!("{cert}{key}"));
    p
}

/// SecantusDB accepting TLS only, with the PKI's server certificate; `require_client_cert`
/// makes it require a client certificate signed by the test CA.
fn tls_peer(p: &Pki, require_client_cert: bool) -> Peer {
    let (cert, key, ca) = (p.server_cert.to_str().unwrap(), p.server_key.to_str().unwrap(), p.ca.to_str().unwrap());
    let mut args = vec!["--tls-cert-file", cert, "--tls-key-file", key];
    if require_client_cert {
        args.extend(["--tls-ca-file", ca, "--tls-require-client-cert"]);
    }
    Peer::start_secantus_with(&args)
}

/// A URI for the peer reached via `host` with `params` (the peer runs without auth).
fn uri(peer: &Peer, host: &str, params: &str) -> String {
    format!("mongodb://{host}:{}/?directConnection=true{}", peer.port, amp(params))
}

fn amp(params: &str) -> String {
    if params.is_empty() { String::new() } else { format!("&{params}") }
}

/// The same with credentials: a canary for the URIs refused before any authentication (TLS
/// fails, or the minimum refuses the URI), which no error, log or admin output may show.
fn uri_pw(peer: &Peer, host: &str, params: &str) -> String {
    format!("mongodb://app:{CANARY}@{host}:{}/?directConnection=true{}", peer.port, amp(params))
}

fn verified(p: &Pki) -> String {
    format!("tls=true&tlsCAFile={}", p.ca.display())
}

/// The test map with shard a (Madrid) at `a`; shard b at `b`.
fn map_of(a: &str, b: &str, version: u64) -> String {
    map_toml(&[a.to_string(), b.to_string()]).replacen("version = 1\n", &format!("version = {version}\n"), 1)
}

async fn push(st: &DocStack, map: String) -> (u16, Value) {
    let r = st.http.put(format!("{}/admin/map", st.admin())).bearer_auth(ADMIN_TOKEN).body(map).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn at((lat, lng): (f64, f64)) -> Value {
    json!({"lat": lat, "lng": lng})
}

fn geo((lat, lng): (f64, f64)) -> Value {
    json!({"type": "Point", "coordinates": [lng, lat]})
}

/// Insert one document in Madrid (shard a) through cellgate and read it back by name.
async fn write_and_read(st: &DocStack, name: &str) {
    let (s, v) = st.write("people/insert", json!({"documents": [{"name": name, "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["shards"][0]["id"], "a", "{v}");
    let (s, v) = st.read("people/find", json!({"region": at(MADRID), "filter": {"name": name}})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["documents"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["documents"][0]["name"], name, "{v}");
}

/// A read on shard a that must fail: 503 `shard_unavailable` naming the shard, with `want` in
/// the message and no password.
async fn refused_request(st: &DocStack, want: &[&str]) -> String {
    let (s, v) = st.read("people/find", json!({"region": at(MADRID)})).await;
    let text = v.to_string();
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("shard_unavailable")), "{text}");
    assert_eq!(v["error"]["shard"], "a", "{text}");
    assert!(want.iter().any(|w| text.contains(w)), "want one of {want:?} in {text}");
    assert!(!text.contains(CANARY), "password leaked: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_tls_reads_writes_and_the_minimum() {
    let p = pki();
    let peer = tls_peer(&p, false);
    let good = uri(&peer, "localhost", &verified(&p));
    let st =
        DocStack::start_map_conf(&map_of(&good, &good, 1), |c| c.push_str("[tls]\nbackends = \"verify-full\"\n")).await;
    write_and_read(&st, "over-tls").await;
    let (s, v) = st.read("people/count", json!({"region": at(MADRID)})).await;
    assert_eq!((s, v["count"].as_u64()), (200, Some(1)), "{v}");
    // The document is on the server: read it directly over verified TLS.
    let direct = mongodb::Client::with_uri_str(format!(
        "mongodb://localhost:{}/?directConnection=true&{}",
        peer.port,
        verified(&p)
    ))
    .await
    .unwrap();
    let n = direct.database("profiles").collection::<bson::Document>("people").count_documents(bson::doc! {}).await;
    assert_eq!(n.unwrap(), 1);
    let (s, admin) = st.admin_get("/admin/shards").await;
    assert_eq!(s, 200, "{admin}");
    assert!(!admin.contains(CANARY), "password in admin output: {admin}");

    // The minimum refuses a weaker URI on push (before any connection); the old map serves on.
    for (v, params, want) in [
        (2, format!("tls=true&tlsInsecure=true&tlsCAFile={}", p.ca.display()), "sslmode=require"),
        (3, "tlsAllowInvalidCertificates=true".to_string(), "sslmode=require"),
        (4, String::new(), "sslmode=disable"),
    ] {
        let weak = uri_pw(&peer, "localhost", &params);
        let (s, out) = push(&st, map_of(&weak, &good, v)).await;
        let text = out.to_string();
        assert_eq!(s, 422, "{params}: {text}");
        assert!(text.contains("shard a database profiles"), "{text}");
        assert!(text.contains(want) && text.contains("weaker than the minimum [tls] backends"), "{text}");
        assert!(!text.contains(CANARY), "password leaked: {text}");
    }
    write_and_read(&st, "still-served").await;

    // ... and at startup: a second instance on a tlsInsecure map does not start.
    let other = st.dir.join("weak");
    std::fs::create_dir_all(&other).unwrap();
    let weak = uri_pw(&peer, "localhost", "tls=true&tlsInsecure=true");
    std::fs::write(other.join("map.toml"), map_of(&weak, &good, 1)).unwrap();
    let cfg = config_text(&other) + "[tls]\nbackends = \"verify-full\"\n";
    let e = server::start(Config::parse(&cfg).unwrap(), false).await.err().expect("refused at startup").to_string();
    assert!(e.contains("tlsInsecure") && e.contains("weaker than the minimum"), "{e}");
    assert!(!e.contains(CANARY), "password leaked: {e}");

    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(!logs.contains(CANARY), "password in the logs");
    st.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_plaintext_are_refused() {
    let p = pki();
    let peer = tls_peer(&p, false);
    let good = uri(&peer, "localhost", &verified(&p));
    // No minimum: each refusal below comes from the connection itself.
    let st = DocStack::start_map(&map_of(&good, &good, 1)).await;
    let cases = [
        // The certificate names localhost, not 127.0.0.1.
        ("127.0.0.1", verified(&p), &["certificate not valid for name \\\"127.0.0.1\\\""][..]),
        ("localhost", format!("tls=true&tlsCAFile={}", p.other_ca.display()), &["certificate", "UnknownIssuer"][..]),
        // No tlsCAFile: the driver's bundled public roots do not know the test CA either.
        ("localhost", "tls=true".to_string(), &["certificate", "UnknownIssuer"][..]),
        // Plaintext to a TLS-only server: it drops the connection; the error says to check TLS.
        ("localhost", "tls=false".to_string(), &["the URI has no tls=true"][..]),
    ];
    for (i, (host, params, want)) in cases.iter().enumerate() {
        let bad = uri_pw(&peer, host, params);
        // On a request: a cellgate started on the map (startup does not connect) answers 503.
        let other = DocStack::start_map(&map_of(&bad, &good, 1)).await;
        let text = refused_request(&other, want).await;
        assert!(want.iter().all(|w| text.contains(w)), "{host} {params}: want all of {want:?} in {text}");
        other.stop().await;
        // On a push: refused (every new endpoint is checked first), the old map serves on.
        let (s, out) = push(&st, map_of(&bad, &good, 2 + i as u64)).await;
        let text = out.to_string();
        assert_eq!(s, 422, "{host} {params}: {text}");
        assert!(text.contains("shard a database profiles"), "{text}");
        assert!(want.iter().all(|w| text.contains(w)), "{host} {params}: want all of {want:?} in {text}");
        assert!(!text.contains(CANARY), "password leaked: {text}");
    }
    write_and_read(&st, "still-verified").await;
    // Without verification (require) the wrong name and the unknown issuer connect: what
    // tlsInsecure means, and why `[tls] backends = "verify-full"` refuses it.
    let insecure = uri(&peer, "127.0.0.1", "tls=true&tlsInsecure=true");
    let (s, out) = push(&st, map_of(&insecure, &good, 20)).await;
    assert_eq!((s, out["result"].as_str()), (200, Some("published")), "{out}");
    write_and_read(&st, "unverified").await;
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(!logs.contains(CANARY), "password in the logs");
    st.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_when_the_server_requires_one() {
    let p = pki();
    let peer = tls_peer(&p, true);
    let with =
        |file: &Path| uri(&peer, "localhost", &format!("{}&tlsCertificateKeyFile={}", verified(&p), file.display()));
    let good = with(&p.client);
    let st = DocStack::start_map(&map_of(&good, &good, 1)).await;
    write_and_read(&st, "mutual-tls").await;

    // No client certificate, or one from a CA the server does not trust: the server ends the
    // handshake.
    let without = uri_pw(&peer, "localhost", &verified(&p));
    let stranger =
        uri_pw(&peer, "localhost", &format!("{}&tlsCertificateKeyFile={}", verified(&p), p.stranger.display()));
    for (v, bad) in [(2, without), (3, stranger)] {
        let other = DocStack::start_map(&map_of(&bad, &good, 1)).await;
        refused_request(&other, &["CertificateRequired", "UnknownCA"]).await;
        other.stop().await;
        let (s, out) = push(&st, map_of(&bad, &good, v)).await;
        let text = out.to_string();
        assert_eq!(s, 422, "{bad}: {text}");
        assert!(text.contains("shard a database profiles"), "{text}");
        assert!(!text.contains(CANARY), "password leaked: {text}");
    }
    // A key file that is not there, or without its key: named when the map is built.
    let certonly = p.dir.join("cert-only.pem");
    std::fs::write(&certonly, std::fs::read_to_string(&p.client).unwrap().split("-----BEGIN PRIVATE").next().unwrap())
        .unwrap();
    for (v, file, want) in [(4, p.dir.join("missing.pem"), "No such file"), (5, certonly, "private key")] {
        let (s, out) = push(&st, map_of(&with(&file), &good, v)).await;
        let text = out.to_string();
        assert_eq!(s, 422, "{text}");
        assert!(text.contains(&format!("tlsCertificateKeyFile {}", file.display())) && text.contains(want), "{text}");
    }
    write_and_read(&st, "still-mutual").await;
    st.stop().await;
}
