//! Data-plane handlers (design §3): `POST /v1/sql/{db}/query|execute`. Parse → route on one pinned
//! snapshot → run on the chosen endpoint(s) → JSON. Errors are returned, never rendered here.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::respond::ApiError;
use crate::backend::health::EndpointHealth;
use crate::backend::mssql::MssqlDatabase;
use crate::backend::postgres::{PgDatabase, PgEndpoint, Rows};
use crate::backend::{DatabaseBackend, Role};
use crate::geo::{self, Region};
use crate::ids::ShardIdx;
use crate::routing::{self, RegionRoute, RouteError};
use crate::state::{AppState, Snapshot};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionJson {
    lat: Option<f64>,
    lng: Option<f64>,
    cell: Option<String>,
    radius_km: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    region: Option<Value>,
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
    consistency: Option<Value>,
    merge: Option<Merge>,
    row_format: Option<RowFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    region: Option<Value>,
    sql: Option<String>,
    #[serde(default)]
    params: Vec<Value>,
    batch: Option<Vec<Statement>>,
    row_format: Option<RowFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    #[serde(default)]
    order_by: Vec<OrderBy>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderBy {
    column: String,
    #[serde(default)]
    desc: bool,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RowFormat {
    #[default]
    Object,
    Array,
}

/// How a read picks its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consistency {
    Replica,
    Primary,
    After { shard: String, lsn: u64, wait: Duration },
}

#[derive(Serialize)]
pub(super) struct ShardInfo {
    pub(super) id: String,
    pub(super) role: Role,
    pub(super) endpoint: String,
}

pub(super) fn parse_region(v: Option<Value>, snap: &Snapshot) -> Result<Region, ApiError> {
    let v = match v {
        None | Some(Value::Null) => return Err(ApiError::RegionRequired),
        Some(v) => v,
    };
    let r: RegionJson = super::json::from_value_strict(v, "region").map_err(ApiError::InvalidRegion)?;
    geo::region(r.lat, r.lng, r.cell.as_deref(), r.radius_km, snap.map.resolution())
        .map_err(|e| ApiError::InvalidRegion(e.to_string()))
}

/// Token: base64url("v1:<shard>:<lsn hex>"). Opaque to clients.
pub fn make_token(shard: &str, lsn: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{shard}:{lsn:x}"))
}

pub(super) fn parse_token(t: &str) -> Option<(String, u64)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let mut parts = s.splitn(3, ':');
    if parts.next()? != "v1" {
        return None;
    }
    let shard = parts.next()?.to_string();
    let lsn = u64::from_str_radix(parts.next()?, 16).ok()?;
    Some((shard, lsn))
}

pub(super) fn parse_consistency(v: Option<Value>, max_wait_ms: u64) -> Result<Consistency, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Consistency::Replica),
        Some(Value::String(s)) if s == "replica" => Ok(Consistency::Replica),
        Some(Value::String(s)) if s == "primary" => Ok(Consistency::Primary),
        Some(Value::Object(o)) => {
            let mut token = None;
            let mut wait = 0u64;
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("after", Value::String(t)) => token = Some(t),
                    ("wait_ms", Value::Number(n)) if n.as_u64().is_some() => wait = n.as_u64().unwrap_or(0),
                    _ => {
                        return Err(ApiError::InvalidParams(format!(
                            "consistency: unexpected field or value {k:?} (expected after: string, wait_ms: integer >= 0)"
                        )));
                    }
                }
            }
            let token = token.ok_or_else(|| ApiError::InvalidParams("consistency object needs \"after\"".into()))?;
            let (shard, lsn) = parse_token(&token)
                .ok_or_else(|| ApiError::InvalidParams("consistency.after is not a token cellgate issued".into()))?;
            Ok(Consistency::After { shard, lsn, wait: Duration::from_millis(wait.min(max_wait_ms)) })
        }
        Some(other) => Err(ApiError::InvalidParams(format!(
            "consistency must be \"replica\", \"primary\" or {{\"after\": token}}, got {other}"
        ))),
    }
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    super::json::parse_strict(body).map_err(ApiError::InvalidJson)
}

