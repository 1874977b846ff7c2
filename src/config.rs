//! Process configuration (`cellgate.toml`, design §4): listeners (and their TLS and client
//! certificate settings), limits, pools, health, tokens, client-certificate identities, map
//! source, peers. Parse → validate; every field has a documented unit and default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default)]
    pub health: Health,
    /// API tokens by SHA-256 digest. Empty = no auth (refused on non-loopback addresses
    /// unless `--insecure-no-auth`).
    #[serde(default)]
    pub tokens: Vec<Token>,
    /// Client-certificate identities (`[[clients]]`) mapped to a name and scopes, on listeners
    /// with `client_ca`. Tokens or clients configured = auth on.
    #[serde(default)]
    pub clients: Vec<Client>,
    pub map: MapSource,
    /// Admin base URLs of the other cellgate instances (`http://host:port`). A map published here
    /// is pushed to each; migrations freeze and release writes on each.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Bearer token (clear text) this instance presents to its peers' admin listeners.
    /// Keep the config file private. Default: none.
    #[serde(default)]
    pub peer_token: Option<String>,
    #[serde(default)]
    pub shutdown: Shutdown,
    #[serde(default)]
    pub sql: Sql,
    #[serde(default)]
    pub tls: Tls,
    /// The file this config was loaded from (`Config::load`); credentials reload from it.
    /// `None` for a config parsed from text.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The read cache (docs/cache.md). Off by default.
    #[serde(default)]
    pub cache: CacheConfig,
}

/// TLS policy for connections cellgate opens (docs/configuration.md `[tls]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// The weakest TLS a map endpoint may use, in libpq `sslmode` words; a weaker endpoint is
    /// refused when the map is built (startup, reload). Default `disable` (no minimum). A
    /// PostgreSQL endpoint without `sslmode` counts as `prefer`, libpq's default; MongoDB and
    /// SQL Server settings map onto the same words (docs/configuration.md `[tls]`).
    pub backends: SslMode,
    /// CA bundle (PEM) that `https://` peers' admin certificates must chain to. Default: the
    /// Mozilla roots (webpki-roots). Host names are always checked.
    pub peer_ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) presented to `https://` peers, for admin listeners
    /// that want one (`client_ca`). Both or neither; the key owner-only.
    pub peer_cert: Option<PathBuf>,
    pub peer_key: Option<PathBuf>,
}

/// libpq's `sslmode` values, weakest first (so `<` means "weaker than").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext only.
    #[default]
    Disable,
    /// TLS if the server offers it, else plaintext; the certificate is not checked.
    Prefer,
    /// TLS required; the certificate is not checked (unless `sslrootcert` is given, as libpq).
    Require,
    /// TLS; the certificate chain must lead to `sslrootcert`; the host name is not checked.
    VerifyCa,
    /// TLS; chain and host name are checked.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// Statement policy (docs/statements.md): what the SQL classifier refuses beyond its defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sql {
    /// More functions refused wherever they are called (exact names or `prefix*`), on top of
    /// the built-in list (session locks, server signals, file and remote access).
    pub deny_functions: Vec<String>,
    /// Databases whose SQL the parser cannot read is passed to the server anyway (on `/execute`
    /// with the write scope; on `/query` it runs in a read-only transaction). Off for every
    /// database by default: unparseable SQL is refused.
    pub pass_unparsed: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Data plane (HTTP/1.1 and h2c on one port). Default `0.0.0.0:8080`.
    #[serde(default = "default_data")]
    pub data: SocketAddr,
    /// Admin plane. Default `127.0.0.1:9090`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// HTTPS on the data listener (`[listen.data_tls]`). Default none: cleartext h1 + h2c.
    #[serde(default)]
    pub data_tls: Option<ListenTls>,
    /// HTTPS on the admin listener (`[listen.admin_tls]`). Default none: cleartext h1 + h2c.
    #[serde(default)]
    pub admin_tls: Option<ListenTls>,
}

/// A listener's certificate and key, and optionally the CA its clients' certificates must chain
/// to (docs/configuration.md `[listen.data_tls]`). The files are re-read when they change;
/// relative paths are relative to the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching the leaf; readable by its owner only.
    pub key: PathBuf,
    /// PEM bundle of the CAs client certificates must chain to (mutual TLS). Default none: no
    /// client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Whether a client must present a certificate. Only with `client_ca`; default `required`.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

impl ListenTls {
    /// The client-certificate mode in force: `None` without `client_ca`.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.client_ca.as_ref().map(|_| self.client_auth.unwrap_or(ClientAuth::Required))
    }
}

/// `client_auth` of a listener with `client_ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// The handshake fails without a certificate that chains to `client_ca`.
    Required,
    /// A client may connect without a certificate (and then needs a bearer token); one it does
    /// present must still chain to `client_ca`.
    Optional,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Required => "required",
            ClientAuth::Optional => "optional",
        }
    }
}

fn default_data() -> SocketAddr {
    "0.0.0.0:8080".parse().expect("literal")
}
fn default_admin() -> SocketAddr {
    "127.0.0.1:9090".parse().expect("literal")
}

