//! Document reads and writes (MongoDB shards): read preference per consistency, fan-out with a
//! sort-key merge for area finds, the read cache step for reads that opt in, the per-shard insert
//! split by each document's GeoJSON field, and updates/deletes on the owning primary under the
//! cutover hold, with the cache's version bumps around every write. Works on BSON documents the
//! HTTP layer already parsed; returns documents and outcomes, never renders them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bson::{Bson, Document};
use mongodb::options::UpdateModifications;
use tokio::time::Instant;

use super::cache::{self as step, CacheAsk, Cached, FillFn, Floors, WriteBumps, with_floor};
use super::{ApiError, Consistency, Outcome, RegionSpec, ShardInfo, hold, make_token, parse_token};
use crate::app::AppState;
use crate::backend::mongo::fence::FenceView;
use crate::backend::mongo::guard::{self, Part};
use crate::backend::mongo::{self, FindQuery, MongoDatabase, ReadMode, ReadOpts, ejson};
use crate::backend::{BackendError, DatabaseBackend, Role};
use crate::ids::ShardIdx;
use crate::routing::{self, Owned};
use crate::shardmap::DbKind;
use crate::state::Snapshot;

/// A read of one collection on the shards owning the region.
#[derive(Clone)]
pub struct ReadPlan {
    pub db: String,
    pub collection: String,
    pub region: Option<RegionSpec>,
    pub consistency: Consistency,
    pub op: ReadOp,
    /// The read cache: the request's opt-in and `Cache-Control` directives.
    pub cache: CacheAsk,
}

#[derive(Clone)]
pub enum ReadOp {
    Find { filter: Document, projection: Option<Document>, sort: Option<Document>, skip: u64, limit: Option<u64> },
    Aggregate { pipeline: Vec<Document> },
    Count { filter: Document },
}

pub enum ReadValue {
    Documents(Vec<Document>),
    Count(u64),
}

pub struct ReadResult {
    pub value: ReadValue,
    pub shards: Vec<ShardInfo>,
    pub map_version: u64,
}

/// Documents to insert: routed by the body's region or, without one, each by its own geo field.
pub struct InsertPlan {
    pub db: String,
    pub collection: String,
    pub region: Option<RegionSpec>,
    pub docs: Vec<Document>,
}

/// One shard's part of an insert: what landed, and its error if some did not.
pub struct InsertedPart {
    pub info: ShardInfo,
    pub inserted_ids: Vec<Bson>,
    pub token: Option<String>,
    pub error: Option<BackendError>,
}

pub struct InsertResult {
    pub inserted_count: usize,
    pub parts: Vec<InsertedPart>,
    /// Only when exactly one shard was written (tokens are per shard).
    pub token: Option<String>,
    pub map_version: u64,
    /// Some documents landed and some did not (the parts say which).
    pub partial: bool,
}

/// An update or delete on the shard owning the region.
pub struct WritePlan {
    pub db: String,
    pub collection: String,
    pub region: Option<RegionSpec>,
    pub op: WriteOp,
}

pub enum WriteOp {
    Update { filter: Document, update: UpdateModifications, multi: bool, upsert: bool },
    Delete { filter: Document, multi: bool },
}

#[derive(Default)]
pub struct WriteResult {
    pub matched: Option<u64>,
    pub modified: Option<u64>,
    pub upserted_id: Option<Bson>,
    pub deleted: Option<u64>,
    /// Absent when the deployment reports no operation time (a standalone server).
    pub token: Option<String>,
    pub shards: Vec<ShardInfo>,
    pub map_version: u64,
}

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError::InvalidParams(m.into())
}

/// Collection names come verbatim from the path (no percent-decoding).
pub fn check_collection(c: &str) -> Result<(), ApiError> {
    if c.is_empty() || c.len() > 255 || c.contains(['$', '\0']) || c.starts_with("system.") {
        return Err(invalid(format!("invalid collection name {c:?}")));
    }
    Ok(())
}

fn check_db(snap: &Snapshot, db: &str, collection: &str) -> Result<(), ApiError> {
    match snap.map.databases().get(db) {
        None => Err(ApiError::UnknownDatabase(db.to_string())),
        Some(DbKind::Mongodb) => check_collection(collection),
        Some(kind) => Err(ApiError::Unsupported(format!(
            "database {db:?} is {}: use POST /v1/sql/{db}/query|execute",
            kind.as_str()
        ))),
    }
}

