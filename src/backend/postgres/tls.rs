//! PostgreSQL over TLS: libpq's `sslmode` / `sslrootcert` / `sslcert` / `sslkey` in a connection
//! string (URL or keyword/value form), stripped before tokio-postgres parses the rest, and the
//! rustls connector (aws-lc provider, passed explicitly) each setting gets. Owns the verifiers;
//! never reports a connection string or a password.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use crate::config::SslMode;

/// The connector every PostgreSQL connection of cellgate uses (also for `sslmode=disable`:
/// tokio-postgres then never starts TLS). Its streams give tokio-postgres the server leaf
/// certificate's `tls-server-end-point` hash (SHA-256 for SHA-1/SHA-256 signatures, else the
/// signature's hash; none for Ed25519 or RSA-PSS), so SCRAM binds to the channel
/// (`channel_binding=prefer` by default; `require` in the string refuses a session without it;
/// tests/pg_tls.rs).
///
/// Files replaced in place are picked up: before each new connection the `sslrootcert`,
/// `sslcert` and `sslkey` files are checked (modified/changed time, size, inode — after
/// symlinks, so a Kubernetes secret volume's swap counts) and, if one changed, the rustls
/// configuration is built again; a new set that does not load is refused with a warning and the
/// previous one keeps connecting. Clones share that state (a pool's connections and its cancel
/// tokens see one configuration).
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Reloading>,
}

struct Reloading {
    settings: TlsSettings,
    /// (the files' stamps when `current` was built, the configuration in use).
    state: std::sync::Mutex<(Vec<Option<Stamp>>, MakeRustlsConnect)>,
}

use crate::secrets::FileStamp as Stamp;

impl Connector {
    /// The configuration for a new connection: the current one, rebuilt first if a file changed.
    fn current(&self) -> MakeRustlsConnect {
        let r = &self.inner;
        let files = r.settings.files();
        let mut state = r.state.lock().unwrap_or_else(|e| e.into_inner());
        if files.is_empty() {
            return state.1.clone();
        }
        let now = stamps(&files);
        if now != state.0 {
            // Stamped before reading: a change made while we read is seen by the next connection.
            state.0 = now;
            match r.settings.build() {
                Ok(c) => {
                    tracing::info!(files = ?files, "PostgreSQL TLS files changed: new connections use them");
                    state.1 = c;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL TLS files changed but do not load; the previous ones stay in use")
                }
            }
        }
        state.1.clone()
    }
}

fn stamps(files: &[&Path]) -> Vec<Option<Stamp>> {
    files.iter().map(|p| crate::secrets::file_stamp(p)).collect()
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for Connector
where
    MakeRustlsConnect: tokio_postgres::tls::MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        self.current().make_tls_connect(domain)
    }
}

/// The connection parameters tokio-postgres does not know, taken out of the string.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// tokio-postgres' own parse error (names an option, never echoes a value) or ours.
    #[error("invalid PostgreSQL connection string: {0}")]
    Syntax(String),
    #[error("sslmode {0} is not supported (expected disable, prefer, require, verify-ca or verify-full)")]
    UnknownMode(String),
    #[error("sslmode={0} needs sslrootcert=<path of the CA certificate(s), PEM>")]
    NoRootCert(&'static str),
    #[error("sslcert and sslkey must be given together")]
    ClientCertPair,
    #[error("{what} {path}: {reason}")]
    File { what: &'static str, path: String, reason: String },
    #[error("sslmode={mode} is weaker than the minimum [tls] backends = \"{min}\"")]
    BelowMinimum { mode: &'static str, min: &'static str },
}

/// The TLS part of one connection string. Part of the endpoint's identity: the connection
/// string (TLS parameters included) keys an endpoint across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// As written; `prefer` (libpq's default) when absent.
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A parsed connection string: tokio-postgres' config (its `ssl_mode` set) and the TLS settings.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

/// Parse a URL (`postgres://...?sslmode=verify-full&sslrootcert=/ca.pem`) or keyword/value
/// (`host=... sslmode=...`) connection string.
pub fn parse(conn: &str) -> Result<ConnInfo, TlsError> {
    let is_url = ["postgres://", "postgresql://"].iter().any(|p| conn.starts_with(p));
    let (rest, taken) = if is_url { strip_url(conn)? } else { strip_keyword_value(conn)? };
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| TlsError::Syntax(e.to_string()))?;
    let tls = TlsSettings::from_params(taken)?;
    config.ssl_mode(match tls.mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    Ok(ConnInfo { config, tls })
}

/// URL form: take the TLS keys out of the query string (values percent-decoded), keep the rest
/// as written. Splits where tokio-postgres does: credentials end at the first `@`, the query
/// starts at the first `?` after them.
fn strip_url(conn: &str) -> Result<(String, Vec<(String, String)>), TlsError> {
    let after_creds = conn.find('@').map_or(0, |i| i + 1);
    let Some(q) = conn[after_creds..].find('?').map(|i| i + after_creds) else {
        return Ok((conn.to_string(), Vec::new()));
    };
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    for param in conn[q + 1..].split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        let key = decode(k)?;
        if TLS_KEYS.contains(&key.as_str()) {
            taken.push((key, decode(v)?));
        } else {
            kept.push(param);
        }
    }
    let mut rest = conn[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, taken))
}

