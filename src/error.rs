//! The request's error as the API reports it: one enum for every data- and admin-plane failure,
//! built by the floors below HTTP (data plane, control plane) and classified once. Knows no HTTP:
//! `http::respond` is the one place that maps each variant to a status, code and body.

use crate::backend::BackendError;

/// `Clone`: one single-flight fill's failure is every waiting caller's answer (`cache::flight`).
#[derive(Debug, Clone)]
pub enum ApiError {
    InvalidJson(String),
    InvalidRegion(String),
    RegionRequired,
    AreaWrite,
    InvalidParams(String),
    Unauthorized,
    Forbidden(&'static str),
    /// A client certificate whose identities (SAN URIs, DNS names, CN; public names, never
    /// secrets) match no `[[clients]]` entry.
    UnknownClient(Vec<String>),
    UnknownDatabase(String),
    NoShardForRegion(String),
    BodyTooLarge(usize),
    HeadersTooLarge,
    RequestTimeout,
    NotFound,
    MethodNotAllowed,
    /// A data-plane body that is not declared `application/json` (what was declared, if anything).
    UnsupportedMediaType(Option<String>),
    /// A request head hyper could not parse (hyper answers it; we give it the JSON body).
    MalformedRequest,
    /// A request target longer than hyper accepts (hyper answers it; we give it the JSON body).
    UriTooLong,
    Database {
        sqlstate: Option<String>,
        /// SQL Server error number or MongoDB error code (`server_code` in the JSON).
        server_code: Option<i64>,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
        /// Batch index; u32 keeps `ApiError` under clippy's large-error threshold.
        statement: Option<u32>,
    },
    Overloaded(String),
    ShardUnavailable {
        shard: String,
        reason: String,
    },
    CellsFrozen(String),
    Conflict(String),
    Timeout,
    Unsupported(String),
    /// `/query` got a statement that is not a read (its kind named); refused before any backend.
    NotARead(String),
    /// A statement no endpoint runs (session or transaction control, a denied function,
    /// unparseable SQL); refused before any backend.
    StatementRefused(String),
    /// A statement's result exceeded `[limits]` (named in the message).
    ResultTooLarge(String),
    /// A write reached a shard but may or may not count (a migration fence came meanwhile).
    OutcomeUnknown(String),
    /// `Cache-Control: only-if-cached` and nothing usable is cached (RFC 9111: 504).
    NotCached,
}

impl ApiError {
    /// Map a backend failure on `shard`.
    pub fn from_backend(e: BackendError, shard: &str) -> ApiError {
        let statement = match &e {
            BackendError::InStatement { index, .. } => u32::try_from(*index).ok(),
            _ => None,
        };
        match e.root() {
            BackendError::Unavailable { endpoint, reason } => {
                ApiError::ShardUnavailable { shard: shard.into(), reason: format!("{endpoint}: {reason}") }
            }
            BackendError::ReadOnly { endpoint } => ApiError::ShardUnavailable {
                shard: shard.into(),
                reason: format!("{endpoint} is not a writable primary"),
            },
            BackendError::Overloaded { endpoint } => ApiError::Overloaded(format!("no free connection to {endpoint}")),
            BackendError::Timeout => ApiError::Timeout,
            BackendError::Database { sqlstate, message, detail, hint, .. } => ApiError::Database {
                sqlstate: Some(sqlstate.clone()),
                server_code: None,
                message: message.clone(),
                detail: detail.clone(),
                hint: hint.clone(),
                statement,
            },
            BackendError::Params(p) => ApiError::InvalidParams(match statement {
                Some(i) => format!("statement {i}: {p}"),
                None => p.to_string(),
            }),
            BackendError::Server { code, message } => ApiError::Database {
                sqlstate: None,
                server_code: Some(*code),
                message: message.clone(),
                detail: None,
                hint: None,
                statement,
            },
            BackendError::BadInput(m) => ApiError::InvalidParams(match statement {
                Some(i) => format!("statement {i}: {m}"),
                None => m.clone(),
            }),
            BackendError::Column(c) => ApiError::Database {
                sqlstate: None,
                server_code: None,
                message: c.to_string(),
                detail: None,
                hint: Some("cast the column to text in the query".into()),
                statement,
            },
            BackendError::Unsupported(m) => ApiError::Unsupported(m.clone()),
            BackendError::ResultTooLarge(m) => ApiError::ResultTooLarge(match statement {
                Some(i) => format!("statement {i}: {m}"),
                None => m.clone(),
            }),
            BackendError::Fenced(m) => ApiError::CellsFrozen(m.clone()),
            BackendError::OutcomeUnknown(m) => ApiError::OutcomeUnknown(m.clone()),
            BackendError::InStatement { .. } => unreachable!("root() strips batch tags"),
        }
    }
}
