//! The application state every listener and task shares: the published snapshot, process
//! config, auth, the in-flight counter, the reload channel, the migration registry and freeze, and
//! the listeners' TLS.
//! Holds state; owns no behaviour beyond pinning a snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::state::Snapshot;

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub config: Config,
    pub auth: crate::auth::Auth,
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
}
