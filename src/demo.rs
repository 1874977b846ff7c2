//! Demo data: a deterministic musician marketplace (musicians, venues, gig requests) placed
//! around real cities, routed with the map like any write, and bulk-loaded into each shard's
//! PostgreSQL primary. Generation is pure; only [`load`] does I/O.
//!
//! Every row's `h3` is `geo::point_cell` of its point (the one derivation, design §2), and its
//! shard is `routing::route` of that cell: the loader puts rows exactly where the router will
//! look for them.

use std::time::{Duration, Instant};

use chrono::NaiveDate;
use h3o::LatLng;
use postgres_types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;

use crate::geo;
use crate::routing;
use crate::shardmap::{DatabaseSpec, DbKind, Secret, ShardMap};

/// The schema the loader creates on every shard (`deploy/local/schema.sql`).
pub const SCHEMA_SQL: &str = include_str!("../deploy/local/schema.sql");

/// Cities are weighted by population; points are jittered uniformly within this distance of
/// the city center.
pub const JITTER_KM: f64 = 15.0;

const EARTH_RADIUS_KM: f64 = 6371.0088;

/// How much demo data to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSpec {
    pub musicians: usize,
    pub venues: usize,
    pub gig_requests: usize,
    pub seed: u64,
}

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec { musicians: 50_000, venues: 5_000, gig_requests: 10_000, seed: 42 }
    }
}

/// One row of the cities CSV (`geonameid,name,country,lat,lng,population`, GeoNames extract).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct City {
    pub name: String,
    pub country: String,
    pub lat: f64,
    pub lng: f64,
    pub population: u64,
}

/// Parse the cities CSV (header row required; extra columns are ignored, CRLF is fine).
pub fn read_cities(csv_text: &str) -> Result<Vec<City>, DemoError> {
    let mut rdr = csv::Reader::from_reader(csv_text.as_bytes());
    rdr.deserialize::<City>().map(|r| r.map_err(|e| DemoError::Cities(e.to_string()))).collect()
}

/// A rating with two decimals, stored as hundredths (`437` is 4.37); a `NUMERIC` in SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rating(pub u16);

