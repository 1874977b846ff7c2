//! Migration fences on a MongoDB database, and the write-path check against them. A fence says
//! "these cells moved away with map version V": a write routed into them by an older map must
//! not be acknowledged by this (old) owner. MongoDB has no trigger to refuse it atomically, so
//! the check is a protocol between the write path and the migration (docs/migrations.md):
//!
//! 1. A write reads the fences (`cellgate_fences`, cached for at most [`FENCE_FRESH`]) and is
//!    refused before it runs when a fence covers its cell.
//! 2. The migration, after writing the fence, waits [`FENCE_GRACE`] before its final copy.
//! 3. A write acknowledged within [`FENCE_GRACE`] of the moment its fence read was *sent* ran
//!    before the final copy (it passed a read that preceded the fence, and the copy starts at
//!    least the grace after the fence), so the copy carries it: it may be acknowledged. A slower
//!    one reads the fences again: no fence now means the write preceded it (acknowledged); a
//!    fence now leaves it in doubt (`OutcomeUnknown`, never a silent success).
//!
//! Owns the fence documents' format and the cache; knows nothing of migrations' state or HTTP.

use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document, doc};
use h3o::CellIndex;
use mongodb::options::{ReadPreference, SelectionCriteria};
use tokio::time::Instant;

use super::{BackendError, MongoDatabase};

/// The collection holding the fences of one database.
pub const FENCES: &str = "cellgate_fences";
/// The collection holding migration progress records (as `cellgate.migrations` on PostgreSQL).
pub const MIGRATIONS: &str = "cellgate_migrations";
/// How old a cached fence read may be when a write starts.
pub const FENCE_FRESH: Duration = Duration::from_millis(250);
/// How long after a fence the migration waits before its final copy; a write acknowledged
/// within this long after its fence read was sent is known to be in that copy.
pub const FENCE_GRACE: Duration = Duration::from_millis(1000);

/// The fences of one database as read at `sent` (when the read was sent, not answered).
#[derive(Debug, Clone)]
pub struct FenceView {
    pub sent: Instant,
    /// (fenced cell, map version that moved it; `None` refuses every routed write)
    fences: Arc<Vec<(CellIndex, Option<u64>)>>,
}

impl FenceView {
    /// The fence refusing a write to owning cell `cell` routed by map `version`, if any.
    pub fn refusing(&self, cell: CellIndex, version: u64) -> Option<CellIndex> {
        self.fences.iter().find_map(|(f, v)| {
            let covers = f.resolution() <= cell.resolution() && cell.parent(f.resolution()) == Some(*f);
            (covers && v.is_none_or(|v| version < v)).then_some(*f)
        })
    }

    /// Is a write acknowledged now known to precede any fence written after this read?
    fn still_covers_writes(&self) -> bool {
        self.sent.elapsed() < FENCE_GRACE
    }
}

fn fenced_error(label: &str, cell: CellIndex, fence: CellIndex) -> BackendError {
    BackendError::Fenced(format!("cell {cell} migrated away from {label} (fence on {fence}): this map is stale"))
}

