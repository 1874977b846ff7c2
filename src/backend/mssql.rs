//! SQL Server backend (tiberius 0.13): connection strings (URL and ADO forms) and their TLS level
//! against `[tls] backends`, a bb8 pool per endpoint with our own `ManageConnection`,
//! `sp_executesql` with `@P1..@Pn` typed from the server's description, batches in one
//! transaction, and the role prober.
//! Knows nothing of HTTP or routing; never logs or returns a connection string.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use serde_json::Value;
use tiberius::error::Error as TdsError;
use tiberius::{Client, ColumnData, ColumnType, Command, EncryptionLevel};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::health::EndpointHealth;
pub mod prober;
pub mod types;

use super::postgres::Rows;
use super::{BackendError, Role};
use crate::config;
use crate::shardmap::Secret;
use types::{self as mssql_types, SqlType};

pub type TdsClient = Client<Compat<TcpStream>>;

// ---------------------------------------------------------------------------------------------
// Connection strings
// ---------------------------------------------------------------------------------------------

/// Why a connection string was rejected. Never carries a value from the string (it may be a
/// password), only key names and fixed texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("SQL Server URL: {0}")]
    Url(&'static str),
    #[error("SQL Server URL: unknown option {0:?}")]
    UnknownOption(String),
    #[error("SQL Server URL: option {0:?} has an invalid value")]
    BadOption(String),
    #[error("invalid SQL Server ADO connection string")]
    Ado,
    #[error("trust_server_certificate and ca_file are mutually exclusive")]
    TrustConflict,
    #[error("SQL Server {} counts as sslmode={}, weaker than the minimum [tls] backends = \"{}\"", .tls.describe(), .tls.level().as_str(), .min.as_str())]
    BelowMinimum { tls: Tls, min: config::SslMode },
}

/// Trust anchors for the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's roots (tiberius' default).
    System,
    /// Accept any certificate (`trust_server_certificate=true`).
    Any,
    /// A CA file.
    CaFile(String),
}

/// The TLS settings of a connection string (what tiberius was given; an ADO string is applied
/// by tiberius and read back here with its rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub encryption: EncryptionLevel,
    pub trust: Trust,
}

impl Tls {
    /// The libpq `sslmode` it is as strong as, which `[tls] backends` compares. `Off` encrypts
    /// the login only and `NotSupported` nothing: both leave the data in the clear. `On`,
    /// `Required` and `Strict` fail rather than fall back to plaintext (tiberius refuses a server
    /// that declines), so they are at least `require`; a checked certificate (system roots, or a
    /// `ca_file` added to them; the name is the host or `hostname_in_certificate`) is `verify-full`.
    pub fn level(&self) -> config::SslMode {
        match (self.encryption, &self.trust) {
            (EncryptionLevel::Off | EncryptionLevel::NotSupported, _) => config::SslMode::Disable,
            (_, Trust::Any) => config::SslMode::Require,
            (_, Trust::System | Trust::CaFile(_)) => config::SslMode::VerifyFull,
        }
    }

    /// For errors and warnings: the settings in connection-string words, no values from the string.
    pub fn describe(&self) -> String {
        let enc = match self.encryption {
            EncryptionLevel::Off => "encrypt=off (login only)",
            EncryptionLevel::On => "encrypt=on",
            EncryptionLevel::NotSupported => "encrypt=not_supported",
            EncryptionLevel::Required => "encrypt=required",
            EncryptionLevel::Strict => "encrypt=strict",
        };
        match (self.level(), &self.trust) {
            (config::SslMode::Disable, _) => enc.to_string(),
            (_, Trust::Any) => format!("{enc} with trust_server_certificate=true"),
            (_, Trust::CaFile(_)) => format!("{enc} with ca_file"),
            (_, Trust::System) => format!("{enc} with the system roots"),
        }
    }

    /// Refuse a setting weaker than the process-wide minimum (`[tls] backends`).
    pub fn check_minimum(&self, min: config::SslMode) -> Result<(), ConnError> {
        if self.level() < min {
            return Err(ConnError::BelowMinimum { tls: self.clone(), min });
        }
        Ok(())
    }
}

/// A parsed endpoint: the tiberius config and the safe label `host:port/db`.
pub struct Parsed {
    pub config: tiberius::Config,
    pub label: String,
    pub tls: Tls,
    /// `application_intent` from the URL, if given (the role overrides it anyway).
    pub read_only: Option<bool>,
}

