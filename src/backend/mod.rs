//! Backends: one shape per database kind (`postgres` + `postgres/{types,prober}`, `mssql` +
//! `mssql/{types,prober}`, `mongo` + `mongo/{ejson,guard}`), the driver-free health rules and
//! prober loop, pool plumbing, and building a map's backends (reusing unchanged endpoints).
//! Owns connections; knows nothing of HTTP or routing.

pub mod health;
pub mod mongo;
pub mod mssql;
pub mod pool;
pub mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::config;
use crate::shardmap::{DatabaseSpec, Secret, ShardMap};
use mongo::MongoDatabase;
use mssql::{MssqlDatabase, MssqlEndpoint};
use postgres::{PgDatabase, PgEndpoint};

/// Install aws-lc-rs as the one process-wide rustls provider. tiberius and mongodb pass their
/// provider explicitly, but any `ClientConfig::builder()` elsewhere panics when two providers are
/// compiled in and none is installed (crates.md P7). Idempotent.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first (by an embedding program): keep it.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// Why a backend call failed. Classified once here; `http::respond` maps it to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("endpoint {endpoint} unavailable: {reason}")]
    Unavailable { endpoint: String, reason: String },
    #[error("endpoint {endpoint} has no free connection")]
    Overloaded { endpoint: String },
    #[error("endpoint {endpoint} is read-only (not a primary)")]
    ReadOnly { endpoint: String },
    #[error("statement timed out")]
    Timeout,
    #[error("{message}")]
    Database { sqlstate: String, message: String, detail: Option<String>, hint: Option<String>, position: Option<u32> },
    /// A SQL Server or MongoDB server rejected the operation: its numeric error code
    /// (SQL Server error number, MongoDB code such as 11000) and message.
    #[error("{message}")]
    Server { code: i64, message: String },
    #[error("{0}")]
    Params(postgres::types::ParamError),
    /// Request values the backend cannot bind (non-PostgreSQL backends; PostgreSQL uses `Params`).
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Column(postgres::types::ColumnError),
    #[error("statement {index} of {count}: {source}")]
    InStatement { index: usize, count: usize, source: Box<BackendError> },
    #[error("{0}")]
    Unsupported(String),
    /// The statement's result is over `[limits]`; the statement was stopped.
    #[error("result too large: {0}")]
    ResultTooLarge(String),
    /// The old owner's migration fence refused the write before it ran (MongoDB; PostgreSQL's
    /// fence raises SQLSTATE CGF01 as a `Database` error). Nothing was written.
    #[error("{0}")]
    Fenced(String),
    /// The server applied the write but whether it counts is unknown (a fence came meanwhile).
    #[error("{0}")]
    OutcomeUnknown(String),
}

impl BackendError {
    /// Tag an error with the batch statement it came from (only for batches of > 1).
    pub fn in_statement(self, index: usize, count: usize) -> Self {
        if count > 1 { BackendError::InStatement { index, count, source: Box::new(self) } } else { self }
    }

    /// The innermost error (batch tags removed).
    pub fn root(&self) -> &BackendError {
        match self {
            BackendError::InStatement { source, .. } => source.root(),
            other => other,
        }
    }
}

/// An error and every cause under it, `outer: inner: innermost`. Driver errors often say only
/// "error connecting to server" at the top; the cause (refused, timed out, auth) is below.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A shard's logical database, by kind.
pub enum DatabaseBackend {
    Postgres(Arc<PgDatabase>),
    Mongo(Arc<MongoDatabase>),
    Sqlserver(Arc<MssqlDatabase>),
}

/// The primary and replica endpoints of one SQL database: each reused from `reuse` (same
/// connection string and role, so its pool and open connections survive a reload) or made with
/// `make` and recorded in `fresh` (checked before publish); every failure is reported, with `ctx`
/// naming the database.
fn replica_set<E>(
    primary: &Secret,
    replicas: &[Secret],
    ctx: &str,
    reuse: &HashMap<([u8; 32], Role), Arc<E>>,
    fresh: &mut Vec<(String, Fresh)>,
    make: impl Fn(&Secret, Role) -> Result<E, String>,
    wrap: fn(Arc<E>) -> Fresh,
) -> Result<pool::ReplicaSet<E>, Vec<String>> {
    let mut endpoint = |conn: &Secret, role: Role, ctx: String| -> Result<Arc<E>, String> {
        if let Some(ep) = reuse.get(&(pool::conn_key(conn), role)) {
            return Ok(ep.clone());
        }
        let ep = Arc::new(make(conn, role).map_err(|e| format!("{ctx}: {e}"))?);
        fresh.push((ctx, wrap(ep.clone())));
        Ok(ep)
    };
    let p = endpoint(primary, Role::Primary, format!("{ctx} primary"));
    let rs: Vec<_> =
        replicas.iter().enumerate().map(|(i, r)| endpoint(r, Role::Replica, format!("{ctx} replica {i}"))).collect();
    match (p, rs.into_iter().collect::<Result<Vec<_>, _>>()) {
        (Ok(p), Ok(rs)) => Ok(pool::ReplicaSet::new(p, rs)),
        (p, rs) => Err(p.err().into_iter().chain(rs.err()).collect()),
    }
}

