//! PostgreSQL backend: a bb8 pool per endpoint (bb8-postgres underneath, plus a per-connection
//! prepared-statement cache), statements under a deadline, read-only replica sessions, plain
//! reads pipelined over read-only shared connections (skipping stalled ones), results streamed
//! into JSON under the result limits, abandoned reads cancelled at the server.
//! Knows nothing of HTTP or routing; never formats a connection string.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use serde_json::Value;
use tokio::time::Instant;
use tokio_postgres::Statement;
use tokio_postgres::types::Type;

use super::health::EndpointHealth;
pub mod prober;
pub mod tls;
pub mod types;

use super::{BackendError, Role};
use crate::config;
use crate::shardmap::Secret;
use types as pg_types;

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
    inner: PostgresConnectionManager<tls::Connector>,
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
    /// The TLS connector of this endpoint's `sslmode` / `sslrootcert` (every connection uses it).
    pub(crate) tls: tls::Connector,
    checkout_timeout: Duration,
    /// SHA-256 of the connection string: identifies the endpoint across reloads without
    /// keeping the secret text around.
    pub key: [u8; 32],
    /// The health prober's own connection. Lives with the endpoint, not the probe task, so a
    /// reload that reuses the endpoint does not pay a new connect (and SCRAM) per probe task.
    pub(crate) probe_client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Shared connections for plain reads (None when `pipeline_connections = 0`).
    pipeline: Option<Pipeline>,
    /// `pg_config` plus a read-only session: what shared read connections connect with.
    read_config: tokio_postgres::Config,
    limits: ResultLimits,
}

/// How large one statement's result may grow (`[limits]`), checked while rows stream in.
#[derive(Debug, Clone, Copy)]
pub struct ResultLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
}

/// Plain reads (autocommit, no replay wait) pipelined over a few shared connections.
///
/// Why: with an exclusive pooled connection per read, every read costs its own send and recv on
/// the backend socket and a wake-up of its own connection task. tokio-postgres multiplexes
/// concurrent requests on one `Client`: the connection task writes every queued request with one
/// send and reads many responses with one recv, so under load the per-read syscall and
/// scheduling cost falls with the queue depth.
///
/// Sharing is safe only because nothing can change a shared session: the connections are
/// read-only at the session level (`default_transaction_read_only`, set at connect), and the
/// data plane refuses session statements and session-changing functions before any backend is
/// touched (`sqlclass`). Responses come back in order, so one slow statement delays every read
/// queued behind it: each connection keeps its reads in flight in order, a connection whose
/// oldest read is older than `pipeline_stall_ms` gets no new reads, and when every connection is
/// stalled a read takes an exclusive pooled connection instead.
struct Pipeline {
    slots: Vec<tokio::sync::Mutex<Option<Arc<SharedConn>>>>,
    /// Bounds reads in flight over all slots (connections × depth).
    permits: tokio::sync::Semaphore,
    stall: Duration,
}

struct SharedConn {
    client: tokio_postgres::Client,
    stmts: std::sync::Mutex<StmtCache>,
    /// Reads in flight, oldest first (responses arrive in this order): (sequence, started).
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, Instant)>>,
    seq: std::sync::atomic::AtomicU64,
}

impl SharedConn {
    /// (reads in flight, whether the oldest started longer than `stall` before `now`).
    fn load(&self, now: Instant, stall: Duration) -> (usize, bool) {
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        (q.len(), q.front().is_some_and(|(_, t)| now.saturating_duration_since(*t) > stall))
    }

    fn enter(conn: Arc<SharedConn>) -> Queued {
        let seq = conn.seq.fetch_add(1, Ordering::Relaxed);
        conn.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back((seq, Instant::now()));
        Queued { conn, seq }
    }
}

