//! The cache as a step of the read policy (docs/cache.md): which reads use it (opted in by the
//! request), the key of a read (what it asks, the cells at the map resolution it reads, and the
//! version of each of them and of each shard it asks), L1 → L2 → backend with single flight and
//! stale-while-revalidate, the floors a fill must respect on replicas (a fill may not read a
//! replica that has not replayed the last write recorded for its cells), and the version bumps
//! around every write. Works on plans' parts and encoded values; knows no HTTP (the headers are
//! rendered from [`CacheStatus`] in `http::respond`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use h3o::CellIndex;

use super::{ApiError, Consistency, Outcome};
use crate::app::AppState;
use crate::cache::key::{self, KeyBuilder};
use crate::cache::versions::{MOVED, Mode, Rec};
use crate::cache::{Bypass, Cache, Digest, Entry, Event, Versions, now_ms};
use crate::routing::{self, RegionRoute};
use crate::shardmap::{CachePolicy, ShardMap};
use crate::state::Snapshot;

/// What a read asks of the cache: the body's `cache` member (`None`: not opted in) and the
/// request's `Cache-Control` directives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheAsk {
    /// `(ttl, swr)` as asked, before the `[cache] max_ttl_ms` cap.
    pub opt_in: Option<(Duration, Duration)>,
    /// `"cache": false`: never cached, whatever the table's policy says.
    pub opt_out: bool,
    /// `no-cache`: do not use a stored entry; read the backend and store the answer.
    pub no_cache: bool,
    /// `no-store`: do not store the answer.
    pub no_store: bool,
    /// `only-if-cached`: answer from the cache or not at all (504 `not_cached`).
    pub only_if_cached: bool,
}

impl CacheAsk {
    /// `(ttl, swr)` capped by `max`; `None` when the read did not opt in.
    fn limits(&self, max: Duration) -> Option<(Duration, Duration)> {
        self.opt_in.map(|(t, s)| (t.min(max), s.min(max)))
    }

    /// The ask with the map's policy for the tables the read reads: a read that says nothing
    /// itself takes it; its own `cache` member (or `false`) wins.
    pub fn with_policy(&self, policy: Option<CachePolicy>) -> CacheAsk {
        let mut ask = self.clone();
        if ask.opt_in.is_none()
            && !ask.opt_out
            && let Some(p) = policy
        {
            ask.opt_in = Some((Duration::from_millis(p.ttl_ms), Duration::from_millis(p.swr_ms)));
        }
        ask
    }

    /// Whether the read goes through the cache step at all.
    pub fn uses_cache(&self) -> bool {
        self.opt_in.is_some() || self.only_if_cached
    }
}

/// The policy that covers a read of `tables` of `db`: every one of them must have one (a read
/// that also looks at an uncached table is not cached), and the shortest TTL and window win.
/// No tables (`SELECT 1`), or `None` (not a plain query): no policy.
pub fn policy_for(map: &ShardMap, db: &str, tables: Option<&[String]>) -> Option<CachePolicy> {
    let specs = map.tables().get(db)?;
    let tables = tables.filter(|t| !t.is_empty())?;
    let mut out: Option<CachePolicy> = None;
    for t in tables {
        // Unquoted names reach here lowercased (`sqlclass`), the map spells them as written.
        let spec = specs.get(t).or_else(|| specs.iter().find(|(k, _)| k.to_lowercase() == *t).map(|(_, s)| s))?;
        let p = spec.cache?;
        out = Some(match out {
            None => p,
            Some(o) => CachePolicy { ttl_ms: o.ttl_ms.min(p.ttl_ms), swr_ms: o.swr_ms.min(p.swr_ms) },
        });
    }
    out
}

/// Which level answered a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    L1,
    L2,
}

/// What the cache did for a read (rendered as `Cache-Status` and `Age` by `http::respond`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache; `stale` within the stale-while-revalidate window (a refresh runs).
    Hit { level: Level, stale: bool, ttl_s: i64, age_s: u64 },
    /// Read from the backend: `no_cache` when the request asked for it, `collapsed` when another
    /// request's read (single flight) answered it, `stored` when the answer is now cached.
    Forward { no_cache: bool, collapsed: bool, stored: bool, ttl_s: Option<i64> },
    /// Not used at all, and why.
    Bypass(Bypass),
    /// `only-if-cached` found nothing.
    OnlyIfCachedMiss,
}

/// What a fill must respect on one shard: the primary, or a replica that replayed this far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    Primary,
    After(u64),
}

/// Per shard id; a shard without an entry has no floor.
pub type Floors = BTreeMap<String, Floor>;

