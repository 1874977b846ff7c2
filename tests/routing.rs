//! Routing: table tests, the golden fixture (Uber's h3 4.5.0), and properties over the demo map.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

use std::collections::HashSet;

use cellgate::geo::{self, Area, Region};
use cellgate::routing::{self, RegionRoute, Rule};
use cellgate::shardmap::{ShardMap, parse_and_compile};
use h3o::{CellIndex, LatLng, Resolution};
use proptest::prelude::*;

fn demo() -> &'static ShardMap {
    static MAP: std::sync::OnceLock<ShardMap> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/shard-maps/demo.toml")).unwrap();
        parse_and_compile(&src, |_| None).unwrap()
    })
}

const SMALL: &str = r#"
version = 1
resolution = 5
[[shards]]
id = "a"
[[shards]]
id = "b"
[[shards]]
id = "c"
[[assign]]
shard = "a"
cells = ["8039fffffffffff"]          # res 0: Iberia and around
[[assign]]
shard = "b"
cells = ["82390ffffffffff"]          # res 2 inside it: more specific wins
[[assign]]
shard = "c"
cells = ["85390cb3fffffff"]          # res 5 (Madrid) inside that
"#;

fn small(fallback: &str) -> ShardMap {
    parse_and_compile(&format!("{SMALL}{fallback}"), |_| None).unwrap()
}

fn cell(s: &str) -> CellIndex {
    s.parse().unwrap()
}

#[test]
fn longest_prefix_table() {
    let m = small("[fallback]\nmode = \"hash\"\nshards = [\"a\", \"b\"]\nresolution = 2\n");
    let name = |r: routing::Route| r.shard.map(|s| m.shard(s).id.to_string());
    // (location cell, expected shard, expected rule)
    let cases = [
        ("85390cb3fffffff", Some("c"), Rule::Assign(cell("85390cb3fffffff"))),
        ("8a390cb1a4dffff", None, Rule::Assign(cell("85390cb3fffffff"))), // finer cell: parent at 5 decides
        ("85390803fffffff", Some("b"), Rule::Assign(cell("82390ffffffffff"))),
        ("85380003fffffff", Some("a"), Rule::Assign(cell("8039fffffffffff"))),
        ("851fb467fffffff", None, Rule::FallbackHash),
    ];
    for (loc, shard, rule) in cases {
        let r = routing::locate(&m, cell(loc)).unwrap();
        assert_eq!(r.rule, rule, "{loc}");
        if let Some(s) = shard {
            assert_eq!(name(r).as_deref(), Some(s), "{loc}");
        }
        assert_eq!(r.cell.resolution(), Resolution::Five);
    }
    // A cell coarser than R is an area, not a location.
    assert!(routing::locate(&m, cell("8039fffffffffff")).is_err());
}

#[test]
fn reject_mode_has_no_shard() {
    let m = small("[fallback]\nmode = \"reject\"\n");
    let r = routing::locate(&m, cell("851fb467fffffff")).unwrap();
    assert_eq!((r.shard, r.rule), (None, Rule::FallbackReject));
    assert!(matches!(routing::route(&m, cell("851fb467fffffff")), Err(routing::RouteError::NoShard(_))));
    // No [fallback] at all is reject as well.
    let m = small("");
    assert_eq!(routing::locate(&m, cell("851fb467fffffff")).unwrap().rule, Rule::FallbackReject);
}

#[test]
fn area_of_coarse_cell_finds_inner_assignments() {
    let m = small("[fallback]\nmode = \"reject\"\n");
    let a = routing::route_area(&m, &Area::Cell(cell("8039fffffffffff")));
    let names: Vec<_> = a.shards.iter().map(|(s, _)| m.shard(*s).id.to_string()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(a.cells_at_r, cell("8039fffffffffff").children_count(Resolution::Five));
}

struct Golden {
    lat: f64,
    lng: f64,
    cell15: String,
    parents: [(Resolution, String); 5],
}

fn golden() -> Vec<Golden> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/cities_golden.csv")).unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let headers = rdr.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (lat, lng, c15) = (col("lat"), col("lng"), col("cell15"));
    let pcols =
        [(0u8, col("parent0")), (2, col("parent2")), (3, col("parent3")), (5, col("parent5")), (7, col("parent7"))];
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            Golden {
                lat: r[lat].parse().unwrap(),
                lng: r[lng].parse().unwrap(),
                cell15: r[c15].to_string(),
                parents: pcols.map(|(res, i)| (Resolution::try_from(res).unwrap(), r[i].to_string())),
            }
        })
        .collect()
}

