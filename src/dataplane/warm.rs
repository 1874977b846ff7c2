//! Warming as a client of the read path (docs/cache.md, *Warming*): turns a plain cached read that
//! was answered into a description to count (never a read-your-writes read — those are one
//! client's — and never a header or token), and turns the hottest recorded descriptions back into
//! read plans run through `sql::read` / `docs::read` exactly as a client's (statement check,
//! single flight, versions, floors), on start and after a migration cutover (those that read a
//! moved cell), bounded in count, concurrency and time. Knows no HTTP and no Redis commands (the
//! recording and reading back are `cache::warm`'s).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bson::Document;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::cache::{CacheAsk, CacheStatus, Level};
use super::merge::Merge;
use super::{Consistency, Outcome, RegionSpec, docs, sql, statements};
use crate::app::AppState;
use crate::cache::key::normalize_statement;
use crate::cache::now_ms;
use crate::cache::warm::{Moved, Reason, Report, member_of};
use crate::routing;
use crate::shardmap::DbKind;
use crate::state::Snapshot;

/// Warming reads in flight at once: enough to hide round trips, few enough to leave the shards'
/// pools to the clients.
const CONCURRENCY: usize = 4;
/// How long the start run waits for the instance to be ready and its cache to serve.
const START_WAIT: Duration = Duration::from_secs(60);
/// After a migration run, how long a change of this instance's map runs it again (the map came
/// after the cutover's bump), and how often the map is looked at meanwhile.
const MAP_CATCH_UP: Duration = Duration::from_secs(10);
const MAP_POLL: Duration = Duration::from_millis(100);

tokio::task_local! {
    /// Set around warming's own reads: they are not counted as hot (a warmed read would
    /// otherwise keep itself hot).
    static WARMING: ();
}

/// A read's region as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Region {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lng: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    radius_km: Option<f64>,
}

impl Region {
    fn of(r: &RegionSpec) -> Self {
        Region { lat: r.lat, lng: r.lng, cell: r.cell.clone(), radius_km: r.radius_km }
    }

    fn spec(&self) -> RegionSpec {
        RegionSpec { lat: self.lat, lng: self.lng, cell: self.cell.clone(), radius_km: self.radius_km }
    }
}

/// What a recorded read asks: enough to run it again, nothing of who asked. Documents are BSON,
/// base64: their exact bytes (field order is part of the key, and of a sort).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Description {
    /// `sql`, `find`, `count`, `aggregate`.
    kind: String,
    db: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    collection: Option<String>,
    region: Region,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    statement: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    params: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merge: Option<Merge>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    projection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sort: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skip: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pipeline: Option<Vec<String>>,
    /// The cache ask of the body (absent: the read was cached by a policy of the map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    swr_ms: Option<u64>,
}

fn bson64(d: &Document) -> Option<String> {
    d.to_vec().ok().map(|b| B64.encode(b))
}

fn from_bson64(s: &str) -> Option<Document> {
    Document::from_reader(B64.decode(s).ok()?.as_slice()).ok()
}

impl Description {
    fn new(kind: &str, db: &str, region: &RegionSpec, ask: &CacheAsk) -> Self {
        Description {
            kind: kind.to_string(),
            db: db.to_string(),
            collection: None,
            region: Region::of(region),
            statement: None,
            params: Vec::new(),
            merge: None,
            filter: None,
            projection: None,
            sort: None,
            skip: None,
            limit: None,
            pipeline: None,
            ttl_ms: ask.opt_in.map(|(t, _)| t.as_millis() as u64),
            swr_ms: ask.opt_in.map(|(_, s)| s.as_millis() as u64),
        }
    }

    fn of_sql(p: &sql::ReadPlan) -> Option<Self> {
        let mut d = Description::new("sql", &p.db, p.region.as_ref()?, &p.cache);
        d.statement = Some(normalize_statement(&p.sql).to_string());
        d.params = p.params.clone();
        d.merge = p.merge.clone();
        Some(d)
    }