fn raise(floors: &mut Floors, shard: &str, f: Floor) {
    let cur = floors.entry(shard.to_string()).or_insert(f);
    *cur = match (*cur, f) {
        (Floor::Primary, _) | (_, Floor::Primary) => Floor::Primary,
        (Floor::After(a), Floor::After(b)) => Floor::After(a.max(b)),
    };
}

/// The consistency a read uses on `shard`: the request's, raised to the shard's floor.
pub fn with_floor(c: &Consistency, shard: &str, floors: &Floors) -> Consistency {
    match (floors.get(shard), c) {
        (None, _) | (_, Consistency::Primary) => c.clone(),
        (Some(Floor::Primary), _) => Consistency::Primary,
        (Some(Floor::After(p)), Consistency::Replica) => {
            Consistency::After { shard: shard.to_string(), lsn: *p, wait: Duration::ZERO }
        }
        (Some(Floor::After(p)), Consistency::After { shard: t, lsn, wait }) => {
            let lsn = if t == shard { (*lsn).max(*p) } else { *p };
            Consistency::After { shard: shard.to_string(), lsn, wait: *wait }
        }
    }
}

/// The shard tag of a commit whose backend reported no position: `@<shard>`, with the commit's
/// time as position (fills go to the primary for a while after it).
fn timed_tag(shard: &str) -> String {
    format!("@{shard}")
}

/// The floor one version record puts on the shard that owns its cell (or is its shard) now.
/// `window_ms`: how long after a move or a position-less write replicas may still lack it.
fn floor_of(rec: &Rec, owner: &str, now: u64, window_ms: u64) -> Option<Floor> {
    let recent = |t: u64| now.saturating_sub(t) < window_ms;
    match rec.shard.as_str() {
        "" => None,
        MOVED => recent(rec.pos).then_some(Floor::Primary),
        t if t.strip_prefix('@') == Some(owner) => recent(rec.pos).then_some(Floor::Primary),
        t if t == owner => Some(Floor::After(rec.pos)),
        // Last written on another shard: the cell moved since without a migration's bump (a map
        // edit); no position on this shard says what its replicas hold.
        _ => Some(Floor::Primary),
    }
}

/// A value the cache stores: the data plane's own encoding of a read's answer. `None` from
/// `encode`: this answer is not stored (and waiting callers read for themselves).
pub(super) trait Cached: Sized + Send + 'static {
    fn encode(&self) -> Option<Vec<u8>>;
    fn decode(b: &[u8]) -> Option<Self>;
}

/// The backend read of a cached read, given the floors per shard; owned (`'static`), so a
/// stale-while-revalidate refresh can run it after the request is answered.
pub(super) type FillFn<V> =
    Arc<dyn Fn(Floors) -> Pin<Box<dyn Future<Output = Result<V, ApiError>> + Send>> + Send + Sync>;

/// A read as the cache step sees it.
pub(super) struct Read<'a> {
    pub db: &'a str,
    /// Separates key spaces: `sql`, `find`, `aggregate`, `count`.
    pub kind: &'static str,
    pub snap: &'a Snapshot,
    pub route: &'a RegionRoute,
    pub consistency: &'a Consistency,
    pub ask: &'a CacheAsk,
}

/// The cells at the map resolution a route reads, each with the shard that owns it now.
pub(super) fn cells_of(snap: &Snapshot, route: &RegionRoute) -> Result<Vec<(CellIndex, Option<String>)>, Bypass> {
    let id = |s| snap.map.shard(s).id.to_string();
    match route {
        RegionRoute::One(r) => Ok(vec![(r.cell, Some(id(r.shard)))]),
        RegionRoute::Many(area) => {
            let cover: Vec<CellIndex> = area.shards.iter().flat_map(|(_, cs)| cs.iter().copied()).collect();
            let cells = key::cells_at(snap.map.resolution(), &cover).ok_or(Bypass::AreaTooLarge)?;
            Ok(cells.into_iter().map(|c| (c, routing::route(&snap.map, c).ok().map(|o| id(o.shard)))).collect())
        }
    }
}

pub(super) fn shards_of(snap: &Snapshot, route: &RegionRoute) -> Vec<String> {
    match route {
        RegionRoute::One(r) => vec![snap.map.shard(r.shard).id.to_string()],
        RegionRoute::Many(area) => area.shards.iter().map(|(s, _)| snap.map.shard(*s).id.to_string()).collect(),
    }
}

/// A read's key, the versions it was built from, and its fill's floors.
struct Prepared {
    key: Digest,
    versions: Versions,
    floors: Floors,
}