impl Parsed {
    /// The host dialled (for `cellgate map check`'s loopback test).
    pub fn host(&self) -> String {
        let addr = self.config.get_addr();
        addr.rsplit_once(':').map_or(addr.clone(), |(h, _)| h.to_string())
    }
}

/// `sqlserver://user:pw@host:1433/db?encrypt=..` (or `mssql://`) or an ADO string
/// (`server=tcp:host,1433;user id=..;password=..;database=..`).
pub fn parse_conn(s: &str) -> Result<Parsed, ConnError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if lower.starts_with("sqlserver://") || lower.starts_with("mssql://") { parse_url(t) } else { parse_ado(t) }
}

fn parse_ado(s: &str) -> Result<Parsed, ConnError> {
    // tiberius' parse errors may quote the offending value: report a fixed text instead.
    let config = tiberius::Config::from_ado_string(s).map_err(|_| ConnError::Ado)?;
    // tiberius keeps what it parsed private: read the same pairs again for the label and TLS.
    let pairs = ado_pairs(s).ok_or(ConnError::Ado)?;
    let get = |keys: &[&str]| keys.iter().find_map(|k| pairs.get(*k));
    let db = get(&["database", "initial catalog", "databasename"]).cloned().unwrap_or_default();
    let flag = |v: &String| match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" => Some(true),
        "false" | "no" => Some(false),
        _ => None,
    };
    // tiberius' rules (its `from_ado_string` accepted the string, so every value parses):
    // encrypt absent or true → Required, false → Off (login only), DANGER_PLAINTEXT → none.
    let encryption = match get(&["encrypt"]) {
        None => EncryptionLevel::Required,
        Some(v) if v == "DANGER_PLAINTEXT" => EncryptionLevel::NotSupported,
        Some(v) if v.eq_ignore_ascii_case("strict") => EncryptionLevel::Strict,
        Some(v) if flag(v) == Some(false) => EncryptionLevel::Off,
        Some(_) => EncryptionLevel::Required,
    };
    let trust = match (get(&["trustservercertificate"]).and_then(flag), get(&["trustservercertificateca"])) {
        (_, Some(ca)) => Trust::CaFile(ca.clone()),
        (Some(true), None) => Trust::Any,
        _ => Trust::System,
    };
    let label = format!("{}/{db}", config.get_addr());
    Ok(Parsed { config, label, tls: Tls { encryption, trust }, read_only: None })
}

/// An ADO.NET string's pairs as tiberius reads them (keys trimmed and lower-cased; values
/// unquoted from `'…'`, `"…"` (doubled quote inside) or `{…}`, else trimmed; last key wins).
/// `None` where tiberius would have refused the string.
fn ado_pairs(s: &str) -> Option<HashMap<String, String>> {
    let b = s.as_bytes();
    let (n, mut i) = (b.len(), 0);
    let mut pairs = HashMap::new();
    while i < n {
        while i < n && (b[i] == b';' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= n {
            break;
        }
        let mut key = String::new();
        loop {
            match b.get(i) {
                None | Some(b';') => return None,
                // `==` in a key is a literal `=`.
                Some(b'=') if b.get(i + 1) == Some(&b'=') => {
                    key.push('=');
                    i += 2;
                }
                Some(b'=') => {
                    i += 1;
                    break;
                }
                Some(c) => {
                    key.push(char::from(*c));
                    i += 1;
                }
            }
        }
        while i < n && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let value = match b.get(i) {
            Some(&q @ (b'\'' | b'"')) => {
                i += 1;
                let mut v = String::new();
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(c) if *c == q && b.get(i + 1) == Some(&q) => {
                            v.push(char::from(q));
                            i += 2;
                        }
                        Some(c) if *c == q => {
                            i += 1;
                            break;
                        }
                        Some(c) => {
                            v.push(char::from(*c));
                            i += 1;
                        }
                    }
                }
                v
            }
            Some(b'{') => {
                let end = s[i..].find('}')? + i;
                let v = s[i + 1..end].to_string();
                i = end + 1;
                v
            }
            _ => {
                let start = i;
                while i < n && b[i] != b';' {
                    i += 1;
                }
                s[start..i].trim_end().to_string()
            }
        };
        // After a quoted value only blanks may come before the next `;`.
        while i < n && b[i] != b';' {
            if !b[i].is_ascii_whitespace() {
                return None;
            }
            i += 1;
        }
        pairs.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(pairs)
}

fn percent_decode(s: &str) -> Result<String, ConnError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(ConnError::Url("bad percent escape"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ConnError::Url("bad percent escape"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnError::Url("percent escapes are not UTF-8"))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConnError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(ConnError::BadOption(key.into())),
    }
}