/// One read's place in a shared connection's queue; leaves it however the read ends.
struct Queued {
    conn: Arc<SharedConn>,
    seq: u64,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut q = self.conn.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.iter().position(|(s, _)| *s == self.seq) {
            q.remove(i);
        }
    }
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
    /// `min_tls`: the weakest `sslmode` allowed (`[tls] backends`).
    pub fn new(
        conn: &Secret,
        role: Role,
        pool: &config::Pool,
        limits: &config::Limits,
        min_tls: config::SslMode,
    ) -> Result<Self, String> {
        // The server enforces the request deadline too, so an abandoned statement cannot run on.
        let statement_timeout = Duration::from_millis(limits.request_timeout_ms);
        // Neither tokio_postgres' parse errors nor ours echo values.
        let tls::ConnInfo { config: mut cfg, tls } = tls::parse(conn.expose()).map_err(|e| e.to_string())?;
        tls.check_minimum(min_tls).map_err(|e| e.to_string())?;
        let connector = tls.connector().map_err(|e| e.to_string())?;
        let label: Arc<str> = Arc::from(endpoint_label(&cfg));
        cfg.connect_timeout(Duration::from_millis(pool.connect_timeout_ms));
        cfg.application_name("cellgate");
        let mut opts = format!("-c statement_timeout={}", statement_timeout.as_millis());
        if role == Role::Replica {
            // Replicas serve reads only: a write sent there by mistake fails in the server.
            opts.push_str(" -c default_transaction_read_only=on");
        }
        cfg.options(&opts);
        let mut read_config = cfg.clone();
        if role == Role::Primary {
            read_config.options(format!("{opts} -c default_transaction_read_only=on"));
        }
        let health = Arc::new(EndpointHealth::new(role));
        let manager = PgManager { inner: PostgresConnectionManager::new(cfg.clone(), connector.clone()) };
        let pool_obj = super::pool::builder(pool, &label, &health).build_unchecked(manager);
        let pipeline = (pool.pipeline_connections > 0).then(|| Pipeline {
            slots: (0..pool.pipeline_connections).map(|_| tokio::sync::Mutex::new(None)).collect(),
            stall: Duration::from_millis(pool.pipeline_stall_ms),
            permits: tokio::sync::Semaphore::new(
                (pool.pipeline_connections as usize)
                    .saturating_mul(pool.pipeline_depth.max(1) as usize)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            ),
        });
        Ok(Self {
            pipeline,
            read_config,
            limits: ResultLimits { max_rows: limits.max_result_rows, max_bytes: limits.max_result_bytes },
            probe_client: tokio::sync::Mutex::new(None),
            key: super::pool::conn_key(conn),
            label,
            role,
            pool: pool_obj,
            health,
            pg_config: cfg,
            tls: connector,
            checkout_timeout: Duration::from_millis(pool.checkout_timeout_ms),
        })
    }

    /// Open a fresh connection and run a trivial query (reload pre-check).
    pub async fn check(&self) -> Result<(), String> {
        let (client, conn) =
            self.pg_config.connect(self.tls.clone()).await.map_err(|e| crate::backend::error_chain(&e))?;
        let task = crate::tasks::spawn("pg_check_connection", conn);
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
        let reason = super::error_chain(&e);
        self.health.note_error(&reason);
        self.health.request_recheck();
        BackendError::Unavailable { endpoint: self.label.to_string(), reason }
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
            match self.query_pipelined(p, sql, params).await {
                Err(Stalled) => {}
                Ok(r) => return r.map(Some),
            }
        }
        // Boxed: the exclusive path (checkout, replay wait) is the rare one when pipelining is
        // on; inline it would size every parked read's future.
        Box::pin(self.query_exclusive(sql, params, min_lsn)).await
    }

    /// A read on a pooled connection of its own, inside `BEGIN READ ONLY` (the pool also serves
    /// writes, so the session itself cannot be read-only). If the read is abandoned (deadline),
    /// the statement is cancelled at the server and the connection is not reused.
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
        let cancel = CancelOnDrop::new(&conn.client, &self.tls);
        // Pipelined: BEGIN, the statement and COMMIT leave in one write. If the statement
        // fails, the COMMIT of the aborted transaction rolls back without an error.
        let begin = conn.client.batch_execute("BEGIN READ ONLY");
        let rows = async {
            let r = collect(&conn.client, &stmt, &bound, self.limits).await;
            // Over the limits: stop the statement now, before COMMIT's answer (which queues
            // behind the rest of the rows) is awaited.
            if matches!(r, Err(Collect::Limit(_))) {
                cancel_query(conn.client.cancel_token(), &self.tls);
            }
            r
        };
        let commit = conn.client.batch_execute("COMMIT");
        let (b, rows, c) = futures_util::join!(begin, rows, commit);
        b.map_err(|e| self.classify(e))?;
        let rows = match rows {
            Ok((rows, _)) => rows,
            // The statement ended with an error, or was cancelled above: nothing left to cancel.
            Err(e) => {
                cancel.disarm();
                return Err(self.collect_error(e));
            }
        };
        c.map_err(|e| self.classify(e))?;
        cancel.disarm();
        conn.busy = false;
        Ok(Some(rows))
    }

    /// A read on the least-loaded shared connection that is not stalled; `Err(Stalled)` when
    /// every shared connection is (the caller takes an exclusive one).
    async fn query_pipelined(
        &self,
        p: &Pipeline,
        sql: &str,
        params: &[Value],
    ) -> Result<Result<Rows, BackendError>, Stalled> {
        let _permit = match tokio::time::timeout(self.checkout_timeout, p.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            // Closed never happens (the semaphore is never closed); treat it like a full queue.
            Ok(Err(_)) | Err(_) => return Ok(Err(BackendError::Overloaded { endpoint: self.label.to_string() })),
        };
        // Counted in the connection's queue from the moment it is chosen (before the prepare's
        // round trip), so a burst of reads spreads over the connections instead of all picking
        // the one that looked idle.
        let queued = match self.pick_shared(p).await {
            Ok(Some(c)) => SharedConn::enter(c),
            Ok(None) => return Err(Stalled),
            Err(e) => return Ok(Err(e)),
        };
        Ok(self.run_shared(&queued.conn, sql, params).await)
    }

    async fn run_shared(&self, conn: &SharedConn, sql: &str, params: &[Value]) -> Result<Rows, BackendError> {
        let stmt = conn.prepare(sql).await.map_err(|e| self.classify(e))?;
        let bound = pg_types::bind_params(stmt.params(), params).map_err(BackendError::Params)?;
        let r = collect(&conn.client, &stmt, &bound, self.limits).await;
        if matches!(r, Err(Collect::Limit(_))) {
            // This statement is the one streaming rows (at the head of the connection), so the
            // cancel stops it; the rows already sent are discarded by the connection task.
            cancel_query(conn.client.cancel_token(), &self.tls);
        }
        r.map(|(rows, _)| rows).map_err(|e| self.collect_error(e))
    }

    /// Why collecting a result stopped, as a backend error.
    fn collect_error(&self, e: Collect) -> BackendError {
        match e {
            Collect::Db(e) => self.classify(e),
            Collect::Limit(e) => e,
        }
    }

    /// The shared connection a new read should queue on: the least loaded one whose oldest read
    /// is younger than the stall bound; a new connection while every open one is busy and a slot
    /// is free; one being connected when nothing else fits; `None` when all are stalled.
    async fn pick_shared(&self, p: &Pipeline) -> Result<Option<Arc<SharedConn>>, BackendError> {
        let now = Instant::now();
        let mut best: Option<(usize, Arc<SharedConn>)> = None;
        let mut free_slot = None;
        let mut connecting = None;
        for (i, slot) in p.slots.iter().enumerate() {
            // A slot being connected is skipped here; it is waited for only if nothing else fits.
            let Ok(guard) = slot.try_lock() else {
                connecting.get_or_insert(i);
                continue;
            };
            match guard.as_ref() {
                Some(c) if !c.client.is_closed() => {
                    let (queued, stalled) = c.load(now, p.stall);
                    if stalled {
                        continue;
                    }
                    if best.as_ref().is_none_or(|(n, _)| queued < *n) {
                        best = Some((queued, c.clone()));
                    }
                }
                _ => {
                    free_slot.get_or_insert(i);
                }
            }
        }
        match (best, free_slot, connecting) {
            (Some((0, c)), _, _) | (Some((_, c)), None, _) => Ok(Some(c)),
            (_, Some(i), _) => self.shared_conn(p, i).await.map(Some),
            // A slot that was locked when looked at may be connecting, or only briefly held by
            // another read's look: once it is ours, it must pass the stall test too.
            (None, None, Some(i)) => {
                let c = self.shared_conn(p, i).await?;
                let stalled = c.load(Instant::now(), p.stall).1;
                Ok((!stalled).then_some(c))
            }
            (None, None, None) => Ok(None),
        }
    }

    /// Slot `i`'s shared connection, opened or re-opened if needed. The slot lock is held
    /// across the connect so concurrent reads wait for one connect instead of racing.
    async fn shared_conn(&self, p: &Pipeline, i: usize) -> Result<Arc<SharedConn>, BackendError> {
        let mut slot = p.slots[i].lock().await;
        if let Some(c) = slot.as_ref()
            && !c.client.is_closed()
        {
            return Ok(c.clone());
        }
        // Boxed: a connect (startup, SCRAM) is rare and its state is large; inline it would
        // size every pipelined read's future.
        let connect = Box::pin(self.read_config.connect(self.tls.clone()));
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
        crate::tasks::spawn("pg_shared_connection", async move {
            if let Err(e) = connection.await {
                tracing::debug!(endpoint = %label, error = %e, "shared read connection closed");
            }
        });
        let c = Arc::new(SharedConn {
            client,
            stmts: std::sync::Mutex::default(),
            queue: std::sync::Mutex::default(),
            seq: std::sync::atomic::AtomicU64::new(0),
        });
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
                // Writes are not cut off by the result limits: the COMMIT is already on its way,
                // so stopping the statement could not tell the client whether it committed.
                collect(&conn.client, stmt, bound, ResultLimits::NONE),
                async { if closes { conn.client.batch_execute("COMMIT").await } else { Ok(()) } },
                async { if closes { conn.client.query_one(&lsn_stmt, &[]).await.map(Some) } else { Ok(None) } },
            )
            .await;
            match began.map_err(Collect::Db).and(ran) {
                Ok((rows, n)) => {
                    affected += n;
                    last = Some(rows);
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
                    return Err(self.collect_error(e).in_statement(i, stmts.len()));
                }
            }
        }
        let lsn_row = match lsn_row {
            Some(row) => row,
            None => conn.client.query_one(&lsn_stmt, &[]).await.map_err(|e| self.classify(e))?,
        };
        conn.busy = false;
        let lsn = parse_lsn(lsn_row.get::<_, &str>(0)).unwrap_or(0);
        let rows = last.expect("at least one statement");
        Ok(WriteResult { rows, rows_affected: affected, lsn })
    }
}