    fn of_docs(p: &docs::ReadPlan) -> Option<Self> {
        let kind = match &p.op {
            docs::ReadOp::Find { .. } => "find",
            docs::ReadOp::Count { .. } => "count",
            docs::ReadOp::Aggregate { .. } => "aggregate",
        };
        let mut d = Description::new(kind, &p.db, p.region.as_ref()?, &p.cache);
        d.collection = Some(p.collection.clone());
        match &p.op {
            docs::ReadOp::Find { filter, projection, sort, skip, limit } => {
                d.filter = Some(bson64(filter)?);
                d.projection = projection.as_ref().map(|d| bson64(d).ok_or(())).transpose().ok()?;
                d.sort = sort.as_ref().map(|d| bson64(d).ok_or(())).transpose().ok()?;
                d.skip = Some(*skip);
                d.limit = *limit;
            }
            docs::ReadOp::Count { filter } => d.filter = Some(bson64(filter)?),
            docs::ReadOp::Aggregate { pipeline } => {
                d.pipeline = Some(pipeline.iter().map(bson64).collect::<Option<Vec<_>>>()?);
            }
        }
        Some(d)
    }

    /// The read's cache ask: the recorded opt-in, none of the request's `Cache-Control`.
    fn ask(&self) -> CacheAsk {
        let opt_in = self.ttl_ms.map(|t| (Duration::from_millis(t), Duration::from_millis(self.swr_ms.unwrap_or(0))));
        CacheAsk { opt_in, ..Default::default() }
    }

    /// As a plan of its kind; `None`: the description cannot be read back.
    fn plan(&self) -> Option<Plan> {
        let region = Some(self.region.spec());
        // Warming reads as a plain client read does: any fresh replica, floors raised by the fill.
        let consistency = Consistency::Replica;
        if self.kind == "sql" {
            return Some(Plan::Sql(Box::new(sql::ReadPlan {
                db: self.db.clone(),
                region,
                sql: self.statement.clone()?,
                params: self.params.clone(),
                consistency,
                merge: self.merge.clone(),
                cache: self.ask(),
            })));
        }
        let doc = |s: &Option<String>| s.as_deref().map(|s| from_bson64(s).ok_or(())).transpose().ok();
        let op = match self.kind.as_str() {
            "find" => docs::ReadOp::Find {
                filter: doc(&self.filter)??,
                projection: doc(&self.projection)?,
                sort: doc(&self.sort)?,
                skip: self.skip.unwrap_or(0),
                limit: self.limit,
            },
            "count" => docs::ReadOp::Count { filter: doc(&self.filter)?? },
            "aggregate" => docs::ReadOp::Aggregate {
                pipeline: self.pipeline.as_ref()?.iter().map(|s| from_bson64(s)).collect::<Option<Vec<_>>>()?,
            },
            _ => return None,
        };
        Some(Plan::Docs(Box::new(docs::ReadPlan {
            db: self.db.clone(),
            collection: self.collection.clone()?,
            region,
            consistency,
            op,
            cache: self.ask(),
        })))
    }
}

enum Plan {
    // Boxed: plans are large, and of different sizes.
    Sql(Box<sql::ReadPlan>),
    Docs(Box<docs::ReadPlan>),
}

/// Was this read answered by the cache or stored in it — a read worth counting as hot?
fn cached_answer(out: &Outcome) -> bool {
    matches!(
        out.cache,
        Some(CacheStatus::Hit { .. })
            | Some(CacheStatus::Forward { stored: true, .. })
            | Some(CacheStatus::Forward { collapsed: true, .. })
    )
}

/// Count a read for warming if it is a plain cached read (not a read-your-writes read, not
/// warming's own). No Redis call: the counts are flushed in batches (`cache::warm`).
fn note(
    state: &AppState,
    db: &str,
    consistency: &Consistency,
    out: &Outcome,
    describe: impl FnOnce() -> Option<Description>,
) {
    let Some((hot, _)) = state.cache.hot() else { return };
    if !hot.records()
        || !cached_answer(out)
        || matches!(consistency, Consistency::After { .. })
        || WARMING.try_with(|_| ()).is_ok()
    {
        return;
    }
    let Some(bytes) = describe().and_then(|d| serde_json::to_vec(&d).ok()) else { return };
    hot.note(db, member_of(&bytes), || bytes);
}

/// After a SQL read was answered (`sql::read`).
pub(super) fn note_sql(state: &AppState, plan: &sql::ReadPlan, out: &Outcome) {
    note(state, &plan.db, &plan.consistency, out, || Description::of_sql(plan));
}

/// After a document read was answered (`docs::read`).
pub(super) fn note_docs(state: &AppState, plan: &docs::ReadPlan, out: &Outcome) {
    note(state, &plan.db, &plan.consistency, out, || Description::of_docs(plan));
}