impl std::fmt::Display for Rating {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl ToSql for Rating {
    fn to_sql(&self, _: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        // NUMERIC binary form: ndigits, weight, sign (0 = positive), dscale, then base-10000
        // digits from `weight` down. 4.37 = [4, 3700] at weight 0; PostgreSQL strips zero digits.
        let digits = [i16::try_from(self.0 / 100)?, i16::try_from((self.0 % 100) * 100)?];
        for v in [2, 0, 0, 2, digits[0], digits[1]] {
            out.put_i16(v);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

#[derive(Debug, Clone, PartialEq)]
pub struct Musician {
    pub id: i64,
    pub name: String,
    pub instrument: &'static str,
    pub genres: Vec<&'static str>,
    pub rating: Rating,
    pub hourly_rate_cents: i32,
    pub city: String,
    pub country: String,
    pub lat: f64,
    pub lng: f64,
    /// `geo::point_cell(lat, lng)` as the signed reinterpretation of the u64 index.
    pub h3: i64,
    pub profile: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Venue {
    pub id: i64,
    pub name: String,
    pub kind: &'static str,
    pub capacity: i32,
    pub city: String,
    pub country: String,
    pub lat: f64,
    pub lng: f64,
    pub h3: i64,
}

/// A gig request sits at its venue's point, so it shares the venue's cell and shard.
#[derive(Debug, Clone, PartialEq)]
pub struct GigRequest {
    pub id: i64,
    pub venue_id: i64,
    pub musician_id: Option<i64>,
    pub title: String,
    pub genre: &'static str,
    pub budget_cents: i32,
    pub gig_date: NaiveDate,
    pub lat: f64,
    pub lng: f64,
    pub h3: i64,
}

/// The generated rows; ids are `1..=n` per table, in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Demo {
    pub musicians: Vec<Musician>,
    pub venues: Vec<Venue>,
    pub gig_requests: Vec<GigRequest>,
}

/// Why generation or loading failed. Never carries a connection string (they hold passwords):
/// shards are named by id.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cities CSV: {0}")]
    Cities(String),
    #[error("no city with a valid location and a positive population")]
    NoCities,
    #[error("{0} gig requests need at least one venue")]
    GigsWithoutVenues(usize),
    #[error("database {0:?} is not in the shard map")]
    UnknownDatabase(String),
    #[error("database {db:?} is {kind}; the demo loads PostgreSQL only")]
    NotPostgres { db: String, kind: &'static str },
    #[error("shard {shard}: {rows} demo rows route here but it has no database {db:?}")]
    MissingDatabase { shard: String, db: String, rows: usize },
    #[error("shard {shard}: the primary connection string of database {db:?} is invalid")]
    BadConnectionString { shard: String, db: String },
    #[error("shard {shard}: database {db:?}: {reason}")]
    Tls { shard: String, db: String, reason: String },
    #[error("shard {shard}: {step}: {error}")]
    Postgres { shard: String, step: &'static str, error: tokio_postgres::Error },
}

// ---------------------------------------------------------------------------------------------
// Generation

/// splitmix64: tiny, fast, and good enough for demo data; the stream is fixed forever.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n) (multiply-shift; the bias is < n / 2^64). `n` must be > 0.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
}

/// Population-weighted city picker: cumulative weights + binary search.
struct CityPicker<'a> {
    cities: Vec<&'a City>,
    cumulative: Vec<u64>,
}

impl<'a> CityPicker<'a> {
    fn new(cities: &'a [City]) -> Result<Self, DemoError> {
        let mut picker = CityPicker { cities: Vec::new(), cumulative: Vec::new() };
        let mut total = 0u64;
        for c in cities {
            if c.population == 0 || geo::point(c.lat, c.lng).is_err() {
                continue;
            }
            total = total.saturating_add(c.population);
            picker.cities.push(c);
            picker.cumulative.push(total);
        }
        if picker.cities.is_empty() { Err(DemoError::NoCities) } else { Ok(picker) }
    }

    fn pick(&self, rng: &mut Rng) -> &'a City {
        let total = *self.cumulative.last().expect("non-empty");
        let r = rng.below(total);
        self.cities[self.cumulative.partition_point(|&c| c <= r)]
    }
}

/// A point uniformly distributed in the spherical cap of radius `max_km` around (lat, lng):
/// great-circle destination, so poles and the antimeridian need no special case beyond
/// normalising the result.
fn jitter(rng: &mut Rng, lat: f64, lng: f64, max_km: f64) -> (f64, f64) {
    let d = max_km * rng.f64().sqrt() / EARTH_RADIUS_KM;
    let bearing = std::f64::consts::TAU * rng.f64();
    let (p1, l1) = (lat.to_radians(), lng.to_radians());
    let sin_p2 = (p1.sin() * d.cos() + p1.cos() * d.sin() * bearing.cos()).clamp(-1.0, 1.0);
    let l2 = l1 + (bearing.sin() * d.sin() * p1.cos()).atan2(d.cos() - p1.sin() * sin_p2);
    let lat2 = sin_p2.asin().to_degrees().clamp(-90.0, 90.0);
    let lng2 = (l2.to_degrees() + 180.0).rem_euclid(360.0) - 180.0;
    (lat2, lng2)
}

/// A valid point near `city` and its resolution-15 cell as BIGINT.
fn place(rng: &mut Rng, city: &City) -> (f64, f64, i64) {
    loop {
        let (lat, lng) = jitter(rng, city.lat, city.lng, JITTER_KM);
        if let Ok(p) = geo::point(lat, lng) {
            return (lat, lng, cell_i64(p));
        }
    }
}

/// The row's `h3` value: the point's resolution-15 cell, reinterpreted as i64 (positive: H3
/// indexes leave the top bit 0).
pub fn cell_i64(p: LatLng) -> i64 {
    i64::try_from(u64::from(geo::point_cell(p))).expect("H3 indexes fit in 63 bits")
}

const FIRST: &[&str] = &[
    "Ava", "Liam", "Mia", "Noah", "Zoe", "Kai", "Lena", "Omar", "Yuki", "Ines", "Ravi", "Sofia", "Mateo", "Amara",
    "Chen", "Priya", "Jonas", "Lucia", "Tariq", "Freya", "Diego", "Hana", "Kofi", "Nadia",
];
const LAST: &[&str] = &[
    "Silva", "Tanaka", "Okafor", "Novak", "Rossi", "Kim", "Haddad", "Larsen", "Moreau", "Patel", "Garcia", "Fischer",
    "Ivanova", "Mensah", "Costa", "Nguyen", "Santos", "Kowalski", "Ali", "Berg",
];
const WORDS: &[&str] = &[
    "Nova", "Echo", "Velvet", "Indigo", "Neon", "Ember", "Lunar", "Cobalt", "Saffron", "Static", "Golden", "Midnight",
    "Crimson", "Silver", "Wild", "Blue",
];
const ENSEMBLES: &[&str] = &["Quartet", "Trio", "Collective", "Ensemble", "Band", "Orchestra", "Project", "Duo"];
const BAND_NOUNS: &[&str] = &["Foxes", "Rivers", "Keys", "Lights", "Strings", "Wolves", "Echoes", "Drums"];
const INSTRUMENTS: &[&str] = &[
    "vocals",
    "guitar",
    "bass",
    "drums",
    "piano",
    "keyboards",
    "saxophone",
    "trumpet",
    "violin",
    "cello",
    "turntables",
    "flute",
    "accordion",
    "harp",
    "percussion",
    "oud",
    "sitar",
    "tabla",
];
const GENRES: &[&str] = &[
    "jazz",
    "rock",
    "pop",
    "classical",
    "electronic",
    "hip-hop",
    "folk",
    "blues",
    "soul",
    "funk",
    "reggae",
    "latin",
    "afrobeat",
    "k-pop",
    "metal",
    "country",
    "ambient",
    "flamenco",
    "bossa nova",
    "techno",
];
const LANGUAGES: &[&str] = &["en", "es", "fr", "de", "zh", "ja", "pt", "ar", "hi", "sw"];
/// (kind, display word, capacity range)
const VENUE_KINDS: &[(&str, &str, u64, u64)] = &[
    ("bar", "Bar", 30, 150),
    ("club", "Club", 150, 800),
    ("theater", "Theater", 300, 2_000),
    ("hall", "Hall", 500, 5_000),
    ("cafe", "Cafe", 20, 80),
    ("festival", "Festival Grounds", 2_000, 30_000),
    ("lounge", "Lounge", 40, 200),
    ("event space", "Rooms", 80, 400),
];

fn musician_name(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => format!("DJ {}", rng.pick(WORDS)),
        1 => format!("{} {}", rng.pick(FIRST), rng.pick(ENSEMBLES)),
        2 => format!("The {} {}", rng.pick(WORDS), rng.pick(BAND_NOUNS)),
        _ => format!("{} {}", rng.pick(FIRST), rng.pick(LAST)),
    }
}

fn genres(rng: &mut Rng) -> Vec<&'static str> {
    let n = rng.range(1, 3);
    let mut out: Vec<&'static str> = Vec::with_capacity(3);
    while (out.len() as u64) < n {
        let g = rng.pick(GENRES);
        if !out.contains(&g) {
            out.push(g);
        }
    }
    out
}

