//! Fleet mode on etcd (docs/fleet.md): the instance side — read the map key at start, watch it
//! and hand every change to the reload writer as `reload::Source::Etcd`, keep this instance's
//! lease-bound registration, track the link's state for `GET /admin/fleet` — and the operator
//! side behind `cellgate map push --etcd` (compare-and-swap), `--wait` and `cellgate fleet status`;
//! the migration records and their takeover by transaction. Every connection is secured the
//! same way (`config::EtcdAccess`: TLS with a private CA and client certificate, etcd user and
//! password, which never reaches an error or a log line).
//! Must not publish a snapshot itself (only `reload::run` does) nor touch the data plane: when
//! etcd is lost the serving map stays, and requests never wait on etcd.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};

use crate::config::{EtcdAccess, EtcdSource};
use crate::reload;

/// Why an etcd step failed. Classified by [`EtcdError::exit_code`] (what the CLI exits with) and
/// [`EtcdError::retryable`] (whether trying again later can succeed unchanged).
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No answer: connection refused, reset, or the deadline passed. Retryable.
    #[error("etcd unreachable ({endpoints}): {what}: {reason}")]
    Unreachable { endpoints: String, what: &'static str, reason: String },
    /// etcd answered with an error (permission, request too large, ...). Not retryable as is.
    #[error("etcd refused {what}: {reason}")]
    Refused { what: &'static str, reason: String },
    /// The key holds no map.
    #[error("no shard map in etcd at {key} (push one with `cellgate map push FILE --etcd ... --prefix ...`)")]
    NoMap { key: String },
    /// Optimistic concurrency lost: someone else's map is there now, or the version does not
    /// move forward. Re-read, rebase, push again.
    #[error("version conflict: {0}")]
    Conflict(String),
    /// The map to push is invalid (every error with its line); nothing was written.
    #[error("the map is invalid, nothing was written:\n{0}")]
    InvalidMap(String),
    /// `--wait` ran out of time: these instances do not report the version.
    #[error("timed out after {after:?} waiting for map version {version}; not applied by: {laggards}")]
    WaitTimeout { version: u64, after: Duration, laggards: String },
    /// Migration `id` is orchestrated by another instance (it took it over first).
    #[error("migration {id} is orchestrated by instance {by}")]
    Orchestrated { id: String, by: String },
    /// This side's TLS or auth settings cannot be used (a CA or key file unreadable, a PEM
    /// that does not parse): the operator's to fix, not etcd's.
    #[error("etcd connection settings: {0}")]
    Setup(String),
    /// A migration's freeze was not acknowledged in time by these live instances.
    #[error("timed out after {after:?} waiting for freeze {id}; not held by: {laggards}")]
    FreezeTimeout { id: String, after: Duration, laggards: String },
}

impl EtcdError {
    /// The CLI's exit code: 3 for a version conflict, 4 for a `--wait` timeout, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            EtcdError::Conflict(_) | EtcdError::Orchestrated { .. } => 3,
            EtcdError::WaitTimeout { .. } | EtcdError::FreezeTimeout { .. } => 4,
            EtcdError::Unreachable { .. }
            | EtcdError::Refused { .. }
            | EtcdError::NoMap { .. }
            | EtcdError::Setup(_)
            | EtcdError::InvalidMap(_) => 1,
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(self, EtcdError::Unreachable { .. } | EtcdError::WaitTimeout { .. } | EtcdError::FreezeTimeout { .. })
    }
}

/// The keys of one fleet under its prefix.
#[derive(Debug, Clone)]
pub struct Keys(String);

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys(prefix.to_string())
    }
    /// The map's TOML text.
    pub fn map(&self) -> String {
        format!("{}/map", self.0)
    }
    /// The pushed map's `version`, written in the same transaction as the map (for people and
    /// `fleet status`; the compare-and-swap compares the map key's revision).
    pub fn map_version(&self) -> String {
        format!("{}/map_version", self.0)
    }
    pub fn instances(&self) -> String {
        format!("{}/instances/", self.0)
    }
    pub fn instance(&self, id: &str) -> String {
        format!("{}/instances/{id}", self.0)
    }
    /// The cutover holds in force, one key per migration (docs/migrations.md, etcd mode).
    pub fn freezes(&self) -> String {
        format!("{}/freezes/", self.0)
    }
    pub fn freeze(&self, id: &str) -> String {
        format!("{}/freezes/{id}", self.0)
    }
    /// The migration records (a copy of the shards' progress rows, with their orchestrator).
    pub fn migrations(&self) -> String {
        format!("{}/migrations/", self.0)
    }
    pub fn migration(&self, id: &str) -> String {
        format!("{}/migrations/{id}", self.0)
    }
}

/// A migration's write hold as published under `<prefix>/freezes/<id>`: what every instance
/// applies to its hold (the same freeze as `POST /admin/freeze`) before it acknowledges it in
/// its registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreezeSpec {
    pub id: String,
    pub cells: Vec<String>,
    pub hold_ms: u64,
}

/// One instance's registration under `<prefix>/instances/<id>`, bound to its lease. Unknown
/// fields are accepted on purpose: instances of a newer release may add some while an older CLI
/// reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub id: String,
    /// Data and admin listener addresses as bound.
    pub data: String,
    pub admin: String,
    /// The version of the map this instance serves.
    pub map_version: u64,
    /// `/readyz` would answer 200.
    pub healthy: bool,
    /// Unix seconds.
    pub started_at: u64,
    pub updated_at: u64,
    /// The ids of the migration freezes this instance holds (its acknowledgement of them).
    #[serde(default)]
    pub freezes: Vec<String>,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Run `fut` under `timeout`; classify a transport failure as unreachable and anything else etcd
