//! The orchestrator's steps (numbered as in docs/migrations.md): setup, copy, catch up, cutover
//! (hold, fence, wait for the target, publish, release), clean up, and the undo of a migration
//! that did not publish. Each step is idempotent, so a resumed migration re-runs from its
//! persisted state. Talks to the shards (SQL from `sql.rs`), the reload loop and the peers.

use std::sync::Arc;
use std::time::Duration;

use h3o::CellIndex;
use tracing::Instrument;

use super::Host;
use super::doc::{Doc, State};
use super::plan::{Endpoint, Pairs, cells_of};
use super::{MigrateError, Migration, sql};
use crate::routing;

/// A connection whose driver task ends with it (dropping the client closes the connection).
pub(super) async fn connect(e: &Endpoint) -> Result<tokio_postgres::Client, MigrateError> {
    let mut cfg = e.config.clone();
    cfg.connect_timeout(Duration::from_secs(5));
    let unavailable = |reason: String| MigrateError::ShardUnavailable { shard: e.shard.clone(), reason };
    let connector = e.tls.connector().map_err(|err| unavailable(err.to_string()))?;
    let (client, conn) = cfg.connect(connector).await.map_err(|err| match err.as_db_error() {
        Some(d) => unavailable(format!("{} (SQLSTATE {})", d.message(), d.code().code())),
        None => unavailable(err.to_string()),
    })?;
    let shard = e.shard.clone();
    crate::tasks::spawn(
        "migration_connection",
        async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "migration connection closed");
            }
        }
        .instrument(tracing::debug_span!("migration_connection", shard = %shard)),
    );
    Ok(client)
}

async fn exec(c: &tokio_postgres::Client, step: &str, sql: &str) -> Result<(), MigrateError> {
    c.batch_execute(sql).await.map_err(|e| MigrateError::pg(step, &e))
}

