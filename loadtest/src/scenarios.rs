//! The marketplace traffic: four transactions of one goose scenario, weighted 14:3:2:1
//! (70 / 15 / 10 / 5 %), so every user runs the same mix whatever `--users` is.
//!
//! Every response must be a 200 with a JSON body without `error`; anything else is marked with
//! `set_failure` on its request (a goose failure).
//!
//! The point read asks cellgate's read cache for its answer (`"cache": {"ttl_ms": 30000}`); the
//! `Cache-Status` of each successful one is counted ([`crate::cache`]) for the summary's hit
//! ratio. Area searches and writes do not opt in; writes through cellgate invalidate the cached
//! reads of the cells they write.

use std::sync::OnceLock;

use goose::goose::{GooseResponse, TransactionError};
use goose::metrics::GooseRequestMetric;
use goose::prelude::*;
use serde_json::{Value, json};

use crate::world::{Cities, Ids, POINT_READ_GRID_DEG, Rng, bbox, h3_of, jitter, snap};

pub const QUERY: &str = "/v1/sql/core/query";
pub const EXECUTE: &str = "/v1/sql/core/execute";

/// Scenario (goose transaction) names, also the request names (`write_read` has two
/// requests, `write_read:execute` and `write_read:query`), and their weights. Request names
/// stay under 20 characters so goose's console tables print them whole.
pub const POINT_READ: &str = "point_read";
pub const NEARBY_SEARCH: &str = "nearby_search";
pub const POST_GIG: &str = "post_gig";
pub const WRITE_READ: &str = "write_read";
pub const WEIGHTS: [(&str, usize); 4] = [(POINT_READ, 14), (NEARBY_SEARCH, 3), (POST_GIG, 2), (WRITE_READ, 1)];

/// Point read: the nearest musicians within this many km of the user (lat/lng index).
const POINT_READ_KM: f64 = 10.0;
const POINT_READ_LIMIT: u32 = 10;
/// How long the point read's answer may be served from cellgate's read cache, ms.
pub const POINT_READ_CACHE_TTL_MS: u64 = 30_000;
/// Nearby search: the area and the merged page.
const NEARBY_RADIUS_KM: f64 = 25.0;
const NEARBY_LIMIT: u32 = 20;
/// Read-your-writes: how long a replica may take to replay the write before the primary answers.
const RYW_WAIT_MS: u64 = 500;
/// Venues of the demo have ids 1..=5000 (no foreign key: any id is accepted).
const DEMO_VENUES: u64 = 5_000;

/// What every user shares; set once in `main` before the load test starts.
pub struct Shared {
    pub token: String,
    pub cities: Cities,
    pub ids: Ids,
    pub seed: u64,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

pub fn init(shared: Shared) {
    assert!(SHARED.set(shared).is_ok(), "scenarios::init called twice");
}

fn shared() -> &'static Shared {
    SHARED.get().expect("scenarios::init runs before the load test")
}

/// The one goose scenario with its four weighted transactions.
pub fn marketplace() -> Result<Scenario, GooseError> {
    let mut scenario = scenario!("marketplace");
    for (name, weight) in WEIGHTS {
        let transaction = match name {
            POINT_READ => transaction!(point_read),
            NEARBY_SEARCH => transaction!(nearby_search),
            POST_GIG => transaction!(post_gig),
            _ => transaction!(write_read),
        };
        scenario = scenario.register_transaction(transaction.set_name(name).set_weight(weight)?);
    }
    Ok(scenario)
}

/// Per-user state: its PRNG, seeded from `--seed` and the user's index.
#[derive(Clone)]
struct UserState {
    rng: Rng,
}

fn rng(user: &mut GooseUser) -> &mut Rng {
    if user.get_session_data::<UserState>().is_none() {
        let rng = Rng::for_user(shared().seed, user.weighted_users_index);
        user.set_session_data(UserState { rng });
    }
    &mut user.get_session_data_unchecked_mut::<UserState>().rng
}

/// Musicians nearest to the user's point snapped to the 0.05° grid (neighbours share the read),
/// from cellgate's read cache or the shard owning that point (a replica).
async fn point_read(user: &mut GooseUser) -> TransactionResult {
    let (lat, lng) = shared().cities.user_location(rng(user));
    let (lat, lng) = snap(lat, lng, POINT_READ_GRID_DEG);
    let [lat_lo, lat_hi, lng_lo, lng_hi] = bbox(lat, lng, POINT_READ_KM);
    let body = json!({
        "region": {"lat": lat, "lng": lng},
        "sql": "SELECT id, name, instrument, rating, hourly_rate_cents, \
                (lat - $1::float8)^2 + (lng - $2::float8)^2 AS dist FROM musicians \
                WHERE lat BETWEEN $3::float8 AND $4::float8 AND lng BETWEEN $5::float8 AND $6::float8 \
                ORDER BY dist LIMIT $7::int4",
        "params": [lat, lng, lat_lo, lat_hi, lng_lo, lng_hi, POINT_READ_LIMIT],
        "cache": {"ttl_ms": POINT_READ_CACHE_TTL_MS},
    });
    let (mut request, value, cache_status) = call(user, POINT_READ, QUERY, &body).await?;
    expect_rows(user, &mut request, &value, POINT_READ_LIMIT as usize)?;
    crate::cache::COUNTS.record(cache_status.as_deref());
    Ok(())
}

