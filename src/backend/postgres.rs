//! PostgreSQL backend: a bb8 pool per endpoint (bb8-postgres underneath, plus a per-connection
//! prepared-statement cache), statements under a deadline, read-only replica sessions.
//! Knows nothing of HTTP or routing; never formats a connection string.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use serde_json::Value;
use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, Statement};

use super::health::EndpointHealth;
use super::pg_types;
use super::{BackendError, Role};
use crate::config;
use crate::shardmap::Secret;

/// One pooled connection: the client, its prepared statements, and whether a statement was
/// abandoned mid-flight (then the connection must not be reused: bb8 #246, crates.md P4).
pub struct PgConn {
    pub client: tokio_postgres::Client,
    stmts: StmtCache,
    busy: bool,
}

/// Prepared statements of one connection, by SQL text.
#[derive(Default)]
struct StmtCache(HashMap<String, Statement>);

impl StmtCache {
    /// Statements kept per connection; beyond this the cache is cleared (bounded memory).
    const MAX: usize = 256;

    fn get(&self, sql: &str) -> Option<Statement> {
        self.0.get(sql).cloned()
    }

    fn insert(&mut self, sql: &str, s: &Statement) {
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0.insert(sql.to_string(), s.clone());
    }
}

impl PgConn {
    async fn prepare(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        self.stmts.insert(sql, &s);
        Ok(s)
    }
}

pub struct PgManager {
    inner: PostgresConnectionManager<NoTls>,
}

impl bb8::ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PgConn, Self::Error> {
        let client = self.inner.connect().await?;
        Ok(PgConn { client, stmts: StmtCache::default(), busy: false })
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), Self::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.busy || conn.client.is_closed()
    }
}

/// One PostgreSQL server of a shard database.
pub struct PgEndpoint {
    /// `host:port/dbname` — safe to show (no user, no password).
    pub label: Arc<str>,
    pub role: Role,
    pub pool: bb8::Pool<PgManager>,
    pub health: Arc<EndpointHealth>,
    /// Connection parameters for the health prober (its own connection, not pooled).
    pub(crate) pg_config: tokio_postgres::Config,
    checkout_timeout: Duration,
    /// SHA-256 of the connection string: identifies the endpoint across reloads without
    /// keeping the secret text around.
    pub key: [u8; 32],
    /// The health prober's own connection. Lives with the endpoint, not the probe task, so a
    /// reload that reuses the endpoint does not pay a new connect (and SCRAM) per probe task.
    pub(crate) probe_client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Shared connections for plain reads (None when `pipeline_connections = 0`).
    pipeline: Option<Pipeline>,
}

/// Plain reads (autocommit, no replay wait) pipelined over a few shared connections.
///
/// Why: with an exclusive pooled connection per read, every read costs its own send and recv on
/// the backend socket and a wake-up of its own connection task. tokio-postgres multiplexes
/// concurrent requests on one `Client`: the connection task writes every queued request with one
/// send and reads many responses with one recv, so under load the per-read syscall and
/// scheduling cost falls with the queue depth. A single autocommit statement has no session
/// state to isolate, so sharing is safe; transactions, batches and replay waits keep using the
/// exclusive pool. A dropped (cancelled) read is harmless here: the connection task discards
/// its response, and the next read simply queues behind it (bounded by statement_timeout).
struct Pipeline {
    slots: Vec<tokio::sync::Mutex<Option<Arc<SharedConn>>>>,
    next: AtomicUsize,
    /// Bounds reads in flight over all slots (connections × depth).
    permits: tokio::sync::Semaphore,
}

struct SharedConn {
    client: tokio_postgres::Client,
    stmts: std::sync::Mutex<StmtCache>,
}

impl SharedConn {
    async fn prepare(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.stmts.lock().unwrap_or_else(|p| p.into_inner()).get(sql) {
            return Ok(s);
        }
        // Two concurrent misses may both prepare; the second insert wins, both are valid.
        let s = self.client.prepare(sql).await?;
        self.stmts.lock().unwrap_or_else(|p| p.into_inner()).insert(sql, &s);
        Ok(s)
    }
}

/// First host and port of a connection config (what cellgate connects to).
pub fn host_port(cfg: &tokio_postgres::Config) -> (String, u16) {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    (host, cfg.get_ports().first().copied().unwrap_or(5432))
}

/// Safe display of an endpoint: hosts, ports and database, never credentials.
pub fn endpoint_label(cfg: &tokio_postgres::Config) -> String {
    let (host, port) = host_port(cfg);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or(""))
}