impl Default for Listen {
    fn default() -> Self {
        Self { data: default_data(), admin: default_admin(), data_tls: None, admin_tls: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body in bytes (413 beyond). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Largest request head (request line + headers) in bytes (431 beyond). Default 16 KiB.
    pub max_header_bytes: usize,
    /// Requests in flight on the data plane before 429. Default 100,000.
    pub max_in_flight: usize,
    /// Time a client has to send a complete request head, ms (408 on a new connection). Default 5,000.
    pub header_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this long without a new request, ms
    /// (clients should keep their own idle timeout shorter). Default 60,000.
    pub keepalive_timeout_ms: u64,
    /// Deadline for a whole request, ms (504 beyond). Default 5,000.
    pub request_timeout_ms: u64,
    /// Longest `wait_ms` a read-your-writes request may ask for, ms. Default 2,000.
    pub max_wait_ms: u64,
    /// Largest result of one statement: the memory its rows hold as JSON values, counted while
    /// they stream in (422 `result_too_large` beyond, and the statement is cancelled), so the
    /// limit bounds cellgate's memory per read. Default 16 MiB.
    pub max_result_bytes: usize,
    /// Most rows one statement may return (422 `result_too_large` beyond). Default 1,000,000.
    pub max_result_rows: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_header_bytes: 16 << 10,
            max_in_flight: 100_000,
            header_timeout_ms: 5_000,
            keepalive_timeout_ms: 60_000,
            request_timeout_ms: 5_000,
            max_wait_ms: 2_000,
            max_result_bytes: 16 << 20,
            max_result_rows: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Connections per endpoint at most. Default 16.
    pub max_size: u32,
    /// Idle connections kept open per endpoint. Default 1.
    pub min_idle: u32,
    /// Time to open one connection, ms. Default 2,000.
    pub connect_timeout_ms: u64,
    /// Time a request waits for a pooled connection, ms (then 503 `shard_unavailable` if the
    /// endpoint is down, else 429 `overloaded`). Default 2,000.
    pub checkout_timeout_ms: u64,
    /// A connection is closed after this long, s. Default 1,800.
    pub max_lifetime_s: u64,
    /// An idle connection is closed after this long, s. Default 600.
    pub idle_timeout_s: u64,
    /// PostgreSQL: shared connections per endpoint over which plain reads (no read-your-writes
    /// wait) are pipelined instead of taking a pooled connection each. 0 = off (every read
    /// checks out a pooled connection). Default 4.
    pub pipeline_connections: u32,
    /// PostgreSQL: reads in flight per shared connection at most; beyond that a read waits
    /// (up to `checkout_timeout_ms`, then 429 `overloaded`). Default 64.
    pub pipeline_depth: u32,
    /// PostgreSQL: a shared connection whose oldest read in flight started longer ago than
    /// this is stalled (a slow statement at its head); new reads go to another shared
    /// connection or, when all are stalled, to an exclusive pooled one. Default 20 ms.
    pub pipeline_stall_ms: u64,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            max_size: 16,
            min_idle: 1,
            connect_timeout_ms: 2_000,
            checkout_timeout_ms: 2_000,
            max_lifetime_s: 1_800,
            idle_timeout_s: 600,
            pipeline_connections: 4,
            pipeline_depth: 64,
            pipeline_stall_ms: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Probe period per endpoint, ms. Default 1,000.
    pub interval_ms: u64,
    /// Deadline of one probe, ms. Default 1,000.
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes before an endpoint is marked down. Default 2.
    pub fail_threshold: u32,
    /// Consecutive good probes before a down endpoint is marked up again. Default 2.
    pub ok_threshold: u32,
    /// Replicas lagging more than this (replay time behind the primary), ms, get no reads. Default 5,000.
    pub max_lag_ms: u64,
    /// Replicas lagging more than this many WAL bytes get no reads. Default 16 MiB.
    pub max_lag_bytes: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            interval_ms: 1_000,
            probe_timeout_ms: 1_000,
            fail_threshold: 2,
            ok_threshold: 2,
            max_lag_ms: 5_000,
            max_lag_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// A label for logs and metrics (never the token).
    pub name: String,
    /// Hex SHA-256 of the bearer token.
    pub sha256: String,
    /// Any of `read`, `write`, `admin`.
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    /// Data-definition statements on `/execute` (CREATE, ALTER, DROP, ...), with `write`.
    Ddl,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "read" => Scope::Read,
            "write" => Scope::Write,
            "ddl" => Scope::Ddl,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }
}

/// A client-certificate identity allowed in (`[[clients]]`). Scopes are strings here so that
/// validation can report every unknown one with its client, not stop at the first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// What the certificate must carry, in the syntax of [`client_identity`].
    pub identity: String,
    /// A label for logs (as a token's name).
    pub name: String,
    /// Any of `read`, `write`, `ddl`, `admin` (as a token's).
    pub scopes: Vec<String>,
}