fn decode(s: &str) -> Result<String, TlsError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| TlsError::Syntax("a query parameter is not valid UTF-8 after percent-decoding".into()))
}

/// Keyword/value form (libpq rules: `key = value`, values single-quoted or bare, `\` escapes):
/// take the TLS keys out, write the rest back quoted.
fn strip_keyword_value(conn: &str) -> Result<(String, Vec<(String, String)>), TlsError> {
    let mut chars = conn.chars().peekable();
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    let skip_ws = |c: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while c.next_if(|ch| ch.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(ch) = chars.next_if(|ch| *ch != '=' && !ch.is_whitespace()) {
            key.push(ch);
        }
        skip_ws(&mut chars);
        if chars.next() != Some('=') {
            return Err(TlsError::Syntax(format!("expected `=` after {key:?}")));
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(ch) => value.push(ch),
                    // The value is not shown: it may be a password.
                    None => return Err(TlsError::Syntax(format!("unterminated quoted value of {key:?}"))),
                }
            }
        } else {
            while let Some(ch) = chars.next_if(|ch| !ch.is_whitespace()) {
                if ch == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(ch);
                }
            }
        }
        if TLS_KEYS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            kept.push(format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")));
        }
    }
    Ok((kept.join(" "), taken))
}

impl TlsSettings {
    fn from_params(params: Vec<(String, String)>) -> Result<Self, TlsError> {
        let mut s = TlsSettings { mode: SslMode::Prefer, root_cert: None, client_cert: None, client_key: None };
        // Later values win, as in libpq.
        for (k, v) in params {
            match k.as_str() {
                "sslmode" => s.mode = SslMode::parse(&v).ok_or_else(|| TlsError::UnknownMode(shown(&v)))?,
                "sslrootcert" => s.root_cert = Some(PathBuf::from(v)),
                "sslcert" => s.client_cert = Some(PathBuf::from(v)),
                _ => s.client_key = Some(PathBuf::from(v)),
            }
        }
        if matches!(s.mode, SslMode::VerifyCa | SslMode::VerifyFull) && s.root_cert.is_none() {
            return Err(TlsError::NoRootCert(s.mode.as_str()));
        }
        if s.client_cert.is_some() != s.client_key.is_some() {
            return Err(TlsError::ClientCertPair);
        }
        Ok(s)
    }

    /// Refuse a setting weaker than the process-wide minimum (`[tls] backends`).
    pub fn check_minimum(&self, min: SslMode) -> Result<(), TlsError> {
        if self.mode < min {
            return Err(TlsError::BelowMinimum { mode: self.mode.as_str(), min: min.as_str() });
        }
        Ok(())
    }

