//! The one place errors become HTTP: status, JSON body `{"error": {code, message, retryable, ...}}`
//! and `Retry-After`. Handlers return `ApiError`; nothing else builds error responses.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;

use crate::backend::BackendError;
pub use crate::error::ApiError;

pub type Body = Full<Bytes>;

/// Identities named in an unknown client's 403 at most (a certificate may carry many SANs).
const NAMED_IDENTITIES: usize = 16;

impl ApiError {
    /// (status, code, retryable)
    fn class(&self) -> (StatusCode, &'static str, bool) {
        use ApiError::*;
        match self {
            InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json", false),
            InvalidRegion(_) => (StatusCode::BAD_REQUEST, "invalid_region", false),
            RegionRequired => (StatusCode::BAD_REQUEST, "region_required", false),
            AreaWrite => (StatusCode::BAD_REQUEST, "area_write", false),
            InvalidParams(_) => (StatusCode::BAD_REQUEST, "invalid_params", false),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", false),
            Forbidden(_) | UnknownClient(_) => (StatusCode::FORBIDDEN, "forbidden", false),
            UnknownDatabase(_) => (StatusCode::NOT_FOUND, "unknown_database", false),
            NoShardForRegion(_) => (StatusCode::NOT_FOUND, "no_shard_for_region", false),
            NotFound => (StatusCode::NOT_FOUND, "not_found", false),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", false),
            UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", false),
            MalformedRequest => (StatusCode::BAD_REQUEST, "malformed_request", false),
            UriTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long", false),
            BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", false),
            HeadersTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", false),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout", true),
            Database { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "database_error", false),
            Unsupported(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported", false),
            ResultTooLarge(_) => (StatusCode::UNPROCESSABLE_ENTITY, "result_too_large", false),
            NotARead(_) => (StatusCode::BAD_REQUEST, "not_a_read", false),
            StatementRefused(_) => (StatusCode::BAD_REQUEST, "statement_refused", false),
            Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "overloaded", true),
            ShardUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "shard_unavailable", true),
            CellsFrozen(_) => (StatusCode::SERVICE_UNAVAILABLE, "cells_frozen", true),
            Conflict(_) => (StatusCode::CONFLICT, "conflict", false),
            Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout", true),
            OutcomeUnknown(_) => (StatusCode::SERVICE_UNAVAILABLE, "write_outcome_unknown", false),
            NotCached => (StatusCode::GATEWAY_TIMEOUT, "not_cached", false),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.class().0
    }

    pub(crate) fn message(&self) -> String {
        use ApiError::*;
        match self {
            InvalidJson(m) => format!("request body is not valid: {m}"),
            InvalidRegion(m) => format!("invalid region: {m}"),
            RegionRequired => "the request needs a region (lat/lng, cell, or an area)".into(),
            AreaWrite => "writes need a point or cell region, not an area".into(),
            InvalidParams(m) => m.clone(),
            Unauthorized => "missing or unknown bearer token".into(),
            Forbidden(scope) => format!("token lacks the {scope} scope"),
            UnknownClient(ids) => match &ids[..ids.len().min(NAMED_IDENTITIES)] {
                [] => "the client certificate carries no SAN URI, SAN DNS name or common name to match a [[clients]] identity".into(),
                [one] => format!("client certificate identity {one} matches no [[clients]] entry"),
                many => format!("client certificate identities {} match no [[clients]] entry", many.join(", ")),
            },
            UnknownDatabase(db) => format!("no database {db:?} in the shard map"),
            NoShardForRegion(cell) => format!("no shard owns cell {cell}"),
            NotFound => "no such route".into(),
            MethodNotAllowed => "method not allowed".into(),
            UnsupportedMediaType(None) => "the request body needs Content-Type: application/json".into(),
            UnsupportedMediaType(Some(t)) => {
                format!("the request body needs Content-Type: application/json, not {t:?}")
            }
            MalformedRequest => "the request head is not valid HTTP/1.1".into(),
            UriTooLong => "the request target is too long".into(),
            BodyTooLarge(limit) => format!("request body exceeds {limit} bytes"),
            HeadersTooLarge => "request headers too large".into(),
            RequestTimeout => "request head not received in time".into(),
            Database { message, .. } => message.clone(),
            Unsupported(m) => m.clone(),
            NotARead(m) | StatementRefused(m) => m.clone(),
            ResultTooLarge(m) => format!("result too large: {m}; narrow the query or page it (LIMIT/OFFSET)"),
            Overloaded(m) => format!("overloaded: {m}"),
            ShardUnavailable { shard, reason } => format!("shard {shard} unavailable: {reason}"),
            CellsFrozen(m) => format!("cells frozen by a live migration: {m}"),
            Conflict(m) => m.clone(),
            Timeout => "request deadline exceeded".into(),
            OutcomeUnknown(m) => format!("write outcome unknown: {m}"),
            NotCached => "nothing cached for this request (Cache-Control: only-if-cached)".into(),
        }
    }

    /// Seconds a client should wait before retrying (429 / 503).
    fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Overloaded(_) => Some(1),
            ApiError::ShardUnavailable { .. } => Some(1),
            ApiError::CellsFrozen(_) => Some(1),
            _ => None,
        }
    }

    pub fn code(&self) -> &'static str {
        self.class().1
    }

    /// The JSON body of this error's response, for answers written outside hyper's service.
    pub fn json_body(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({ "error": self.body() })).expect("serialisable")
    }

    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let retry_after = self.retry_after();
        let mut resp = json_response(status, &json!({ "error": self.body() }));
        if let Some(s) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }

    /// The `{"code", "message", "retryable", ...}` object of an error response.
    fn body(&self) -> serde_json::Value {
        let (_, code, retryable) = self.class();
        let mut err = json!({ "code": code, "message": self.message(), "retryable": retryable });
        if let ApiError::Database { sqlstate, server_code, detail, hint, statement, .. } = self {
            match server_code {
                Some(c) => err["server_code"] = json!(c),
                None => err["sqlstate"] = json!(sqlstate),
            }
            if let Some(d) = detail {
                err["detail"] = json!(d);
            }
            if let Some(h) = hint {
                err["hint"] = json!(h);
            }
            if let Some(s) = statement {
                err["statement"] = json!(s);
            }
        }
        // What the certificate carries, so the operator sees what to configure.
        if let ApiError::UnknownClient(ids) = self {
            err["identities"] = json!(&ids[..ids.len().min(NAMED_IDENTITIES)]);
        }
        if let ApiError::ShardUnavailable { shard, .. } = self {
            err["shard"] = json!(shard);
        }
        err
    }
}