async fn prepare(state: &AppState, r: &Read<'_>, parts: impl FnOnce(&mut KeyBuilder)) -> Result<Prepared, Bypass> {
    let cache = &state.cache;
    let cells = cells_of(r.snap, r.route)?;
    let shards = shards_of(r.snap, r.route);
    let mut keys: Vec<String> = cells.iter().map(|(c, _)| cache.cell_key(r.db, *c)).collect();
    keys.extend(shards.iter().map(|s| cache.shard_key(r.db, s)));
    // A read-your-writes read asks Redis: its write's bump is there before its acknowledgement,
    // while the pub/sub message may still be on its way here.
    let authoritative = matches!(r.consistency, Consistency::After { .. });
    let versions = cache.versions(&keys, authoritative).await?;
    let (cell_recs, shard_recs) = versions.recs.split_at(cells.len());
    let mut b = KeyBuilder::new(r.kind);
    b.str(&versions.run_id).u64(versions.generation).str(r.db);
    parts(&mut b);
    b.u64(cells.len() as u64);
    for ((c, _), rec) in cells.iter().zip(cell_recs) {
        b.u64(u64::from(*c)).u64(rec.v);
    }
    for (s, rec) in shards.iter().zip(shard_recs) {
        b.str(s).u64(rec.v);
    }
    let h = &state.config.health;
    let window = h.max_lag_ms + 2 * h.interval_ms;
    let now = now_ms();
    let mut floors = Floors::new();
    for ((_, owner), rec) in cells.iter().zip(cell_recs) {
        if let Some(o) = owner
            && let Some(f) = floor_of(rec, o, now, window)
        {
            raise(&mut floors, o, f);
        }
    }
    for (s, rec) in shards.iter().zip(shard_recs) {
        if let Some(f) = floor_of(rec, s, now, window) {
            raise(&mut floors, s, f);
        }
    }
    Ok(Prepared { key: b.finish(), versions, floors })
}

fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// The cache step of a read: serve from L1 or L2, or run `fill` once per instance for every
/// concurrent identical miss and store the answer; reads that did not opt in, or that the cache
/// cannot serve now, run `fill` directly.
pub(super) async fn read<V: Cached>(
    state: &AppState,
    r: Read<'_>,
    parts: impl FnOnce(&mut KeyBuilder),
    fill: FillFn<V>,
    out: &mut Outcome,
) -> Result<V, ApiError> {
    let cache = &state.cache;
    let Some((ttl, swr)) = r.ask.limits(cache.settings().max_ttl) else {
        if r.ask.only_if_cached {
            out.cache = Some(CacheStatus::OnlyIfCachedMiss);
            return Err(ApiError::NotCached);
        }
        return fill(Floors::new()).await;
    };
    let p = match prepare(state, &r, parts).await {
        Ok(p) => p,
        Err(b) => {
            cache.record(r.db, Event::Bypass(b));
            if r.ask.only_if_cached {
                out.cache = Some(CacheStatus::OnlyIfCachedMiss);
                return Err(ApiError::NotCached);
            }
            out.cache = Some(CacheStatus::Bypass(b));
            return fill(Floors::new()).await;
        }
    };
    if !r.ask.no_cache
        && let Some((e, ev)) = cache.get(&p.key).await
        && let Some(v) = V::decode(&e.body)
    {
        let now = now_ms();
        let stale = now >= e.fresh_until_ms();
        if stale && !cache.flights.running(&p.key) {
            refresh(cache.clone(), r.db.to_string(), p.key, p.versions.epoch(), fill, p.floors, ttl, swr);
        }
        cache.record(r.db, if stale { Event::Stale } else { ev });
        let level = if ev == Event::HitL2 { Level::L2 } else { Level::L1 };
        let ttl_s = secs(e.fresh_until_ms() as i64 - now as i64);
        let age_s = now.saturating_sub(e.filled_at_ms) / 1000;
        out.cache = Some(CacheStatus::Hit { level, stale, ttl_s, age_s });
        return Ok(v);
    }
    if r.ask.only_if_cached {
        cache.record(r.db, Event::Miss);
        out.cache = Some(CacheStatus::OnlyIfCachedMiss);
        return Err(ApiError::NotCached);
    }
    cache.record(r.db, Event::Miss);
    let store = !r.ask.no_store;
    if r.ask.no_cache {
        // Refresh: a read of its own (not joined to one that may have started before this
        // request), stored for the next.
        let v = fill(p.floors).await?;
        let stored = store && keep(cache, r.db, p.key, &p.versions, &v, ttl, swr).is_some();
        out.cache = Some(CacheStatus::Forward {
            no_cache: true,
            collapsed: false,
            stored,
            ttl_s: stored.then(|| secs(ttl.as_millis() as i64)),
        });
        return Ok(v);
    }
    // Single flight: the first caller's fill answers every caller waiting on the same key.
    let mut mine = None;
    let mut stored = false;
    let floors = p.floors.clone();
    let (result, merged) = cache
        .flights
        .run(p.key, async {
            let v = fill(p.floors).await?;
            let e = if store { keep(cache, r.db, p.key, &p.versions, &v, ttl, swr) } else { None };
            stored = e.is_some();
            // An answer that could not be encoded is shared as an empty body: the waiting
            // callers then read for themselves.
            let e = e.unwrap_or_else(|| Arc::new(entry(v.encode().unwrap_or_default(), ttl, swr)));
            mine = Some(v);
            Ok(e)
        })
        .await;
    let v = match mine {
        Some(v) => v,
        None => {
            cache.record(r.db, Event::Merged);
            match V::decode(&result?.body) {
                Some(v) => v,
                None => fill(floors).await?,
            }
        }
    };
    out.cache = Some(CacheStatus::Forward {
        no_cache: false,
        collapsed: merged,
        stored,
        ttl_s: stored.then(|| secs(ttl.as_millis() as i64)),
    });
    Ok(v)
}