    /// The same settings as libpq conninfo keywords (leading space), for a connection libpq
    /// opens (a subscription's). Paths are read on the server that runs libpq.
    pub fn conninfo_params(&self) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut out = format!(" sslmode={}", self.mode.as_str());
        for (k, v) in [("sslrootcert", &self.root_cert), ("sslcert", &self.client_cert), ("sslkey", &self.client_key)] {
            if let Some(p) = v {
                out += &format!(" {k}={}", q(&p.to_string_lossy()));
            }
        }
        out
    }

    /// Build the connector: reads the CA, client certificate and key files now (errors here
    /// refuse the endpoint), and again whenever they change ([`Connector`]).
    pub fn connector(&self) -> Result<Connector, TlsError> {
        let files = self.files();
        let stamped = stamps(&files);
        let current = self.build()?;
        Ok(Connector {
            inner: Arc::new(Reloading { settings: self.clone(), state: std::sync::Mutex::new((stamped, current)) }),
        })
    }

    /// The files this setting reads.
    fn files(&self) -> Vec<&Path> {
        [&self.root_cert, &self.client_cert, &self.client_key].into_iter().flatten().map(PathBuf::as_path).collect()
    }

    fn build(&self) -> Result<MakeRustlsConnect, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Syntax(format!("TLS setup: {e}")))?;
        let roots = self.root_cert.as_deref().map(load_roots).transpose()?;
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => webpki(roots, &provider)?,
            // libpq: `require` with a root certificate file verifies like `verify-ca`.
            (SslMode::VerifyCa | SslMode::Require, Some(roots)) => {
                Arc::new(ChainOnly { inner: webpki(roots, &provider)? })
            }
            // from_params refuses verify-* without sslrootcert.
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => return Err(TlsError::NoRootCert(self.mode.as_str())),
            (SslMode::Disable | SslMode::Prefer | SslMode::Require, _) => Arc::new(EncryptOnly { provider }),
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| file_err("sslcert", cert, e.to_string()))?;
                check_key_mode(key)?;
                // The key's content is never shown, only its path and what went wrong.
                let k = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err("sslkey", key, e.to_string()))?;
                builder.with_client_auth_cert(certs, k).map_err(|e| file_err("sslcert", cert, e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

/// A value shown in an error only if it looks like an sslmode word (it could be a misplaced secret).
fn shown(v: &str) -> String {
    if v.len() <= 20 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        format!("{v:?}")
    } else {
        "(value not shown)".into()
    }
}

fn file_err(what: &'static str, path: &Path, reason: String) -> TlsError {
    TlsError::File { what, path: path.display().to_string(), reason }
}

/// libpq's rule for `sslkey`: no access for others, and none for the group unless the file is
/// root's and only group-readable (0640, the usual root:ssl-cert layout).
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| file_err("sslkey", path, e.kind().to_string()))?;
    let mode = m.mode() & 0o777;
    let allowed = if m.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        let want = if m.uid() == 0 { "0640 or less (owned by root)" } else { "0600 or less" };
        return Err(file_err("sslkey", path, format!("mode {mode:04o} gives group or others access; make it {want}")));
    }
    Ok(())
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_err("sslrootcert", path, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(file_err("sslrootcert", path, "no usable CA certificate in the file".into()));
    }
    Ok(roots)
}

