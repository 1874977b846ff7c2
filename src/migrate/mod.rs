//! Live migration of cells between PostgreSQL shards (design §5): plan → copy (logical
//! replication with a row filter) → catch up → cutover (hold writes, fence the source, wait for
//! the target to apply past the fence, publish map v+1 everywhere, release) → clean up.
//! Progress is persisted in `cellgate.migrations` on both shards so a crashed orchestrator's
//! migration can be resumed or aborted. Owns no routing: it changes the map via the reload loop.

pub mod sql;

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use h3o::{CellIndex, Resolution};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use crate::app::AppState;
use crate::geo;
use crate::http::respond::ApiError;
use crate::routing;
use crate::shardmap::{DatabaseSpec, DbKind, ShardMap};

/// Writes held for a set of cells during a cutover.
#[derive(Debug)]
pub struct Freeze {
    pub id: String,
    cells: HashSet<u64>,
    levels: u16,
    pub started: std::time::Instant,
    /// Until then writes wait; after it they get 503 `cells_frozen` (until released).
    pub deadline: tokio::time::Instant,
}

impl Freeze {
    pub fn new(id: &str, cells: &[CellIndex], hold: Duration) -> Self {
        Self {
            id: id.to_string(),
            cells: cells.iter().map(|c| u64::from(*c)).collect(),
            levels: cells.iter().fold(0, |l, c| l | (1 << u8::from(c.resolution()))),
            started: std::time::Instant::now(),
            deadline: tokio::time::Instant::now() + hold,
        }
    }

    /// Is this owning cell (at R) inside a frozen cell?
    pub fn covers(&self, owning: CellIndex) -> bool {
        (0..=u8::from(owning.resolution())).any(|r| {
            self.levels & (1 << r) != 0
                && owning
                    .parent(Resolution::try_from(r).expect("0..=15"))
                    .is_some_and(|p| self.cells.contains(&u64::from(p)))
        })
    }
}

/// The persisted and reported state of one migration (design §4 fields, plus what resume needs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Doc {
    pub id: String,
    /// planned, copying, catching_up, cutover, done, aborting, aborted, failed
    pub state: String,
    pub cells: Vec<String>,
    pub from: String,
    pub to: String,
    /// `db.table` of every moved table.
    pub tables: Vec<String>,
    pub rows_copied: u64,
    pub lag_bytes: Option<u64>,
    pub hold_ms: u64,
    /// Longest time writes to the moving cells were held (freeze → release), ms.
    pub hold_ms_max: Option<u64>,
    pub map_version_before: u64,
    pub map_version_after: Option<u64>,
    pub error: Option<String>,
    /// The fence is committed on the source (from then on the source refuses writes to the cells).
    pub fenced: bool,
    /// Peers that did not acknowledge a freeze, map push or release.
    #[serde(default)]
    pub peer_problems: Vec<String>,
}

impl Doc {
    fn terminal(&self) -> bool {
        matches!(self.state.as_str(), "done" | "aborted" | "failed")
    }
}

pub struct Migration {
    doc: Mutex<Doc>,
    abort: AtomicBool,
    running: AtomicBool,
}

impl Migration {
    pub fn doc(&self) -> Doc {
        self.doc.lock().expect("doc").clone()
    }
}

#[derive(Default)]
pub struct Registry(Mutex<BTreeMap<String, Arc<Migration>>>);

