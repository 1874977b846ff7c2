//! The published state: one `ArcSwap<Snapshot>` holding map + backends + version. A request
//! pins one snapshot (`load_full`) from start to finish; only the loader stores new ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::backend::Backends;
use crate::config::Config;
use crate::shardmap::ShardMap;

pub struct Snapshot {
    pub map: ShardMap,
    pub backends: Backends,
    /// SHA-256 of the map source text (hex).
    pub sha256: String,
    /// The map source text as loaded (`${VAR}` unexpanded). Migrations derive map v+1 from it.
    /// Never served: it may hold inline secrets.
    pub text: String,
    /// Where the map came from (file path).
    pub source: String,
    pub loaded_at: SystemTime,
}

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
}

impl AppState {
    pub fn pin(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }
}
