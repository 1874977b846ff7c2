//! Synthetic shard maps for benchmarks: many assigned cells placed around real cities.
//! Writes TOML text only; never committed output.

use std::collections::HashSet;
use std::fmt::Write as _;

use h3o::{CellIndex, LatLng, Resolution};

/// Parameters of a synthetic map.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub cells: usize,
    pub shards: usize,
    pub resolution: u8,
    pub fallback_resolution: u8,
}

/// Generate a map with at least `spec.cells` assigned cells at `spec.resolution`: disks around the
/// given city points (in order), then, if the cities run out, rings further out. Shard `i` of
/// `spec.shards` gets cells round-robin by city so every shard holds hot and cold places.
/// Databases point at an unreachable loopback port: the map is for routing benchmarks.
pub fn generate_toml(spec: &SynthSpec, cities: &[(f64, f64)]) -> String {
    let res = Resolution::try_from(spec.resolution).expect("resolution 0..=15");
    let mut seen: HashSet<CellIndex> = HashSet::with_capacity(spec.cells * 2);
    let mut per_shard: Vec<Vec<CellIndex>> = vec![Vec::new(); spec.shards.max(1)];
    let mut k = 3u32;
    'outer: while seen.len() < spec.cells {
        for (i, (lat, lng)) in cities.iter().enumerate() {
            let Ok(p) = LatLng::new(*lat, *lng) else { continue };
            let center = p.to_cell(res);
            for c in center.grid_disk::<Vec<_>>(k) {
                if seen.insert(c) {
                    let n = per_shard.len();
                    per_shard[i % n].push(c);
                    if seen.len() >= spec.cells {
                        break 'outer;
                    }
                }
            }
        }
        k += 3;
        if k > 200 {
            break;
        }
    }
    let mut out = String::with_capacity(spec.cells * 20 + 1024);
    let _ = writeln!(out, "# synthetic map: {} assigned cells at resolution {}", seen.len(), spec.resolution);
    let _ = writeln!(out, "version = 1\nresolution = {}\n", spec.resolution);
    for s in 0..per_shard.len() {
        let _ = writeln!(out, "[[shards]]\nid = \"s{s}\"\nzone = \"synthetic\"");
        let _ = writeln!(out, "  [shards.databases.core]\n  kind = \"postgres\"");
        let _ = writeln!(out, "  primary = \"postgres://app@127.0.0.1:1/core\"\n  replicas = []\n");
    }
    for (s, cells) in per_shard.iter().enumerate() {
        let _ = writeln!(out, "[[assign]]\nshard = \"s{s}\"\ncells = [");
        for c in cells {
            let _ = writeln!(out, "\"{c}\",");
        }
        let _ = writeln!(out, "]\n");
    }
    let shards: Vec<String> = (0..per_shard.len()).map(|s| format!("\"s{s}\"")).collect();
    let _ = writeln!(
        out,
        "[fallback]\nmode = \"hash\"\nshards = [{}]\nresolution = {}",
        shards.join(", "),
        spec.fallback_resolution
    );
    out
}

/// Read `lat,lng` pairs from a cities CSV with `lat` and `lng` columns (the GeoNames extract).
pub fn read_cities(csv_text: &str) -> Result<Vec<(f64, f64)>, csv::Error> {
    #[derive(serde::Deserialize)]
    struct City {
        lat: f64,
        lng: f64,
    }
    let mut rdr = csv::Reader::from_reader(csv_text.as_bytes());
    rdr.deserialize::<City>().map(|r| r.map(|c| (c.lat, c.lng))).collect()
}