/// A SQL database of one shard, by kind.
enum SqlDb<'a> {
    Pg(&'a Arc<PgDatabase>),
    Mssql(&'a Arc<MssqlDatabase>),
}

fn sql_db<'a>(snap: &'a Snapshot, shard: ShardIdx, db: &str) -> Result<SqlDb<'a>, ApiError> {
    match snap.backends.shards[shard.get()].get(db) {
        Some(DatabaseBackend::Postgres(pg)) => Ok(SqlDb::Pg(pg)),
        Some(DatabaseBackend::Sqlserver(ms)) => Ok(SqlDb::Mssql(ms)),
        Some(DatabaseBackend::Mongo(_)) => Err(ApiError::Unsupported(format!(
            "database {db:?} is mongodb: use POST /v1/docs/{db}/{{collection}}/{{op}}"
        ))),
        // The map says the database exists but this shard lacks it.
        None => Err(ApiError::UnknownDatabase(format!("{db} (on shard {})", snap.map.shard(shard).id))),
    }
}

/// Fail fast when the prober has seen the primary down (or read-only) repeatedly.
fn ensure_writable(health: &EndpointHealth, label: &str, shard: &str) -> Result<(), ApiError> {
    if health.writable() {
        return Ok(());
    }
    let v = health.view();
    Err(ApiError::ShardUnavailable {
        shard: shard.to_string(),
        reason: format!("primary {label} is down: {}", v.last_error.unwrap_or_else(|| "not writable".into())),
    })
}

/// Is this failure worth retrying the read on the primary (the replica is gone or full)?
fn replica_retryable(e: &crate::backend::BackendError) -> bool {
    matches!(
        e.root(),
        crate::backend::BackendError::Unavailable { .. } | crate::backend::BackendError::Overloaded { .. }
    )
}

/// A read on a SQL Server shard. There is no replay position to compare a token with, so a
/// read after a write (`consistency.after`) goes to the primary (docs/sqlserver.md).
async fn read_on_mssql(
    ms: &MssqlDatabase,
    id: String,
    sql: &str,
    params: &[Value],
    consistency: &Consistency,
) -> Result<(Rows, ShardInfo), ApiError> {
    let mut candidates = Vec::with_capacity(2);
    if *consistency == Consistency::Replica
        && let Some(r) = ms.pick_replica()
    {
        candidates.push(r);
    }
    candidates.push(ms.primary.clone());
    let mut last_err = None;
    for ep in candidates {
        match ep.query(sql, params).await {
            Ok(rows) => return Ok((rows, ShardInfo { id, role: ep.role, endpoint: ep.label.to_string() })),
            Err(e) if ep.role == Role::Replica && replica_retryable(&e) => {
                tracing::warn!(shard = %id, endpoint = %ep.label, error = %e, "replica read failed; retrying on the primary");
                last_err = Some(e);
            }
            Err(e) => return Err(ApiError::from_backend(e, &id)),
        }
    }
    Err(ApiError::from_backend(
        last_err.unwrap_or(crate::backend::BackendError::Unavailable {
            endpoint: id.clone(),
            reason: "no endpoint".into(),
        }),
        &id,
    ))
}

/// What the request span and metrics learn about a request.
#[derive(Default)]
pub struct Outcome {
    pub shard: Option<String>,
    pub role: Option<Role>,
    pub cell: Option<String>,
    /// The version of the snapshot the request pinned (the last one, after a fence retry).
    pub map_version: Option<u64>,
}

