//! MongoDB backend: one driver `Client` per shard database (the driver discovers the replica set
//! and pools connections), the URI's TLS level against `[tls] backends`, operations under the
//! request deadline, errors classified once into `BackendError`. Knows nothing of HTTP or
//! routing; never formats the connection string.

pub mod ejson;
pub mod fence;
pub mod guard;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bson::{Bson, Document, Timestamp, doc};
use mongodb::error::{Error as DriverError, ErrorKind, WriteFailure};
use mongodb::options::{
    ClientOptions, ConnectionString, FindOptions, HostInfo, ReadPreference, ReadPreferenceOptions, SelectionCriteria,
    ServerAddress, ServerMonitoringMode, Tls, UpdateModifications,
};
use mongodb::{Client, ClientSession};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::BackendError;
use crate::config;
use crate::shardmap::Secret;

/// The driver (and the server) refuse `maxStalenessSeconds` below 90 s (server-selection spec:
/// max(90 s, heartbeat + 10 s idle-write period); the heartbeat stays at its 10 s default).
pub const MIN_MAX_STALENESS: Duration = Duration::from_secs(90);

/// Server error codes that mean "this member is not (any longer) the writable primary".
const NOT_PRIMARY_CODES: &[i32] = &[10107, 13435, 11602, 189, 91];

/// Which members a read may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `secondaryPreferred` within the staleness bound.
    Replica,
    Primary,
}

/// How one read runs: the members it may use, the operation time it must observe (a
/// read-your-writes token for this shard), and its deadline.
#[derive(Debug, Clone, Copy)]
pub struct ReadOpts {
    pub mode: ReadMode,
    pub after: Option<Timestamp>,
    pub deadline: Instant,
}

#[derive(Debug, Default)]
pub struct FindQuery {
    pub filter: Document,
    pub projection: Option<Document>,
    pub sort: Option<Document>,
    pub skip: u64,
    pub limit: Option<u64>,
}

/// What one per-shard insert did: the ids that landed (in order) and, if it stopped early, why.
#[derive(Debug)]
pub struct InsertOutcome {
    pub inserted_ids: Vec<Bson>,
    pub error: Option<BackendError>,
    pub op_time: Option<Timestamp>,
}

#[derive(Debug)]
pub struct UpdateOutcome {
    pub matched: u64,
    pub modified: u64,
    pub upserted_id: Option<Bson>,
    pub op_time: Option<Timestamp>,
}

/// Token value of an operation time: seconds in the high 32 bits, increment in the low ones.
pub fn op_time_to_u64(t: Timestamp) -> u64 {
    (u64::from(t.time) << 32) | u64::from(t.increment)
}

pub fn op_time_from_u64(v: u64) -> Timestamp {
    Timestamp { time: (v >> 32) as u32, increment: v as u32 }
}

/// Why a MongoDB URI was refused when the map was built. Never carries the URI or a password.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// The driver's own message, with the URI and password removed.
    #[error("invalid MongoDB connection string: {0}")]
    Invalid(String),
    /// The driver is built with rustls (aws-lc), whose certificate check cannot skip only the
    /// host name: the driver rejects the option, so say what to use instead.
    #[error(
        "tlsAllowInvalidHostnames is not supported by cellgate's MongoDB driver (rustls): use tlsCAFile with a \
         server certificate that names the host (verify-full), or tlsAllowInvalidCertificates=true (require: \
         no certificate or host name check)"
    )]
    InvalidHostnames,
    /// A `tlsCAFile` / `tlsCertificateKeyFile` that cannot be used: its path and what is wrong,
    /// never its content.
    #[error("{what} {path}: {reason}")]
    File { what: &'static str, path: String, reason: String },
    #[error("MongoDB {} counts as sslmode={}, weaker than the minimum [tls] backends = \"{}\"", .tls.describe(), .tls.level().as_str(), .min.as_str())]
    BelowMinimum { tls: UriTls, min: config::SslMode },
}

