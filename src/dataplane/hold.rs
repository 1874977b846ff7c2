//! The cutover hold and the fence retry, shared by every write path (SQL and documents): a write
//! to a moving cell waits for the release and re-routes; a write that hits a migration fence on
//! the old owner refreshes this instance's (stale) map and is retried once.

use std::sync::Arc;

use h3o::CellIndex;

use super::ApiError;
use crate::app::AppState;
use crate::backend::BackendError;
use crate::migrate::Freeze;
use crate::state::Snapshot;

/// The cutover hold covering any of `cells`, if one is in force.
pub fn frozen_for(state: &AppState, cells: &[CellIndex]) -> Option<Arc<Freeze>> {
    state.freeze.borrow().as_ref().filter(|f| cells.iter().any(|c| f.covers(*c))).cloned()
}

/// Hold a write to `cell` until the freeze `f` is released (then the caller re-routes on the map
/// published by then), or fail with `cells_frozen` when its hold time runs out. The caller must
/// not keep a snapshot pinned while waiting (the release publishes a new one).
pub async fn hold(state: &AppState, f: Arc<Freeze>, cell: CellIndex) -> Result<(), ApiError> {
    let mut rx = state.freeze.subscribe();
    let released =
        tokio::time::timeout_at(f.deadline, rx.wait_for(|cur| !cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &f)))).await;
    match released {
        Ok(_) => Ok(()),
        Err(_) => Err(ApiError::CellsFrozen(format!("cell {cell} is moving; retry shortly"))),
    }
}

/// Did the old owner's migration fence refuse this write (nothing was written)?
pub fn is_fenced(e: &BackendError) -> bool {
    match e.root() {
        BackendError::Database { sqlstate, .. } => sqlstate == crate::migrate::sql::FENCE_SQLSTATE,
        BackendError::Fenced(_) => true,
        _ => false,
    }
}

/// A write of this request hit a migration fence on `shard` (nothing was written): count it;
/// the first time, drop the pinned snapshot and ask the reload writer for the newest map — `Ok`
/// when a newer map is published (the caller retries on it), `cells_frozen` otherwise; the
/// second time, `give_up` is the answer, so a shard that keeps fencing cannot loop a request.
pub async fn after_fence_hit(
    state: &AppState,
    snap: Arc<Snapshot>,
    refreshed: &mut bool,
    shard: &str,
    cell: CellIndex,
    give_up: ApiError,
) -> Result<(), ApiError> {
    metrics::counter!(crate::telemetry::names::FENCE_HITS, "shard" => shard.to_string()).increment(1);
    if std::mem::replace(refreshed, true) {
        return Err(give_up);
    }
    let seen = snap.map.version();
    drop(snap);
    tracing::warn!(shard, %cell, "write hit a migration fence: refreshing the map");
    let _ = crate::reload::request(&state.reload_tx, crate::reload::Source::File { trigger: "fence" }).await;
    if state.pin().map.version() == seen {
        return Err(ApiError::CellsFrozen(format!("cell {cell} is moving; retry shortly")));
    }
    Ok(())
}