/// The 20 nearest musicians within 25 km: an area read on every shard that may own a point of
/// it, k-way merged by distance.
async fn nearby_search(user: &mut GooseUser) -> TransactionResult {
    let (lat, lng) = shared().cities.user_location(rng(user));
    let [lat_lo, lat_hi, lng_lo, lng_hi] = bbox(lat, lng, NEARBY_RADIUS_KM);
    let body = json!({
        "region": {"lat": lat, "lng": lng, "radius_km": NEARBY_RADIUS_KM},
        "sql": "SELECT id, name, instrument, city, lat, lng, \
                (lat - $1::float8)^2 + (lng - $2::float8)^2 AS dist FROM musicians \
                WHERE lat BETWEEN $3::float8 AND $4::float8 AND lng BETWEEN $5::float8 AND $6::float8 \
                ORDER BY dist LIMIT $7::int4",
        "params": [lat, lng, lat_lo, lat_hi, lng_lo, lng_hi, NEARBY_LIMIT],
        "merge": {"order_by": [{"column": "dist"}], "limit": NEARBY_LIMIT},
    });
    let (mut request, value, _) = call(user, NEARBY_SEARCH, QUERY, &body).await?;
    expect_rows(user, &mut request, &value, NEARBY_LIMIT as usize)?;
    Ok(())
}

/// A new gig request at the user's location, on the primary of the owning shard.
async fn post_gig(user: &mut GooseUser) -> TransactionResult {
    let (id, body) = gig_insert(user)?;
    let (mut request, value, _) = call(user, POST_GIG, EXECUTE, &body).await?;
    expect_inserted(user, &mut request, &value, id)?;
    Ok(())
}

/// Post a gig request, then read it back with the read-your-writes token: the read must return
/// the row (from a replica that replayed past the token within 500 ms, else the primary).
async fn write_read(user: &mut GooseUser) -> TransactionResult {
    let (id, body) = gig_insert(user)?;
    let region = body["region"].clone();
    let name = "write_read:execute";
    let (mut request, value, _) = call(user, name, EXECUTE, &body).await?;
    expect_inserted(user, &mut request, &value, id)?;
    let Some(token) = value.get("token").and_then(Value::as_str) else {
        return Err(fail(user, &mut request, &format!("{name}: no read-your-writes token")));
    };
    let read = json!({
        "region": region,
        "sql": "SELECT id, title FROM gig_requests WHERE id = $1",
        "params": [id],
        "consistency": {"after": token, "wait_ms": RYW_WAIT_MS},
    });
    let name = "write_read:query";
    let (mut request, value, _) = call(user, name, QUERY, &read).await?;
    let rows = value.get("rows").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if !rows.iter().any(|row| same_id(&row["id"], id)) {
        return Err(fail(user, &mut request, &format!("{name}: gig request {id} not visible after its token")));
    }
    Ok(())
}

const TITLES: &[&str] = &["Jazz night", "Wedding band", "Open mic host", "String quartet", "DJ set", "Choir"];
const GENRES: &[&str] = &["jazz", "rock", "pop", "classical", "folk", "electronic", "latin", "blues"];

/// The `execute` body of a new gig request at the user's location, and its id.
fn gig_insert(user: &mut GooseUser) -> Result<(i64, Value), Box<TransactionError>> {
    let s = shared();
    let Some(id) = s.ids.next() else {
        return Err(Box::new(TransactionError::Custom("all 2^23 gig request ids of this run are used".into())));
    };
    let rng = rng(user);
    let city = s.cities.pick(rng);
    let (lat, lng) = jitter(rng, city.lat, city.lng, crate::world::USER_JITTER_KM);
    let venue_id = 1 + rng.below(DEMO_VENUES);
    let title = format!("{} in {}", rng.pick(TITLES), city.name);
    let genre = rng.pick(GENRES);
    let budget_cents = 10_000 + 500 * rng.below(400);
    let gig_date = format!("2027-{:02}-{:02}", 1 + rng.below(12), 1 + rng.below(28));
    let body = json!({
        "region": {"lat": lat, "lng": lng},
        "sql": "INSERT INTO gig_requests (id, venue_id, title, genre, budget_cents, gig_date, lat, lng, h3) \
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        "params": [id, venue_id, title, genre, budget_cents, gig_date, lat, lng, h3_of(lat, lng)],
    });
    Ok((id, body))
}