/// What a URI's TLS options make the driver do (rustls on aws-lc; the driver reads `tlsCAFile`
/// and `tlsCertificateKeyFile` itself when it builds its client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriTls {
    /// `tls`/`ssl` false or absent on `mongodb://`: plaintext.
    Off,
    /// TLS with any certificate accepted (`tlsInsecure` or `tlsAllowInvalidCertificates`): the
    /// chain and the host name go unchecked.
    Unverified,
    /// TLS (`tls=true`, any `tlsCAFile`/`tlsCertificateKeyFile`, or `mongodb+srv://`): the chain
    /// must lead to `tlsCAFile` (else the driver's bundled Mozilla roots) and name the host.
    Verified,
}

impl UriTls {
    pub fn of(conn: &ConnectionString) -> UriTls {
        match &conn.tls {
            Some(Tls::Enabled(o)) if o.allow_invalid_certificates == Some(true) => UriTls::Unverified,
            Some(Tls::Enabled(_)) => UriTls::Verified,
            Some(Tls::Disabled) | None => UriTls::Off,
        }
    }

    /// The libpq `sslmode` it is as strong as, which `[tls] backends` compares. There is no
    /// `prefer` (the driver never falls back to plaintext) and no `verify-ca` (see
    /// [`UriError::InvalidHostnames`]).
    pub fn level(self) -> config::SslMode {
        match self {
            UriTls::Off => config::SslMode::Disable,
            UriTls::Unverified => config::SslMode::Require,
            UriTls::Verified => config::SslMode::VerifyFull,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            UriTls::Off => "without TLS (no tls=true)",
            UriTls::Unverified => "TLS without certificate checks (tlsInsecure or tlsAllowInvalidCertificates)",
            UriTls::Verified => "verified TLS",
        }
    }
}

/// Parse a URI as the driver will (no I/O: `mongodb+srv` is resolved when the client is built).
pub fn parse_uri(uri: &Secret) -> Result<ConnectionString, UriError> {
    ConnectionString::parse(uri.expose()).map_err(|e| {
        if asks_invalid_hostnames(uri.expose()) {
            UriError::InvalidHostnames
        } else {
            UriError::Invalid(scrub(&e.to_string(), uri, None))
        }
    })
}

/// Read the TLS files a URI names now, as the driver will when it connects, so a missing or
/// unusable file refuses the map (startup, reload) with its name instead of failing every
/// connection later with a bare I/O error.
fn check_tls_files(conn: &ConnectionString) -> Result<(), UriError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(Tls::Enabled(o)) = &conn.tls else { return Ok(()) };
    let err = |what, path: &std::path::Path, reason: String| UriError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = |what, path: &std::path::Path| {
        let n = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(what, path, e.to_string()))?
            .filter(Result::is_ok)
            .count();
        if n == 0 { Err(err(what, path, "no PEM certificate in the file".into())) } else { Ok(()) }
    };
    if let Some(path) = &o.ca_file_path {
        certs("tlsCAFile", path)?;
    }
    if let Some(path) = &o.cert_key_file_path {
        // The driver wants the certificate and its key in this one file.
        certs("tlsCertificateKeyFile", path)?;
        PrivateKeyDer::from_pem_file(path)
            .map_err(|e| err("tlsCertificateKeyFile", path, format!("private key: {e}")))?;
    }
    Ok(())
}

/// Does a driver message say the server dropped the connection (reset, closed, end of file)?
/// What a TLS-only server does to a plaintext client, so worth a hint when the URI has no TLS.
fn dropped_connection(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    ["reset by peer", "end of file", "connection closed", "broken pipe"].iter().any(|w| m.contains(w))
}

/// Does the query string set `tlsAllowInvalidHostnames` (keys are case-insensitive)? Only picks
/// the message for a URI the driver refused.
fn asks_invalid_hostnames(uri: &str) -> bool {
    uri.rsplit_once('?').is_some_and(|(_, q)| {
        q.split('&').any(|p| p.split('=').next().is_some_and(|k| k.eq_ignore_ascii_case("tlsAllowInvalidHostnames")))
    })
}

/// The hosts a URI points at: TCP host names or addresses, or the SRV name (Unix sockets are
/// local and left out). For `cellgate map check`'s loopback test.
pub fn hosts(conn: &ConnectionString) -> Vec<String> {
    match &conn.host_info {
        HostInfo::HostIdentifiers(h) => h
            .iter()
            .filter_map(|a| match a {
                ServerAddress::Tcp { host, .. } => Some(host.clone()),
                _ => None,
            })
            .collect(),
        HostInfo::DnsRecord(name) => vec![name.clone()],
        _ => Vec::new(),
    }
}