/// Every shared connection is stalled: take an exclusive one.
struct Stalled;

/// Why collecting a result stopped.
enum Collect {
    Db(tokio_postgres::Error),
    /// Over `ResultLimits` (or a column that cannot be converted): the statement should stop.
    Limit(BackendError),
}

impl ResultLimits {
    pub const NONE: ResultLimits = ResultLimits { max_rows: usize::MAX, max_bytes: usize::MAX };
}

/// Run a prepared statement and convert its rows to JSON as they stream in, stopping at the
/// first row over `limits` (the result is never buffered past them). Returns the rows and the
/// rows affected.
async fn collect(
    client: &tokio_postgres::Client,
    stmt: &Statement,
    bound: &[pg_types::PgParam],
    limits: ResultLimits,
) -> Result<(Rows, u64), Collect> {
    use futures_util::TryStreamExt;
    let stream = client.query_raw(stmt, pg_types::as_sql_refs(bound)).await.map_err(Collect::Db)?;
    futures_util::pin_mut!(stream);
    let columns =
        stmt.columns().iter().map(|c| (c.name().to_string(), pg_types::type_name(c.type_()).to_string())).collect();
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = stream.try_next().await.map_err(Collect::Db)? {
        if out.len() >= limits.max_rows {
            return Err(Collect::Limit(BackendError::ResultTooLarge(format!(
                "more than {} rows (limits.max_result_rows)",
                limits.max_rows
            ))));
        }
        let mut vals = Vec::with_capacity(row.len());
        // The row's own vector, then each value.
        bytes = bytes.saturating_add(std::mem::size_of::<Vec<Value>>());
        for i in 0..row.len() {
            let v = pg_types::column_to_json(&row, i).map_err(|e| Collect::Limit(BackendError::Column(e)))?;
            bytes = bytes.saturating_add(json_size(&v));
            vals.push(v);
        }
        if bytes > limits.max_bytes {
            return Err(Collect::Limit(BackendError::ResultTooLarge(format!(
                "more than {} bytes (limits.max_result_bytes)",
                limits.max_bytes
            ))));
        }
        out.push(vals);
    }
    let n = stream.rows_affected().unwrap_or(out.len() as u64);
    Ok((Rows { columns, rows: out }, n))
}

