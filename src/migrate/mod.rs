//! Live migration of cells between shards (design §5): plan → copy (PostgreSQL: logical
//! replication with a row filter; MongoDB: documents by geo field, `mongo.rs`) → catch up →
//! cutover (hold writes, fence the source, wait for the target to apply past the fence, publish
//! map v+1 everywhere, release) → clean up. Progress is persisted on both shards
//! (`cellgate.migrations`, `cellgate_migrations`) so a crashed orchestrator's
//! migration can be resumed or aborted. This file owns the control surface (start, abort,
//! resume, recover), the registry of migrations and their orchestrator tasks, and the cutover
//! hold. Owns no routing (it changes the map via the reload loop) and knows no HTTP: its errors
//! are `MigrateError`, mapped to responses in `http/respond.rs`.

mod doc;
mod error;
mod failpoint;
mod mongo;
mod plan;
pub mod sql;
mod steps;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use h3o::{CellIndex, Resolution};
use serde::Deserialize;
use tracing::Instrument;

pub use doc::{Doc, State};
pub use error::{Fault, MigrateError};
#[cfg(feature = "failpoints")]
pub use failpoint::arm_failpoint;
pub use plan::next_map_text;

use plan::Pairs;

/// What a migration works on, provided by the application state (the control plane sits below
/// it): the published map, the config, the reload channel (to publish map v+1), the freeze this
/// instance's writes honour, the registry of migrations, and the read cache (a cutover bumps the
/// moved cells' versions).
pub trait Host: Send + Sync + 'static {
    fn pin(&self) -> Arc<crate::state::Snapshot>;
    fn config(&self) -> &crate::config::Config;
    /// The serving peer token (it is reloaded, so not read from the config).
    fn peer_token(&self) -> Option<String>;
    fn reload_tx(&self) -> &crate::reload::Sender;
    fn freeze(&self) -> &tokio::sync::watch::Sender<Option<Arc<Freeze>>>;
    fn migrations(&self) -> &Registry;
    fn cache(&self) -> &crate::cache::Cache;
    /// The link to etcd in fleet mode: freezes, the map and the migration record go through it.
    fn etcd(&self) -> Option<&crate::etcd::Link>;
}

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

/// One migration: its record, the operator's abort request and the orchestrator task working
/// on it (kept, not detached, so the registry knows what runs).
pub struct Migration {
    doc: Mutex<Doc>,
    abort: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// etcd mode: the instance that took this migration over from this process (seen at a
    /// record write or before the publish); this process's orchestrator then stops.
    deposed: Mutex<Option<String>>,
}

impl Migration {
    fn new(doc: Doc) -> Self {
        Self { doc: Mutex::new(doc), abort: AtomicBool::new(false), task: Mutex::new(None), deposed: Mutex::new(None) }
    }

    fn deposed_by(&self) -> Option<String> {
        self.deposed.lock().expect("deposed").clone()
    }

    fn set_deposed(&self, by: Option<String>) {
        *self.deposed.lock().expect("deposed") = by;
    }

    /// The record as reported (admin API): with `running` filled in.
    pub fn doc(&self) -> Doc {
        let mut d = self.record();
        d.running = self.running();
        d
    }

    fn record(&self) -> Doc {
        self.doc.lock().expect("doc").clone()
    }

    /// Change the in-memory record (not persisted: see `steps::set`); the result.
    fn update(&self, f: impl FnOnce(&mut Doc)) -> Doc {
        let mut d = self.doc.lock().expect("doc");
        f(&mut d);
        d.clone()
    }