/// The value of a `SELECT count(*) ...`.
async fn count(
    c: &tokio_postgres::Client,
    step: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<i64, MigrateError> {
    Ok(c.query_one(sql, params).await.map_err(|e| MigrateError::pg(step, &e))?.get(0))
}

/// Does this migration's subscription exist on the target (steps re-run after a crash)?
async fn has_subscription(target: &tokio_postgres::Client, name: &str) -> Result<bool, MigrateError> {
    Ok(count(target, "subscription lookup", sql::SUBSCRIPTION_EXISTS, &[&name]).await? > 0)
}

fn check_abort(m: &Migration) -> Result<(), MigrateError> {
    if let Some(by) = m.deposed_by() {
        return Err(MigrateError::Deposed(by));
    }
    if m.abort_requested() { Err(MigrateError::Aborted) } else { Ok(()) }
}

/// Update the doc, log it, and persist it on both shards (best effort: the in-memory doc is
/// authoritative while this process runs; the persisted one after a crash) — in etcd mode only
/// once etcd took the record from this instance as its orchestrator.
pub(super) async fn set(state: &dyn Host, m: &Migration, pairs: &Pairs, f: impl FnOnce(&mut Doc)) {
    let doc = m.update(f);
    if m.deposed_by().is_some() {
        // Another instance orchestrates it: its records are the truth now.
        return;
    }
    tracing::info!(id = %doc.id, state = %doc.state, from = %doc.from, to = %doc.to, error = ?doc.error, "migration");
    metrics::gauge!(crate::telemetry::names::MIGRATION_ACTIVE).set(if doc.terminal() { 0.0 } else { 1.0 });
    let json = serde_json::to_value(&doc).expect("doc serialises");
    // etcd mode first: a copy in etcd names the orchestrator, so another instance can tell
    // whether the migration still has one before it takes it over (the shards' rows stay the
    // authority). The write succeeds only while the record names this instance: a deposed
    // orchestrator learns it here and persists nothing, on the shards either.
    if let Some(link) = state.etcd() {
        let record = crate::etcd::MigrationRecord { orchestrator: link.id.clone(), doc: json.clone() };
        match crate::etcd::put_migration(&crate::etcd::Target::of(&link.source), &doc.id, &record).await {
            Ok(()) => {}
            Err(crate::etcd::EtcdError::Orchestrated { by, .. }) => {
                tracing::warn!(id = %doc.id, %by, "another instance took this migration over: this orchestrator stops");
                m.set_deposed(Some(by));
                return;
            }
            // A lost etcd does not stop a step, but without the confirmation that this
            // instance still orchestrates, the shards' rows are not written either: a deposed
            // orchestrator cut off from etcd must not overwrite the new one's progress there.
            // Resuming from an older persisted state is safe (every step skips what is done).
            Err(e) => {
                tracing::warn!(id = %doc.id, error = %e, "could not persist migration progress: etcd cannot confirm this instance still orchestrates it");
                return;
            }
        }
    }
    for p in &pairs.sql {
        for (side, ep) in [("source", &p.source), ("target", &p.target)] {
            let persisted = async {
                let c = connect(ep).await?;
                exec(&c, "schema", sql::SCHEMA).await?;
                c.execute(sql::PERSIST, &[&doc.id, &doc.state.as_str(), &json])
                    .await
                    .map_err(|e| MigrateError::pg("persist progress", &e))
            };
            if let Err(e) = persisted.await {
                // The step goes on (the in-memory doc is current); a crash now would show the
                // previous persisted state, from which resume is still safe (steps are idempotent).
                tracing::warn!(id = %doc.id, database = %p.db, side, error = %e, "could not persist migration progress");
            }
        }
    }
    if let Err(e) = super::mongo::persist(state, &pairs.docs, &doc.id, doc.state.as_str(), &json.to_string()).await {
        tracing::warn!(id = %doc.id, error = %e, "could not persist migration progress on MongoDB");
    }
}

/// The whole forward path from the persisted state: every step skips what is already done.
pub(super) async fn run(state: &Arc<dyn Host>, m: &Arc<Migration>, pairs: &Pairs) -> Result<(), MigrateError> {
    let doc = m.record();
    let cells = cells_of(&doc);
    let name = sql::object_name(&doc.id);
    let published = doc.map_version_after.is_some();
    if !doc.fenced && !published {
        setup(state.as_ref(), m, pairs, &cells, &name).await?;
        check_abort(m)?;
        copy(state.as_ref(), m, pairs, &doc.id, &cells, &name).await?;
        catch_up(state.as_ref(), m, pairs, &cells, &name).await?;
    }
    if !published {
        cutover(state, m, pairs, &cells, &name).await?;
    } else if state.etcd().is_some() {
        // Resumed after the publish: the freeze key of the dead orchestrator may still be in
        // etcd, holding the cells on every instance.
        release(state.as_ref(), m).await;
    }
    finish(state.as_ref(), m, pairs, &cells, &name).await
}

/// 1. Setup: schema, fence triggers (empty fence), full replica identity on the source so row
///    filters may cover UPDATE/DELETE; stale leftovers of the cells removed from the target.
async fn setup(
    state: &dyn Host,
    m: &Migration,
    pairs: &Pairs,
    cells: &[CellIndex],
    name: &str,
) -> Result<(), MigrateError> {
    for p in &pairs.sql {
        let src = connect(&p.source).await?;
        let dst = connect(&p.target).await?;
        exec(&src, "source setup", sql::SCHEMA).await?;
        exec(&dst, "target setup", sql::SCHEMA).await?;
        for (t, col) in &p.tables {
            exec(&src, &format!("source trigger on {t}"), &sql::fence_trigger(t, col)).await?;
            exec(&dst, &format!("target trigger on {t}"), &sql::fence_trigger(t, col)).await?;
            exec(&src, &format!("replica identity on {t}"), &sql::replica_identity(t, true)).await?;
        }
        if !has_subscription(&dst, name).await? {
            // Rows of these cells on the target are leftovers of an earlier move away (the
            // target does not own them): they would collide with the copy.
            for (t, col) in &p.tables {
                exec(&dst, &format!("target cleanup of {t}"), &sql::delete_cells_unfenced(t, col, cells)).await?;
            }
        }
        check_abort(m)?;
    }
    super::mongo::setup(state, &pairs.docs, cells).await?;
    Ok(())
}

/// 2. Copy: publication with the row filter on the source, subscription with copy_data on the
///    target (each created only if missing: resumable).
async fn copy(
    state: &dyn Host,
    m: &Migration,
    pairs: &Pairs,
    id: &str,
    cells: &[CellIndex],
    name: &str,
) -> Result<(), MigrateError> {
    set(state, m, pairs, |d| d.state = State::Copying).await;
    for p in &pairs.sql {
        let src = connect(&p.source).await?;
        if count(&src, "publication lookup", sql::PUBLICATION_EXISTS, &[&name]).await? == 0 {
            exec(&src, "create publication", &sql::create_publication(id, &p.tables, cells)).await?;
        }
        let dst = connect(&p.target).await?;
        if !has_subscription(&dst, name).await? {
            let cfg = &p.source.config;
            let (host, port) = crate::backend::postgres::host_port(cfg);
            let password = cfg.get_password().map(|b| String::from_utf8_lossy(b).into_owned());
            let conninfo = sql::conninfo(
                &host,
                port,
                cfg.get_dbname().unwrap_or(&p.db),
                cfg.get_user().unwrap_or("postgres"),
                password.as_deref(),
            ) + &p.source.tls.conninfo_params();
            exec(&dst, "create subscription", &sql::create_subscription(id, &conninfo)).await?;
        }
    }
    // MongoDB: a first full copy while writes go on (the cutover re-syncs what changed).
    let docs = super::mongo::sync(state, &pairs.docs, cells).await?;
    m.update(|d| d.rows_copied = docs);
    Ok(())
}

/// 3. Catch up: every table copied (state 'r'eady) and the slot close to the source's WAL.
async fn catch_up(
    state: &dyn Host,
    m: &Migration,
    pairs: &Pairs,
    cells: &[CellIndex],
    name: &str,
) -> Result<(), MigrateError> {
    set(state, m, pairs, |d| d.state = State::CatchingUp).await;
    // MongoDB: one more pass, so the pass under the cutover's hold has little left to do.
    let docs = super::mongo::sync(state, &pairs.docs, cells).await?;
    loop {
        check_abort(m)?;
        let mut ready = true;
        let mut lag = 0u64;
        let mut copied = docs;
        for p in &pairs.sql {
            let dst = connect(&p.target).await?;
            ready &= count(&dst, "copy progress", sql::SUBSCRIPTION_NOT_READY, &[&name]).await? == 0;
            for (t, col) in &p.tables {
                copied += count(&dst, "copy progress", &sql::count_cells(t, col, cells), &[]).await? as u64;
            }
            let src = connect(&p.source).await?;
            let l: Option<i64> =
                src.query_one(sql::SLOT_LAG, &[&name]).await.map_err(|e| MigrateError::pg("slot lag", &e))?.get(0);
            lag += l.unwrap_or(i64::MAX).max(0) as u64;
        }
        m.update(|d| {
            d.rows_copied = copied;
            d.lag_bytes = Some(lag);
        });
        if ready && lag < (1 << 20) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 4. Cutover: hold writes everywhere, fence the source, wait for the target, publish, release.
async fn cutover(
    state: &Arc<dyn Host>,
    m: &Arc<Migration>,
    pairs: &Pairs,
    cells: &[CellIndex],
    name: &str,
) -> Result<(), MigrateError> {
    set(state.as_ref(), m, pairs, |d| d.state = State::Cutover).await;
    check_abort(m)?;
    hold_writes(state.as_ref(), m, cells).await?;
    // The map that moves the cells is the next one (or the serving one, if a crash came after
    // the publish but before it was recorded).
    let fence_version = {
        let snap = state.pin();
        if owned_by_target(&snap.map, cells, &m.record().to) { snap.map.version().0 } else { snap.map.version().0 + 1 }
    };
    let fence_lsns = fence_source(state.as_ref(), m, pairs, cells, fence_version).await?;
    super::failpoint::hit("after_fence").await?;
    // MongoDB: the final copy, after the fence and its grace: the source's documents of the
    // cells no longer change.
    let docs = super::mongo::sync(state.as_ref(), &pairs.docs, cells).await?;
    m.update(|d| d.rows_copied = d.rows_copied.max(docs));
    // Last point where an abort can give the cells back to the source: the next step lifts the
    // target's fence from an earlier move away, which an undo would not put back.
    check_abort(m)?;
    wait_applied(pairs, cells, name, &fence_lsns).await?;
    super::mongo::lift_target(state.as_ref(), &pairs.docs, cells).await?;
    // A deposed orchestrator that woke up here must not publish (nor then release the freeze).
    super::still_orchestrator(state.as_ref(), m).await?;
    let version = match state.etcd() {
        Some(link) => publish_etcd(state.as_ref(), m, cells, &link.source).await?,
        None => publish(state.as_ref(), m, cells).await?,
    };
    if version != fence_version {
        for p in &pairs.sql {
            let src = connect(&p.source).await?;
            src.execute(sql::FENCE_SET_VERSION, &[&m.record().id, &(version as i64)])
                .await
                .map_err(|e| MigrateError::pg("fence version", &e))?;
        }
        super::mongo::set_fence_version(state.as_ref(), &pairs.docs, &m.record().id, version).await?;
    }
    set(state.as_ref(), m, pairs, |d| d.map_version_after = Some(version)).await;
    // Cached reads of the moved cells filled before now are unreachable (docs/cache.md).
    let d = m.record();
    state.cache().moved(&state.pin().map, cells, &d.from, &d.to).await;
    // 4e. Release held writes: they re-route on the new map, to the target.
    release(state.as_ref(), m).await;
    Ok(())
}

/// 4a. Every instance holds writes for the cells (bounded by hold_ms, then 503 cells_frozen).
/// etcd mode: (1) publish the freeze key, (2) hold here, (3) wait until every live instance's
/// registration says it holds it; an instance that cannot be reached drops out of the fleet with
/// its lease, and the shards' fence refuses its writes from the next step on.
async fn hold_writes(state: &dyn Host, m: &Migration, cells: &[CellIndex]) -> Result<(), MigrateError> {
    let doc = m.record();
    let hold = Duration::from_millis(doc.hold_ms);
    let Some(link) = state.etcd() else {
        super::freeze_local(state, &doc.id, cells, hold);
        let body = serde_json::json!({"id": doc.id, "cells": doc.cells, "hold_ms": doc.hold_ms}).to_string();
        tell_peers(state, m, "freeze", http::Method::POST, "/admin/freeze", "application/json", body, 2).await;
        return Ok(());
    };
    // The key first: this instance's own watch would lift a local hold that etcd does not have.
    let target = crate::etcd::Target::of(&link.source);
    let spec = crate::etcd::FreezeSpec { id: doc.id.clone(), cells: doc.cells.clone(), hold_ms: doc.hold_ms };
    match crate::etcd::put_freeze(&target, &spec, &link.id).await {
        Ok(()) => {}
        Err(crate::etcd::EtcdError::Orchestrated { by, .. }) => {
            m.set_deposed(Some(by.clone()));
            return Err(MigrateError::Deposed(by));
        }
        Err(e) => return Err(MigrateError::Fleet(e.to_string())),
    }
    super::freeze_local_once(state, &doc.id, cells, hold);
    crate::etcd::wait_for_freeze(&target, &doc.id, fleet_wait(&link.source))
        .await
        .map_err(|e| MigrateError::Fleet(e.to_string()))?;
    Ok(())
}

/// How long the orchestrator waits for the fleet: long enough for the lease of an instance that
/// lost etcd to expire (it then no longer counts), plus a few etcd round trips.
fn fleet_wait(src: &crate::config::EtcdSource) -> Duration {
    Duration::from_secs(src.lease_ttl_s) + src.timeout * 2 + Duration::from_secs(1)
}

/// 4b. Fence the source; returns each database's WAL position after its fence.
async fn fence_source(
    state: &dyn Host,
    m: &Migration,
    pairs: &Pairs,
    cells: &[CellIndex],
    map_version: u64,
) -> Result<Vec<String>, MigrateError> {
    let id = m.record().id;
    let mut lsns = Vec::new();
    for p in &pairs.sql {
        let src = connect(&p.source).await?;
        exec(&src, "fence", &sql::fence(&p.tables, cells, &id, map_version)).await?;
        let lsn: String = src.query_one(sql::CURRENT_LSN, &[]).await.map_err(|e| MigrateError::pg("fence", &e))?.get(0);
        lsns.push(lsn);
    }
    super::mongo::fence(state, &pairs.docs, &id, cells, map_version).await?;
    set(state, m, pairs, |d| d.fenced = true).await;
    Ok(lsns)
}

/// 4c. Wait until the target has applied everything up to the fence; then the target lifts a
/// fence it may hold from an earlier move away (it becomes the owner).
async fn wait_applied(pairs: &Pairs, cells: &[CellIndex], name: &str, lsns: &[String]) -> Result<(), MigrateError> {
    for (p, lsn) in pairs.sql.iter().zip(lsns) {
        let src = connect(&p.source).await?;
        loop {
            let done: Option<bool> = src
                .query_one(sql::SLOT_CONFIRMED_PAST, &[&name, lsn])
                .await
                .map_err(|e| MigrateError::pg("wait for the target", &e))?
                .get(0);
            match done {
                Some(true) => break,
                Some(false) => tokio::time::sleep(Duration::from_millis(10)).await,
                // Resumed after the subscription was dropped: nothing more to wait for.
                None => break,
            }
        }
        let dst = connect(&p.target).await?;
        let list: Vec<i64> = cells.iter().map(|c| u64::from(*c) as i64).collect();
        dst.execute(sql::LIFT_FENCE_CELLS, &[&list]).await.map_err(|e| MigrateError::pg("lift target fence", &e))?;
    }
    Ok(())
}

/// Does the map already assign every cell to the target?
fn owned_by_target(map: &crate::shardmap::ShardMap, cells: &[CellIndex], to: &str) -> bool {
    cells.iter().all(|c| {
        c.center_child(map.resolution())
            .and_then(|k| routing::locate(map, k).ok())
            .and_then(|r| r.shard)
            .is_some_and(|s| map.shard(s).id.as_str() == to)
    })
}

/// 4d. Publish map v+1 here (persisted to the map file) and on every peer; its version.
async fn publish(state: &dyn Host, m: &Migration, cells: &[CellIndex]) -> Result<u64, MigrateError> {
    let to = m.record().to;
    let snap = state.pin();
    let (text, version) = if owned_by_target(&snap.map, cells, &to) {
        (snap.text.clone(), snap.map.version().0)
    } else {
        let (text, version) = super::plan::next_map_text(&snap.text, cells, &to).map_err(MigrateError::Publish)?;
        let src = crate::reload::Source::Push { body: text.clone(), json: false, if_match: Some(snap.map.version().0) };
        match crate::reload::request(state.reload_tx(), src).await {
            Some(o) if o.result == crate::reload::ReloadResult::Published => {}
            Some(o) => {
                return Err(MigrateError::Publish(format!(
                    "publishing map v{version} failed: {}",
                    o.errors.join("; ")
                )));
            }
            None => return Err(MigrateError::Publish("reload loop stopped".into())),
        }
        (text, version)
    };
    drop(snap);
    tell_peers(state, m, "map push", http::Method::PUT, "/admin/map", "application/toml", text, 10).await;
    Ok(version)
}

/// 4d in etcd mode: (1) the compare-and-swap push of map v+1 on the version serving here (a
/// concurrent operator push makes it fail: the cells stay fenced and held, resume retries),
/// (2) wait until every live instance serves it — a laggard is recorded, not waited for beyond
/// the lease TTL (the fence refuses its writes into the cells).
async fn publish_etcd(
    state: &dyn Host,
    m: &Migration,
    cells: &[CellIndex],
    src: &crate::config::EtcdSource,
) -> Result<u64, MigrateError> {
    let target = crate::etcd::Target::of(src);
    let to = m.record().to;
    let version = {
        let snap = state.pin();
        if owned_by_target(&snap.map, cells, &to) {
            snap.map.version().0
        } else {
            let (text, version) = super::plan::next_map_text(&snap.text, cells, &to).map_err(MigrateError::Publish)?;
            let if_version = Some(snap.map.version().0);
            drop(snap);
            crate::etcd::push_map(&target, &text, if_version)
                .await
                .map_err(|e| MigrateError::Publish(format!("publishing map v{version} through etcd: {e}")))?;
            version
        }
    };
    if let Err(e) = crate::etcd::wait_for_version(&target, version, fleet_wait(src)).await {
        tracing::warn!(error = %e, "map push: not every instance reports the new version");
        m.update(|d| d.peer_problems.push(format!("map push: {e}")));
    }
    Ok(version)
}

/// 5. Clean up replication objects; the fence and both triggers stay on the source.
async fn finish(
    state: &dyn Host,
    m: &Migration,
    pairs: &Pairs,
    cells: &[CellIndex],
    name: &str,
) -> Result<(), MigrateError> {
    drop_replication(pairs, &m.record().id, name).await?;
    super::mongo::finish(state, &pairs.docs, cells).await?;
    for p in &pairs.sql {
        let src = connect(&p.source).await?;
        for (t, _) in &p.tables {
            // Best effort: FULL only costs WAL volume.
            let _ = src.batch_execute(&sql::replica_identity(t, false)).await;
        }
    }
    set(state, m, pairs, |d| {
        d.state = State::Done;
        d.error = None;
    })
    .await;
    Ok(())
}

async fn drop_replication(pairs: &Pairs, id: &str, name: &str) -> Result<(), MigrateError> {
    for p in &pairs.sql {
        let dst = connect(&p.target).await?;
        if has_subscription(&dst, name).await? {
            // Dropping the subscription also drops its slot on the source.
            exec(&dst, "drop subscription", &sql::drop_subscription(id)).await?;
        }
        let src = connect(&p.source).await?;
        exec(&src, "drop publication", &sql::drop_publication(id)).await?;
        // A slot left by a subscription that could not reach the source when it was dropped.
        let _ = src.execute(sql::DROP_SLOT, &[&name]).await;
    }
    Ok(())
}

/// Undo a migration that has not published: replication objects dropped, copied rows removed
/// from the target, the source's fence lifted (it owns the cells again), writes released.
/// Every part is attempted even when an earlier one fails; the first failure is returned. The
/// state is the caller's to set.
pub(super) async fn undo(state: &dyn Host, m: &Migration, pairs: &Pairs) -> Result<(), MigrateError> {
    let doc = m.record();
    let cells = cells_of(&doc);
    let mut first: Option<MigrateError> = None;
    let mut note = |r: Result<(), MigrateError>| {
        if let Err(e) = r {
            tracing::warn!(id = %doc.id, error = %e, "migration cleanup step failed");
            first.get_or_insert(e);
        }
    };
    note(drop_replication(pairs, &doc.id, &sql::object_name(&doc.id)).await);
    for p in &pairs.sql {
        note(
            async {
                let dst = connect(&p.target).await?;
                for (t, col) in &p.tables {
                    exec(&dst, &format!("removing copied rows of {t}"), &sql::delete_cells_unfenced(t, col, &cells))
                        .await?;
                }
                Ok(())
            }
            .await,
        );
        note(
            async {
                let src = connect(&p.source).await?;
                src.execute(sql::LIFT_FENCE_OF_MIGRATION, &[&doc.id])
                    .await
                    .map_err(|e| MigrateError::pg("lift source fence", &e))?;
                for (t, _) in &p.tables {
                    let _ = src.batch_execute(&sql::replica_identity(t, false)).await;
                }
                Ok(())
            }
            .await,
        );
    }
    note(super::mongo::undo(state, &pairs.docs, &doc.id, &cells).await);
    if first.is_none() {
        m.update(|d| d.fenced = false);
    }
    // Always: held writes must not wait for a migration that stopped.
    release(state, m).await;
    match first {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// [`undo`] with retries of transient failures (a shard restarting, a deadlock): three attempts,
/// 1 s and 2 s apart. A permanent one (a missing privilege) is returned at once.
pub(super) async fn undo_with_retries(state: &dyn Host, m: &Migration, pairs: &Pairs) -> Result<(), MigrateError> {
    let mut wait = Duration::from_secs(1);
    let mut attempt = 1;
    loop {
        match undo(state, m, pairs).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 3 && e.class().1 => {
                tracing::warn!(id = %m.record().id, attempt, error = %e, "migration cleanup failed: retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Send one request to every peer and record the ones that did not acknowledge it.
async fn tell_peers(
    state: &dyn Host,
    m: &Migration,
    what: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: String,
    timeout_s: u64,
) {
    let token = state.peer_token();
    let peers = crate::fleet::broadcast(
        &state.config().peers,
        &state.config().tls,
        token.as_deref(),
        method,
        path,
        content_type,
        body.into(),
        Duration::from_secs(timeout_s),
    )
    .await;
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
    m.update(|d| d.peer_problems.extend(bad));
}

/// Lift a freeze here (if it is this migration's) and tell the peers.
pub(super) async fn release(state: &dyn Host, m: &Migration) {
    let id = m.record().id;
    if let Some(by) = m.deposed_by() {
        // The freeze key is the new orchestrator's to delete, when its cutover is done.
        tracing::warn!(%id, %by, "deposed: not releasing the freeze");
        return;
    }
    if let Some(f) = super::release_local(state, &id) {
        let held = f.started.elapsed().as_millis() as u64;
        m.update(|d| d.hold_ms_max = Some(d.hold_ms_max.unwrap_or(0).max(held)));
        metrics::histogram!(crate::telemetry::names::MIGRATION_HOLD).record(held as f64 / 1000.0);
    }
    let Some(link) = state.etcd() else {
        let body = serde_json::json!({"id": id}).to_string();
        tell_peers(state, m, "release", http::Method::POST, "/admin/release", "application/json", body, 2).await;
        return;
    };
    // etcd mode: deleting the key releases every instance. Retried: a key left behind holds the
    // cells (503 cells_frozen) everywhere until a resume deletes it.
    let target = crate::etcd::Target::of(&link.source);
    let mut last = None;
    for attempt in 0..5u32 {
        match crate::etcd::delete_freeze(&target, &id, &link.id).await {
            Ok(()) => return,
            Err(crate::etcd::EtcdError::Orchestrated { by, .. }) => {
                tracing::warn!(%id, %by, "deposed: the freeze is the new orchestrator's to release");
                m.set_deposed(Some(by));
                return;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    if let Some(e) = last {
        tracing::warn!(%id, error = %e, "cannot delete the freeze key in etcd: cells stay held until resume");
        m.update(|d| d.peer_problems.push(format!("release: {e}")));
    }
}
