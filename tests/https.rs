//! HTTPS on both listeners (`[listen.data_tls]`, `[listen.admin_tls]`), in-process with a test CA
//! from rcgen and a rustls client (aws-lc): h1 and h2 by ALPN, the admin API with its token,
//! certificate rotation (new handshakes get the new pair, an open keep-alive connection keeps
//! working), a refused bad pair (previous pair stays, `/admin/tls` shows the error), a
//! group-readable key refused at start, 408 over TLS, and cleartext HTTP on the TLS port. The
//! map's endpoint is unreachable on purpose: the admin endpoints used here need no database.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate::config::Config;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const MAP: &str = "version = 1\nresolution = 5\n\
    [[shards]]\nid = \"a\"\nzone = \"test\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  \
    primary = \"postgres://app:pw@127.0.0.1:1/core\"\n\
    [[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n\
    [fallback]\nmode = \"reject\"\n[tables.core.items]\ncell_column = \"h3\"\n";

struct Ca {
    der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca() -> Ca {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, "cellgate test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { der: cert.der().clone(), issuer: rcgen::Issuer::new(p, key) }
}

/// A server certificate for localhost / 127.0.0.1 with serial `10:<n>`: (chain PEM, key PEM, DER).
fn leaf(ca: &Ca, n: u8) -> (String, String, CertificateDer<'static>) {
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, format!("cellgate {n}"));
    p.serial_number = Some(rcgen::SerialNumber::from(vec![0x10, n]));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    let k = dir.join("key.pem");
    std::fs::write(&k, key).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn config(dir: &Path) -> String {
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    format!(
        "{}\n[listen.data_tls]\ncert = \"{}\"\nkey = \"{}\"\n[listen.admin_tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        config_text(dir),
        c.display(),
        k.display(),
        c.display(),
        k.display()
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellgate-https-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("map.toml"), MAP).unwrap();
    dir
}

async fn tls_connect(addr: std::net::SocketAddr, ca: &Ca, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap()
}

fn peer_leaf(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn h1(s: TlsStream<TcpStream>) -> H1 {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn get_h1(send: &mut H1, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = http::Request::get(path).header("host", "localhost");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send.ready().await.unwrap();
    let resp = send.send_request(req.body(Empty::new()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// `/admin/tls` over a fresh TLS connection.
async fn tls_status(addr: std::net::SocketAddr, ca: &Ca) -> Value {
    let mut send = h1(tls_connect(addr, ca, &[b"http/1.1"]).await).await;
    let (status, v) = get_h1(&mut send, "/admin/tls", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn wait_status(addr: std::net::SocketAddr, ca: &Ca, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let v = tls_status(addr, ca).await;
        if ok(&v) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{what} not seen within 10 s: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listeners_serve_rotate_and_refuse_bad_pairs() {
    logs();
    let dir = temp_dir("main");
    let ca = ca();
    let (cert1, key1, der1) = leaf(&ca, 1);
    write_pair(&dir, &cert1, &key1);
    let server = cellgate::server::start(Config::parse(&config(&dir)).unwrap(), false).await.unwrap();
    let (data, admin) = (server.data_addr, server.admin_addr);

    // h1 by ALPN on the admin listener; the open connection is kept for after the rotation.
    let s = tls_connect(admin, &ca, &[b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(peer_leaf(&s), der1);
    let mut kept = h1(s).await;
    let (status, v) = get_h1(&mut kept, "/livez", None).await;
    assert_eq!((status, &v["live"]), (200, &Value::Bool(true)), "{v}");
    let (status, v) = get_h1(&mut kept, "/admin/map", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], 1, "{v}");
    let (status, _) = get_h1(&mut kept, "/admin/map", None).await;
    assert_eq!(status, 401);

    // h2 by ALPN (offered first) on both listeners.
    for addr in [admin, data] {
        let s = tls_connect(addr, &ca, &[b"h2", b"http/1.1"]).await;
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        let path = if addr == admin { "/livez" } else { "/v1/sql/core/query" };
        let resp = send
            .send_request(http::Request::get(format!("https://localhost{path}")).body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        // The data plane answers GET on a query route with 405: it was routed, over h2.
        assert_eq!(resp.status().as_u16(), if addr == admin { 200 } else { 405 });
    }

    let v = tls_status(admin, &ca).await;
    for l in ["data", "admin"] {
        assert_eq!(v[l]["serving"]["serial"], "10:01", "{v}");
        assert_eq!(v[l]["serving"]["subject"], "CN=cellgate 1", "{v}");
        assert!(v[l]["serving"]["not_after"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v[l]["last_reload"].is_null() && v[l]["last_error"].is_null(), "{v}");
    }

    // Rotation: a new pair in the same files; new handshakes get it, the open connection works.
    let (cert2, key2, der2) = leaf(&ca, 2);
    write_pair(&dir, &cert2, &key2);
    let v = wait_status(admin, &ca, "serial 10:02 on both listeners", |v| {
        v["data"]["serving"]["serial"] == "10:02" && v["admin"]["serving"]["serial"] == "10:02"
    })
    .await;
    assert_eq!(v["admin"]["last_reload"]["result"], "loaded", "{v}");
    for addr in [admin, data] {
        assert_eq!(peer_leaf(&tls_connect(addr, &ca, &[b"http/1.1"]).await), der2);
    }
    let (status, _) = get_h1(&mut kept, "/livez", None).await;
    assert_eq!(status, 200, "the keep-alive connection opened before the rotation still answers");

    // A key that does not match the certificate: refused, the previous pair stays.
    let (_, other_key, _) = leaf(&ca, 3);
    std::fs::write(dir.join("key.pem"), &other_key).unwrap();
    let v =
        wait_status(admin, &ca, "a refused mismatched key", |v| v["admin"]["last_reload"]["result"] == "refused").await;
    let err = v["admin"]["last_error"]["error"].as_str().unwrap();
    assert!(err.contains("do not form a usable pair"), "{v}");
    assert_eq!(v["admin"]["serving"]["serial"], "10:02", "{v}");
    assert_eq!(peer_leaf(&tls_connect(data, &ca, &[b"http/1.1"]).await), der2);

    // A garbage key: refused too, and the error never quotes the file.
    std::fs::write(dir.join("key.pem"), "not a key: SECRET-BYTES-7f3a\n").unwrap();
    let v = wait_status(admin, &ca, "a refused garbage key", |v| {
        v["data"]["last_error"]["error"].as_str().is_some_and(|e| e.contains("no usable PEM private key"))
    })
    .await;
    assert!(!v.to_string().contains("SECRET-BYTES"), "{v}");
    assert_eq!(v["data"]["serving"]["serial"], "10:02", "{v}");
    for addr in [admin, data] {
        assert_eq!(peer_leaf(&tls_connect(addr, &ca, &[b"http/1.1"]).await), der2);
    }
    assert!(!String::from_utf8_lossy(&logs().lock().unwrap()).contains("SECRET-BYTES"));

    // The first request head over TLS is held to the header timeout (1 s here): 408.
    let mut s = tls_connect(data, &ca, &[b"http/1.1"]).await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().ok();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("request_timeout"), "{text}");

    // Cleartext HTTP on a TLS port: the connection is closed, no HTTP answer, nothing breaks.
    for addr in [admin, data] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /livez HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await.unwrap().ok();
        assert!(!out.starts_with(b"HTTP/"), "{:?}", String::from_utf8_lossy(&out));
    }
    let mut send = h1(tls_connect(admin, &ca, &[b"http/1.1"]).await).await;
    assert_eq!(get_h1(&mut send, "/livez", None).await.0, 200);

    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_readable_key_is_refused_at_start() {
    logs();
    let dir = temp_dir("mode");
    let ca = ca();
    let (cert, key, _) = leaf(&ca, 1);
    write_pair(&dir, &cert, &key);
    std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = match cellgate::server::start(Config::parse(&config(&dir)).unwrap(), false).await {
        Ok(_) => panic!("a 0644 key file must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("listen.data_tls: key "), "{err}");
    assert!(err.contains("mode 0644 lets group or others read it"), "{err}");

    // Unknown fields in the table are refused by the parser.
    let bad = format!("{}\n[listen.data_tls]\ncert = \"/c\"\nkey = \"/k\"\nca = \"/x\"\n", config_text(&dir));
    assert!(Config::parse(&bad).unwrap_err().to_string().contains("unknown field"));
    std::fs::remove_dir_all(&dir).unwrap();
}