/// What one warming read came to.
enum Done {
    Filled,
    FromL2,
    Cached,
    NotStored,
    Failed,
    Skipped,
}

/// Run one recorded read as a client would (after the same statement check a read gets, under
/// the current config and map).
async fn warm_one(state: &AppState, d: Description) -> Done {
    let Some(plan) = d.plan() else { return Done::Skipped };
    let mut out = Outcome::default();
    let r = match plan {
        Plan::Sql(p) => {
            let kind = match state.pin().map.databases().get(&p.db) {
                Some(k @ (DbKind::Postgres | DbKind::Sqlserver)) => *k,
                _ => return Done::Skipped,
            };
            if statements::check_read(state, &p.db, kind, &p.sql).is_err() {
                return Done::Skipped;
            }
            WARMING.scope((), sql::read(state, &p, &mut out)).await.map(|_| ())
        }
        Plan::Docs(p) => {
            if state.pin().map.databases().get(&p.db) != Some(&DbKind::Mongodb) {
                return Done::Skipped;
            }
            WARMING.scope((), docs::read(state, &p, &mut out)).await.map(|_| ())
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = ?e, db = %d.db, kind = %d.kind, "cache warming: read failed");
        return Done::Failed;
    }
    match out.cache {
        Some(CacheStatus::Forward { stored: true, .. }) => Done::Filled,
        Some(CacheStatus::Hit { level: Level::L2, .. }) => Done::FromL2,
        // Already in L1, or answered by a client's fill of the same key that was under way.
        Some(CacheStatus::Hit { level: Level::L1, .. }) | Some(CacheStatus::Forward { collapsed: true, .. }) => {
            Done::Cached
        }
        _ => Done::NotStored,
    }
}

/// The version keys (cells at the map resolution, shards) a description's read uses under the
/// current map; `None` when it no longer routes.
fn version_keys(state: &AppState, snap: &Snapshot, d: &Description) -> Option<Vec<String>> {
    let region = d.region.spec().resolve(snap).ok()?;
    let route = routing::route_region(&snap.map, &region).ok()?;
    let cells = super::cache::cells_of(snap, &route).ok()?;
    let mut keys: Vec<String> = cells.iter().map(|(c, _)| state.cache.cell_key(&d.db, *c)).collect();
    keys.extend(super::cache::shards_of(snap, &route).iter().map(|s| state.cache.shard_key(&d.db, s)));
    Some(keys)
}

/// One warming run. In order:
/// 1. read the `warm_keys` hottest recorded reads over the map's databases from Redis;
/// 2. after a migration, keep those whose cells (or shards) the cutover bumped, under the map
///    this instance serves now;
/// 3. run them, [`CONCURRENCY`] at a time, until all are done or the budget has passed; reads
///    unfinished then are abandoned (a single-flight fill abandoned hands over to any client
///    waiting on it).
async fn run(state: &AppState, reason: Reason, moved: Option<&HashSet<String>>) -> Report {
    let started = Instant::now();
    let settings = state.cache.settings();
    let mut r = Report { at_ms: now_ms(), reason: reason.as_str(), ..Default::default() };
    let Some((hot, link)) = state.cache.hot() else { return r };
    let snap = state.pin();
    let dbs: Vec<String> = snap.map.databases().keys().cloned().collect();
    // 1.
    let reads = match hot.hottest(link, &dbs, settings.warm_keys).await {
        Ok(v) => v,
        Err(e) => {
            r.error = Some(e.to_string());
            r.ms = started.elapsed().as_millis() as u64;
            return r;
        }
    };
    // 2.
    let mut todo = Vec::with_capacity(reads.len());
    for h in reads {
        match serde_json::from_slice::<Description>(&h.description) {
            Ok(d) if d.db == h.db => match moved {
                None => todo.push(d),
                Some(m) => {
                    if version_keys(state, &snap, &d).is_some_and(|ks| ks.iter().any(|k| m.contains(k))) {
                        todo.push(d);
                    }
                }
            },
            // Unreadable (another version's format): after a migration there is no telling
            // whether it read a moved cell.
            _ if moved.is_none() => {
                r.asked += 1;
                r.skipped += 1;
            }
            _ => {}
        }
    }
    drop(snap);
    r.asked += todo.len() as u64;
    // 3.
    let asked = todo.len() as u64;
    let until = Instant::now() + settings.warm_budget;
    let mut reads =
        futures_util::stream::iter(todo.into_iter().map(|d| warm_one(state, d))).buffer_unordered(CONCURRENCY);
    let mut finished = 0u64;
    while let Ok(Some(done)) = tokio::time::timeout_at(until, reads.next()).await {
        finished += 1;
        match done {
            Done::Filled => r.filled += 1,
            Done::FromL2 => r.from_l2 += 1,
            Done::Cached => r.cached += 1,
            Done::NotStored => r.not_stored += 1,
            Done::Failed => r.failed += 1,
            Done::Skipped => r.skipped += 1,
        }
    }
    drop(reads);
    r.cut = asked - finished;
    r.ms = started.elapsed().as_millis() as u64;
    r
}