fn entry(body: Vec<u8>, ttl: Duration, swr: Duration) -> Entry {
    Entry { body: body.into(), filled_at_ms: now_ms(), ttl_ms: ttl.as_millis() as u64, swr_ms: swr.as_millis() as u64 }
}

/// Store a fill's answer; the stored entry, or `None` when it was not stored (too large, not
/// encodable, or the session its versions came from ended).
fn keep<V: Cached>(
    cache: &Arc<Cache>,
    db: &str,
    key: Digest,
    versions: &Versions,
    v: &V,
    ttl: Duration,
    swr: Duration,
) -> Option<Arc<Entry>> {
    let stored = v
        .encode()
        .map(|body| Arc::new(entry(body, ttl, swr)))
        .filter(|e| cache.store(key, e.clone(), versions.epoch()));
    if stored.is_none() {
        cache.record(db, Event::NotStored);
    }
    stored
}

/// Stale-while-revalidate: one background fill of a stale entry's key (joined to any fill of
/// it already running).
#[allow(clippy::too_many_arguments)]
fn refresh<V: Cached>(
    cache: Arc<Cache>,
    db: String,
    key: Digest,
    epoch: u64,
    fill: FillFn<V>,
    floors: Floors,
    ttl: Duration,
    swr: Duration,
) {
    crate::tasks::spawn("cache_refresh", async move {
        let c = cache.clone();
        let _ = cache
            .flights
            .run(key, async move {
                let v = fill(floors).await?;
                let e = Arc::new(entry(v.encode().unwrap_or_default(), ttl, swr));
                if e.body.is_empty() || !c.store(key, e.clone(), epoch) {
                    c.record(&db, Event::NotStored);
                }
                Ok(e)
            })
            .await;
    });
}

/// A write's version bumps (docs/cache.md, *Ordering*). In order:
/// 1. [`WriteBumps::begin`], before the write runs: bump the versions (`pre`), so an entry
///    filled before the write started is unreachable even if step 3 never happens (the process
///    dies after the commit);
/// 2. the write runs;
/// 3. [`WriteBumps::done`], after the backend answered and before the write is acknowledged:
///    bump again (`commit`, with the shard and commit position). A fill that read the versions
///    of step 1 may hold pre-write rows — this bump makes its entry unreachable. A fill that
///    reads the versions of step 3 started after the commit (it reads versions before it reads
///    the backend), and its floor (the commit position) keeps it off replicas that have not
///    replayed the write;
/// 4. dropped without step 3 (the request was abandoned mid-write, when the statement may still
///    commit): step 3 runs in the background once the statement's deadline has passed.
pub(super) struct WriteBumps {
    cache: Arc<Cache>,
    /// (version key, shard that runs the write)
    keys: Vec<(String, String)>,
    armed: bool,
    deadline: Duration,
}