/// says as refused. Every etcd call goes through here, so none can hang.
async fn deadline<T>(
    endpoints: &[String],
    what: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    let unreachable = |reason: String| EtcdError::Unreachable { endpoints: endpoints.join(","), what, reason };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(e, what, unreachable)),
    }
}

fn classify(e: etcd_client::Error, what: &'static str, unreachable: impl Fn(String) -> EtcdError) -> EtcdError {
    use etcd_client::Error as E;
    match e {
        E::TransportError(t) => unreachable(causes(t.to_string(), &t)),
        E::IoError(io) => unreachable(io.to_string()),
        // gRPC status codes (tonic is reached only through etcd-client): CANCELLED 1, UNKNOWN 2
        // (a reset stream), DEADLINE_EXCEEDED 4, UNAVAILABLE 14 mean "no answer", not "etcd said no".
        E::GRpcStatus(s) if matches!(i32::from(s.code()), 1 | 2 | 4 | 14) => {
            unreachable(causes(format!("{:?}: {}", s.code(), s.message()), &s))
        }
        E::GRpcStatus(s) => EtcdError::Refused { what, reason: causes(format!("{:?}: {}", s.code(), s.message()), &s) },
        E::WatchError(m) | E::LeaseKeepAliveError(m) => unreachable(m),
        other => EtcdError::Refused { what, reason: other.to_string() },
    }
}

/// `head` and the messages of `e`'s sources: tonic's transport error says only "transport
/// error", the reason (connection refused, unknown issuer, certificate required) is in its
/// sources. Neither carries the password (etcd-client sends it in a request body only).
fn causes(head: String, e: &dyn std::error::Error) -> String {
    let mut out = head;
    let mut next = e.source();
    while let Some(s) = next {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = s.source();
    }
    out
}

/// A client for `endpoints`. Connecting is lazy in etcd-client (the channel dials on the first
/// call), so a dead etcd shows up as the first call's deadline, not here — except with a user,
/// whose password is checked (and a token obtained) right away, so a wrong one fails here.
async fn connect(endpoints: &[String], access: &EtcdAccess, timeout: Duration) -> Result<Client, EtcdError> {
    // HTTP/2 pings find a silently dead connection (a killed etcd, a cut network) under the
    // long-lived watch and keep-alive streams, which no per-call deadline covers.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_keep_alive(Duration::from_secs(1), timeout)
        .with_keep_alive_while_idle(true);
    if let Some(tls) = tls_options(access)? {
        options = options.with_tls(tls);
    }
    if let (Some(user), Some(password)) = (&access.user, &access.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    hinted(access, deadline(endpoints, "connect", timeout, Client::connect(endpoints, Some(options))).await)
}

/// Add what an ended connection most likely means to the first call's error over TLS: etcd
/// with `--client-cert-auth` drops a client whose certificate is missing or from a CA it does
/// not trust, and depending on timing the client sees "connection closed", "connection reset",
/// "broken pipe" (its first write after etcd closed; seen in CI) or a bare TLS alert
/// (`BadCertificate`), none of which names the setting to fix.
fn hinted<T>(access: &EtcdAccess, r: Result<T, EtcdError>) -> Result<T, EtcdError> {
    match r {
        Err(EtcdError::Unreachable { endpoints, what, reason })
            if access.tls()
                && ["connection closed", "connection reset", "broken pipe", "fatal alert"]
                    .iter()
                    .any(|m| reason.contains(m)) =>
        {
            let have = if access.cert.is_some() { "the client certificate given" } else { "no client certificate" };
            Err(EtcdError::Unreachable {
                endpoints,
                what,
                reason: format!(
                    "{reason} (etcd ended the TLS connection; with {have}: if etcd requires client certificates \
                     (--client-cert-auth), give cert and key signed by a CA in its --trusted-ca-file)"
                ),
            })
        }
        other => other,
    }
}

/// The TLS settings of a connection, the files read now (each session and each CLI call reads
/// them again, so a rotated certificate is used without a restart). `None`: plaintext (`http://`
/// endpoints; the config refuses a CA with them).
fn tls_options(access: &EtcdAccess) -> Result<Option<TlsOptions>, EtcdError> {
    let Some(ca) = &access.ca else { return Ok(None) };
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| EtcdError::Setup(format!("etcd {what} {}: {e}", path.display())))
    };
    // Only this CA: etcd clusters run on a private CA, and the system roots would let any
    // public certificate for the name pass.
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA bundle", ca)?));
    if let (Some(cert), Some(key)) = (&access.cert, &access.key) {
        tls = tls.identity(Identity::from_pem(read("client certificate", cert)?, read("client key", key)?));
    }
    Ok(Some(tls))
}

/// The stored map: its text and the revision that last wrote it (`None`: no key).
async fn read_map(
    client: &mut Client,
    endpoints: &[String],
    keys: &Keys,
    timeout: Duration,
) -> Result<(Option<(String, i64)>, i64), EtcdError> {
    let resp = deadline(endpoints, "get map", timeout, client.get(keys.map(), None)).await?;
    let store_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let Some(kv) = resp.kvs().first() else { return Ok((None, store_rev)) };
    let text = kv
        .value_str()
        .map_err(|_| EtcdError::Refused { what: "get map", reason: format!("{} is not UTF-8 text", keys.map()) })?;
    Ok((Some((text.to_string(), kv.mod_revision())), store_rev))
}