    fn abort_requested(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    /// Is an orchestrator task of this process working on it?
    pub fn running(&self) -> bool {
        self.task.lock().expect("task").as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Blocks the one-at-a-time rule: not terminal, or failed with its undo still running
    /// (bounded by the undo's retries).
    fn busy(&self) -> bool {
        let d = self.record();
        d.active() || (d.cleanup_pending && self.running())
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

    /// etcd mode: records this process holds but does not run and that another instance
    /// (`!= me`) wrote last take the state etcd has now — a migration another instance finished
    /// must not block the next one here as "one at a time". Its own records stay: this process
    /// wrote them (etcd's copy may be older, its write being best effort).
    fn refresh(&self, records: &[crate::etcd::MigrationRecord], me: &str) {
        let reg = self.0.lock().expect("registry");
        for r in records.iter().filter(|r| r.orchestrator != me) {
            let Ok(doc) = serde_json::from_value::<Doc>(r.doc.clone()) else { continue };
            if let Some(m) = reg.get(&doc.id)
                && !m.running()
            {
                m.update(|d| *d = doc);
            }
        }
    }

    /// Add a new migration unless another one is busy (checked and inserted under one lock).
    fn insert_alone(&self, m: Arc<Migration>) -> Result<(), MigrateError> {
        let mut reg = self.0.lock().expect("registry");
        if let Some(busy) = reg.values().find(|m| m.busy()) {
            let d = busy.record();
            let what = if d.active() { d.state.to_string() } else { format!("{} and cleaning up", d.state) };
            return Err(MigrateError::Conflict(format!("migration {} is {what}: one at a time", d.id)));
        }
        reg.insert(m.record().id, m);
        Ok(())
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

/// What an orchestrator task does.
#[derive(Clone, Copy)]
enum Job {
    /// The forward path from the persisted state (start, resume).
    Run,
    /// The undo of an unpublished migration (abort, or retrying a failed cleanup).
    Undo,
}

/// Start `job` as a named, tracked task unless one is already working on `m`.
fn spawn(state: &Arc<dyn Host>, m: &Arc<Migration>, pairs: Pairs, job: Job) -> bool {
    let id = m.record().id;
    let mut task = m.task.lock().expect("task");
    if task.as_ref().is_some_and(|h| !h.is_finished()) {
        return false;
    }
    let span = tracing::info_span!("migration", %id, job = match job { Job::Run => "run", Job::Undo => "undo" });
    let (state, m2) = (state.clone(), m.clone());
    *task = Some(crate::tasks::spawn(
        "migration",
        async move {
            match job {
                Job::Run => {
                    if let Err(e) = steps::run(&state, &m2, &pairs).await {
                        on_run_failure(state.as_ref(), &m2, &pairs, e).await;
                    }
                }
                Job::Undo => undo_job(state.as_ref(), &m2, &pairs).await,
            }
        }
        .instrument(span),
    ));
    true
}

/// Every failure of the forward path ends in a terminal state or a resumable one, with the
/// original error (server message and SQLSTATE, secrets masked) kept in `error`.
async fn on_run_failure(state: &dyn Host, m: &Migration, pairs: &Pairs, e: MigrateError) {
    if e == MigrateError::Failpoint {
        // Simulated crash: stop as a killed process would, leaving everything as is.
        tracing::warn!(id = %m.record().id, "failpoint: orchestrator stopped");
        return;
    }
    if let MigrateError::Deposed(by) = &e {
        // The freeze, the fence and the record are the new orchestrator's now: touch nothing.
        tracing::warn!(id = %m.record().id, %by, "another instance orchestrates this migration now: stopped here");
        return;
    }
    let e = e.redacted(&plan::secrets(pairs));
    let (fault, retryable) = e.class();
    tracing::warn!(id = %m.record().id, error = %e, ?fault, retryable, "migration step failed");
    let doc = m.record();
    if doc.map_version_after.is_some() || (doc.fenced && !m.abort_requested()) {
        // After the fence: keep it (no write may land on the source) and stay resumable. After
        // the publish only the replication cleanup is left; resume finishes it.
        steps::set(state, m, pairs, |d| d.error = Some(e.to_string())).await;
        // (A no-op when that write found another orchestrator: the freeze is then its.)
        steps::release(state, m).await;
    } else if m.abort_requested() {
        undo_job(state, m, pairs).await;
    } else {
        // Before the fence nothing changed ownership: the migration failed (terminal, the source
        // owns the cells), then its traces are undone. A failed undo is reported, not hidden.
        steps::set(state, m, pairs, |d| {
            d.state = State::Failed;
            d.error = Some(e.to_string());
            d.cleanup_pending = true;
        })
        .await;
        if m.deposed_by().is_some() {
            return;
        }
        let r = steps::undo_with_retries(state, m, pairs).await;
        let secrets = plan::secrets(pairs);
        steps::set(state, m, pairs, |d| match r {
            Ok(()) => d.cleanup_pending = false,
            Err(ce) => d.error = Some(format!("{e}; cleanup failed: {}", ce.redacted(&secrets))),
        })
        .await;
    }
}

/// The operator's abort (or a retried cleanup): `aborting` → `aborted`, or `failed` with the
/// cleanup error and `cleanup_pending` (abort again to retry).
async fn undo_job(state: &dyn Host, m: &Migration, pairs: &Pairs) {
    if m.record().map_version_after.is_some() {
        // Published between the abort request and now: the target owns the cells.
        tracing::warn!(id = %m.record().id, "abort after the publish ignored");
        return;
    }
    steps::set(state, m, pairs, |d| d.state = State::Aborting).await;
    if let Some(by) = m.deposed_by() {
        tracing::warn!(id = %m.record().id, %by, "another instance orchestrates this migration now: undo not run here");
        return;
    }
    let r = steps::undo_with_retries(state, m, pairs).await;
    let secrets = plan::secrets(pairs);
    steps::set(state, m, pairs, |d| match r {
        Ok(()) => {
            d.state = State::Aborted;
            d.cleanup_pending = false;
        }
        Err(e) => {
            let e = format!("abort cleanup failed: {}", e.redacted(&secrets));
            d.state = State::Failed;
            d.cleanup_pending = true;
            d.error = Some(match d.error.take() {
                Some(first) if !first.starts_with("abort cleanup failed") => format!("{first}; {e}"),
                _ => e,
            });
        }
    })
    .await;
}

/// `POST /admin/migrations`: validate now (errors are the caller's), then run in the background.
pub async fn start(state: &Arc<dyn Host>, req: StartRequest) -> Result<Doc, MigrateError> {
    // etcd mode: one at a time across the fleet (another instance may orchestrate one), and a
    // start while etcd is unreachable fails here, before anything changed.
    if let Some(link) = state.etcd() {
        let (records, _) = crate::etcd::migrations(&crate::etcd::Target::of(&link.source))
            .await
            .map_err(|e| MigrateError::Fleet(format!("cannot start a migration: {e}")))?;
        state.migrations().refresh(&records, &link.id);
        if let Some(busy) =
            records.iter().filter_map(|r| serde_json::from_value::<Doc>(r.doc.clone()).ok()).find(Doc::active)
        {
            return Err(MigrateError::Conflict(format!(
                "migration {} is {} (in etcd): one at a time; resume or abort it",
                busy.id, busy.state
            )));
        }
    }
    if let Some(busy) = state.migrations().list().into_iter().find(Doc::active) {
        return Err(MigrateError::Conflict(format!("migration {} is {}: one at a time", busy.id, busy.state)));
    }
    let (doc, pairs) = plan::plan(&state.pin().map, &req.cells, &req.to, req.hold_ms)?;
    // The target must have every moved table with its cell column.
    for p in &pairs.sql {
        let target = steps::connect(&p.target).await?;
        for (t, col) in &p.tables {
            let n: i64 = target
                .query_one(sql::TARGET_HAS_COLUMN, &[t, col])
                .await
                .map_err(|e| MigrateError::pg("target table check", &e))?
                .get(0);
            if n != 1 {
                return Err(MigrateError::InvalidRequest(format!(
                    "target shard {} database {} has no table {t} with column {col}",
                    doc.to, p.db
                )));
            }
        }
    }
    let m = Arc::new(Migration::new(doc.clone()));
    state.migrations().insert_alone(m.clone())?;
    spawn(state, &m, pairs, Job::Run);
    Ok(doc)
}

/// `POST /admin/migrations/{id}/abort`: from any state before the publish. A `failed`
/// migration whose cleanup is pending gets its cleanup retried.
pub async fn abort(state: &Arc<dyn Host>, id: &str) -> Result<Doc, MigrateError> {
    let m = lookup(state, id).await?;
    if !m.running() {
        take_over(state, &m, id).await?;
    }
    let doc = m.record();
    match doc.state {
        State::Done | State::Aborted => {
            return Err(MigrateError::Conflict(format!("migration {id} is already {}", doc.state)));
        }
        State::Failed if !doc.cleanup_pending => {
            return Err(MigrateError::Conflict(format!("migration {id} is already failed; nothing to clean up")));
        }
        State::Failed => {
            // Its undo deletes the cells' rows on its target: not after a later migration of the
            // same cells may have moved them there (a failed or aborted one has not).
            let later = state.migrations().list().into_iter().find(|d| {
                d.id > doc.id
                    && !matches!(d.state, State::Aborted | State::Failed)
                    && d.cells.iter().any(|c| doc.cells.contains(c))
            });
            if let Some(l) = later {
                return Err(MigrateError::Conflict(format!(
                    "migration {} of the same cells started later: clean up {id} by hand (docs/migrations.md)",
                    l.id
                )));
            }
        }
        _ if doc.map_version_after.is_some() => {
            return Err(MigrateError::Conflict(format!(
                "migration {id} already published map v{}: resume finishes it; move the cells back with a new migration",
                doc.map_version_after.unwrap_or(0)
            )));
        }
        _ => {}
    }
    m.abort.store(true, Ordering::SeqCst);
    if !m.running() {
        // Not running (recovered after a crash, failed, or an interrupted abort): undo here.
        let pairs = plan::pairs_for(&state.pin().map, &doc)?;
        spawn(state, &m, pairs, Job::Undo);
    }
    Ok(m.doc())
}

/// `POST /admin/migrations/{id}/resume`: continue a migration that is not terminal and has no
/// orchestrator (recovered after a crash, or stopped by an error after its fence); an
/// interrupted abort continues as an abort.
pub async fn resume(state: &Arc<dyn Host>, id: &str) -> Result<Doc, MigrateError> {
    let m = lookup(state, id).await?;
    let running = m.running();
    if !running {
        take_over(state, &m, id).await?;
    }
    let doc = m.record();
    if doc.terminal() || running {
        return Err(MigrateError::Conflict(format!(
            "migration {id} is {} and {}",
            doc.state,
            if running { "running" } else { "not resumable" }
        )));
    }
    let pairs = plan::pairs_for(&state.pin().map, &doc)?;
    let job = if doc.state == State::Aborting || m.abort_requested() {
        Job::Undo
    } else {
        m.update(|d| d.error = None);
        Job::Run
    };
    // Two resumes of one migration on this instance at once: the task lock lets one start.
    if !spawn(state, &m, pairs, job) {
        return Err(MigrateError::Conflict(format!("migration {id} is {} and running", doc.state)));
    }
    Ok(m.doc())
}

/// The migration `id` from the registry; in etcd mode one this process does not know yet
/// (another instance orchestrated it) is first loaded from the shards and etcd.
async fn lookup(state: &Arc<dyn Host>, id: &str) -> Result<Arc<Migration>, MigrateError> {
    if let Some(m) = state.migrations().get(id) {
        return Ok(m);
    }
    if state.etcd().is_some() {
        recover(state).await;
    }
    state.migrations().get(id).ok_or(MigrateError::NotFound)
}

/// etcd mode: make this instance the migration's orchestrator before it runs anything on it
/// (resume; abort of a migration this process does not run). (1) Read the record and its
/// mod_revision. (2) Refuse while it names another instance that is still registered — an
/// orchestrator that died drops out with its lease (`lease_ttl_s`). (3) Claim it: one etcd
/// transaction that writes this instance as `orchestrator` only if the record is still the one
/// read, so of two instances taking over at once exactly one wins and the other gets a conflict
/// naming the winner. The claim also deposes the previous orchestrator: should it wake up, its
/// next record write (conditional on naming it, `etcd::put_migration`) or its check before the
/// publish finds another name and it stops.
async fn take_over(state: &Arc<dyn Host>, m: &Migration, id: &str) -> Result<(), MigrateError> {
    let Some(link) = state.etcd() else { return Ok(()) };
    let target = crate::etcd::Target::of(&link.source);
    let fleet = |e: crate::etcd::EtcdError| MigrateError::Fleet(format!("cannot take migration {id} over: {e}"));
    let (records, live) = crate::etcd::migrations(&target).await.map_err(fleet)?;
    state.migrations().refresh(&records, &link.id);
    // 1.
    let seen = match crate::etcd::migration_record(&target, id).await.map_err(fleet)? {
        // 2.
        Some((r, _)) if r.orchestrator != link.id && live.iter().any(|i| i.id == r.orchestrator) => {
            return Err(MigrateError::Conflict(format!(
                "migration {id} is orchestrated by instance {}, which is live: resume or abort it there",
                r.orchestrator
            )));
        }
        Some((_, rev)) => rev,
        None => 0,
    };
    // 3.
    let doc = serde_json::to_value(m.record()).expect("doc serialises");
    let record = crate::etcd::MigrationRecord { orchestrator: link.id.clone(), doc };
    match crate::etcd::claim_migration(&target, id, seen, &record).await {
        Ok(()) => {
            m.set_deposed(None);
            tracing::info!(%id, instance = %link.id, "took the migration over");
            Ok(())
        }
        Err(crate::etcd::EtcdError::Orchestrated { by, .. }) => Err(MigrateError::Conflict(format!(
            "migration {id} was taken over by instance {by} at the same time: resume or abort it there"
        ))),
        Err(e) => Err(fleet(e)),
    }
}

/// etcd mode: stop unless the migration's record in etcd still names this instance (another
/// one took it over while this orchestrator hung or was cut off). Checked before the steps a
/// deposed orchestrator must never repeat: publishing the map and releasing the freeze.
pub(crate) async fn still_orchestrator(state: &dyn Host, m: &Migration) -> Result<(), MigrateError> {
    let Some(link) = state.etcd() else { return Ok(()) };
    let id = m.record().id;
    let target = crate::etcd::Target::of(&link.source);
    match crate::etcd::migration_record(&target, &id).await {
        Ok(Some((r, _))) if r.orchestrator != link.id => {
            m.set_deposed(Some(r.orchestrator.clone()));
            Err(MigrateError::Deposed(r.orchestrator))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(MigrateError::Fleet(format!("cannot check who orchestrates migration {id}: {e}"))),
    }
}

/// Load unfinished migrations persisted on the shards (after a crash of their orchestrator).
pub async fn recover(state: &Arc<dyn Host>) {
    let snap = state.pin();
    let mut endpoints = Vec::new();
    for shard in snap.map.shards() {
        for db in shard.databases.keys() {
            if let Ok(ep) = plan::admin_config(&snap.map, shard.id.as_str(), db) {
                endpoints.push(ep);
            }
        }
    }
    drop(snap);
    // Connect and query under one 3 s bound: a shard that accepts but never answers must not
    // hold up the start.
    let reads = endpoints.into_iter().map(|ep| async move {
        let read = async {
            let c = steps::connect(&ep).await.ok()?;
            let rows = c.query(sql::UNFINISHED, &[]).await.ok()?;
            Some(rows.into_iter().filter_map(|r| serde_json::from_value::<Doc>(r.get(0)).ok()).collect::<Vec<_>>())
        };
        tokio::time::timeout(Duration::from_secs(3), read).await.ok().flatten()
    });
    let mut found: Vec<Doc> = futures_util::future::join_all(reads).await.into_iter().flatten().flatten().collect();
    found.extend(mongo::unfinished(state.as_ref()).await);
    // etcd mode: the records there too (the shards' rows, read first, take precedence).
    if let Some(link) = state.etcd()
        && let Ok((records, _)) = crate::etcd::migrations(&crate::etcd::Target::of(&link.source)).await
    {
        found.extend(
            records.into_iter().filter_map(|r| serde_json::from_value::<Doc>(r.doc).ok()).filter(|d| !d.terminal()),
        );
    }
    let mut reg = state.migrations().0.lock().expect("registry");
    for mut doc in found {
        if reg.contains_key(&doc.id) {
            continue;
        }
        if doc.active() {
            doc.error = Some("interrupted: the orchestrating process stopped; resume or abort".into());
        }
        tracing::warn!(id = %doc.id, state = %doc.state, "unfinished migration found");
        reg.insert(doc.id.clone(), Arc::new(Migration::new(doc)));
    }
}

/// etcd mode: make this instance's hold match the freezes published under `<prefix>/freezes/`
/// (called by the etcd loop at start, on every change and after a loss); the ids now held, which
/// the registration reports as acknowledged. (1) A held freeze whose key is gone is lifted
/// (released, or its migration undone). (2) A published one is applied unless already held —
/// replacing the hold would release the writes waiting on it. One migration runs at a time, so
/// at most one is published; should there be more, the first is held and only it acknowledged.
pub fn apply_fleet_freezes(state: &dyn Host, specs: &[crate::etcd::FreezeSpec]) -> Vec<String> {
    let held = state.freeze().borrow().as_ref().map(|f| f.id.clone());
    // 1.
    if let Some(id) = &held
        && !specs.iter().any(|s| &s.id == id)
    {
        release_local(state, id);
        tracing::info!(%id, "freeze released through etcd");
    }
    // 2.
    let Some(spec) = specs.first() else { return Vec::new() };
    if held.as_deref() != Some(spec.id.as_str()) {
        let cells: Result<Vec<CellIndex>, _> = spec.cells.iter().map(|c| crate::geo::parse_cell(c)).collect();
        match cells {
            Ok(cells) => {
                freeze_local(state, &spec.id, &cells, Duration::from_millis(spec.hold_ms));
                tracing::info!(id = %spec.id, cells = ?spec.cells, "freeze applied from etcd");
            }
            Err(e) => {
                // Not acknowledged: the orchestrator waits for this instance until its timeout.
                tracing::warn!(id = %spec.id, error = %e, "unreadable freeze in etcd: not applied");
                return Vec::new();
            }
        }
    }
    vec![spec.id.clone()]
}

/// Hold writes here for `id` unless this instance already holds it (see
/// [`apply_fleet_freezes`]).
pub(crate) fn freeze_local_once(state: &dyn Host, id: &str, cells: &[CellIndex], hold: Duration) {
    if state.freeze().borrow().as_ref().is_none_or(|f| f.id != id) {
        freeze_local(state, id, cells, hold);
    }
}

pub fn freeze_local(state: &dyn Host, id: &str, cells: &[CellIndex], hold: Duration) {
    state.freeze().send_replace(Some(Arc::new(Freeze::new(id, cells, hold))));
}

pub fn release_local(state: &dyn Host, id: &str) -> Option<Arc<Freeze>> {
    let mut released = None;
    state.freeze().send_if_modified(|f| {
        if f.as_ref().is_some_and(|f| f.id == id) {
            released = f.take();
            true
        } else {
            false
        }
    });
    released
}
