//! What the simulated users share: the cities they live in (weighted by population), a small
//! PRNG per user, and the ids of the rows they write.

use std::sync::atomic::{AtomicU64, Ordering};

use cellgate::demo::City;
use cellgate::geo;

/// Users stand uniformly within this many km (north-south and east-west) of their city center.
pub const USER_JITTER_KM: f64 = 5.0;

const KM_PER_DEGREE_LAT: f64 = 111.195;

/// splitmix64: tiny, fast and good enough to pick cities and titles.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    #[cfg(test)]
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The generator of user `user` of a run seeded with `seed`: independent streams per user.
    pub fn for_user(seed: u64, user: usize) -> Self {
        let mut mix = Rng(seed ^ (user as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        Rng(mix.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n); `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Cities with a valid location and a positive population, and their cumulative populations:
/// a uniform draw in [0, total) lands on a city with probability population / total.
#[derive(Debug)]
pub struct Cities {
    cities: Vec<City>,
    cumulative: Vec<u64>,
}

impl Cities {
    pub fn new(all: Vec<City>) -> Result<Self, String> {
        let cities: Vec<City> =
            all.into_iter().filter(|c| c.population > 0 && geo::point(c.lat, c.lng).is_ok()).collect();
        if cities.is_empty() {
            return Err("no city with a valid location and a positive population".into());
        }
        let mut total = 0u64;
        let cumulative = cities
            .iter()
            .map(|c| {
                total += c.population;
                total
            })
            .collect();
        Ok(Cities { cities, cumulative })
    }

    pub fn len(&self) -> usize {
        self.cities.len()
    }

    /// A city drawn with probability proportional to its population (binary search).
    pub fn pick(&self, rng: &mut Rng) -> &City {
        let total = *self.cumulative.last().expect("not empty");
        let r = rng.below(total);
        let i = self.cumulative.partition_point(|&c| c <= r);
        &self.cities[i]
    }

    /// A user location: a city by population, jittered within [`USER_JITTER_KM`].
    pub fn user_location(&self, rng: &mut Rng) -> (f64, f64) {
        let city = self.pick(rng);
        jitter(rng, city.lat, city.lng, USER_JITTER_KM)
    }
}

/// A point uniformly within ±`km` of (lat, lng) in both directions, kept valid (latitude clamped
/// short of the poles, longitude wrapped across the antimeridian), rounded to 6 decimals.
pub fn jitter(rng: &mut Rng, lat: f64, lng: f64, km: f64) -> (f64, f64) {
    let dlat = km / KM_PER_DEGREE_LAT;
    let dlng = dlat / lat.to_radians().cos().max(0.01);
    let lat = (lat + (rng.f64() * 2.0 - 1.0) * dlat).clamp(-89.9, 89.9);
    let mut lng = lng + (rng.f64() * 2.0 - 1.0) * dlng.min(180.0);
    if lng > 180.0 {
        lng -= 360.0;
    } else if lng < -180.0 {
        lng += 360.0;
    }
    (round6(lat), round6(lng).clamp(-180.0, 180.0))
}

/// The point read's location grid, in degrees (about 5.6 km north-south, less east-west away
/// from the equator): the point read asks for the musicians nearest to the user's point snapped
/// to it, so that neighbours send the same read and can share its cache entry. Raw points (a
/// per-user jitter with 6 decimals) never repeat: every cached read would be a miss.
pub const POINT_READ_GRID_DEG: f64 = 0.05;

/// (lat, lng) snapped to the nearest node of a `grid`-degree grid, rounded to 6 decimals (so
/// 40.45 stays 40.45 in JSON), kept valid like [`jitter`]'s points.
pub fn snap(lat: f64, lng: f64, grid: f64) -> (f64, f64) {
    let node = |v: f64| round6((v / grid).round() * grid);
    (node(lat).clamp(-89.9, 89.9), node(lng).clamp(-180.0, 180.0))
}

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// A lat/lng bounding box of `km` around a point, clamped to the valid ranges (not wrapped: a
/// box crossing the antimeridian just misses the rows on the other side).
pub fn bbox(lat: f64, lng: f64, km: f64) -> [f64; 4] {
    let dlat = km / KM_PER_DEGREE_LAT;
    let dlng = (dlat / lat.to_radians().cos().max(0.01)).min(180.0);
    [(lat - dlat).max(-90.0), (lat + dlat).min(90.0), (lng - dlng).max(-180.0), (lng + dlng).min(180.0)]
}

/// The row's `h3` value: the resolution-15 cell of its point (`geo::point_cell`, the one
/// derivation), as the signed BIGINT of the u64 index.
pub fn h3_of(lat: f64, lng: f64) -> i64 {
    let p = geo::point(lat, lng).expect("jitter keeps points valid");
    i64::try_from(u64::from(geo::point_cell(p))).expect("H3 indexes fit in 63 bits")
}

/// Bits of the per-run counter in a written id.
pub const ID_COUNTER_BITS: u32 = 23;
/// Run stamps count seconds from this Unix time (2023-11-14), so ids stay below 2^53 (exact in
/// JSON numbers and JavaScript) until 2057.
pub const ID_EPOCH_SECS: u64 = 1_700_000_000;

/// Ids of written gig requests: `(run start in seconds since ID_EPOCH_SECS) << 23 | counter`.
/// Far above the demo's `1..=10000`, unique within a run (one counter shared by every user) and
/// across runs started in different seconds against the same database.
#[derive(Debug)]
pub struct Ids {
    base: u64,
    next: AtomicU64,
}

impl Ids {
    pub fn new(unix_secs: u64) -> Self {
        let stamp = unix_secs.saturating_sub(ID_EPOCH_SECS).max(1);
        Ids { base: stamp << ID_COUNTER_BITS, next: AtomicU64::new(0) }
    }

    /// The next id, or `None` once this run has used all 2^23 of its ids.
    pub fn next(&self) -> Option<i64> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < 1 << ID_COUNTER_BITS).then(|| i64::try_from(self.base | n).expect("ids fit in 63 bits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn city(name: &str, lat: f64, lng: f64, population: u64) -> City {
        City { name: name.into(), country: "XX".into(), lat, lng, population }
    }

    #[test]
    fn picks_follow_population() {
        let cities =
            Cities::new(vec![city("big", 10.0, 10.0, 900), city("none", 0.0, 0.0, 0), city("small", 20.0, 20.0, 100)])
                .unwrap();
        assert_eq!(cities.len(), 2);
        let mut rng = Rng::new(7);
        let big = (0..10_000).filter(|_| cities.pick(&mut rng).name == "big").count();
        assert!((8_700..9_300).contains(&big), "{big}");
    }

    #[test]
    fn no_usable_city_is_an_error() {
        assert!(Cities::new(vec![city("x", 0.0, 0.0, 0)]).is_err());
        assert!(Cities::new(vec![]).is_err());
    }

    #[test]
    fn jitter_stays_valid_near_poles_and_antimeridian() {
        let mut rng = Rng::new(1);
        for (lat, lng) in [(89.99, 179.99), (-89.99, -179.99), (0.0, 180.0), (64.0, -180.0)] {
            for _ in 0..1000 {
                let (a, b) = jitter(&mut rng, lat, lng, USER_JITTER_KM);
                assert!(geo::point(a, b).is_ok(), "{a} {b}");
                let [lat_lo, lat_hi, lng_lo, lng_hi] = bbox(a, b, 25.0);
                assert!(lat_lo <= a && a <= lat_hi && lng_lo <= b && b <= lng_hi);
            }
        }
    }

    #[test]
    fn snapped_points_repeat_and_stay_valid() {
        assert_eq!(snap(40.4168, -3.7038, POINT_READ_GRID_DEG), (40.4, -3.7));
        assert_eq!(snap(40.4312, -3.6751, POINT_READ_GRID_DEG), (40.45, -3.7));
        assert_eq!(snap(-33.8688, 151.2093, POINT_READ_GRID_DEG), (-33.85, 151.2));
        assert_eq!(snap(89.99, 179.99, POINT_READ_GRID_DEG), (89.9, 180.0));
        let mut rng = Rng::new(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (a, b) = jitter(&mut rng, 48.8566, 2.3522, USER_JITTER_KM);
            let (a, b) = snap(a, b, POINT_READ_GRID_DEG);
            assert!(geo::point(a, b).is_ok(), "{a} {b}");
            assert!((a - 48.8566).abs() < 0.1 && (b - 2.3522).abs() < 0.15, "{a} {b}");
            seen.insert((a.to_bits(), b.to_bits()));
        }
        // A user's ±5 km square around Paris falls on a handful of grid nodes.
        assert!((2..=12).contains(&seen.len()), "{}", seen.len());
    }

    #[test]
    fn ids_are_unique_high_and_exact_in_json() {
        let ids = Ids::new(1_800_000_000);
        let a = ids.next().unwrap();
        let b = ids.next().unwrap();
        assert!(a > 10_000 && b == a + 1);
        assert!(a < 1 << 53);
        // A run a second later starts past every id of this one.
        assert!(Ids::new(1_800_000_001).next().unwrap() > a + (1 << ID_COUNTER_BITS) - 2);
        let full = Ids { base: 1 << ID_COUNTER_BITS, next: AtomicU64::new((1 << ID_COUNTER_BITS) - 1) };
        assert!(full.next().is_some());
        assert!(full.next().is_none());
    }

    #[test]
    fn h3_is_the_positive_resolution_15_cell() {
        // Tokyo, as `cellgate locate --json` prints its point_cell.
        let h3 = h3_of(35.6895, 139.6917);
        assert!(h3 > 0);
        assert_eq!((h3 as u64 >> 52) & 0xF, 15, "resolution bits");
    }

    #[test]
    fn streams_differ_per_user() {
        assert_ne!(Rng::for_user(1, 0).next_u64(), Rng::for_user(1, 1).next_u64());
        assert_eq!(Rng::for_user(1, 3).next_u64(), Rng::for_user(1, 3).next_u64());
    }
}
