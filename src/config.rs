//! Process configuration (`cellgate.toml`, design §4): listeners, limits, pools, health, tokens,
//! map source, peers. Parse → validate; every field has a documented unit and default.

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
}

/// TLS policy for connections cellgate opens (docs/configuration.md `[tls]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// The weakest PostgreSQL `sslmode` a map endpoint may use; a weaker endpoint is refused
    /// when the map is built (startup, reload). Default `disable` (no minimum). An endpoint
    /// without `sslmode` counts as `prefer`, libpq's default.
    pub backends: SslMode,
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

/// A listener's certificate and key (docs/configuration.md `[listen.data_tls]`). Both files are
/// re-read when they change; relative paths are relative to the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching the leaf; readable by its owner only.
    pub key: PathBuf,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapSource {
    /// Shard-map file (relative paths are relative to the config file).
    pub path: PathBuf,
    /// Reload when the file changes (its directory is watched). Default true.
    #[serde(default = "yes")]
    pub watch: bool,
}

fn yes() -> bool {
    true
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
        if cfg.map.path.is_relative()
            && let Some(dir) = path.parent()
        {
            cfg.map.path = dir.join(&cfg.map.path);
        }
        if let Some(dir) = path.parent() {
            for tls in [&mut cfg.listen.data_tls, &mut cfg.listen.admin_tls].into_iter().flatten() {
                for p in [&mut tls.cert, &mut tls.key] {
                    if p.is_relative() {
                        *p = dir.join(&*p);
                    }
                }
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: String::new(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        for t in &self.tokens {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                errs.push(format!("token {:?}: sha256 must be 64 hex characters", t.name));
            }
            if t.scopes.is_empty() {
                errs.push(format!("token {:?}: needs at least one scope", t.name));
            }
        }
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
        if errs.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(errs.join("; "))) }
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
        let text = "map = { path = \"map.toml\" }\n[listen.data_tls]\ncert = \"tls/c.pem\"\nkey = \"/abs/k.pem\"\n";
        std::fs::write(&path, text).expect("write");
        let cfg = Config::load(&path).expect("valid");
        let tls = cfg.listen.data_tls.expect("data_tls");
        assert_eq!(tls.cert, dir.join("tls/c.pem"));
        assert_eq!(tls.key, PathBuf::from("/abs/k.pem"));
        assert!(cfg.listen.admin_tls.is_none());
        assert!(Config::parse("map = { path = \"m\" }\n").expect("valid").listen.data_tls.is_none());
        let missing_key = "map = { path = \"m\" }\n[listen.admin_tls]\ncert = \"c\"\n";
        assert!(Config::parse(missing_key).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