fn musician(rng: &mut Rng, id: i64, city: &City) -> Musician {
    let (lat, lng, h3) = place(rng, city);
    let name = musician_name(rng);
    let instrument = rng.pick(INSTRUMENTS);
    let genres = genres(rng);
    // Skewed towards good ratings, as on every marketplace: 2.50 ..= 5.00.
    let rating = Rating(250 + rng.below(251).max(rng.below(251)) as u16);
    let hourly_rate_cents = (rng.range(4, 60) * 500) as i32;
    let mut languages = vec![rng.pick(LANGUAGES)];
    if rng.chance(0.4) {
        let second = rng.pick(LANGUAGES);
        if second != languages[0] {
            languages.push(second);
        }
    }
    let profile = serde_json::json!({
        "bio": format!("{} player from {}", instrument, city.name),
        "years_active": rng.range(1, 40),
        "languages": languages,
        "travel_km": rng.pick(&[10, 25, 50, 100, 500]),
        "verified": rng.chance(0.7),
    });
    Musician {
        id,
        name,
        instrument,
        genres,
        rating,
        hourly_rate_cents,
        city: city.name.clone(),
        country: city.country.clone(),
        lat,
        lng,
        h3,
        profile,
    }
}

fn venue(rng: &mut Rng, id: i64, city: &City) -> Venue {
    let (lat, lng, h3) = place(rng, city);
    let (kind, word, lo, hi) = rng.pick(VENUE_KINDS);
    let name = match rng.below(3) {
        0 => format!("The {} {}", rng.pick(WORDS), word),
        1 => format!("{} {}", city.name, word),
        _ => format!("{}'s {}", rng.pick(LAST), word),
    };
    let capacity = rng.range(lo, hi) as i32;
    Venue { id, name, kind, capacity, city: city.name.clone(), country: city.country.clone(), lat, lng, h3 }
}

