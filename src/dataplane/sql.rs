//! SQL reads and writes (PostgreSQL and SQL Server shards): replica choice with fallback to the
//! primary, replay waits for read-your-writes tokens, area fan-out + merge, the read cache step
//! for reads that opt in, and writes on the primary under the cutover hold with one stale-map
//! retry after a fence and the cache's version bumps around them. Returns rows; never renders
//! them.

use std::sync::Arc;

use serde_json::Value;
use tokio::time::Instant;

use super::cache::{self as step, CacheAsk, Cached, FillFn, Floors, WriteBumps, with_floor};
use super::merge::{Merge, merge_rows};
use super::{ApiError, Consistency, Outcome, RegionSpec, ShardInfo, hold, make_token, replica_retryable, statements};
use crate::app::AppState;
use crate::backend::mssql::MssqlDatabase;
use crate::backend::postgres::{PgDatabase, PgEndpoint, Rows};
use crate::backend::{BackendError, DatabaseBackend, Role};
use crate::cache::key::normalize_statement;
use crate::config::Health;
use crate::ids::ShardIdx;
use crate::routing::{self, RegionRoute};
use crate::state::Snapshot;

/// A read: one statement on the shard(s) owning the region.
#[derive(Clone)]
pub struct ReadPlan {
    pub db: String,
    pub region: Option<RegionSpec>,
    pub sql: String,
    pub params: Vec<Value>,
    pub consistency: Consistency,
    pub merge: Option<Merge>,
    /// The read cache: the request's opt-in and `Cache-Control` directives.
    pub cache: CacheAsk,
}

/// A write: one statement, or a batch run in one transaction, on the owning shard's primary.
pub struct WritePlan {
    pub db: String,
    pub region: Option<RegionSpec>,
    pub stmts: Vec<(String, Vec<Value>)>,
    /// The token may run DDL (`ddl` scope).
    pub allow_ddl: bool,
}