/// The map an etcd-mode instance starts with: its text and revision. Fails when etcd cannot
/// be reached or holds no map (an instance never starts without a map).
pub async fn fetch_map(src: &EtcdSource) -> Result<(String, i64), EtcdError> {
    let keys = Keys::new(&src.prefix);
    let mut client = connect(&src.endpoints, &src.access, src.timeout).await?;
    match hinted(&src.access, read_map(&mut client, &src.endpoints, &keys, src.timeout).await)? {
        (Some(found), _) => Ok(found),
        (None, _) => Err(EtcdError::NoMap { key: keys.map() }),
    }
}

/// The `version` a stored map text declares, read without compiling it (an invalid map written
/// by hand still has a version to compare against, or none).
pub fn declared_version(text: &str) -> Option<u64> {
    let v: toml::Value = toml::from_str(text).ok()?;
    v.get("version")?.as_integer().and_then(|n| u64::try_from(n).ok())
}

// ---------------------------------------------------------------------------------------------
// Instance side.

/// This instance's link to etcd as `/admin/fleet` shows it. Written by [`run`] only.
pub struct Link {
    pub source: EtcdSource,
    pub id: String,
    started_at: SystemTime,
    state: Mutex<LinkState>,
}

struct LinkState {
    connected: bool,
    /// Connected since (when `connected`), or lost since.
    since: SystemTime,
    last_error: Option<String>,
    /// The map key's revision last handed to the reload writer.
    map_revision: i64,
    /// The registration last written, and the lease that holds it.
    registered: Option<Registration>,
    lease: Option<i64>,
    /// The fleet as last read from etcd, and when.
    fleet: Vec<Registration>,
    fleet_read_at: Option<SystemTime>,
    /// The freeze ids applied to this instance's hold from `<prefix>/freezes/`.
    held: Vec<String>,
}