/// Hosts and database, never credentials (`h1:27017,h2:27017/profiles`); `logical` when the
/// URI names no database.
pub fn label_of(conn: &ConnectionString, logical: &str) -> String {
    let hosts = match &conn.host_info {
        HostInfo::HostIdentifiers(h) => h.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
        HostInfo::DnsRecord(name) => format!("srv:{name}"),
        _ => "unknown".into(),
    };
    format!("{hosts}/{}", conn.default_database.as_deref().unwrap_or(logical))
}

/// Driver settings derived from the process config.
#[derive(Debug, Clone)]
struct Settings {
    max_pool: u32,
    min_pool: u32,
    connect_timeout: Duration,
    selection_timeout: Duration,
    max_idle: Duration,
    max_staleness: Duration,
}

/// One shard's MongoDB database.
pub struct MongoDatabase {
    /// Hosts and database, never credentials (`h1:27017,h2:27017/profiles`).
    pub label: Arc<str>,
    /// SHA-256 of the URI and database name: identifies the database across reloads without
    /// keeping the secret text in a comparable form.
    pub key: [u8; 32],
    db_name: String,
    /// Parsed, not yet resolved (`mongodb+srv` does DNS when the client is built). Holds the
    /// password: never formatted.
    conn: ConnectionString,
    password: Option<String>,
    tls: UriTls,
    settings: Settings,
    /// Built on first use or by the warm-up task, whichever comes first; a failed build (DNS)
    /// is retried by the next caller.
    client: tokio::sync::OnceCell<Client>,
    /// The warm-up attempt finished (successfully or not): readiness waits for it.
    warmed: AtomicBool,
    up: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
    /// The last fence read (write path, `fence.rs`) and the lock that makes it one at a time.
    fence_cache: std::sync::Mutex<Option<fence::FenceView>>,
    fence_refresh: tokio::sync::Mutex<()>,
}

/// What the admin plane shows of a database.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MongoStatus {
    pub endpoint: String,
    pub database: String,
    pub warmed: bool,
    pub up: bool,
    pub last_error: Option<String>,
}

impl MongoDatabase {
    pub fn key_of(uri: &Secret, db: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(uri.expose().as_bytes());
        h.update([0]);
        h.update(db.as_bytes());
        h.finalize().into()
    }

    /// Validate the URI and prepare the database; no I/O (the client is built lazily).
    /// `logical` is the map's database name, used when the URI names no database; `min_tls` the
    /// weakest TLS allowed (`[tls] backends`, see [`UriTls::level`]).
    pub fn new(
        uri: &Secret,
        logical: &str,
        pool: &config::Pool,
        health: &config::Health,
        min_tls: config::SslMode,
    ) -> Result<MongoDatabase, UriError> {
        let conn = parse_uri(uri)?;
        let tls = UriTls::of(&conn);
        if tls.level() < min_tls {
            return Err(UriError::BelowMinimum { tls, min: min_tls });
        }
        check_tls_files(&conn)?;
        let password = conn.credential.as_ref().and_then(|c| c.password.clone()).filter(|p| !p.is_empty());
        let db_name = conn.default_database.clone().unwrap_or_else(|| logical.to_string());
        let settings = Settings {
            max_pool: pool.max_size,
            min_pool: pool.min_idle.min(pool.max_size),
            connect_timeout: Duration::from_millis(pool.connect_timeout_ms),
            selection_timeout: Duration::from_millis(pool.checkout_timeout_ms),
            max_idle: Duration::from_secs(pool.idle_timeout_s),
            max_staleness: Duration::from_millis(health.max_lag_ms).max(MIN_MAX_STALENESS),
        };
        Ok(MongoDatabase {
            label: Arc::from(label_of(&conn, logical)),
            key: Self::key_of(uri, logical),
            db_name,
            conn,
            password,
            tls,
            settings,
            client: tokio::sync::OnceCell::new(),
            warmed: AtomicBool::new(false),
            up: AtomicBool::new(false),
            last_error: std::sync::Mutex::new(None),
            fence_cache: std::sync::Mutex::new(None),
            fence_refresh: tokio::sync::Mutex::new(()),
        })
    }