fn mongo_db<'a>(snap: &'a Snapshot, shard: ShardIdx, db: &str) -> Result<&'a Arc<MongoDatabase>, ApiError> {
    match snap.backends.shards[shard.get()].get(db) {
        Some(DatabaseBackend::Mongo(m)) => Ok(m),
        Some(_) => Err(ApiError::Unsupported(format!("database {db:?} is not mongodb"))),
        None => Err(ApiError::UnknownDatabase(format!("{db} (on shard {})", snap.map.shard(shard).id))),
    }
}

fn shard_info(snap: &Snapshot, shard: ShardIdx, m: &MongoDatabase, role: Role) -> ShardInfo {
    ShardInfo { id: snap.map.shard(shard).id.to_string(), role, endpoint: m.label.to_string() }
}

/// Read options for one shard: a token for another shard is ignored (it says nothing about
/// this one).
fn read_opts(c: &Consistency, shard_id: &str, deadline: Instant) -> (ReadOpts, Role) {
    match c {
        Consistency::Primary => (ReadOpts { mode: ReadMode::Primary, after: None, deadline }, Role::Primary),
        Consistency::Replica => (ReadOpts { mode: ReadMode::Replica, after: None, deadline }, Role::Replica),
        Consistency::After { shard, lsn, .. } => {
            let after = (shard == shard_id).then(|| mongo::op_time_from_u64(*lsn));
            (ReadOpts { mode: ReadMode::Replica, after, deadline }, Role::Replica)
        }
    }
}

/// Run `f` on every shard in parallel; the first failure fails the read (as SQL area reads do).
/// Each shard is read with `consistency` raised to its floor (cache fills).
async fn fan_out<'a, T, F, Fut>(
    snap: &'a Snapshot,
    db: &str,
    shards: &[ShardIdx],
    (consistency, floors): (&Consistency, &Floors),
    deadline: Instant,
    f: F,
) -> Result<Vec<(T, ShardInfo)>, ApiError>
where
    F: Fn(&'a Arc<MongoDatabase>, ReadOpts) -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let mut futs = Vec::with_capacity(shards.len());
    for s in shards {
        let m = mongo_db(snap, *s, db)?;
        let id = snap.map.shard(*s).id.to_string();
        let (opts, role) = read_opts(&with_floor(consistency, &id, floors), &id, deadline);
        let info = shard_info(snap, *s, m, role);
        let fut = f(m, opts);
        futs.push(async move { fut.await.map(|v| (v, info)).map_err(|e| ApiError::from_backend(e, &id)) });
    }
    futures_util::future::join_all(futs).await.into_iter().collect()
}

/// Run a read plan: find (merged on its sort keys across shards, skip/limit after the merge),
/// aggregate (per-shard results concatenated) or count (summed); through the cache step when
/// the request opted in or the collection has a cache policy.
pub async fn read(state: &AppState, plan: &ReadPlan, out: &mut Outcome) -> Result<ReadResult, ApiError> {
    let snap = state.pin();
    out.map_version = Some(snap.map.version().0);
    check_db(&snap, &plan.db, &plan.collection)?;
    let region = super::required(&plan.region)?.resolve(&snap)?;
    check_read_op(&snap, &plan.db, &plan.op)?;
    let route = routing::route_region(&snap.map, &region).map_err(super::route_err)?;
    let shards = super::route_shards(&route, out)?;
    // The collection's policy covers a read of that collection alone: a pipeline that reads
    // another one ($lookup, $unionWith, $graphLookup) says for itself.
    let policy = match &plan.op {
        ReadOp::Aggregate { pipeline } if pipeline.iter().any(reads_other_collections) => None,
        _ => step::policy_for(&snap.map, &plan.db, Some(std::slice::from_ref(&plan.collection))),
    };
    let ask = plan.cache.with_policy(policy);
    let r = if !ask.uses_cache() {
        let deadline = Instant::now() + state.config.request_timeout();
        run_read(&snap, plan, &shards, &Floors::new(), deadline).await?
    } else {
        let (snap2, plan2, timeout) = (snap.clone(), Arc::new(plan.clone()), state.config.request_timeout());
        let shards2 = Arc::new(shards);
        let fill: FillFn<ReadResult> = Arc::new(move |floors| {
            let (snap, plan, shards) = (snap2.clone(), plan2.clone(), shards2.clone());
            Box::pin(async move { run_read(&snap, &plan, &shards, &floors, Instant::now() + timeout).await })
        });
        let kind = match &plan.op {
            ReadOp::Find { .. } => "find",
            ReadOp::Aggregate { .. } => "aggregate",
            ReadOp::Count { .. } => "count",
        };
        let read =
            step::Read { db: &plan.db, kind, snap: &snap, route: &route, consistency: &plan.consistency, ask: &ask };
        step::read(state, read, |b| key_parts(b, plan), fill, out).await?
    };
    out.note_shards(&r.shards);
    // Counted for warming (docs/cache.md, *Warming*) when the cache answered or stored it.
    super::warm::note_docs(state, plan, out);
    Ok(r)
}