/// A `[[clients]]` identity in its canonical form, the form a listener also gives each identity
/// of a client certificate (`listen_tls`), so that matching is string equality:
/// - `scheme://…` (e.g. `spiffe://cluster.local/ns/x/sa/orders`): a SAN URI, compared exactly;
/// - `dns:NAME`: a SAN DNS name, compared without case (canonical form lower case);
/// - `cn:NAME`: the subject's common name, compared exactly.
///
/// The three forms cannot collide: a DNS name has no `:`, and SAN URIs whose scheme is `dns` or
/// `cn` are never taken as identities ([`is_uri_identity`]).
pub fn client_identity(s: &str) -> Result<String, String> {
    if let Some(name) = s.strip_prefix("dns:") {
        let ok = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*' | b'_'));
        return if ok {
            Ok(format!("dns:{}", name.to_ascii_lowercase()))
        } else {
            Err("not a DNS name after dns:".into())
        };
    }
    if let Some(name) = s.strip_prefix("cn:") {
        return if name.is_empty() { Err("empty common name after cn:".into()) } else { Ok(s.to_string()) };
    }
    if is_uri_identity(s) {
        return Ok(s.to_string());
    }
    Err("expected a SAN URI (scheme://…), dns:NAME or cn:NAME".into())
}

/// Is `s` a SAN URI usable as an identity: `scheme://` followed by something, no white space, and
/// not starting with the `dns:` / `cn:` prefixes of the other two forms.
pub fn is_uri_identity(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else { return false };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !s.chars().any(char::is_whitespace)
        && !s.starts_with("dns:")
        && !s.starts_with("cn:")
}

/// Where the shard map comes from: a file (`map = { path = "map.toml" }`, the default, one
/// machine and nothing else to run) or etcd (`map = { etcd = { endpoints = [...], prefix =
/// "/cellgate/prod" } }`, a fleet: docs/fleet.md). Exactly one of the two.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawMapSource")]
pub enum MapSource {
    File {
        /// Shard-map file (relative paths are relative to the config file).
        path: PathBuf,
        /// Reload when the file changes (its directory is watched). Default true.
        watch: bool,
    },
    Etcd(EtcdSource),
}

impl MapSource {
    /// The map file, in file mode.
    pub fn path(&self) -> Option<&Path> {
        match self {
            MapSource::File { path, .. } => Some(path),
            MapSource::Etcd(_) => None,
        }
    }

    /// The etcd settings, in etcd mode.
    pub fn etcd(&self) -> Option<&EtcdSource> {
        match self {
            MapSource::Etcd(e) => Some(e),
            MapSource::File { .. } => None,
        }
    }
}

/// `map = { ... }` as written; [`MapSource`] is what it validates into.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapSource {
    path: Option<PathBuf>,
    watch: Option<bool>,
    etcd: Option<RawEtcdSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcdSource {
    endpoints: Vec<String>,
    prefix: String,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default = "default_etcd_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_etcd_lease_ttl_s")]
    lease_ttl_s: u64,
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn default_etcd_timeout_ms() -> u64 {
    2_000
}
fn default_etcd_lease_ttl_s() -> u64 {
    5
}

/// The etcd map source, validated (docs/configuration.md, *The etcd map source*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSource {
    /// Client URLs of the etcd members: all `http://host:port` or all `https://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet: starts with `/`, no trailing `/` (the map is `<prefix>/map`).
    pub prefix: String,
    /// This instance's name under `<prefix>/instances/`. Default: `<hostname>-<admin port>`.
    pub instance_id: Option<String>,
    /// Deadline of every etcd call (and of connecting). Default 2 s.
    pub timeout: Duration,
    /// TTL of the lease that holds the registration, s (kept alive at a third of it). Default 5.
    pub lease_ttl_s: u64,
    /// TLS and authentication of every connection to etcd.
    pub access: EtcdAccess,
}

/// How a connection to etcd is secured, shared by the instance (`map.etcd`) and the CLI
/// (`--etcd-ca`, `--etcd-user`, ...): TLS when the endpoints are `https://` (the CA bundle that
/// signed etcd's certificate, and a client certificate when etcd runs `--client-cert-auth`), and
/// etcd's own user/password authentication. The files are read at every connect, so a rotated
/// certificate is picked up by the next session without a restart.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// PEM bundle of the CA(s) trusted for etcd's server certificate; only these (no system roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and its key, presented to etcd (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user and its password (already expanded: `${VAR}`, `${file:PATH}`).
    pub user: Option<String>,
    pub password: Option<String>,
}

impl EtcdAccess {
    /// TLS is on (the endpoints are https://).
    pub fn tls(&self) -> bool {
        self.ca.is_some()
    }