fn parse_url(s: &str) -> Result<Parsed, ConnError> {
    let rest = s.split_once("://").map(|(_, r)| r).ok_or(ConnError::Url("missing scheme"))?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = main.split_once('/').unwrap_or((main, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or(ConnError::Url("unclosed [ in host"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(ConnError::Url("missing host"));
    }
    let port: u16 = match port {
        Some(p) => p.parse().map_err(|_| ConnError::Url("port must be a number 0-65535"))?,
        None => 1433,
    };
    let db = percent_decode(path.trim_end_matches('/'))?;
    let mut config = tiberius::Config::new();
    config.host(&host);
    config.port(port);
    if !db.is_empty() {
        config.database(&db);
    }
    config.application_name("cellgate");
    if let Some(u) = userinfo {
        let (user, pw) = u.split_once(':').unwrap_or((u, ""));
        config.authentication(tiberius::AuthMethod::sql_server(percent_decode(user)?, percent_decode(pw)?));
    }
    let (mut trust, mut ca) = (false, None);
    // tiberius 0.13's default with a TLS feature on.
    let mut encryption = EncryptionLevel::Required;
    let mut read_only = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = k.to_ascii_lowercase().replace('-', "_");
        let v = percent_decode(v)?;
        match key.as_str() {
            "encrypt" => {
                encryption = match v.to_ascii_lowercase().as_str() {
                    "off" | "false" | "no" => EncryptionLevel::Off,
                    "on" => EncryptionLevel::On,
                    "required" | "true" | "yes" | "mandatory" => EncryptionLevel::Required,
                    "not_supported" | "danger_plaintext" => EncryptionLevel::NotSupported,
                    "strict" => EncryptionLevel::Strict,
                    _ => return Err(ConnError::BadOption(key)),
                }
            }
            "trust_server_certificate" | "trustservercertificate" => trust = parse_bool(&key, &v)?,
            "ca_file" | "trust_server_certificate_ca" | "trustservercertificateca" => ca = Some(v),
            "application_intent" | "applicationintent" => {
                read_only = Some(match v.to_ascii_lowercase().as_str() {
                    "readonly" => true,
                    "readwrite" => false,
                    _ => return Err(ConnError::BadOption(key)),
                })
            }
            "hostname_in_certificate" | "hostnameincertificate" => config.hostname_in_certificate(&v),
            "app_name" | "application_name" => config.application_name(&v),
            "instance" => config.instance_name(&v),
            _ => return Err(ConnError::UnknownOption(key)),
        }
    }
    let trust = match (trust, ca) {
        // tiberius panics when both are set; refuse here instead.
        (true, Some(_)) => return Err(ConnError::TrustConflict),
        (true, None) => Trust::Any,
        (false, Some(path)) => Trust::CaFile(path),
        (false, None) => Trust::System,
    };
    config.encryption(encryption);
    match &trust {
        Trust::Any => config.trust_cert(),
        Trust::CaFile(path) => config.trust_cert_ca(path),
        Trust::System => {}
    }
    if let Some(ro) = read_only {
        config.readonly(ro);
    }
    let label = format!("{}:{port}/{db}", if host.contains(':') { format!("[{host}]") } else { host });
    Ok(Parsed { config, label, tls: Tls { encryption, trust }, read_only })
}

// ---------------------------------------------------------------------------------------------
// Connections and the pool
// ---------------------------------------------------------------------------------------------

/// Read-only routing redirects followed per connect (an AG listener sends one).
const MAX_REDIRECTS: usize = 3;

/// Open one connection, following read-only routing redirects (`ENVCHANGE` routing at login:
/// the listener names the readable secondary to dial instead).
pub async fn dial(config: &tiberius::Config) -> Result<TdsClient, TdsError> {
    let mut cfg = config.clone();
    for _ in 0..=MAX_REDIRECTS {
        // The handshake timeout bounds the TCP connect too: a black-holed host must not hold a
        // pool slot (or the prober) for the OS connect timeout.
        let limit = cfg.get_handshake_timeout().unwrap_or(Duration::from_secs(15));
        let tcp = tokio::time::timeout(limit, TcpStream::connect(cfg.get_addr())).await.map_err(|_| {
            TdsError::Io { kind: std::io::ErrorKind::TimedOut, message: format!("connect timed out after {limit:?}") }
        })??;
        tcp.set_nodelay(true)?;
        match Client::connect(cfg.clone(), tcp.compat_write()).await {
            Err(TdsError::Routing { host, port }) => {
                tracing::debug!(to = %format!("{host}:{port}"), "following SQL Server routing redirect");
                cfg.host(&host);
                cfg.port(port);
            }
            other => return other,
        }
    }
    Err(TdsError::Protocol("too many routing redirects".into()))
}

/// One pooled connection. `poisoned` is set while a request is on the wire and on any
/// transport error: a connection dropped mid-result (deadline, client gone) or broken is never
/// handed out again (crates.md P3/P4).
pub struct MsConn {
    pub client: TdsClient,
    poisoned: bool,
}

pub struct MsManager {
    config: tiberius::Config,
}

impl bb8::ManageConnection for MsManager {
    type Connection = MsConn;
    type Error = TdsError;

    async fn connect(&self) -> Result<MsConn, TdsError> {
        Ok(MsConn { client: dial(&self.config).await?, poisoned: false })
    }

    async fn is_valid(&self, conn: &mut MsConn) -> Result<(), TdsError> {
        conn.poisoned = true;
        conn.client.simple_query("SELECT 1").await?.into_results().await?;
        conn.poisoned = false;
        Ok(())
    }

    fn has_broken(&self, conn: &mut MsConn) -> bool {
        conn.poisoned
    }
}

/// Parameter types described by the server, per SQL text; `None`: it could not describe them.
type Described = Option<Arc<HashMap<usize, SqlType>>>;

/// SQL texts whose description is kept per endpoint; beyond this the cache is cleared.
const DESCRIBE_CACHE: usize = 1024;

/// SQL Server error numbers that mean "this endpoint cannot take writes" (read-only database,
/// read-only secondary, read-only intent not allowed).
const READ_ONLY_ERRORS: [u32; 4] = [3906, 3908, 976, 978];

/// Tries per read when pooled connections turn out to be closed by the server.
const READ_ATTEMPTS: usize = 3;

/// Errors of severity 20 and above close the connection server-side.
const FATAL_CLASS: u8 = 20;

/// One SQL Server of a shard database.
pub struct MssqlEndpoint {
    /// `host:port/db` — safe to show (no user, no password).
    pub label: Arc<str>,
    pub role: Role,
    pub pool: bb8::Pool<MsManager>,
    pub health: Arc<EndpointHealth>,
    /// SHA-256 of the connection string (identity across reloads without keeping the text).
    pub key: [u8; 32],
    config: tiberius::Config,
    checkout_timeout: Duration,
    described: Mutex<HashMap<String, Described>>,
    /// The prober's own connection (never from the pool, so a full pool cannot look dead).
    pub(crate) probe_client: tokio::sync::Mutex<Option<TdsClient>>,
}

/// Result of one `sp_executesql` call: the last result set and the rows affected.
struct Outcome {
    rows: Rows,
    affected: u64,
}

impl MssqlEndpoint {
    /// Build an endpoint and its (lazy) pool. Must run inside a tokio runtime (bb8 spawns).
    /// `min_tls`: the weakest TLS allowed (`[tls] backends`, see [`Tls::level`]).
    pub fn new(
        conn: &Secret,
        role: Role,
        pool: &config::Pool,
        command_timeout: Duration,
        min_tls: config::SslMode,
    ) -> Result<Self, String> {
        let Parsed { mut config, label, tls, .. } = parse_conn(conn.expose()).map_err(|e| e.to_string())?;
        tls.check_minimum(min_tls).map_err(|e| e.to_string())?;
        // Replicas are read with ApplicationIntent=ReadOnly: an AG listener routes them to a
        // readable secondary, and a write sent there by mistake fails in the server.
        config.readonly(role == Role::Replica);
        config.command_timeout(Some(command_timeout));
        config.handshake_timeout(Some(Duration::from_millis(pool.connect_timeout_ms)));
        let label: Arc<str> = Arc::from(label);
        let health = Arc::new(EndpointHealth::new(role));
        // has_broken is the poison flag: raised while a request is on the wire, so broken and
        // abandoned connections are dropped without a test query per checkout.
        let pool_obj =
            super::pool::builder(pool, &label, &health).build_unchecked(MsManager { config: config.clone() });
        Ok(Self {
            label,
            role,
            pool: pool_obj,
            health,
            key: super::pool::conn_key(conn),
            config,
            checkout_timeout: Duration::from_millis(pool.checkout_timeout_ms),
            described: Mutex::new(HashMap::new()),
            probe_client: tokio::sync::Mutex::new(None),
        })
    }

    /// Open a fresh connection and run a trivial query (reload pre-check).
    pub async fn check(&self) -> Result<(), String> {
        let mut c = dial(&self.config).await.map_err(|e| e.to_string())?;
        c.simple_query("SELECT 1").await.map_err(|e| e.to_string())?.into_results().await.map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn checkout(&self) -> Result<bb8::PooledConnection<'_, MsManager>, BackendError> {
        match self.pool.get().await {
            Ok(c) => Ok(c),
            // A connect that failed is the endpoint's fault, a timeout included (not a 504).
            Err(bb8::RunError::User(TdsError::Io { message, .. })) => {
                self.health.request_recheck();
                Err(BackendError::Unavailable { endpoint: self.label.to_string(), reason: message })
            }
            Err(bb8::RunError::User(e)) => Err(self.classify(e)),
            Err(bb8::RunError::TimedOut) => {
                Err(super::pool::checkout_timed_out(&self.label, &self.health, self.checkout_timeout))
            }
        }
    }

    /// Classify once: server errors keep their number; everything else is the endpoint's fault.
    fn classify(&self, e: TdsError) -> BackendError {
        match e {
            TdsError::Server(t) => {
                if READ_ONLY_ERRORS.contains(&t.code()) {
                    self.health.request_recheck();
                    return BackendError::ReadOnly { endpoint: self.label.to_string() };
                }
                if t.class() >= FATAL_CLASS {
                    self.health.note_error(t.message());
                    self.health.request_recheck();
                    return BackendError::Unavailable {
                        endpoint: self.label.to_string(),
                        reason: format!("server error {}: {}", t.code(), t.message()),
                    };
                }
                BackendError::Server { code: i64::from(t.code()), message: t.message().to_string() }
            }
            TdsError::Io { kind: std::io::ErrorKind::TimedOut, .. } => BackendError::Timeout,
            other => {
                let reason = other.to_string();
                self.health.note_error(&reason);
                self.health.request_recheck();
                BackendError::Unavailable { endpoint: self.label.to_string(), reason }
            }
        }
    }

    /// Run `f` on `conn` with the poison flag up: if the future is dropped (deadline) or fails
    /// on the transport, the connection is not reused. Server errors leave it usable (tiberius
    /// drains the rest of the answer before the next command).
    async fn guarded<T>(
        &self,
        conn: &mut MsConn,
        f: impl AsyncFnOnce(&mut TdsClient) -> Result<T, TdsError>,
    ) -> Result<T, BackendError> {
        conn.poisoned = true;
        match f(&mut conn.client).await {
            Ok(v) => {
                conn.poisoned = false;
                Ok(v)
            }
            Err(TdsError::Server(t)) if t.class() < FATAL_CLASS => {
                conn.poisoned = false;
                Err(self.classify(TdsError::Server(t)))
            }
            Err(e) => Err(self.classify(e)),
        }
    }

    /// Parameter types for `sql`, asking the server once per SQL text.
    async fn describe(&self, conn: &mut MsConn, sql: &str) -> Result<Described, BackendError> {
        if let Some(d) = self.described.lock().expect("describe cache").get(sql) {
            return Ok(d.clone());
        }
        let text = sql.to_string();
        let r = self
            .guarded(conn, async move |c: &mut TdsClient| {
                let mut cmd = Command::new("sp_describe_undeclared_parameters");
                cmd.bind_param("@tsql", ColumnData::String(Some(Cow::Owned(text))));
                let mut stream = cmd.exec(c).await?;
                let (mut name_col, mut type_col) = (None, None);
                let mut out = HashMap::new();
                while let Some(item) = stream.try_next().await? {
                    match item {
                        tiberius::CommandItem::Metadata(m) => {
                            name_col = m.columns().iter().position(|c| c.name() == "name");
                            type_col = m.columns().iter().position(|c| c.name() == "suggested_system_type_name");
                        }
                        tiberius::CommandItem::Row(row) => {
                            let (Some(ni), Some(ti)) = (name_col, type_col) else { continue };
                            let name: Option<&str> = row.try_get(ni).ok().flatten();
                            let ty: Option<&str> = row.try_get(ti).ok().flatten();
                            if let (Some(name), Some(ty)) = (name, ty)
                                && let Some(n) = name.strip_prefix("@P").or_else(|| name.strip_prefix("@p"))
                                && let Ok(n) = n.parse::<usize>()
                            {
                                out.insert(n, SqlType::parse(ty));
                            }
                        }
                        _ => {}
                    }
                }
                Ok(out)
            })
            .await;
        let described: Described = match r {
            Ok(map) => Some(Arc::new(map)),
            // The server cannot describe this text: bind by JSON shape (cached too).
            Err(BackendError::Server { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut cache = self.described.lock().expect("describe cache");
        if cache.len() >= DESCRIBE_CACHE {
            cache.clear();
        }
        cache.insert(sql.to_string(), described.clone());
        Ok(described)
    }

    async fn bind(
        &self,
        conn: &mut MsConn,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<mssql_types::Bound>, BackendError> {
        if params.is_empty() {
            return Ok(Vec::new());
        }
        let described = self.describe(conn, sql).await?;
        params
            .iter()
            .enumerate()
            .map(|(i, v)| match described.as_ref().and_then(|d| d.get(&(i + 1))) {
                Some(ty) => mssql_types::bind_described(i + 1, ty, v),
                None => mssql_types::from_shape(i + 1, v),
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(BackendError::BadInput)
    }

    /// One statement through `sp_executesql` with its declared parameters.
    async fn run(&self, conn: &mut MsConn, sql: &str, bound: Vec<mssql_types::Bound>) -> Result<Outcome, BackendError> {
        let sql = sql.to_string();
        self.guarded(conn, async move |c: &mut TdsClient| {
            let mut cmd = Command::new("sp_executesql");
            cmd.bind_param("@stmt", ColumnData::String(Some(Cow::Owned(sql))));
            if !bound.is_empty() {
                let decl: Vec<String> =
                    bound.iter().enumerate().map(|(i, b)| format!("@P{} {}", i + 1, b.decl)).collect();
                cmd.bind_param("@params", ColumnData::String(Some(Cow::Owned(decl.join(",")))));
                for (i, b) in bound.into_iter().enumerate() {
                    cmd.bind_param(format!("@P{}", i + 1), b.value);
                }
            }
            let mut stream = cmd.exec(c).await?;
            let mut columns: Vec<(String, ColumnType)> = Vec::new();
            let mut rows = Vec::new();
            let mut affected = 0u64;
            while let Some(item) = stream.try_next().await? {
                match item {
                    // The last result set is the answer (as the last statement's rows for PG).
                    tiberius::CommandItem::Metadata(m) => {
                        columns = m.columns().iter().map(|c| (c.name().to_string(), c.column_type())).collect();
                        rows.clear();
                    }
                    tiberius::CommandItem::Row(row) => {
                        rows.push(
                            row.cells().map(|(col, d)| mssql_types::cell_to_json(col.column_type(), d)).collect(),
                        );
                    }
                    tiberius::CommandItem::RowsAffected(n) => affected += n,
                    _ => {}
                }
            }
            let columns =
                columns.into_iter().map(|(n, t)| (n, mssql_types::type_name(t).to_string())).collect::<Vec<_>>();
            Ok(Outcome { rows: Rows { columns, rows }, affected })
        })
        .await
    }

    /// Run one read. A pooled connection the server has closed since its last use is only
    /// found out by using it; reads are idempotent, so a transport failure is retried on
    /// another connection (the broken one is poisoned and dropped) before it is reported.
    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, BackendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut conn = self.checkout().await?;
            let r = async {
                let bound = self.bind(&mut conn, sql, params).await?;
                Ok(self.run(&mut conn, sql, bound).await?.rows)
            }
            .await;
            match r {
                Err(BackendError::Unavailable { .. }) if conn.poisoned && attempt < READ_ATTEMPTS => {
                    tracing::debug!(endpoint = %self.label, "stale pooled connection; retrying the read");
                }
                r => return r,
            }
        }
    }

    async fn batch(&self, conn: &mut MsConn, text: &'static str) -> Result<(), BackendError> {
        self.guarded(conn, async move |c: &mut TdsClient| c.simple_query(text).await?.into_results().await.map(|_| ()))
            .await
    }

    /// Run writes on this (primary) endpoint: one statement in autocommit, or several in one
    /// transaction. Returns the last statement's rows and the total rows affected.
    pub async fn execute(&self, stmts: &[(String, Vec<Value>)]) -> Result<(Rows, u64), BackendError> {
        let mut conn = self.checkout().await?;
        // Bind everything first: a bad parameter fails before anything runs.
        let mut bound = Vec::with_capacity(stmts.len());
        for (i, (sql, params)) in stmts.iter().enumerate() {
            bound.push(self.bind(&mut conn, sql, params).await.map_err(|e| e.in_statement(i, stmts.len()))?);
        }
        let tx = stmts.len() > 1;
        if tx {
            self.batch(&mut conn, "BEGIN TRANSACTION").await?;
        }
        let mut affected = 0u64;
        let mut last = Rows::default();
        for (i, ((sql, _), b)) in stmts.iter().zip(bound).enumerate() {
            match self.run(&mut conn, sql, b).await {
                Ok(o) => {
                    affected += o.affected;
                    last = o.rows;
                }
                Err(e) => {
                    if tx && !conn.poisoned {
                        // If even the rollback fails, the connection is poisoned and dropped:
                        // its open transaction dies with it.
                        let _ = self.batch(&mut conn, "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION").await;
                    }
                    return Err(e.in_statement(i, stmts.len()));
                }
            }
        }
        if tx {
            self.batch(&mut conn, "COMMIT TRANSACTION").await?;
        }
        Ok((last, affected))
    }
}

/// A logical SQL Server database on one shard: its primary and readable secondaries.
pub type MssqlDatabase = super::pool::ReplicaSet<MssqlEndpoint>;

impl MssqlDatabase {
    /// A replica that is up and answers as read-only, in rotation; `None` sends the read to
    /// the primary. There is no lag measurement for SQL Server (see docs/sqlserver.md).
    pub fn pick_replica(&self) -> Option<Arc<MssqlEndpoint>> {
        self.pick_replica_where(|r| r.health.readable_by_role())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_form() {
        let p = parse_conn("sqlserver://app:p%40ss%3Aw@db1.example:1444/orders?encrypt=not_supported").unwrap();
        assert_eq!(p.label, "db1.example:1444/orders");
        assert_eq!(p.config.get_addr(), "db1.example:1444");
        assert_eq!(p.tls, Tls { encryption: EncryptionLevel::NotSupported, trust: Trust::System });
        let p = parse_conn("mssql://app:pw@[::1]/tx?encrypt=strict&trust_server_certificate=true").unwrap();
        assert_eq!(p.label, "[::1]:1433/tx");
        assert_eq!(p.tls, Tls { encryption: EncryptionLevel::Strict, trust: Trust::Any });
        let p =
            parse_conn("sqlserver://u:pw@h/d?ca_file=%2Fetc%2Fca.pem&encrypt=on&application_intent=ReadOnly").unwrap();
        assert_eq!(p.tls, Tls { encryption: EncryptionLevel::On, trust: Trust::CaFile("/etc/ca.pem".into()) });
        assert_eq!(p.read_only, Some(true));
        // Defaults: TLS required, system roots.
        let p = parse_conn("SQLSERVER://u:pw@h").unwrap();
        assert_eq!(p.tls, Tls { encryption: EncryptionLevel::Required, trust: Trust::System });
        assert_eq!((p.label.as_str(), p.read_only), ("h:1433/", None));
        for (v, level) in [
            ("off", EncryptionLevel::Off),
            ("true", EncryptionLevel::Required),
            ("danger_plaintext", EncryptionLevel::NotSupported),
        ] {
            let p = parse_conn(&format!("sqlserver://u:pw@h/d?encrypt={v}")).unwrap();
            assert_eq!(p.tls.encryption, level, "{v}");
        }
        assert_eq!(
            parse_conn("sqlserver://u:pw@h/d?ca_file=/x&trust_server_certificate=true").err(),
            Some(ConnError::TrustConflict)
        );
        assert_eq!(
            parse_conn("sqlserver://u:pw@h/d?encrypt=sometimes").err(),
            Some(ConnError::BadOption("encrypt".into()))
        );
        assert_eq!(parse_conn("sqlserver://u:pw@h/d?bogus=1").err(), Some(ConnError::UnknownOption("bogus".into())));
        assert!(parse_conn("sqlserver://u:pw@h:99999/d").is_err());
        assert!(parse_conn("sqlserver://u:pw@/d").is_err());
    }

    #[test]
    fn ado_form() {
        let p = parse_conn(
            "server=tcp:db2.example,1455;user id=app;password=s3cret;database=tx;TrustServerCertificate=true",
        )
        .unwrap();
        assert_eq!(p.label, "db2.example:1455/tx");
        let p =
            parse_conn("Server=tcp:h,1433;Initial Catalog=x;User Id=u;Password=p;Encrypt=DANGER_PLAINTEXT").unwrap();
        assert_eq!(p.label, "h:1433/x");
        assert_eq!(p.tls, Tls { encryption: EncryptionLevel::NotSupported, trust: Trust::System });
        // Quoted values as tiberius reads them: a `;` or `encrypt=false` inside a password
        // changes nothing.
        let p = parse_conn("server=tcp:h,1433;password='a;encrypt=false';database={d;b};Encrypt=yes").unwrap();
        assert_eq!((p.label.as_str(), p.tls.encryption), ("h:1433/d;b", EncryptionLevel::Required));
        assert_eq!(p.host(), "h");
        // Both trust settings: refused (tiberius would otherwise have to choose).
        assert!(parse_conn("server=tcp:h,1433;TrustServerCertificate=true;TrustServerCertificateCA=/x.pem").is_err());
    }

    /// The documented mapping (docs/configuration.md `[tls]`), both connection-string forms.
    #[test]
    fn tls_levels() {
        use config::SslMode::*;
        for (s, want) in [
            ("sqlserver://u:pw@h/d?encrypt=not_supported", Disable),
            ("sqlserver://u:pw@h/d?encrypt=danger_plaintext", Disable),
            ("sqlserver://u:pw@h/d?encrypt=off", Disable),
            ("sqlserver://u:pw@h/d?encrypt=off&trust_server_certificate=true", Disable),
            ("sqlserver://u:pw@h/d?encrypt=required&trust_server_certificate=true", Require),
            ("sqlserver://u:pw@h/d?encrypt=on&trust_server_certificate=true", Require),
            ("sqlserver://u:pw@h/d?encrypt=strict&trust_server_certificate=true", Require),
            ("sqlserver://u:pw@h/d", VerifyFull),
            ("sqlserver://u:pw@h/d?encrypt=true", VerifyFull),
            ("sqlserver://u:pw@h/d?encrypt=on&ca_file=/ca.pem", VerifyFull),
            ("sqlserver://u:pw@h/d?encrypt=strict&ca_file=/ca.pem&hostname_in_certificate=db.example", VerifyFull),
            ("server=tcp:h,1433;user id=u;password=p;encrypt=DANGER_PLAINTEXT", Disable),
            ("server=tcp:h,1433;user id=u;password=p;Encrypt=false", Disable),
            ("server=tcp:h,1433;user id=u;password=p;Encrypt=no;TrustServerCertificate=true", Disable),
            ("server=tcp:h,1433;user id=u;password=p;TrustServerCertificate=yes", Require),
            ("server=tcp:h,1433;user id=u;password=p;encrypt=strict;TrustServerCertificate=true", Require),
            ("server=tcp:h,1433;user id=u;password=p", VerifyFull),
            ("server=tcp:h,1433;user id=u;password=p;Encrypt=true;TrustServerCertificate=false", VerifyFull),
            ("server=tcp:h,1433;user id=u;password=p;TrustServerCertificateCA=/ca.pem", VerifyFull),
        ] {
            assert_eq!(parse_conn(s).unwrap().tls.level(), want, "{s}");
        }
    }

    #[test]
    fn tls_minimum_refuses_weaker_endpoints() {
        let tls = |s: &str| parse_conn(s).unwrap().tls;
        let trusted = tls("sqlserver://u:hunter2@h/d?trust_server_certificate=true");
        assert!(trusted.check_minimum(config::SslMode::Require).is_ok());
        let e = trusted.check_minimum(config::SslMode::VerifyFull).unwrap_err().to_string();
        assert_eq!(
            e,
            "SQL Server encrypt=required with trust_server_certificate=true counts as sslmode=require, weaker \
             than the minimum [tls] backends = \"verify-full\""
        );
        let e = tls("server=tcp:h;password=hunter2;encrypt=false").check_minimum(config::SslMode::Prefer).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SQL Server encrypt=off (login only) counts as sslmode=disable, weaker than the minimum [tls] backends \
             = \"prefer\""
        );
        assert!(tls("sqlserver://u:pw@h/d?ca_file=/x.pem").check_minimum(config::SslMode::VerifyFull).is_ok());
        // Through the endpoint constructor, as a map build calls it.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _guard = rt.enter();
        let conn = Secret::new("sqlserver://app:hunter2@h/d?encrypt=not_supported".into());
        let e = MssqlEndpoint::new(
            &conn,
            Role::Primary,
            &config::Pool::default(),
            Duration::from_secs(1),
            config::SslMode::Require,
        )
        .err()
        .unwrap();
        assert!(e.contains("weaker than the minimum") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn errors_never_echo_the_password() {
        for s in [
            "sqlserver://u:hunter2@h/d?encrypt=hunter2",
            "sqlserver://u:hunter2@h:hunter2/d",
            "sqlserver://u:hunter2%zz@h/d",
            "server=tcp:h,1433;password='hunter2",
        ] {
            let e = parse_conn(s).err().expect("rejected");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }
}