impl Link {
    /// `admin_port` names the instance when the config gives no `instance_id`.
    pub fn new(source: EtcdSource, admin_port: u16) -> Link {
        let id = source.instance_id.clone().unwrap_or_else(|| default_instance_id(admin_port));
        let now = SystemTime::now();
        Link {
            source,
            id,
            started_at: now,
            state: Mutex::new(LinkState {
                connected: false,
                since: now,
                last_error: Some(NOT_YET.into()),
                map_revision: 0,
                registered: None,
                lease: None,
                fleet: Vec::new(),
                fleet_read_at: None,
                held: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connected(&self) -> bool {
        self.lock().connected
    }

    fn set_connected(&self) {
        let mut s = self.lock();
        if !s.connected {
            let lost = s.since.elapsed().unwrap_or_default();
            tracing::info!(instance = %self.id, after = ?lost, "etcd link up: map re-read, instance registered");
            s.connected = true;
            s.since = SystemTime::now();
            s.last_error = None;
        }
        metrics::gauge!(crate::telemetry::names::ETCD_CONNECTED).set(1.0);
        metrics::gauge!(crate::telemetry::names::ETCD_LOST_SINCE).set(0.0);
    }

    fn set_lost(&self, e: &EtcdError) {
        let mut s = self.lock();
        // Once per loss, not once per retry.
        if s.connected || s.last_error.as_deref() == Some(NOT_YET) {
            tracing::warn!(instance = %self.id, error = %e, "etcd link lost: serving the last good map, retrying");
        }
        if s.connected {
            s.connected = false;
            s.since = SystemTime::now();
        }
        s.last_error = Some(e.to_string());
        metrics::gauge!(crate::telemetry::names::ETCD_CONNECTED).set(0.0);
        metrics::gauge!(crate::telemetry::names::ETCD_LOST_SINCE).set(unix_secs(s.since) as f64);
    }

    /// Leave the fleet on a clean stop: revoke the lease, which deletes the registration at once
    /// (otherwise `--wait` would count this instance until its TTL ran out). Call after the
    /// etcd loop is stopped; a failure is logged (the lease then expires by itself).
    pub async fn leave(&self) {
        let Some(lease) = self.lock().lease.take() else { return };
        let (eps, t) = (&self.source.endpoints[..], self.source.timeout);
        let revoked = async {
            let mut client = connect(eps, &self.source.access, t).await?;
            deadline(eps, "lease revoke", t, client.lease_revoke(lease)).await
        };
        match revoked.await {
            Ok(_) => tracing::info!(instance = %self.id, "left the fleet (registration removed)"),
            Err(e) => {
                tracing::warn!(instance = %self.id, error = %e, "cannot remove the registration; it expires with its lease")
            }
        }
    }

    /// `GET /admin/fleet` in etcd mode; `serving` is the version this instance serves now.
    pub fn status_json(&self, serving: u64) -> serde_json::Value {
        let s = self.lock();
        let versions: std::collections::BTreeSet<u64> = s.fleet.iter().map(|r| r.map_version).collect();
        serde_json::json!({
            "mode": "etcd",
            "instance_id": self.id,
            "endpoints": self.source.endpoints,
            "prefix": self.source.prefix,
            // How the link is secured; the password is never shown, only whether there is one.
            "tls": self.source.access.tls(),
            "client_cert": self.source.access.cert.is_some(),
            "user": self.source.access.user,
            "started_at": unix_secs(self.started_at),
            "serving_version": serving,
            "etcd": {
                "connected": s.connected,
                "connected_since": s.connected.then(|| unix_secs(s.since)),
                "lost_since": (!s.connected).then(|| unix_secs(s.since)),
                "last_error": s.last_error,
                "map_revision": s.map_revision,
            },
            "registration": s.registered,
            "fleet": {
                "read_at": s.fleet_read_at.map(unix_secs),
                "instances": s.fleet,
                "versions": versions,
                "agree": versions.len() <= 1,
            },
        })
    }
}

const NOT_YET: &str = "not connected yet";

fn default_instance_id(admin_port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| crate::config::valid_instance_id(h))
        .unwrap_or_else(|| "cellgate".into());
    format!("{host}-{admin_port}")
}

/// What the etcd loop needs from the running server (given by `server.rs`, which owns them).
pub struct Instance {
    pub data: SocketAddr,
    pub admin: SocketAddr,
    /// `/readyz` would answer 200.
    pub healthy: Box<dyn Fn() -> bool + Send + Sync>,
    /// Make the hold match the freezes in etcd (apply new ones, lift the ones deleted); returns
    /// the ids now held, which the registration reports as acknowledged.
    pub apply_freezes: FreezeApplier,
}

/// See [`Instance::apply_freezes`].
pub type FreezeApplier = Box<dyn Fn(&[FreezeSpec]) -> Vec<String> + Send + Sync>;

/// The instance's etcd loop, until aborted: one session after another. A session: (1) connect,
/// (2) read the map key and hand it to the reload writer (catch-up after a loss), (3) grant a
/// lease and write the registration, (4) watch the map key from the revision read, keep the
/// lease alive, refresh the registration and the fleet view. Any failure ends the session: the
/// link is marked lost (the serving map stays) and a new session starts after a short pause.
pub async fn run<H: reload::Host>(link: Arc<Link>, host: Arc<H>, tx: reload::Sender, me: Instance) {
    let me = Arc::new(me);
    loop {
        let err = session(&link, host.as_ref(), &tx, &me).await;
        link.set_lost(&err);
        // Short and constant: a returning etcd is caught up with within a second.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn session<H: reload::Host>(link: &Link, host: &H, tx: &reload::Sender, me: &Instance) -> EtcdError {
    match session_inner(link, host, tx, me).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner<H: reload::Host>(
    link: &Link,
    host: &H,
    tx: &reload::Sender,
    me: &Instance,
) -> Result<std::convert::Infallible, EtcdError> {
    let src = &link.source;
    let (eps, t) = (&src.endpoints[..], src.timeout);
    let keys = Keys::new(&src.prefix);
    // 1. Connect.
    let mut client = connect(eps, &src.access, t).await?;
    // 2. Catch up: the map as it is now (unchanged bytes are a no-op for the reload writer).
    let (found, store_rev) = hinted(&src.access, read_map(&mut client, eps, &keys, t).await)?;
    let watch_from = store_rev + 1;
    if let Some((text, rev)) = found {
        hand_over(link, tx, text, rev).await;
    } else {
        tracing::warn!(key = %keys.map(), "no map in etcd: keeping the serving map");
    }
    // 2b. The freezes as they are now, applied before the registration says what is held (a
    //     freeze released during a loss is lifted here, a new one applied).
    let freezes_rev = apply_freezes(link, me, &mut client, &keys, eps, t).await?;
    // 3. Register under a fresh lease (a lease from before a loss may have expired).
    let ttl = src.lease_ttl_s as i64;
    let lease = deadline(eps, "lease grant", t, client.lease_grant(ttl, None)).await?.id();
    link.lock().lease = Some(lease);
    let put_lock = tokio::sync::Mutex::new(());
    register(link, host, me, &mut client, &keys, lease, &put_lock, true).await?;
    let (mut keeper, mut acks) = deadline(eps, "lease keep-alive", t, client.lease_keep_alive(lease)).await?;
    let mut watch = deadline(
        eps,
        "watch map",
        t,
        client.watch(keys.map(), Some(WatchOptions::new().with_start_revision(watch_from))),
    )
    .await?;
    let mut freeze_watch = deadline(
        eps,
        "watch freezes",
        t,
        client.watch(keys.freezes(), Some(WatchOptions::new().with_prefix().with_start_revision(freezes_rev + 1))),
    )
    .await?;
    read_fleet(link, &mut client, &keys, eps, t).await?;
    link.set_connected();
    // 4. Steady state. The keep-alive period is a third of the TTL, so two lost pings still
    //    leave the key alive; an ack older than the TTL means the lease is gone.
    let mut tick = tokio::time::interval(Duration::from_millis(ttl as u64 * 1000 / 3).min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ack = Instant::now();
    let lease_ttl = Duration::from_secs(ttl as u64);
    loop {
        tokio::select! {
            msg = watch.message() => {
                let unreachable = |reason: String| EtcdError::Unreachable { endpoints: eps.join(","), what: "watch map", reason };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(unreachable("watch stream ended".into())),
                    Err(e) => return Err(classify(e, "watch map", unreachable)),
                };
                if resp.canceled() {
                    return Err(unreachable(format!("watch canceled (compacted at {}): {}", resp.compact_revision(), resp.cancel_reason())));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Put => match kv.value_str() {
                            Ok(text) => hand_over(link, tx, text.to_string(), kv.mod_revision()).await,
                            Err(_) => tracing::warn!(key = %keys.map(), revision = kv.mod_revision(), "map in etcd is not UTF-8: refused, old map kept"),
                        },
                        EventType::Delete => tracing::warn!(key = %keys.map(), "map key deleted in etcd: keeping the serving map"),
                    }
                }
                // The registration says which version now serves (published or not).
                register(link, host, me, &mut client, &keys, lease, &put_lock, false).await?;
            }
            msg = freeze_watch.message() => {
                let unreachable = |reason: String| EtcdError::Unreachable { endpoints: eps.join(","), what: "watch freezes", reason };
                match msg {
                    Ok(Some(r)) if r.canceled() => return Err(unreachable(format!("watch canceled: {}", r.cancel_reason()))),
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(unreachable("watch stream ended".into())),
                    Err(e) => return Err(classify(e, "watch freezes", unreachable)),
                }
                // Re-read the whole set rather than replay events: the hold follows what is in
                // etcd now, and only then does the registration acknowledge it.
                apply_freezes(link, me, &mut client, &keys, eps, t).await?;
                register(link, host, me, &mut client, &keys, lease, &put_lock, false).await?;
            }
            ack = acks.message() => {
                let unreachable = |reason: String| EtcdError::Unreachable { endpoints: eps.join(","), what: "lease keep-alive", reason };
                match ack {
                    Ok(Some(a)) if a.ttl() > 0 => last_ack = Instant::now(),
                    Ok(Some(_)) => return Err(unreachable(format!("lease {lease:x} expired"))),
                    Ok(None) => return Err(unreachable("keep-alive stream ended".into())),
                    Err(e) => return Err(classify(e, "lease keep-alive", unreachable)),
                }
            }
            _ = tick.tick() => {
                if last_ack.elapsed() > lease_ttl {
                    return Err(EtcdError::Unreachable { endpoints: eps.join(","), what: "lease keep-alive", reason: format!("no keep-alive answer for {:?}", last_ack.elapsed()) });
                }
                deadline(eps, "lease keep-alive", t, keeper.keep_alive()).await?;
                register(link, host, me, &mut client, &keys, lease, &put_lock, false).await?;
                read_fleet(link, &mut client, &keys, eps, t).await?;
            }
        }
    }
}

/// Read `<prefix>/freezes/`, make this instance's hold match it, remember the ids held (for the
/// registration); the store revision of the read (to watch from).
async fn apply_freezes(
    link: &Link,
    me: &Instance,
    client: &mut Client,
    keys: &Keys,
    eps: &[String],
    t: Duration,
) -> Result<i64, EtcdError> {
    let (specs, rev) = read_freezes(client, keys, eps, t).await?;
    let held = (me.apply_freezes)(&specs);
    link.lock().held = held;
    Ok(rev)
}

async fn read_freezes(
    client: &mut Client,
    keys: &Keys,
    eps: &[String],
    t: Duration,
) -> Result<(Vec<FreezeSpec>, i64), EtcdError> {
    let resp =
        deadline(eps, "read freezes", t, client.get(keys.freezes(), Some(GetOptions::new().with_prefix()))).await?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let specs = resp
        .kvs()
        .iter()
        .filter_map(|kv| match serde_json::from_slice::<FreezeSpec>(kv.value()) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable freeze skipped");
                None
            }
        })
        .collect();
    Ok((specs, rev))
}

/// The freezes in etcd now: read by an instance at start, before it serves, so one that joins
/// during a cutover holds the moving cells from its first request.
pub async fn fetch_freezes(src: &EtcdSource) -> Result<Vec<FreezeSpec>, EtcdError> {
    let mut client = connect(&src.endpoints, &src.access, src.timeout).await?;
    Ok(read_freezes(&mut client, &Keys::new(&src.prefix), &src.endpoints, src.timeout).await?.0)
}

/// Give a map text from etcd to the reload writer and wait for the outcome (the writer logs it,
/// counts it in `cellgate_map_reloads_total` and keeps it for `/admin/map`).
async fn hand_over(link: &Link, tx: &reload::Sender, text: String, revision: i64) {
    link.lock().map_revision = revision;
    let _ = reload::request(tx, reload::Source::Etcd { text, revision }).await;
}

/// Write this instance's registration when it changed (or `force`), under `lease`.
#[allow(clippy::too_many_arguments)]
async fn register<H: reload::Host>(
    link: &Link,
    host: &H,
    me: &Instance,
    client: &mut Client,
    keys: &Keys,
    lease: i64,
    put_lock: &tokio::sync::Mutex<()>,
    force: bool,
) -> Result<(), EtcdError> {
    let _one_writer = put_lock.lock().await;
    let mut reg = Registration {
        id: link.id.clone(),
        data: me.data.to_string(),
        admin: me.admin.to_string(),
        map_version: host.snapshot().load().map.version().0,
        healthy: (me.healthy)(),
        started_at: unix_secs(link.started_at),
        updated_at: 0,
        freezes: link.lock().held.clone(),
    };
    {
        let s = link.lock();
        if !force && let Some(old) = &s.registered {
            reg.updated_at = old.updated_at;
            if *old == reg {
                return Ok(());
            }
        }
    }
    reg.updated_at = unix_secs(SystemTime::now());
    let value = serde_json::to_vec(&reg).map_err(|e| EtcdError::Refused { what: "register", reason: e.to_string() })?;
    let (eps, t) = (&link.source.endpoints[..], link.source.timeout);
    let put = client.put(keys.instance(&link.id), value, Some(PutOptions::new().with_lease(lease)));
    deadline(eps, "register", t, put).await?;
    link.lock().registered = Some(reg);
    Ok(())
}

async fn read_fleet(
    link: &Link,
    client: &mut Client,
    keys: &Keys,
    eps: &[String],
    t: Duration,
) -> Result<(), EtcdError> {
    let fleet = list_instances(client, keys, eps, t).await?;
    let mut s = link.lock();
    s.fleet = fleet;
    s.fleet_read_at = Some(SystemTime::now());
    Ok(())
}

async fn list_instances(
    client: &mut Client,
    keys: &Keys,
    eps: &[String],
    t: Duration,
) -> Result<Vec<Registration>, EtcdError> {
    let resp =
        deadline(eps, "list instances", t, client.get(keys.instances(), Some(GetOptions::new().with_prefix()))).await?;
    let mut out: Vec<Registration> = resp
        .kvs()
        .iter()
        .filter_map(|kv| match serde_json::from_slice::<Registration>(kv.value()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable registration skipped");
                None
            }
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Operator side (the CLI).

/// Where the operator's commands talk to.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Deadline of each etcd call.
    pub timeout: Duration,
    /// TLS and authentication (`--etcd-ca`, `--etcd-user`, ...; an instance's `map.etcd`).
    pub access: EtcdAccess,
}

/// What a successful push wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    pub key: String,
    pub version: u64,
    /// The version it replaced (`None`: no map, or one without a readable version).
    pub previous_version: Option<u64>,
    /// The etcd revision of the write.
    pub revision: i64,
}

/// Publish `text` at `<prefix>/map`: (1) compile it (an invalid map is never written), (2) read
/// the stored map and its revision, (3) check `if_version` against the stored version and that
/// the version moves forward, (4) write map and version in one transaction that succeeds only
/// if the map key still has the revision read in (2) — so of two concurrent pushes exactly one
/// wins and the other gets [`EtcdError::Conflict`].
pub async fn push_map(target: &Target, text: &str, if_version: Option<u64>) -> Result<Pushed, EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    // 1. Compile.
    let map = crate::shardmap::compile_str(text).map_err(|e| EtcdError::InvalidMap(e.to_string()))?;
    let version = map.version().0;
    let keys = Keys::new(&target.prefix);
    // 2. Read.
    let mut client = connect(eps, &target.access, t).await?;
    let (found, _) = hinted(&target.access, read_map(&mut client, eps, &keys, t).await)?;
    let (previous_version, stored_rev) = match &found {
        Some((old, rev)) => (declared_version(old), *rev),
        None => (None, 0),
    };
    // 3. Preconditions on what was read.
    if let Some(want) = if_version
        && previous_version != Some(want)
    {
        let now = previous_version.map_or("no map".to_string(), |v| format!("version {v}"));
        return Err(EtcdError::Conflict(format!("--if-version {want} but etcd holds {now}")));
    }
    if let Some(prev) = previous_version
        && version <= prev
    {
        return Err(EtcdError::Conflict(format!("version {version} is not greater than the version in etcd, {prev}")));
    }
    // 4. Compare-and-swap on the map key's revision (0 = the key must not exist yet).
    let cmp = if found.is_some() {
        Compare::mod_revision(keys.map(), CompareOp::Equal, stored_rev)
    } else {
        Compare::create_revision(keys.map(), CompareOp::Equal, 0)
    };
    let txn = Txn::new()
        .when([cmp])
        .and_then([TxnOp::put(keys.map(), text, None), TxnOp::put(keys.map_version(), version.to_string(), None)]);
    let resp = deadline(eps, "write map", t, client.txn(txn)).await?;
    if !resp.succeeded() {
        let now = match read_map(&mut client, eps, &keys, t).await {
            Ok((Some((text, _)), _)) => {
                declared_version(&text).map_or("a map without a version".into(), |v| format!("version {v}"))
            }
            Ok((None, _)) => "no map".into(),
            Err(_) => "an unknown map".into(),
        };
        return Err(EtcdError::Conflict(format!(
            "another push changed the map while this one was being written (etcd now holds {now}); nothing was written"
        )));
    }
    Ok(Pushed {
        key: keys.map(),
        version,
        previous_version,
        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
    })
}

/// The fleet as etcd has it: the map's version and every live (lease-held) registration.
#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    pub map_version: Option<u64>,
    pub instances: Vec<Registration>,
    /// Every live instance serves `map_version`.
    pub agree: bool,
    /// The ones that do not.
    pub behind: Vec<String>,
}