fn webpki(roots: RootCertStore, provider: &Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Syntax(format!("sslrootcert: {e}")))
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
/// webpki checks the chain first and the name last, so a name mismatch means the chain passed.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer` / `require` (libpq semantics): encrypted, the certificate is not checked. The
/// handshake signature still is (the peer must hold the key of the certificate it sent).
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "canary-Pw-7";

    fn url(params: &str) -> String {
        format!("postgres://app:{PW}@db.example:6432/core{params}")
    }

    fn kv(params: &str) -> String {
        format!("host=db.example port=6432 dbname=core user=app password='{PW}' {params}")
    }

    fn check_base(c: &ConnInfo) {
        assert_eq!(c.config.get_user(), Some("app"));
        assert_eq!(c.config.get_password(), Some(PW.as_bytes()));
        assert_eq!(c.config.get_dbname(), Some("core"));
        assert_eq!(c.config.get_ports(), &[6432]);
    }

    #[test]
    fn every_sslmode_in_both_forms() {
        let cases = [
            ("disable", SslMode::Disable, PgSslMode::Disable),
            ("prefer", SslMode::Prefer, PgSslMode::Prefer),
            ("require", SslMode::Require, PgSslMode::Require),
            ("verify-ca", SslMode::VerifyCa, PgSslMode::Require),
            ("verify-full", SslMode::VerifyFull, PgSslMode::Require),
        ];
        for (word, mode, pg) in cases {
            for s in [
                url(&format!("?sslmode={word}&sslrootcert=/etc/ca%20dir/root.pem&application_name=x")),
                kv(&format!("sslmode={word} sslrootcert='/etc/ca dir/root.pem' application_name=x")),
            ] {
                let c = parse(&s).unwrap_or_else(|e| panic!("{word}: {e}"));
                check_base(&c);
                assert_eq!(c.tls.mode, mode, "{s}");
                assert_eq!(c.config.get_ssl_mode(), pg, "{s}");
                assert_eq!(c.tls.root_cert.as_deref(), Some(Path::new("/etc/ca dir/root.pem")));
                assert_eq!(c.config.get_application_name(), Some("x"), "other parameters are kept");
            }
        }
    }

    #[test]
    fn absent_sslmode_is_prefer_and_plain_strings_pass_through() {
        for s in [url(""), url("?connect_timeout=3"), kv("")] {
            let c = parse(&s).unwrap();
            check_base(&c);
            assert_eq!(c.tls.mode, SslMode::Prefer);
            assert_eq!(c.config.get_ssl_mode(), PgSslMode::Prefer);
            assert_eq!(c.tls.root_cert, None);
        }
        assert_eq!(
            parse(&url("?connect_timeout=3")).unwrap().config.get_connect_timeout().map(|d| d.as_secs()),
            Some(3)
        );
        // A password with quotes and backslashes survives the keyword/value rewrite.
        let c = parse(r"host=h user=u password='a\'b\\c d' sslmode=require").unwrap();
        assert_eq!(c.config.get_password(), Some(r"a'b\c d".as_bytes()));
        assert_eq!(c.tls.mode, SslMode::Require);
    }

    #[test]
    fn client_certificate_pair() {
        let c = parse(&url("?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem")).unwrap();
        assert_eq!(c.tls.client_cert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(c.tls.client_key.as_deref(), Some(Path::new("/k.pem")));
        let e = parse(&kv("sslmode=require sslcert=/c.pem")).unwrap_err();
        assert!(matches!(e, TlsError::ClientCertPair), "{e}");
    }

    #[test]
    fn bad_values_are_refused_without_the_password() {
        let cases = [
            (url("?sslmode=allow"), "sslmode \"allow\" is not supported"),
            (kv("sslmode=verify_full"), "sslmode \"verify_full\" is not supported"),
            (url(&format!("?sslmode={PW}x%2Fy")), "sslmode (value not shown) is not supported"),
            (url("?sslmode=verify-full"), "sslmode=verify-full needs sslrootcert"),
            (kv("sslmode=verify-ca"), "sslmode=verify-ca needs sslrootcert"),
            (url("?sslmode=require&nonsense=1"), "invalid PostgreSQL connection string"),
            (kv("sslmode=require port=notaport"), "invalid PostgreSQL connection string"),
            (format!("host=h password='{PW}"), "unterminated quoted value"),
        ];
        for (s, want) in cases {
            let e = parse(&s).expect_err(&s).to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(!e.contains(PW), "password leaked: {e}");
        }
    }

    #[test]
    fn minimum_orders_the_modes() {
        let tls = parse(&url("?sslmode=require")).unwrap().tls;
        assert!(tls.check_minimum(SslMode::Require).is_ok());
        let e = tls.check_minimum(SslMode::VerifyFull).unwrap_err().to_string();
        assert_eq!(e, "sslmode=require is weaker than the minimum [tls] backends = \"verify-full\"");
        // Absent sslmode counts as prefer.
        assert!(parse(&url("")).unwrap().tls.check_minimum(SslMode::Require).is_err());
        assert!(SslMode::Disable < SslMode::Prefer && SslMode::VerifyCa < SslMode::VerifyFull);
    }

    #[test]
    fn conninfo_params_for_libpq() {
        let tls = parse(&url("?sslmode=verify-full&sslrootcert=/x/it's.pem")).unwrap().tls;
        assert_eq!(tls.conninfo_params(), r" sslmode=verify-full sslrootcert='/x/it\'s.pem'");
        assert_eq!(parse(&url("")).unwrap().tls.conninfo_params(), " sslmode=prefer");
    }

    #[test]
    fn connector_reads_the_ca_file() {
        let dir = std::env::temp_dir().join(format!("cellgate-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let with = |p: &Path| parse(&url(&format!("?sslmode=verify-full&sslrootcert={}", p.display()))).unwrap().tls;
        assert!(with(&good).connector().is_ok());
        for (p, want) in [(junk, "no usable CA certificate"), (dir.join("missing.pem"), "sslrootcert")] {
            let e = with(&p).connector().err().expect("refused").to_string();
            assert!(e.contains(want) && e.contains(&p.display().to_string()) && !e.contains(PW), "{e}");
        }
        assert!(parse(&url("?sslmode=require")).unwrap().tls.connector().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn client_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cellgate-tls-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app".to_string()]).unwrap().self_signed(&key).unwrap();
        let (c, k) = (dir.join("client.crt"), dir.join("client.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let tls = parse(&url(&format!("?sslmode=require&sslcert={}&sslkey={}", c.display(), k.display()))).unwrap().tls;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(tls.connector().is_ok());
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = tls.connector().err().expect("0644 refused").to_string();
        assert!(e.contains("mode 0644") && e.contains(&k.display().to_string()) && !e.contains("PRIVATE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