    pub fn database_name(&self) -> &str {
        &self.db_name
    }

    /// The staleness bound replica reads carry (`health.max_lag_ms`, at least 90 s).
    pub fn max_staleness(&self) -> Duration {
        self.settings.max_staleness
    }

    pub fn warmed(&self) -> bool {
        self.warmed.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> MongoStatus {
        MongoStatus {
            endpoint: self.label.to_string(),
            database: self.db_name.clone(),
            warmed: self.warmed(),
            up: self.up.load(Ordering::Relaxed),
            last_error: self.last_error.lock().map(|e| e.clone()).unwrap_or(None),
        }
    }

    async fn client(&self) -> Result<&Client, BackendError> {
        self.client
            .get_or_try_init(|| async {
                // The URI was validated at build; what can fail here is SRV/TXT resolution or
                // what it returned: the shard is unreachable, never the request's fault.
                let unreachable = |e: DriverError| match self.classify(e) {
                    e @ BackendError::Unavailable { .. } => e,
                    other => BackendError::Unavailable {
                        endpoint: self.label.to_string(),
                        reason: scrub_pw(&format!("cannot build the client: {other}"), self.password.as_deref()),
                    },
                };
                let mut o = ClientOptions::parse(self.conn.clone()).await.map_err(unreachable)?;
                let s = &self.settings;
                o.app_name = Some("cellgate".into());
                o.max_pool_size = Some(s.max_pool);
                // Connections the driver keeps open in the background, so a first burst of
                // requests does not pay the cold-pool connect (and auth handshake) cost.
                o.min_pool_size = Some(s.min_pool);
                o.connect_timeout = Some(s.connect_timeout);
                // A request waits this long for a usable member (then 503), not the driver's 30 s.
                o.server_selection_timeout = Some(s.selection_timeout);
                o.max_idle_time = Some(s.max_idle);
                // The streaming monitor sends awaitable `hello`s and re-sends as soon as one is
                // answered; a server that answers at once instead of waiting (CongoDB) turns that
                // into thousands of hellos a second and most of a core, idle. Polling checks once
                // per heartbeat (10 s default) whatever the server does; failover is still noticed
                // at once when an operation gets a "not primary" error. A URI may still ask for
                // `serverMonitoringMode=stream`.
                if o.server_monitoring_mode.is_none() {
                    o.server_monitoring_mode = Some(ServerMonitoringMode::Poll);
                }
                Client::with_options(o).map_err(unreachable)
            })
            .await
    }

    /// Build the client and ping the primary, bounded by connect + server-selection timeouts.
    /// Never fails: a down shard is recorded and left to the requests (and readiness proceeds).
    pub async fn warm(&self) {
        if let Err(e) = self.check().await {
            tracing::warn!(endpoint = %self.label, error = %e, "MongoDB warm-up failed; requests will retry");
        }
        self.warmed.store(true, Ordering::Relaxed);
    }

    /// Build the client and ping the primary within connect + server-selection timeouts (warm-up
    /// and the reload pre-check). The driver gives up on server selection first and says why
    /// (refused, TLS handshake, certificate); a shorter deadline would only say "timed out".
    pub async fn check(&self) -> Result<(), String> {
        let budget = self.settings.connect_timeout + self.settings.selection_timeout;
        self.ping(Instant::now() + budget).await.map_err(|e| match e {
            BackendError::Timeout => format!("no answer within {budget:?}"),
            e => e.to_string(),
        })
    }

    /// `ping` on the primary.
    pub async fn ping(&self, deadline: Instant) -> Result<(), BackendError> {
        self.run(deadline, async {
            let c = self.client().await?;
            c.database(&self.db_name)
                .run_command(doc! {"ping": 1})
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .await
                .map_err(|e| self.classify(e))?;
            Ok(())
        })
        .await
    }

    /// Run `op` under the deadline and keep the up/last-error view current.
    async fn run<T>(
        &self,
        deadline: Instant,
        op: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let r = match tokio::time::timeout_at(deadline, op).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout),
        };
        match &r {
            Ok(_) => self.up.store(true, Ordering::Relaxed),
            Err(BackendError::Unavailable { reason, .. }) => {
                self.up.store(false, Ordering::Relaxed);
                if let Ok(mut l) = self.last_error.lock() {
                    *l = Some(reason.clone());
                }
            }
            Err(_) => {}
        }
        r
    }

    async fn session(&self, client: &Client, after: Option<Timestamp>) -> Result<ClientSession, BackendError> {
        // A causally consistent session that has seen `after` makes the server (any member)
        // wait until it has applied that operation time before answering.
        let mut s = client.start_session().causal_consistency(after.is_some()).await.map_err(|e| self.classify(e))?;
        if let Some(t) = after {
            s.advance_operation_time(t);
        }
        Ok(s)
    }

    fn criteria(&self, mode: ReadMode) -> SelectionCriteria {
        SelectionCriteria::ReadPreference(match mode {
            ReadMode::Primary => ReadPreference::Primary,
            ReadMode::Replica => ReadPreference::SecondaryPreferred {
                options: Some(ReadPreferenceOptions::builder().max_staleness(self.settings.max_staleness).build()),
            },
        })
    }

    /// Server-side time limit: what is left of the deadline, so an abandoned query stops there.
    fn max_time(deadline: Instant) -> Duration {
        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
    }

    pub async fn find(&self, coll: &str, q: FindQuery, r: ReadOpts) -> Result<Vec<Document>, BackendError> {
        self.run(r.deadline, async {
            let c = self.client().await?;
            let mut s = self.session(c, r.after).await?;
            let limit = match q.limit {
                Some(l) => Some(i64::try_from(l).map_err(|_| BackendError::BadInput("limit is too large".into()))?),
                None => None,
            };
            let mut o = FindOptions::default();
            o.projection = q.projection;
            o.sort = q.sort;
            o.skip = Some(q.skip).filter(|s| *s > 0);
            o.limit = limit;
            o.selection_criteria = Some(self.criteria(r.mode));
            o.max_time = Some(Self::max_time(r.deadline));
            let cur = c
                .database(&self.db_name)
                .collection::<Document>(coll)
                .find(q.filter)
                .with_options(o)
                .session(&mut s)
                .await
                .map_err(|e| self.classify(e))?;
            self.drain(cur, &mut s).await
        })
        .await
    }

    /// Every document of a session cursor (getMore batches included), in order.
    async fn drain(
        &self,
        mut cur: mongodb::SessionCursor<Document>,
        s: &mut ClientSession,
    ) -> Result<Vec<Document>, BackendError> {
        let mut out = Vec::new();
        while let Some(d) = cur.next(s).await {
            out.push(d.map_err(|e| self.classify(e))?);
        }
        Ok(out)
    }

    pub async fn aggregate(
        &self,
        coll: &str,
        pipeline: Vec<Document>,
        r: ReadOpts,
    ) -> Result<Vec<Document>, BackendError> {
        self.run(r.deadline, async {
            let c = self.client().await?;
            let mut s = self.session(c, r.after).await?;
            let cur = c
                .database(&self.db_name)
                .collection::<Document>(coll)
                .aggregate(pipeline)
                .selection_criteria(self.criteria(r.mode))
                .max_time(Self::max_time(r.deadline))
                .session(&mut s)
                .await
                .map_err(|e| self.classify(e))?;
            self.drain(cur, &mut s).await
        })
        .await
    }

    pub async fn count(&self, coll: &str, filter: Document, r: ReadOpts) -> Result<u64, BackendError> {
        self.run(r.deadline, async {
            let c = self.client().await?;
            let mut s = self.session(c, r.after).await?;
            c.database(&self.db_name)
                .collection::<Document>(coll)
                .count_documents(filter)
                .selection_criteria(self.criteria(r.mode))
                .max_time(Self::max_time(r.deadline))
                .session(&mut s)
                .await
                .map_err(|e| self.classify(e))
        })
        .await
    }

    /// Ordered insert on the primary. Documents without `_id` get an ObjectId here, so the
    /// outcome can name exactly which ones landed before a failure.
    pub async fn insert(&self, coll: &str, mut docs: Vec<Document>, deadline: Instant) -> InsertOutcome {
        let ids: Vec<Bson> = docs
            .iter_mut()
            .map(|d| {
                if !d.contains_key("_id") {
                    // `_id` first, as the server would place it.
                    let mut with = doc! {"_id": bson::oid::ObjectId::new()};
                    with.extend(std::mem::take(d));
                    *d = with;
                }
                d.get("_id").cloned().unwrap_or(Bson::Null)
            })
            .collect();
        let work = async {
            let c = self.client().await?;
            let mut s = self.session(c, None).await?;
            let r = c
                .database(&self.db_name)
                .collection::<Document>(coll)
                .insert_many(&docs)
                .ordered(true)
                .session(&mut s)
                .await;
            Ok((r, s.operation_time()))
        };
        match self.run(deadline, work).await {
            Ok((Ok(_), op_time)) => InsertOutcome { inserted_ids: ids, error: None, op_time },
            Ok((Err(e), op_time)) => {
                // A write error at index i of an ordered insert: the documents before i landed.
                // Anything else (connection lost mid-way): nothing is known to have landed.
                let landed = failed_index(&e).map_or(0, |i| i.min(ids.len()));
                let error = self.classify(e);
                InsertOutcome { inserted_ids: ids[..landed].to_vec(), error: Some(error), op_time }
            }
            Err(e) => InsertOutcome { inserted_ids: Vec::new(), error: Some(e), op_time: None },
        }
    }

    pub async fn update(
        &self,
        coll: &str,
        filter: Document,
        update: UpdateModifications,
        multi: bool,
        upsert: bool,
        deadline: Instant,
    ) -> Result<UpdateOutcome, BackendError> {
        self.run(deadline, async {
            let c = self.client().await?;
            let mut s = self.session(c, None).await?;
            let col = c.database(&self.db_name).collection::<Document>(coll);
            let r = if multi {
                col.update_many(filter, update).upsert(upsert).session(&mut s).await
            } else {
                col.update_one(filter, update).upsert(upsert).session(&mut s).await
            }
            .map_err(|e| self.classify(e))?;
            Ok(UpdateOutcome {
                matched: r.matched_count,
                modified: r.modified_count,
                upserted_id: r.upserted_id,
                op_time: s.operation_time(),
            })
        })
        .await
    }

    pub async fn delete(
        &self,
        coll: &str,
        filter: Document,
        multi: bool,
        deadline: Instant,
    ) -> Result<(u64, Option<Timestamp>), BackendError> {
        self.run(deadline, async {
            let c = self.client().await?;
            let mut s = self.session(c, None).await?;
            let col = c.database(&self.db_name).collection::<Document>(coll);
            let r = if multi {
                col.delete_many(filter).session(&mut s).await
            } else {
                col.delete_one(filter).session(&mut s).await
            }
            .map_err(|e| self.classify(e))?;
            Ok((r.deleted_count, s.operation_time()))
        })
        .await
    }

    /// Classify a driver error once. Server-reported errors keep their code; anything about
    /// reaching a member is `Unavailable`; bad arguments are the caller's input.
    fn classify(&self, e: DriverError) -> BackendError {
        let unavailable = |reason: String| BackendError::Unavailable {
            endpoint: self.label.to_string(),
            reason: scrub_pw(&reason, self.password.as_deref()),
        };
        let server = |code: i32, message: &str| {
            if NOT_PRIMARY_CODES.contains(&code) {
                BackendError::ReadOnly { endpoint: self.label.to_string() }
            } else {
                BackendError::Server { code: i64::from(code), message: message.to_string() }
            }
        };
        match e.kind.as_ref() {
            ErrorKind::Command(c) => server(c.code, &c.message),
            ErrorKind::Write(WriteFailure::WriteError(w)) => server(w.code, &w.message),
            ErrorKind::Write(WriteFailure::WriteConcernError(w)) => server(w.code, &w.message),
            ErrorKind::InsertMany(m) => match (m.write_errors.as_ref().and_then(|w| w.first()), &m.write_concern_error)
            {
                (Some(w), _) => server(w.code, &w.message),
                (None, Some(w)) => server(w.code, &w.message),
                (None, None) => BackendError::Server { code: 0, message: e.to_string() },
            },
            ErrorKind::InvalidArgument { message, .. } => BackendError::BadInput(message.clone()),
            ErrorKind::BsonSerialization(err) => BackendError::BadInput(err.to_string()),
            ErrorKind::SessionsNotSupported | ErrorKind::IncompatibleServer { .. } => {
                BackendError::Unsupported(format!("{}: {e}", self.label))
            }
            ErrorKind::ServerSelection { message, .. } => {
                let mut reason = format!("no usable member: {message}");
                // No member could be reached at all: a plaintext URI against a TLS-only server
                // looks like any dropped connection, so say what to check.
                if self.tls == UriTls::Off && dropped_connection(message) {
                    reason
                        .push_str(" (the URI has no tls=true: a server that requires TLS drops plaintext connections)");
                }
                unavailable(reason)
            }
            ErrorKind::Io(err) => unavailable(format!("I/O error: {err}")),
            ErrorKind::ConnectionPoolCleared { message, .. } => unavailable(message.clone()),
            ErrorKind::DnsResolve { message, .. } => unavailable(format!("DNS: {message}")),
            ErrorKind::Authentication { .. } => unavailable("authentication failed".into()),
            ErrorKind::Shutdown => unavailable("client shut down (map reloaded)".into()),
            ErrorKind::InvalidResponse { message, .. } => unavailable(format!("invalid reply: {message}")),
            // tlsCAFile / tlsCertificateKeyFile unreadable or not PEM when the driver read them
            // (checked at build, so: changed since); the message names the path, not the content.
            ErrorKind::InvalidTlsConfig { message, .. } => unavailable(format!("TLS configuration: {message}")),
            _ => BackendError::Server { code: 0, message: scrub_pw(&e.to_string(), self.password.as_deref()) },
        }
    }
}

