//! The read cache's mechanism (docs/cache.md): L1 in this process (bounded in bytes), L2 in a
//! shared Redis, the versions of every (database, cell) and (database, shard) kept current through
//! Redis pub/sub, single flight, whether anything may be served right now, and the hot reads
//! recorded in Redis for warming (`warm`; running them is the data plane's). Works on cells, shard
//! ids, keys and opaque bytes: what is cached, how keys are built from a request, and how values
//! are encoded is the data plane's (`dataplane::cache`). Must not import the application state or
//! anything above it; the migration control plane calls [`Cache::moved`].

pub mod codec;
pub mod flight;
pub mod key;
pub mod l1;
pub mod l2;
pub mod versions;
pub mod warm;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use h3o::CellIndex;

pub use codec::Entry;
pub use key::Digest;
use versions::{Mode, Rec};

use crate::config::CacheConfig;
use crate::telemetry::names;

/// Version records a table holds at most before it starts over (re-learning from Redis).
const VERSIONS_CAP: usize = 500_000;

/// The validated `[cache]` section.
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    pub l1_bytes: u64,
    pub max_ttl: Duration,
    pub max_entry_bytes: usize,
    pub compress_above: usize,
    pub redis_timeout: Duration,
    pub heartbeat: Duration,
    pub prefix: String,
    /// Recorded reads to prefill on start and after a migration (0 = never).
    pub warm_keys: usize,
    /// Time budget of one warming run.
    pub warm_budget: Duration,
    /// Count the cached reads answered here, for any instance's warming.
    pub warm_record: bool,
}

impl Settings {
    pub fn new(c: &CacheConfig) -> Self {
        Settings {
            enabled: c.enabled,
            l1_bytes: c.l1_bytes,
            max_ttl: Duration::from_millis(c.max_ttl_ms),
            max_entry_bytes: usize::try_from(c.max_entry_bytes).unwrap_or(usize::MAX),
            compress_above: usize::try_from(c.compress_above_bytes).unwrap_or(usize::MAX),
            redis_timeout: Duration::from_millis(c.redis_timeout_ms),
            heartbeat: Duration::from_millis(c.heartbeat_ms),
            prefix: c.prefix.clone(),
            warm_keys: usize::try_from(c.warm_keys).unwrap_or(usize::MAX),
            warm_budget: Duration::from_millis(c.warm_ms),
            warm_record: c.warm_record,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache.redis: {0}")]
    RedisUrl(String),
}

/// Why a read neither uses nor fills the cache (the `detail` of its `Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// `[cache] enabled = false`.
    Disabled,
    /// The Redis link is not live, or this instance owes Redis a bump.
    RedisDown,
    /// A read-your-writes read on an instance without Redis: no way to know other instances'
    /// writes.
    TokenWithoutRedis,
    /// The area covers more cells at the map resolution than a key may carry.
    AreaTooLarge,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Disabled => "disabled",
            Bypass::RedisDown => "redis-down",
            Bypass::TokenWithoutRedis => "token-without-redis",
            Bypass::AreaTooLarge => "area-too-large",
        }
    }
}

/// The versions a read's key is built from, and the session they belong to.
pub struct Versions {
    /// The Redis that keeps them (or this process, without Redis).
    pub run_id: Arc<str>,
    pub generation: u64,
    pub recs: Vec<Rec>,
    /// The version table's epoch when they were read: a fill is stored only if it has not moved.
    epoch: u64,
}

impl Versions {
    /// The version table's epoch when these were read (for [`Cache::store`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Counters for `/admin/cache` (the metrics facade cannot be read back).
#[derive(Default)]
struct Stats {
    hits_l1: AtomicU64,
    hits_l2: AtomicU64,
    stale: AtomicU64,
    misses: AtomicU64,
    fills_l1: AtomicU64,
    fills_l2: AtomicU64,
    merges: AtomicU64,
    bypass: AtomicU64,
    not_stored: AtomicU64,
    bumps: AtomicU64,
}

/// Hands a lookup's outcome to the counters and metrics (labels: level, db — never cells).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    HitL1,
    HitL2,
    Stale,
    Miss,
    Merged,
    Bypass(Bypass),
    /// Served but not stored (too large, or `no-store`).
    NotStored,
}

pub struct Cache {
    settings: Settings,
    l1: Arc<l1::L1>,
    table: Arc<versions::Table>,
    link: Option<Arc<l2::Link>>,
    /// The run id of the versions without Redis: this process.
    local_run: Arc<str>,
    pub flights: flight::Flights<FlightResult>,
    stats: Stats,
    supervisor: Option<tokio::task::JoinHandle<()>>,
    /// Hot reads recorded for warming, and the cutovers that call for it (Redis only).
    hot: Option<(Arc<warm::Hot>, Arc<l2::Link>)>,
    flusher: Option<tokio::task::JoinHandle<()>>,
}

