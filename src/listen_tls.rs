//! TLS for cellgate's own listeners (`[listen.data_tls]`, `[listen.admin_tls]`): loading a
//! certificate chain and private key (key file owner-only, the key must match the leaf), the
//! client CA of mutual TLS (`client_ca`, `client_auth`) and the identities read from a client's
//! certificate, the rustls `ServerConfig` (aws-lc provider, ALPN `h2` + `http/1.1`), a certificate
//! resolver backed by an `ArcSwap` so new handshakes pick up a rotated pair, the once-a-second
//! poll that reloads the pair and the client CA when their files change, and the status
//! `GET /admin/tls` shows.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::{ClientAuth, ListenTls};

/// How often the certificate, key and client CA files are checked for a change.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {path}: {problem}")]
    Cert { path: String, problem: String },
    /// `problem` never quotes the key file's content.
    #[error("key {path}: {problem}")]
    Key { path: String, problem: String },
    #[error("certificate {cert} and key {key} do not form a usable pair: {problem}")]
    Pair { cert: String, key: String, problem: String },
    #[error("client CA {path}: {problem}")]
    ClientCa { path: String, problem: String },
    #[error("TLS server configuration: {0}")]
    Config(String),
}

/// What the serving certificate is, for `/admin/tls`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    pub subject: String,
    /// Hex, colon-separated, as `openssl x509 -serial` shows it (lower case).
    pub serial: String,
    /// RFC 3339, UTC.
    pub not_after: String,
}

/// The last reload attempt of one listener's pair (or client CA).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    /// RFC 3339, UTC.
    pub at: String,
    /// `loaded` or `refused` (the previous pair stays in use).
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One listener's status as `GET /admin/tls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub cert_file: String,
    pub key_file: String,
    pub serving: CertInfo,
    /// When the serving pair was loaded (RFC 3339, UTC).
    pub loaded_at: String,
    /// The last reload after start (`None` before the files first changed).
    pub last_reload: Option<Attempt>,
    /// The most recent refused pair's error, kept after later successes with its time.
    pub last_error: Option<Attempt>,
    /// Mutual TLS: the client CA in use (absent without `client_ca`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<CaStatus>,
}

/// A listener's client CA as `GET /admin/tls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaStatus {
    pub file: String,
    /// `required` or `optional`.
    pub client_auth: &'static str,
    /// The certificates of the bundle in use.
    pub authorities: Vec<CertInfo>,
    /// When the bundle in use was loaded (RFC 3339, UTC).
    pub loaded_at: String,
    /// The last reload after start (`None` before the file first changed).
    pub last_reload: Option<Attempt>,
    /// The most recent refused bundle's error (the previous one stays in use).
    pub last_error: Option<Attempt>,
}

/// The identities of a connection's client certificate, read once after the handshake and
/// attached to every request of the connection (a request extension), in the canonical syntax
/// of `config::client_identity`: SAN URIs (`scheme://…`), then SAN DNS names (`dns:name`, lower
/// case), then the subject's common names (`cn:name`). Empty when the leaf carries none of them
/// (or, not expected after verification, does not parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Vec<String>);

/// The client certificate of a finished handshake, if the client sent one.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<Arc<PeerIdentity>> {
    let leaf = conn.peer_certificates()?.first()?;
    Some(Arc::new(PeerIdentity(identities(leaf))))
}

fn identities(leaf: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else { return Vec::new() };
    let (mut uris, mut names) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                // A URI whose scheme is `dns` or `cn` is skipped: it would read as the other forms.
                GeneralName::URI(u) if crate::config::is_uri_identity(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => names.push(format!("dns:{}", d.to_ascii_lowercase())),
                _ => {}
            }
        }
    }
    let cns = cert.subject().iter_common_name().filter_map(|a| a.as_str().ok()).map(|cn| format!("cn:{cn}"));
    uris.into_iter().chain(names).chain(cns).collect()
}

/// The pair currently handed to new handshakes.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// TLS of one listener: the acceptor's config and the swappable pair behind it.
pub struct ListenerTls {
    cert: PathBuf,
    key: PathBuf,
    /// `client_ca` and its mode.
    client: Option<(PathBuf, ClientAuth)>,
    resolver: Arc<Resolver>,
    /// Replaced whole when the client CA changes (the pair swaps inside `resolver`). A new
    /// config also brings a new session cache, so a session made under a CA that was just
    /// removed cannot be resumed.
    config: ArcSwap<ServerConfig>,
    status: Mutex<Status>,
    /// The files' identity when the serving pair (or the last refused one) was read.
    seen: Mutex<Option<Fingerprint>>,
    /// The same for the client CA file.
    ca_seen: Mutex<Option<Fingerprint>>,
}