impl PgEndpoint {
    /// Build an endpoint and its (lazy) pool. Must run inside a tokio runtime (bb8 spawns).
    pub fn new(conn: &Secret, role: Role, pool: &config::Pool, statement_timeout: Duration) -> Result<Self, String> {
        // The parse error of tokio_postgres does not echo the input; still, report it generically.
        let mut cfg = tokio_postgres::Config::from_str(conn.expose())
            .map_err(|e| format!("invalid PostgreSQL connection string: {e}"))?;
        let label: Arc<str> = Arc::from(endpoint_label(&cfg));
        cfg.connect_timeout(Duration::from_millis(pool.connect_timeout_ms));
        cfg.application_name("cellgate");
        // The server enforces the deadline too, so an abandoned statement cannot run on.
        let mut opts = format!("-c statement_timeout={}", statement_timeout.as_millis());
        if role == Role::Replica {
            // Replicas serve reads only: a write sent there by mistake fails in the server.
            opts.push_str(" -c default_transaction_read_only=on");
        }
        cfg.options(&opts);
        let health = Arc::new(EndpointHealth::new(role));
        let manager = PgManager { inner: PostgresConnectionManager::new(cfg.clone(), NoTls) };
        let pool_obj = super::pool::builder(pool, &label, &health).build_unchecked(manager);
        let pipeline = (pool.pipeline_connections > 0).then(|| Pipeline {
            slots: (0..pool.pipeline_connections).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            permits: tokio::sync::Semaphore::new(
                (pool.pipeline_connections as usize)
                    .saturating_mul(pool.pipeline_depth.max(1) as usize)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            ),
        });
        Ok(Self {
            pipeline,
            probe_client: tokio::sync::Mutex::new(None),
            key: super::pool::conn_key(conn),
            label,
            role,
            pool: pool_obj,
            health,
            pg_config: cfg,
            checkout_timeout: Duration::from_millis(pool.checkout_timeout_ms),
        })
    }

