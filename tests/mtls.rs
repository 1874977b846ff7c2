//! Mutual TLS (`client_ca`, `client_auth`, `[[clients]]`) against a real PostgreSQL shard: client
//! certificates from a test CA (rcgen) mapped to identities by SAN URI, SAN DNS name and CN; reads
//! and writes by scope, 403 for a read-only identity writing and for an unknown identity (named in
//! the error), handshakes refused without a certificate or with one from another CA, bearer
//! tokens beside certificates and instead of them (`client_auth = "optional"`), the admin listener
//! with an admin-scope certificate, and the client CA's reload (a broken bundle refused and shown
//! in `/admin/tls`, a new one taking over for new handshakes).
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpStream;

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const STRANGER: &str = "spiffe://cluster.local/ns/shop/sa/stranger";

struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), der: cert.der().clone(), issuer: rcgen::Issuer::new(p, key) }
}

/// The listeners' certificate for localhost: (chain PEM, key PEM).
fn server_leaf(ca: &Ca) -> (String, String) {
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "cellgate");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A client certificate (clientAuth) with the given subject CN, SAN URIs and SAN DNS names.
struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    pem: String,
    key_pem: String,
}

fn client_cert(ca: &Ca, cn: &str, uris: &[&str], dns: &[&str]) -> ClientCert {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    for u in uris {
        p.subject_alt_names.push(rcgen::SanType::URI((*u).try_into().unwrap()));
    }
    for d in dns {
        p.subject_alt_names.push(rcgen::SanType::DnsName((*d).try_into().unwrap()));
    }
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    ClientCert { chain: vec![cert.der().clone()], pem: cert.pem(), key_pem: key.serialize_pem() }
}

struct Tls {
    dir: PathBuf,
    server_ca: Ca,
}

impl Tls {
    /// A directory with the listeners' pair (signed by `server_ca`) and `client-ca.pem`.
    fn new(name: &str, client_ca: &Ca) -> Tls {
        let dir = std::env::temp_dir().join(format!("cellgate-mtls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server_ca = ca("cellgate server CA");
        let (cert, key) = server_leaf(&server_ca);
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(dir.join("client-ca.pem"), &client_ca.pem).unwrap();
        Tls { dir, server_ca }
    }

    /// A `[listen.<listener>_tls]` table; `client_auth` `None` leaves the default (required).
    fn table(&self, listener: &str, client_auth: Option<&str>) -> String {
        let mut t = format!(
            "\n[listen.{listener}_tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            self.dir.join("cert.pem").display(),
            self.dir.join("key.pem").display(),
            self.dir.join("client-ca.pem").display()
        );
        if let Some(mode) = client_auth {
            t += &format!("client_auth = \"{mode}\"\n");
        }
        t
    }
}

const CLIENTS: &str = "
[[clients]]
identity = \"spiffe://cluster.local/ns/shop/sa/orders\"
name = \"orders\"
scopes = [\"read\", \"write\"]
[[clients]]
identity = \"dns:reports.internal\"
name = \"reports\"
scopes = [\"read\"]
[[clients]]
identity = \"cn:ops\"
name = \"ops\"
scopes = [\"admin\"]
";

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A TLS connection trusting `server_ca`, presenting `cert` if given; HTTP/1.1 over it.
async fn connect(addr: SocketAddr, server_ca: &Ca, cert: Option<&ClientCert>) -> Result<H1, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

/// One request on an open connection: (status, JSON body). `body` makes it a JSON POST.
async fn send(h: &mut H1, path: &str, token: Option<&str>, body: Option<&Value>) -> Result<(u16, Value), String> {
    let mut req = http::Request::builder().uri(path).header("host", "localhost");
    req = match body {
        Some(_) => req.method("POST").header("content-type", "application/json"),
        None => req.method("GET"),
    };
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let bytes = body.map(|b| Bytes::from(serde_json::to_vec(b).unwrap())).unwrap_or_default();
    h.ready().await.map_err(|e| format!("connection: {e}"))?;
    let resp = h.send_request(req.body(Full::new(bytes)).unwrap()).await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&body)}))))
}

/// Connect and send one request.
async fn call(
    addr: SocketAddr,
    tls: &Tls,
    cert: Option<&ClientCert>,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut h = connect(addr, &tls.server_ca, cert).await?;
    send(&mut h, path, token, body).await
}