#[test]
fn golden_cities_match_uber_h3() {
    let g = golden();
    assert!(g.len() >= 1000, "fixture has {} points", g.len());
    let mut direct_differs = 0;
    for p in &g {
        let ll = geo::point(p.lat, p.lng).unwrap();
        assert_eq!(geo::point_cell(ll).to_string(), p.cell15, "cell15 of {} {}", p.lat, p.lng);
        for (res, want) in &p.parents {
            assert_eq!(geo::owning_cell(ll, *res).to_string(), *want, "owning cell at {res} of {} {}", p.lat, p.lng);
            if ll.to_cell(*res).to_string() != *want {
                direct_differs += 1;
            }
        }
    }
    // The fixture exists because H3 is not nested: the direct cell must differ somewhere.
    assert!(direct_differs > 0);
}

#[test]
fn golden_routes_through_locate_json() {
    let m = demo();
    for p in golden() {
        let ll = geo::point(p.lat, p.lng).unwrap();
        let v = cellgate::locate::locate_json(m, &Region::Point(ll));
        assert_eq!(v["cell"], p.parents[3].1, "{} {}", p.lat, p.lng);
        assert_eq!(v["point_cell"], p.cell15);
        assert!(v["shard"].is_string(), "demo map has hash fallback: every point has a shard");
    }
}

fn arb_point() -> impl Strategy<Value = LatLng> {
    (-90.0f64..=90.0, -180.0f64..=180.0).prop_map(|(a, b)| LatLng::new(a, b).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// Every cell at R has exactly one owner, and that owner is stable across calls.
    #[test]
    fn every_cell_has_one_owner(p in arb_point()) {
        let m = demo();
        let c = p.to_cell(m.resolution());
        let a = routing::route(m, c).unwrap();
        let b = routing::route(m, c).unwrap();
        prop_assert_eq!(a, b);
        // The owner is always set: `route` returns `Owned`, whose shard is not optional.
    }

    /// A point routes exactly like its resolution-15 cell and like any of its cells at >= R.
    #[test]
    fn point_route_equals_cell_route(p in arb_point(), res in 5u8..=15) {
        let m = demo();
        let via_point = routing::route_region(m, &Region::Point(p)).unwrap();
        let fine = geo::point_cell(p).parent(Resolution::try_from(res).unwrap()).unwrap();
        let via_cell = routing::route_region(m, &Region::Cell(fine)).unwrap();
        prop_assert_eq!(via_point, via_cell);
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// No owner is missing from an area: sample points inside the disk; each one's owning cell
    /// must be covered and its shard listed.
    #[test]
    fn area_covers_every_point(center in arb_point(), radius in 1.0f64..300.0, bearing in 0.0f64..360.0, frac in 0.0f64..1.0) {
        let m = demo();
        let r = m.resolution();
        let cover: HashSet<CellIndex> = geo::disk_cover(center, radius, r).into_iter().collect();
        let q = destination(center, bearing, radius * frac);
        prop_assume!(center.distance_km(q) <= radius);
        let owning = geo::owning_cell(q, r);
        prop_assert!(cover.contains(&owning), "owning cell {} of a point {} km away not covered", owning, center.distance_km(q));
        let RegionRoute::Many(a) = routing::route_region(m, &Region::Area(Area::Disk { center, radius_km: radius })).unwrap() else {
            panic!("area");
        };
        let owner = routing::route(m, owning).unwrap().shard;
        prop_assert!(a.shards.iter().any(|(s, _)| *s == owner));
    }

    /// Arbitrary input to the region parser never panics.
    #[test]
    fn region_parser_never_panics(lat in any::<f64>(), lng in any::<f64>(), cell in ".{0,40}", radius in proptest::option::of(any::<f64>())) {
        let _ = geo::region(Some(lat), Some(lng), None, radius, Resolution::Five);
        let _ = geo::region(None, None, Some(&cell), radius, Resolution::Five);
        let _ = geo::parse_cell(&cell);
    }

    /// Arbitrary text, and arbitrary bytes read as text, fed to the map compiler never panic.
    #[test]
    fn map_compiler_never_panics(text in ".{0,400}", bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_and_compile(&text, |_| None);
        let _ = parse_and_compile(&String::from_utf8_lossy(&bytes), |_| None);
        let mutated = format!("{SMALL}{text}");
        let _ = parse_and_compile(&mutated, |_| None);
    }
}

/// Point at `dist_km` from `p` along `bearing_deg` (spherical earth, as H3 uses).
fn destination(p: LatLng, bearing_deg: f64, dist_km: f64) -> LatLng {
    let r = 6371.007180918475;
    let (lat1, lng1) = (p.lat_radians(), p.lng_radians());
    let d = dist_km / r;
    let b = bearing_deg.to_radians();
    let lat2 = (lat1.sin() * d.cos() + lat1.cos() * d.sin() * b.cos()).asin();
    let lng2 = lng1 + (b.sin() * d.sin() * lat1.cos()).atan2(d.cos() - lat1.sin() * lat2.sin());
    let lng2 = (lng2 + 3.0 * std::f64::consts::PI).rem_euclid(2.0 * std::f64::consts::PI) - std::f64::consts::PI;
    LatLng::from_radians(lat2, lng2).unwrap()
}