/// The TLS of both listeners (`None` = cleartext).
#[derive(Default)]
pub struct Listeners {
    pub data: Option<Arc<ListenerTls>>,
    pub admin: Option<Arc<ListenerTls>>,
}

impl Listeners {
    pub fn status_json(&self) -> serde_json::Value {
        let one = |l: &Option<Arc<ListenerTls>>| match l {
            Some(l) => serde_json::to_value(l.status()).unwrap_or(serde_json::Value::Null),
            None => serde_json::Value::Null,
        };
        serde_json::json!({"data": one(&self.data), "admin": one(&self.admin)})
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The [`crate::secrets::file_stamp`] of each file (mtime, ctime, size, inode after symlinks): a
/// rewrite in place, a `chmod` and a Kubernetes secret's symlink swap all change it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<crate::secrets::FileStamp>);

fn fingerprint(files: &[&Path]) -> Option<Fingerprint> {
    files.iter().map(|p| crate::secrets::file_stamp(p)).collect::<Option<Vec<_>>>().map(Fingerprint)
}

/// Record `now` as seen; true if it differs from what was (a missing file mid-swap: wait for
/// all of them to be there).
fn changed(seen: &Mutex<Option<Fingerprint>>, now: Option<Fingerprint>) -> bool {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    if now.is_none() || *seen == now {
        return false;
    }
    *seen = now;
    true
}

/// Read and check a pair: PEM chain (leaf first) and PEM private key (PKCS#8, PKCS#1 or SEC1),
/// the key file readable by its owner only, the key matching the leaf.
fn load_pair(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    let cert_path = cert.display().to_string();
    let key_path = key.display().to_string();
    let cert_err = |problem: String| TlsError::Cert { path: cert_path.clone(), problem };
    let pem = std::fs::read(cert).map_err(|e| cert_err(e.kind().to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("not PEM: {e}")))?;
    let Some(leaf) = chain.first() else { return Err(cert_err("no CERTIFICATE block".into())) };
    let info = cert_info(leaf).map_err(cert_err)?;
    // Owner-only mode, absolute path, size limit: the same rule as `${file:...}` secrets.
    let abs = std::path::absolute(key).map_err(|e| TlsError::Key { path: key_path.clone(), problem: e.to_string() })?;
    let text = crate::shardmap::secret::read_secret_file(&abs.display().to_string()).map_err(|e| match e {
        crate::shardmap::secret::ExpandError::File { problem, .. } => TlsError::Key { path: key_path.clone(), problem },
        other => TlsError::Key { path: key_path.clone(), problem: other.to_string() },
    })?;
    // The parser's error names the PEM section problem, never the key bytes.
    let der = PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|_| TlsError::Key { path: key_path.clone(), problem: "no usable PEM private key".into() })?;
    let ck = CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsError::Pair {
        cert: cert_path.clone(),
        key: key_path.clone(),
        problem: e.to_string(),
    })?;
    Ok((Arc::new(ck), info))
}

/// Read and check a client CA bundle: PEM, at least one certificate, each usable as a trust
/// anchor. The verifier asks every client for a certificate chaining to the bundle (and names
/// the bundle's subjects as hints); `optional` lets a client without one through.
fn load_client_ca(path: &Path, mode: ClientAuth) -> Result<(Arc<dyn ClientCertVerifier>, Vec<CertInfo>), TlsError> {
    let err = |problem: String| TlsError::ClientCa { path: path.display().to_string(), problem };
    let pem = std::fs::read(path).map_err(|e| err(e.kind().to_string()))?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    let mut infos = Vec::with_capacity(certs.len());
    for (i, der) in certs.into_iter().enumerate() {
        infos.push(cert_info(&der).map_err(|e| err(format!("certificate {}: {e}", i + 1)))?);
        roots.add(der).map_err(|e| err(format!("certificate {}: {e}", i + 1)))?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if mode == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    let verifier = builder.build().map_err(|e| err(e.to_string()))?;
    Ok((verifier, infos))
}

/// The listener's server config: the swappable pair, the client verifier (or none), ALPN.
fn server_config(
    resolver: Arc<Resolver>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| format!("not X.509: {e}"))?;
    let ts = cert.validity().not_after.timestamp();
    let not_after = chrono::DateTime::from_timestamp(ts, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ts.to_string());
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string().to_ascii_lowercase(),
        not_after,
    })
}

