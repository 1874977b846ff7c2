//! Document-API handlers (design §3, MongoDB): `POST /v1/docs/{db}/{collection}/{op}`. Parse
//! (relaxed Extended JSON) → route on one pinned snapshot → run on the owning shards' MongoDB →
//! relaxed Extended JSON. Errors are returned, never rendered here (`respond` does that); the
//! SQL handlers (`api`) are reused for regions, consistency and tokens, not changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use bson::{Bson, Document};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::api::{self, Consistency, Outcome, ShardInfo, make_token, parse_consistency, parse_region, route_err};
use super::respond::{self, ApiError};
use crate::backend::mongo::ejson::{self, ExtJson, RelaxedDocs};
use crate::backend::mongo::guard;
use crate::backend::mongo::{self, FindQuery, MongoDatabase, ReadMode, ReadOpts};
use crate::backend::{DatabaseBackend, Role};
use crate::geo::{self, Region};
use crate::ids::ShardIdx;
use crate::routing::{self, RegionRoute};
use crate::shardmap::DbKind;
use crate::state::{AppState, Snapshot};

/// The operations of the document API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Find,
    Aggregate,
    Count,
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "find" => Op::Find,
            "aggregate" => Op::Aggregate,
            "count" => Op::Count,
            "insert" => Op::Insert,
            "update" => Op::Update,
            "delete" => Op::Delete,
            _ => return None,
        })
    }

    pub fn is_read(self) -> bool {
        matches!(self, Op::Find | Op::Aggregate | Op::Count)
    }

    /// The metrics/span route label (a fixed set).
    pub fn route(self) -> &'static str {
        match self {
            Op::Find => "docs_find",
            Op::Aggregate => "docs_aggregate",
            Op::Count => "docs_count",
            Op::Insert => "docs_insert",
            Op::Update => "docs_update",
            Op::Delete => "docs_delete",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FindRequest {
    region: Option<Value>,
    consistency: Option<Value>,
    filter: Option<ExtJson>,
    projection: Option<ExtJson>,
    sort: Option<ExtJson>,
    #[serde(default)]
    skip: u64,
    limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregateRequest {
    region: Option<Value>,
    consistency: Option<Value>,
    pipeline: Vec<ExtJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountRequest {
    region: Option<Value>,
    consistency: Option<Value>,
    filter: Option<ExtJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InsertRequest {
    region: Option<Value>,
    documents: Vec<ExtJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    region: Option<Value>,
    filter: ExtJson,
    update: ExtJson,
    #[serde(default)]
    multi: bool,
    #[serde(default)]
    upsert: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteRequest {
    region: Option<Value>,
    filter: ExtJson,
    #[serde(default)]
    multi: bool,
}

/// Documents serialised in field order as relaxed Extended JSON.
pub struct Docs(Vec<Document>);

impl Serialize for Docs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RelaxedDocs(&self.0).serialize(s)
    }
}

/// One BSON value serialised as relaxed Extended JSON.
pub struct Ext(Bson);

impl Serialize for Ext {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ejson::Relaxed(&self.0).serialize(s)
    }
}

#[derive(Serialize)]
pub struct ReadAnswer {
    documents: Docs,
    shards: Vec<ShardInfo>,
    map_version: u64,
}

#[derive(Serialize)]
pub struct CountAnswer {
    count: u64,
    shards: Vec<ShardInfo>,
    map_version: u64,
}

#[derive(Serialize)]
pub struct WriteAnswer {
    matched: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modified: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upserted_id: Option<Ext>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<u64>,
    /// Absent when the deployment reports no operation time (a standalone server).
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    shards: Vec<ShardInfo>,
    map_version: u64,
}

#[derive(Serialize)]
pub struct InsertShard {
    #[serde(flatten)]
    info: ShardInfo,
    inserted_ids: Vec<Ext>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

#[derive(Serialize)]
pub struct InsertAnswer {
    inserted_count: usize,
    shards: Vec<InsertShard>,
    /// Only when exactly one shard was written (tokens are per shard; see `shards[].token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    map_version: u64,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Answer {
    Read(ReadAnswer),
    Count(CountAnswer),
    Write(WriteAnswer),
    Insert(InsertAnswer),
}

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError::InvalidParams(m.into())
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    ejson::check_integers(body).map_err(ApiError::InvalidJson)?;
    api::parse_json(body)
}

/// Server-side JavaScript is refused unless the map opts the database in.
fn no_server_js(snap: &Snapshot, db: &str, parts: &[(&str, &Bson)]) -> Result<(), ApiError> {
    guard::check_server_js(db, snap.map.allows_server_js(db), parts).map_err(invalid)
}

/// Collection names come verbatim from the path (no percent-decoding).
fn check_collection(c: &str) -> Result<(), ApiError> {
    if c.is_empty() || c.len() > 255 || c.contains(['$', '\0']) || c.starts_with("system.") {
        return Err(invalid(format!("invalid collection name {c:?}")));
    }
    Ok(())
}

fn opt_doc(v: Option<ExtJson>, what: &str) -> Result<Option<Document>, ApiError> {
    v.map(|v| v.into_document(what)).transpose().map_err(invalid)
}

fn mongo_db<'a>(snap: &'a Snapshot, shard: ShardIdx, db: &str) -> Result<&'a Arc<MongoDatabase>, ApiError> {
    match snap.backends.shards[shard.get()].get(db) {
        Some(DatabaseBackend::Mongo(m)) => Ok(m),
        Some(_) => Err(ApiError::Unsupported(format!("database {db:?} is not mongodb"))),
        None => Err(ApiError::UnknownDatabase(format!("{db} (on shard {})", snap.map.shard(shard).id))),
    }
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

/// The shards a read region covers, in map order.
fn read_shards(snap: &Snapshot, region: &Region, out: &mut Outcome) -> Result<Vec<ShardIdx>, ApiError> {
    match routing::route_region(&snap.map, region).map_err(route_err)? {
        RegionRoute::One(r) => {
            out.cell = Some(r.cell.to_string());
            Ok(vec![r.shard.expect("route() returns owned cells only")])
        }
        RegionRoute::Many(area) => {
            if area.shards.is_empty() {
                return Err(ApiError::NoShardForRegion("(area: no shard owns any of it)".into()));
            }
            Ok(area.shards.iter().map(|(s, _)| *s).collect())
        }
    }
}

/// Run `f` on every shard in parallel; the first failure fails the read (as SQL area reads do).
async fn fan_out<'a, T, F, Fut>(
    snap: &'a Snapshot,
    db: &str,
    shards: &[ShardIdx],
    consistency: &Consistency,
    deadline: Instant,
    f: F,
) -> Result<Vec<(T, ShardInfo)>, ApiError>
where
    F: Fn(&'a Arc<MongoDatabase>, ReadOpts) -> Fut,
    Fut: Future<Output = Result<T, crate::backend::BackendError>>,
{
    let mut futs = Vec::with_capacity(shards.len());
    for s in shards {
        let m = mongo_db(snap, *s, db)?;
        let id = snap.map.shard(*s).id.to_string();
        let (opts, role) = read_opts(consistency, &id, deadline);
        let info = shard_info(snap, *s, m, role);
        let fut = f(m, opts);
        futs.push(async move { fut.await.map(|v| (v, info)).map_err(|e| ApiError::from_backend(e, &id)) });
    }
    futures_util::future::join_all(futs).await.into_iter().collect()
}

fn note_shards(out: &mut Outcome, infos: &[ShardInfo]) {
    out.shard = Some(if infos.len() == 1 { infos[0].id.clone() } else { "multi".into() });
    out.role = infos.first().map(|i| i.role);
}

pub async fn handle(
    state: &AppState,
    db: &str,
    collection: &str,
    op: Op,
    body: &[u8],
    out: &mut Outcome,
) -> Result<(StatusCode, Answer), ApiError> {
    match op {
        Op::Find => find(state, db, collection, body, out).await.map(|a| (StatusCode::OK, Answer::Read(a))),
        Op::Aggregate => aggregate(state, db, collection, body, out).await.map(|a| (StatusCode::OK, Answer::Read(a))),
        Op::Count => count(state, db, collection, body, out).await.map(|a| (StatusCode::OK, Answer::Count(a))),
        Op::Insert => insert(state, db, collection, body, out).await.map(|(s, a)| (s, Answer::Insert(a))),
        Op::Update | Op::Delete => {
            write(state, db, collection, op, body, out).await.map(|a| (StatusCode::OK, Answer::Write(a)))
        }
    }
}

async fn find(
    state: &AppState,
    db: &str,
    collection: &str,
    body: &[u8],
    out: &mut Outcome,
) -> Result<ReadAnswer, ApiError> {
    let snap = state.pin();
    out.map_version = Some(snap.map.version().0);
    let req: FindRequest = parse(body)?;
    check_db(&snap, db, collection)?;
    let region = parse_region(req.region, &snap)?;
    let consistency = parse_consistency(req.consistency, state.config.limits.max_wait_ms)?;
    let filter = opt_doc(req.filter, "filter")?.unwrap_or_default();
    let projection = opt_doc(req.projection, "projection")?;
    let sort = opt_doc(req.sort, "sort")?;
    let sort_keys = sort.as_ref().map(ejson::sort_keys).transpose().map_err(invalid)?;
    let (f, p) = (Bson::Document(filter.clone()), projection.clone().map_or(Bson::Null, Bson::Document));
    no_server_js(&snap, db, &[("filter", &f), ("projection", &p)])?;
    let deadline = Instant::now() + state.config.request_timeout();
    let shards = read_shards(&snap, &region, out)?;
    let single = shards.len() == 1;
    // MongoDB reads `limit: 0` as "no limit"; the merge must too.
    let req_limit = req.limit.filter(|l| *l > 0);
    // Across shards, each shard returns its first skip+limit documents and skip applies after
    // the merge.
    let (skip, limit) = if single { (req.skip, req_limit) } else { (0, req_limit.map(|l| l.saturating_add(req.skip))) };
    let parts = fan_out(&snap, db, &shards, &consistency, deadline, |m, opts| {
        let q = FindQuery { filter: filter.clone(), projection: projection.clone(), sort: sort.clone(), skip, limit };
        m.find(collection, q, opts)
    })
    .await?;
    let (docs, infos): (Vec<Vec<Document>>, Vec<ShardInfo>) = parts.into_iter().unzip();
    note_shards(out, &infos);
    let documents = if single {
        docs.into_iter().flatten().collect()
    } else {
        let merged = match &sort_keys {
            Some(keys) => merge_sorted(docs, keys),
            None => docs.into_iter().flatten().collect(),
        };
        let skip = usize::try_from(req.skip).unwrap_or(usize::MAX);
        let limit = req_limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        merged.into_iter().skip(skip).take(limit).collect()
    };
    Ok(ReadAnswer { documents: Docs(documents), shards: infos, map_version: snap.map.version().0 })
}

/// Per-shard results, each sorted by `keys`, merged in BSON order (ties: lower shard first).
fn merge_sorted(parts: Vec<Vec<Document>>, keys: &[(String, bool)]) -> Vec<Document> {
    crate::kmerge::merge_sorted(parts, usize::MAX, |a, b| ejson::compare_on(keys, a, b))
}

async fn aggregate(
    state: &AppState,
    db: &str,
    collection: &str,
    body: &[u8],
    out: &mut Outcome,
) -> Result<ReadAnswer, ApiError> {
    let snap = state.pin();
    out.map_version = Some(snap.map.version().0);
    let req: AggregateRequest = parse(body)?;
    check_db(&snap, db, collection)?;
    let region = parse_region(req.region, &snap)?;
    let consistency = parse_consistency(req.consistency, state.config.limits.max_wait_ms)?;
    let mut pipeline = Vec::with_capacity(req.pipeline.len());
    for (i, stage) in req.pipeline.into_iter().enumerate() {
        let stage = stage.into_document(&format!("pipeline[{i}]")).map_err(invalid)?;
        // The read endpoint must not write: $out/$merge would write on a member chosen for reading.
        if stage.keys().any(|k| k == "$out" || k == "$merge") {
            return Err(invalid(format!("pipeline[{i}]: $out and $merge are not allowed (aggregate is a read)")));
        }
        pipeline.push(stage);
    }
    no_server_js(&snap, db, &[("pipeline", &Bson::Array(pipeline.iter().cloned().map(Bson::Document).collect()))])?;
    let deadline = Instant::now() + state.config.request_timeout();
    let shards = read_shards(&snap, &region, out)?;
    let parts =
        fan_out(&snap, db, &shards, &consistency, deadline, |m, opts| m.aggregate(collection, pipeline.clone(), opts))
            .await?;
    // Per-shard results are concatenated in shard order: a pipeline's $sort/$group/$limit apply
    // per shard, not across shards.
    let (docs, infos): (Vec<Vec<Document>>, Vec<ShardInfo>) = parts.into_iter().unzip();
    note_shards(out, &infos);
    Ok(ReadAnswer {
        documents: Docs(docs.into_iter().flatten().collect()),
        shards: infos,
        map_version: snap.map.version().0,
    })
}

async fn count(
    state: &AppState,
    db: &str,
    collection: &str,
    body: &[u8],
    out: &mut Outcome,
) -> Result<CountAnswer, ApiError> {
    let snap = state.pin();
    out.map_version = Some(snap.map.version().0);
    let req: CountRequest = parse(body)?;
    check_db(&snap, db, collection)?;
    let region = parse_region(req.region, &snap)?;
    let consistency = parse_consistency(req.consistency, state.config.limits.max_wait_ms)?;
    let filter = opt_doc(req.filter, "filter")?.unwrap_or_default();
    no_server_js(&snap, db, &[("filter", &Bson::Document(filter.clone()))])?;
    let deadline = Instant::now() + state.config.request_timeout();
    let shards = read_shards(&snap, &region, out)?;
    let parts =
        fan_out(&snap, db, &shards, &consistency, deadline, |m, opts| m.count(collection, filter.clone(), opts))
            .await?;
    let count = parts.iter().map(|(n, _)| *n).sum();
    let infos: Vec<ShardInfo> = parts.into_iter().map(|(_, i)| i).collect();
    note_shards(out, &infos);
    Ok(CountAnswer { count, shards: infos, map_version: snap.map.version().0 })
}

/// The owning cell and shard of a write region (point or cell; an area is refused).
fn write_route(snap: &Snapshot, region: &Region) -> Result<(h3o::CellIndex, ShardIdx), ApiError> {
    match routing::route_region(&snap.map, region).map_err(route_err)? {
        RegionRoute::One(r) => Ok((r.cell, r.shard.expect("route() returns owned cells only"))),
        RegionRoute::Many(_) => Err(ApiError::AreaWrite),
    }
}

/// A document's location from its GeoJSON Point field: `Ok(None)` if the field is absent.
fn geo_point(doc: &Document, field: &str) -> Result<Option<Region>, String> {
    ejson::get_path(doc, field).map(|v| geo_value(v, field)).transpose()
}

/// The location a GeoJSON Point value names (`field` is for messages).
fn geo_value(v: &Bson, field: &str) -> Result<Region, String> {
    let Bson::Document(g) = v else { return Err(format!("{field} is not a GeoJSON object")) };
    if g.get_str("type").ok() != Some("Point") {
        return Err(format!("{field} is not a GeoJSON Point"));
    }
    let coords = match g.get("coordinates") {
        Some(Bson::Array(a)) if a.len() >= 2 => a,
        _ => return Err(format!("{field}.coordinates must be [lng, lat]")),
    };
    let num = |b: &Bson| match b {
        Bson::Double(d) => Some(*d),
        Bson::Int32(i) => Some(f64::from(*i)),
        Bson::Int64(i) => Some(*i as f64),
        _ => None,
    };
    let (Some(lng), Some(lat)) = (num(&coords[0]), num(&coords[1])) else {
        return Err(format!("{field}.coordinates must be numbers [lng, lat]"));
    };
    geo::point(lat, lng).map(Region::Point).map_err(|e| format!("{field}: {e}"))
}

/// An update must leave the document on a shard that owns its location: every location the
/// update may give it (upsert equality, `$set`, `$setOnInsert`, replacement) must be owned by
/// `shard`, the shard the update runs on — the same ownership test an insert with a region
/// passes. Updates that remove the location or change it unknowably are refused.
fn check_update_geo(
    snap: &Snapshot,
    db: &str,
    collection: &str,
    shard: ShardIdx,
    filter: &Document,
    update: &mongodb::options::UpdateModifications,
    upsert: bool,
) -> Result<(), ApiError> {
    let Some(field) = snap.map.tables().get(db).and_then(|t| t.get(collection)).and_then(|t| t.geo_field.as_deref())
    else {
        return Ok(());
    };
    for l in guard::update_locations(filter, update, upsert, field).map_err(ApiError::InvalidRegion)? {
        let region = geo_value(&l.value, field).map_err(|e| ApiError::InvalidRegion(format!("{}: {e}", l.source)))?;
        let (_, owner) = write_route(snap, &region).map_err(|e| match e {
            ApiError::NoShardForRegion(c) => ApiError::InvalidRegion(format!("{}: no shard owns {c}", l.source)),
            other => other,
        })?;
        if owner != shard {
            return Err(ApiError::InvalidRegion(format!(
                "{}: the new {field} lies on shard {}, not on the region's shard {}; the update would put the \
                 document on a shard that does not own its location",
                l.source,
                snap.map.shard(owner).id,
                snap.map.shard(shard).id
            )));
        }
    }
    Ok(())
}

async fn insert(
    state: &AppState,
    db: &str,
    collection: &str,
    body: &[u8],
    out: &mut Outcome,
) -> Result<(StatusCode, InsertAnswer), ApiError> {
    let req: InsertRequest = parse(body)?;
    if req.documents.is_empty() {
        return Err(invalid("documents must be a non-empty list"));
    }
    let mut docs = Vec::with_capacity(req.documents.len());
    for (i, d) in req.documents.into_iter().enumerate() {
        docs.push(d.into_document(&format!("documents[{i}]")).map_err(invalid)?);
    }
    loop {
        let snap = state.pin();
        out.map_version = Some(snap.map.version().0);
        check_db(&snap, db, collection)?;
        let geo_field = snap.map.tables().get(db).and_then(|t| t.get(collection)).and_then(|t| t.geo_field.clone());
        let given = match &req.region {
            None | Some(Value::Null) => None,
            Some(_) => Some(write_route(&snap, &parse_region(req.region.clone(), &snap)?)?),
        };
        if given.is_none() && geo_field.is_none() {
            return Err(ApiError::RegionRequired);
        }
        // Route every document: by the body's region, or by its own geo field. With a region,
        // a document whose geo field lies on another shard is refused rather than written
        // where it does not belong.
        let mut routes = Vec::with_capacity(docs.len());
        for (i, d) in docs.iter().enumerate() {
            let own = match &geo_field {
                Some(f) => geo_point(d, f).map_err(|e| ApiError::InvalidRegion(format!("documents[{i}]: {e}")))?,
                None => None,
            };
            let own = match &own {
                Some(r) => Some(write_route(&snap, r).map_err(|e| match e {
                    ApiError::NoShardForRegion(c) => ApiError::NoShardForRegion(format!("{c} (documents[{i}])")),
                    other => other,
                })?),
                None => None,
            };
            let route = match (given, own) {
                (Some(g), Some(o)) if g.1 != o.1 => {
                    return Err(ApiError::InvalidRegion(format!(
                        "documents[{i}]: its {} lies on shard {}, not on the region's shard {}",
                        geo_field.as_deref().unwrap_or("geo field"),
                        snap.map.shard(o.1).id,
                        snap.map.shard(g.1).id
                    )));
                }
                (Some(g), _) => g,
                (None, Some(o)) => o,
                (None, None) => {
                    return Err(ApiError::InvalidRegion(format!(
                        "documents[{i}]: no region in the body and no {} field",
                        geo_field.as_deref().unwrap_or("geo")
                    )));
                }
            };
            routes.push(route);
        }
        let cells: Vec<h3o::CellIndex> = routes.iter().map(|r| r.0).collect();
        if let Some(f) = api::frozen_for(state, &cells) {
            let cell = cells.iter().copied().find(|c| f.covers(*c)).unwrap_or(cells[0]);
            drop(snap);
            api::hold(state, f, cell).await?;
            continue;
        }
        // Group per shard, keeping the batch order inside each group.
        let mut groups: BTreeMap<ShardIdx, Vec<Document>> = BTreeMap::new();
        for (d, (_, s)) in docs.iter().zip(&routes) {
            groups.entry(*s).or_default().push(d.clone());
        }
        if routes.len() == 1 || cells.iter().all(|c| *c == cells[0]) {
            out.cell = Some(cells[0].to_string());
        }
        out.role = Some(Role::Primary);
        let deadline = Instant::now() + state.config.request_timeout();
        let mut futs = Vec::with_capacity(groups.len());
        for (s, ds) in groups {
            let m = mongo_db(&snap, s, db)?;
            let info = shard_info(&snap, s, m, Role::Primary);
            futs.push(async move { (info, m.insert(collection, ds, deadline).await) });
        }
        let results = futures_util::future::join_all(futs).await;
        out.shard = Some(if results.len() == 1 { results[0].0.id.clone() } else { "multi".into() });
        let shard_count = results.len();
        // One shard that failed outright: the plain error (422 / 503 / 504), as for other writes.
        if shard_count == 1 && results[0].1.inserted_ids.is_empty() && results[0].1.error.is_some() {
            let (info, o) = results.into_iter().next().expect("one result");
            return Err(ApiError::from_backend(o.error.expect("checked"), &info.id));
        }
        let mut inserted_count = 0;
        let mut failed = false;
        let mut shards = Vec::with_capacity(shard_count);
        for (info, o) in results {
            inserted_count += o.inserted_ids.len();
            failed |= o.error.is_some();
            let token = o.op_time.map(|t| make_token(&info.id, mongo::op_time_to_u64(t)));
            let error = o.error.map(|e| respond::error_json(e, &info.id));
            shards.push(InsertShard {
                inserted_ids: o.inserted_ids.into_iter().map(Ext).collect(),
                token,
                error,
                info,
            });
        }
        let token = if shard_count == 1 { shards[0].token.clone() } else { None };
        // 207: some documents landed and some did not; the body says which, per shard.
        let status = if failed { StatusCode::MULTI_STATUS } else { StatusCode::OK };
        return Ok((status, InsertAnswer { inserted_count, shards, token, map_version: snap.map.version().0 }));
    }
}

async fn write(
    state: &AppState,
    db: &str,
    collection: &str,
    op: Op,
    body: &[u8],
    out: &mut Outcome,
) -> Result<WriteAnswer, ApiError> {
    enum W {
        Update { filter: Document, update: mongodb::options::UpdateModifications, multi: bool, upsert: bool },
        Delete { filter: Document, multi: bool },
    }
    let (region, w) = if op == Op::Update {
        let req: UpdateRequest = parse(body)?;
        let filter = req.filter.into_document("filter").map_err(invalid)?;
        let update = match req.update.0 {
            Bson::Document(d) => mongodb::options::UpdateModifications::Document(d),
            Bson::Array(stages) => {
                let mut p = Vec::with_capacity(stages.len());
                for (i, s) in stages.into_iter().enumerate() {
                    match s {
                        Bson::Document(d) => p.push(d),
                        other => {
                            return Err(invalid(format!(
                                "update[{i}] must be an object, got {}",
                                ejson::type_name(&other)
                            )));
                        }
                    }
                }
                mongodb::options::UpdateModifications::Pipeline(p)
            }
            other => {
                return Err(invalid(format!(
                    "update must be an object or a pipeline array, got {}",
                    ejson::type_name(&other)
                )));
            }
        };
        (req.region, W::Update { filter, update, multi: req.multi, upsert: req.upsert })
    } else {
        let req: DeleteRequest = parse(body)?;
        let filter = req.filter.into_document("filter").map_err(invalid)?;
        (req.region, W::Delete { filter, multi: req.multi })
    };
    loop {
        let snap = state.pin();
        out.map_version = Some(snap.map.version().0);
        check_db(&snap, db, collection)?;
        let (cell, shard) = write_route(&snap, &parse_region(region.clone(), &snap)?)?;
        match &w {
            W::Update { filter, update, upsert, .. } => {
                let (f, u) = (Bson::Document(filter.clone()), guard::update_bson(update));
                no_server_js(&snap, db, &[("filter", &f), ("update", &u)])?;
                check_update_geo(&snap, db, collection, shard, filter, update, *upsert)?;
            }
            W::Delete { filter, .. } => no_server_js(&snap, db, &[("filter", &Bson::Document(filter.clone()))])?,
        }
        if let Some(f) = api::frozen_for(state, &[cell]) {
            drop(snap);
            api::hold(state, f, cell).await?;
            continue;
        }
        out.cell = Some(cell.to_string());
        let m = mongo_db(&snap, shard, db)?;
        let info = shard_info(&snap, shard, m, Role::Primary);
        out.shard = Some(info.id.clone());
        out.role = Some(Role::Primary);
        let deadline = Instant::now() + state.config.request_timeout();
        let id = info.id.clone();
        let mut answer = WriteAnswer {
            matched: None,
            modified: None,
            upserted_id: None,
            deleted: None,
            token: None,
            shards: vec![info],
            map_version: snap.map.version().0,
        };
        let op_time = match &w {
            W::Update { filter, update, multi, upsert } => {
                let r = m
                    .update(collection, filter.clone(), update.clone(), *multi, *upsert, deadline)
                    .await
                    .map_err(|e| ApiError::from_backend(e, &id))?;
                answer.matched = Some(r.matched);
                answer.modified = Some(r.modified);
                answer.upserted_id = r.upserted_id.map(Ext);
                r.op_time
            }
            W::Delete { filter, multi } => {
                let (n, t) = m
                    .delete(collection, filter.clone(), *multi, deadline)
                    .await
                    .map_err(|e| ApiError::from_backend(e, &id))?;
                answer.deleted = Some(n);
                t
            }
        };
        answer.token = op_time.map(|t| make_token(&id, mongo::op_time_to_u64(t)));
        return Ok(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

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
    fn ops_and_collections() {
        assert_eq!(Op::parse("find"), Some(Op::Find));
        assert_eq!(Op::parse("drop"), None);
        assert!(Op::Count.is_read() && !Op::Insert.is_read());
        assert!(check_collection("people").is_ok());
        assert!(check_collection("").is_err());
        assert!(check_collection("a$b").is_err());
        assert!(check_collection("system.users").is_err());
    }
}