fn insert(id: i64) -> Value {
    json!({
        "region": {"lat": MADRID.0, "lng": MADRID.1},
        "sql": "INSERT INTO items (id, name, h3) VALUES ($1, $2, $3)",
        "params": [id, format!("item {id}"), h3_of(MADRID.0, MADRID.1)],
    })
}

fn select(id: i64) -> Value {
    json!({
        "region": {"lat": MADRID.0, "lng": MADRID.1},
        "sql": "SELECT name FROM items WHERE id = $1",
        "params": [id],
        "consistency": "primary",
    })
}

const QUERY: &str = "/v1/sql/core/query";
const EXECUTE: &str = "/v1/sql/core/execute";

async fn admin_tls_status(stack: &Stack) -> Value {
    let (status, text) = stack.admin_get("/admin/tls").await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn wait_tls_status(stack: &Stack, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let v = admin_tls_status(stack).await;
        if ok(&v) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{what} not seen within 10 s: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_data_and_admin_requests() {
    let client_ca = ca("cellgate client CA");
    let tls = Tls::new("main", &client_ca);
    let orders = client_cert(&client_ca, "orders", &[ORDERS], &["orders.internal"]);
    let reports = client_cert(&client_ca, "reports", &[], &["Reports.Internal"]);
    let ops = client_cert(&client_ca, "ops", &[], &[]);
    let stranger = client_cert(&client_ca, "stranger", &[STRANGER], &[]);
    let other_ca = ca("some other CA");
    let forged = client_cert(&other_ca, "orders", &[ORDERS], &[]);

    // The data listener requires a client certificate; admin stays cleartext (the stack polls it).
    let data_table = tls.table("data", None);
    let stack = Stack::start(1, 0, |cfg| {
        cfg.push_str(&data_table);
        cfg.push_str(CLIENTS);
    })
    .await;
    let data = stack.server.as_ref().unwrap().data_addr;

    // A read+write identity (SAN URI) writes and reads back, on one connection: the identity
    // rides on every request of it.
    let mut h = connect(data, &tls.server_ca, Some(&orders)).await.unwrap();
    let (s, v) = send(&mut h, EXECUTE, None, Some(&insert(1))).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let (s, v) = send(&mut h, QUERY, None, Some(&select(1))).await.unwrap();
    assert_eq!((s, &v["rows"][0]["name"]), (200, &json!("item 1")), "{v}");

    // A read-only identity (SAN DNS name, matched without case) reads, and may not write.
    let (s, v) = call(data, &tls, Some(&reports), QUERY, None, Some(&select(1))).await.unwrap();
    assert_eq!((s, &v["rows"][0]["name"]), (200, &json!("item 1")), "{v}");
    let (s, v) = call(data, &tls, Some(&reports), EXECUTE, None, Some(&insert(2))).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");

    // An admin-only identity (CN) may not use the data plane.
    let (s, v) = call(data, &tls, Some(&ops), QUERY, None, Some(&select(1))).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");

    // An identity that matches no [[clients]] entry: 403 naming what the certificate carries.
    let (s, v) = call(data, &tls, Some(&stranger), QUERY, None, Some(&select(1))).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(STRANGER) && msg.contains("match no [[clients]] entry"), "{v}");
    assert_eq!(v["error"]["identities"], json!([STRANGER, "cn:stranger"]), "{v}");

    // A bearer token beside a certificate decides alone: a write token on the read-only
    // identity's connection writes; a read token on the writer's connection may not.
    let (s, v) = call(data, &tls, Some(&reports), EXECUTE, Some(WRITE_TOKEN), Some(&insert(3))).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(data, &tls, Some(&orders), EXECUTE, Some(READ_TOKEN), Some(&insert(4))).await.unwrap();
    assert_eq!(s, 403, "{v}");
    let (s, v) = call(data, &tls, Some(&orders), QUERY, Some("not-a-token"), Some(&select(1))).await.unwrap();
    assert_eq!(s, 401, "{v}");

    // Required: no certificate, or one from another CA, and the handshake is refused (with TLS
    // 1.3 the client learns it on its first read), even with a good token.
    for (what, cert) in [("no certificate", None), ("another CA's certificate", Some(&forged))] {
        let r = call(data, &tls, cert, QUERY, Some(READ_TOKEN), Some(&select(1))).await;
        assert!(r.is_err(), "{what}: {r:?}");
    }

    // /admin/tls shows the client CA.
    let v = admin_tls_status(&stack).await;
    let ca_status = &v["data"]["client_ca"];
    assert_eq!(ca_status["client_auth"], "required", "{v}");
    assert_eq!(ca_status["authorities"][0]["subject"], "CN=cellgate client CA", "{v}");
    assert!(ca_status["last_reload"].is_null() && ca_status["last_error"].is_null(), "{v}");
    assert!(v["admin"].is_null(), "{v}");

    // A broken new bundle is refused: the one in use stays, /admin/tls says why.
    let ca_file = tls.dir.join("client-ca.pem");
    std::fs::write(&ca_file, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
    let v = wait_tls_status(&stack, "a refused client CA", |v| {
        v["data"]["client_ca"]["last_reload"]["result"] == "refused"
    })
    .await;
    let err = v["data"]["client_ca"]["last_error"]["error"].as_str().unwrap();
    assert!(err.starts_with("client CA ") && err.contains("client-ca.pem"), "{v}");
    assert_eq!(v["data"]["client_ca"]["authorities"][0]["subject"], "CN=cellgate client CA", "{v}");
    let (s, v) = call(data, &tls, Some(&orders), QUERY, None, Some(&select(1))).await.unwrap();
    assert_eq!(s, 200, "{v}");

    // A new bundle with another CA: new handshakes trust it, and no longer the old one.
    std::fs::write(&ca_file, &other_ca.pem).unwrap();
    wait_tls_status(&stack, "the new client CA", |v| {
        v["data"]["client_ca"]["authorities"][0]["subject"] == "CN=some other CA"
            && v["data"]["client_ca"]["last_reload"]["result"] == "loaded"
    })
    .await;
    let (s, v) = call(data, &tls, Some(&forged), EXECUTE, None, Some(&insert(5))).await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(call(data, &tls, Some(&orders), QUERY, None, Some(&select(1))).await.is_err());
    std::fs::write(&ca_file, &client_ca.pem).unwrap();
    wait_tls_status(&stack, "the first client CA again", |v| {
        v["data"]["client_ca"]["authorities"][0]["subject"] == "CN=cellgate client CA"
    })
    .await;

    // A second instance: optional client certificates on the data listener, required ones on
    // the admin listener.
    let mut stack = stack;
    let (data_table, admin_table) = (tls.table("data", Some("optional")), tls.table("admin", None));
    let i = stack
        .add_instance(|cfg| {
            cfg.push_str(&data_table);
            cfg.push_str(&admin_table);
            cfg.push_str(CLIENTS);
        })
        .await;
    let (data2, admin2) = (stack.extra[i].data_addr, stack.extra[i].admin_addr);
    wait_ready_tls(admin2, &tls, &ops).await;

    // Optional: without a certificate the bearer token decides, and none at all is 401.
    let (s, v) = call(data2, &tls, None, EXECUTE, Some(WRITE_TOKEN), Some(&insert(6))).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(data2, &tls, None, QUERY, Some(READ_TOKEN), Some(&select(6))).await.unwrap();
    assert_eq!((s, &v["rows"][0]["name"]), (200, &json!("item 6")), "{v}");
    let (s, v) = call(data2, &tls, None, EXECUTE, Some(READ_TOKEN), Some(&insert(7))).await.unwrap();
    assert_eq!(s, 403, "{v}");
    let (s, v) = call(data2, &tls, None, QUERY, None, Some(&select(6))).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (401, Some("unauthorized")), "{v}");
    // A certificate still counts where it is optional, and must still chain to the CA.
    let (s, v) = call(data2, &tls, Some(&orders), EXECUTE, None, Some(&insert(8))).await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(call(data2, &tls, Some(&forged), QUERY, None, Some(&select(6))).await.is_err());

    // The admin listener: an admin-scope identity (CN) is let in, a data identity is not, and an
    // admin token beside a data identity's certificate is.
    let (s, v) = call(admin2, &tls, Some(&ops), "/admin/map", None, None).await.unwrap();
    assert_eq!((s, &v["version"]), (200, &json!(1)), "{v}");
    let (s, v) = call(admin2, &tls, Some(&ops), "/admin/tls", None, None).await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["client_ca"]["client_auth"], "optional", "{v}");
    assert_eq!(v["admin"]["client_ca"]["client_auth"], "required", "{v}");
    let (s, v) = call(admin2, &tls, Some(&orders), "/admin/map", None, None).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v) = call(admin2, &tls, Some(&stranger), "/admin/map", None, None).await.unwrap();
    assert_eq!((s, &v["error"]["identities"]), (403, &json!([STRANGER, "cn:stranger"])), "{v}");
    let (s, v) = call(admin2, &tls, Some(&orders), "/admin/map", Some(ADMIN_TOKEN), None).await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(call(admin2, &tls, None, "/admin/map", Some(ADMIN_TOKEN), None).await.is_err());

    // Peer pushes over HTTPS: B's admin listener wants a client certificate; A pushes to it with
    // `[tls] peer_ca` and the admin identity's certificate, C with no certificate. Each has its
    // own map file, so B learns a map only from a push.
    std::fs::write(tls.dir.join("server-ca.pem"), &tls.server_ca.pem).unwrap();
    std::fs::write(tls.dir.join("ops.pem"), &ops.pem).unwrap();
    std::fs::write(tls.dir.join("ops.key"), &ops.key_pem).unwrap();
    std::fs::set_permissions(tls.dir.join("ops.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let admin_table = tls.table("admin", None);
    let b = stack
        .add_instance_with_own_map(|cfg| {
            cfg.push_str(&admin_table);
            cfg.push_str(CLIENTS);
        })
        .await;
    let admin_b = stack.extra[b].admin_addr;
    wait_ready_tls(admin_b, &tls, &ops).await;
    let peer_of = |with_cert: bool| {
        let dir = tls.dir.clone();
        move |cfg: &mut String| {
            *cfg = format!("peers = [\"https://localhost:{}\"]\n{cfg}", admin_b.port());
            cfg.push_str(&format!("\n[tls]\npeer_ca = \"{}\"\n", dir.join("server-ca.pem").display()));
            if with_cert {
                cfg.push_str(&format!(
                    "peer_cert = \"{}\"\npeer_key = \"{}\"\n",
                    dir.join("ops.pem").display(),
                    dir.join("ops.key").display()
                ));
            }
        }
    };
    let a = stack.add_instance_with_own_map(peer_of(true)).await;
    let c = stack.add_instance_with_own_map(peer_of(false)).await;
    let map = std::fs::read_to_string(stack.dir.join("map.toml")).unwrap();
    for (instance, version, reached) in [(c, 2, false), (a, 3, true)] {
        wait_ready(&stack.http, &stack.admin_of(instance), Duration::from_secs(30)).await;
        let body = map.replacen("version = 1\n", &format!("version = {version}\n"), 1);
        let r = stack.http.put(format!("{}/admin/map", stack.admin_of(instance))).bearer_auth(ADMIN_TOKEN).body(body);
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        assert_eq!(v["result"], "published", "{v}");
        assert_eq!(v["peers"][0]["acknowledged"], json!(reached), "{v}");
        if !reached {
            // Refused by B's handshake: the error says TLS, and names no secret.
            let e = v["peers"][0]["error"].as_str().unwrap_or_default().to_string();
            assert!(!e.contains("PRIVATE"), "{v}");
        }
        let (s, m) = call(admin_b, &tls, Some(&ops), "/admin/map", None, None).await.unwrap();
        assert_eq!((s, &m["version"]), (200, &json!(if reached { version } else { 1 })), "{m}");
    }

    stack.stop().await;
    std::fs::remove_dir_all(&tls.dir).unwrap();
}

/// `/readyz` of an instance whose admin listener wants a client certificate.
async fn wait_ready_tls(admin: SocketAddr, tls: &Tls, cert: &ClientCert) {
    let t = Instant::now();
    loop {
        if let Ok((200, _)) = call(admin, tls, Some(cert), "/readyz", None, None).await {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "instance not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn clients_without_a_client_ca_are_refused() {
    let dir = Path::new("/nonexistent");
    let cfg = format!("{}{CLIENTS}", config_text(dir));
    let err = cellgate::config::Config::parse(&cfg).unwrap_err().to_string();
    assert!(err.contains("[[clients]] configured but no listener has client_ca"), "{err}");
}
