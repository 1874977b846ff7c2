//! Routing benchmarks (criterion): point routes on the demo map and on a synthetic 1M-cell map
//! (assignment hit and fallback), and an area of about three cell widths → shard set.
//! Run: cargo bench --bench route
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

use std::hint::black_box;

use cellgate::geo::{self, Area, Region};
use cellgate::routing;
use cellgate::shardmap::{ShardMap, compile_str};
use cellgate::synth::{SynthSpec, generate_toml, read_cities};
use criterion::{Criterion, criterion_group, criterion_main};

fn demo() -> ShardMap {
    compile_str(&std::fs::read_to_string("shard-maps/demo.toml").unwrap()).unwrap()
}

fn million() -> ShardMap {
    let cities = read_cities(&std::fs::read_to_string("tests/data/cities15000.csv").unwrap()).unwrap();
    let spec = SynthSpec { cells: 1_000_000, shards: 16, resolution: 7, fallback_resolution: 2 };
    let map = compile_str(&generate_toml(&spec, &cities)).unwrap();
    assert!(map.assigned_count() >= 1_000_000, "{}", map.assigned_count());
    map
}

fn route_point(map: &ShardMap, lat: f64, lng: f64) -> Option<usize> {
    let region = geo::region(Some(lat), Some(lng), None, None, map.resolution()).unwrap();
    match routing::route_region(map, &region).unwrap() {
        routing::RegionRoute::One(r) => Some(r.shard.get()),
        routing::RegionRoute::Many(_) => None,
    }
}

fn bench(c: &mut Criterion) {
    let demo = demo();
    let big = million();
    // Madrid hits an assignment; the mid-Pacific point falls back to the hash ring.
    let (hit, miss) = ((40.4168, -3.7038), (0.0, -140.0));
    assert!(matches!(
        routing::locate(&big, geo::owning_cell(geo::point(hit.0, hit.1).unwrap(), big.resolution())).unwrap().rule,
        routing::Rule::Assign(_)
    ));
    assert_eq!(
        routing::locate(&big, geo::owning_cell(geo::point(miss.0, miss.1).unwrap(), big.resolution())).unwrap().rule,
        routing::Rule::FallbackHash
    );

    let mut g = c.benchmark_group("point_route");
    g.bench_function("demo/assign", |b| b.iter(|| route_point(&demo, black_box(hit.0), black_box(hit.1))));
    g.bench_function("demo/fallback", |b| b.iter(|| route_point(&demo, black_box(miss.0), black_box(miss.1))));
    g.bench_function("1m/assign", |b| b.iter(|| route_point(&big, black_box(hit.0), black_box(hit.1))));
    g.bench_function("1m/fallback", |b| b.iter(|| route_point(&big, black_box(miss.0), black_box(miss.1))));
    let cell = geo::owning_cell(geo::point(hit.0, hit.1).unwrap(), big.resolution());
    g.bench_function("1m/cell_lookup_only", |b| b.iter(|| routing::locate(&big, black_box(cell))));
    g.finish();

    let mut g = c.benchmark_group("area_route");
    for (name, map) in [("demo", &demo), ("1m", &big)] {
        // ≈ 3 cell widths at R (a cell is about two edge lengths across).
        let radius = 3.0 * 2.0 * map.resolution().edge_length_km();
        let area = Region::Area(Area::Disk { center: geo::point(hit.0, hit.1).unwrap(), radius_km: radius });
        g.bench_function(format!("{name}/r{radius:.0}km"), |b| b.iter(|| routing::route_region(map, black_box(&area))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