fn gig_request(rng: &mut Rng, id: i64, venues: &[Venue], musicians: usize) -> GigRequest {
    let v = &venues[rng.below(venues.len() as u64) as usize];
    let genre = rng.pick(GENRES);
    let title = match rng.below(6) {
        0 => format!("{genre} night at {}", v.name),
        1 => format!("Wedding reception: {genre} set"),
        2 => format!("Sunday brunch with live {genre}"),
        3 => format!("Corporate party, {genre} wanted"),
        4 => format!("Opening act ({genre}) at {}", v.name),
        _ => format!("Album launch: {genre} backing band"),
    };
    let musician_id =
        if musicians > 0 && rng.chance(0.35) { Some(rng.below(musicians as u64) as i64 + 1) } else { None };
    // Budgets grow with the room: 100 ..= 2,100 units plus 2 per seat, rounded to whole units.
    let budget_cents = ((rng.range(100, 2_100) + 2 * v.capacity as u64) * 100) as i32;
    let base = NaiveDate::from_ymd_opt(2026, 1, 1).expect("valid date");
    let gig_date = base + chrono::Days::new(rng.below(365));
    GigRequest {
        id,
        venue_id: v.id,
        musician_id,
        title,
        genre,
        budget_cents,
        gig_date,
        lat: v.lat,
        lng: v.lng,
        h3: v.h3,
    }
}

/// Generate the demo rows. Deterministic: the same spec and cities give the same rows.
/// Cities are picked weighted by population, points jittered within [`JITTER_KM`].
pub fn generate(spec: &DemoSpec, cities: &[City]) -> Result<Demo, DemoError> {
    if spec.gig_requests > 0 && spec.venues == 0 {
        return Err(DemoError::GigsWithoutVenues(spec.gig_requests));
    }
    let picker = CityPicker::new(cities)?;
    let mut rng = Rng(spec.seed);
    let mut demo = Demo {
        musicians: Vec::with_capacity(spec.musicians),
        venues: Vec::with_capacity(spec.venues),
        gig_requests: Vec::with_capacity(spec.gig_requests),
    };
    for id in 1..=spec.musicians as i64 {
        let city = picker.pick(&mut rng);
        demo.musicians.push(musician(&mut rng, id, city));
    }
    for id in 1..=spec.venues as i64 {
        let city = picker.pick(&mut rng);
        demo.venues.push(venue(&mut rng, id, city));
    }
    for id in 1..=spec.gig_requests as i64 {
        demo.gig_requests.push(gig_request(&mut rng, id, &demo.venues, spec.musicians));
    }
    Ok(demo)
}

// ---------------------------------------------------------------------------------------------
// Routing

/// Row positions (indexes into the [`Demo`] vectors) owned by one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardRows {
    pub musicians: Vec<usize>,
    pub venues: Vec<usize>,
    pub gig_requests: Vec<usize>,
}

