//! The `locate` answer: where a region routes (owning cell, shard, rule; or an area's cells and
//! shards) as JSON. One function, called by both the CLI (`cellgate locate`) and the admin API
//! (`GET /admin/locate`), so they cannot disagree. Pure.

use crate::geo::{self, Region};
use crate::routing::{self, RegionRoute};
use crate::shardmap::ShardMap;

/// The `locate` answer for `region` on `map`.
pub fn locate_json(map: &ShardMap, region: &Region) -> serde_json::Value {
    let r = map.resolution();
    let shard_name = |s: Option<crate::ids::ShardIdx>| s.map(|s| map.shard(s).id.to_string());
    match region {
        Region::Point(_) | Region::Cell(_) => {
            let cell = match region {
                Region::Point(p) => geo::point_cell(*p),
                Region::Cell(c) => *c,
                Region::Area(_) => unreachable!("matched above"),
            };
            let route = routing::locate(map, cell).expect("location cells are at or below R");
            let mut v = serde_json::json!({
                "cell": route.cell.to_string(),
                "resolution": u8::from(r),
                "shard": shard_name(route.shard),
                "rule": route.rule.to_string(),
            });
            if let Region::Point(_) = region {
                v["point_cell"] = serde_json::Value::String(cell.to_string());
            }
            v
        }
        Region::Area(_) => match routing::route_region(map, region) {
            Ok(RegionRoute::Many(a)) => serde_json::json!({
                "cells": a.cells_at_r,
                "shards": a.shards.iter().map(|(s, _)| map.shard(*s).id.to_string()).collect::<Vec<_>>(),
            }),
            _ => unreachable!("areas route to many"),
        },
    }
}