/// Whether a pipeline stage (at any depth: `$facet` nests pipelines) reads another collection.
fn reads_other_collections(stage: &Document) -> bool {
    fn walk(b: &Bson) -> bool {
        match b {
            Bson::Document(d) => {
                d.iter().any(|(k, v)| matches!(k.as_str(), "$lookup" | "$unionWith" | "$graphLookup") || walk(v))
            }
            Bson::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    stage.iter().any(|(k, v)| matches!(k.as_str(), "$lookup" | "$unionWith" | "$graphLookup") || walk(v))
}

/// What a read asks, as key parts: the collection and the operation's documents (BSON bytes,
/// field order as sent) and numbers.
fn key_parts(b: &mut crate::cache::key::KeyBuilder, plan: &ReadPlan) {
    let doc = |b: &mut crate::cache::key::KeyBuilder, d: Option<&Document>| {
        b.bytes(&d.map(|d| d.to_vec().unwrap_or_default()).unwrap_or_default());
    };
    b.str(&plan.collection);
    match &plan.op {
        ReadOp::Find { filter, projection, sort, skip, limit } => {
            doc(b, Some(filter));
            doc(b, projection.as_ref());
            doc(b, sort.as_ref());
            b.u64(*skip).u64(limit.map_or(u64::MAX, |l| l));
        }
        ReadOp::Aggregate { pipeline } => {
            b.u64(pipeline.len() as u64);
            for stage in pipeline {
                doc(b, Some(stage));
            }
        }
        ReadOp::Count { filter } => doc(b, Some(filter)),
    }
}

/// The read itself, on `shards` (each raised to its floor).
async fn run_read(
    snap: &Snapshot,
    plan: &ReadPlan,
    shards: &[ShardIdx],
    floors: &Floors,
    deadline: Instant,
) -> Result<ReadResult, ApiError> {
    let (db, coll, c) = (plan.db.as_str(), plan.collection.as_str(), (&plan.consistency, floors));
    let (value, infos) = match &plan.op {
        ReadOp::Find { filter, projection, sort, skip, limit } => {
            let sort_keys = sort.as_ref().map(ejson::sort_keys).transpose().map_err(invalid)?;
            let single = shards.len() == 1;
            // MongoDB reads `limit: 0` as "no limit"; the merge must too.
            let req_limit = limit.filter(|l| *l > 0);
            // Across shards, each shard returns its first skip+limit documents and skip applies
            // after the merge.
            let (q_skip, q_limit) =
                if single { (*skip, req_limit) } else { (0, req_limit.map(|l| l.saturating_add(*skip))) };
            let parts = fan_out(snap, db, shards, c, deadline, |m, opts| {
                let q = FindQuery {
                    filter: filter.clone(),
                    projection: projection.clone(),
                    sort: sort.clone(),
                    skip: q_skip,
                    limit: q_limit,
                };
                m.find(coll, q, opts)
            })
            .await?;
            let (docs, infos): (Vec<Vec<Document>>, Vec<ShardInfo>) = parts.into_iter().unzip();
            let documents = if single {
                docs.into_iter().flatten().collect()
            } else {
                let merged = match &sort_keys {
                    Some(keys) => merge_sorted(docs, keys),
                    None => docs.into_iter().flatten().collect(),
                };
                let skip = usize::try_from(*skip).unwrap_or(usize::MAX);
                let limit = req_limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
                merged.into_iter().skip(skip).take(limit).collect()
            };
            (ReadValue::Documents(documents), infos)
        }
        ReadOp::Aggregate { pipeline } => {
            let parts =
                fan_out(snap, db, shards, c, deadline, |m, opts| m.aggregate(coll, pipeline.clone(), opts)).await?;
            // Per-shard results are concatenated in shard order: a pipeline's $sort/$group/$limit
            // apply per shard, not across shards.
            let (docs, infos): (Vec<Vec<Document>>, Vec<ShardInfo>) = parts.into_iter().unzip();
            (ReadValue::Documents(docs.into_iter().flatten().collect()), infos)
        }
        ReadOp::Count { filter } => {
            let parts = fan_out(snap, db, shards, c, deadline, |m, opts| m.count(coll, filter.clone(), opts)).await?;
            let count = parts.iter().map(|(n, _)| *n).sum();
            (ReadValue::Count(count), parts.into_iter().map(|(_, i)| i).collect())
        }
    };
    Ok(ReadResult { value, shards: infos, map_version: snap.map.version().0 })
}

/// A cached document answer: a JSON head (shards, map version, count) and the documents as
/// BSON, one after the other.
#[derive(serde::Serialize, serde::Deserialize)]
struct Head {
    s: Vec<(String, String, String)>,
    m: u64,
    n: Option<u64>,
}

impl Cached for ReadResult {
    fn encode(&self) -> Option<Vec<u8>> {
        let s = self.shards.iter().map(|i| (i.id.clone(), i.role.as_str().to_string(), i.endpoint.clone())).collect();
        let n = match &self.value {
            ReadValue::Count(n) => Some(*n),
            ReadValue::Documents(_) => None,
        };
        let head = serde_json::to_vec(&Head { s, m: self.map_version, n }).ok()?;
        let mut out = (head.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&head);
        if let ReadValue::Documents(docs) = &self.value {
            for d in docs {
                out.extend_from_slice(&d.to_vec().ok()?);
            }
        }
        Some(out)
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let head: Head = serde_json::from_slice(b.get(4..4 + len)?).ok()?;
        let mut rest = b.get(4 + len..)?;
        let value = match head.n {
            Some(n) => ReadValue::Count(n),
            None => {
                let mut docs = Vec::new();
                while !rest.is_empty() {
                    let n = i32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
                    let n = usize::try_from(n).ok()?;
                    docs.push(Document::from_reader(rest.get(..n)?).ok()?);
                    rest = &rest[n..];
                }
                ReadValue::Documents(docs)
            }
        };
        let shards = head
            .s
            .into_iter()
            .map(|(id, role, endpoint)| {
                let role = if role == Role::Primary.as_str() { Role::Primary } else { Role::Replica };
                ShardInfo { id, role, endpoint }
            })
            .collect();
        Some(ReadResult { value, shards, map_version: head.m })
    }
}

/// Server-side JavaScript (`$where`, `$function`, `$accumulator`) is refused unless the map opts
/// the database in (`allow_server_js`), for every operation, reads included.
fn no_server_js(snap: &Snapshot, db: &str, parts: &[(&str, Part<'_>)]) -> Result<(), ApiError> {
    guard::check_server_js(db, snap.map.allows_server_js(db), parts).map_err(invalid)
}

/// The operation's server-side-JavaScript check, before any shard is asked.
fn check_read_op(snap: &Snapshot, db: &str, op: &ReadOp) -> Result<(), ApiError> {
    match op {
        ReadOp::Find { filter, projection, .. } => {
            let mut parts = vec![("filter", Part::Doc(filter))];
            parts.extend(projection.as_ref().map(|p| ("projection", Part::Doc(p))));
            no_server_js(snap, db, &parts)
        }
        ReadOp::Aggregate { pipeline } => {
            check_pipeline(pipeline)?;
            no_server_js(snap, db, &[("pipeline", Part::Docs(pipeline))])
        }
        ReadOp::Count { filter } => no_server_js(snap, db, &[("filter", Part::Doc(filter))]),
    }
}

/// A write's checks before it runs: no server-side JavaScript, and an update must leave the
/// document on a shard that owns its location.
fn check_write_op(snap: &Snapshot, plan: &WritePlan, shard: ShardIdx) -> Result<(), ApiError> {
    match &plan.op {
        WriteOp::Update { filter, update, upsert, .. } => {
            no_server_js(snap, &plan.db, &[("filter", Part::Doc(filter)), ("update", Part::update(update))])?;
            check_update_geo(snap, plan, shard, filter, update, *upsert)
        }
        WriteOp::Delete { filter, .. } => no_server_js(snap, &plan.db, &[("filter", Part::Doc(filter))]),
    }
}

/// An update must leave the document on a shard that owns its location: every location the
/// update may give it (upsert equality, `$set`, `$setOnInsert`, replacement) must be owned by
/// `shard`, the shard the update runs on — the same ownership test an insert with a region
/// passes. Updates that remove the location or change it unknowably are refused.
fn check_update_geo(
    snap: &Snapshot,
    plan: &WritePlan,
    shard: ShardIdx,
    filter: &Document,
    update: &UpdateModifications,
    upsert: bool,
) -> Result<(), ApiError> {
    let Some(field) =
        snap.map.tables().get(&plan.db).and_then(|t| t.get(&plan.collection)).and_then(|t| t.geo_field.as_deref())
    else {
        return Ok(());
    };
    for l in guard::update_locations(filter, update, upsert, field).map_err(ApiError::InvalidRegion)? {
        let region = geo_value(&l.value, field).map_err(|e| ApiError::InvalidRegion(format!("{}: {e}", l.source)))?;
        let owner = super::write_route(snap, &region).map_err(|e| match e {
            ApiError::NoShardForRegion(c) => ApiError::InvalidRegion(format!("{}: no shard owns {c}", l.source)),
            other => other,
        })?;
        if owner.shard != shard {
            return Err(ApiError::InvalidRegion(format!(
                "{}: the new {field} lies on shard {}, not on the region's shard {}; the update would put the \
                 document on a shard that does not own its location",
                l.source,
                snap.map.shard(owner.shard).id,
                snap.map.shard(shard).id
            )));
        }
    }
    Ok(())
}

/// The read endpoint must not write: `$out`/`$merge` would write on a member chosen for reading.
fn check_pipeline(pipeline: &[Document]) -> Result<(), ApiError> {
    for (i, stage) in pipeline.iter().enumerate() {
        if stage.keys().any(|k| k == "$out" || k == "$merge") {
            return Err(invalid(format!("pipeline[{i}]: $out and $merge are not allowed (aggregate is a read)")));
        }
    }
    Ok(())
}

/// Per-shard results, each sorted by `keys`, merged in BSON order (ties: lower shard first).
fn merge_sorted(parts: Vec<Vec<Document>>, keys: &[(String, bool)]) -> Vec<Document> {
    crate::kmerge::merge_sorted(parts, usize::MAX, |a, b| ejson::compare_on(keys, a, b))
}

pub use crate::backend::mongo::ejson::{geo_point, geo_value};

/// Route every document of an insert: by the body's region, or by its own geo field. With a
/// region, a document whose geo field lies on another shard is refused rather than written
/// where it does not belong.
fn route_documents(snap: &Snapshot, plan: &InsertPlan) -> Result<Vec<Owned>, ApiError> {
    let geo_field =
        snap.map.tables().get(&plan.db).and_then(|t| t.get(&plan.collection)).and_then(|t| t.geo_field.as_deref());
    let given = match &plan.region {
        None => None,
        Some(spec) => Some(super::write_route(snap, &spec.resolve(snap)?)?),
    };
    if given.is_none() && geo_field.is_none() {
        return Err(ApiError::RegionRequired);
    }
    let field_name = geo_field.unwrap_or("geo field");
    let mut routes = Vec::with_capacity(plan.docs.len());
    for (i, d) in plan.docs.iter().enumerate() {
        let own = match geo_field {
            Some(f) => geo_point(d, f).map_err(|e| ApiError::InvalidRegion(format!("documents[{i}]: {e}")))?,
            None => None,
        };
        let own = match &own {
            Some(r) => Some(super::write_route(snap, r).map_err(|e| match e {
                ApiError::NoShardForRegion(c) => ApiError::NoShardForRegion(format!("{c} (documents[{i}])")),
                other => other,
            })?),
            None => None,
        };
        routes.push(match (given, own) {
            (Some(g), Some(o)) if g.shard != o.shard => {
                return Err(ApiError::InvalidRegion(format!(
                    "documents[{i}]: its {field_name} lies on shard {}, not on the region's shard {}",
                    snap.map.shard(o.shard).id,
                    snap.map.shard(g.shard).id
                )));
            }
            (Some(g), _) => g,
            (None, Some(o)) => o,
            (None, None) => {
                return Err(ApiError::InvalidRegion(format!(
                    "documents[{i}]: no region in the body and no {} field",
                    geo_field.unwrap_or("geo")
                )));
            }
        });
    }
    Ok(routes)
}

/// Run an insert: route each document, hold for a cutover, then write each shard's group in
/// parallel (batch order kept inside a group).
pub async fn insert(state: &AppState, plan: &InsertPlan, out: &mut Outcome) -> Result<InsertResult, ApiError> {
    let mut refreshed = false;
    loop {
        let snap = state.pin();
        out.map_version = Some(snap.map.version().0);
        check_db(&snap, &plan.db, &plan.collection)?;
        let routes = route_documents(&snap, plan)?;
        let cells: Vec<h3o::CellIndex> = routes.iter().map(|r| r.cell).collect();
        if let Some(f) = hold::frozen_for(state, &cells) {
            let cell = cells.iter().copied().find(|c| f.covers(*c)).unwrap_or(cells[0]);
            drop(snap);
            hold::hold(state, f, cell).await?;
            continue;
        }
        let mut groups: BTreeMap<ShardIdx, Vec<Document>> = BTreeMap::new();
        for (d, r) in plan.docs.iter().zip(&routes) {
            groups.entry(r.shard).or_default().push(d.clone());
        }
        if cells.iter().all(|c| *c == cells[0]) {
            out.cell = Some(cells[0].to_string());
        }
        out.role = Some(Role::Primary);
        // Every group passes its shard's migration fences before any group is written, so a
        // fenced (stale) route re-routes the whole batch with nothing written.
        let deadline = Instant::now() + state.config.request_timeout();
        let version = snap.map.version().0;
        let mut views = BTreeMap::new();
        let mut failed = BTreeMap::new();
        let mut fenced = None;
        for s in groups.keys() {
            let m = mongo_db(&snap, *s, &plan.db)?;
            let cells: Vec<h3o::CellIndex> = routes.iter().filter(|r| r.shard == *s).map(|r| r.cell).collect();
            match m.check_fences(&cells, version, deadline).await {
                Ok(v) => {
                    views.insert(*s, (v, cells));
                }
                Err(e) if hold::is_fenced(&e) => {
                    fenced = Some((snap.map.shard(*s).id.to_string(), cells[0], e));
                    break;
                }
                // The shard cannot be asked (down): its group fails as its insert would have,
                // and the other groups still go (a 207), as before fences existed.
                Err(e) => {
                    failed.insert(*s, e);
                }
            }
        }
        if let Some((id, cell, e)) = fenced {
            let give_up = ApiError::from_backend(e, &id);
            hold::after_fence_hit(state, snap, &mut refreshed, &id, cell, give_up).await?;
            continue;
        }
        let written: Vec<(h3o::CellIndex, String)> =
            routes.iter().map(|r| (r.cell, snap.map.shard(r.shard).id.to_string())).collect();
        let written: Vec<(h3o::CellIndex, &str)> = written.iter().map(|(c, s)| (*c, s.as_str())).collect();
        let bumps = WriteBumps::begin(state, &plan.db, &written, None).await;
        let r = insert_groups(&snap, plan, groups, Checked { views, failed }, deadline, out).await;
        // Each shard's part with its operation time (from its token); none for a failed part.
        let pos: Vec<(String, u64)> = match &r {
            Ok(r) => r.parts.iter().filter_map(|p| p.token.as_deref().and_then(parse_token)).collect(),
            Err(_) => Vec::new(),
        };
        bumps.done(|s| pos.iter().find(|(id, _)| id == s).map(|(_, p)| *p)).await;
        return r;
    }
}

/// The fence check of each group of an insert: the view to confirm with, or why the shard could
/// not be checked.
struct Checked {
    views: BTreeMap<ShardIdx, (FenceView, Vec<h3o::CellIndex>)>,
    failed: BTreeMap<ShardIdx, BackendError>,
}

async fn insert_groups(
    snap: &Snapshot,
    plan: &InsertPlan,
    groups: BTreeMap<ShardIdx, Vec<Document>>,
    mut checked: Checked,
    deadline: Instant,
    out: &mut Outcome,
) -> Result<InsertResult, ApiError> {
    let version = snap.map.version().0;
    let mut futs = Vec::with_capacity(groups.len());
    for (s, ds) in groups {
        let m = mongo_db(snap, s, &plan.db)?;
        let info = shard_info(snap, s, m, Role::Primary);
        let coll = plan.collection.as_str();
        let checked = match checked.failed.remove(&s) {
            Some(e) => Err(e),
            None => Ok(checked.views.remove(&s).expect("every group was checked")),
        };
        futs.push(async move {
            let (view, cells) = match checked {
                Ok(v) => v,
                Err(e) => {
                    return (info, mongo::InsertOutcome { inserted_ids: Vec::new(), error: Some(e), op_time: None });
                }
            };
            let mut o = m.insert(coll, ds, deadline).await;
            if !o.inserted_ids.is_empty()
                && let Err(e) = m.confirm_fences(&view, &cells, version, deadline).await
            {
                // Landed, but a fence came meanwhile: the part is in doubt, not acknowledged.
                o.error = Some(e);
            }
            (info, o)
        });
    }
    let results = futures_util::future::join_all(futs).await;
    out.shard = Some(if results.len() == 1 { results[0].0.id.clone() } else { "multi".into() });
    // One shard that failed outright: the plain error (422 / 503 / 504), as for other writes.
    if results.len() == 1 && results[0].1.inserted_ids.is_empty() && results[0].1.error.is_some() {
        let (info, o) = results.into_iter().next().expect("one result");
        return Err(ApiError::from_backend(o.error.expect("checked"), &info.id));
    }
    let single = results.len() == 1;
    let mut r = InsertResult {
        inserted_count: 0,
        parts: Vec::with_capacity(results.len()),
        token: None,
        map_version: snap.map.version().0,
        partial: false,
    };
    for (info, o) in results {
        r.inserted_count += o.inserted_ids.len();
        r.partial |= o.error.is_some();
        let token = o.op_time.map(|t| make_token(&info.id, mongo::op_time_to_u64(t)));
        r.parts.push(InsertedPart { inserted_ids: o.inserted_ids, token, error: o.error, info });
    }
    if single {
        r.token = r.parts[0].token.clone();
    }
    Ok(r)
}

/// Run an update or delete on the owning shard's primary, after any cutover hold.
pub async fn write(state: &AppState, plan: &WritePlan, out: &mut Outcome) -> Result<WriteResult, ApiError> {
    let mut refreshed = false;
    loop {
        let snap = state.pin();
        out.map_version = Some(snap.map.version().0);
        check_db(&snap, &plan.db, &plan.collection)?;
        let route = super::write_route(&snap, &super::required(&plan.region)?.resolve(&snap)?)?;
        check_write_op(&snap, plan, route.shard)?;
        if let Some(f) = hold::frozen_for(state, &[route.cell]) {
            drop(snap);
            hold::hold(state, f, route.cell).await?;
            continue;
        }
        out.cell = Some(route.cell.to_string());
        let m = mongo_db(&snap, route.shard, &plan.db)?;
        let info = shard_info(&snap, route.shard, m, Role::Primary);
        out.shard = Some(info.id.clone());
        out.role = Some(Role::Primary);
        let deadline = Instant::now() + state.config.request_timeout();
        let id = info.id.clone();
        let coll = plan.collection.as_str();
        let mut r = WriteResult { shards: vec![info], map_version: snap.map.version().0, ..Default::default() };
        let version = snap.map.version().0;
        let view = match m.check_fences(&[route.cell], version, deadline).await {
            Ok(v) => v,
            Err(e) if hold::is_fenced(&e) => {
                let give_up = ApiError::from_backend(e, &id);
                hold::after_fence_hit(state, snap, &mut refreshed, &id, route.cell, give_up).await?;
                continue;
            }
            Err(e) => return Err(ApiError::from_backend(e, &id)),
        };
        let bumps = WriteBumps::begin(state, &plan.db, &[(route.cell, &id)], None).await;
        let done = match &plan.op {
            WriteOp::Update { filter, update, multi, upsert } => {
                m.update(coll, filter.clone(), update.clone(), *multi, *upsert, deadline).await.map(Ok)
            }
            WriteOp::Delete { filter, multi } => m.delete(coll, filter.clone(), *multi, deadline).await.map(Err),
        };
        let pos = match &done {
            Ok(Ok(u)) => u.op_time,
            Ok(Err((_, t))) => *t,
            Err(_) => None,
        };
        // Before the answer goes out, whatever it is (a failed write may have applied).
        bumps.done(|_| pos.map(mongo::op_time_to_u64)).await;
        let op_time = match done.map_err(|e| ApiError::from_backend(e, &id))? {
            Ok(u) => {
                r.matched = Some(u.matched);
                r.modified = Some(u.modified);
                r.upserted_id = u.upserted_id;
                u.op_time
            }
            Err((n, t)) => {
                r.deleted = Some(n);
                t
            }
        };
        m.confirm_fences(&view, &[route.cell], version, deadline).await.map_err(|e| ApiError::from_backend(e, &id))?;
        r.token = op_time.map(|t| make_token(&id, mongo::op_time_to_u64(t)));
        return Ok(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::Region;
    use bson::doc;

    #[test]
    fn pipelines_reading_other_collections() {
        let other = [
            doc! {"$lookup": {"from": "gigs", "localField": "id", "foreignField": "m", "as": "g"}},
            doc! {"$unionWith": "archive"},
            doc! {"$facet": {"a": [{"$match": {}}], "b": [{"$graphLookup": {"from": "x"}}]}},
        ];
        assert!(other.iter().all(reads_other_collections));
        let own = [doc! {"$match": {"genre": "jazz"}}, doc! {"$group": {"_id": "$city", "n": {"$sum": 1}}}];
        assert!(!own.iter().any(reads_other_collections));
    }

    #[test]
    fn merge_on_sort_keys() {
        let keys = ejson::sort_keys(&doc! {"score": -1, "name": 1}).unwrap();
        let a = vec![doc! {"score": 9, "name": "a"}, doc! {"score": 5, "name": "c"}];
        let b = vec![doc! {"score": 7.5, "name": "b"}, doc! {"score": 5, "name": "b"}, doc! {"name": "z"}];
        let out = merge_sorted(vec![a, b, vec![]], &keys);
        let names: Vec<&str> = out.iter().map(|d| d.get_str("name").unwrap()).collect();
        assert_eq!(names, ["a", "b", "b", "c", "z"]);
    }

    #[test]
    fn geo_points() {
        let d = doc! {"loc": {"type": "Point", "coordinates": [-3.7038, 40.4168]}};
        assert!(matches!(geo_point(&d, "loc"), Ok(Some(Region::Point(_)))));
        assert_eq!(geo_point(&doc! {}, "loc"), Ok(None));
        assert!(geo_point(&doc! {"loc": {"type": "Point", "coordinates": [200.0, 0.0]}}, "loc").is_err());
        assert!(geo_point(&doc! {"loc": {"type": "Polygon", "coordinates": []}}, "loc").is_err());
        assert!(geo_point(&doc! {"loc": "x"}, "loc").is_err());
    }

    #[test]
    fn collections_and_pipelines() {
        assert!(check_collection("people").is_ok());
        assert!(check_collection("").is_err());
        assert!(check_collection("a$b").is_err());
        assert!(check_collection("system.users").is_err());
        assert!(check_pipeline(&[doc! {"$match": {}}]).is_ok());
        assert!(check_pipeline(&[doc! {"$match": {}}, doc! {"$out": "x"}]).is_err());
    }
}
