//! The MongoDB half of a migration: the documents of the moved cells (by each collection's
//! `geo_field`) copied to the target, re-synced under the fence (cutover), removed from the source
//! after the publish; the fence documents and the progress records on MongoDB. The write-path
//! side of the fence protocol is `backend/mongo/fence.rs` (why the grace makes it safe is
//! there). Talks to the shards through the snapshot's `MongoDatabase`s; knows no HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document, doc};
use h3o::CellIndex;
use tokio::time::Instant;

use super::{Host, MigrateError};
use crate::backend::mongo::MongoDatabase;
use crate::backend::mongo::ejson::geo_point;
use crate::backend::mongo::fence::{FENCE_GRACE, MIGRATIONS};
use crate::backend::{BackendError, DatabaseBackend};
use crate::geo::{self, Region};

/// Deadline of one call to a shard during a migration.
const CALL: Duration = Duration::from_secs(60);
/// Documents per insert or delete command.
const CHUNK: usize = 500;

/// One MongoDB database moved between two shards.
#[derive(Clone)]
pub(super) struct DocPair {
    pub db: String,
    /// (collection, geo_field)
    pub collections: Vec<(String, String)>,
    pub source: String,
    pub target: String,
}

fn deadline() -> Instant {
    Instant::now() + CALL
}

impl MigrateError {
    /// A failed MongoDB call of `step` on `shard`, keeping the server's message and code.
    fn mongo(step: &str, shard: &str, e: BackendError) -> Self {
        match e {
            BackendError::Unavailable { .. } | BackendError::ReadOnly { .. } | BackendError::Overloaded { .. } => {
                MigrateError::ShardUnavailable { shard: shard.to_string(), reason: e.to_string() }
            }
            BackendError::Timeout => {
                MigrateError::ShardUnavailable { shard: shard.to_string(), reason: format!("{step} timed out") }
            }
            BackendError::Server { code, message } => MigrateError::Database {
                step: step.to_string(),
                sqlstate: None,
                message: format!("{message} (code {code})"),
            },
            other => MigrateError::Database { step: step.to_string(), sqlstate: None, message: other.to_string() },
        }
    }
}

/// The database `db` of `shard` in the serving snapshot.
fn database(state: &dyn Host, shard: &str, db: &str) -> Result<Arc<MongoDatabase>, MigrateError> {
    let snap = state.pin();
    let idx =
        snap.map.shard_idx(shard).ok_or_else(|| MigrateError::InvalidRequest(format!("unknown shard {shard}")))?;
    match snap.backends.shards[idx.get()].get(db) {
        Some(DatabaseBackend::Mongo(m)) => Ok(m.clone()),
        _ => Err(MigrateError::InvalidRequest(format!("shard {shard} has no MongoDB database {db}"))),
    }
}

/// Is the document's location inside one of `cells` (the resolution-15 parent rule)?
fn inside(d: &Document, field: &str, cells: &[CellIndex]) -> bool {
    match geo_point(d, field) {
        Ok(Some(Region::Point(p))) => {
            let c = geo::point_cell(p);
            cells.iter().any(|m| c.parent(m.resolution()) == Some(*m))
        }
        _ => false,
    }
}

/// The documents of `coll` located in `cells`. Reads the whole collection: the peers offer no
/// index that answers "inside these H3 cells" (docs/migrations.md says what this costs).
async fn in_cells(
    m: &MongoDatabase,
    shard: &str,
    coll: &str,
    field: &str,
    cells: &[CellIndex],
) -> Result<Vec<Document>, MigrateError> {
    let all = m
        .primary_find(coll, doc! {}, deadline())
        .await
        .map_err(|e| MigrateError::mongo(&format!("reading {coll}"), shard, e))?;
    Ok(all.into_iter().filter(|d| inside(d, field, cells)).collect())
}

/// `_id` as a map key (canonical Extended JSON: one text per value and type).
fn key(d: &Document) -> String {
    d.get("_id").cloned().unwrap_or(Bson::Null).into_canonical_extjson().to_string()
}

/// Equal as stored: same fields, values and order (`Document`'s `==` ignores order).
fn same(a: &Document, b: &Document) -> bool {
    matches!((a.to_vec(), b.to_vec()), (Ok(x), Ok(y)) if x == y)
}

