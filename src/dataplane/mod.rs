//! The data plane's policy floor: a parsed request (a *plan*) → rows or documents plus what the
//! request learned ([`Outcome`]). Owns consistency and read-your-writes tokens, replica choice and
//! fallback to the primary, the cutover hold and the fence retry, fan-out + merge, the per-shard
//! insert split, and the read cache as a step of reads (and version bumps around writes,
//! `cache.rs`). Knows nothing of HTTP: `http/` parses requests into plans and renders results;
//! errors are returned as [`ApiError`] and mapped to HTTP in `http::respond` only.

pub mod cache;
pub mod consistency;
pub mod docs;
pub mod hold;
pub mod merge;
pub mod sql;
pub mod statements;
pub mod warm;

use serde::Serialize;

use crate::backend::Role;
pub use crate::error::ApiError;
use crate::geo::{self, Region};
use crate::ids::ShardIdx;
use crate::routing::{self, Owned, RegionRoute, RouteError};
use crate::state::Snapshot;
pub use consistency::{Consistency, make_token, parse_token};

/// What the request span and metrics learn about a request.
#[derive(Default)]
pub struct Outcome {
    pub shard: Option<String>,
    pub role: Option<Role>,
    pub cell: Option<String>,
    /// The version of the snapshot the request pinned (the last one, after a fence retry).
    pub map_version: Option<u64>,
    /// What the read cache did (reads that opted in, or asked `only-if-cached`).
    pub cache: Option<cache::CacheStatus>,
}

impl Outcome {
    /// Record the shards a fan-out answered from ("multi" when more than one).
    fn note_shards(&mut self, infos: &[ShardInfo]) {
        self.shard = Some(if infos.len() == 1 { infos[0].id.clone() } else { "multi".into() });
        self.role = infos.first().map(|i| i.role);
    }
}

/// Which endpoint of which shard answered (part of every answer).
#[derive(Debug, Clone, Serialize)]
pub struct ShardInfo {
    pub id: String,
    pub role: Role,
    pub endpoint: String,
}

/// A request's location as the client gave it; resolved against the pinned map (whose
/// resolution decides the owning cell), so a write retried on a newer map resolves again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionSpec {
    pub lat: Option<f64>,
    pub lng: Option<f64>,
    pub cell: Option<String>,
    pub radius_km: Option<f64>,
}

impl RegionSpec {
    pub fn resolve(&self, snap: &Snapshot) -> Result<Region, ApiError> {
        geo::region(self.lat, self.lng, self.cell.as_deref(), self.radius_km, snap.map.resolution())
            .map_err(|e| ApiError::InvalidRegion(e.to_string()))
    }
}

/// The region a request must carry.
fn required(region: &Option<RegionSpec>) -> Result<&RegionSpec, ApiError> {
    region.as_ref().ok_or(ApiError::RegionRequired)
}

pub(crate) fn route_err(e: RouteError) -> ApiError {
    match e {
        RouteError::NoShard(c) => ApiError::NoShardForRegion(c.to_string()),
        RouteError::CellIsArea { .. } => ApiError::InvalidRegion(e.to_string()),
    }
}

/// The owning route of a write region (point or cell; an area is refused).
fn write_route(snap: &Snapshot, region: &Region) -> Result<Owned, ApiError> {
    match routing::route_region(&snap.map, region).map_err(route_err)? {
        RegionRoute::One(r) => Ok(r),
        RegionRoute::Many(_) => Err(ApiError::AreaWrite),
    }
}

/// The shards a read's route covers, in map order (the owning cell is noted for a point/cell).
fn route_shards(route: &RegionRoute, out: &mut Outcome) -> Result<Vec<ShardIdx>, ApiError> {
    match route {
        RegionRoute::One(r) => {
            out.cell = Some(r.cell.to_string());
            Ok(vec![r.shard])
        }
        RegionRoute::Many(area) => {
            if area.shards.is_empty() {
                return Err(ApiError::NoShardForRegion("(area: no shard owns any of it)".into()));
            }
            Ok(area.shards.iter().map(|(s, _)| *s).collect())
        }
    }
}

/// Is this failure worth retrying a read on the primary (the replica is gone or full)?
fn replica_retryable(e: &crate::backend::BackendError) -> bool {
    matches!(
        e.root(),
        crate::backend::BackendError::Unavailable { .. } | crate::backend::BackendError::Overloaded { .. }
    )
}