pub async fn fleet_status(target: &Target) -> Result<FleetView, EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let keys = Keys::new(&target.prefix);
    let mut client = connect(eps, &target.access, t).await?;
    let (found, _) = hinted(&target.access, read_map(&mut client, eps, &keys, t).await)?;
    let map_version = found.and_then(|(text, _)| declared_version(&text));
    let instances = list_instances(&mut client, &keys, eps, t).await?;
    Ok(view(map_version, instances))
}

fn view(map_version: Option<u64>, instances: Vec<Registration>) -> FleetView {
    let behind: Vec<String> = instances
        .iter()
        .filter(|r| Some(r.map_version) != map_version)
        .map(|r| format!("{} (serves {}, admin {})", r.id, r.map_version, r.admin))
        .collect();
    FleetView { map_version, agree: behind.is_empty(), behind, instances }
}

/// Poll the registrations until every live instance serves `version` or later; on timeout name
/// the ones that do not. An instance whose lease expires (it died) stops counting.
pub async fn wait_for_version(target: &Target, version: u64, within: Duration) -> Result<FleetView, EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let keys = Keys::new(&target.prefix);
    let mut client = connect(eps, &target.access, t).await?;
    let end = Instant::now() + within;
    loop {
        // A lost etcd during the wait is retried until the end, then reported as such.
        let last = match list_instances(&mut client, &keys, eps, t).await {
            Ok(instances) => {
                let laggards: Vec<String> = instances
                    .iter()
                    .filter(|r| r.map_version < version)
                    .map(|r| format!("{} (serves {}, admin {})", r.id, r.map_version, r.admin))
                    .collect();
                if laggards.is_empty() {
                    return Ok(view(Some(version), instances));
                }
                laggards.join(", ")
            }
            Err(e) if e.retryable() && Instant::now() < end => e.to_string(),
            Err(e) => return Err(e),
        };
        if Instant::now() >= end {
            return Err(EtcdError::WaitTimeout { version, after: within, laggards: last });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Target {
    /// Where an instance in etcd mode talks to, for the steps a migration runs through etcd.
    pub fn of(src: &EtcdSource) -> Target {
        Target {
            endpoints: src.endpoints.clone(),
            prefix: src.prefix.clone(),
            timeout: src.timeout,
            access: src.access.clone(),
        }
    }
}

/// Publish a migration's freeze at `<prefix>/freezes/<id>` (every instance's watch applies it),
/// as orchestrator `me`: only while the migration's record names `me` ([`as_orchestrator`]).
pub async fn put_freeze(target: &Target, spec: &FreezeSpec, me: &str) -> Result<(), EtcdError> {
    let value =
        serde_json::to_vec(spec).map_err(|e| EtcdError::Refused { what: "put freeze", reason: e.to_string() })?;
    let op = TxnOp::put(Keys::new(&target.prefix).freeze(&spec.id), value, None);
    as_orchestrator(target, &spec.id, me, "put freeze", op).await
}

/// Release a migration's freeze everywhere: delete its key (instances lift it from their hold),
/// as orchestrator `me` — a deposed orchestrator must not release the new one's hold.
pub async fn delete_freeze(target: &Target, id: &str, me: &str) -> Result<(), EtcdError> {
    let op = TxnOp::delete(Keys::new(&target.prefix).freeze(id), None);
    as_orchestrator(target, id, me, "delete freeze", op).await
}

/// Run `op` for migration `id` only while its record names `me` as orchestrator (or there is no
/// record yet): read the record, check the name, then one transaction that compares the
/// record's mod_revision with the one read — a takeover in between changes it, so the op does
/// not run. [`EtcdError::Orchestrated`] names the instance that has it now. A record rewritten
/// by `me` in between (its own concurrent write) is read again, at most 3 times.
async fn as_orchestrator(target: &Target, id: &str, me: &str, what: &'static str, op: TxnOp) -> Result<(), EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let key = Keys::new(&target.prefix).migration(id);
    let mut client = connect(eps, &target.access, t).await?;
    for _ in 0..3 {
        let cmp = match read_record(&mut client, target, id).await? {
            Some((current, _)) if current.orchestrator != me => {
                return Err(EtcdError::Orchestrated { id: id.to_string(), by: current.orchestrator });
            }
            Some((_, rev)) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        let txn = Txn::new().when([cmp]).and_then([op.clone()]);
        if deadline(eps, what, t, client.txn(txn)).await?.succeeded() {
            return Ok(());
        }
    }
    Err(EtcdError::Conflict(format!("migration {id}: the record kept changing during {what}")))
}

/// Poll the registrations until every live instance reports that it holds freeze `id`; on
/// timeout name the ones that do not. An instance whose lease expires (dead, or cut off from
/// etcd: the shards' fence protects against it) stops counting.
pub async fn wait_for_freeze(target: &Target, id: &str, within: Duration) -> Result<FleetView, EtcdError> {
    let held = |r: &Registration| r.freezes.iter().any(|f| f == id);
    wait_all(target, within, held).await.map_err(|e| match e {
        WaitError::Timeout(laggards) => EtcdError::FreezeTimeout { id: id.to_string(), after: within, laggards },
        WaitError::Etcd(e) => e,
    })
}

/// A migration record as kept in etcd: the shards' progress row and who orchestrates it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The instance id of the orchestrator that wrote it last.
    pub orchestrator: String,
    pub doc: serde_json::Value,
}

/// The record of migration `id` and its key's mod_revision (`None`: no record).
pub async fn migration_record(target: &Target, id: &str) -> Result<Option<(MigrationRecord, i64)>, EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let mut client = connect(eps, &target.access, t).await?;
    read_record(&mut client, target, id).await
}

async fn read_record(
    client: &mut Client,
    target: &Target,
    id: &str,
) -> Result<Option<(MigrationRecord, i64)>, EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let key = Keys::new(&target.prefix).migration(id);
    let resp = deadline(eps, "get migration", t, client.get(key.clone(), None)).await?;
    let Some(kv) = resp.kvs().first() else { return Ok(None) };
    let record = serde_json::from_slice::<MigrationRecord>(kv.value()).map_err(|e| EtcdError::Refused {
        what: "get migration",
        reason: format!("{key} is not a migration record: {e}"),
    })?;
    Ok(Some((record, kv.mod_revision())))
}