    /// Open a fresh connection and run a trivial query (reload pre-check).
    pub async fn check(&self) -> Result<(), String> {
        let (client, conn) = self.pg_config.connect(NoTls).await.map_err(|e| e.to_string())?;
        let task = tokio::spawn(conn);
        let r = client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| e.to_string());
        drop(client);
        let _ = task.await;
        r
    }

    async fn checkout(&self) -> Result<bb8::PooledConnection<'_, PgManager>, BackendError> {
        match self.pool.get().await {
            Ok(c) => Ok(c),
            Err(bb8::RunError::User(e)) => Err(self.classify(e)),
            Err(bb8::RunError::TimedOut) => {
                Err(super::pool::checkout_timed_out(&self.label, &self.health, self.checkout_timeout))
            }
        }
    }

    fn classify(&self, e: tokio_postgres::Error) -> BackendError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code().to_string();
            if code == "25006" {
                // read_only_sql_transaction: the endpoint is (now) a replica. Re-check its role now.
                self.health.request_recheck();
                return BackendError::ReadOnly { endpoint: self.label.to_string() };
            }
            if code == "57014" {
                return BackendError::Timeout;
            }
            if code.starts_with("08") || code == "57P01" || code == "57P02" || code == "57P03" {
                self.health.note_error(db.message());
                return BackendError::Unavailable {
                    endpoint: self.label.to_string(),
                    reason: db.message().to_string(),
                };
            }
            return BackendError::Database {
                sqlstate: code,
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
                position: match db.position() {
                    Some(tokio_postgres::error::ErrorPosition::Original(p)) => Some(*p),
                    _ => None,
                },
            };
        }
        // No server error: I/O, closed connection, connect refused, TLS.
        self.health.note_error(&e.to_string());
        self.health.request_recheck();
        BackendError::Unavailable { endpoint: self.label.to_string(), reason: e.to_string() }
    }

    /// Run one read-only statement. `min_lsn`: wait (until `wait_until`) for this endpoint to
    /// replay past it; returns `Ok(None)` if it did not in time (the caller goes to the primary).
    pub async fn query(
        &self,
        sql: &str,
        params: &[Value],
        min_lsn: Option<(u64, Instant)>,
    ) -> Result<Option<Rows>, BackendError> {
        if min_lsn.is_none()
            && let Some(p) = &self.pipeline
        {
            return self.query_pipelined(p, sql, params).await.map(Some);
        }
        // Boxed: the exclusive path (checkout, replay wait) is the rare one when pipelining is
        // on; inline it would size every parked read's future.
        Box::pin(self.query_exclusive(sql, params, min_lsn)).await
    }

    async fn query_exclusive(
        &self,
        sql: &str,
        params: &[Value],
        min_lsn: Option<(u64, Instant)>,
    ) -> Result<Option<Rows>, BackendError> {
        let mut conn = self.checkout().await?;
        if let Some((lsn, until)) = min_lsn
            && !self.wait_replay(&mut conn, lsn, until).await?
        {
            return Ok(None);
        }
        let stmt = conn.prepare(sql).await.map_err(|e| self.classify(e))?;
        let bound = pg_types::bind_params(stmt.params(), params).map_err(BackendError::Params)?;
        conn.busy = true;
        let rows = conn.client.query(&stmt, &pg_types::as_sql_refs(&bound)).await.map_err(|e| self.classify(e))?;
        conn.busy = false;
        Rows::from_pg(&stmt, &rows).map(Some)
    }

    async fn query_pipelined(&self, p: &Pipeline, sql: &str, params: &[Value]) -> Result<Rows, BackendError> {
        let _permit = match tokio::time::timeout(self.checkout_timeout, p.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            // Closed never happens (the semaphore is never closed); treat it like a full queue.
            Ok(Err(_)) | Err(_) => return Err(BackendError::Overloaded { endpoint: self.label.to_string() }),
        };
        let conn = self.shared_conn(p).await?;
        let stmt = conn.prepare(sql).await.map_err(|e| self.classify(e))?;
        let bound = pg_types::bind_params(stmt.params(), params).map_err(BackendError::Params)?;
        let rows = conn.client.query(&stmt, &pg_types::as_sql_refs(&bound)).await.map_err(|e| self.classify(e))?;
        Rows::from_pg(&stmt, &rows)
    }

    /// The next shared connection (round robin), opened or re-opened if needed. The slot lock
    /// is held across the connect so concurrent reads wait for one connect instead of racing.
    async fn shared_conn(&self, p: &Pipeline) -> Result<Arc<SharedConn>, BackendError> {
        let i = p.next.fetch_add(1, Ordering::Relaxed) % p.slots.len();
        let mut slot = p.slots[i].lock().await;
        if let Some(c) = slot.as_ref()
            && !c.client.is_closed()
        {
            return Ok(c.clone());
        }
        // Boxed: a connect (startup, SCRAM) is rare and its state is large; inline it would
        // size every pipelined read's future.
        let connect = Box::pin(self.pg_config.connect(NoTls));
        let (client, connection) = match tokio::time::timeout(self.checkout_timeout, connect).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(self.classify(e)),
            Err(_) => {
                return Err(BackendError::Unavailable {
                    endpoint: self.label.to_string(),
                    reason: format!("no connection within {:?}", self.checkout_timeout),
                });
            }
        };
        let label = self.label.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(endpoint = %label, error = %e, "shared read connection closed");
            }
        });
        let c = Arc::new(SharedConn { client, stmts: std::sync::Mutex::default() });
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Has this replica replayed past `lsn`? Polls until `until`.
    async fn wait_replay(&self, conn: &mut PgConn, lsn: u64, until: Instant) -> Result<bool, BackendError> {
        let stmt =
            conn.prepare("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn").await.map_err(|e| self.classify(e))?;
        let lsn_text = format_lsn(lsn);
        loop {
            conn.busy = true;
            let row = conn.client.query_one(&stmt, &[&lsn_text]).await.map_err(|e| self.classify(e))?;
            conn.busy = false;
            if row.get::<_, Option<bool>>(0).unwrap_or(false) {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5).min(until - Instant::now())).await;
        }
    }

    /// Run writes on this (primary) endpoint in one transaction. With `route` = (routed cell,
    /// map version) the transaction first sets `cellgate.route` (transaction-local), which the
    /// migration fence's statement trigger checks: a write routed by a map older than the fence
    /// fails even when it matches no row. Without a route a single statement runs in autocommit.
    /// Returns the last statement's rows, the total rows affected and the WAL position after
    /// commit (the read-your-writes token).
    pub async fn execute(
        &self,
        stmts: &[(String, Vec<Value>)],
        route: Option<(u64, u64)>,
    ) -> Result<WriteResult, BackendError> {
        let mut conn = self.checkout().await?;
        // Prepare and bind everything first: a bad parameter fails before anything runs.
        let mut prepared = Vec::with_capacity(stmts.len());
        for (i, (sql, params)) in stmts.iter().enumerate() {
            let stmt = conn.prepare(sql).await.map_err(|e| self.classify(e).in_statement(i, stmts.len()))?;
            let bound = pg_types::bind_params(stmt.params(), params)
                .map_err(|e| BackendError::Params(e).in_statement(i, stmts.len()))?;
            prepared.push((stmt, bound));
        }
        let lsn_stmt = conn.prepare("SELECT pg_current_wal_lsn()::text").await.map_err(|e| self.classify(e))?;
        conn.busy = true;
        let tx = route.is_some() || stmts.len() > 1;
        // Integers only: nothing to quote.
        let begin = match route {
            Some((cell, version)) => {
                format!("BEGIN; SELECT set_config('cellgate.route', '{}:{version}', true)", cell as i64)
            }
            None => "BEGIN".to_string(),
        };
        let mut affected = 0u64;
        let mut last = None;
        let mut lsn_row = None;
        let final_index = prepared.len() - 1;
        for (i, (stmt, bound)) in prepared.iter().enumerate() {
            let (opens, closes) = (tx && i == 0, tx && i == final_index);
            // Pipelined: the requests of one step are sent on its first poll, in this order, so
            // a single-statement write is one round trip (BEGIN, statement, COMMIT, WAL
            // position). A COMMIT behind a failed statement only ends the aborted transaction;
            // the WAL position read after the COMMIT is at or past our commit record.
            let (began, ran, committed, lsn) = futures_util::future::join4(
                async { if opens { conn.client.batch_execute(&begin).await } else { Ok(()) } },
                run_counting(&conn.client, stmt, bound),
                async { if closes { conn.client.batch_execute("COMMIT").await } else { Ok(()) } },
                async { if closes { conn.client.query_one(&lsn_stmt, &[]).await.map(Some) } else { Ok(None) } },
            )
            .await;
            match began.and(ran) {
                Ok((rows, n)) => {
                    affected += n;
                    last = Some((stmt.clone(), rows));
                    committed.map_err(|e| self.classify(e))?;
                    lsn_row = lsn.map_err(|e| self.classify(e))?;
                }
                Err(e) => {
                    if tx && !closes {
                        // The transaction is aborted server-side; ROLLBACK makes the connection
                        // reusable. If even that fails the connection stays `busy` and is dropped.
                        if conn.client.batch_execute("ROLLBACK").await.is_ok() {
                            conn.busy = false;
                        }
                    } else if committed.is_ok() {
                        // Autocommit, or the pipelined COMMIT already ended the transaction.
                        conn.busy = false;
                    }
                    return Err(self.classify(e).in_statement(i, stmts.len()));
                }
            }
        }
        let lsn_row = match lsn_row {
            Some(row) => row,
            None => conn.client.query_one(&lsn_stmt, &[]).await.map_err(|e| self.classify(e))?,
        };
        conn.busy = false;
        let lsn = parse_lsn(lsn_row.get::<_, &str>(0)).unwrap_or(0);
        let (stmt, rows) = last.expect("at least one statement");
        Ok(WriteResult { rows: Rows::from_pg(&stmt, &rows)?, rows_affected: affected, lsn })
    }
}