impl ListenerTls {
    /// Load the pair and the client CA (any problem refuses the start) and build the server
    /// config.
    pub fn load(files: &ListenTls) -> Result<Arc<ListenerTls>, TlsError> {
        let seen = fingerprint(&[&files.cert, &files.key]);
        let (ck, info) = load_pair(&files.cert, &files.key)?;
        let resolver = Arc::new(Resolver(ArcSwap::new(ck)));
        let client = files.client_ca.clone().zip(files.client_auth());
        let ca_seen = client.as_ref().and_then(|(path, _)| fingerprint(&[path]));
        let (verifier, ca_status) = match &client {
            Some((path, mode)) => {
                let (v, authorities) = load_client_ca(path, *mode)?;
                let st = CaStatus {
                    file: path.display().to_string(),
                    client_auth: mode.as_str(),
                    authorities,
                    loaded_at: now_rfc3339(),
                    last_reload: None,
                    last_error: None,
                };
                (Some(v), Some(st))
            }
            None => (None, None),
        };
        let config = server_config(resolver.clone(), verifier)?;
        Ok(Arc::new(ListenerTls {
            cert: files.cert.clone(),
            key: files.key.clone(),
            client,
            resolver,
            config: ArcSwap::from_pointee(config),
            status: Mutex::new(Status {
                cert_file: files.cert.display().to_string(),
                key_file: files.key.display().to_string(),
                serving: info,
                loaded_at: now_rfc3339(),
                last_reload: None,
                last_error: None,
                client_ca: ca_status,
            }),
            seen: Mutex::new(seen),
            ca_seen: Mutex::new(ca_seen),
        }))
    }

    /// An acceptor for one new connection, on the current config (client CA included).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reload the pair if its files changed since the last look, and the client CA if its file
    /// did. Each is checked on its own: a refused one leaves the one in use in place (a broken
    /// CA bundle does not hold up a certificate rotation, nor the reverse); it is tried again
    /// only when its files change again.
    pub fn poll(&self, listener: &'static str) {
        if changed(&self.seen, fingerprint(&[&self.cert, &self.key])) {
            self.reload_pair(listener);
        }
        if let Some((path, mode)) = &self.client
            && changed(&self.ca_seen, fingerprint(&[path]))
        {
            self.reload_client_ca(listener, path, *mode);
        }
    }

    fn reload_client_ca(&self, listener: &'static str, path: &Path, mode: ClientAuth) {
        let attempt = load_client_ca(path, mode)
            .and_then(|(v, infos)| Ok((server_config(self.resolver.clone(), Some(v))?, infos)));
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ca) = st.client_ca.as_mut() else { return };
        match attempt {
            Ok((config, infos)) => {
                self.config.store(Arc::new(config));
                tracing::info!(listener, authorities = infos.len(), "TLS client CA reloaded");
                ca.authorities = infos;
                ca.loaded_at = now_rfc3339();
                ca.last_reload = Some(Attempt { at: ca.loaded_at.clone(), result: "loaded", error: None });
            }
            Err(e) => {
                tracing::warn!(listener, error = %e, "TLS client CA reload refused; the previous one stays in use");
                let a = Attempt { at: now_rfc3339(), result: "refused", error: Some(e.to_string()) };
                ca.last_reload = Some(a.clone());
                ca.last_error = Some(a);
            }
        }
    }

    fn reload_pair(&self, listener: &'static str) {
        let attempt = load_pair(&self.cert, &self.key);
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match attempt {
            Ok((ck, info)) => {
                self.resolver.0.store(ck);
                tracing::info!(listener, serial = %info.serial, not_after = %info.not_after, "TLS certificate reloaded");
                st.serving = info;
                st.loaded_at = now_rfc3339();
                st.last_reload = Some(Attempt { at: st.loaded_at.clone(), result: "loaded", error: None });
            }
            Err(e) => {
                tracing::warn!(listener, error = %e, "TLS certificate reload refused; the previous pair stays in use");
                let a = Attempt { at: now_rfc3339(), result: "refused", error: Some(e.to_string()) };
                st.last_reload = Some(a.clone());
                st.last_error = Some(a);
            }
        }
    }
}

/// Check both listeners' files every [`POLL_INTERVAL`] until the task is dropped. Polling
/// (rather than a file watch) follows rewrites in place and Kubernetes secret symlink swaps
/// alike, and costs two `stat` calls per listener per second (three with a client CA).
pub async fn poll_loop(data: Option<Arc<ListenerTls>>, admin: Option<Arc<ListenerTls>>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (name, l) in [("data", &data), ("admin", &admin)] {
            if let Some(l) = l {
                let l = l.clone();
                // File reads and key parsing off the async workers.
                let _ = tokio::task::spawn_blocking(move || l.poll(name)).await;
            }
        }
    }
}