/// Write `record` at `<prefix>/migrations/<id>` only if the key's mod_revision is still `seen`
/// (0: only if there is no record yet), in one etcd transaction. `Ok(false)`: someone wrote it
/// in between.
async fn put_record_if(
    client: &mut Client,
    target: &Target,
    id: &str,
    seen: i64,
    record: &MigrationRecord,
) -> Result<bool, EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let key = Keys::new(&target.prefix).migration(id);
    let value =
        serde_json::to_vec(record).map_err(|e| EtcdError::Refused { what: "put migration", reason: e.to_string() })?;
    let cmp = if seen == 0 {
        Compare::create_revision(key.clone(), CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key.clone(), CompareOp::Equal, seen)
    };
    let txn = Txn::new().when([cmp]).and_then([TxnOp::put(key, value, None)]);
    Ok(deadline(eps, "put migration", t, client.txn(txn)).await?.succeeded())
}

/// The orchestrator's write of its record: only while the record still names it (or there is
/// none yet), through [`as_orchestrator`] — so an instance that was deposed (another took the
/// migration over while it hung or was cut off) cannot overwrite the new orchestrator's record;
/// it gets [`EtcdError::Orchestrated`] naming the new one.
pub async fn put_migration(target: &Target, id: &str, record: &MigrationRecord) -> Result<(), EtcdError> {
    let value =
        serde_json::to_vec(record).map_err(|e| EtcdError::Refused { what: "put migration", reason: e.to_string() })?;
    let op = TxnOp::put(Keys::new(&target.prefix).migration(id), value, None);
    as_orchestrator(target, id, &record.orchestrator, "put migration", op).await
}