/// What a fill hands to the callers that waited for it.
pub type FlightResult = Result<Arc<Entry>, crate::error::ApiError>;

impl Drop for Cache {
    fn drop(&mut self) {
        for t in [&self.supervisor, &self.flusher].into_iter().flatten() {
            t.abort();
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// A name for this process's cache (heartbeats, the L1-only run id): pid, clock and a random
/// hasher seed.
pub(crate) fn instance_id() -> String {
    use std::hash::BuildHasher;
    let seed = std::collections::hash_map::RandomState::new().hash_one(now_us());
    format!("{}-{:x}", std::process::id(), seed)
}

impl Cache {
    /// Build the cache; with Redis, start the link's supervisor (it connects in the background:
    /// until it is live, reads go to the backends). Must run inside a tokio runtime.
    pub fn start(c: &CacheConfig) -> Result<Arc<Cache>, CacheError> {
        let settings = Settings::new(c);
        let l1 = Arc::new(l1::L1::new(settings.l1_bytes));
        let table = Arc::new(versions::Table::new(VERSIONS_CAP));
        let mut link = None;
        let mut supervisor = None;
        let (mut hot, mut flusher) = (None, None);
        if settings.enabled
            && let Some(url) = &c.redis
        {
            let client = redis::Client::open(url.as_str()).map_err(|e| CacheError::RedisUrl(e.to_string()))?;
            let h = Arc::new(warm::Hot::new(&settings.prefix, settings.warm_record));
            let l = Arc::new(l2::Link::new(
                client,
                &settings.prefix,
                settings.redis_timeout,
                settings.heartbeat,
                table.clone(),
                l1.clone(),
                h.clone(),
            ));
            supervisor = Some(crate::tasks::spawn("cache_redis", l.clone().supervise()));
            if settings.warm_record {
                flusher = Some(crate::tasks::spawn("cache_warm_record", h.clone().flush_loop(l.clone())));
            }
            hot = Some((h, l.clone()));
            link = Some(l);
        }
        Ok(Arc::new(Cache {
            settings,
            l1,
            table,
            link,
            local_run: Arc::from(instance_id().as_str()),
            flights: flight::Flights::default(),
            stats: Stats::default(),
            supervisor,
            hot,
            flusher,
        }))
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn has_redis(&self) -> bool {
        self.link.is_some()
    }

    /// Warming's Redis side and the link it runs on (`None` without Redis: nothing is recorded,
    /// nothing can be warmed).
    pub fn hot(&self) -> Option<(&warm::Hot, &l2::Link)> {
        self.hot.as_ref().map(|(h, l)| (h.as_ref(), l.as_ref()))
    }

    /// Whether this instance may serve and store now (the Redis link is live and owes nothing).
    pub fn serving(&self) -> bool {
        match &self.link {
            _ if !self.enabled() => false,
            Some(l) => l.serving().is_some(),
            None => true,
        }
    }

    pub fn cell_key(&self, db: &str, cell: CellIndex) -> String {
        versions::cell_key(&self.settings.prefix, db, u64::from(cell))
    }

    pub fn shard_key(&self, db: &str, shard: &str) -> String {
        versions::shard_key(&self.settings.prefix, db, shard)
    }

    /// The versions of `keys` for a read's key, or why the read must bypass the cache.
    /// `authoritative` (read-your-writes reads) asks Redis even when this instance knows them:
    /// the pub/sub message of another instance's write may not have arrived yet, but its bump
    /// reached Redis before that write was acknowledged.
    pub async fn versions(&self, keys: &[String], authoritative: bool) -> Result<Versions, Bypass> {
        if !self.enabled() {
            return Err(Bypass::Disabled);
        }
        let Some(link) = &self.link else {
            if authoritative {
                return Err(Bypass::TokenWithoutRedis);
            }
            let recs = keys.iter().map(|k| self.table.get_or_default(k)).collect();
            return Ok(Versions { run_id: self.local_run.clone(), generation: 0, recs, epoch: self.table.epoch() });
        };
        // 1. Read the epoch before anything, so a clear during this call shows.
        let epoch = self.table.epoch();
        let (run_id, generation) = link.serving().ok_or(Bypass::RedisDown)?;
        if !authoritative && let Some(recs) = self.table.get_all(keys) {
            // 2. Known here: valid if the session did not end meanwhile.
            return match link.serving() {
                Some((r, _)) if r == run_id && self.table.epoch() == epoch => {
                    Ok(Versions { run_id, generation, recs, epoch })
                }
                _ => Err(Bypass::RedisDown),
            };
        }
        // 3. From Redis: kept only if the same Redis answered and no clear came in between.
        let f = link.fetch(keys).await.map_err(|_| Bypass::RedisDown)?;
        if f.run_id != run_id {
            return Err(Bypass::RedisDown);
        }
        for (k, r) in keys.iter().zip(f.recs) {
            if !self.table.fill(epoch, k, r) {
                return Err(Bypass::RedisDown);
            }
        }
        // 4. The table now holds, per key, the newer of Redis's answer and any message that
        //    overtook it.
        let recs = self.table.get_all(keys).ok_or(Bypass::RedisDown)?;
        match link.serving() {
            Some((r, g)) if r == run_id && self.table.epoch() == epoch => {
                Ok(Versions { run_id, generation: f.generation.max(g), recs, epoch })
            }
            _ => Err(Bypass::RedisDown),
        }
    }

    /// L1, then L2 (an L2 hit is copied into L1). `None`: not cached (or Redis failed).
    pub async fn get(&self, k: &Digest) -> Option<(Arc<Entry>, Event)> {
        if let Some(e) = self.l1.get(k) {
            return Some((e, Event::HitL1));
        }
        let link = self.link.as_ref()?;
        let bytes = link.get(k).await.ok()??;
        let e = Arc::new(codec::decode(&bytes, self.settings.max_entry_bytes).ok()?);
        if e.stale_until_ms() <= now_ms() {
            return None;
        }
        self.l1.insert(*k, e.clone());
        Some((e, Event::HitL2))
    }

    /// Store a fill in L1 and (in the background) L2, unless the versions it was keyed with were
    /// read in an earlier epoch of the version table (a session that has ended since). Returns
    /// whether it was stored.
    pub fn store(self: &Arc<Self>, k: Digest, e: Arc<Entry>, epoch: u64) -> bool {
        if e.body.len() > self.settings.max_entry_bytes || self.table.epoch() != epoch {
            return false;
        }
        // An entry larger than the whole L1 (`l1_bytes` below `max_entry_bytes`) still goes to
        // Redis: L1 refusing it must not leave it cached nowhere.
        let in_l1 = self.l1.insert(k, e.clone());
        if in_l1 {
            self.stats.fills_l1.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(names::CACHE_FILLS, "level" => "l1").increment(1);
        }
        let Some(link) = &self.link else { return in_l1 };
        let (link, this) = (link.clone(), self.clone());
        let ttl = Duration::from_millis(e.stale_until_ms().saturating_sub(now_ms()));
        crate::tasks::spawn("cache_l2_fill", async move {
            let bytes = codec::encode(&e, this.settings.compress_above);
            let n = bytes.len();
            if link.set(&k, bytes, ttl).await.is_ok() {
                this.stats.fills_l2.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::CACHE_FILLS, "level" => "l2").increment(1);
                metrics::counter!(names::CACHE_STORED_BYTES, "level" => "l2").increment(n as u64);
            }
        });
        true
    }

    /// Count a lookup's outcome.
    pub fn record(&self, db: &str, ev: Event) {
        let s = &self.stats;
        let db = db.to_string();
        let (counter, name, level) = match ev {
            Event::HitL1 => (&s.hits_l1, names::CACHE_HITS, Some("l1")),
            Event::HitL2 => (&s.hits_l2, names::CACHE_HITS, Some("l2")),
            Event::Stale => (&s.stale, names::CACHE_HITS, Some("stale")),
            Event::Miss => (&s.misses, names::CACHE_MISSES, None),
            Event::Merged => (&s.merges, names::CACHE_MERGES, None),
            Event::NotStored => (&s.not_stored, names::CACHE_NOT_STORED, None),
            Event::Bypass(b) => {
                s.bypass.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::CACHE_BYPASS, "db" => db, "reason" => b.as_str()).increment(1);
                return;
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match level {
            Some(level) => metrics::counter!(name, "db" => db, "level" => level).increment(1),
            None => metrics::counter!(name, "db" => db).increment(1),
        }
    }

    /// Bump versions: `items` are (version key, shard tag, position). Without Redis the local
    /// table is the authority. With Redis a failed `Commit`/`Moved` bump is owed (the link
    /// stops serving before this returns; docs/cache.md, *Redis down*).
    pub async fn bump(&self, mode: Mode, items: Vec<(String, String, u64)>) {
        if !self.enabled() || items.is_empty() {
            return;
        }
        self.stats.bumps.fetch_add(1, Ordering::Relaxed);
        match &self.link {
            None => {
                for (k, tag, pos) in &items {
                    self.table.bump_local(k, mode, tag, *pos);
                }
                metrics::counter!(names::CACHE_INVALIDATIONS, "mode" => mode.as_str(), "source" => "local")
                    .increment(items.len() as u64);
            }
            Some(link) => {
                if let Err(e) = link.bump(mode, items).await {
                    tracing::warn!(error = %e, mode = mode.as_str(), "cache: version bump did not reach redis");
                }
            }
        }
    }

    /// A migration cutover published a map that moves `cells` (any resolution) from shard `from`
    /// to shard `to`: bump every database's versions of the moved cells at the map resolution
    /// (tag `moved`: fills go to the primary until the target's replicas surely hold the copy),
    /// or — more cells than a key may carry — the shard-wide versions of both shards.
    pub async fn moved(&self, map: &crate::shardmap::ShardMap, cells: &[CellIndex], from: &str, to: &str) {
        if !self.enabled() {
            return;
        }
        let at = now_ms();
        let mut items = Vec::new();
        for db in map.databases().keys() {
            match key::cells_at(map.resolution(), cells) {
                Some(cs) => items.extend(cs.into_iter().map(|c| (self.cell_key(db, c), String::new(), at))),
                None => items.extend([from, to].map(|s| (self.shard_key(db, s), String::new(), at))),
            }
        }
        tracing::info!(keys = items.len(), from, to, "cache: migration cutover bumps the moved cells");
        self.bump(Mode::Moved, items).await;
    }

    /// `GET /admin/cache`.
    pub fn status_json(&self) -> serde_json::Value {
        let (entries, bytes, cap, evicted) = self.l1.usage();
        let s = &self.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let serving = self.serving();
        let warm = self.hot.as_ref().map(|(h, _)| h.status(self.settings.warm_keys, self.settings.warm_budget));
        serde_json::json!({
            "enabled": self.enabled(),
            "mode": if self.link.is_some() { "l1+redis" } else { "l1" },
            "serving": serving,
            "redis": self.link.as_ref().map(|l| l.status()),
            "l1": {"entries": entries, "bytes": bytes, "max_bytes": cap, "evicted": evicted},
            "versions_known": self.table.len(),
            "warm": warm,
            "flights": self.flights.len(),
            "counters": {
                "hits_l1": n(&s.hits_l1), "hits_l2": n(&s.hits_l2), "stale_served": n(&s.stale),
                "misses": n(&s.misses), "fills_l1": n(&s.fills_l1), "fills_l2": n(&s.fills_l2),
                "single_flight_merges": n(&s.merges), "bypassed": n(&s.bypass), "not_stored": n(&s.not_stored),
                "bumps": n(&s.bumps),
            },
            "limits": {
                "max_ttl_ms": self.settings.max_ttl.as_millis() as u64,
                "max_entry_bytes": self.settings.max_entry_bytes,
                "compress_above_bytes": self.settings.compress_above,
                "redis_timeout_ms": self.settings.redis_timeout.as_millis() as u64,
                "heartbeat_ms": self.settings.heartbeat.as_millis() as u64,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CacheConfig {
        CacheConfig { enabled: true, ..Default::default() }
    }

    #[tokio::test]
    async fn without_redis_local_versions_move_on_bumps() {
        let c = Cache::start(&cfg()).unwrap();
        let k = c.cell_key("core", h3o::LatLng::new(40.4, -3.7).unwrap().to_cell(h3o::Resolution::Five));
        let v0 = c.versions(std::slice::from_ref(&k), false).await.unwrap();
        assert_eq!(v0.recs[0].v, 0);
        c.bump(Mode::Commit, vec![(k.clone(), "a".into(), 42)]).await;
        let v1 = c.versions(std::slice::from_ref(&k), false).await.unwrap();
        assert_eq!(v1.recs[0], Rec { v: 1, shard: "a".into(), pos: 42 });
        assert_eq!(v1.run_id, v0.run_id);
        assert_eq!(c.versions(&[k], true).await.err(), Some(Bypass::TokenWithoutRedis));
    }

    #[tokio::test]
    async fn disabled_does_nothing() {
        let c = Cache::start(&CacheConfig::default()).unwrap();
        assert_eq!(c.versions(&["x".into()], false).await.err(), Some(Bypass::Disabled));
        c.bump(Mode::Commit, vec![("x".into(), "a".into(), 1)]).await;
        assert_eq!(c.table.len(), 0);
    }
}