    /// What is wrong with this access for these endpoints (each names its field, with `field`
    /// turning a setting's name into how the caller spells it: `map.etcd.ca` or `--etcd-ca`).
    /// Never quotes the password.
    pub fn problems(&self, endpoints: &[String], field: impl Fn(&str) -> String) -> Vec<String> {
        let mut errs = Vec::new();
        let https = endpoints.iter().filter(|e| e.starts_with("https://")).count();
        if https > 0 && https < endpoints.len() {
            errs.push(format!("{}: mix of http:// and https:// URLs; use one scheme", field("endpoints")));
        }
        if https > 0 && self.ca.is_none() {
            errs.push(format!(
                "{}: https endpoints need the PEM bundle of the CA that signed etcd's certificate",
                field("ca")
            ));
        }
        if https == 0 && (self.ca.is_some() || self.cert.is_some() || self.key.is_some()) {
            errs.push(format!(
                "{}, {}, {} apply to https:// endpoints only (refused rather than talk plaintext)",
                field("ca"),
                field("cert"),
                field("key")
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            errs.push(format!("{} and {} must be given together", field("cert"), field("key")));
        }
        match (&self.user, &self.password) {
            (Some(u), _) if u.is_empty() || u.contains(char::is_whitespace) || u.contains(':') => {
                errs.push(format!("{}: must be a non-empty name without white space or ':'", field("user")))
            }
            (Some(_), None) => errs.push(format!("{} needs a password", field("user"))),
            (Some(_), Some(p)) if p.is_empty() => errs.push(format!("{} is empty", field("password"))),
            (None, Some(_)) => errs.push(format!("{} needs a user", field("password"))),
            _ => {}
        }
        errs
    }
}

/// Never prints the password (the config is logged at start in debug form).
impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TryFrom<RawMapSource> for MapSource {
    type Error = String;

    fn try_from(raw: RawMapSource) -> Result<Self, String> {
        match (raw.path, raw.etcd) {
            (Some(path), None) => Ok(MapSource::File { path, watch: raw.watch.unwrap_or(true) }),
            (None, Some(etcd)) => {
                if raw.watch.is_some() {
                    return Err("map.watch applies to a map file; an etcd map is always watched".into());
                }
                etcd.validate().map(MapSource::Etcd).map_err(|e| e.join("; "))
            }
            (Some(_), Some(_)) => Err("map: give either path or etcd, not both".into()),
            (None, None) => Err("map: needs path = \"FILE\" or etcd = { endpoints, prefix }".into()),
        }
    }
}

impl RawEtcdSource {
    /// Every problem at once (each names its field).
    fn validate(self) -> Result<EtcdSource, Vec<String>> {
        let mut errs = Vec::new();
        if self.endpoints.is_empty() {
            errs.push("map.etcd.endpoints must list at least one http://host:port or https://host:port".into());
        }
        errs.extend(
            self.endpoints.iter().filter_map(|e| etcd_endpoint_problem(e)).map(|p| format!("map.etcd.endpoints: {p}")),
        );
        // `${VAR}` / `${file:PATH}` expanded here, once per load (a SIGHUP or restart reads the
        // file again); the error names the variable or file, never the value.
        let password = match self.password.as_deref().map(|p| crate::secrets::expand(p, |n| std::env::var(n).ok())) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                errs.push(format!("map.etcd.password: {e}"));
                Some(String::new())
            }
        };
        let access = EtcdAccess { ca: self.ca, cert: self.cert, key: self.key, user: self.user, password };
        if errs.iter().all(|e| !e.starts_with("map.etcd.password")) {
            errs.extend(access.problems(&self.endpoints, |f| format!("map.etcd.{f}")));
        }
        if let Some(p) = etcd_prefix_problem(&self.prefix) {
            errs.push(format!("map.etcd.prefix: {p}"));
        }
        if let Some(id) = &self.instance_id
            && !valid_instance_id(id)
        {
            errs.push(format!("map.etcd.instance_id {id:?}: use 1-128 letters, digits, '.', '_', '-' or ':'"));
        }
        if self.timeout_ms == 0 {
            errs.push("map.etcd.timeout_ms must be > 0".into());
        }
        if self.lease_ttl_s < 2 {
            errs.push("map.etcd.lease_ttl_s must be >= 2".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(EtcdSource {
            endpoints: self.endpoints,
            prefix: self.prefix,
            instance_id: self.instance_id,
            timeout: Duration::from_millis(self.timeout_ms),
            lease_ttl_s: self.lease_ttl_s,
            access,
        })
    }
}

/// What is wrong with an etcd client URL (`None` = fine): `http://` or `https://host:port`, no
/// user info (credentials go in `user`/`password`, never in a URL that error messages and
/// `/admin/fleet` print). Shared with the CLI's `--etcd`.
pub fn etcd_endpoint_problem(e: &str) -> Option<String> {
    let rest = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://"));
    match rest {
        Some(r) if r.contains('@') => {
            Some("an endpoint holds user info; give the credentials as user and password instead".into())
        }
        Some(r) if !r.is_empty() && !r.contains(char::is_whitespace) => None,
        _ => Some(format!("{e:?} is not an http://host:port or https://host:port URL")),
    }
}

/// What is wrong with an etcd key prefix (`None` = fine). Shared with the CLI's `--prefix`.
pub fn etcd_prefix_problem(prefix: &str) -> Option<&'static str> {
    if !prefix.starts_with('/') || prefix.len() < 2 {
        Some("must start with '/' and name something (e.g. \"/cellgate/prod\")")
    } else if prefix.ends_with('/') {
        Some("must not end with '/'")
    } else if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain white space")
    } else {
        None
    }
}