/// Take over migration `id` for `record.orchestrator`: one etcd transaction that succeeds only
/// if the record is still the one read as `seen` (its mod_revision; 0: there was none). Of two
/// instances resuming at once exactly one wins; the other gets [`EtcdError::Orchestrated`]
/// naming the winner.
pub async fn claim_migration(target: &Target, id: &str, seen: i64, record: &MigrationRecord) -> Result<(), EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let mut client = connect(eps, &target.access, t).await?;
    if put_record_if(&mut client, target, id, seen, record).await? {
        return Ok(());
    }
    let by = match read_record(&mut client, target, id).await {
        Ok(Some((current, _))) => current.orchestrator,
        Ok(None) => "unknown (the record was deleted)".into(),
        Err(e) => format!("unknown ({e})"),
    };
    Err(EtcdError::Orchestrated { id: id.to_string(), by })
}

/// Every migration record under `<prefix>/migrations/`, and the live instances.
pub async fn migrations(target: &Target) -> Result<(Vec<MigrationRecord>, Vec<Registration>), EtcdError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let keys = Keys::new(&target.prefix);
    let mut client = connect(eps, &target.access, t).await?;
    let resp =
        deadline(eps, "list migrations", t, client.get(keys.migrations(), Some(GetOptions::new().with_prefix())))
            .await?;
    let records = resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
    Ok((records, list_instances(&mut client, &keys, eps, t).await?))
}