impl ShardRows {
    pub fn len(&self) -> usize {
        self.musicians.len() + self.venues.len() + self.gig_requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The demo rows grouped by owning shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partition {
    /// Indexed by `ShardIdx::get()` of the map used.
    pub shards: Vec<ShardRows>,
    /// Rows no shard owns (only with `fallback.mode = "reject"`); they are not loaded.
    pub unrouted: usize,
}

fn owner(map: &ShardMap, h3: i64) -> Option<usize> {
    let cell = h3o::CellIndex::try_from(u64::try_from(h3).ok()?).ok()?;
    routing::route(map, cell).ok().map(|r| r.shard.get())
}

/// Group rows by the shard that owns them: `routing::route(map, h3)` of each row's
/// resolution-15 cell, exactly as the router does for a point.
pub fn partition(map: &ShardMap, demo: &Demo) -> Partition {
    let mut p = Partition { shards: vec![ShardRows::default(); map.shards().len()], unrouted: 0 };
    let mut put = |h3: i64, i: usize, pick: fn(&mut ShardRows) -> &mut Vec<usize>| match owner(map, h3) {
        Some(s) => pick(&mut p.shards[s]).push(i),
        None => p.unrouted += 1,
    };
    for (i, m) in demo.musicians.iter().enumerate() {
        put(m.h3, i, |r| &mut r.musicians);
    }
    for (i, v) in demo.venues.iter().enumerate() {
        put(v.h3, i, |r| &mut r.venues);
    }
    for (i, g) in demo.gig_requests.iter().enumerate() {
        put(g.h3, i, |r| &mut r.gig_requests);
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Loading

/// What one shard received.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardLoad {
    pub shard: String,
    pub musicians: u64,
    pub venues: u64,
    pub gig_requests: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadReport {
    /// Shards that have the database, in map order (also those that received no rows: their
    /// tables are created and emptied all the same).
    pub shards: Vec<ShardLoad>,
    /// Rows no shard owns (reject fallback); not loaded.
    pub unrouted: usize,
    pub elapsed_ms: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Load the demo into database `db` of every shard of `map`: on each primary, run
/// `schema_sql` (e.g. [`SCHEMA_SQL`]), then in one transaction truncate the three tables and
/// `COPY` (binary) the rows that shard owns, then `ANALYZE`. Shards load concurrently; the
/// replicas get the rows by streaming replication. Idempotent: a second run leaves the same
/// rows. On error, shards that already committed keep their new rows.
pub async fn load(map: &ShardMap, db: &str, demo: &Demo, schema_sql: &str) -> Result<LoadReport, DemoError> {
    let start = Instant::now();
    match map.databases().get(db) {
        None => return Err(DemoError::UnknownDatabase(db.to_string())),
        Some(DbKind::Postgres) => {}
        Some(kind) => return Err(DemoError::NotPostgres { db: db.to_string(), kind: kind.as_str() }),
    }
    let part = partition(map, demo);
    let mut jobs = Vec::new();
    for (shard, rows) in map.shards().iter().zip(&part.shards) {
        match shard.databases.get(db) {
            Some(DatabaseSpec::Postgres { primary, .. }) => {
                jobs.push(load_shard(shard.id.as_str(), db, primary, schema_sql, demo, rows));
            }
            _ if rows.is_empty() => {}
            _ => {
                return Err(DemoError::MissingDatabase {
                    shard: shard.id.to_string(),
                    db: db.to_string(),
                    rows: rows.len(),
                });
            }
        }
    }
    let shards = futures_util::future::join_all(jobs).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(LoadReport { shards, unrouted: part.unrouted, elapsed_ms: millis(start.elapsed()) })
}

async fn load_shard(
    shard: &str,
    db: &str,
    primary: &Secret,
    schema_sql: &str,
    demo: &Demo,
    rows: &ShardRows,
) -> Result<ShardLoad, DemoError> {
    let start = Instant::now();
    let err = |step: &'static str| move |error| DemoError::Postgres { shard: shard.to_string(), step, error };
    // Parse errors are replaced wholesale: their text could quote part of the secret.
    let bad = || DemoError::BadConnectionString { shard: shard.to_string(), db: db.to_string() };
    let crate::backend::postgres::tls::ConnInfo { mut config, tls } =
        crate::backend::postgres::tls::parse(primary.expose()).map_err(|_| bad())?;
    let connector = tls.connector().map_err(|e| DemoError::Tls {
        shard: shard.to_string(),
        db: db.to_string(),
        reason: e.to_string(),
    })?;
    config.connect_timeout(Duration::from_secs(10)).application_name("cellgate-demo-load");
    let (mut client, connection) = config.connect(connector).await.map_err(err("connect to the primary"))?;
    let conn = crate::tasks::spawn("demo_connection", connection);

    client.batch_execute(schema_sql).await.map_err(err("create the schema"))?;
    let tx = client.transaction().await.map_err(err("begin"))?;
    tx.batch_execute("TRUNCATE musicians, venues, gig_requests").await.map_err(err("truncate"))?;
    let musicians = copy_musicians(&tx, demo, &rows.musicians).await.map_err(err("copy musicians"))?;
    let venues = copy_venues(&tx, demo, &rows.venues).await.map_err(err("copy venues"))?;
    let gig_requests = copy_gig_requests(&tx, demo, &rows.gig_requests).await.map_err(err("copy gig_requests"))?;
    tx.commit().await.map_err(err("commit"))?;
    client.batch_execute("ANALYZE musicians, venues, gig_requests").await.map_err(err("analyze"))?;
    drop(client);
    let _ = conn.await;
    Ok(ShardLoad { shard: shard.to_string(), musicians, venues, gig_requests, elapsed_ms: millis(start.elapsed()) })
}

async fn copy_musicians(client: &Transaction<'_>, demo: &Demo, rows: &[usize]) -> Result<u64, tokio_postgres::Error> {
    let sink = client
        .copy_in(
            "COPY musicians (id, name, instrument, genres, rating, hourly_rate_cents, city, country, \
             lat, lng, h3, profile) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let types = [
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT_ARRAY,
        Type::NUMERIC,
        Type::INT4,
        Type::TEXT,
        Type::TEXT,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::INT8,
        Type::JSONB,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for &i in rows {
        let m = &demo.musicians[i];
        writer
            .as_mut()
            .write(&[
                &m.id,
                &m.name,
                &m.instrument,
                &m.genres,
                &m.rating,
                &m.hourly_rate_cents,
                &m.city,
                &m.country,
                &m.lat,
                &m.lng,
                &m.h3,
                &m.profile,
            ])
            .await?;
    }
    writer.finish().await
}

async fn copy_venues(client: &Transaction<'_>, demo: &Demo, rows: &[usize]) -> Result<u64, tokio_postgres::Error> {
    let sink = client
        .copy_in("COPY venues (id, name, kind, capacity, city, country, lat, lng, h3) FROM STDIN (FORMAT binary)")
        .await?;
    let types = [
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT4,
        Type::TEXT,
        Type::TEXT,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::INT8,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for &i in rows {
        let v = &demo.venues[i];
        writer
            .as_mut()
            .write(&[&v.id, &v.name, &v.kind, &v.capacity, &v.city, &v.country, &v.lat, &v.lng, &v.h3])
            .await?;
    }
    writer.finish().await
}

async fn copy_gig_requests(
    client: &Transaction<'_>,
    demo: &Demo,
    rows: &[usize],
) -> Result<u64, tokio_postgres::Error> {
    let sink = client
        .copy_in(
            "COPY gig_requests (id, venue_id, musician_id, title, genre, budget_cents, gig_date, lat, lng, h3) \
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT4,
        Type::DATE,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::INT8,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for &i in rows {
        let g = &demo.gig_requests[i];
        writer
            .as_mut()
            .write(&[
                &g.id,
                &g.venue_id,
                &g.musician_id,
                &g.title,
                &g.genre,
                &g.budget_cents,
                &g.gig_date,
                &g.lat,
                &g.lng,
                &g.h3,
            ])
            .await?;
    }
    writer.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use h3o::{CellIndex, Resolution};

    fn cities() -> Vec<City> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/cities15000.csv");
        read_cities(&std::fs::read_to_string(path).expect("cities CSV")).expect("parse cities")
    }

    fn demo_map(env: impl Fn(&str) -> Option<String>) -> ShardMap {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/shard-maps/demo.toml");
        let src = std::fs::read_to_string(path).expect("demo map");
        crate::shardmap::parse_and_compile(&src, env).expect("demo map compiles")
    }

    fn near(lat: f64, lng: f64, p: (f64, f64), km: f64) -> bool {
        let a = LatLng::new(lat, lng).unwrap();
        let b = LatLng::new(p.0, p.1).unwrap();
        a.distance_km(b) <= km
    }

    #[test]
    fn generation_is_deterministic_valid_weighted_and_routed() {
        let cities = cities();
        assert!(cities.len() > 30_000);
        let spec = DemoSpec { musicians: 20_000, venues: 2_000, gig_requests: 4_000, seed: 7 };
        let demo = generate(&spec, &cities).unwrap();
        assert_eq!(demo, generate(&spec, &cities).unwrap(), "same seed, same rows");
        assert_ne!(demo.musicians, generate(&DemoSpec { seed: 8, ..spec.clone() }, &cities).unwrap().musicians);
        assert_eq!(demo.musicians.len(), 20_000);
        assert_eq!(demo.venues.len(), 2_000);
        assert_eq!(demo.gig_requests.len(), 4_000);

        // Ids 1..=n; every point valid; h3 is the point's res-15 cell, its parent at 5 the owning cell.
        let r5 = Resolution::Five;
        let points = demo
            .musicians
            .iter()
            .map(|m| (m.id, m.lat, m.lng, m.h3))
            .chain(demo.venues.iter().map(|v| (v.id, v.lat, v.lng, v.h3)))
            .chain(demo.gig_requests.iter().map(|g| (g.id, g.lat, g.lng, g.h3)));
        for (id, lat, lng, h3) in points {
            assert!(id >= 1);
            let p = geo::point(lat, lng).unwrap_or_else(|e| panic!("row {id}: {e}"));
            assert!(h3 > 0);
            let cell = CellIndex::try_from(h3 as u64).unwrap();
            assert_eq!(cell.resolution(), Resolution::Fifteen);
            assert_eq!(cell, geo::point_cell(p));
            assert_eq!(cell.parent(r5).unwrap(), geo::owning_cell(p, r5));
        }
        assert!(demo.musicians.iter().enumerate().all(|(i, m)| m.id == i as i64 + 1));
        for m in &demo.musicians {
            assert!((1..=3).contains(&m.genres.len()) && (250..=500).contains(&m.rating.0), "{m:?}");
            // Names repeat (several Fuyang, CN): some city of that name is the one.
            let mut homes = cities.iter().filter(|c| c.name == m.city && c.country == m.country);
            assert!(homes.any(|c| near(c.lat, c.lng, (m.lat, m.lng), JITTER_KM + 0.01)), "{m:?}");
        }
        for g in &demo.gig_requests {
            let v = &demo.venues[g.venue_id as usize - 1];
            assert_eq!((g.lat, g.lng, g.h3), (v.lat, v.lng, v.h3));
            assert!(g.musician_id.is_none_or(|m| (1..=20_000).contains(&m)));
        }

        // Population weighting: megacities hold hundreds of musicians, a small town almost none.
        let count = |c: (f64, f64)| demo.musicians.iter().filter(|m| near(m.lat, m.lng, c, 20.0)).count();
        let shanghai = count((31.22222, 121.45806));
        let tokyo = count((35.6895, 139.69171));
        // A small town with no other city within 40 km (so no neighbour's musicians count).
        let lonely = |t: &City| !cities.iter().any(|c| c != t && near(c.lat, c.lng, (t.lat, t.lng), 40.0));
        let small = cities.iter().find(|c| c.population < 16_000 && lonely(c)).unwrap();
        let town = count((small.lat, small.lng));
        assert!(shanghai > 80 && tokyo > 40, "shanghai {shanghai}, tokyo {tokyo}");
        assert!(shanghai > 10 * (town + 1), "shanghai {shanghai}, {} {town}", small.name);

        // Routing spreads the rows over all three demo shards, every row routed.
        let map = demo_map(|_| None);
        let part = partition(&map, &demo);
        assert_eq!(part.unrouted, 0);
        assert_eq!(part.shards.iter().map(ShardRows::len).sum::<usize>(), 26_000);
        for (shard, rows) in map.shards().iter().zip(&part.shards) {
            assert!(rows.musicians.len() > 1_000 && rows.venues.len() > 100, "{}: {rows:?}", shard.id);
            for &i in &rows.musicians {
                let p = geo::point(demo.musicians[i].lat, demo.musicians[i].lng).unwrap();
                let s = routing::route(&map, geo::owning_cell(p, map.resolution())).unwrap().shard;
                assert_eq!(map.shard(s).id, shard.id);
            }
        }
        let musicians_in = |id: &str| part.shards[map.shard_idx(id).unwrap().get()].musicians.iter();
        assert!(musicians_in("as-1").any(|&i| demo.musicians[i].city == "Shanghai"));
        assert!(musicians_in("eu-1").any(|&i| demo.musicians[i].country == "FR"));
        assert!(musicians_in("am-1").any(|&i| demo.musicians[i].country == "BR"));
    }

    #[test]
    fn jitter_handles_poles_and_antimeridian() {
        let mut rng = Rng(1);
        for (lat, lng) in [(89.99, 10.0), (-89.99, -170.0), (0.0, 179.999), (65.0, -179.99), (90.0, 0.0)] {
            for _ in 0..2_000 {
                let (a, b) = jitter(&mut rng, lat, lng, JITTER_KM);
                assert!(geo::point(a, b).is_ok(), "{a} {b}");
                assert!(near(lat, lng, (a, b), JITTER_KM + 0.01), "{lat},{lng} -> {a},{b}");
            }
        }
    }

    #[test]
    fn rating_text_and_errors_hide_secrets() {
        assert_eq!(Rating(437).to_string(), "4.37");
        assert_eq!(Rating(500).to_string(), "5.00");
        assert_eq!(Rating(5).to_string(), "0.05");
        let e = DemoError::BadConnectionString { shard: "eu-1".into(), db: "core".into() };
        assert_eq!(e.to_string(), "shard eu-1: the primary connection string of database \"core\" is invalid");
        assert!(matches!(generate(&DemoSpec::default(), &[]), Err(DemoError::NoCities)));
    }

    #[tokio::test]
    async fn load_errors_name_the_shard_not_the_secret() {
        let env = |k: &str| Some(if k.ends_with("PASSWORD") { "canary-pw".into() } else { "1".into() });
        let map = demo_map(env);
        let demo = generate(&DemoSpec { musicians: 50, venues: 5, gig_requests: 5, seed: 1 }, &cities()).unwrap();
        let e = load(&map, "nope", &demo, SCHEMA_SQL).await.unwrap_err();
        assert!(matches!(e, DemoError::UnknownDatabase(_)), "{e}");
        let e = load(&map, "core", &demo, SCHEMA_SQL).await.unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(matches!(e, DemoError::Postgres { step: "connect to the primary", .. }), "{text}");
        assert!(text.starts_with("shard am-1: connect to the primary: "), "{text}");
        assert!(!text.contains("canary") && !text.contains("postgres://"), "{text}");
    }

    /// Against a real 3×1 cluster (cellgate-harness): loads the demo map's shards, checks the
    /// counts on every primary and replica, then loads again (idempotent).
    /// `cargo test --lib demo -- --ignored` (needs PostgreSQL server programs).
    #[test]
    #[ignore = "starts a PostgreSQL cluster"]
    fn load_into_a_real_cluster() {
        use cellgate_harness::{Cluster, ClusterSpec};
        let cluster = Cluster::start(ClusterSpec { shards: 3, replicas_per_shard: 1, ..ClusterSpec::default() })
            .expect("cluster starts");
        let mut ports = std::collections::HashMap::new();
        for (id, s) in ["AM1", "EU1", "AS1"].iter().zip(&cluster.shards) {
            ports.insert(format!("CELLGATE_DEMO_{id}_PRIMARY_PORT"), s.primary.port.to_string());
            ports.insert(format!("CELLGATE_DEMO_{id}_REPLICA_PORT"), s.replicas[0].port.to_string());
        }
        ports.insert("CELLGATE_DEMO_PG_PASSWORD".into(), cluster.spec().app_password.clone());
        let map = demo_map(|k| ports.get(k).cloned());
        let demo = generate(&DemoSpec::default(), &cities()).unwrap();
        let part = partition(&map, &demo);

        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        for round in 0..2 {
            let report = rt.block_on(load(&map, "core", &demo, SCHEMA_SQL)).unwrap();
            eprintln!("round {round}: {report:?}");
            assert_eq!(report.shards.len(), 3);
            for (load, rows) in report.shards.iter().zip(&part.shards) {
                assert_eq!(load.musicians as usize, rows.musicians.len());
                assert_eq!(load.venues as usize, rows.venues.len());
                assert_eq!(load.gig_requests as usize, rows.gig_requests.len());
            }
        }
        let sql = "SELECT (SELECT count(*) FROM musicians) || ',' || (SELECT count(*) FROM venues) || ',' || \
                   (SELECT count(*) FROM gig_requests) || ',' || (SELECT count(*) FROM musicians WHERE h3 <= 0)";
        for (shard, rows) in cluster.shards.iter().zip(&part.shards) {
            let want = format!("{},{},{},0", rows.musicians.len(), rows.venues.len(), rows.gig_requests.len());
            assert_eq!(shard.primary.psql("core", sql).unwrap(), want);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got = shard.replicas[0].psql("core", sql).unwrap_or_default();
                if got == want {
                    break;
                }
                assert!(Instant::now() < deadline, "{}: replica has {got}, want {want}", shard.replicas[0].name);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // Hand-encoded NUMERIC, arrays, jsonb and dates read back as generated (several ratings).
        for m in demo.musicians.iter().take(20) {
            let s =
                &cluster.shards[part.shards.iter().position(|r| r.musicians.contains(&(m.id as usize - 1))).unwrap()];
            let sql = format!(
                "SELECT name, rating::text, array_to_string(genres, ','), h3, profile->>'bio' FROM musicians WHERE id = {}",
                m.id
            );
            let want = format!(
                "{}|{}|{}|{}|{}",
                m.name,
                m.rating,
                m.genres.join(","),
                m.h3,
                m.profile["bio"].as_str().unwrap()
            );
            assert_eq!(s.primary.psql("core", &sql).unwrap(), want);
        }
        let g = &demo.gig_requests[0];
        let s = &cluster.shards[part.shards.iter().position(|r| r.gig_requests.contains(&0)).unwrap()];
        let got = s.primary.psql("core", "SELECT gig_date::text, musician_id IS NULL FROM gig_requests WHERE id = 1");
        assert_eq!(got.unwrap(), format!("{}|{}", g.gig_date, if g.musician_id.is_none() { "t" } else { "f" }));
        cluster.stop().unwrap();
    }
}