/// An instance id usable as the last segment of a key.
pub fn valid_instance_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// Time in-flight requests get to finish after SIGTERM, ms. Default 10,000.
    pub grace_ms: u64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { grace_ms: 10_000 }
    }
}

/// The read cache (`[cache]`, docs/cache.md): process-wide switches and caps. Reads opt in per
/// request; these bound what any request may ask for. `crate::cache::Settings` is the validated
/// form the cache runs on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache opted-in reads at all. Default false.
    pub enabled: bool,
    /// Shared Redis (`redis://host:port[/db]`): the L2 level, the cell versions and their pub/sub
    /// invalidation. Default none: L1 only, per instance (docs/cache.md, *Without Redis*).
    pub redis: Option<String>,
    /// L1 (in-process) capacity, bytes of stored entries. Default 64 MiB.
    pub l1_bytes: u64,
    /// Longest `ttl_ms` (and `swr_ms`) a request may ask for, ms; longer asks are cut to it.
    /// Default 300,000.
    pub max_ttl_ms: u64,
    /// Largest entry stored, bytes (encoded, before compression); larger results are served but
    /// not stored. Default 1 MiB.
    pub max_entry_bytes: u64,
    /// Entries larger than this are stored lz4-compressed (when that makes them smaller), bytes.
    /// Default 4,096.
    pub compress_above_bytes: u64,
    /// Deadline of every Redis call, ms (a slower answer counts as a Redis failure). Default 50.
    pub redis_timeout_ms: u64,
    /// Period of the subscription heartbeat, ms; the cache serves nothing while no heartbeat came
    /// back through Redis within 3 periods. Default 100.
    pub heartbeat_ms: u64,
    /// Prefix of every Redis key and of the channel, so several fleets can share one Redis.
    /// Default `cellgate`.
    pub prefix: String,
    /// Warming (docs/cache.md, *Warming*): how many of the hottest recorded reads an instance
    /// prefills on start and after a migration cutover (those of them that read a moved cell).
    /// Needs `redis`. Default 0: never. At most 1,000 (the hot set Redis keeps per database).
    pub warm_keys: u64,
    /// Time budget of one warming run, ms: reads not done by then are abandoned. Default 5,000.
    pub warm_ms: u64,
    /// Count the cached reads this instance answers into the hot set in Redis (one Redis call
    /// per database and 256 reads every 2 s at most), for any instance's warming. Default true.
    pub warm_record: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            redis: None,
            l1_bytes: 64 << 20,
            max_ttl_ms: 300_000,
            max_entry_bytes: 1 << 20,
            compress_above_bytes: 4096,
            redis_timeout_ms: 50,
            heartbeat_ms: 100,
            prefix: "cellgate".into(),
            warm_keys: 0,
            warm_ms: 5000,
            warm_record: true,
        }
    }
}