/// What a SQL request produced.
pub struct SqlResult {
    pub rows: Rows,
    pub shards: Vec<ShardInfo>,
    pub map_version: u64,
    pub rows_affected: Option<u64>,
    pub token: Option<String>,
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

fn check_db(snap: &Snapshot, db: &str) -> Result<crate::shardmap::DbKind, ApiError> {
    snap.map.databases().get(db).copied().ok_or_else(|| ApiError::UnknownDatabase(db.to_string()))
}

/// Fail fast when the prober has seen the primary down (or read-only) repeatedly.
fn ensure_writable(health: &crate::backend::health::EndpointHealth, label: &str, shard: &str) -> Result<(), ApiError> {
    if health.writable() {
        return Ok(());
    }
    let v = health.view();
    Err(ApiError::ShardUnavailable {
        shard: shard.to_string(),
        reason: format!("primary {label} is down: {}", v.last_error.unwrap_or_else(|| "not writable".into())),
    })
}

fn no_endpoint(last: Option<BackendError>, id: &str) -> ApiError {
    let e = last.unwrap_or(BackendError::Unavailable { endpoint: id.to_string(), reason: "no endpoint".into() });
    ApiError::from_backend(e, id)
}

/// Run a read plan: one shard for a point or cell, a parallel fan-out and merge for an area;
/// through the cache step when the request opted in or its tables have a cache policy.
pub async fn read(state: &AppState, plan: &ReadPlan, out: &mut Outcome) -> Result<SqlResult, ApiError> {
    let snap = state.pin();
    out.map_version = Some(snap.map.version().0);
    let kind = check_db(&snap, &plan.db)?;
    let verdict = statements::check_read(state, &plan.db, kind, &plan.sql)?;
    let ask = plan.cache.with_policy(step::policy_for(&snap.map, &plan.db, verdict.relations.as_deref()));
    let region = super::required(&plan.region)?.resolve(&snap)?;
    let route = routing::route_region(&snap.map, &region).map_err(super::route_err)?;
    let (shards, area) = match &route {
        RegionRoute::One(r) => {
            out.cell = Some(r.cell.to_string());
            (vec![r.shard], false)
        }
        RegionRoute::Many(area) => {
            if area.shards.is_empty() {
                return Err(ApiError::NoShardForRegion("(area: no shard owns any of it)".into()));
            }
            (area.shards.iter().map(|(s, _)| *s).collect(), true)
        }
    };
    let r = if !ask.uses_cache() {
        let deadline = Instant::now() + state.config.request_timeout();
        run_read(&state.config.health, &snap, plan, &shards, area, &Floors::new(), deadline).await?
    } else {
        let fill = fill_fn(state, &snap, plan, shards, area);
        let parts = |b: &mut crate::cache::key::KeyBuilder| {
            b.str(normalize_statement(&plan.sql));
            b.bytes(&serde_json::to_vec(&plan.params).unwrap_or_default());
            b.bytes(&serde_json::to_vec(&plan.merge).unwrap_or_default());
        };
        let read = step::Read {
            db: &plan.db,
            kind: "sql",
            snap: &snap,
            route: &route,
            consistency: &plan.consistency,
            ask: &ask,
        };
        step::read(state, read, parts, fill, out).await?
    };
    if area {
        out.note_shards(&r.shards);
        out.role = None;
    } else if let Some(info) = r.shards.first() {
        out.shard = Some(info.id.clone());
        out.role = Some(info.role);
    }
    // Counted for warming (docs/cache.md, *Warming*) when the cache answered or stored it.
    super::warm::note_sql(state, plan, out);
    Ok(r)
}

/// The backend read of a cached read, owning what it needs (a stale entry's refresh runs it
/// after the request is answered).
fn fill_fn(
    state: &AppState,
    snap: &Arc<Snapshot>,
    plan: &ReadPlan,
    shards: Vec<ShardIdx>,
    area: bool,
) -> FillFn<SqlResult> {
    let (snap, plan, health) = (snap.clone(), Arc::new(plan.clone()), state.config.health.clone());
    let (shards, timeout) = (Arc::new(shards), state.config.request_timeout());
    Arc::new(move |floors| {
        let (snap, plan, health, shards) = (snap.clone(), plan.clone(), health.clone(), shards.clone());
        Box::pin(async move { run_read(&health, &snap, &plan, &shards, area, &floors, Instant::now() + timeout).await })
    })
}

/// The read itself: one shard, or (an area) every owning shard in parallel and the merge. Each
/// shard is read with the request's consistency raised to its floor (cache fills).
async fn run_read(
    health: &Health,
    snap: &Snapshot,
    plan: &ReadPlan,
    shards: &[ShardIdx],
    area: bool,
    floors: &Floors,
    deadline: Instant,
) -> Result<SqlResult, ApiError> {
    let map_version = snap.map.version().0;
    let on = |s: ShardIdx| {
        let c = with_floor(&plan.consistency, snap.map.shard(s).id.as_str(), floors);
        read_on_shard(health, snap, s, plan, c, deadline)
    };
    if !area {
        let (rows, info) = on(shards[0]).await?;
        return Ok(SqlResult { rows, shards: vec![info], map_version, rows_affected: None, token: None });
    }
    // Fan out in parallel to the owning shards only.
    let results = futures_util::future::join_all(shards.iter().map(|s| on(*s))).await;
    let parts = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let (rows, infos): (Vec<Rows>, Vec<ShardInfo>) = parts.into_iter().unzip();
    let rows = merge_rows(rows, plan.merge.as_ref())?;
    Ok(SqlResult { rows, shards: infos, map_version, rows_affected: None, token: None })
}

/// A cached SQL answer: columns, rows, the shards that answered and the map version, as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    c: Vec<(String, String)>,
    r: Vec<Vec<Value>>,
    s: Vec<(String, String, String)>,
    m: u64,
}