/// All backends of one map: `[shard index][database name]`.
pub struct Backends {
    pub shards: Vec<BTreeMap<String, DatabaseBackend>>,
    health_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Endpoints created by this build (not reused from the previous snapshot), with context.
    fresh: Vec<(String, Fresh)>,
}

/// An endpoint (or MongoDB client) created by a build, to be checked before the map is published.
enum Fresh {
    Pg(Arc<PgEndpoint>),
    Mssql(Arc<MssqlEndpoint>),
    Mongo(Arc<MongoDatabase>),
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.health_tasks {
            t.abort();
        }
    }
}

/// The endpoints and clients of the map being replaced, by connection-string key: what a reload
/// can keep (with their pools and open connections) instead of connecting again.
#[derive(Default)]
struct Reusable {
    pg: HashMap<([u8; 32], Role), Arc<PgEndpoint>>,
    mssql: HashMap<([u8; 32], Role), Arc<MssqlEndpoint>>,
    mongo: HashMap<[u8; 32], Arc<MongoDatabase>>,
}

impl From<Option<&Backends>> for Reusable {
    fn from(old: Option<&Backends>) -> Self {
        let mut r = Reusable::default();
        for db in old.iter().flat_map(|o| o.shards.iter()).flat_map(|s| s.values()) {
            match db {
                DatabaseBackend::Postgres(pg) => r.pg.extend(pg.endpoints().map(|ep| ((ep.key, ep.role), ep.clone()))),
                DatabaseBackend::Sqlserver(ms) => {
                    r.mssql.extend(ms.endpoints().map(|ep| ((ep.key, ep.role), ep.clone())))
                }
                DatabaseBackend::Mongo(m) => {
                    r.mongo.insert(m.key, m.clone());
                }
            }
        }
        r
    }
}

/// One build of a map's backends: reuses what it can, creates the rest, and collects every
/// error, the probe/warm tasks it started, and the endpoints it created (checked before publish).
struct Build<'a> {
    reuse: Reusable,
    cfg: &'a config::Config,
    request_timeout: Duration,
    errors: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    fresh: Vec<(String, Fresh)>,
}

impl Build<'_> {
    /// One shard database by kind; `None` (with the errors recorded) if it cannot be built.
    fn database(&mut self, name: &str, spec: &DatabaseSpec, ctx: String) -> Option<DatabaseBackend> {
        let (cfg, timeout) = (self.cfg, self.request_timeout);
        match spec {
            DatabaseSpec::Postgres { primary, replicas, .. } => {
                let make = |conn: &Secret, role| PgEndpoint::new(conn, role, &cfg.pool, &cfg.limits, cfg.tls.backends);
                let set = replica_set(primary, replicas, &ctx, &self.reuse.pg, &mut self.fresh, make, Fresh::Pg);
                let db = Arc::new(set.map_err(|e| self.errors.extend(e)).ok()?);
                self.tasks
                    .push(crate::tasks::spawn("pg_prober", postgres::prober::run(db.clone(), cfg.health.clone())));
                Some(DatabaseBackend::Postgres(db))
            }
            DatabaseSpec::Sqlserver { primary, replicas } => {
                let make = |conn: &Secret, role| MssqlEndpoint::new(conn, role, &cfg.pool, timeout, cfg.tls.backends);
                let set = replica_set(primary, replicas, &ctx, &self.reuse.mssql, &mut self.fresh, make, Fresh::Mssql);
                let db = Arc::new(set.map_err(|e| self.errors.extend(e)).ok()?);
                self.tasks
                    .push(crate::tasks::spawn("mssql_prober", mssql::prober::run(db.clone(), cfg.health.clone())));
                Some(DatabaseBackend::Sqlserver(db))
            }
            DatabaseSpec::Mongodb { uri } => {
                // Same URI and database as before: keep the client (its pool and topology
                // monitors) across the reload.
                if let Some(m) = self.reuse.mongo.get(&MongoDatabase::key_of(uri, name)) {
                    return Some(DatabaseBackend::Mongo(m.clone()));
                }
                let m = Arc::new(
                    MongoDatabase::new(uri, name, &cfg.pool, &cfg.health, cfg.tls.backends)
                        .map_err(|e| self.errors.push(format!("{ctx}: {e}")))
                        .ok()?,
                );
                // Warm in the background, bounded: a down shard must not hold up (or fail) the build.
                let w = m.clone();
                self.tasks.push(crate::tasks::spawn("mongo_warm", async move { w.warm().await }));
                self.fresh.push((ctx, Fresh::Mongo(m.clone())));
                Some(DatabaseBackend::Mongo(m))
            }
        }
    }
}