impl WriteBumps {
    /// Step 1 for a write to `cells` (each with the shard it runs on) and, for DDL, the whole
    /// `shard_wide` shard.
    pub async fn begin(
        state: &AppState,
        db: &str,
        cells: &[(CellIndex, &str)],
        shard_wide: Option<&str>,
    ) -> WriteBumps {
        let cache = state.cache.clone();
        let deadline = state.config.request_timeout();
        if !cache.enabled() {
            return WriteBumps { cache, keys: Vec::new(), armed: false, deadline };
        }
        let mut keys: Vec<(String, String)> =
            cells.iter().map(|(c, s)| (cache.cell_key(db, *c), s.to_string())).collect();
        keys.sort();
        keys.dedup();
        if let Some(s) = shard_wide {
            keys.push((cache.shard_key(db, s), s.to_string()));
        }
        cache.bump(Mode::Pre, keys.iter().map(|(k, s)| (k.clone(), s.clone(), 0)).collect()).await;
        WriteBumps { cache, keys, armed: true, deadline }
    }

    /// Step 3. `pos` gives each shard's commit position (`None` or 0: the backend reports none).
    pub async fn done(mut self, pos: impl Fn(&str) -> Option<u64>) {
        if !std::mem::replace(&mut self.armed, false) {
            return;
        }
        let now = now_ms();
        let items = self
            .keys
            .iter()
            .map(|(k, s)| match pos(s).filter(|p| *p > 0) {
                Some(p) => (k.clone(), s.clone(), p),
                None => (k.clone(), timed_tag(s), now),
            })
            .collect();
        self.cache.bump(Mode::Commit, items).await;
    }

    /// The write was refused before anything ran (a migration fence): no step 3.
    pub fn nothing_written(mut self) {
        self.armed = false;
    }
}

impl Drop for WriteBumps {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // 4.
        let (cache, keys, wait) = (self.cache.clone(), std::mem::take(&mut self.keys), self.deadline);
        crate::tasks::spawn("cache_late_bump", async move {
            tokio::time::sleep(wait).await;
            let now = now_ms();
            cache.bump(Mode::Commit, keys.into_iter().map(|(k, s)| (k, timed_tag(&s), now)).collect()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: u64, shard: &str, pos: u64) -> Rec {
        Rec { v, shard: shard.into(), pos }
    }

    #[test]
    fn floors_from_records() {
        let now = 1_000_000;
        assert_eq!(floor_of(&rec(0, "", 0), "a", now, 1000), None);
        assert_eq!(floor_of(&rec(3, "a", 77), "a", now, 1000), Some(Floor::After(77)));
        assert_eq!(floor_of(&rec(3, "b", 77), "a", now, 1000), Some(Floor::Primary));
        assert_eq!(floor_of(&rec(3, MOVED, now - 10), "a", now, 1000), Some(Floor::Primary));
        assert_eq!(floor_of(&rec(3, MOVED, now - 5000), "a", now, 1000), None);
        assert_eq!(floor_of(&rec(3, "@a", now - 10), "a", now, 1000), Some(Floor::Primary));
        assert_eq!(floor_of(&rec(3, "@a", now - 5000), "a", now, 1000), None);
        let mut f = Floors::new();
        raise(&mut f, "a", Floor::After(5));
        raise(&mut f, "a", Floor::After(3));
        assert_eq!(f["a"], Floor::After(5));
        raise(&mut f, "a", Floor::Primary);
        raise(&mut f, "a", Floor::After(9));
        assert_eq!(f["a"], Floor::Primary);
    }

    #[test]
    fn floors_raise_consistency() {
        let mut f = Floors::new();
        f.insert("a".into(), Floor::After(10));
        f.insert("p".into(), Floor::Primary);
        let w = Duration::from_millis(50);
        assert_eq!(with_floor(&Consistency::Replica, "x", &f), Consistency::Replica);
        assert_eq!(
            with_floor(&Consistency::Replica, "a", &f),
            Consistency::After { shard: "a".into(), lsn: 10, wait: Duration::ZERO }
        );
        assert_eq!(with_floor(&Consistency::Replica, "p", &f), Consistency::Primary);
        assert_eq!(with_floor(&Consistency::Primary, "a", &f), Consistency::Primary);
        let token = Consistency::After { shard: "a".into(), lsn: 20, wait: w };
        assert_eq!(with_floor(&token, "a", &f), token);
        let other = Consistency::After { shard: "b".into(), lsn: 20, wait: w };
        assert_eq!(with_floor(&other, "a", &f), Consistency::After { shard: "a".into(), lsn: 10, wait: w });
    }

    #[test]
    fn opt_in_is_capped() {
        let ask = CacheAsk { opt_in: Some((Duration::from_secs(600), Duration::from_secs(5))), ..Default::default() };
        assert_eq!(ask.limits(Duration::from_secs(60)), Some((Duration::from_secs(60), Duration::from_secs(5))));
        assert_eq!(CacheAsk::default().limits(Duration::from_secs(60)), None);
    }
}
