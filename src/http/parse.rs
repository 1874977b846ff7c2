//! Request-body parsing shared by the data-plane handlers: JSON bodies, regions, the
//! consistency parameter and the read cache's ask (the body's `cache` member and the
//! `Cache-Control` request header). Turns client JSON into the data plane's types; runs nothing.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::dataplane::cache::CacheAsk;
use crate::dataplane::{ApiError, Consistency, RegionSpec, parse_token};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionJson {
    lat: Option<f64>,
    lng: Option<f64>,
    cell: Option<String>,
    radius_km: Option<f64>,
}

/// A request body: strict JSON (duplicate keys, arrays as objects refused; errors with paths,
/// in the API's terms — `http::json`).
pub fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    super::json::parse_strict(body).map_err(ApiError::InvalidJson)
}

/// The `region` member: absent or null is `None` (the data plane decides whether it is needed).
pub fn region(v: Option<Value>) -> Result<Option<RegionSpec>, ApiError> {
    let v = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let r: RegionJson = super::json::from_value_strict(v, "region").map_err(ApiError::InvalidRegion)?;
    Ok(Some(RegionSpec { lat: r.lat, lng: r.lng, cell: r.cell, radius_km: r.radius_km }))
}

/// `"replica"` (default), `"primary"` or `{"after": token, "wait_ms": n}` (wait capped).
pub fn consistency(v: Option<Value>, max_wait_ms: u64) -> Result<Consistency, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Consistency::Replica),
        Some(Value::String(s)) if s == "replica" => Ok(Consistency::Replica),
        Some(Value::String(s)) if s == "primary" => Ok(Consistency::Primary),
        Some(Value::Object(o)) => {
            let mut token = None;
            let mut wait = 0u64;
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("after", Value::String(t)) => token = Some(t),
                    ("wait_ms", Value::Number(n)) if n.as_u64().is_some() => wait = n.as_u64().unwrap_or(0),
                    _ => {
                        return Err(ApiError::InvalidParams(format!(
                            "consistency: unexpected field or value {k:?} (expected after: string, wait_ms: integer >= 0)"
                        )));
                    }
                }
            }
            let token = token.ok_or_else(|| ApiError::InvalidParams("consistency object needs \"after\"".into()))?;
            let (shard, lsn) = parse_token(&token)
                .ok_or_else(|| ApiError::InvalidParams("consistency.after is not a token cellgate issued".into()))?;
            Ok(Consistency::After { shard, lsn, wait: Duration::from_millis(wait.min(max_wait_ms)) })
        }
        Some(other) => Err(ApiError::InvalidParams(format!(
            "consistency must be \"replica\", \"primary\" or {{\"after\": token}}, got {other}"
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheJson {
    ttl_ms: u64,
    #[serde(default)]
    swr_ms: u64,
}

/// What a read asks of the cache: the body's `"cache": {"ttl_ms", "swr_ms"}` (absent or null:
/// no opt-in — the table's policy in the map, if any, applies; `false`: never cached) and the `Cache-Control` directives `no-cache`, `no-store`, `only-if-cached` (any
/// case, in any `Cache-Control` line; other directives are ignored).
pub fn cache(v: Option<Value>, headers: &http::HeaderMap) -> Result<CacheAsk, ApiError> {
    let mut opt_out = false;
    let opt_in = match v {
        None | Some(Value::Null) => None,
        // Not cached, whatever the table's policy in the map says.
        Some(Value::Bool(false)) => {
            opt_out = true;
            None
        }
        Some(v) => {
            let c: CacheJson = super::json::from_value_strict(v, "cache").map_err(ApiError::InvalidJson)?;
            if c.ttl_ms == 0 {
                return Err(ApiError::InvalidParams("cache.ttl_ms must be at least 1".into()));
            }
            Some((Duration::from_millis(c.ttl_ms), Duration::from_millis(c.swr_ms)))
        }
    };
    let mut ask = CacheAsk { opt_in, opt_out, ..Default::default() };
    for line in headers.get_all(http::header::CACHE_CONTROL) {
        for d in String::from_utf8_lossy(line.as_bytes()).split(',') {
            let name = d.split('=').next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case("no-cache") {
                ask.no_cache = true;
            } else if name.eq_ignore_ascii_case("no-store") {
                ask.no_store = true;
            } else if name.eq_ignore_ascii_case("only-if-cached") {
                ask.only_if_cached = true;
            }
        }
    }
    Ok(ask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::make_token;
    use serde_json::json;

    #[test]
    fn consistency_values() {
        let t = make_token("eu-1", 0x16_b374_d848);
        assert!(consistency(Some(json!({"after": "zzz"})), 100).is_err());
        assert!(consistency(Some(json!({"after": t, "wait_ms": -1})), 100).is_err());
        assert_eq!(
            consistency(Some(json!({"after": t, "wait_ms": 5000})), 100).unwrap(),
            Consistency::After { shard: "eu-1".into(), lsn: 0x16_b374_d848, wait: Duration::from_millis(100) }
        );
        assert_eq!(consistency(None, 100).unwrap(), Consistency::Replica);
        assert_eq!(consistency(Some(json!("primary")), 100).unwrap(), Consistency::Primary);
        assert!(consistency(Some(json!(3)), 100).is_err());
    }

    #[test]
    fn cache_asks() {
        let none = http::HeaderMap::new();
        assert_eq!(cache(None, &none).unwrap(), CacheAsk::default());
        let ask = cache(Some(json!({"ttl_ms": 30000, "swr_ms": 5000})), &none).unwrap();
        assert_eq!(ask.opt_in, Some((Duration::from_secs(30), Duration::from_secs(5))));
        assert_eq!(
            cache(Some(json!({"ttl_ms": 10})), &none).unwrap().opt_in,
            Some((Duration::from_millis(10), Duration::ZERO))
        );
        assert!(matches!(cache(Some(json!({"ttl_ms": 0})), &none), Err(ApiError::InvalidParams(_))));
        assert!(matches!(cache(Some(json!({"ttl_ms": 1, "x": 1})), &none), Err(ApiError::InvalidJson(_))));
        assert!(matches!(cache(Some(json!({"swr_ms": 1})), &none), Err(ApiError::InvalidJson(_))));
        let off = cache(Some(json!(false)), &none).unwrap();
        assert!(off.opt_out && off.opt_in.is_none());
        assert!(matches!(cache(Some(json!(true)), &none), Err(ApiError::InvalidJson(_))));
        let mut h = http::HeaderMap::new();
        h.append(http::header::CACHE_CONTROL, http::HeaderValue::from_static("No-Cache, max-age=0"));
        h.append(http::header::CACHE_CONTROL, http::HeaderValue::from_static("only-if-cached"));
        let ask = cache(None, &h).unwrap();
        assert!(ask.no_cache && ask.only_if_cached && !ask.no_store);
    }

    #[test]
    fn regions() {
        assert_eq!(region(None).unwrap(), None);
        assert_eq!(region(Some(Value::Null)).unwrap(), None);
        assert_eq!(region(Some(json!({"lat": 1.0, "lng": 2.0}))).unwrap().unwrap().lat, Some(1.0));
        assert!(matches!(region(Some(json!({"lat": 1.0, "x": 2}))), Err(ApiError::InvalidRegion(_))));
    }
}