impl Registry {
    pub fn get(&self, id: &str) -> Option<Arc<Migration>> {
        self.0.lock().expect("registry").get(id).cloned()
    }
    pub fn list(&self) -> Vec<Doc> {
        self.0.lock().expect("registry").values().map(|m| m.doc()).collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub cells: Vec<String>,
    pub to: String,
    #[serde(default = "default_hold")]
    pub hold_ms: u64,
}

fn default_hold() -> u64 {
    2000
}

/// Connection to one shard database's primary with migration privileges.
#[derive(Clone)]
struct DbPair {
    db: String,
    /// (table, cell_column)
    tables: Vec<(String, String)>,
    source: tokio_postgres::Config,
    target: tokio_postgres::Config,
}

async fn connect(cfg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, String> {
    let mut cfg = cfg.clone();
    cfg.connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn admin_config(map: &ShardMap, shard: &str, db: &str) -> Result<tokio_postgres::Config, String> {
    let idx = map.shard_idx(shard).ok_or_else(|| format!("unknown shard {shard}"))?;
    match map.shard(idx).databases.get(db) {
        Some(DatabaseSpec::Postgres { primary, admin, .. }) => {
            let s = admin.as_ref().unwrap_or(primary);
            tokio_postgres::Config::from_str(s.expose()).map_err(|e| format!("shard {shard} database {db}: {e}"))
        }
        Some(other) => Err(format!("shard {shard} database {db} is {}", other.kind().as_str())),
        None => Err(format!("shard {shard} has no database {db}")),
    }
}

fn parse_cells(map: &ShardMap, cells: &[String]) -> Result<Vec<CellIndex>, ApiError> {
    let mut out: Vec<CellIndex> = Vec::new();
    for c in cells {
        let cell = geo::parse_cell(c).map_err(|e| ApiError::InvalidParams(format!("cells: {e}")))?;
        if cell.resolution() > map.resolution() {
            return Err(ApiError::InvalidParams(format!(
                "cell {cell} is finer than the map resolution {}",
                u8::from(map.resolution())
            )));
        }
        out.push(cell);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(ApiError::InvalidParams("cells must not be empty".into()));
    }
    for a in &out {
        for b in &out {
            if a != b && b.resolution() > a.resolution() && b.parent(a.resolution()) == Some(*a) {
                return Err(ApiError::InvalidParams(format!("cells overlap: {b} lies inside {a}")));
            }
        }
    }
    Ok(out)
}

/// The single owner of every moving cell today, or why there is none.
fn source_of(map: &ShardMap, cells: &[CellIndex]) -> Result<String, ApiError> {
    let mut owners = Vec::new();
    for c in cells {
        if c.resolution() == map.resolution() {
            match routing::locate(map, *c) {
                Ok(routing::Route { shard: Some(s), .. }) => owners.push(s),
                _ => return Err(ApiError::InvalidParams(format!("cell {c} has no owner today"))),
            }
        } else {
            routing::owners_under(map, *c, &mut owners);
        }
    }
    owners.sort_unstable();
    owners.dedup();
    match owners.as_slice() {
        [one] => Ok(map.shard(*one).id.to_string()),
        [] => Err(ApiError::InvalidParams("the cells have no owner today".into())),
        many => Err(ApiError::InvalidParams(format!(
            "the cells are owned by several shards today ({}); migrate them per source",
            many.iter().map(|s| map.shard(*s).id.to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Map v+1: the moving cells assigned to `to` (assignments at or inside them removed), version + 1.
/// Built from the source text, so `${VAR}` references stay references.
pub fn next_map_text(text: &str, cells: &[CellIndex], to: &str) -> Result<(String, u64), String> {
    let mut raw: crate::shardmap::raw::RawMap = toml::from_str(text).map_err(|e| e.to_string())?;
    let inside = |hex: &str| -> bool {
        geo::parse_cell(hex)
            .map(|c| cells.iter().any(|m| c.resolution() >= m.resolution() && c.parent(m.resolution()) == Some(*m)))
            .unwrap_or(false)
    };
    for a in &mut raw.assign {
        a.cells.retain(|c| !inside(c.get_ref()));
    }
    raw.assign.retain(|a| !a.cells.is_empty());
    raw.assign.push(crate::shardmap::raw::RawAssign {
        shard: toml::Spanned::new(0..0, to.to_string()),
        cells: cells.iter().map(|c| toml::Spanned::new(0..0, c.to_string())).collect(),
    });
    let version = raw.version.get_ref() + 1;
    raw.version = toml::Spanned::new(0..0, version);
    let body = toml::to_string(&raw).map_err(|e| e.to_string())?;
    Ok((format!("# written by cellgate live migration (version {version})\n{body}"), version))
}

fn plan(state: &AppState, req: &StartRequest) -> Result<(Doc, Vec<DbPair>), ApiError> {
    let snap = state.pin();
    let map = &snap.map;
    let cells = parse_cells(map, &req.cells)?;
    if map.shard_idx(&req.to).is_none() {
        return Err(ApiError::InvalidParams(format!("unknown target shard {:?}", req.to)));
    }
    let from = source_of(map, &cells)?;
    if from == req.to {
        return Err(ApiError::InvalidParams(format!("the cells are already owned by {from}")));
    }
    let src = map.shard(map.shard_idx(&from).expect("owner exists"));
    let dst = map.shard(map.shard_idx(&req.to).expect("checked"));
    let mut pairs = Vec::new();
    for (db, spec) in &src.databases {
        if spec.kind() != DbKind::Postgres {
            return Err(ApiError::Unsupported(format!(
                "database {db:?} on shard {from} is {}: migrations move PostgreSQL databases only",
                spec.kind().as_str()
            )));
        }
        match dst.databases.get(db) {
            Some(d) if d.kind() == DbKind::Postgres => {}
            Some(d) => {
                return Err(ApiError::Unsupported(format!(
                    "database {db:?} on shard {} is {}: migrations move PostgreSQL databases only",
                    req.to,
                    d.kind().as_str()
                )));
            }
            None => return Err(ApiError::InvalidParams(format!("target shard {} has no database {db:?}", req.to))),
        }
        let tables: Vec<(String, String)> = map
            .tables()
            .get(db)
            .map(|ts| ts.iter().filter_map(|(t, s)| s.cell_column.clone().map(|c| (t.clone(), c))).collect())
            .unwrap_or_default();
        if tables.is_empty() {
            continue;
        }
        pairs.push(DbPair {
            db: db.clone(),
            tables,
            source: admin_config(map, &from, db).map_err(ApiError::InvalidParams)?,
            target: admin_config(map, &req.to, db).map_err(ApiError::InvalidParams)?,
        });
    }
    if pairs.is_empty() {
        return Err(ApiError::InvalidParams("no [tables] with a cell_column on the source: nothing to move".into()));
    }
    let id = format!(
        "m{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
    );
    let doc = Doc {
        id,
        state: "planned".into(),
        cells: cells.iter().map(ToString::to_string).collect(),
        from,
        to: req.to.clone(),
        tables: pairs.iter().flat_map(|p| p.tables.iter().map(move |(t, _)| format!("{}.{t}", p.db))).collect(),
        rows_copied: 0,
        lag_bytes: None,
        hold_ms: req.hold_ms.clamp(1, 60_000),
        hold_ms_max: None,
        map_version_before: map.version().0,
        map_version_after: None,
        error: None,
        fenced: false,
        peer_problems: Vec::new(),
    };
    Ok((doc, pairs))
}

/// `POST /admin/migrations`: validate now (errors are the caller's), then run in the background.
pub async fn start(state: &Arc<AppState>, req: StartRequest) -> Result<Doc, ApiError> {
    if let Some(active) = state.migrations.list().into_iter().find(|d| !d.terminal()) {
        return Err(ApiError::Conflict(format!("migration {} is {}: one at a time", active.id, active.state)));
    }
    let (doc, pairs) = plan(state, &req)?;
    // The target must have every moved table with its cell column.
    for p in &pairs {
        let target =
            connect(&p.target).await.map_err(|e| ApiError::ShardUnavailable { shard: doc.to.clone(), reason: e })?;
        for (t, col) in &p.tables {
            let n: i64 = target
                .query_one(
                    "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
                    &[t, col],
                )
                .await
                .map_err(|e| ApiError::ShardUnavailable { shard: doc.to.clone(), reason: e.to_string() })?
                .get(0);
            if n != 1 {
                return Err(ApiError::InvalidParams(format!(
                    "target shard {} database {} has no table {t} with column {col}",
                    doc.to, p.db
                )));
            }
        }
    }
    let m = Arc::new(Migration {
        doc: Mutex::new(doc.clone()),
        abort: AtomicBool::new(false),
        running: AtomicBool::new(false),
    });
    state.migrations.0.lock().expect("registry").insert(doc.id.clone(), m.clone());
    spawn_run(state.clone(), m, pairs);
    Ok(doc)
}

fn spawn_run(state: Arc<AppState>, m: Arc<Migration>, pairs: Vec<DbPair>) {
    if m.running.swap(true, Ordering::SeqCst) {
        return;
    }
    tokio::spawn(async move {
        let result = run(&state, &m, &pairs).await;
        if let Err(e) = result {
            let aborting = m.abort.load(Ordering::SeqCst);
            let published = m.doc().map_version_after.is_some();
            if e == FAILPOINT {
                // Simulated crash: stop as a killed process would, leaving everything as is.
                tracing::warn!(id = %m.doc().id, "failpoint: orchestrator stopped");
            } else if aborting && !published {
                let r = abort_cleanup(&state, &m, &pairs).await;
                set(&m, &pairs, |d| match r {
                    Ok(()) => d.state = "aborted".into(),
                    Err(e) => {
                        d.state = "failed".into();
                        d.error = Some(format!("abort cleanup failed: {e}"));
                    }
                })
                .await;
            } else {
                // Before the fence nothing changed ownership: undo and report. After it, keep
                // the fence (no write may land on the source) and leave it resumable.
                let fenced = m.doc().fenced;
                set(&m, &pairs, |d| {
                    d.error = Some(e.clone());
                    if !fenced {
                        d.state = "failed".into();
                    }
                })
                .await;
                if !fenced {
                    let _ = abort_cleanup(&state, &m, &pairs).await;
                }
                release(&state, &m).await;
            }
        }
        m.running.store(false, Ordering::SeqCst);
    });
}

/// Update the doc, log it, and persist it on both shards (best effort: the in-memory doc is
/// authoritative while this process runs; the persisted one after a crash).
async fn set(m: &Migration, pairs: &[DbPair], f: impl FnOnce(&mut Doc)) {
    let doc = {
        let mut d = m.doc.lock().expect("doc");
        f(&mut d);
        d.clone()
    };
    tracing::info!(id = %doc.id, state = %doc.state, from = %doc.from, to = %doc.to, "migration");
    metrics::gauge!("cellgate_migration_active").set(if doc.terminal() { 0.0 } else { 1.0 });
    let json = serde_json::to_value(&doc).expect("doc serialises");
    for p in pairs {
        for (side, cfg) in [("source", &p.source), ("target", &p.target)] {
            let persisted = async {
                let c = connect(cfg).await?;
                c.batch_execute(sql::SCHEMA).await.map_err(|e| e.to_string())?;
                c.execute(
                    "INSERT INTO cellgate.migrations (id, state, doc) VALUES ($1, $2, $3)
                     ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, doc = EXCLUDED.doc, updated_at = now()",
                    &[&doc.id, &doc.state, &json],
                )
                .await
                .map_err(|e| e.to_string())
            };
            if let Err(e) = persisted.await {
                // The step goes on (the in-memory doc is current); a crash now would show the
                // previous persisted state, from which resume is still safe (steps are idempotent).
                tracing::warn!(id = %doc.id, database = %p.db, side, error = %e, "could not persist migration progress");
            }
        }
    }
}

const FAILPOINT: &str = "failpoint";

static ARMED: Mutex<Option<String>> = Mutex::new(None);

/// Test hook: stop the orchestrator once at the named step (`after_fence`), exactly as a crash
/// of the process would leave things. Also armed by `CELLGATE_FAILPOINT=<name>` at start-up.
pub fn arm_failpoint(name: &str) {
    *ARMED.lock().expect("failpoint") = Some(name.to_string());
}

fn failpoint(name: &str) -> Result<(), String> {
    static ENV_READ: std::sync::Once = std::sync::Once::new();
    ENV_READ.call_once(|| {
        if let Ok(v) = std::env::var("CELLGATE_FAILPOINT") {
            arm_failpoint(&v);
        }
    });
    let mut armed = ARMED.lock().expect("failpoint");
    if armed.as_deref() == Some(name) {
        *armed = None;
        return Err(FAILPOINT.into());
    }
    Ok(())
}

fn cells_of(doc: &Doc) -> Vec<CellIndex> {
    doc.cells.iter().filter_map(|c| geo::parse_cell(c).ok()).collect()
}

fn check_abort(m: &Migration) -> Result<(), String> {
    if m.abort.load(Ordering::SeqCst) { Err("aborted by operator".into()) } else { Ok(()) }
}

async fn run(state: &Arc<AppState>, m: &Arc<Migration>, pairs: &[DbPair]) -> Result<(), String> {
    let doc = m.doc();
    let cells = cells_of(&doc);
    let name = sql::object_name(&doc.id);
    let published = doc.map_version_after.is_some();

    if !doc.fenced && !published {
        // 1. Setup: schema, fence triggers (empty fence), full replica identity on the source so
        //    row filters may cover UPDATE/DELETE; stale leftovers of the cells removed from the target.
        for p in pairs {
            let src = connect(&p.source).await?;
            let dst = connect(&p.target).await?;
            src.batch_execute(sql::SCHEMA).await.map_err(|e| format!("source setup: {e}"))?;
            dst.batch_execute(sql::SCHEMA).await.map_err(|e| format!("target setup: {e}"))?;
            for (t, col) in &p.tables {
                src.batch_execute(&sql::fence_trigger(t, col))
                    .await
                    .map_err(|e| format!("source trigger on {t}: {e}"))?;
                dst.batch_execute(&sql::fence_trigger(t, col))
                    .await
                    .map_err(|e| format!("target trigger on {t}: {e}"))?;
                src.batch_execute(&format!("ALTER TABLE public.{t} REPLICA IDENTITY FULL"))
                    .await
                    .map_err(|e| format!("replica identity on {t}: {e}"))?;
            }
            let exists = has_subscription(&dst, &name).await?;
            if !exists {
                // Rows of these cells on the target are leftovers of an earlier move away (the
                // target does not own them): they would collide with the copy.
                for (t, col) in &p.tables {
                    dst.batch_execute(&sql::delete_cells_unfenced(t, col, &cells))
                        .await
                        .map_err(|e| format!("target cleanup of {t}: {e}"))?;
                }
            }
        }
        check_abort(m)?;
        // 2. Copy: publication with the row filter on the source, subscription with copy_data on
        //    the target (created only if missing: resumable).
        set(m, pairs, |d| d.state = "copying".into()).await;
        for p in pairs {
            let src = connect(&p.source).await?;
            if count(&src, "SELECT count(*) FROM pg_publication WHERE pubname = $1", &[&name]).await? == 0 {
                src.batch_execute(&sql::create_publication(&doc.id, &p.tables, &cells))
                    .await
                    .map_err(|e| format!("create publication: {e}"))?;
            }
            let dst = connect(&p.target).await?;
            if !has_subscription(&dst, &name).await? {
                let (host, port) = crate::backend::postgres::host_port(&p.source);
                let password = p.source.get_password().map(|b| String::from_utf8_lossy(b).into_owned());
                let conninfo = sql::conninfo(
                    &host,
                    port,
                    p.source.get_dbname().unwrap_or(&p.db),
                    p.source.get_user().unwrap_or("postgres"),
                    password.as_deref(),
                );
                dst.batch_execute(&sql::create_subscription(&doc.id, &conninfo)).await.map_err(|e| {
                    format!(
                        "create subscription: {}",
                        e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
                    )
                })?;
            }
        }
        // 3. Catch up: every table copied (state 'r'eady) and the slot close to the source's WAL.
        set(m, pairs, |d| d.state = "catching_up".into()).await;
        loop {
            check_abort(m)?;
            let mut ready = true;
            let mut lag = 0u64;
            let mut copied = 0u64;
            for p in pairs {
                let dst = connect(&p.target).await?;
                let not_ready = count(
                    &dst,
                    "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = $1 AND r.srsubstate <> 'r'",
                    &[&name],
                )
                .await?;
                ready &= not_ready == 0;
                for (t, col) in &p.tables {
                    let n = count(
                        &dst,
                        &format!("SELECT count(*) FROM public.{t} WHERE {}", sql::cell_filter(col, &cells)),
                        &[],
                    )
                    .await?;
                    copied += n as u64;
                }
                let src = connect(&p.source).await?;
                let l: Option<i64> = src
                    .query_one(
                        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                        &[&name],
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                lag += l.unwrap_or(i64::MAX).max(0) as u64;
            }
            set_quiet(m, |d| {
                d.rows_copied = copied;
                d.lag_bytes = Some(lag);
            });
            if ready && lag < (1 << 20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        check_abort(m)?;
    }

    if !published {
        // 4. Cutover.
        set(m, pairs, |d| d.state = "cutover".into()).await;
        // 4a. Every instance holds writes for the cells (bounded by hold_ms, then 503 cells_frozen).
        let hold = Duration::from_millis(doc.hold_ms);
        freeze_local(state, &doc.id, &cells, hold);
        let body = serde_json::json!({"id": doc.id, "cells": doc.cells, "hold_ms": doc.hold_ms}).to_string();
        tell_peers(state, m, "freeze", http::Method::POST, "/admin/freeze", "application/json", body, 2).await;
        // 4b. Fence the source: the lock waits for in-flight writers and blocks new ones until the
        //     fence commits; after it, the trigger rejects every write to the cells.
        let mut fence_lsns = Vec::new();
        for p in pairs {
            let src = connect(&p.source).await?;
            let tables: Vec<String> = p.tables.iter().map(|(t, _)| format!("public.{t}")).collect();
            let values: Vec<String> = cells
                .iter()
                .map(|c| format!("({}, {}, {})", u64::from(*c) as i64, u8::from(c.resolution()), sql::literal(&doc.id)))
                .collect();
            src.batch_execute(&format!(
                "BEGIN; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE;
                 INSERT INTO cellgate.fenced_cells (cell, res, migration) VALUES {}
                   ON CONFLICT (cell) DO UPDATE SET res = EXCLUDED.res, migration = EXCLUDED.migration, fenced_at = now();
                 COMMIT;",
                tables.join(", "),
                values.join(", ")
            ))
            .await
            .map_err(|e| format!("fence: {e}"))?;
            let lsn: String =
                src.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.map_err(|e| e.to_string())?.get(0);
            fence_lsns.push(lsn);
        }
        set(m, pairs, |d| d.fenced = true).await;
        failpoint("after_fence")?;
        // 4c. Wait until the target has applied everything up to the fence.
        for (p, lsn) in pairs.iter().zip(&fence_lsns) {
            let src = connect(&p.source).await?;
            loop {
                let done: Option<bool> = src
                    .query_one(
                        "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                        &[&name, lsn],
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                match done {
                    Some(true) => break,
                    Some(false) => tokio::time::sleep(Duration::from_millis(10)).await,
                    // Resumed after the subscription was dropped: nothing more to wait for.
                    None => break,
                }
            }
            // The target becomes the owner: lift a fence it may hold from an earlier move away.
            let dst = connect(&p.target).await?;
            let list: Vec<i64> = cells.iter().map(|c| u64::from(*c) as i64).collect();
            dst.execute("DELETE FROM cellgate.fenced_cells WHERE cell = ANY($1)", &[&list])
                .await
                .map_err(|e| e.to_string())?;
        }
        // 4d. Publish map v+1 here (persisted to the map file) and on every peer.
        let snap = state.pin();
        let already = cells.iter().all(|c| {
            c.center_child(snap.map.resolution())
                .and_then(|k| routing::locate(&snap.map, k).ok())
                .and_then(|r| r.shard)
                .is_some_and(|s| snap.map.shard(s).id.as_str() == doc.to)
        });
        let (text, version) = if already {
            (snap.text.clone(), snap.map.version().0)
        } else {
            let (text, version) = next_map_text(&snap.text, &cells, &doc.to)?;
            let src =
                crate::reload::Source::Push { body: text.clone(), json: false, if_match: Some(snap.map.version().0) };
            match crate::reload::request(&state.reload_tx, src).await {
                Some(o) if o.result == crate::reload::ReloadResult::Published => {}
                Some(o) => return Err(format!("publishing map v{version} failed: {}", o.errors.join("; "))),
                None => return Err("reload loop stopped".into()),
            }
            (text, version)
        };
        drop(snap);
        tell_peers(state, m, "map push", http::Method::PUT, "/admin/map", "application/toml", text, 10).await;
        set(m, pairs, |d| d.map_version_after = Some(version)).await;
        // 4e. Release held writes: they re-route on the new map, to the target.
        release(state, m).await;
    }

    // 5. Clean up replication objects; the fence and trigger stay on the source.
    cleanup_replication(pairs, &name).await?;
    for p in pairs {
        let src = connect(&p.source).await?;
        for (t, _) in &p.tables {
            let _ = src.batch_execute(&format!("ALTER TABLE public.{t} REPLICA IDENTITY DEFAULT")).await;
        }
    }
    set(m, pairs, |d| {
        d.state = "done".into();
        d.error = None;
    })
    .await;
    Ok(())
}

fn set_quiet(m: &Migration, f: impl FnOnce(&mut Doc)) {
    f(&mut m.doc.lock().expect("doc"));
}

/// Send one request to every peer and record the ones that did not acknowledge it.
async fn tell_peers(
    state: &AppState,
    m: &Migration,
    what: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: String,
    timeout_s: u64,
) {
    let peers =
        crate::fleet::broadcast(&state.config, method, path, content_type, body.into(), Duration::from_secs(timeout_s))
            .await;
    note_peers(m, what, &peers);
}

fn note_peers(m: &Migration, what: &str, peers: &[crate::fleet::PeerResult]) {
    let bad: Vec<String> = peers
        .iter()
        .filter(|p| !p.ok)
        .map(|p| {
            format!(
                "{what}: {} did not acknowledge ({})",
                p.peer,
                p.error.clone().or(p.status.map(|s| s.to_string())).unwrap_or_default()
            )
        })
        .collect();
    for b in &bad {
        tracing::warn!(problem = %b, "peer");
    }
    set_quiet(m, |d| d.peer_problems.extend(bad));
}

pub fn freeze_local(state: &AppState, id: &str, cells: &[CellIndex], hold: Duration) {
    state.freeze.send_replace(Some(Arc::new(Freeze::new(id, cells, hold))));
}

/// Lift a freeze here (if it is this migration's) and tell the peers.
async fn release(state: &AppState, m: &Migration) {
    let id = m.doc().id;
    if let Some(f) = release_local(state, &id) {
        let held = f.started.elapsed().as_millis() as u64;
        set_quiet(m, |d| d.hold_ms_max = Some(d.hold_ms_max.unwrap_or(0).max(held)));
        metrics::histogram!("cellgate_migration_hold_seconds").record(held as f64 / 1000.0);
    }
    let body = serde_json::json!({"id": id}).to_string();
    tell_peers(state, m, "release", http::Method::POST, "/admin/release", "application/json", body, 2).await;
}

pub fn release_local(state: &AppState, id: &str) -> Option<Arc<Freeze>> {
    let mut released = None;
    state.freeze.send_if_modified(|f| {
        if f.as_ref().is_some_and(|f| f.id == id) {
            released = f.take();
            true
        } else {
            false
        }
    });
    released
}

/// The value of a `SELECT count(*) ...`.
async fn count(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<i64, String> {
    Ok(c.query_one(sql, params).await.map_err(|e| e.to_string())?.get(0))
}

/// Does this migration's subscription exist on the target (steps re-run after a crash)?
async fn has_subscription(target: &tokio_postgres::Client, name: &str) -> Result<bool, String> {
    Ok(count(target, "SELECT count(*) FROM pg_subscription WHERE subname = $1", &[&name]).await? > 0)
}

async fn cleanup_replication(pairs: &[DbPair], name: &str) -> Result<(), String> {
    for p in pairs {
        let dst = connect(&p.target).await?;
        if has_subscription(&dst, name).await? {
            // Dropping the subscription also drops its slot on the source.
            dst.batch_execute(&format!("DROP SUBSCRIPTION {name}"))
                .await
                .map_err(|e| format!("drop subscription: {e}"))?;
        }
        let src = connect(&p.source).await?;
        src.batch_execute(&format!("DROP PUBLICATION IF EXISTS {name}"))
            .await
            .map_err(|e| format!("drop publication: {e}"))?;
        let _ = src
            .execute("SELECT pg_drop_replication_slot($1) FROM pg_replication_slots WHERE slot_name = $1", &[&name])
            .await;
    }
    Ok(())
}

/// Undo a migration that has not published: replication objects dropped, copied rows removed
/// from the target, the source's fence lifted (it owns the cells again), writes released.
async fn abort_cleanup(state: &AppState, m: &Migration, pairs: &[DbPair]) -> Result<(), String> {
    let doc = m.doc();
    set(m, pairs, |d| d.state = "aborting".into()).await;
    let cells = cells_of(&doc);
    cleanup_replication(pairs, &sql::object_name(&doc.id)).await?;
    for p in pairs {
        let dst = connect(&p.target).await?;
        for (t, col) in &p.tables {
            dst.batch_execute(&sql::delete_cells_unfenced(t, col, &cells))
                .await
                .map_err(|e| format!("removing copied rows of {t}: {e}"))?;
        }
        let src = connect(&p.source).await?;
        src.execute("DELETE FROM cellgate.fenced_cells WHERE migration = $1", &[&doc.id])
            .await
            .map_err(|e| e.to_string())?;
        for (t, _) in &p.tables {
            let _ = src.batch_execute(&format!("ALTER TABLE public.{t} REPLICA IDENTITY DEFAULT")).await;
        }
    }
    set_quiet(m, |d| d.fenced = false);
    release(state, m).await;
    Ok(())
}

/// `POST /admin/migrations/{id}/abort`.
pub async fn abort(state: &Arc<AppState>, id: &str) -> Result<Doc, ApiError> {
    let m = state.migrations.get(id).ok_or(ApiError::NotFound)?;
    let doc = m.doc();
    if doc.terminal() {
        return Err(ApiError::Conflict(format!("migration {id} is already {}", doc.state)));
    }
    if doc.map_version_after.is_some() {
        return Err(ApiError::Conflict(format!(
            "migration {id} already published map v{}: move the cells back with a new migration",
            doc.map_version_after.unwrap_or(0)
        )));
    }
    m.abort.store(true, Ordering::SeqCst);
    if !m.running.load(Ordering::SeqCst) {
        // Not running (recovered after a crash): clean up here.
        let pairs = pairs_for(state, &doc).map_err(ApiError::InvalidParams)?;
        let r = abort_cleanup(state, &m, &pairs).await;
        set(&m, &pairs, |d| match r {
            Ok(()) => d.state = "aborted".into(),
            Err(e) => {
                d.state = "failed".into();
                d.error = Some(e);
            }
        })
        .await;
    }
    Ok(m.doc())
}

/// `POST /admin/migrations/{id}/resume`: continue a migration recovered after a crash.
pub async fn resume(state: &Arc<AppState>, id: &str) -> Result<Doc, ApiError> {
    let m = state.migrations.get(id).ok_or(ApiError::NotFound)?;
    let doc = m.doc();
    if doc.terminal() || m.running.load(Ordering::SeqCst) {
        return Err(ApiError::Conflict(format!(
            "migration {id} is {} and {}",
            doc.state,
            if m.running.load(Ordering::SeqCst) { "running" } else { "not resumable" }
        )));
    }
    let pairs = pairs_for(state, &doc).map_err(ApiError::InvalidParams)?;
    set_quiet(&m, |d| d.error = None);
    spawn_run(state.clone(), m.clone(), pairs);
    Ok(m.doc())
}

fn pairs_for(state: &AppState, doc: &Doc) -> Result<Vec<DbPair>, String> {
    let snap = state.pin();
    let mut by_db: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for dt in &doc.tables {
        let (db, t) = dt.split_once('.').ok_or("bad table name")?;
        let col = snap
            .map
            .tables()
            .get(db)
            .and_then(|ts| ts.get(t))
            .and_then(|s| s.cell_column.clone())
            .ok_or_else(|| format!("table {dt} is no longer in the map"))?;
        by_db.entry(db.to_string()).or_default().push((t.to_string(), col));
    }
    by_db
        .into_iter()
        .map(|(db, tables)| {
            Ok(DbPair {
                source: admin_config(&snap.map, &doc.from, &db)?,
                target: admin_config(&snap.map, &doc.to, &db)?,
                db,
                tables,
            })
        })
        .collect()
}

/// Load unfinished migrations persisted on the shards (after a crash of their orchestrator).
pub async fn recover(state: &Arc<AppState>) {
    let snap = state.pin();
    let mut configs = Vec::new();
    for shard in snap.map.shards() {
        for db in shard.databases.keys() {
            if let Ok(cfg) = admin_config(&snap.map, shard.id.as_str(), db) {
                configs.push(cfg);
            }
        }
    }
    drop(snap);
    let reads = configs.into_iter().map(|cfg| async move {
        let c = tokio::time::timeout(Duration::from_secs(3), connect(&cfg)).await.ok()?.ok()?;
        let rows = c
            .query("SELECT doc FROM cellgate.migrations WHERE state NOT IN ('done', 'aborted', 'failed')", &[])
            .await
            .ok()?;
        Some(rows.into_iter().filter_map(|r| serde_json::from_value::<Doc>(r.get(0)).ok()).collect::<Vec<_>>())
    });
    let found: Vec<Doc> = futures_util::future::join_all(reads).await.into_iter().flatten().flatten().collect();
    let mut reg = state.migrations.0.lock().expect("registry");
    for mut doc in found {
        if reg.contains_key(&doc.id) {
            continue;
        }
        doc.error = Some("interrupted: the orchestrating process stopped; resume or abort".into());
        tracing::warn!(id = %doc.id, state = %doc.state, "unfinished migration found");
        reg.insert(
            doc.id.clone(),
            Arc::new(Migration {
                doc: Mutex::new(doc),
                abort: AtomicBool::new(false),
                running: AtomicBool::new(false),
            }),
        );
    }
}