/// POST `body` to `path` as request `name` with the bearer token. A transport error, a status
/// other than 200, a body that is not JSON or a JSON `error` is a failure of this request.
/// Returns the request's metric, the JSON body and the `Cache-Status` header, if any.
async fn call(
    user: &mut GooseUser,
    name: &str,
    path: &str,
    body: &Value,
) -> Result<(GooseRequestMetric, Value, Option<String>), Box<TransactionError>> {
    let builder = user.get_request_builder(&GooseMethod::Post, path)?.bearer_auth(&shared().token).json(body);
    let request = GooseRequest::builder()
        .method(GooseMethod::Post)
        .path(path)
        .name(name)
        .expect_status_code(200)
        .set_request_builder(builder)
        .build();
    let GooseResponse { mut request, response } = user.request(request).await?;
    let response = match response {
        Ok(response) => response,
        Err(e) => return Err(fail(user, &mut request, &format!("{name}: {e}"))),
    };
    let status = response.status().as_u16();
    let cache_status = response.headers().get("cache-status").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = match response.text().await {
        Ok(text) => text,
        Err(e) => return Err(fail(user, &mut request, &format!("{name}: reading the body: {e}"))),
    };
    let value: Value = match serde_json::from_str(&text) {
        Ok(value) => value,
        Err(_) => return Err(fail(user, &mut request, &format!("{name}: {status}, not JSON: {}", clip(&text)))),
    };
    if let Some(error) = value.get("error") {
        let code = error.get("code").and_then(Value::as_str).unwrap_or("?");
        let message = error.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(fail(user, &mut request, &format!("{name}: {status} {code}: {}", clip(message))));
    }
    if status != 200 {
        return Err(fail(user, &mut request, &format!("{name}: status {status}")));
    }
    Ok((request, value, cache_status))
}

/// A read answers with a `rows` array of at most `limit` rows.
fn expect_rows(
    user: &mut GooseUser,
    request: &mut GooseRequestMetric,
    value: &Value,
    limit: usize,
) -> TransactionResult {
    match value.get("rows").and_then(Value::as_array) {
        Some(rows) if rows.len() <= limit => Ok(()),
        Some(rows) => {
            Err(fail(user, request, &format!("{}: {} rows over the limit {limit}", request.name, rows.len())))
        }
        None => Err(fail(user, request, &format!("{}: no rows array", request.name))),
    }
}

/// An insert answers `rows_affected: 1` and returns its id.
fn expect_inserted(
    user: &mut GooseUser,
    request: &mut GooseRequestMetric,
    value: &Value,
    id: i64,
) -> TransactionResult {
    let returned = value.get("rows").and_then(Value::as_array).and_then(|rows| rows.first()).map(|row| &row["id"]);
    if value.get("rows_affected") == Some(&json!(1)) && returned.is_some_and(|v| same_id(v, id)) {
        Ok(())
    } else {
        Err(fail(
            user,
            request,
            &format!("{}: insert of {id} not confirmed: {}", request.name, clip(&value.to_string())),
        ))
    }
}

/// int8 values come as numbers below 2^53 and as decimal strings above.
fn same_id(value: &Value, id: i64) -> bool {
    value.as_i64() == Some(id) || value.as_str() == Some(id.to_string().as_str())
}

/// Mark the request failed (goose counts it once) and give the error to return.
fn fail(user: &mut GooseUser, request: &mut GooseRequestMetric, tag: &str) -> Box<TransactionError> {
    match user.set_failure(tag, request, None, None) {
        Err(e) => e,
        Ok(()) => Box::new(TransactionError::Custom(tag.to_string())),
    }
}

fn clip(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_the_issue_mix() {
        let total: usize = WEIGHTS.iter().map(|(_, w)| w).sum();
        let percent: Vec<usize> = WEIGHTS.iter().map(|(_, w)| w * 100 / total).collect();
        assert_eq!(percent, [70, 15, 10, 5]);
    }

    #[test]
    fn ids_match_as_numbers_or_strings() {
        assert!(same_id(&json!(42), 42));
        assert!(same_id(&json!("9007199254740993"), 9_007_199_254_740_993));
        assert!(!same_id(&json!(43), 42));
        assert!(!same_id(&Value::Null, 42));
    }

    #[test]
    fn clip_keeps_short_text_and_cuts_on_a_char_boundary() {
        assert_eq!(clip("ok"), "ok");
        let long = "é".repeat(300);
        assert_eq!(clip(&long).chars().count(), 201);
    }
}