/// Run a read on one shard with the requested consistency. Reads are idempotent: if a replica
/// fails mid-read (killed, refused), the read is retried once on the primary.
async fn read_on_shard(
    state: &AppState,
    snap: &Snapshot,
    shard: ShardIdx,
    db: &str,
    sql: &str,
    params: &[Value],
    consistency: &Consistency,
    deadline: Instant,
) -> Result<(Rows, ShardInfo), ApiError> {
    let id = snap.map.shard(shard).id.to_string();
    let pg = match sql_db(snap, shard, db)? {
        SqlDb::Pg(pg) => pg,
        // Boxed: keeps the (larger) tiberius read state out of every PostgreSQL read's future.
        SqlDb::Mssql(ms) => return Box::pin(read_on_mssql(ms, id, sql, params, consistency)).await,
    };
    let h = &state.config.health;
    // (endpoint, replay position it must reach and until when)
    type Candidate = (Arc<PgEndpoint>, Option<(u64, Instant)>);
    let mut candidates: Vec<Candidate> = Vec::new();
    match consistency {
        Consistency::Primary => {}
        Consistency::Replica => {
            if let Some(r) = pg.pick_replica(h.max_lag_ms, h.max_lag_bytes) {
                candidates.push((r, None));
            }
        }
        Consistency::After { shard: tshard, lsn, wait } => {
            let until = (Instant::now() + *wait).min(deadline);
            let min = if *tshard == id { Some((*lsn, until)) } else { None };
            if let Some(r) = pg.pick_replica(h.max_lag_ms, h.max_lag_bytes) {
                candidates.push((r, min));
            }
        }
    }
    candidates.push((pg.primary.clone(), None));
    let mut last_err = None;
    for (ep, min_lsn) in candidates {
        match ep.query(sql, params, min_lsn).await {
            Ok(Some(rows)) => {
                return Ok((rows, ShardInfo { id, role: ep.role, endpoint: ep.label.to_string() }));
            }
            // The replica had not replayed the token's position in time: go to the primary.
            Ok(None) => continue,
            Err(e) => {
                let retry = ep.role == Role::Replica && replica_retryable(&e);
                if !retry {
                    return Err(ApiError::from_backend(e, &id));
                }
                tracing::warn!(shard = %id, endpoint = %ep.label, error = %e, "replica read failed; retrying on the primary");
                last_err = Some(e);
            }
        }
    }
    Err(ApiError::from_backend(
        last_err.unwrap_or(crate::backend::BackendError::Unavailable {
            endpoint: id.clone(),
            reason: "no endpoint".into(),
        }),
        &id,
    ))
}

pub async fn query(state: &AppState, db: &str, body: &[u8], out: &mut Outcome) -> Result<Answer, ApiError> {
    let snap = state.pin();
    out.map_version = Some(snap.map.version().0);
    let req: QueryRequest = parse_json(body)?;
    if !snap.map.databases().contains_key(db) {
        return Err(ApiError::UnknownDatabase(db.to_string()));
    }
    let region = parse_region(req.region, &snap)?;
    let consistency = parse_consistency(req.consistency, state.config.limits.max_wait_ms)?;
    let deadline = Instant::now() + state.config.request_timeout();
    let route = routing::route_region(&snap.map, &region).map_err(route_err)?;
    let format = req.row_format.unwrap_or_default();
    match route {
        RegionRoute::One(r) => {
            let shard = r.shard.expect("route() returns owned cells only");
            out.cell = Some(r.cell.to_string());
            let (rows, info) =
                read_on_shard(state, &snap, shard, db, &req.sql, &req.params, &consistency, deadline).await?;
            out.shard = Some(info.id.clone());
            out.role = Some(info.role);
            Ok(render(rows, format, vec![info], None, None, snap.map.version().0))
        }
        RegionRoute::Many(area) => {
            if area.shards.is_empty() {
                return Err(ApiError::NoShardForRegion("(area: no shard owns any of it)".into()));
            }
            // Fan out in parallel to the owning shards only.
            let futs = area
                .shards
                .iter()
                .map(|(s, _)| read_on_shard(state, &snap, *s, db, &req.sql, &req.params, &consistency, deadline));
            let results = futures_util::future::join_all(futs).await;
            let mut parts = Vec::with_capacity(results.len());
            for r in results {
                parts.push(r?);
            }
            out.shard = Some(if parts.len() == 1 { parts[0].1.id.clone() } else { "multi".into() });
            let (rows, infos): (Vec<Rows>, Vec<ShardInfo>) = parts.into_iter().unzip();
            let merged = merge_rows(rows, req.merge.as_ref())?;
            Ok(render(merged, format, infos, None, None, snap.map.version().0))
        }
    }
}