impl Cached for SqlResult {
    fn encode(&self) -> Option<Vec<u8>> {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            c: &'a [(String, String)],
            r: &'a [Vec<Value>],
            s: Vec<(&'a str, &'a str, &'a str)>,
            m: u64,
        }
        let s = self.shards.iter().map(|i| (i.id.as_str(), i.role.as_str(), i.endpoint.as_str())).collect();
        serde_json::to_vec(&Out { c: &self.rows.columns, r: &self.rows.rows, s, m: self.map_version }).ok()
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let w: Wire = serde_json::from_slice(b).ok()?;
        let shards =
            w.s.into_iter()
                .map(|(id, role, endpoint)| {
                    let role = if role == Role::Primary.as_str() { Role::Primary } else { Role::Replica };
                    ShardInfo { id, role, endpoint }
                })
                .collect();
        Some(SqlResult {
            rows: Rows { columns: w.c, rows: w.r },
            shards,
            map_version: w.m,
            rows_affected: None,
            token: None,
        })
    }
}

/// Run a read on one shard with the requested consistency. Reads are idempotent: if a replica
/// fails mid-read (killed, refused), the read is retried once on the primary.
async fn read_on_shard(
    h: &Health,
    snap: &Snapshot,
    shard: ShardIdx,
    plan: &ReadPlan,
    consistency: Consistency,
    deadline: Instant,
) -> Result<(Rows, ShardInfo), ApiError> {
    let id = snap.map.shard(shard).id.to_string();
    let pg = match sql_db(snap, shard, &plan.db)? {
        SqlDb::Pg(pg) => pg,
        // Boxed: keeps the (larger) tiberius read state out of every PostgreSQL read's future.
        SqlDb::Mssql(ms) => return Box::pin(read_on_mssql(ms, id, plan, &consistency)).await,
    };
    // (endpoint, replay position it must reach and until when)
    type Candidate = (Arc<PgEndpoint>, Option<(u64, Instant)>);
    let mut candidates: Vec<Candidate> = Vec::with_capacity(2);
    match &consistency {
        Consistency::Primary => {}
        Consistency::Replica => {
            if let Some(r) = pg.pick_replica(h.max_lag_ms, h.max_lag_bytes) {
                candidates.push((r, None));
            }
        }
        Consistency::After { shard: tshard, lsn, wait } => {
            let until = (Instant::now() + *wait).min(deadline);
            // A token for another shard says nothing about this one.
            let min = if *tshard == id { Some((*lsn, until)) } else { None };
            if let Some(r) = pg.pick_replica(h.max_lag_ms, h.max_lag_bytes) {
                candidates.push((r, min));
            }
        }
    }
    candidates.push((pg.primary.clone(), None));
    let mut last_err = None;
    for (ep, min_lsn) in candidates {
        match ep.query(&plan.sql, &plan.params, min_lsn).await {
            Ok(Some(rows)) => {
                return Ok((rows, ShardInfo { id, role: ep.role, endpoint: ep.label.to_string() }));
            }
            // The replica had not replayed the token's position in time: go to the primary.
            Ok(None) => continue,
            Err(e) if ep.role == Role::Replica && replica_retryable(&e) => {
                tracing::warn!(shard = %id, endpoint = %ep.label, error = %e, "replica read failed; retrying on the primary");
                last_err = Some(e);
            }
            Err(e) => return Err(ApiError::from_backend(e, &id)),
        }
    }
    Err(no_endpoint(last_err, &id))
}

/// A read on a SQL Server shard. There is no replay position to compare a token with, so a
/// read after a write (`consistency.after`) goes to the primary (docs/sqlserver.md).
async fn read_on_mssql(
    ms: &MssqlDatabase,
    id: String,
    plan: &ReadPlan,
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
        match ep.query(&plan.sql, &plan.params).await {
            Ok(rows) => return Ok((rows, ShardInfo { id, role: ep.role, endpoint: ep.label.to_string() })),
            Err(e) if ep.role == Role::Replica && replica_retryable(&e) => {
                tracing::warn!(shard = %id, endpoint = %ep.label, error = %e, "replica read failed; retrying on the primary");
                last_err = Some(e);
            }
            Err(e) => return Err(ApiError::from_backend(e, &id)),
        }
    }
    Err(no_endpoint(last_err, &id))
}