/// Make the target's documents in `cells` equal to the source's: missing ones inserted,
/// changed ones replaced, extra ones deleted. Returns how many documents the cells hold.
pub(super) async fn sync(state: &dyn Host, pairs: &[DocPair], cells: &[CellIndex]) -> Result<u64, MigrateError> {
    let mut total = 0u64;
    for p in pairs {
        let (src, dst) = (database(state, &p.source, &p.db)?, database(state, &p.target, &p.db)?);
        for (coll, field) in &p.collections {
            let s = in_cells(&src, &p.source, coll, field, cells).await?;
            let t = in_cells(&dst, &p.target, coll, field, cells).await?;
            total += s.len() as u64;
            let mut there: HashMap<String, Document> = t.into_iter().map(|d| (key(&d), d)).collect();
            let mut missing = Vec::new();
            let mut changed = Vec::new();
            for d in s {
                match there.remove(&key(&d)) {
                    None => missing.push(d),
                    Some(t) if !same(&t, &d) => changed.push(d),
                    Some(_) => {}
                }
            }
            let step = format!("copying {}.{coll}", p.db);
            for chunk in missing.chunks(CHUNK) {
                dst.primary_insert_unordered(coll, chunk, deadline())
                    .await
                    .map_err(|e| MigrateError::mongo(&step, &p.target, e))?;
            }
            for d in changed {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                dst.primary_replace(coll, doc! {"_id": id}, d, deadline())
                    .await
                    .map_err(|e| MigrateError::mongo(&step, &p.target, e))?;
            }
            // Left on the target: deleted on the source since the last pass.
            let extra: Vec<Bson> = there.into_values().map(|d| d.get("_id").cloned().unwrap_or(Bson::Null)).collect();
            for chunk in extra.chunks(CHUNK) {
                dst.primary_delete_many(coll, doc! {"_id": {"$in": chunk.to_vec()}}, deadline())
                    .await
                    .map_err(|e| MigrateError::mongo(&step, &p.target, e))?;
            }
        }
    }
    Ok(total)
}

/// Delete the documents of `cells` from one side (the target's leftovers at setup and in an
/// undo, the source's after the publish).
async fn remove(
    state: &dyn Host,
    shard: &str,
    p: &DocPair,
    cells: &[CellIndex],
    step: &str,
) -> Result<(), MigrateError> {
    let m = database(state, shard, &p.db)?;
    for (coll, field) in &p.collections {
        let ids: Vec<Bson> = in_cells(&m, shard, coll, field, cells)
            .await?
            .into_iter()
            .map(|d| d.get("_id").cloned().unwrap_or(Bson::Null))
            .collect();
        for chunk in ids.chunks(CHUNK) {
            m.primary_delete_many(coll, doc! {"_id": {"$in": chunk.to_vec()}}, deadline())
                .await
                .map_err(|e| MigrateError::mongo(&format!("{step} {}.{coll}", p.db), shard, e))?;
        }
    }
    Ok(())
}

/// 1. Setup: leftovers of the cells on the target (it does not own them) are removed.
pub(super) async fn setup(state: &dyn Host, pairs: &[DocPair], cells: &[CellIndex]) -> Result<(), MigrateError> {
    for p in pairs {
        remove(state, &p.target, p, cells, "target cleanup of").await?;
    }
    Ok(())
}

/// 4b. Fence the source's cells, then wait the grace: every write that passed a fence read
/// before the fence is acknowledged within it (or re-checks), so the final copy carries it.
pub(super) async fn fence(
    state: &dyn Host,
    pairs: &[DocPair],
    id: &str,
    cells: &[CellIndex],
    version: u64,
) -> Result<(), MigrateError> {
    for p in pairs {
        let src = database(state, &p.source, &p.db)?;
        src.put_fences(id, cells, version, deadline()).await.map_err(|e| MigrateError::mongo("fence", &p.source, e))?;
    }
    if !pairs.is_empty() {
        tokio::time::sleep(FENCE_GRACE).await;
    }
    Ok(())
}

pub(super) async fn set_fence_version(
    state: &dyn Host,
    pairs: &[DocPair],
    id: &str,
    version: u64,
) -> Result<(), MigrateError> {
    for p in pairs {
        let src = database(state, &p.source, &p.db)?;
        src.set_fence_version(id, version, deadline())
            .await
            .map_err(|e| MigrateError::mongo("fence version", &p.source, e))?;
    }
    Ok(())
}