pub async fn execute(state: &AppState, db: &str, body: &[u8], out: &mut Outcome) -> Result<Answer, ApiError> {
    let snap = state.pin();
    let req: ExecuteRequest = parse_json(body)?;
    if !snap.map.databases().contains_key(db) {
        return Err(ApiError::UnknownDatabase(db.to_string()));
    }
    let stmts: Vec<(String, Vec<Value>)> = match (req.sql, req.batch) {
        (Some(sql), None) => vec![(sql, req.params)],
        (None, Some(batch)) if !batch.is_empty() && req.params.is_empty() => {
            batch.into_iter().map(|s| (s.sql, s.params)).collect()
        }
        (None, Some(_)) => {
            return Err(ApiError::InvalidJson(
                "batch must be a non-empty list (params go inside each statement)".into(),
            ));
        }
        (Some(_), Some(_)) => return Err(ApiError::InvalidJson("give either sql or batch, not both".into())),
        (None, None) => return Err(ApiError::InvalidJson("missing field `sql` (or `batch`)".into())),
    };
    let format = req.row_format.unwrap_or_default();
    drop(snap);
    // At most two attempts: a write that hits a migration fence on the old owner means this
    // instance's map is stale; it refreshes the map and retries once on the new owner.
    let mut refreshed = false;
    loop {
        let snap = state.pin();
        out.map_version = Some(snap.map.version().0);
        let region = parse_region(req.region.clone(), &snap)?;
        let route = match routing::route_region(&snap.map, &region).map_err(route_err)? {
            RegionRoute::One(r) => r,
            RegionRoute::Many(_) => return Err(ApiError::AreaWrite),
        };
        // Cutover hold: writes to moving cells wait for the release (bounded by hold_ms), then
        // re-route on the map published by then.
        if let Some(f) = frozen_for(state, &[route.cell]) {
            drop(snap);
            hold(state, f, route.cell).await?;
            continue;
        }
        let shard = route.shard.expect("route() returns owned cells only");
        out.cell = Some(route.cell.to_string());
        let id = snap.map.shard(shard).id.to_string();
        out.shard = Some(id.clone());
        out.role = Some(Role::Primary);
        let pg = match sql_db(&snap, shard, db)? {
            SqlDb::Pg(pg) => pg,
            SqlDb::Mssql(ms) => {
                ensure_writable(&ms.primary.health, &ms.primary.label, &id)?;
                let (rows, affected) = ms.primary.execute(&stmts).await.map_err(|e| ApiError::from_backend(e, &id))?;
                let info = ShardInfo { id: id.clone(), role: Role::Primary, endpoint: ms.primary.label.to_string() };
                // No replay position exists: the token names the shard only; reads after it go
                // to the primary.
                let token = make_token(&id, 0);
                return Ok(render(rows, format, vec![info], Some(affected), Some(token), snap.map.version().0));
            }
        };
        ensure_writable(&pg.primary.health, &pg.primary.label, &id)?;
        match pg.primary.execute(&stmts).await {
            Ok(res) => {
                let info = ShardInfo { id: id.clone(), role: Role::Primary, endpoint: pg.primary.label.to_string() };
                let token = make_token(&id, res.lsn);
                return Ok(render(
                    res.rows,
                    format,
                    vec![info],
                    Some(res.rows_affected),
                    Some(token),
                    snap.map.version().0,
                ));
            }
            Err(e) if is_fenced(&e) => {
                // Nothing was written (the fence trigger rejected the statement and its transaction).
                metrics::counter!("cellgate_fence_hits_total", "shard" => id.clone()).increment(1);
                if refreshed {
                    return Err(ApiError::CellsFrozen(format!(
                        "cell {} moved away from shard {id}; retry shortly",
                        route.cell
                    )));
                }
                refreshed = true;
                let version = snap.map.version();
                drop(snap);
                tracing::warn!(shard = %id, cell = %route.cell, "write hit a migration fence: refreshing the map");
                let _ =
                    crate::reload::request(&state.reload_tx, crate::reload::Source::File { trigger: "fence" }).await;
                if state.pin().map.version() == version {
                    return Err(ApiError::CellsFrozen(format!("cell {} is moving; retry shortly", route.cell)));
                }
            }
            Err(e) => return Err(ApiError::from_backend(e, &id)),
        }
    }
}

