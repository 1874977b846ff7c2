//! Request-body parsing shared by the data-plane handlers: JSON bodies, regions and the
//! consistency parameter. Turns client JSON into the data plane's types; runs nothing.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

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
    fn regions() {
        assert_eq!(region(None).unwrap(), None);
        assert_eq!(region(Some(Value::Null)).unwrap(), None);
        assert_eq!(region(Some(json!({"lat": 1.0, "lng": 2.0}))).unwrap().unwrap().lat, Some(1.0));
        assert!(matches!(region(Some(json!({"lat": 1.0, "x": 2}))), Err(ApiError::InvalidRegion(_))));
    }
}
