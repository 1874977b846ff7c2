//! Routing: owning cell → shard by longest-prefix over the H3 hierarchy, then the fallback.
//! Pure and synchronous; the hot path allocates nothing for points.

use std::collections::BTreeMap;

use h3o::{CellIndex, Resolution};

use crate::geo::{self, Area, Region};
use crate::ids::ShardIdx;
use crate::shardmap::{Fallback, ShardMap};

/// Which rule decided a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// An `[[assign]]` cell (the owning cell or one of its parents).
    Assign(CellIndex),
    FallbackHash,
    FallbackReject,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Assign(c) => write!(f, "assign:{c}"),
            Rule::FallbackHash => f.write_str("fallback:hash"),
            Rule::FallbackReject => f.write_str("fallback:reject"),
        }
    }
}

/// Where one owning cell goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The owning cell at the map resolution R.
    pub cell: CellIndex,
    pub shard: Option<ShardIdx>,
    pub rule: Rule,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no shard owns cell {0} (fallback mode is reject)")]
    NoShard(CellIndex),
    #[error("cell {cell} is coarser than the map resolution {resolution}: it is an area")]
    CellIsArea { cell: CellIndex, resolution: u8 },
}

/// Look up the owner of an owning cell at R (or finer: its parent at R is used).
/// Longest prefix first: R, R-1, ..., 0; only levels that have assignments are probed.
pub fn locate(map: &ShardMap, cell: CellIndex) -> Result<Route, RouteError> {
    let r = map.resolution();
    if cell.resolution() < r {
        return Err(RouteError::CellIsArea { cell, resolution: r.into() });
    }
    let owning = cell.parent(r).expect("resolution checked");
    let mut res = Some(r);
    while let Some(level) = res {
        if map.has_level(level) {
            let c = owning.parent(level).expect("level <= r");
            if let Some(s) = map.assigned(u64::from(c)) {
                return Ok(Route { cell: owning, shard: Some(s), rule: Rule::Assign(c) });
            }
        }
        res = level.pred();
    }
    Ok(match map.fallback() {
        Fallback::Hash { resolution, ring, .. } => {
            let key = owning.parent(*resolution).expect("fallback resolution <= R");
            Route { cell: owning, shard: Some(ring.lookup(u64::from(key))), rule: Rule::FallbackHash }
        }
        Fallback::Reject => Route { cell: owning, shard: None, rule: Rule::FallbackReject },
    })
}

/// A route whose shard is known: what [`route`] returns, so callers need no `expect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// The owning cell at the map resolution R.
    pub cell: CellIndex,
    pub shard: ShardIdx,
    pub rule: Rule,
}

/// Route a location cell to its shard, or `NoShard`.
pub fn route(map: &ShardMap, cell: CellIndex) -> Result<Owned, RouteError> {
    let r = locate(map, cell)?;
    match r.shard {
        Some(shard) => Ok(Owned { cell: r.cell, shard, rule: r.rule }),
        None => Err(RouteError::NoShard(r.cell)),
    }
}

/// The shards owning any part of an area, each with the cells (at the cover resolution)
/// that led to it. Deterministic order (by shard index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaRoute {
    pub shards: Vec<(ShardIdx, Vec<CellIndex>)>,
    /// Number of cells at R the area was covered with (an upper bound for disks: the
    /// cover includes a safety ring).
    pub cells_at_r: u64,
}

/// Cells above which a disk is covered at a coarser resolution than R.
pub const AREA_COVER_BUDGET: f64 = 4096.0;

/// Route an area. A superset of the true owners may be returned (never a subset): asking a
/// shard that owns nothing of the area costs a query, missing one loses rows.
pub fn route_area(map: &ShardMap, area: &Area) -> AreaRoute {
    let r = map.resolution();
    let (cover, cover_res) = match *area {
        Area::Cell(c) => (vec![c], c.resolution()),
        Area::Disk { center, radius_km } => {
            let res = geo::cover_resolution(radius_km, r, AREA_COVER_BUDGET);
            (geo::disk_cover(center, radius_km, res), res)
        }
    };
    let mut by_shard: BTreeMap<ShardIdx, Vec<CellIndex>> = BTreeMap::new();
    let mut cells_at_r = 0u64;
    for c in cover {
        cells_at_r += c.children_count(r);
        if cover_res >= r {
            if let Ok(Route { shard: Some(s), .. }) = locate(map, c) {
                by_shard.entry(s).or_default().push(c);
            }
        } else {
            let mut owners = Vec::new();
            owners_under(map, c, &mut owners);
            owners.sort_unstable();
            owners.dedup();
            for s in owners {
                by_shard.entry(s).or_default().push(c);
            }
        }
    }
    AreaRoute { shards: by_shard.into_iter().collect(), cells_at_r }
}

/// Every shard that may own a descendant at R of the coarse cell `c` (resolution < R):
/// the owner of `c` by longest prefix (for descendants no finer assignment covers) plus
/// the owners of assignments strictly inside `c`.
pub fn owners_under(map: &ShardMap, c: CellIndex, out: &mut Vec<ShardIdx>) {
    let r = map.resolution();
    let cr = c.resolution();
    // (a) The prefix owner: the nearest assigned ancestor-or-self.
    let mut prefix = None;
    let mut res = Some(cr);
    while let Some(level) = res {
        if map.has_level(level)
            && let Some(s) = map.assigned(u64::from(c.parent(level).expect("level <= cr")))
        {
            prefix = Some(s);
            break;
        }
        res = level.pred();
    }
    match prefix {
        Some(s) => out.push(s),
        None => fallback_owners(map, c, out),
    }
    // (b) Assignments strictly below c: descendants at one resolution form a contiguous
    // index range, from the first child to the last.
    for level in Resolution::range(cr, r).skip(1) {
        if !map.has_level(level) {
            continue;
        }
        let n = c.children_count(level);
        let lo = c.child_at(0, level).expect("child 0 exists");
        let hi = c.child_at(n - 1, level).expect("last child exists");
        out.extend(map.assigned_in_range(level, u64::from(lo), u64::from(hi)).iter().map(|(_, s)| *s));
    }
}

/// Fallback owners of the descendants of `c` that no assignment covers.
fn fallback_owners(map: &ShardMap, c: CellIndex, out: &mut Vec<ShardIdx>) {
    if let Fallback::Hash { shards, resolution, ring, .. } = map.fallback() {
        if *resolution <= c.resolution() {
            out.push(ring.lookup(u64::from(c.parent(*resolution).expect("coarser"))));
        } else if c.children_count(*resolution) <= 4096 {
            out.extend(c.children(*resolution).map(|k| ring.lookup(u64::from(k))));
        } else {
            out.extend(shards.iter().copied());
        }
    }
}

/// Route any region: points and cells give one shard, areas a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionRoute {
    One(Owned),
    Many(AreaRoute),
}

pub fn route_region(map: &ShardMap, region: &Region) -> Result<RegionRoute, RouteError> {
    let r = map.resolution();
    match region {
        Region::Point(p) => route(map, geo::owning_cell(*p, r)).map(RegionRoute::One),
        Region::Cell(c) => route(map, *c).map(RegionRoute::One),
        Region::Area(a) => Ok(RegionRoute::Many(route_area(map, a))),
    }
}
