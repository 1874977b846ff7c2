//! Region parsing (design §3: point, cell, area) and the one derivation of a point's owning cell.
//! Pure: turns JSON-shaped input into h3o cells; knows nothing of shards.

use std::collections::HashSet;

use h3o::{CellIndex, LatLng, Resolution};

/// Largest accepted area radius.
pub const MAX_RADIUS_KM: f64 = 2000.0;

/// A parsed request location.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Region {
    /// A point; its owning cell is the parent at R of its resolution-15 cell.
    Point(LatLng),
    /// A cell at resolution >= R; its parent at R owns it.
    Cell(CellIndex),
    /// Reads only: every shard owning part of the area is asked.
    Area(Area),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Area {
    Disk {
        center: LatLng,
        radius_km: f64,
    },
    /// A cell coarser than R: all of its descendants.
    Cell(CellIndex),
}

/// Why a region was refused. Each variant is a distinct client mistake.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegionError {
    #[error("{field} must be a finite number")]
    NotFinite { field: &'static str },
    #[error("lat must be within [-90, 90], got {0}")]
    LatOutOfRange(f64),
    #[error("lng must be within [-180, 180], got {0}")]
    LngOutOfRange(f64),
    #[error("radius_km must be in (0, {MAX_RADIUS_KM}], got {0}")]
    RadiusOutOfRange(f64),
    #[error("cell {0:?} is not a hexadecimal H3 index")]
    MalformedCell(String),
    #[error("cell {0:?} is not a valid H3 cell")]
    InvalidCell(String),
    #[error("region needs either lat and lng, or cell")]
    Incomplete,
    #[error("region takes lat/lng or cell, not both")]
    Ambiguous,
    #[error("radius_km applies to a lat/lng point, not to a cell")]
    RadiusWithCell,
}

/// Parse an H3 cell from its hex text (optionally `0x`-prefixed, any case).
pub fn parse_cell(text: &str) -> Result<CellIndex, RegionError> {
    let t = text.trim();
    let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RegionError::MalformedCell(truncate(text)));
    }
    let v = u64::from_str_radix(hex, 16).map_err(|_| RegionError::MalformedCell(truncate(text)))?;
    CellIndex::try_from(v).map_err(|_| RegionError::InvalidCell(truncate(text)))
}

/// Error messages echo at most 32 characters of client input.
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

fn finite(v: f64, field: &'static str) -> Result<f64, RegionError> {
    if v.is_finite() { Ok(v) } else { Err(RegionError::NotFinite { field }) }
}

/// Validate a point. NaN and infinities are refused before range checks.
pub fn point(lat: f64, lng: f64) -> Result<LatLng, RegionError> {
    let lat = finite(lat, "lat")?;
    let lng = finite(lng, "lng")?;
    if !(-90.0..=90.0).contains(&lat) {
        return Err(RegionError::LatOutOfRange(lat));
    }
    if !(-180.0..=180.0).contains(&lng) {
        return Err(RegionError::LngOutOfRange(lng));
    }
    LatLng::new(lat, lng).map_err(|_| RegionError::NotFinite { field: "lat/lng" })
}

/// Build a region from its parts (as they arrive in JSON). `r` is the map resolution: it decides
/// whether a cell is a location (res >= R) or an area (res < R).
pub fn region(
    lat: Option<f64>,
    lng: Option<f64>,
    cell: Option<&str>,
    radius_km: Option<f64>,
    r: Resolution,
) -> Result<Region, RegionError> {
    match (lat, lng, cell) {
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => Err(RegionError::Ambiguous),
        (None, None, Some(c)) => {
            if radius_km.is_some() {
                return Err(RegionError::RadiusWithCell);
            }
            let c = parse_cell(c)?;
            Ok(if c.resolution() < r { Region::Area(Area::Cell(c)) } else { Region::Cell(c) })
        }
        (Some(lat), Some(lng), None) => {
            let p = point(lat, lng)?;
            match radius_km {
                None => Ok(Region::Point(p)),
                Some(k) => {
                    let k = finite(k, "radius_km")?;
                    if k <= 0.0 || k > MAX_RADIUS_KM {
                        return Err(RegionError::RadiusOutOfRange(k));
                    }
                    Ok(Region::Area(Area::Disk { center: p, radius_km: k }))
                }
            }
        }
        _ => Err(RegionError::Incomplete),
    }
}

/// The resolution-15 cell of a point: the one fine cell every writer and the router agree on.
pub fn point_cell(p: LatLng) -> CellIndex {
    p.to_cell(Resolution::Fifteen)
}

/// The owning cell at `r` of a point: the parent at `r` of its resolution-15 cell (design §2).
/// Never `p.to_cell(r)`: H3 is not nested and the two differ for ~6 % of points.
pub fn owning_cell(p: LatLng, r: Resolution) -> CellIndex {
    point_cell(p).parent(r).expect("r <= 15")
}

/// The owning cell at `r` of a location cell (resolution >= r).
pub fn owning_cell_of(c: CellIndex, r: Resolution) -> Option<CellIndex> {
    c.parent(r)
}

/// Largest distance from a cell's center to its boundary, in km.
fn circumradius_km(c: CellIndex) -> f64 {
    let center = LatLng::from(c);
    c.boundary().iter().map(|v| center.distance_km(*v)).fold(0.0, f64::max)
}