impl MongoDatabase {
    /// The fences, from the cache when it was read less than `max_age` ago. One read at a time
    /// per database: concurrent writers share it.
    pub async fn fence_view(&self, max_age: Duration, deadline: Instant) -> Result<FenceView, BackendError> {
        let fresh = |v: &Option<FenceView>| v.as_ref().filter(|v| v.sent.elapsed() < max_age).cloned();
        if let Some(v) = fresh(&self.fence_cache.lock().expect("fence cache")) {
            return Ok(v);
        }
        let _one =
            tokio::time::timeout_at(deadline, self.fence_refresh.lock()).await.map_err(|_| BackendError::Timeout)?;
        if let Some(v) = fresh(&self.fence_cache.lock().expect("fence cache")) {
            return Ok(v);
        }
        let sent = Instant::now();
        let docs = self.primary_find(FENCES, doc! {}, deadline).await?;
        let mut fences = Vec::with_capacity(docs.len());
        for d in docs {
            // A fence this process cannot read refuses every write to the whole database rather
            // than being skipped: skipping could acknowledge a lost write.
            let cell = d.get_str("cell").ok().and_then(|c| c.parse::<CellIndex>().ok());
            let Some(cell) = cell else {
                return Err(BackendError::Server {
                    code: 0,
                    message: format!("unreadable fence document in {FENCES}: {d}"),
                });
            };
            let version = match d.get("map_version") {
                Some(Bson::Int64(v)) => u64::try_from(*v).ok(),
                Some(Bson::Int32(v)) => u64::try_from(*v).ok(),
                _ => None,
            };
            fences.push((cell, version));
        }
        let v = FenceView { sent, fences: Arc::new(fences) };
        *self.fence_cache.lock().expect("fence cache") = Some(v.clone());
        Ok(v)
    }

    /// Step 1 of the protocol: refuse a write to any of `cells` (owning cells) routed by map
    /// `version` when a fence covers it; the view to confirm the write with afterwards.
    pub async fn check_fences(
        &self,
        cells: &[CellIndex],
        version: u64,
        deadline: Instant,
    ) -> Result<FenceView, BackendError> {
        let v = self.fence_view(FENCE_FRESH, deadline).await?;
        for c in cells {
            if let Some(f) = v.refusing(*c, version) {
                return Err(fenced_error(&self.label, *c, f));
            }
        }
        Ok(v)
    }

    /// Step 3: after the server acknowledged the write. `Ok` when it is known to be in any
    /// migration's final copy (or no fence covers it), `OutcomeUnknown` otherwise.
    pub async fn confirm_fences(
        &self,
        view: &FenceView,
        cells: &[CellIndex],
        version: u64,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        if view.still_covers_writes() {
            return Ok(());
        }
        let now = self.fence_view(Duration::ZERO, deadline).await.map_err(|e| {
            BackendError::OutcomeUnknown(format!(
                "the write was applied on {}, but its migration fence could not be re-read: {e}",
                self.label
            ))
        })?;
        match cells.iter().find_map(|c| now.refusing(*c, version).map(|f| (*c, f))) {
            None => Ok(()),
            Some((c, f)) => Err(BackendError::OutcomeUnknown(format!(
                "the write was applied on {} while cell {c} was being fenced for a migration (fence on {f}); whether the new owner has it is unknown: read before retrying",
                self.label
            ))),
        }
    }

    /// Fence `cells` for `migration`, moved by map `version` (cutover step 4b).
    pub async fn put_fences(
        &self,
        migration: &str,
        cells: &[CellIndex],
        version: u64,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        for c in cells {
            // Keyed by `key`, not `_id`: some servers take only ObjectIds there (CongoDB).
            let key = format!("{migration}:{c}");
            let d = doc! {"key": &key, "cell": c.to_string(), "migration": migration, "map_version": v};
            self.primary_replace(FENCES, doc! {"key": &key}, d, deadline).await?;
        }
        self.forget_fences();
        Ok(())
    }

    /// The map version the fences of `migration` name (when the published map got another).
    pub async fn set_fence_version(
        &self,
        migration: &str,
        version: u64,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        self.primary_update_many(FENCES, doc! {"migration": migration}, doc! {"$set": {"map_version": v}}, deadline)
            .await?;
        self.forget_fences();
        Ok(())
    }

    /// Lift the fences on `cells` (this database becomes their owner again).
    pub async fn lift_fences_of_cells(&self, cells: &[CellIndex], deadline: Instant) -> Result<(), BackendError> {
        let list: Vec<String> = cells.iter().map(ToString::to_string).collect();
        self.primary_delete_many(FENCES, doc! {"cell": {"$in": list}}, deadline).await?;
        self.forget_fences();
        Ok(())
    }