async fn run_counting(
    client: &tokio_postgres::Client,
    stmt: &Statement,
    bound: &[pg_types::PgParam],
) -> Result<(Vec<tokio_postgres::Row>, u64), tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let stream = client.query_raw(stmt, pg_types::as_sql_refs(bound)).await?;
    futures_util::pin_mut!(stream);
    let mut rows = Vec::new();
    while let Some(r) = stream.try_next().await? {
        rows.push(r);
    }
    let n = stream.rows_affected().unwrap_or(rows.len() as u64);
    Ok((rows, n))
}

/// Result rows, column-major metadata plus row-major values (arrays; object form is rendered
/// at serialisation time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub columns: Vec<(String, String)>,
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    fn from_pg(stmt: &Statement, rows: &[tokio_postgres::Row]) -> Result<Rows, BackendError> {
        let columns =
            stmt.columns().iter().map(|c| (c.name().to_string(), pg_types::type_name(c.type_()).to_string())).collect();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut vals = Vec::with_capacity(row.len());
            for i in 0..row.len() {
                vals.push(pg_types::column_to_json(row, i).map_err(BackendError::Column)?);
            }
            out.push(vals);
        }
        Ok(Rows { columns, rows: out })
    }
}

#[derive(Debug)]
pub struct WriteResult {
    pub rows: Rows,
    pub rows_affected: u64,
    pub lsn: u64,
}

/// `16/B374D848` → u64.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

/// A logical PostgreSQL database on one shard: its primary and replicas.
pub type PgDatabase = super::pool::ReplicaSet<PgEndpoint>;

impl PgDatabase {
    /// A replica fit for reads now (healthy, in recovery, within the lag bounds), in rotation.
    pub fn pick_replica(&self, max_lag_ms: u64, max_lag_bytes: u64) -> Option<Arc<PgEndpoint>> {
        self.pick_replica_where(|r| r.health.readable(max_lag_ms, max_lag_bytes))
    }
}

/// Column types are reported by name (`int4`, `text`, …): re-exported for callers.
pub fn column_type_name(t: &Type) -> &str {
    pg_types::type_name(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        for s in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/1"] {
            assert_eq!(format_lsn(parse_lsn(s).unwrap()), s);
        }
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
        assert_eq!(parse_lsn("1/zz"), None);
    }
}
