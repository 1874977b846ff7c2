//! `cellgate serve`: load config and map, build backends, publish the first snapshot, start both
//! listeners, and shut down in order on SIGTERM (readiness false → stop accepting → drain).

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
        // 2. Listeners stop accepting; open connections finish their in-flight requests.
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // 3. Then the reload loop and signal listeners.
        for t in self.background {
            t.abort();
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
    #[error("refusing to listen on non-loopback {0} without tokens (configure [[tokens]] or pass --insecure-no-auth)")]
    NoAuth(SocketAddr),
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
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

/// Start serving. Must run inside a tokio runtime.
pub async fn start(cfg: Config, insecure_no_auth: bool) -> Result<Running, StartError> {
    crate::telemetry::init_metrics();
    crate::backend::install_crypto_provider();
    for addr in [cfg.listen.data, cfg.listen.admin] {
        if cfg.tokens.is_empty() && !addr.ip().is_loopback() && !insecure_no_auth {
            return Err(StartError::NoAuth(addr));
        }
    }
    let snapshot = load_snapshot(&cfg.map.path, &cfg)?;
    metrics::gauge!(crate::telemetry::names::MAP_VERSION).set(snapshot.map.version().0 as f64);
    let data =
        http::bind(cfg.listen.data).await.map_err(|source| StartError::Bind { addr: cfg.listen.data, source })?;
    let admin =
        http::bind(cfg.listen.admin).await.map_err(|source| StartError::Bind { addr: cfg.listen.admin, source })?;
    let data_addr = data.local_addr().expect("bound");
    let admin_addr = admin.local_addr().expect("bound");
    let grace = Duration::from_millis(cfg.shutdown.grace_ms);
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(16);
    let state = Arc::new(AppState {
        reload_tx,
        reload_status: Default::default(),
        freeze: tokio::sync::watch::Sender::new(None),
        migrations: Default::default(),
        sql_policy: crate::sqlclass::Policy::with_extra(&cfg.sql.deny_functions),
        sql_classes: Default::default(),
        snapshot: ArcSwap::from_pointee(snapshot),
        auth: crate::auth::Auth::new(&cfg.tokens),
        config: cfg,
        in_flight: AtomicUsize::new(0),
        accepting: AtomicBool::new(true),
    });
    let (stop, rx) = watch::channel(false);
    let reload_rx = reload_rx;
    let mut background = vec![crate::tasks::spawn("reload", crate::reload::run(state.clone(), reload_rx))];
    // SIGHUP re-reads the map file, like the watcher and POST /admin/map/reload.
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let tx = state.reload_tx.clone();
        background.push(crate::tasks::spawn("sighup", async move {
            while hup.recv().await.is_some() {
                let _ = tx
                    .send(crate::reload::Request {
                        source: crate::reload::Source::File { trigger: "sighup" },
                        reply: None,
                    })
                    .await;
            }
        }));
    }
    // Migrations an earlier process left unfinished (crash): their persisted state is loaded so
    // that status tells the truth and they can be resumed or aborted.
    crate::migrate::recover(&(state.clone() as Arc<dyn crate::migrate::Host>)).await;
    let watcher = if !state.config.map.watch {
        None
    } else {
        match crate::reload::watch(&state.config.map.path, state.reload_tx.clone()) {
            Ok((w, debounce)) => {
                background.push(debounce);
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the map file; reload with SIGHUP or the admin API");
                None
            }
        }
    };
    let tasks = vec![
        crate::tasks::spawn("listener_data", http::serve(data, Plane::Data, state.clone(), rx.clone(), grace)),
        crate::tasks::spawn("listener_admin", http::serve(admin, Plane::Admin, state.clone(), rx, grace)),
    ];
    tracing::info!(%data_addr, %admin_addr, map_version = state.pin().map.version().0, "cellgate serving");
    Ok(Running { data_addr, admin_addr, state, stop, tasks, background, _watcher: watcher })
}

/// The `serve` command: run until SIGTERM (graceful) or SIGINT (fast).
pub async fn run(config_path: &Path, insecure_no_auth: bool) -> Result<(), StartError> {
    let cfg = Config::load(config_path)?;
    let running = start(cfg, insecure_no_auth).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| StartError::Backends(format!("signal handler: {e}")))?;
    tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: draining");
            running.shutdown().await;
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: stopping now");
        }
    }
    Ok(())
}
