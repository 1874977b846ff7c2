//! The application state every listener and task shares: the published snapshot, process
//! config, auth, the in-flight counter, the reload channel, the migration registry and freeze, the
//! listeners' TLS and the read cache.
//! Holds state; owns no behaviour beyond pinning a snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::state::Snapshot;

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub config: Config,
    /// Tokens, client identities and the peer token; reloaded without a restart.
    pub credentials: Arc<crate::credentials::Credentials>,
    pub in_flight: AtomicUsize,
    /// False once shutdown starts (readiness turns false first, then listeners stop).
    pub accepting: AtomicBool,
    /// The reload channel: the only way to change `snapshot`.
    pub reload_tx: crate::reload::Sender,
    pub reload_status: crate::reload::Status,
    /// Cells whose writes are held (live-migration cutover). `None` = nothing frozen.
    pub freeze: tokio::sync::watch::Sender<Option<Arc<crate::migrate::Freeze>>>,
    pub migrations: crate::migrate::Registry,
    /// The statement policy (built-in denied functions + `[sql] deny_functions`) and the
    /// classifications of the SQL texts seen, each text parsed once.
    pub sql_policy: crate::sqlclass::Policy,
    pub sql_classes: crate::sqlclass::ClassCache,
    /// HTTPS of the two listeners (`None` each = cleartext): serving pairs and reload status.
    pub listen_tls: crate::listen_tls::Listeners,
    /// The read cache (docs/cache.md); does nothing unless `[cache] enabled`.
    pub cache: std::sync::Arc<crate::cache::Cache>,
    /// The link to etcd in fleet mode (`map = { etcd = ... }`, docs/fleet.md); `None` in file mode.
    pub etcd: Option<Arc<crate::etcd::Link>>,
}

impl AppState {
    pub fn pin(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }
}

impl crate::reload::Host for AppState {
    fn snapshot(&self) -> &ArcSwap<Snapshot> {
        &self.snapshot
    }
    fn config(&self) -> &Config {
        &self.config
    }
    fn reload_status(&self) -> &crate::reload::Status {
        &self.reload_status
    }
}

impl crate::migrate::Host for AppState {
    fn pin(&self) -> Arc<Snapshot> {
        AppState::pin(self)
    }
    fn config(&self) -> &Config {
        &self.config
    }
    fn reload_tx(&self) -> &crate::reload::Sender {
        &self.reload_tx
    }
    fn freeze(&self) -> &tokio::sync::watch::Sender<Option<Arc<crate::migrate::Freeze>>> {
        &self.freeze
    }
    fn migrations(&self) -> &crate::migrate::Registry {
        &self.migrations
    }
    fn peer_token(&self) -> Option<String> {
        self.credentials.auth().peer_token().map(str::to_string)
    }
    fn cache(&self) -> &crate::cache::Cache {
        &self.cache
    }
    fn etcd(&self) -> Option<&crate::etcd::Link> {
        self.etcd.as_deref()
    }
}