async fn run_and_report(state: &AppState, reason: Reason, moved: Option<&HashSet<String>>) {
    let r = run(state, reason, moved).await;
    tracing::info!(
        reason = r.reason, asked = r.asked, filled = r.filled, from_l2 = r.from_l2, cached = r.cached,
        failed = r.failed, skipped = r.skipped, cut = r.cut, ms = r.ms, error = ?r.error, "cache warming done"
    );
    if let Some((hot, _)) = state.cache.hot() {
        hot.finished(r);
    }
}

/// The warming task: once at start, then after every migration cutover this instance hears of.
/// `ready`: the instance can serve (map loaded, every endpoint probed once).
async fn task(state: Arc<AppState>, ready: impl Fn() -> bool + Send + 'static, mut moves: broadcast::Receiver<Moved>) {
    // 1. Wait (bounded) until reads would reach probed endpoints and the cache serves: before
    //    that they would bypass the cache and fill nothing.
    let until = Instant::now() + START_WAIT;
    while !(ready() && state.cache.serving()) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 2.
    run_and_report(&state, Reason::Start, None).await;
    // 3. Cutovers queued meanwhile are merged into one run. The cutover publishes its map before
    //    it bumps, but an instance that learns maps from a watched file may get the bump first:
    //    its run then read the moved cells on the old owner, under keys only the old map's reads
    //    use. So when this instance's map changes within MAP_CATCH_UP of a run, the run goes
    //    again (on the orchestrator, with the map already new, only a later reload does that:
    //    the reads are L1 hits then).
    let mut again: Option<(HashSet<String>, u64, Instant)> = None;
    loop {
        let next = tokio::select! {
            m = moves.recv() => Some(m),
            _ = tokio::time::sleep(MAP_POLL), if again.is_some() => None,
        };
        let mut set: HashSet<String> = match next {
            None => {
                let Some((set, version, until)) = again.take() else { continue };
                if state.pin().map.version().0 != version {
                    run_and_report(&state, Reason::Migration, Some(&set)).await;
                } else if Instant::now() < until {
                    again = Some((set, version, until));
                }
                continue;
            }
            Some(Ok(keys)) => keys.iter().cloned().collect(),
            Some(Err(broadcast::error::RecvError::Lagged(n))) => {
                tracing::warn!(missed = n, "cache warming: cutovers came faster than warming; some are not warmed");
                continue;
            }
            Some(Err(broadcast::error::RecvError::Closed)) => return,
        };
        while let Ok(more) = moves.try_recv() {
            set.extend(more.iter().cloned());
        }
        if let Some((pending, _, _)) = again.take() {
            set.extend(pending);
        }
        let version = state.pin().map.version().0;
        run_and_report(&state, Reason::Migration, Some(&set)).await;
        again = Some((set, version, Instant::now() + MAP_CATCH_UP));
    }
}