impl Backends {
    /// Build pools (lazily connecting) and start one health task per shard database.
    /// Must run inside a tokio runtime.
    pub fn build(map: &ShardMap, cfg: &config::Config) -> Result<Backends, Vec<String>> {
        Self::build_reusing(map, cfg, None)
    }

    /// Like `build`, but endpoints whose connection string and role are unchanged from `old`
    /// keep their pool (open connections) and health state.
    pub fn build_reusing(
        map: &ShardMap,
        cfg: &config::Config,
        old: Option<&Backends>,
    ) -> Result<Backends, Vec<String>> {
        let mut b = Build {
            reuse: Reusable::from(old),
            cfg,
            // Every backend's own deadline (PostgreSQL statement_timeout, tiberius command
            // timeout) matches the request deadline.
            request_timeout: Duration::from_millis(cfg.limits.request_timeout_ms),
            errors: Vec::new(),
            tasks: Vec::new(),
            fresh: Vec::new(),
        };
        let mut shards = Vec::new();
        for shard in map.shards() {
            let mut dbs = BTreeMap::new();
            for (name, spec) in &shard.databases {
                let ctx = format!("shard {} database {name}", shard.id);
                if let Some(db) = b.database(name, spec, ctx) {
                    dbs.insert(name.clone(), db);
                }
            }
            shards.push(dbs);
        }
        if b.errors.is_empty() {
            Ok(Backends { shards, health_tasks: b.tasks, fresh: b.fresh })
        } else {
            for t in b.tasks {
                t.abort();
            }
            Err(b.errors)
        }
    }

    /// Connect to every endpoint this build created (not reused) and run a trivial query;
    /// every failure is reported. Used before publishing a reloaded map.
    pub async fn check_new(&self, cfg: &config::Config) -> Result<(), Vec<String>> {
        let timeout = Duration::from_millis(cfg.pool.connect_timeout_ms.max(cfg.health.probe_timeout_ms));
        let checks = self.fresh.iter().map(|(ctx, ep)| async move {
            let (label, r) = match ep {
                Fresh::Pg(ep) => (&ep.label, tokio::time::timeout(timeout, ep.check()).await),
                Fresh::Mssql(ep) => (&ep.label, tokio::time::timeout(timeout, ep.check()).await),
                // The check has its own deadline, past the driver's server selection, so a member
                // it cannot use is reported with the driver's reason (TLS, certificate, refused).
                Fresh::Mongo(db) => (&db.label, Ok(db.check().await)),
            };
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("{ctx} ({label}): {e}")),
                Err(_) => Err(format!("{ctx} ({label}): no answer within {timeout:?}")),
            }
        });
        let errors: Vec<String> =
            futures_util::future::join_all(checks).await.into_iter().filter_map(Result::err).collect();
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// Has every endpoint been probed at least once?
    pub fn first_pass_done(&self) -> bool {
        self.shards.iter().flat_map(|s| s.values()).all(|db| match db {
            DatabaseBackend::Postgres(pg) => pg.endpoints().all(|e| e.health.view().probed),
            // The bounded warm-up attempt finished (a down shard counts as probed).
            DatabaseBackend::Mongo(m) => m.warmed(),
            DatabaseBackend::Sqlserver(ms) => ms.endpoints().all(|e| e.health.view().probed),
        })
    }
}