/// The migration control plane's errors (their fault side and retryability, `MigrateError::class`,
/// match the codes chosen here).
impl From<crate::migrate::MigrateError> for ApiError {
    fn from(e: crate::migrate::MigrateError) -> Self {
        use crate::migrate::MigrateError as M;
        match e {
            M::InvalidRequest(m) => ApiError::InvalidParams(m),
            M::Unsupported(m) => ApiError::Unsupported(m),
            M::Conflict(m) => ApiError::Conflict(m),
            M::NotFound => ApiError::NotFound,
            M::ShardUnavailable { shard, reason } => ApiError::ShardUnavailable { shard, reason },
            M::Database { step, sqlstate, message } => ApiError::Database {
                sqlstate,
                server_code: None,
                message: format!("{step}: {message}"),
                detail: None,
                hint: None,
                statement: None,
            },
            // etcd unreachable or the fleet did not acknowledge: 503, retry later.
            M::Fleet(reason) => ApiError::ShardUnavailable { shard: "etcd".into(), reason },
            // Outcomes of a running migration, recorded in its `error`; should a request meet
            // one, the migration's state is what stands in its way.
            other @ (M::Publish(_) | M::Aborted | M::Failpoint | M::Deposed(_)) => {
                ApiError::Conflict(other.to_string())
            }
        }
    }
}

/// A backend failure on `shard` as the error object of a partial success (e.g. one shard's part
/// of a split insert), shaped exactly like the `error` of an error response.
pub fn error_json(e: BackendError, shard: &str) -> serde_json::Value {
    ApiError::from_backend(e, shard).body()
}

pub fn json_response(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("serialisable");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `Cache-Status` (RFC 9211, cache name `cellgate`) and, for answers from the cache, `Age`:
/// `cellgate; hit; ttl=12` (negative ttl: served stale while it is refreshed; `detail=l2` when
/// Redis answered), `cellgate; fwd=miss; stored; ttl=30`, `cellgate; fwd=miss; collapsed` (another
/// request's read answered), `cellgate; fwd=request; stored` (`no-cache`), `cellgate;
/// fwd=bypass; detail=redis-down`, and `cellgate; fwd=miss; detail=only-if-cached` on the 504.
pub fn cache_headers(resp: &mut Response<Body>, c: &crate::dataplane::cache::CacheStatus) {
    use crate::dataplane::cache::{CacheStatus, Level};
    let (value, age) = match c {
        CacheStatus::Hit { level, stale: _, ttl_s, age_s } => {
            let l2 = if *level == Level::L2 { "; detail=l2" } else { "" };
            (format!("cellgate; hit; ttl={ttl_s}{l2}"), Some(*age_s))
        }
        CacheStatus::Forward { no_cache, collapsed, stored, ttl_s } => {
            let mut v = String::from(if *no_cache { "cellgate; fwd=request" } else { "cellgate; fwd=miss" });
            if *collapsed {
                v.push_str("; collapsed");
            }
            if *stored {
                v.push_str("; stored");
            }
            if let Some(t) = ttl_s {
                v.push_str(&format!("; ttl={t}"));
            }
            (v, None)
        }
        CacheStatus::Bypass(b) => (format!("cellgate; fwd=bypass; detail={}", b.as_str()), None),
        CacheStatus::OnlyIfCachedMiss => ("cellgate; fwd=miss; detail=only-if-cached".into(), None),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert("cache-status", v);
    }
    if let Some(a) = age {
        resp.headers_mut().insert(header::AGE, HeaderValue::from(a));
    }
}

pub fn text_response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