/// Run a write plan on the owning shard's primary.
///
/// Order matters: (1) pin the newest map and route; (2) a write to a cell under a cutover hold
/// waits for the release, then starts over on the map published by then; (3) run on the
/// primary, between the cache's two version bumps of the cell (`cache::WriteBumps`: the second
/// one lands before the answer goes out); (4) a fence refusal from the old owner means this
/// instance's map is stale: refresh it and start over once (a second fence answers
/// `cells_frozen`).
pub async fn write(state: &AppState, plan: &WritePlan, out: &mut Outcome) -> Result<SqlResult, ApiError> {
    let kind = check_db(&state.pin(), &plan.db)?;
    statements::check_write(state, &plan.db, kind, &plan.stmts, plan.allow_ddl)?;
    // DDL changes rows of every cell of the shard: the shard's version moves too.
    let shard_wide = state.cache.enabled() && statements::shard_wide(state, kind, &plan.stmts);
    let spec = super::required(&plan.region)?;
    let mut refreshed = false;
    loop {
        // 1.
        let snap = state.pin();
        out.map_version = Some(snap.map.version().0);
        let route = super::write_route(&snap, &spec.resolve(&snap)?)?;
        // 2.
        if let Some(f) = hold::frozen_for(state, &[route.cell]) {
            drop(snap);
            hold::hold(state, f, route.cell).await?;
            continue;
        }
        out.cell = Some(route.cell.to_string());
        let id = snap.map.shard(route.shard).id.to_string();
        out.shard = Some(id.clone());
        out.role = Some(Role::Primary);
        let map_version = snap.map.version().0;
        // 3.
        let pg = match sql_db(&snap, route.shard, &plan.db)? {
            SqlDb::Pg(pg) => pg,
            SqlDb::Mssql(ms) => {
                ensure_writable(&ms.primary.health, &ms.primary.label, &id)?;
                let bumps = WriteBumps::begin(state, &plan.db, &[(route.cell, &id)], shard_wide.then_some(&id)).await;
                let r = ms.primary.execute(&plan.stmts).await;
                // SQL Server reports no commit position.
                bumps.done(|_| None).await;
                let (rows, affected) = r.map_err(|e| ApiError::from_backend(e, &id))?;
                let info = ShardInfo { id: id.clone(), role: Role::Primary, endpoint: ms.primary.label.to_string() };
                // No replay position exists: the token names the shard only; reads after it go
                // to the primary.
                let token = Some(make_token(&id, 0));
                return Ok(SqlResult { rows, shards: vec![info], map_version, rows_affected: Some(affected), token });
            }
        };
        ensure_writable(&pg.primary.health, &pg.primary.label, &id)?;
        // The routed cell and map version travel with the write: the old owner's migration
        // fence refuses a write routed by an older map even when it matches no row there.
        let routed = Some((u64::from(route.cell), map_version));
        let bumps = WriteBumps::begin(state, &plan.db, &[(route.cell, &id)], shard_wide.then_some(&id)).await;
        match pg.primary.execute(&plan.stmts, routed).await {
            Ok(res) => {
                bumps.done(|_| Some(res.lsn)).await;
                let info = ShardInfo { id: id.clone(), role: Role::Primary, endpoint: pg.primary.label.to_string() };
                let token = Some(make_token(&id, res.lsn));
                return Ok(SqlResult {
                    rows: res.rows,
                    shards: vec![info],
                    map_version,
                    rows_affected: Some(res.rows_affected),
                    token,
                });
            }
            // 4. Nothing was written: the fence rejected the statement and its transaction.
            Err(e) if hold::is_fenced(&e) => {
                bumps.nothing_written();
                let give_up =
                    ApiError::CellsFrozen(format!("cell {} moved away from shard {id}; retry shortly", route.cell));
                hold::after_fence_hit(state, snap, &mut refreshed, &id, route.cell, give_up).await?;
            }
            Err(e) => {
                // It may have committed (a timeout, a lost connection): bump as if it had.
                bumps.done(|_| None).await;
                return Err(ApiError::from_backend(e, &id));
            }
        }
    }
}