/// Cells at `res` that may contain a point of the disk, plus one ring around them.
///
/// Superset guarantee: a cell meeting the disk has its center within `radius + circumradius`
/// of the disk center; the cells meeting a connected disk form a connected set containing
/// the center's cell, so a flood fill through cells passing that test reaches all of them.
/// The extra ring covers the hierarchy: the owning cell of a point (parent of its
/// resolution-15 cell) can be a neighbour of the cell that geometrically contains it.
pub fn disk_cover(center: LatLng, radius_km: f64, res: Resolution) -> Vec<CellIndex> {
    let start = center.to_cell(res);
    let mut inside: HashSet<CellIndex> = HashSet::new();
    let mut stack = vec![start];
    let mut seen: HashSet<CellIndex> = HashSet::from([start]);
    while let Some(c) = stack.pop() {
        let d = center.distance_km(LatLng::from(c));
        if c != start && d > radius_km + circumradius_km(c) {
            continue;
        }
        inside.insert(c);
        for n in c.grid_disk::<Vec<_>>(1) {
            if seen.insert(n) {
                stack.push(n);
            }
        }
    }
    let mut out: HashSet<CellIndex> = inside.clone();
    for c in &inside {
        out.extend(c.grid_disk::<Vec<_>>(1));
    }
    let mut v: Vec<CellIndex> = out.into_iter().collect();
    v.sort_unstable();
    v
}

/// Rough number of cells at `res` a disk cover needs; picks the cover resolution for areas.
pub fn estimate_cover_cells(radius_km: f64, res: Resolution) -> f64 {
    let edge = res.edge_length_km();
    let r = radius_km + 3.0 * edge;
    std::f64::consts::PI * r * r / res.area_km2()
}

/// The finest resolution <= `r` whose disk cover stays around `budget` cells.
pub fn cover_resolution(radius_km: f64, r: Resolution, budget: f64) -> Resolution {
    let mut res = r;
    while estimate_cover_cells(radius_km, res) > budget {
        match res.pred() {
            Some(p) => res = p,
            None => break,
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    const R5: Resolution = Resolution::Five;

    #[test]
    fn region_table() {
        use RegionError::*;
        let nan = f64::NAN;
        type Case<'a> = (Option<f64>, Option<f64>, Option<&'a str>, Option<f64>, Result<&'a str, RegionError>);
        let cases: Vec<Case<'_>> = vec![
            (Some(40.4168), Some(-3.7038), None, None, Ok("point")),
            (Some(90.0), Some(180.0), None, None, Ok("point")),
            (Some(-90.0), Some(-180.0), None, None, Ok("point")),
            (Some(90.0001), Some(0.0), None, None, Err(LatOutOfRange(90.0001))),
            (Some(0.0), Some(-180.5), None, None, Err(LngOutOfRange(-180.5))),
            (Some(nan), Some(0.0), None, None, Err(NotFinite { field: "lat" })),
            (Some(0.0), Some(f64::INFINITY), None, None, Err(NotFinite { field: "lng" })),
            (Some(0.0), Some(0.0), None, Some(25.0), Ok("area")),
            (Some(0.0), Some(0.0), None, Some(0.0), Err(RadiusOutOfRange(0.0))),
            (Some(0.0), Some(0.0), None, Some(2000.0), Ok("area")),
            (Some(0.0), Some(0.0), None, Some(2000.1), Err(RadiusOutOfRange(2000.1))),
            (Some(0.0), Some(0.0), None, Some(nan), Err(NotFinite { field: "radius_km" })),
            (None, None, Some("8a390cb1a4dffff"), None, Ok("cell")),
            (None, None, Some("0x8A390CB1A4DFFFF"), None, Ok("cell")),
            (None, None, Some("85390cb3fffffff"), None, Ok("cell")),
            (None, None, Some("831f8afffffffff"), None, Ok("area")),
            (None, None, Some("821f87fffffffff"), None, Ok("area")),
            (None, None, Some("zzz"), None, Err(MalformedCell("zzz".into()))),
            (None, None, Some(""), None, Err(MalformedCell(String::new()))),
            (None, None, Some("ffffffffffffffff"), None, Err(InvalidCell("ffffffffffffffff".into()))),
            (None, None, Some("8a390cb1a4dffff"), Some(3.0), Err(RadiusWithCell)),
            (Some(1.0), None, None, None, Err(Incomplete)),
            (None, None, None, None, Err(Incomplete)),
            (Some(1.0), Some(1.0), Some("8a390cb1a4dffff"), None, Err(Ambiguous)),
        ];
        for (lat, lng, cell, radius, want) in cases {
            let got = region(lat, lng, cell, radius, R5);
            let kind = got.map(|r| match r {
                Region::Point(_) => "point",
                Region::Cell(_) => "cell",
                Region::Area(_) => "area",
            });
            match (&kind, &want) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{lat:?} {lng:?} {cell:?} {radius:?}"),
                (Err(a), Err(b)) => assert_eq!(a, b),
                _ => panic!("{lat:?} {lng:?} {cell:?} {radius:?}: got {kind:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn owning_cell_is_parent_of_fine_cell() {
        // Kinshasa: the direct res-5 cell differs from the parent of the res-15 cell (h3 4.5.0).
        let p = point(-4.32758, 15.31357).unwrap();
        assert_eq!(owning_cell(p, R5).to_string(), "85838eaffffffff");
        assert_eq!(p.to_cell(R5).to_string(), "85838e33fffffff");
        assert_eq!(point_cell(p).to_string(), "8f838ead2553d5e");
    }

    #[test]
    fn disk_cover_contains_center_and_ring() {
        let p = point(48.8566, 2.3522).unwrap();
        let cover = disk_cover(p, 25.0, R5);
        assert!(cover.contains(&owning_cell(p, R5)));
        assert!(cover.len() > 7 && cover.len() < 200, "{}", cover.len());
    }
}