enum WaitError {
    Timeout(String),
    Etcd(EtcdError),
}

/// Poll the live registrations until `done` holds for each; on timeout the ones it does not.
async fn wait_all(
    target: &Target,
    within: Duration,
    done: impl Fn(&Registration) -> bool,
) -> Result<FleetView, WaitError> {
    let (eps, t) = (&target.endpoints[..], target.timeout);
    let keys = Keys::new(&target.prefix);
    let end = Instant::now() + within;
    let mut client = connect(eps, &target.access, t).await.map_err(WaitError::Etcd)?;
    loop {
        // A lost etcd during the wait is retried until the end, then reported as such.
        let last = match list_instances(&mut client, &keys, eps, t).await {
            Ok(instances) => {
                let laggards: Vec<String> = instances
                    .iter()
                    .filter(|r| !done(r))
                    .map(|r| format!("{} (serves {}, admin {})", r.id, r.map_version, r.admin))
                    .collect();
                if laggards.is_empty() {
                    let version = instances.iter().map(|r| r.map_version).max();
                    return Ok(view(version, instances));
                }
                laggards.join(", ")
            }
            Err(e) if e.retryable() && Instant::now() < end => e.to_string(),
            Err(e) => return Err(WaitError::Etcd(e)),
        };
        if Instant::now() >= end {
            return Err(WaitError::Timeout(last));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_versions() {
        let k = Keys::new("/cellgate/prod");
        assert_eq!(k.map(), "/cellgate/prod/map");
        assert_eq!(k.map_version(), "/cellgate/prod/map_version");
        assert_eq!(k.instance("a-1"), "/cellgate/prod/instances/a-1");
        assert!(k.instance("a-1").starts_with(&k.instances()));
        assert_eq!(declared_version("version = 7\nresolution = 5\n"), Some(7));
        assert_eq!(declared_version("version = -1\n"), None);
        assert_eq!(declared_version("not toml ["), None);
        assert_eq!(declared_version("resolution = 5\n"), None);
    }

    #[test]
    fn errors_are_classified() {
        let conflict = EtcdError::Conflict("x".into());
        assert_eq!((conflict.exit_code(), conflict.retryable()), (3, false));
        let wait = EtcdError::WaitTimeout { version: 2, after: Duration::from_secs(1), laggards: "b".into() };
        assert_eq!((wait.exit_code(), wait.retryable()), (4, true));
        let down = EtcdError::Unreachable { endpoints: "e".into(), what: "get map", reason: "refused".into() };
        assert_eq!((down.exit_code(), down.retryable()), (1, true));
        assert!(!EtcdError::InvalidMap("line 1".into()).retryable());
    }

    #[test]
    fn fleet_view_names_the_instances_behind() {
        let reg = |id: &str, v: u64| Registration {
            id: id.into(),
            data: "127.0.0.1:1".into(),
            admin: "127.0.0.1:2".into(),
            map_version: v,
            healthy: true,
            started_at: 0,
            updated_at: 0,
            freezes: vec![],
        };
        let v = view(Some(3), vec![reg("a", 3), reg("b", 2)]);
        assert!(!v.agree);
        assert_eq!(v.behind.len(), 1);
        assert!(v.behind[0].starts_with("b (serves 2"), "{:?}", v.behind);
        assert!(view(Some(3), vec![reg("a", 3)]).agree);
        // A registration from a newer release with more fields still reads.
        let newer = r#"{"id":"x","data":"d","admin":"a","map_version":1,"healthy":true,"started_at":1,"updated_at":2,"freezes":[]}"#;
        assert_eq!(serde_json::from_str::<Registration>(newer).expect("reads").id, "x");
    }
}