/// The index of the document an ordered insert stopped at, if the server said.
fn failed_index(e: &DriverError) -> Option<usize> {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(m) => m.write_errors.as_ref().and_then(|w| w.iter().map(|w| w.index).min()),
        _ => None,
    }
}

/// Remove secret material from a driver message (the driver redacts addresses itself; this
/// is the belt to its braces).
fn scrub(msg: &str, uri: &Secret, password: Option<&str>) -> String {
    let msg = msg.replace(uri.expose(), "***");
    scrub_pw(&msg, password)
}

fn scrub_pw(msg: &str, password: Option<&str>) -> String {
    match password {
        Some(p) if !p.is_empty() => msg.replace(p, "***"),
        _ => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_hides_credentials_and_staleness_is_clamped() {
        let uri = Secret::new("mongodb://app:s3cr3t-pw@h1:27017,h2:27018/core?replicaSet=rs0".into());
        let pool = config::Pool::default();
        let mut health = config::Health { max_lag_ms: 5_000, ..Default::default() };
        let db = MongoDatabase::new(&uri, "profiles", &pool, &health, NO_MIN).unwrap();
        assert_eq!(&*db.label, "h1:27017,h2:27018/core");
        assert_eq!(db.database_name(), "core");
        assert_eq!(db.max_staleness(), MIN_MAX_STALENESS);
        health.max_lag_ms = 120_000;
        let db = MongoDatabase::new(&uri, "profiles", &pool, &health, NO_MIN).unwrap();
        assert_eq!(db.max_staleness(), Duration::from_secs(120));
        let no_db = Secret::new("mongodb://127.0.0.1:1/?directConnection=true".into());
        assert_eq!(MongoDatabase::new(&no_db, "profiles", &pool, &health, NO_MIN).unwrap().database_name(), "profiles");
        let bad = Secret::new("mongodb://app:s3cr3t-pw@h1:notaport/x".into());
        let err = MongoDatabase::new(&bad, "x", &pool, &health, NO_MIN).err().unwrap().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    const NO_MIN: config::SslMode = config::SslMode::Disable;

    /// The documented mapping (docs/configuration.md `[tls]`): URI options → level, and what the
    /// driver build refuses.
    #[test]
    fn uri_tls_levels() {
        use config::SslMode::*;
        let level = |q: &str| {
            let uri = Secret::new(format!("mongodb://app:s3cr3t-pw@db1.example:27017/core{q}"));
            parse_uri(&uri).map(|c| UriTls::of(&c).level())
        };
        for (q, want) in [
            ("", Disable),
            ("?tls=false", Disable),
            ("?ssl=false&replicaSet=rs0", Disable),
            ("?tls=true&tlsInsecure=true", Require),
            ("?tls=true&tlsAllowInvalidCertificates=true", Require),
            ("?tlsAllowInvalidCertificates=true", Require),
            ("?TLSINSECURE=true", Require),
            ("?tls=true", VerifyFull),
            ("?ssl=true", VerifyFull),
            ("?tls=true&tlsCAFile=/etc/ca.pem", VerifyFull),
            ("?tlsCAFile=/etc/ca.pem", VerifyFull),
            ("?tls=true&tlsCAFile=/etc/ca.pem&tlsCertificateKeyFile=/etc/client.pem", VerifyFull),
            ("?tls=true&tlsInsecure=false", VerifyFull),
            ("?tls=true&tlsAllowInvalidCertificates=false", VerifyFull),
        ] {
            assert_eq!(level(q).unwrap(), want, "{q}");
        }
        // SRV: TLS on unless the URI turns it off.
        let srv = |q: &str| parse_uri(&Secret::new(format!("mongodb+srv://app:pw@cluster0.example.net/core{q}")));
        assert_eq!(UriTls::of(&srv("").unwrap()).level(), VerifyFull);
        assert_eq!(UriTls::of(&srv("?tls=false").unwrap()).level(), Disable);
        // Host name only: would be verify-ca, but rustls cannot skip only the name check.
        for q in ["?tls=true&tlsAllowInvalidHostnames=true", "?tlsallowinvalidhostnames=false"] {
            let e = level(q).unwrap_err();
            assert!(matches!(e, UriError::InvalidHostnames), "{q}: {e}");
            assert!(e.to_string().contains("tlsAllowInvalidHostnames is not supported"), "{e}");
        }
        // Contradictions the driver refuses: reported, password-free.
        for q in ["?tls=false&tlsCAFile=/x", "?tlsInsecure=true&tlsAllowInvalidCertificates=true"] {
            let e = level(q).unwrap_err().to_string();
            assert!(e.starts_with("invalid MongoDB connection string"), "{q}: {e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }

    #[test]
    fn tls_minimum_refuses_weaker_uris() {
        let (pool, health) = (config::Pool::default(), config::Health::default());
        let new = |q: &str, min| {
            let uri = Secret::new(format!("mongodb://app:s3cr3t-pw@db1.example:27017/core{q}"));
            MongoDatabase::new(&uri, "profiles", &pool, &health, min).map(|_| ())
        };
        use config::SslMode::*;
        assert!(new("?tls=true", VerifyFull).is_ok());
        assert!(new("?tls=true&tlsInsecure=true", Require).is_ok());
        assert!(new("", Disable).is_ok());
        let e = new("?tls=true&tlsInsecure=true", VerifyFull).unwrap_err().to_string();
        assert_eq!(
            e,
            "MongoDB TLS without certificate checks (tlsInsecure or tlsAllowInvalidCertificates) counts as \
             sslmode=require, weaker than the minimum [tls] backends = \"verify-full\""
        );
        let e = new("", Prefer).unwrap_err().to_string();
        assert!(e.contains("without TLS") && e.contains("sslmode=disable"), "{e}");
        assert!(new("?tls=true&tlsAllowInvalidCertificates=true", VerifyCa).is_err());
        assert!(!e.contains("s3cr3t"));
    }

    #[test]
    fn hosts_for_the_loopback_check() {
        let c = parse_uri(&Secret::new("mongodb://127.0.0.1:1,[::1]:2,db.example/?directConnection=false".into()));
        assert_eq!(hosts(&c.unwrap()), ["127.0.0.1", "::1", "db.example"]);
        let c = parse_uri(&Secret::new("mongodb+srv://cluster0.example.net/".into())).unwrap();
        assert_eq!(hosts(&c), ["cluster0.example.net"]);
        assert_eq!(label_of(&c, "profiles"), "srv:cluster0.example.net/profiles");
    }

    #[test]
    fn op_time_round_trips() {
        let t = Timestamp { time: 1_700_000_000, increment: 7 };
        assert_eq!(op_time_to_u64(t), (1_700_000_000u64 << 32) | 7);
        assert_eq!(op_time_from_u64(op_time_to_u64(t)), t);
    }
}
