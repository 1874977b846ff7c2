//! `cellgate serve`: load config and map, build backends, publish the first snapshot, start both
//! listeners (HTTPS where `[listen.*_tls]` is set, with the certificate poll), and shut down in
//! order on SIGTERM (readiness false → stop accepting → drain).
//! Under systemd (`Type=notify`, deploy/systemd/) the service manager hears `READY=1` when
//! `/readyz` turns true, `RELOADING=1` … `READY=1` around a SIGHUP reload, and `STOPPING=1` when
//! the drain begins.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::app::AppState;
use crate::backend::Backends;
use crate::config::Config;
use crate::http::{self, Plane};
use crate::shardmap;
use crate::state::Snapshot;

/// A running server: its bound addresses and a handle to stop it (tests use this directly).
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Running {
    /// Graceful stop: readiness false, stop accepting, drain within the grace period.
    pub async fn shutdown(self) {
        // 1. Readiness turns false first so load balancers stop sending.
        self.state.accepting.store(false, Ordering::Relaxed);
        systemd_notify(&[sd_notify::NotifyState::Stopping]);
        // 2. Listeners stop accepting; open connections finish their in-flight requests.
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // 3. Then the reload loop and signal listeners (and the etcd loop).
        for t in self.background {
            t.abort();
        }
        // 4. Fleet mode: leave the fleet (the registration goes at once, not at its TTL).
        if let Some(link) = &self.state.etcd {
            link.leave().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("shard map {path}:\n{errors}")]
    Map { path: String, errors: String },
    #[error("backends: {0}")]
    Backends(String),
    #[error(
        "refusing to listen on non-loopback {0} without tokens (configure [[tokens]] or [[clients]], or pass --insecure-no-auth)"
    )]
    NoAuth(SocketAddr),
    #[error("listen.{listener}_tls: {source}")]
    Tls { listener: &'static str, source: crate::listen_tls::TlsError },
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// Fleet mode: the first map could not be read from etcd (an instance never starts without one).
    #[error("map from etcd: {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
}

/// Read and compile a map file into a snapshot (pools are created lazily; health starts now).
pub fn load_snapshot(path: &Path, cfg: &Config) -> Result<Snapshot, StartError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StartError::Map { path: path.display().to_string(), errors: e.to_string() })?;
    let map = shardmap::compile_str(&text)
        .map_err(|e| StartError::Map { path: path.display().to_string(), errors: e.to_string() })?;
    let backends = Backends::build(&map, cfg).map_err(|e| StartError::Backends(e.join("; ")))?;
    Ok(Snapshot::new(map, backends, text, path.display().to_string()))
}

/// Compile a map text from etcd into a snapshot, as [`load_snapshot`] does for a file.
fn etcd_snapshot(text: String, revision: i64, prefix: &str, cfg: &Config) -> Result<Snapshot, StartError> {
    let label = format!("etcd {prefix}/map@{revision}");
    let map =
        shardmap::compile_str(&text).map_err(|e| StartError::Map { path: label.clone(), errors: e.to_string() })?;
    let backends = Backends::build(&map, cfg).map_err(|e| StartError::Backends(e.join("; ")))?;
    Ok(Snapshot::new(map, backends, text, label))
}