/// Start the warming task when `[cache] warm_keys` asks for it (and the cache has Redis). The
/// cutover subscription is taken here, so a cutover during the start run is not missed.
pub fn spawn(state: Arc<AppState>, ready: impl Fn() -> bool + Send + 'static) -> Option<tokio::task::JoinHandle<()>> {
    let s = state.cache.settings();
    if !s.enabled || s.warm_keys == 0 {
        return None;
    }
    let moves = state.cache.hot()?.0.subscribe();
    Some(crate::tasks::spawn("cache_warm", task(state, ready, moves)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn ask() -> CacheAsk {
        CacheAsk { opt_in: Some((Duration::from_secs(30), Duration::from_secs(5))), ..Default::default() }
    }

    fn region() -> Option<RegionSpec> {
        Some(RegionSpec { lat: Some(40.4), lng: Some(-3.7), ..Default::default() })
    }

    #[test]
    fn sql_reads_round_trip() {
        let p = sql::ReadPlan {
            db: "core".into(),
            region: region(),
            sql: "  SELECT id FROM t WHERE id = $1 ; ".into(),
            params: vec![serde_json::json!(7), serde_json::json!({"b": 1, "a": [1.5, null]})],
            consistency: Consistency::Primary,
            merge: Some(
                serde_json::from_value(serde_json::json!({"order_by": [{"column": "id"}], "limit": 3})).unwrap(),
            ),
            cache: CacheAsk { no_cache: true, ..ask() },
        };
        let d = Description::of_sql(&p).unwrap();
        let bytes = serde_json::to_vec(&d).unwrap();
        let back: Description = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), bytes, "a description reads back as written");
        let Some(Plan::Sql(q)) = back.plan() else { panic!("not a SQL plan") };
        assert_eq!(q.sql, "SELECT id FROM t WHERE id = $1");
        assert_eq!(q.params, p.params);
        assert_eq!(q.region, p.region);
        assert_eq!(serde_json::to_value(&q.merge).unwrap(), serde_json::to_value(&p.merge).unwrap());
        // The opt-in, not the request's directives; a plain replica read.
        assert_eq!(q.cache, ask());
        assert_eq!(q.consistency, Consistency::Replica);
        // Different reads, different members.
        let mut other = p.clone();
        other.params[0] = serde_json::json!(8);
        let other = serde_json::to_vec(&Description::of_sql(&other).unwrap()).unwrap();
        assert_ne!(member_of(&other), member_of(&bytes));
    }

    #[test]
    fn document_reads_round_trip_byte_for_byte() {
        // Field order is kept (a sort on {b, a} is not one on {a, b}).
        let ops = [
            docs::ReadOp::Find {
                filter: doc! {"z": 1, "a": {"$gte": 2_i64}},
                projection: Some(doc! {"_id": 0}),
                sort: Some(doc! {"b": -1, "a": 1}),
                skip: 3,
                limit: Some(10),
            },
            docs::ReadOp::Count { filter: doc! {"n": {"$lt": 5.5}} },
            docs::ReadOp::Aggregate { pipeline: vec![doc! {"$match": {"x": 1}}, doc! {"$group": {"_id": "$k"}}] },
        ];
        for op in ops {
            let p = docs::ReadPlan {
                db: "profiles".into(),
                collection: "people".into(),
                region: region(),
                consistency: Consistency::Replica,
                op,
                cache: ask(),
            };
            let bytes = serde_json::to_vec(&Description::of_docs(&p).unwrap()).unwrap();
            let back: Description = serde_json::from_slice(&bytes).unwrap();
            let Some(Plan::Docs(q)) = back.plan() else { panic!("not a document plan") };
            assert_eq!(q.collection, "people");
            let bson = |op: &docs::ReadOp| match op {
                docs::ReadOp::Find { filter, projection, sort, skip, limit } => {
                    format!(
                        "{:?}{:?}{:?}{skip}{limit:?}",
                        filter.to_vec(),
                        projection.as_ref().map(|d| d.to_vec()),
                        sort.as_ref().map(|d| d.to_vec())
                    )
                }
                docs::ReadOp::Count { filter } => format!("count{:?}", filter.to_vec()),
                docs::ReadOp::Aggregate { pipeline } => {
                    format!("{:?}", pipeline.iter().map(|d| d.to_vec()).collect::<Vec<_>>())
                }
            };
            assert_eq!(bson(&q.op), bson(&p.op));
        }
    }

    #[test]
    fn only_cached_answers_count() {
        let mut out = Outcome::default();
        assert!(!cached_answer(&out));
        out.cache = Some(CacheStatus::Forward { no_cache: false, collapsed: false, stored: false, ttl_s: None });
        assert!(!cached_answer(&out));
        out.cache = Some(CacheStatus::Forward { no_cache: false, collapsed: false, stored: true, ttl_s: Some(3) });
        assert!(cached_answer(&out));
        out.cache = Some(CacheStatus::Hit { level: Level::L1, stale: false, ttl_s: 1, age_s: 0 });
        assert!(cached_answer(&out));
        out.cache = Some(CacheStatus::Bypass(crate::cache::Bypass::RedisDown));
        assert!(!cached_answer(&out));
    }
}