/// 4c. The target lifts a fence it may hold on the cells from an earlier move away.
pub(super) async fn lift_target(state: &dyn Host, pairs: &[DocPair], cells: &[CellIndex]) -> Result<(), MigrateError> {
    for p in pairs {
        let dst = database(state, &p.target, &p.db)?;
        dst.lift_fences_of_cells(cells, deadline())
            .await
            .map_err(|e| MigrateError::mongo("lift target fence", &p.target, e))?;
    }
    Ok(())
}

/// 5. After the publish: the moved documents leave the source (its fence stays).
pub(super) async fn finish(state: &dyn Host, pairs: &[DocPair], cells: &[CellIndex]) -> Result<(), MigrateError> {
    for p in pairs {
        remove(state, &p.source, p, cells, "removing moved documents of").await?;
    }
    Ok(())
}

/// Undo before the publish: copies removed from the target, the source's fence lifted.
pub(super) async fn undo(
    state: &dyn Host,
    pairs: &[DocPair],
    id: &str,
    cells: &[CellIndex],
) -> Result<(), MigrateError> {
    for p in pairs {
        remove(state, &p.target, p, cells, "removing copied documents of").await?;
        let src = database(state, &p.source, &p.db)?;
        src.lift_fences_of_migration(id, deadline())
            .await
            .map_err(|e| MigrateError::mongo("lift source fence", &p.source, e))?;
    }
    Ok(())
}

/// Persist the record on both sides (`cellgate_migrations`), as the JSON text `recover` reads.
pub(super) async fn persist(
    state: &dyn Host,
    pairs: &[DocPair],
    id: &str,
    state_name: &str,
    json: &str,
) -> Result<(), MigrateError> {
    for p in pairs {
        for shard in [&p.source, &p.target] {
            let m = database(state, shard, &p.db)?;
            // Keyed by `id`, not `_id`: some servers take only ObjectIds there (CongoDB).
            m.primary_replace(
                MIGRATIONS,
                doc! {"id": id},
                doc! {"id": id, "state": state_name, "doc": json},
                deadline(),
            )
            .await
            .map_err(|e| MigrateError::mongo("persist progress", shard, e))?;
        }
    }
    Ok(())
}

/// The unfinished migration records of every MongoDB database in the map (after a crash).
pub(super) async fn unfinished(state: &dyn Host) -> Vec<super::Doc> {
    let snap = state.pin();
    let dbs: Vec<Arc<MongoDatabase>> = snap
        .backends
        .shards
        .iter()
        .flat_map(|s| s.values())
        .filter_map(|b| match b {
            DatabaseBackend::Mongo(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    drop(snap);
    let reads = dbs.into_iter().map(|m| async move {
        let filter = doc! {"state": {"$nin": ["done", "aborted", "failed"]}};
        let docs = m.primary_find(MIGRATIONS, filter, Instant::now() + Duration::from_secs(3)).await.ok()?;
        Some(
            docs.into_iter()
                .filter_map(|d| serde_json::from_str(d.get_str("doc").ok()?).ok())
                .collect::<Vec<super::Doc>>(),
        )
    });
    futures_util::future::join_all(reads).await.into_iter().flatten().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_belong_to_the_cell_of_their_resolution_15_cell() {
        let lat_lng = h3o::LatLng::new(40.4168, -3.7038).unwrap();
        let cell = geo::point_cell(lat_lng).parent(h3o::Resolution::Five).unwrap();
        let d = doc! {"loc": {"type": "Point", "coordinates": [-3.7038, 40.4168]}};
        assert!(inside(&d, "loc", &[cell]));
        assert!(inside(&d, "loc", &[cell.parent(h3o::Resolution::Zero).unwrap()]));
        assert!(!inside(&d, "other", &[cell]), "no location: never moved");
        let far = doc! {"loc": {"type": "Point", "coordinates": [139.69, 35.68]}};
        assert!(!inside(&far, "loc", &[cell]));
        assert_eq!(key(&doc! {"_id": 7}), key(&doc! {"_id": 7}));
        assert_ne!(key(&doc! {"_id": 7}), key(&doc! {"_id": "7"}));
        assert_ne!(key(&doc! {"_id": 7}), key(&doc! {"_id": 7i64}));
        assert!(!same(&doc! {"a": 1, "b": 2}, &doc! {"b": 2, "a": 1}));
    }
}
