//! Area reads over SQL shards: the k-way merge of per-shard rows on the request's `order_by`
//! columns, then the limit. Pure over `Rows`.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ApiError;
use crate::backend::postgres::Rows;

/// How per-shard results of an area read are combined (`Serialize`: part of a cache key).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    #[serde(default)]
    pub order_by: Vec<OrderBy>,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrderBy {
    pub column: String,
    #[serde(default)]
    pub desc: bool,
}

/// Compare two JSON cells of one column. Numbers numerically; numeric/int8 columns may carry
/// exact values as strings, compared numerically too; NULLs sort last (as PostgreSQL's ASC).
fn cmp_values(a: &Value, b: &Value, numeric_strings: bool) -> Ordering {
    fn num(v: &Value, strings: bool) -> Option<f64> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) if strings => s.parse().ok(),
            _ => None,
        }
    }
    match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Greater,
        (_, Value::Null) => Ordering::Less,
        _ => match (num(a, numeric_strings), num(b, numeric_strings)) {
            (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            _ => match (a, b) {
                (Value::String(x), Value::String(y)) => x.cmp(y),
                (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
                _ => a.to_string().cmp(&b.to_string()),
            },
        },
    }
}

/// k-way merge of per-shard results (each already ordered by the query's ORDER BY) on the given
/// columns, then the limit. Without `merge`, rows are concatenated in shard order.
pub fn merge_rows(parts: Vec<Rows>, merge: Option<&Merge>) -> Result<Rows, ApiError> {
    let columns = parts.iter().find(|p| !p.columns.is_empty()).map(|p| p.columns.clone()).unwrap_or_default();
    let Some(m) = merge else {
        let rows = parts.into_iter().flat_map(|p| p.rows).collect();
        return Ok(Rows { columns, rows });
    };
    let mut keys = Vec::with_capacity(m.order_by.len());
    for o in &m.order_by {
        let i = columns.iter().position(|(n, _)| *n == o.column).ok_or_else(|| {
            ApiError::InvalidParams(format!("merge.order_by: column {:?} is not in the result", o.column))
        })?;
        // Exact numbers that may arrive as strings: PostgreSQL numeric/int8, SQL Server
        // decimal/numeric/money/bigint.
        let numeric = matches!(columns[i].1.as_str(), "numeric" | "int8" | "decimal" | "money" | "bigint");
        keys.push((i, o.desc, numeric));
    }
    let cmp = |a: &Vec<Value>, b: &Vec<Value>| {
        for (i, desc, numeric) in &keys {
            let o = cmp_values(&a[*i], &b[*i], *numeric);
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    };
    let parts = parts.into_iter().map(|p| p.rows).collect();
    let rows = crate::kmerge::merge_sorted(parts, m.limit.unwrap_or(usize::MAX), cmp);
    Ok(Rows { columns, rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(vals: &[(i64, &str)]) -> Rows {
        Rows {
            columns: vec![("dist".into(), "int8".into()), ("name".into(), "text".into())],
            rows: vals.iter().map(|(d, n)| vec![json!(d), json!(n)]).collect(),
        }
    }

    #[test]
    fn k_way_merge_then_limit() {
        let parts = vec![rows(&[(1, "a"), (4, "d"), (9, "i")]), rows(&[(2, "b"), (3, "c")]), rows(&[])];
        let m = Merge { order_by: vec![OrderBy { column: "dist".into(), desc: false }], limit: Some(4) };
        let out = merge_rows(parts, Some(&m)).unwrap();
        let names: Vec<_> = out.rows.iter().map(|r| r[1].as_str().unwrap().to_string()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let bad = Merge { order_by: vec![OrderBy { column: "nope".into(), desc: false }], limit: None };
        assert!(merge_rows(vec![rows(&[(1, "a")])], Some(&bad)).is_err());
    }

    #[test]
    fn exact_numbers_as_strings_merge_numerically() {
        // SQL Server decimal columns arrive as strings: "9.25" < "10.5" numerically, not as text.
        let part = |v: &[&str]| Rows {
            columns: vec![("price".into(), "decimal".into())],
            rows: v.iter().map(|p| vec![json!(p)]).collect(),
        };
        let m = Merge { order_by: vec![OrderBy { column: "price".into(), desc: false }], limit: None };
        let out = merge_rows(vec![part(&["9.25", "10.5"]), part(&["9.5", "100"])], Some(&m)).unwrap();
        let got: Vec<_> = out.rows.iter().map(|r| r[0].as_str().unwrap().to_string()).collect();
        assert_eq!(got, ["9.25", "9.5", "10.5", "100"]);
    }
}
