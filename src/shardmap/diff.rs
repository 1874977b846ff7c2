//! Which cells change owner between two maps, grouped by (from → to), as the smallest set of
//! compacted cells with counts at the new map's resolution. Pure.

use std::collections::BTreeMap;

use h3o::{CellIndex, Resolution};

use super::{Fallback, ShardMap};
use crate::routing;

/// Owner names: `None` means no shard (reject fallback).
pub type Owner = Option<String>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Move {
    /// Compacted cells (mixed resolutions, each <= R).
    pub cells: Vec<CellIndex>,
    /// How many cells at R those stand for.
    pub count_at_r: u64,
}

/// (from, to) → the cells that move, at the finer of the two maps' resolutions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapDiff {
    pub resolution: u8,
    pub moves: BTreeMap<(Owner, Owner), Move>,
}

enum Outcome {
    /// Every descendant at R has this (old, new) owner pair.
    Uniform(Owner, Owner),
    Mixed,
}

/// Compare two maps over the whole globe. Walks the H3 tree from the 122 base cells and
/// descends only where either map has an assignment below the node, or where hash fallback
/// decides at a finer level; everywhere else ownership is uniform under the node.
pub fn diff(old: &ShardMap, new: &ShardMap) -> MapDiff {
    // Maps of different resolutions compare at the finer one: a coarser map decides a finer
    // cell by its parent, so ownership is defined there for both.
    let r = old.resolution().max(new.resolution());
    let mut out = MapDiff { resolution: r.into(), moves: BTreeMap::new() };
    for base in CellIndex::base_cells() {
        if let Outcome::Uniform(a, b) = walk(old, new, base, r, &mut out) {
            emit(&mut out, base, a, b, r);
        }
    }
    out
}

fn emit(out: &mut MapDiff, c: CellIndex, a: Owner, b: Owner, r: Resolution) {
    if a != b {
        let m = out.moves.entry((a, b)).or_default();
        m.cells.push(c);
        m.count_at_r += c.children_count(r);
    }
}

fn needs_descent(map: &ShardMap, c: CellIndex, r: Resolution) -> bool {
    for level in Resolution::range(c.resolution(), r).skip(1) {
        if map.has_level(level) {
            let n = c.children_count(level);
            let lo = u64::from(c.child_at(0, level).expect("child"));
            let hi = u64::from(c.child_at(n - 1, level).expect("child"));
            if !map.assigned_in_range(level, lo, hi).is_empty() {
                return true;
            }
        }
    }
    // Hash fallback finer than c: descendants may hash to different shards.
    matches!(map.fallback(), Fallback::Hash { resolution, .. } if *resolution > c.resolution())
        && prefix_owner(map, c).is_none()
}

fn prefix_owner(map: &ShardMap, c: CellIndex) -> Option<String> {
    let mut res = Some(c.resolution());
    while let Some(level) = res {
        if let Some(s) = map.assigned(u64::from(c.parent(level).expect("coarser"))) {
            return Some(map.shard(s).id.to_string());
        }
        res = level.pred();
    }
    None
}

/// Owner of all of c's descendants, when uniform (checked by the caller).
fn uniform_owner(map: &ShardMap, c: CellIndex, r: Resolution) -> Owner {
    if let Some(s) = prefix_owner(map, c) {
        return Some(s);
    }
    // Uniform under c: the fallback decides at c's level or coarser; route the center child.
    let probe = c.center_child(r).expect("c is at or above R");
    routing::locate(map, probe).ok().and_then(|rt| rt.shard).map(|s| map.shard(s).id.to_string())
}

fn walk(old: &ShardMap, new: &ShardMap, c: CellIndex, r: Resolution, out: &mut MapDiff) -> Outcome {
    if c.resolution() == r || (!needs_descent(old, c, r) && !needs_descent(new, c, r)) {
        return Outcome::Uniform(uniform_owner(old, c, r), uniform_owner(new, c, r));
    }
    let child_res = c.resolution().succ().expect("c is coarser than R");
    let results: Vec<(CellIndex, Outcome)> = c.children(child_res).map(|k| (k, walk(old, new, k, r, out))).collect();
    // Compaction: a node whose children all agree is reported as the node itself.
    let first = match &results[0].1 {
        Outcome::Uniform(a, b) => Some((a.clone(), b.clone())),
        Outcome::Mixed => None,
    };
    let all_same = first.is_some()
        && results
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Uniform(a, b) if Some((a, b)) == first.as_ref().map(|(x, y)| (x, y))));
    if all_same {
        let (a, b) = first.expect("checked");
        return Outcome::Uniform(a, b);
    }
    for (k, o) in results {
        if let Outcome::Uniform(a, b) = o {
            emit(out, k, a, b, r);
        }
    }
    Outcome::Mixed
}
