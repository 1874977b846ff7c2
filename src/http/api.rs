//! SQL handlers (design §3): `POST /v1/sql/{db}/query|execute`. Parse the body into a data-plane
//! plan, run it (`dataplane::sql`), render the rows. No policy here: which endpoint, retries,
//! holds and merges are the data plane's.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::parse;
use crate::app::AppState;
use crate::backend::postgres::Rows;
use crate::dataplane::merge::Merge;
use crate::dataplane::sql::{self, ReadPlan, SqlResult, WritePlan};
use crate::dataplane::{ApiError, Outcome, ShardInfo};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    region: Option<Value>,
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
    consistency: Option<Value>,
    merge: Option<Merge>,
    row_format: Option<RowFormat>,
    /// The read cache opt-in: `{"ttl_ms": n, "swr_ms": m}` (docs/cache.md).
    cache: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteRequest {
    region: Option<Value>,
    sql: Option<String>,
    #[serde(default)]
    params: Vec<Value>,
    batch: Option<Vec<Statement>>,
    row_format: Option<RowFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RowFormat {
    #[default]
    Object,
    Array,
}

/// `headers`: the request's, for `Cache-Control`.
pub async fn query(
    state: &AppState,
    db: &str,
    body: &[u8],
    headers: &http::HeaderMap,
    out: &mut Outcome,
) -> Result<Answer, ApiError> {
    let req: QueryRequest = parse::json(body)?;
    let plan = ReadPlan {
        db: db.to_string(),
        region: parse::region(req.region)?,
        sql: req.sql,
        params: req.params,
        consistency: parse::consistency(req.consistency, state.config.limits.max_wait_ms)?,
        merge: req.merge,
        cache: parse::cache(req.cache, headers)?,
    };
    let r = sql::read(state, &plan, out).await?;
    Ok(render(r, req.row_format.unwrap_or_default()))
}

/// `allow_ddl`: the token has the `ddl` scope (checked by the listener, which holds the header).
pub async fn execute(
    state: &AppState,
    db: &str,
    body: &[u8],
    allow_ddl: bool,
    out: &mut Outcome,
) -> Result<Answer, ApiError> {
    let req: ExecuteRequest = parse::json(body)?;
    let stmts = match (req.sql, req.batch) {
        (Some(sql), None) => vec![(sql, req.params)],
        (None, Some(batch)) if !batch.is_empty() && req.params.is_empty() => {
            batch.into_iter().map(|s| (s.sql, s.params)).collect()
        }
        (None, Some(_)) => {
            return Err(ApiError::InvalidJson(
                "batch must be a non-empty list (params go inside each statement)".into(),
            ));
        }
        (Some(_), Some(_)) => return Err(ApiError::InvalidJson("give either sql or batch, not both".into())),
        (None, None) => return Err(ApiError::InvalidJson("missing field `sql` (or `batch`)".into())),
    };
    let plan = WritePlan { db: db.to_string(), region: parse::region(req.region)?, stmts, allow_ddl };
    let r = sql::write(state, &plan, out).await?;
    Ok(render(r, req.row_format.unwrap_or_default()))
}

/// A successful answer, serialised straight from the backend rows (no intermediate JSON tree).
#[derive(Serialize)]
pub struct Answer {
    columns: Vec<ColumnOut>,
    rows: RowsOut,
    shards: Vec<ShardInfo>,
    map_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows_affected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

#[derive(Serialize)]
struct ColumnOut {
    name: String,
    r#type: String,
}

struct RowsOut {
    rows: Rows,
    format: RowFormat,
}

impl Serialize for RowsOut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let mut seq = s.serialize_seq(Some(self.rows.rows.len()))?;
        for row in &self.rows.rows {
            match self.format {
                RowFormat::Array => seq.serialize_element(row)?,
                RowFormat::Object => {
                    struct Obj<'a>(&'a [(String, String)], &'a [Value]);
                    impl Serialize for Obj<'_> {
                        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                            let mut m = s.serialize_map(Some(self.1.len()))?;
                            for ((name, _), v) in self.0.iter().zip(self.1) {
                                m.serialize_entry(name, v)?;
                            }
                            m.end()
                        }
                    }
                    seq.serialize_element(&Obj(&self.rows.columns, row))?
                }
            }
        }
        seq.end()
    }
}

fn render(r: SqlResult, format: RowFormat) -> Answer {
    let columns = r.rows.columns.iter().map(|(n, t)| ColumnOut { name: n.clone(), r#type: t.clone() }).collect();
    Answer {
        columns,
        rows: RowsOut { rows: r.rows, format },
        shards: r.shards,
        map_version: r.map_version,
        rows_affected: r.rows_affected,
        token: r.token,
    }
}