/// Roughly the memory a JSON value holds while the result is collected (its `Value` slot plus
/// what it owns on the heap): what the result limit counts, so the limit bounds cellgate's
/// memory, not only the answer's size. Cheap: lengths, no formatting.
fn json_size(v: &Value) -> usize {
    const SLOT: usize = std::mem::size_of::<Value>();
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => SLOT,
        Value::String(s) => SLOT + s.capacity(),
        Value::Array(a) => SLOT + a.iter().map(json_size).sum::<usize>(),
        Value::Object(o) => SLOT + o.iter().map(|(k, x)| k.capacity() + SLOT + json_size(x)).sum::<usize>(),
    }
}

/// Cancels the statement running on a connection at the server unless disarmed: an abandoned
/// exclusive read (the request's deadline dropped its future) must not keep running there.
struct CancelOnDrop {
    token: Option<(tokio_postgres::CancelToken, tls::Connector)>,
}

impl CancelOnDrop {
    fn new(client: &tokio_postgres::Client, tls: &tls::Connector) -> Self {
        Self { token: Some((client.cancel_token(), tls.clone())) }
    }

    fn disarm(mut self) {
        self.token = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some((token, tls)) = self.token.take() {
            cancel_query(token, &tls);
        }
    }
}

/// Ask the server to cancel what the token's connection is running (a new connection of its
/// own, over the endpoint's TLS setting; nothing waits for it).
fn cancel_query(token: tokio_postgres::CancelToken, tls: &tls::Connector) {
    let tls = tls.clone();
    crate::tasks::spawn("pg_cancel", async move {
        let _ = token.cancel_query(tls).await;
    });
}

/// Result rows, column-major metadata plus row-major values (arrays; object form is rendered
/// at serialisation time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub columns: Vec<(String, String)>,
    pub rows: Vec<Vec<Value>>,
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
