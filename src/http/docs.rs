//! Document-API handlers (design §3, MongoDB): `POST /v1/docs/{db}/{collection}/{op}`. Parse
//! relaxed Extended JSON into a data-plane plan, run it (`dataplane::docs`), render relaxed
//! Extended JSON. No policy here: routing, holds, the insert split and merges are the data plane's.

use bson::{Bson, Document};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{parse, respond};
use crate::app::AppState;
use crate::backend::mongo::ejson::{self, ExtJson, RelaxedDocs};
use crate::dataplane::docs::{self as plane, InsertPlan, ReadOp, ReadPlan, ReadValue, WriteOp, WritePlan};
use crate::dataplane::{ApiError, Outcome, ShardInfo};

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
    cache: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregateRequest {
    region: Option<Value>,
    consistency: Option<Value>,
    pipeline: Vec<ExtJson>,
    cache: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountRequest {
    region: Option<Value>,
    consistency: Option<Value>,
    filter: Option<ExtJson>,
    cache: Option<Value>,
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

fn opt_doc(v: Option<ExtJson>, what: &str) -> Result<Option<Document>, ApiError> {
    v.map(|v| v.into_document(what)).transpose().map_err(invalid)
}

/// `headers`: the request's, for `Cache-Control` (reads).
pub async fn handle(
    state: &AppState,
    db: &str,
    collection: &str,
    op: Op,
    body: &[u8],
    headers: &http::HeaderMap,
    out: &mut Outcome,
) -> Result<(StatusCode, Answer), ApiError> {
    // Integers outside int64 are refused before parsing (the JSON parser would make them doubles).
    ejson::check_integers(body).map_err(ApiError::InvalidJson)?;
    let max_wait = state.config.limits.max_wait_ms;
    let read = |region, consistency, cache, op| -> Result<ReadPlan, ApiError> {
        Ok(ReadPlan {
            db: db.to_string(),
            collection: collection.to_string(),
            region: parse::region(region)?,
            consistency: parse::consistency(consistency, max_wait)?,
            op,
            cache: parse::cache(cache, headers)?,
        })
    };
    let plan = match op {
        Op::Find => {
            let req: FindRequest = parse::json(body)?;
            let find = ReadOp::Find {
                filter: opt_doc(req.filter, "filter")?.unwrap_or_default(),
                projection: opt_doc(req.projection, "projection")?,
                sort: opt_doc(req.sort, "sort")?,
                skip: req.skip,
                limit: req.limit,
            };
            read(req.region, req.consistency, req.cache, find)?
        }
        Op::Aggregate => {
            let req: AggregateRequest = parse::json(body)?;
            let mut pipeline = Vec::with_capacity(req.pipeline.len());
            for (i, stage) in req.pipeline.into_iter().enumerate() {
                pipeline.push(stage.into_document(&format!("pipeline[{i}]")).map_err(invalid)?);
            }
            read(req.region, req.consistency, req.cache, ReadOp::Aggregate { pipeline })?
        }
        Op::Count => {
            let req: CountRequest = parse::json(body)?;
            let filter = opt_doc(req.filter, "filter")?.unwrap_or_default();
            read(req.region, req.consistency, req.cache, ReadOp::Count { filter })?
        }
        Op::Insert => return insert(state, db, collection, body, out).await,
        Op::Update | Op::Delete => {
            let plan = write_plan(db, collection, op, body)?;
            let r = plane::write(state, &plan, out).await?;
            let answer = WriteAnswer {
                matched: r.matched,
                modified: r.modified,
                upserted_id: r.upserted_id.map(Ext),
                deleted: r.deleted,
                token: r.token,
                shards: r.shards,
                map_version: r.map_version,
            };
            return Ok((StatusCode::OK, Answer::Write(answer)));
        }
    };
    let r = plane::read(state, &plan, out).await?;
    let answer = match r.value {
        ReadValue::Documents(d) => {
            Answer::Read(ReadAnswer { documents: Docs(d), shards: r.shards, map_version: r.map_version })
        }
        ReadValue::Count(count) => Answer::Count(CountAnswer { count, shards: r.shards, map_version: r.map_version }),
    };
    Ok((StatusCode::OK, answer))
}

async fn insert(
    state: &AppState,
    db: &str,
    collection: &str,
    body: &[u8],
    out: &mut Outcome,
) -> Result<(StatusCode, Answer), ApiError> {
    let req: InsertRequest = parse::json(body)?;
    if req.documents.is_empty() {
        return Err(invalid("documents must be a non-empty list"));
    }
    let mut docs = Vec::with_capacity(req.documents.len());
    for (i, d) in req.documents.into_iter().enumerate() {
        docs.push(d.into_document(&format!("documents[{i}]")).map_err(invalid)?);
    }
    let plan =
        InsertPlan { db: db.to_string(), collection: collection.to_string(), region: parse::region(req.region)?, docs };
    let r = plane::insert(state, &plan, out).await?;
    let shards = r
        .parts
        .into_iter()
        .map(|p| InsertShard {
            inserted_ids: p.inserted_ids.into_iter().map(Ext).collect(),
            token: p.token,
            error: p.error.map(|e| respond::error_json(e, &p.info.id)),
            info: p.info,
        })
        .collect();
    // 207: some documents landed and some did not; the body says which, per shard.
    let status = if r.partial { StatusCode::MULTI_STATUS } else { StatusCode::OK };
    let answer = InsertAnswer { inserted_count: r.inserted_count, shards, token: r.token, map_version: r.map_version };
    Ok((status, Answer::Insert(answer)))
}

fn write_plan(db: &str, collection: &str, op: Op, body: &[u8]) -> Result<WritePlan, ApiError> {
    let (region, op) = if op == Op::Update {
        let req: UpdateRequest = parse::json(body)?;
        let filter = req.filter.into_document("filter").map_err(invalid)?;
        let update = update_modifications(req.update.0)?;
        (req.region, WriteOp::Update { filter, update, multi: req.multi, upsert: req.upsert })
    } else {
        let req: DeleteRequest = parse::json(body)?;
        let filter = req.filter.into_document("filter").map_err(invalid)?;
        (req.region, WriteOp::Delete { filter, multi: req.multi })
    };
    Ok(WritePlan { db: db.to_string(), collection: collection.to_string(), region: parse::region(region)?, op })
}

/// An update document, or an aggregation pipeline of update stages.
fn update_modifications(u: Bson) -> Result<mongodb::options::UpdateModifications, ApiError> {
    match u {
        Bson::Document(d) => Ok(mongodb::options::UpdateModifications::Document(d)),
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
            Ok(mongodb::options::UpdateModifications::Pipeline(p))
        }
        other => {
            Err(invalid(format!("update must be an object or a pipeline array, got {}", ejson::type_name(&other))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops() {
        assert_eq!(Op::parse("find"), Some(Op::Find));
        assert_eq!(Op::parse("drop"), None);
        assert!(Op::Count.is_read() && !Op::Insert.is_read());
    }
}