/// Start serving. Must run inside a tokio runtime.
pub async fn start(cfg: Config, insecure_no_auth: bool) -> Result<Running, StartError> {
    crate::telemetry::init_metrics();
    crate::backend::install_crypto_provider();
    for addr in [cfg.listen.data, cfg.listen.admin] {
        // Clients count: with them auth is on everywhere (a listener without client_ca then
        // admits bearer tokens only, and with no tokens nothing).
        if cfg.tokens.is_empty() && cfg.clients.is_empty() && !addr.ip().is_loopback() && !insecure_no_auth {
            return Err(StartError::NoAuth(addr));
        }
    }
    // A listener's certificate, key and client CA are checked before anything binds or connects.
    let listen_tls = crate::listen_tls::Listeners {
        data: cfg
            .listen
            .data_tls
            .as_ref()
            .map(crate::listen_tls::ListenerTls::load)
            .transpose()
            .map_err(|source| StartError::Tls { listener: "data", source })?,
        admin: cfg
            .listen
            .admin_tls
            .as_ref()
            .map(crate::listen_tls::ListenerTls::load)
            .transpose()
            .map_err(|source| StartError::Tls { listener: "admin", source })?,
    };
    let snapshot = match &cfg.map {
        crate::config::MapSource::File { path, .. } => load_snapshot(path, &cfg)?,
        crate::config::MapSource::Etcd(src) => {
            let (text, revision) = crate::etcd::fetch_map(src).await?;
            etcd_snapshot(text, revision, &src.prefix, &cfg)?
        }
    };
    metrics::gauge!(crate::telemetry::names::MAP_VERSION).set(snapshot.map.version().0 as f64);
    let data =
        http::bind(cfg.listen.data).await.map_err(|source| StartError::Bind { addr: cfg.listen.data, source })?;
    let admin =
        http::bind(cfg.listen.admin).await.map_err(|source| StartError::Bind { addr: cfg.listen.admin, source })?;
    let data_addr = data.local_addr().expect("bound");
    let admin_addr = admin.local_addr().expect("bound");
    let grace = Duration::from_millis(cfg.shutdown.grace_ms);
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(16);
    let cache = crate::cache::Cache::start(&cfg.cache)?;
    let etcd = cfg.map.etcd().map(|src| Arc::new(crate::etcd::Link::new(src.clone(), admin_addr.port())));
    let state = Arc::new(AppState {
        cache,
        reload_tx,
        reload_status: Default::default(),
        freeze: tokio::sync::watch::Sender::new(None),
        migrations: Default::default(),
        sql_policy: crate::sqlclass::Policy::with_extra(&cfg.sql.deny_functions),
        sql_classes: Default::default(),
        listen_tls,
        snapshot: ArcSwap::from_pointee(snapshot),
        credentials: Arc::new(crate::credentials::Credentials::new(&cfg)),
        config: cfg,
        in_flight: AtomicUsize::new(0),
        accepting: AtomicBool::new(true),
        etcd,
    });
    let (stop, rx) = watch::channel(false);
    let reload_rx = reload_rx;
    let mut background = vec![crate::tasks::spawn("reload", crate::reload::run(state.clone(), reload_rx))];
    let ready_sent = Arc::new(AtomicBool::new(false));
    // SIGHUP re-reads the map file, like the watcher and POST /admin/map/reload. After READY=1
    // the reload is bracketed by RELOADING=1 … READY=1 (whatever its outcome: a refused map
    // leaves the old one serving); a SIGHUP before it is a plain reload.
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let (tx, state, ready_sent) = (state.reload_tx.clone(), state.clone(), ready_sent.clone());
        background.push(crate::tasks::spawn("sighup", async move {
            while hup.recv().await.is_some() {
                let bracket = ready_sent.load(Ordering::Acquire);
                if bracket {
                    let now = sd_notify::NotifyState::monotonic_usec_now();
                    let mut states = vec![sd_notify::NotifyState::Reloading];
                    states.extend(now.ok());
                    systemd_notify(&states);
                }
                // Credentials first (tokens, clients, peer token): a refused config keeps the
                // old ones and is reported in the log and /admin/credentials.
                let creds = state.credentials.clone();
                let _ = tokio::task::spawn_blocking(move || creds.reload("sighup")).await;
                // In etcd mode there is no map file: the watch keeps the map current.
                let outcome = match state.config.map {
                    crate::config::MapSource::File { .. } => {
                        crate::reload::request(&tx, crate::reload::Source::File { trigger: "sighup" }).await
                    }
                    crate::config::MapSource::Etcd(_) => None,
                };
                if bracket {
                    let result = outcome.map_or("not run", |o| o.result.as_str());
                    let version = state.pin().map.version().0;
                    let status = format!("serving map version {version} (last reload: {result})");
                    systemd_notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
                }
            }
        }));
    }
    // Fleet mode: a migration's freeze in etcd is held before the listeners serve, so an
    // instance that joins during a cutover holds the moving cells from its first request.
    if let Some(src) = state.config.map.etcd() {
        let specs = crate::etcd::fetch_freezes(src).await?;
        crate::migrate::apply_fleet_freezes(state.as_ref(), &specs);
    }
    // Migrations an earlier process left unfinished (crash): their persisted state is loaded so
    // that status tells the truth and they can be resumed or aborted.
    crate::migrate::recover(&(state.clone() as Arc<dyn crate::migrate::Host>)).await;
    // Fleet mode: the etcd loop watches the map key and keeps this instance registered.
    if let Some(link) = state.etcd.clone() {
        let me = crate::etcd::Instance {
            data: data_addr,
            admin: admin_addr,
            healthy: Box::new({
                let state = Arc::downgrade(&state);
                move || state.upgrade().is_some_and(|s| http::admin::ready(&s))
            }),
            apply_freezes: Box::new({
                let state = Arc::downgrade(&state);
                move |specs| {
                    state.upgrade().map_or_else(Vec::new, |s| crate::migrate::apply_fleet_freezes(s.as_ref(), specs))
                }
            }),
        };
        let (tx, host) = (state.reload_tx.clone(), state.clone());
        background.push(crate::tasks::spawn("etcd", crate::etcd::run(link, host, tx, me)));
    }
    let watcher = match &state.config.map {
        crate::config::MapSource::File { watch: false, .. } | crate::config::MapSource::Etcd(_) => None,
        crate::config::MapSource::File { path, watch: true } => {
            match crate::reload::watch(path, state.reload_tx.clone()) {
                Ok((w, debounce)) => {
                    background.push(debounce);
                    Some(w)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the map file; reload with SIGHUP or the admin API");
                    None
                }
            }
        }
    };
    if state.config.source.is_some() {
        background
            .push(crate::tasks::spawn("credentials_reload", crate::credentials::poll_loop(state.credentials.clone())));
    }
    let (data_tls, admin_tls) = (state.listen_tls.data.clone(), state.listen_tls.admin.clone());
    if data_tls.is_some() || admin_tls.is_some() {
        background
            .push(crate::tasks::spawn("tls_reload", crate::listen_tls::poll_loop(data_tls.clone(), admin_tls.clone())));
    }
    let tasks = vec![
        crate::tasks::spawn(
            "listener_data",
            http::serve(data, Plane::Data, data_tls, state.clone(), rx.clone(), grace),
        ),
        crate::tasks::spawn("listener_admin", http::serve(admin, Plane::Admin, admin_tls, state.clone(), rx, grace)),
    ];
    // systemd: READY=1 once `/readyz` would answer 200 (listeners bound and serving, first
    // snapshot published, every endpoint probed once), so `systemctl start` returns when the
    // instance can serve. Spawned last: the SIGHUP handler is in place before systemd may send it.
    background.push(crate::tasks::spawn("sd_notify_ready", {
        let (state, ready_sent) = (state.clone(), ready_sent.clone());
        async move {
            while !http::admin::ready(&state) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let status = format!("serving map version {}", state.pin().map.version().0);
            systemd_notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
            ready_sent.store(true, Ordering::Release);
        }
    }));
    // Cache warming (docs/cache.md, *Warming*): once ready, then after every migration cutover.
    let weak = Arc::downgrade(&state);
    let ready = move || weak.upgrade().is_some_and(|s| http::admin::ready(&s));
    background.extend(crate::dataplane::warm::spawn(state.clone(), ready));
    tracing::info!(%data_addr, %admin_addr, map_version = state.pin().map.version().0, "cellgate serving");
    Ok(Running { data_addr, admin_addr, state, stop, tasks, background, _watcher: watcher })
}

/// The `serve` command: run until SIGTERM (graceful) or SIGINT (fast).
pub async fn run(config_path: &Path, insecure_no_auth: bool) -> Result<(), StartError> {
    let cfg = Config::load(config_path)?;
    // Installed before `start`, so a SIGTERM right after READY=1 already drains.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| StartError::Backends(format!("signal handler: {e}")))?;
    let running = start(cfg, insecure_no_auth).await?;
    tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: draining");
            running.shutdown().await;
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: stopping now");
            systemd_notify(&[sd_notify::NotifyState::Stopping]);
        }
    }
    Ok(())
}

/// Tell the service manager about a state change (sd_notify(3)). A no-op when `NOTIFY_SOCKET` is
/// unset (tests, the demo, a shell); a failed send is logged, never fatal.
fn systemd_notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify: cannot reach the service manager");
    }
}