/// The cutover hold (design §5) covering any of `cells`, if one is in force.
pub(super) fn frozen_for(state: &AppState, cells: &[h3o::CellIndex]) -> Option<Arc<crate::migrate::Freeze>> {
    state.freeze.borrow().as_ref().filter(|f| cells.iter().any(|c| f.covers(*c))).cloned()
}

/// Hold a write to `cell` until the freeze `f` is released (then the caller re-routes on the map
/// published by then), or fail with `cells_frozen` when its hold time runs out. The caller must
/// not keep a snapshot pinned while waiting.
pub(super) async fn hold(
    state: &AppState,
    f: Arc<crate::migrate::Freeze>,
    cell: h3o::CellIndex,
) -> Result<(), ApiError> {
    let mut rx = state.freeze.subscribe();
    let released =
        tokio::time::timeout_at(f.deadline, rx.wait_for(|cur| !cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &f)))).await;
    match released {
        Ok(_) => Ok(()),
        Err(_) => Err(ApiError::CellsFrozen(format!("cell {cell} is moving; retry shortly"))),
    }
}

fn is_fenced(e: &crate::backend::BackendError) -> bool {
    matches!(e.root(), crate::backend::BackendError::Database { sqlstate, .. } if sqlstate == crate::migrate::sql::FENCE_SQLSTATE)
}

pub(super) fn route_err(e: RouteError) -> ApiError {
    match e {
        RouteError::NoShard(c) => ApiError::NoShardForRegion(c.to_string()),
        RouteError::CellIsArea { .. } => ApiError::InvalidRegion(e.to_string()),
    }
}

/// A successful answer, serialised straight from the backend rows (no intermediate JSON tree).
#[derive(Serialize)]
pub struct Answer {
    columns: Vec<ColumnOut>,
    rows: RowsOut,
    shards: Vec<ShardInfo>,
    map_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows_affected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

#[derive(Serialize)]
struct ColumnOut {
    name: String,
    r#type: String,
}

struct RowsOut {
    rows: Rows,
    format: RowFormat,
}

impl Serialize for RowsOut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let mut seq = s.serialize_seq(Some(self.rows.rows.len()))?;
        for row in &self.rows.rows {
            match self.format {
                RowFormat::Array => seq.serialize_element(row)?,
                RowFormat::Object => {
                    struct Obj<'a>(&'a [(String, String)], &'a [Value]);
                    impl Serialize for Obj<'_> {
                        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                            let mut m = s.serialize_map(Some(self.1.len()))?;
                            for ((name, _), v) in self.0.iter().zip(self.1) {
                                m.serialize_entry(name, v)?;
                            }
                            m.end()
                        }
                    }
                    seq.serialize_element(&Obj(&self.rows.columns, row))?
                }
            }
        }
        seq.end()
    }
}

fn render(
    rows: Rows,
    format: RowFormat,
    shards: Vec<ShardInfo>,
    rows_affected: Option<u64>,
    token: Option<String>,
    map_version: u64,
) -> Answer {
    let columns = rows.columns.iter().map(|(n, t)| ColumnOut { name: n.clone(), r#type: t.clone() }).collect();
    Answer { columns, rows: RowsOut { rows, format }, shards, map_version, rows_affected, token }
}

/// Compare two JSON cells of one column. Numbers numerically; numeric/int8 columns may carry
/// exact values as strings, compared numerically too; NULLs sort last (as PostgreSQL's ASC).
fn cmp_values(a: &Value, b: &Value, numeric_strings: bool) -> Ordering {
    fn num(v: &Value, strings: bool) -> Option<f64> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) if strings => s.parse().ok(),
            _ => None,
        }
    }
    match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Greater,
        (_, Value::Null) => Ordering::Less,
        _ => match (num(a, numeric_strings), num(b, numeric_strings)) {
            (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            _ => match (a, b) {
                (Value::String(x), Value::String(y)) => x.cmp(y),
                (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
                _ => a.to_string().cmp(&b.to_string()),
            },
        },
    }
}