    /// Lift the fences of an undone migration.
    pub async fn lift_fences_of_migration(&self, migration: &str, deadline: Instant) -> Result<(), BackendError> {
        self.primary_delete_many(FENCES, doc! {"migration": migration}, deadline).await?;
        self.forget_fences();
        Ok(())
    }

    fn forget_fences(&self) {
        *self.fence_cache.lock().expect("fence cache") = None;
    }

    pub(super) fn primary() -> SelectionCriteria {
        SelectionCriteria::ReadPreference(ReadPreference::Primary)
    }

    /// Every document matching `filter` on the primary.
    pub async fn primary_find(
        &self,
        coll: &str,
        filter: Document,
        deadline: Instant,
    ) -> Result<Vec<Document>, BackendError> {
        self.run(deadline, async {
            let c = self.client().await?;
            let mut s = self.session(c, None).await?;
            let cur = c
                .database(&self.db_name)
                .collection::<Document>(coll)
                .find(filter)
                .selection_criteria(Self::primary())
                .max_time(Self::max_time(deadline))
                .session(&mut s)
                .await
                .map_err(|e| self.classify(e))?;
            self.drain(cur, &mut s).await
        })
        .await
    }

    pub async fn primary_replace(
        &self,
        coll: &str,
        filter: Document,
        d: Document,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        self.run(deadline, async {
            let c = self.client().await?;
            c.database(&self.db_name)
                .collection::<Document>(coll)
                .replace_one(filter, d)
                .upsert(true)
                .await
                .map_err(|e| self.classify(e))?;
            Ok(())
        })
        .await
    }

    pub async fn primary_update_many(
        &self,
        coll: &str,
        filter: Document,
        update: Document,
        deadline: Instant,
    ) -> Result<u64, BackendError> {
        self.run(deadline, async {
            let c = self.client().await?;
            let r = c
                .database(&self.db_name)
                .collection::<Document>(coll)
                .update_many(filter, update)
                .await
                .map_err(|e| self.classify(e))?;
            Ok(r.modified_count)
        })
        .await
    }

    pub async fn primary_delete_many(
        &self,
        coll: &str,
        filter: Document,
        deadline: Instant,
    ) -> Result<u64, BackendError> {
        self.run(deadline, async {
            let c = self.client().await?;
            let r = c
                .database(&self.db_name)
                .collection::<Document>(coll)
                .delete_many(filter)
                .await
                .map_err(|e| self.classify(e))?;
            Ok(r.deleted_count)
        })
        .await
    }

    /// Unordered insert (a copy: one failing document does not stop the others; the first
    /// error is returned after all were tried).
    pub async fn primary_insert_unordered(
        &self,
        coll: &str,
        docs: &[Document],
        deadline: Instant,
    ) -> Result<(), BackendError> {
        if docs.is_empty() {
            return Ok(());
        }
        self.run(deadline, async {
            let c = self.client().await?;
            c.database(&self.db_name)
                .collection::<Document>(coll)
                .insert_many(docs)
                .ordered(false)
                .await
                .map_err(|e| self.classify(e))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_refuses_older_maps_inside_its_cell_only() {
        let moved: CellIndex = "851fb467fffffff".parse().unwrap();
        let parent = moved.parent(h3o::Resolution::Two).unwrap();
        let elsewhere: CellIndex = "8529a1d7fffffff".parse().unwrap();
        let v = FenceView { sent: Instant::now(), fences: Arc::new(vec![(parent, Some(7))]) };
        assert_eq!(v.refusing(moved, 6), Some(parent));
        assert_eq!(v.refusing(moved, 7), None, "routed by the map that moved it: goes to the new owner");
        assert_eq!(v.refusing(elsewhere, 6), None);
        let legacy = FenceView { sent: Instant::now(), fences: Arc::new(vec![(moved, None)]) };
        assert_eq!(legacy.refusing(moved, u64::MAX), Some(moved));
        assert!(legacy.still_covers_writes());
    }
}