impl CacheConfig {
    /// What is wrong with the section (empty = valid).
    fn problems(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Some(url) = &self.redis
            && !(url.starts_with("redis://") || url.starts_with("unix://"))
        {
            errs.push("cache.redis must be a redis:// or unix:// URL".into());
        }
        if self.l1_bytes == 0 || self.max_ttl_ms == 0 || self.max_entry_bytes == 0 {
            errs.push("cache.l1_bytes, cache.max_ttl_ms and cache.max_entry_bytes must be > 0".into());
        }
        if self.redis_timeout_ms == 0 || self.heartbeat_ms == 0 {
            errs.push("cache.redis_timeout_ms and cache.heartbeat_ms must be > 0".into());
        }
        if self.prefix.is_empty() || !self.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
            errs.push("cache.prefix must be non-empty letters, digits, '_', '-' or '.'".into());
        }
        // The hot set Redis keeps per database (`cache::warm::HOT_KEPT`, checked there).
        if self.warm_keys > 1000 {
            errs.push("cache.warm_keys must be at most 1000".into());
        }
        if self.warm_keys > 0 && self.warm_ms == 0 {
            errs.push("cache.warm_ms must be > 0 when cache.warm_keys is set".into());
        }
        if self.enabled && self.warm_keys > 0 && self.redis.is_none() {
            errs.push("cache.warm_keys needs cache.redis (the hot reads are recorded there)".into());
        }
        errs
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.display().to_string(), message },
            other => other,
        })?;
        cfg.source = Some(path.to_path_buf());
        if let MapSource::File { path: map, .. } = &mut cfg.map
            && map.is_relative()
            && let Some(dir) = path.parent()
        {
            *map = dir.join(&*map);
        }
        if let Some(dir) = path.parent() {
            for tls in [&mut cfg.listen.data_tls, &mut cfg.listen.admin_tls].into_iter().flatten() {
                for p in [&mut tls.cert, &mut tls.key].into_iter().chain(tls.client_ca.as_mut()) {
                    if p.is_relative() {
                        *p = dir.join(&*p);
                    }
                }
            }
            let t = &mut cfg.tls;
            for p in [&mut t.peer_ca, &mut t.peer_cert, &mut t.peer_key].into_iter().flatten() {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
            if let MapSource::Etcd(e) = &mut cfg.map {
                let a = &mut e.access;
                for p in [&mut a.ca, &mut a.cert, &mut a.key].into_iter().flatten() {
                    if p.is_relative() {
                        *p = dir.join(&*p);
                    }
                }
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: String::new(), message: e.to_string() })?;
        cfg.expand_secrets()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `${VAR}` and `${file:/path}` in the values that may be secrets (`peer_token`, each token's
    /// `sha256`), expanded once per load: a restart or a config reload (SIGHUP) reads the files
    /// again. Every failure is collected; none quotes a value.
    fn expand_secrets(&mut self) -> Result<(), ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let mut errs = Vec::new();
        if let Some(t) = self.peer_token.as_mut() {
            match crate::secrets::expand(t, env) {
                Ok(v) => *t = v,
                Err(e) => errs.push(format!("peer_token: {e}")),
            }
        }
        for t in &mut self.tokens {
            match crate::secrets::expand(&t.sha256, env) {
                Ok(v) => t.sha256 = v,
                Err(e) => errs.push(format!("token {:?}: sha256: {e}", t.name)),
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(errs.join("; "))) }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        if self.tls.peer_cert.is_some() != self.tls.peer_key.is_some() {
            errs.push("tls.peer_cert and tls.peer_key must be given together".into());
        }
        for t in &self.tokens {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                errs.push(format!("token {:?}: sha256 must be 64 hex characters", t.name));
            }
            if t.scopes.is_empty() {
                errs.push(format!("token {:?}: needs at least one scope", t.name));
            }
        }
        self.validate_clients(&mut errs);
        if self.pool.max_size == 0 {
            errs.push("pool.max_size must be >= 1".into());
        }
        if self.pool.pipeline_connections > 0 && self.pool.pipeline_depth == 0 {
            errs.push("pool.pipeline_depth must be >= 1 when pipeline_connections > 0".into());
        }
        if self.pool.min_idle > self.pool.max_size {
            errs.push("pool.min_idle must be <= pool.max_size".into());
        }
        if self.limits.max_in_flight == 0 || self.limits.request_timeout_ms == 0 || self.health.interval_ms == 0 {
            errs.push("limits.max_in_flight, limits.request_timeout_ms and health.interval_ms must be > 0".into());
        }
        if self.health.fail_threshold == 0 || self.health.ok_threshold == 0 {
            errs.push("health thresholds must be >= 1".into());
        }
        errs.extend(self.cache.problems());
        if errs.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(errs.join("; "))) }
    }

    /// `[[clients]]` and the listeners' client-certificate settings.
    fn validate_clients(&self, errs: &mut Vec<String>) {
        let mut seen = std::collections::HashSet::new();
        for c in &self.clients {
            if c.name.is_empty() {
                errs.push(format!("client {:?}: name must not be empty", c.identity));
            }
            match client_identity(&c.identity) {
                Ok(id) => {
                    if !seen.insert(id.clone()) {
                        errs.push(format!("client {:?}: identity {id:?} is configured twice", c.name));
                    }
                }
                Err(problem) => errs.push(format!("client {:?}: identity {:?}: {problem}", c.name, c.identity)),
            }
            for s in c.scopes.iter().filter(|s| Scope::parse(s).is_none()) {
                errs.push(format!("client {:?}: unknown scope {s:?} (read, write, ddl, admin)", c.name));
            }
            if c.scopes.is_empty() {
                errs.push(format!("client {:?}: needs at least one scope", c.name));
            }
        }
        let listeners = [("data", &self.listen.data_tls), ("admin", &self.listen.admin_tls)];
        for (name, tls) in listeners {
            if let Some(tls) = tls
                && tls.client_auth.is_some()
                && tls.client_ca.is_none()
            {
                errs.push(format!("listen.{name}_tls: client_auth needs client_ca"));
            }
        }
        let any_ca = listeners.iter().any(|(_, t)| t.as_ref().is_some_and(|t| t.client_ca.is_some()));
        if !self.clients.is_empty() && !any_ca {
            errs.push("[[clients]] configured but no listener has client_ca (set it in [listen.data_tls] or [listen.admin_tls])".into());
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_tls_paths_are_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("cellgate-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("cellgate.toml");
        let text = "map = { path = \"map.toml\" }\n[listen.data_tls]\ncert = \"tls/c.pem\"\nkey = \"/abs/k.pem\"\n\
                    client_ca = \"tls/clients.pem\"\n";
        std::fs::write(&path, text).expect("write");
        let cfg = Config::load(&path).expect("valid");
        let tls = cfg.listen.data_tls.expect("data_tls");
        assert_eq!(tls.cert, dir.join("tls/c.pem"));
        assert_eq!(tls.key, PathBuf::from("/abs/k.pem"));
        assert_eq!(tls.client_ca, Some(dir.join("tls/clients.pem")));
        assert!(cfg.listen.admin_tls.is_none());
        assert!(Config::parse("map = { path = \"m\" }\n").expect("valid").listen.data_tls.is_none());
        let missing_key = "map = { path = \"m\" }\n[listen.admin_tls]\ncert = \"c\"\n";
        assert!(Config::parse(missing_key).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn secret_values_come_from_files_and_bad_ones_are_named_not_quoted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cellgate-config-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (peer, digest) = (dir.join("peer"), dir.join("digest"));
        std::fs::write(&peer, "canary-peer-token\n").expect("write");
        std::fs::write(&digest, format!("{}\n", "ab".repeat(32))).expect("write");
        for f in [&peer, &digest] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let text = format!(
            "map = {{ path = \"m\" }}\npeer_token = \"${{file:{}}}\"\n[[tokens]]\nname = \"r\"\nsha256 = \"${{file:{}}}\"\nscopes = [\"read\"]\n",
            peer.display(),
            digest.display()
        );
        let cfg = Config::parse(&text).expect("valid");
        assert_eq!(cfg.peer_token.as_deref(), Some("canary-peer-token"));
        assert_eq!(cfg.tokens[0].sha256, "ab".repeat(32));
        // A world-readable secret file is refused, and the error names the file, not its content.
        std::fs::set_permissions(&peer, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Config::parse(&text).expect_err("0644 refused").to_string();
        assert!(e.contains("peer_token") && e.contains("0644") && !e.contains("canary"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn cache_warming_keys() {
        let base = "map = { path = \"m\" }\n[cache]\nenabled = true\n";
        let cfg = Config::parse(base).expect("valid");
        assert_eq!((cfg.cache.warm_keys, cfg.cache.warm_ms, cfg.cache.warm_record), (0, 5000, true));
        let ok = format!("{base}redis = \"redis://r:6379\"\nwarm_keys = 1000\nwarm_ms = 200\nwarm_record = false\n");
        let cfg = Config::parse(&ok).expect("valid");
        assert_eq!((cfg.cache.warm_keys, cfg.cache.warm_ms, cfg.cache.warm_record), (1000, 200, false));
        for (extra, want) in [
            ("redis = \"redis://r:6379\"\nwarm_keys = 1001\n", "at most 1000"),
            ("redis = \"redis://r:6379\"\nwarm_keys = 5\nwarm_ms = 0\n", "cache.warm_ms must be > 0"),
            ("warm_keys = 5\n", "cache.warm_keys needs cache.redis"),
        ] {
            let e = Config::parse(&format!("{base}{extra}")).expect_err(extra).to_string();
            assert!(e.contains(want), "{extra}: {want:?} missing from {e}");
        }
    }

    #[test]
    fn client_identities_and_their_errors() {
        assert_eq!(
            client_identity("spiffe://cluster.local/ns/x/sa/orders").as_deref(),
            Ok("spiffe://cluster.local/ns/x/sa/orders")
        );
        assert_eq!(client_identity("dns:Orders.Internal").as_deref(), Ok("dns:orders.internal"));
        assert_eq!(client_identity("cn:Orders Service").as_deref(), Ok("cn:Orders Service"));
        for bad in
            ["orders", "DNS:orders", "dns:", "dns:a b", "dns://x", "cn:", "email:a@b", "spiffe://", "://x", "urn:x"]
        {
            assert!(client_identity(bad).is_err(), "{bad}");
        }
        assert!(!is_uri_identity("cn://x") && !is_uri_identity("dns://x") && is_uri_identity("https://a/b"));

        let base = "map = { path = \"m\" }\n";
        let ca = "[listen.data_tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca.pem\"\n";
        let ok = format!(
            "{base}{ca}client_auth = \"optional\"\n[[clients]]\nidentity = \"cn:orders\"\nname = \"orders\"\nscopes = [\"read\"]\n"
        );
        let cfg = Config::parse(&ok).expect("valid");
        let tls = cfg.listen.data_tls.as_ref().expect("data_tls");
        assert_eq!(tls.client_auth(), Some(ClientAuth::Optional));
        assert_eq!(cfg.clients[0].scopes, ["read"]);
        let required = Config::parse(&format!("{base}{ca}")).expect("valid");
        assert_eq!(required.listen.data_tls.expect("data_tls").client_auth(), Some(ClientAuth::Required));

        // Every error at once, each naming its client.
        let bad = format!(
            "{base}[listen.admin_tls]\ncert = \"c\"\nkey = \"k\"\nclient_auth = \"required\"\n\
             [[clients]]\nidentity = \"dns:a.example\"\nname = \"one\"\nscopes = [\"read\", \"rw\"]\n\
             [[clients]]\nidentity = \"dns:A.example\"\nname = \"two\"\nscopes = []\n\
             [[clients]]\nidentity = \"uri:x\"\nname = \"three\"\nscopes = [\"admin\"]\n"
        );
        let err = Config::parse(&bad).expect_err("invalid").to_string();
        for want in [
            "client \"one\": unknown scope \"rw\"",
            "client \"two\": identity \"dns:a.example\" is configured twice",
            "client \"two\": needs at least one scope",
            "client \"three\": identity \"uri:x\": expected a SAN URI",
            "listen.admin_tls: client_auth needs client_ca",
            "[[clients]] configured but no listener has client_ca",
        ] {
            assert!(err.contains(want), "{want:?} missing from: {err}");
        }
        let bad_mode = format!("{base}{ca}client_auth = \"sometimes\"\n");
        assert!(Config::parse(&bad_mode).is_err());
    }

    #[test]
    fn map_source_is_a_file_or_etcd_never_both() {
        let file = Config::parse("map = { path = \"m.toml\", watch = false }\n").expect("valid");
        assert!(matches!(&file.map, MapSource::File { watch: false, .. }));
        assert_eq!(file.map.path(), Some(Path::new("m.toml")));
        assert!(matches!(
            Config::parse("map = { path = \"m\" }\n").expect("valid").map,
            MapSource::File { watch: true, .. }
        ));

        let etcd = Config::parse(
            "map = { etcd = { endpoints = [\"http://127.0.0.1:2379\"], prefix = \"/cellgate/prod\" } }\n",
        )
        .expect("valid");
        let e = etcd.map.etcd().expect("etcd mode");
        assert_eq!(e.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(e.prefix, "/cellgate/prod");
        assert_eq!((e.timeout, e.lease_ttl_s, e.instance_id.as_deref()), (Duration::from_secs(2), 5, None));
        assert!(etcd.map.path().is_none());
        // The table form documented in configuration.md parses the same.
        let table = "[map.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/cellgate/prod\"\ninstance_id = \"cg-1\"\ntimeout_ms = 500\n";
        let t = Config::parse(table).expect("valid");
        let e = t.map.etcd().expect("etcd mode");
        assert_eq!((e.instance_id.as_deref(), e.timeout), (Some("cg-1"), Duration::from_millis(500)));
        // TLS and auth: the password is expanded from its file and never printed in debug form.
        let dir = std::env::temp_dir().join(format!("cellgate-etcd-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret-etcd\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let secured = format!(
            "[map.etcd]\nendpoints = [\"https://127.0.0.1:2379\"]\nprefix = \"/p\"\nca = \"/ca.pem\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\nuser = \"cellgate\"\npassword = \"${{file:{}}}\"\n",
            pw.display()
        );
        let cfg = Config::parse(&secured).expect("valid");
        let a = &cfg.map.etcd().expect("etcd mode").access;
        assert_eq!((a.tls(), a.user.as_deref(), a.password.as_deref()), (true, Some("cellgate"), Some("s3cret-etcd")));
        assert!(!format!("{cfg:?}").contains("s3cret"), "the password in the config's debug form");
        let _ = std::fs::remove_dir_all(&dir);

        for (text, want) in [
            ("map = { path = \"m\", etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\" } }", "not both"),
            ("map = { }", "needs path"),
            ("map = { watch = true, etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\" } }", "always watched"),
            ("map = { etcd = { endpoints = [], prefix = \"/p\" } }", "at least one"),
            (
                "map = { etcd = { endpoints = [\"https://e:1\"], prefix = \"/p\" } }",
                "map.etcd.ca: https endpoints need",
            ),
            ("map = { etcd = { endpoints = [\"ftp://e:1\"], prefix = \"/p\" } }", "not an http://host:port or https"),
            ("map = { etcd = { endpoints = [\"http://u:pw@e:1\"], prefix = \"/p\" } }", "holds user info"),
            (
                "map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", ca = \"/ca.pem\" } }",
                "apply to https:// endpoints only",
            ),
            (
                "map = { etcd = { endpoints = [\"https://e:1\"], prefix = \"/p\", ca = \"/c\", cert = \"/c\" } }",
                "map.etcd.cert and map.etcd.key must be given together",
            ),
            (
                "map = { etcd = { endpoints = [\"http://e:1\", \"https://e:2\"], prefix = \"/p\", ca = \"/c\" } }",
                "mix of http",
            ),
            (
                "map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", user = \"root\" } }",
                "map.etcd.user needs a password",
            ),
            (
                "map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", password = \"x\" } }",
                "map.etcd.password needs a user",
            ),
            (
                "map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", user = \"r\", password = \"${CELLGATE_TEST_UNSET_ETCD_PW}\" } }",
                "map.etcd.password: environment variable",
            ),
            ("map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"p\" } }", "must start with '/'"),
            ("map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p/\" } }", "must not end"),
            ("map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", timeout_ms = 0 } }", "timeout_ms"),
            ("map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", lease_ttl_s = 1 } }", "lease_ttl_s"),
            (
                "map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", instance_id = \"a/b\" } }",
                "instance_id",
            ),
            ("map = { etcd = { endpoints = [\"http://e:1\"], prefix = \"/p\", username = \"x\" } }", "unknown field"),
        ] {
            let err = Config::parse(&format!("{text}\n")).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {want:?} missing from {err}");
        }
    }
}