/// k-way merge of per-shard results (each already ordered by the query's ORDER BY) on the given
/// columns, then the limit. Without `merge`, rows are concatenated in shard order.
fn merge_rows(parts: Vec<Rows>, merge: Option<&Merge>) -> Result<Rows, ApiError> {
    let columns = parts.iter().find(|p| !p.columns.is_empty()).map(|p| p.columns.clone()).unwrap_or_default();
    let Some(m) = merge else {
        let rows = parts.into_iter().flat_map(|p| p.rows).collect();
        return Ok(Rows { columns, rows });
    };
    let mut keys = Vec::with_capacity(m.order_by.len());
    for o in &m.order_by {
        let i = columns.iter().position(|(n, _)| *n == o.column).ok_or_else(|| {
            ApiError::InvalidParams(format!("merge.order_by: column {:?} is not in the result", o.column))
        })?;
        // Exact numbers that may arrive as strings: PostgreSQL numeric/int8, SQL Server
        // decimal/numeric/money/bigint.
        let numeric = matches!(columns[i].1.as_str(), "numeric" | "int8" | "decimal" | "money" | "bigint");
        keys.push((i, o.desc, numeric));
    }
    let cmp = |a: &Vec<Value>, b: &Vec<Value>| {
        for (i, desc, numeric) in &keys {
            let o = cmp_values(&a[*i], &b[*i], *numeric);
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    };
    let parts = parts.into_iter().map(|p| p.rows).collect();
    let rows = crate::kmerge::merge_sorted(parts, m.limit.unwrap_or(usize::MAX), cmp);
    Ok(Rows { columns, rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(vals: &[(i64, &str)]) -> Rows {
        Rows {
            columns: vec![("dist".into(), "int8".into()), ("name".into(), "text".into())],
            rows: vals.iter().map(|(d, n)| vec![json!(d), json!(n)]).collect(),
        }
    }

    #[test]
    fn k_way_merge_then_limit() {
        let parts = vec![rows(&[(1, "a"), (4, "d"), (9, "i")]), rows(&[(2, "b"), (3, "c")]), rows(&[])];
        let m = Merge { order_by: vec![OrderBy { column: "dist".into(), desc: false }], limit: Some(4) };
        let out = merge_rows(parts, Some(&m)).unwrap();
        let names: Vec<_> = out.rows.iter().map(|r| r[1].as_str().unwrap().to_string()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let bad = Merge { order_by: vec![OrderBy { column: "nope".into(), desc: false }], limit: None };
        assert!(merge_rows(vec![rows(&[(1, "a")])], Some(&bad)).is_err());
    }

    #[test]
    fn exact_numbers_as_strings_merge_numerically() {
        // SQL Server decimal columns arrive as strings: "9.25" < "10.5" numerically, not as text.
        let part = |v: &[&str]| Rows {
            columns: vec![("price".into(), "decimal".into())],
            rows: v.iter().map(|p| vec![json!(p)]).collect(),
        };
        let m = Merge { order_by: vec![OrderBy { column: "price".into(), desc: false }], limit: None };
        let out = merge_rows(vec![part(&["9.25", "10.5"]), part(&["9.5", "100"])], Some(&m)).unwrap();
        let got: Vec<_> = out.rows.iter().map(|r| r[0].as_str().unwrap().to_string()).collect();
        assert_eq!(got, ["9.25", "9.5", "10.5", "100"]);
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = make_token("eu-1", 0x16_b374_d848);
        assert_eq!(parse_token(&t), Some(("eu-1".into(), 0x16_b374_d848)));
        assert_eq!(parse_token("garbage!"), None);
        assert!(parse_consistency(Some(json!({"after": "zzz"})), 100).is_err());
        assert!(parse_consistency(Some(json!({"after": t, "wait_ms": -1})), 100).is_err());
        assert_eq!(
            parse_consistency(Some(json!({"after": t, "wait_ms": 5000})), 100).unwrap(),
            Consistency::After { shard: "eu-1".into(), lsn: 0x16_b374_d848, wait: Duration::from_millis(100) }
        );
    }
}
