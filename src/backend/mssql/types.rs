//! JSON ↔ SQL Server value conversion: owns the parameter typing scheme (server-described type,
//! else the JSON value's shape), the `@P1..@Pn` declaration text and result-column decoding to
//! JSON; must not touch connections, pools, HTTP or routing.
//!
//! # Parameter typing
//!
//! JSON carries no SQL types. For each SQL text, the backend asks the server once per endpoint
//! (`sp_describe_undeclared_parameters`) which type each `@Pn` should have; each JSON value is
//! converted to that type ([`SqlType`]). When the server cannot describe the text (it rejects
//! it, or a parameter is used where no type can be deduced), the value's own JSON shape decides
//! ([`from_shape`]); the server then converts implicitly where T-SQL allows it.
//!
//! | SQL Server type | JSON accepted in (described) | JSON out |
//! |---|---|---|
//! | `tinyint`, `smallint`, `int` | integer number (range-checked) or an integer string | number |
//! | `bigint` | integer number or integer string | number if \|v\| ≤ 2^53, else string |
//! | `bit` | `true`/`false`, `0`/`1` | `true`/`false` |
//! | `real`, `float` | number | number (non-finite as a string) |
//! | `decimal(p,s)`, `numeric(p,s)`, `money`, `smallmoney` | decimal string (exact) or number | string, exact, with the column's scale |
//! | `char`, `varchar`, `nchar`, `nvarchar`, `text`, `ntext`, `xml` | string (objects/arrays as JSON text) | string |
//! | `datetime2`, `datetime`, `smalldatetime` | RFC 3339 / `YYYY-MM-DDTHH:MM:SS[.f]`; an offset is converted to UTC | `YYYY-MM-DDTHH:MM:SS[.f]` |
//! | `datetimeoffset` | RFC 3339 with offset (none means UTC) | RFC 3339 with the stored offset |
//! | `date` | `YYYY-MM-DD` | `YYYY-MM-DD` |
//! | `time` | `HH:MM:SS[.f]` | `HH:MM:SS[.f]` |
//! | `uniqueidentifier` | UUID string | lowercase hyphenated string |
//! | `binary`, `varbinary`, `image` | base64 string | base64 (standard, padded) |
//!
//! JSON `null` is SQL NULL for every type. Undescribed values by shape: `null` → NULL
//! `nvarchar`, boolean → `bit`, integer → `bigint` (beyond i64: `numeric(20,0)`), other number →
//! `float`, string → `nvarchar`, object/array → `nvarchar` JSON text. A string is never
//! guessed to be a date or binary: without a description, `varbinary` needs `CONVERT` in SQL.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde_json::Value;
use tiberius::numeric::Numeric;
use tiberius::time::{Date, DateTime2, DateTimeOffset, Time};
use tiberius::{ColumnData, ColumnType, Uuid};

/// A parameter type the server described, reduced to what conversion needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlType {
    TinyInt,
    SmallInt,
    Int,
    BigInt,
    Bit,
    Real,
    Float,
    Decimal {
        precision: u8,
        scale: u8,
    },
    Money,
    Text,
    DateTime2,
    DateTimeOffset,
    Date,
    Time,
    Uuid,
    Binary,
    /// A type with no JSON conversion here (sql_variant, geography, …): the value's shape decides.
    Other,
}

impl SqlType {
    /// Parse `suggested_system_type_name` (`int`, `decimal(10,2)`, `nvarchar(50)`, …).
    pub fn parse(name: &str) -> SqlType {
        let lower = name.trim().to_ascii_lowercase();
        let (base, args) = match lower.split_once('(') {
            Some((b, rest)) => (b.trim(), rest.trim_end_matches(')')),
            None => (lower.as_str(), ""),
        };
        match base {
            "tinyint" => SqlType::TinyInt,
            "smallint" => SqlType::SmallInt,
            "int" => SqlType::Int,
            "bigint" => SqlType::BigInt,
            "bit" => SqlType::Bit,
            "real" => SqlType::Real,
            "float" => SqlType::Float,
            "decimal" | "numeric" => {
                let mut it = args.split(',').map(|s| s.trim().parse::<u8>().ok());
                let precision = it.next().flatten().unwrap_or(18).clamp(1, 38);
                let scale = it.next().flatten().unwrap_or(0).min(precision);
                SqlType::Decimal { precision, scale }
            }
            "money" | "smallmoney" => SqlType::Money,
            "char" | "varchar" | "nchar" | "nvarchar" | "text" | "ntext" | "xml" | "sysname" => SqlType::Text,
            "datetime2" | "datetime" | "smalldatetime" => SqlType::DateTime2,
            "datetimeoffset" => SqlType::DateTimeOffset,
            "date" => SqlType::Date,
            "time" => SqlType::Time,
            "uniqueidentifier" => SqlType::Uuid,
            "binary" | "varbinary" | "image" | "timestamp" | "rowversion" => SqlType::Binary,
            _ => SqlType::Other,
        }
    }
}

/// One bound parameter: its value and the type declared for it in `sp_executesql`'s `@params`.
#[derive(Debug, Clone)]
pub struct Bound {
    pub value: ColumnData<'static>,
    pub decl: String,
}

/// Why a JSON value cannot be bound (mapped to 400 `invalid_params`).
pub fn bad(n: usize, what: &str, got: &Value) -> String {
    let shown: String = got.to_string().chars().take(60).collect();
    format!("parameter @P{n}: expected {what}, got {shown}")
}

/// Convert the JSON value of `@P{n}` to `ty` (the server's description), one family of types
/// per step below.
pub fn bind_described(n: usize, ty: &SqlType, v: &Value) -> Result<Bound, String> {
    match ty {
        SqlType::Other => from_shape(n, v),
        SqlType::TinyInt | SqlType::SmallInt | SqlType::Int | SqlType::BigInt | SqlType::Bit => bind_integer(n, ty, v),
        SqlType::Real | SqlType::Float => bind_float(n, v),
        SqlType::Decimal { .. } | SqlType::Money => bind_decimal(n, ty, v),
        SqlType::Text => Ok(text(v)),
        SqlType::DateTime2 | SqlType::DateTimeOffset | SqlType::Date | SqlType::Time => bind_temporal(n, ty, v),
        SqlType::Uuid | SqlType::Binary => bind_bytes(n, ty, v),
    }
}

/// Integer types and `bit`, range-checked against the described type.
fn bind_integer(n: usize, ty: &SqlType, v: &Value) -> Result<Bound, String> {
    let decl_int = |d: &str| d.to_string();
    Ok(match ty {
        SqlType::TinyInt | SqlType::SmallInt | SqlType::Int => {
            let (min, max, name) = match ty {
                SqlType::TinyInt => (0i64, 255i64, "tinyint"),
                SqlType::SmallInt => (i16::MIN as i64, i16::MAX as i64, "smallint"),
                _ => (i32::MIN as i64, i32::MAX as i64, "int"),
            };
            let value = match v {
                Value::Null => None,
                _ => {
                    let i = as_i64(v).ok_or_else(|| bad(n, &format!("an integer ({name})"), v))?;
                    if i < min || i > max {
                        return Err(format!("parameter @P{n}: {i} is out of range for {name} ({min} to {max})"));
                    }
                    Some(i as i32)
                }
            };
            Bound { value: ColumnData::I32(value), decl: decl_int(name) }
        }
        SqlType::BigInt => {
            let value = match v {
                Value::Null => None,
                _ => Some(as_i64(v).ok_or_else(|| bad(n, "an integer (bigint)", v))?),
            };
            Bound { value: ColumnData::I64(value), decl: "bigint".into() }
        }
        SqlType::Bit => {
            let value = match v {
                Value::Null => None,
                Value::Bool(b) => Some(*b),
                Value::Number(x) if x.as_u64() == Some(0) => Some(false),
                Value::Number(x) if x.as_u64() == Some(1) => Some(true),
                _ => return Err(bad(n, "true/false (bit)", v)),
            };
            Bound { value: ColumnData::Bit(value), decl: "bit".into() }
        }
        _ => unreachable!("bind_described dispatches only these types here"),
    })
}

/// `real` / `float`: any JSON number.
fn bind_float(n: usize, v: &Value) -> Result<Bound, String> {
    let value = match v {
        Value::Null => None,
        Value::Number(x) => x.as_f64(),
        _ => return Err(bad(n, "a number (float)", v)),
    };
    Ok(Bound { value: ColumnData::F64(value), decl: "float".into() })
}

/// `decimal(p,s)` and `money` from decimal strings or plain numbers (exact, never via f64).
fn bind_decimal(n: usize, ty: &SqlType, v: &Value) -> Result<Bound, String> {
    Ok(match ty {
        SqlType::Decimal { precision, scale } => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => Some(parse_decimal(s).ok_or_else(|| bad(n, "a decimal string", v))?),
                Value::Number(x) => {
                    Some(parse_decimal(&x.to_string()).ok_or_else(|| bad(n, "a plain decimal number", v))?)
                }
                _ => return Err(bad(n, "a decimal string", v)),
            };
            Bound { value: ColumnData::Numeric(value), decl: format!("decimal({precision},{scale})") }
        }
        SqlType::Money => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => Some(parse_decimal(s).ok_or_else(|| bad(n, "a decimal string (money)", v))?),
                Value::Number(x) => {
                    Some(parse_decimal(&x.to_string()).ok_or_else(|| bad(n, "a plain decimal number (money)", v))?)
                }
                _ => return Err(bad(n, "a decimal string (money)", v)),
            };
            // Declared as decimal: the server converts to money on assignment.
            let decl = match value {
                Some(num) => format!("decimal(38,{})", num.scale()),
                None => "decimal(19,4)".into(),
            };
            Bound { value: ColumnData::Numeric(value), decl }
        }
        _ => unreachable!("bind_described dispatches only these types here"),
    })
}

/// Dates and times from RFC 3339 / ISO strings.
fn bind_temporal(n: usize, ty: &SqlType, v: &Value) -> Result<Bound, String> {
    Ok(match ty {
        SqlType::DateTime2 => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => {
                    Some(to_datetime2(parse_naive_or_utc(s).ok_or_else(|| bad(n, "an RFC 3339 timestamp", v))?))
                }
                _ => return Err(bad(n, "an RFC 3339 timestamp string", v)),
            };
            Bound { value: ColumnData::DateTime2(value), decl: "datetime2(7)".into() }
        }
        SqlType::DateTimeOffset => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => {
                    let dt = parse_offset(s).ok_or_else(|| bad(n, "an RFC 3339 timestamp with offset", v))?;
                    let minutes = (dt.offset().local_minus_utc() / 60) as i16;
                    Some(DateTimeOffset::new(to_datetime2(dt.naive_utc()), minutes))
                }
                _ => return Err(bad(n, "an RFC 3339 timestamp string", v)),
            };
            Bound { value: ColumnData::DateTimeOffset(value), decl: "datetimeoffset(7)".into() }
        }
        SqlType::Date => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => {
                    let d =
                        NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").map_err(|_| bad(n, "a date YYYY-MM-DD", v))?;
                    Some(to_date(d).ok_or_else(|| bad(n, "a date in 0001..9999", v))?)
                }
                _ => return Err(bad(n, "a date string", v)),
            };
            Bound { value: ColumnData::Date(value), decl: "date".into() }
        }
        SqlType::Time => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => {
                    let t = NaiveTime::parse_from_str(s.trim(), "%H:%M:%S%.f")
                        .or_else(|_| NaiveTime::parse_from_str(s.trim(), "%H:%M"))
                        .map_err(|_| bad(n, "a time HH:MM:SS[.f]", v))?;
                    Some(to_time(t))
                }
                _ => return Err(bad(n, "a time string", v)),
            };
            Bound { value: ColumnData::Time(value), decl: "time(7)".into() }
        }
        _ => unreachable!("bind_described dispatches only these types here"),
    })
}

/// `uniqueidentifier` from UUID strings, `varbinary` from base64.
fn bind_bytes(n: usize, ty: &SqlType, v: &Value) -> Result<Bound, String> {
    Ok(match ty {
        SqlType::Uuid => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => Some(Uuid::try_parse(s.trim()).map_err(|_| bad(n, "a UUID string", v))?),
                _ => return Err(bad(n, "a UUID string", v)),
            };
            Bound { value: ColumnData::Guid(value), decl: "uniqueidentifier".into() }
        }
        SqlType::Binary => {
            let value = match v {
                Value::Null => None,
                Value::String(s) => {
                    Some(Cow::Owned(BASE64.decode(s.trim()).map_err(|_| bad(n, "a base64 string (varbinary)", v))?))
                }
                _ => return Err(bad(n, "a base64 string (varbinary)", v)),
            };
            Bound { value: ColumnData::Binary(value), decl: "varbinary(max)".into() }
        }
        _ => unreachable!("bind_described dispatches only these types here"),
    })
}

/// Type a value by its JSON shape (no server description available).
pub fn from_shape(n: usize, v: &Value) -> Result<Bound, String> {
    Ok(match v {
        Value::Null => Bound { value: ColumnData::String(None), decl: "nvarchar(4000)".into() },
        Value::Bool(b) => Bound { value: ColumnData::Bit(Some(*b)), decl: "bit".into() },
        Value::Number(x) => {
            if let Some(i) = x.as_i64() {
                Bound { value: ColumnData::I64(Some(i)), decl: "bigint".into() }
            } else if let Some(u) = x.as_u64() {
                Bound {
                    value: ColumnData::Numeric(Some(Numeric::new_with_scale(u as i128, 0))),
                    decl: "numeric(20,0)".into(),
                }
            } else {
                let f = x.as_f64().ok_or_else(|| bad(n, "a finite number", v))?;
                Bound { value: ColumnData::F64(Some(f)), decl: "float".into() }
            }
        }
        Value::String(_) | Value::Array(_) | Value::Object(_) => text(v),
    })
}

fn text(v: &Value) -> Bound {
    let s = match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    // nvarchar(max) always: a sized declaration would truncate longer values silently.
    Bound { value: ColumnData::String(s.map(Cow::Owned)), decl: "nvarchar(max)".into() }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(x) => x.as_i64().or_else(|| {
            x.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= 9.007_199_254_740_992e15).map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `"-12.345"` → value -12345, scale 3. Plain notation only; at most 38 digits.
pub fn parse_decimal(s: &str) -> Option<Numeric> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let all = format!("{int}{frac}");
    let trimmed = all.trim_start_matches('0');
    if trimmed.len() > 38 || frac.len() > 38 {
        return None;
    }
    let mut value: i128 = if trimmed.is_empty() { 0 } else { trimmed.parse().ok()? };
    if neg {
        value = -value;
    }
    Some(Numeric::new_with_scale(value, frac.len() as u8))
}

/// Exact text of a numeric: `value / 10^scale` with `scale` digits after the point.
pub fn format_numeric(value: i128, scale: u8) -> String {
    let neg = value < 0;
    let digits = value.unsigned_abs().to_string();
    let scale = scale as usize;
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if scale == 0 {
        out.push_str(&digits);
    } else if digits.len() > scale {
        out.push_str(&digits[..digits.len() - scale]);
        out.push('.');
        out.push_str(&digits[digits.len() - scale..]);
    } else {
        out.push_str("0.");
        out.push_str(&"0".repeat(scale - digits.len()));
        out.push_str(&digits);
    }
    out
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1, 1, 1).expect("0001-01-01 is a valid date")
}

fn to_date(d: NaiveDate) -> Option<Date> {
    let days = d.signed_duration_since(epoch()).num_days();
    u32::try_from(days).ok().filter(|_| d.year() <= 9999).map(Date::new)
}

/// Time of day at scale 7 (100 ns increments).
fn to_time(t: NaiveTime) -> Time {
    let ns = t.num_seconds_from_midnight() as u64 * 1_000_000_000 + (t.nanosecond() % 1_000_000_000) as u64;
    Time::new(ns / 100, 7)
}

fn to_datetime2(dt: NaiveDateTime) -> DateTime2 {
    // Dates before 0001 or after 9999 do not exist in SQL Server: clamp to its range is wrong,
    // so the caller's parse already restricts to 4-digit years (chrono %Y accepts more).
    DateTime2::new(to_date(dt.date()).unwrap_or(Date::new(0)), to_time(dt.time()))
}

fn parse_naive_or_utc(s: &str) -> Option<NaiveDateTime> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return ok_year(dt.naive_utc());
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, f) {
            return ok_year(dt);
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().and_then(|d| ok_year(d.and_time(NaiveTime::MIN)))
}

fn ok_year(dt: NaiveDateTime) -> Option<NaiveDateTime> {
    (1..=9999).contains(&dt.year()).then_some(dt)
}

fn parse_offset(s: &str) -> Option<DateTime<FixedOffset>> {
    match DateTime::parse_from_rfc3339(s.trim()) {
        Ok(dt) => ok_year(dt.naive_utc()).map(|_| dt),
        // No offset: UTC.
        Err(_) => parse_naive_or_utc(s).map(|n| n.and_utc().fixed_offset()),
    }
}

/// The JSON-facing type name of a result column.
pub fn type_name(t: ColumnType) -> &'static str {
    use ColumnType::*;
    match t {
        Null => "null",
        Bit | Bitn => "bit",
        Int1 => "tinyint",
        Int2 => "smallint",
        Int4 => "int",
        Int8 => "bigint",
        Intn => "int",
        Float4 => "real",
        Float8 | Floatn => "float",
        Money | Money4 => "money",
        Decimaln => "decimal",
        Numericn => "numeric",
        Datetime | Datetimen => "datetime",
        Datetime4 => "smalldatetime",
        Daten => "date",
        Timen => "time",
        Datetime2 => "datetime2",
        DatetimeOffsetn => "datetimeoffset",
        Guid => "uniqueidentifier",
        BigVarBin => "varbinary",
        BigBinary => "binary",
        Image => "image",
        BigVarChar => "varchar",
        BigChar => "char",
        NVarchar => "nvarchar",
        NChar => "nchar",
        Text => "text",
        NText => "ntext",
        Xml => "xml",
        Udt => "udt",
        SSVariant => "sql_variant",
    }
}

const MAX_SAFE: i64 = 1 << 53;

/// One result cell to JSON. `ty` is the column's type (money arrives as a float in tiberius).
pub fn cell_to_json(ty: ColumnType, d: &ColumnData<'static>) -> Value {
    match d {
        ColumnData::U8(v) => v.map(Value::from).unwrap_or(Value::Null),
        ColumnData::I16(v) => v.map(Value::from).unwrap_or(Value::Null),
        ColumnData::I32(v) => v.map(Value::from).unwrap_or(Value::Null),
        ColumnData::I64(v) => match v {
            None => Value::Null,
            Some(i) if (-MAX_SAFE..=MAX_SAFE).contains(i) => Value::from(*i),
            Some(i) => Value::String(i.to_string()),
        },
        ColumnData::F32(v) => v.map(|f| float(f as f64)).unwrap_or(Value::Null),
        ColumnData::F64(v) => match v {
            None => Value::Null,
            // money/smallmoney: four decimals, as text like every exact numeric.
            Some(f) if matches!(ty, ColumnType::Money | ColumnType::Money4) => Value::String(format!("{f:.4}")),
            Some(f) => float(*f),
        },
        ColumnData::Bit(v) => v.map(Value::Bool).unwrap_or(Value::Null),
        ColumnData::String(v) => v.as_ref().map(|s| Value::String(s.to_string())).unwrap_or(Value::Null),
        ColumnData::Guid(v) => v.map(|u| Value::String(u.hyphenated().to_string())).unwrap_or(Value::Null),
        ColumnData::Binary(v) => v.as_ref().map(|b| Value::String(BASE64.encode(b))).unwrap_or(Value::Null),
        ColumnData::Numeric(v) => v.map(|n| Value::String(format_numeric(n.value(), n.scale()))).unwrap_or(Value::Null),
        ColumnData::Xml(v) => v.as_ref().map(|x| Value::String(x.to_string())).unwrap_or(Value::Null),
        ColumnData::DateTime(v) => v
            .map(|dt| {
                // 1/300 s ticks since 1900-01-01.
                let base = NaiveDate::from_ymd_opt(1900, 1, 1).expect("valid").and_time(NaiveTime::MIN);
                let ns = dt.seconds_fragments() as i64 * 10_000_000 / 3;
                let t = base + chrono::Duration::days(dt.days() as i64) + chrono::Duration::nanoseconds(ns);
                Value::String(format_naive(t))
            })
            .unwrap_or(Value::Null),
        ColumnData::SmallDateTime(v) => v
            .map(|dt| {
                let base = NaiveDate::from_ymd_opt(1900, 1, 1).expect("valid").and_time(NaiveTime::MIN);
                let t = base
                    + chrono::Duration::days(dt.days() as i64)
                    + chrono::Duration::minutes(dt.seconds_fragments() as i64);
                Value::String(format_naive(t))
            })
            .unwrap_or(Value::Null),
        ColumnData::Date(v) => {
            v.map(|d| Value::String(from_date(d).format("%Y-%m-%d").to_string())).unwrap_or(Value::Null)
        }
        ColumnData::Time(v) => v.map(|t| Value::String(format_tod(from_time(t)))).unwrap_or(Value::Null),
        ColumnData::DateTime2(v) => v.map(|dt| Value::String(format_naive(from_datetime2(dt)))).unwrap_or(Value::Null),
        ColumnData::DateTimeOffset(v) => v
            .map(|dto| {
                let utc = from_datetime2(dto.datetime2());
                let offset_s = dto.offset() as i32 * 60;
                let local = utc + chrono::Duration::seconds(offset_s as i64);
                let sign = if offset_s < 0 { '-' } else { '+' };
                let a = offset_s.unsigned_abs();
                Value::String(format!("{}{sign}{:02}:{:02}", format_naive(local), a / 3600, (a % 3600) / 60))
            })
            .unwrap_or(Value::Null),
    }
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map(Value::Number).unwrap_or_else(|| Value::String(f.to_string()))
}

fn from_date(d: Date) -> NaiveDate {
    epoch() + chrono::Duration::days(d.days() as i64)
}

/// Nanoseconds since midnight of a `time` value at its scale.
fn from_time(t: Time) -> NaiveTime {
    let ns = t.increments() as u128 * 10u128.pow(9u32.saturating_sub(t.scale() as u32));
    let secs = (ns / 1_000_000_000) as u32;
    NaiveTime::from_num_seconds_from_midnight_opt(secs.min(86_399), (ns % 1_000_000_000) as u32)
        .unwrap_or(NaiveTime::MIN)
}

fn from_datetime2(dt: DateTime2) -> NaiveDateTime {
    from_date(dt.date()).and_time(from_time(dt.time()))
}

/// `HH:MM:SS[.fffffff]` without trailing zeros in the fraction.
fn format_tod(t: NaiveTime) -> String {
    let mut s = format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    let ns = t.nanosecond();
    if ns != 0 {
        let f = format!("{:09}", ns);
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s
}

fn format_naive(dt: NaiveDateTime) -> String {
    format!("{}T{}", dt.date().format("%Y-%m-%d"), format_tod(dt.time()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type_names_parse() {
        assert_eq!(SqlType::parse("int"), SqlType::Int);
        assert_eq!(SqlType::parse("decimal(10,2)"), SqlType::Decimal { precision: 10, scale: 2 });
        assert_eq!(SqlType::parse("NVARCHAR(50)"), SqlType::Text);
        assert_eq!(SqlType::parse("varbinary(max)"), SqlType::Binary);
        assert_eq!(SqlType::parse("datetimeoffset(7)"), SqlType::DateTimeOffset);
        assert_eq!(SqlType::parse("geography"), SqlType::Other);
    }

    #[test]
    fn decimals_are_exact() {
        let n = parse_decimal("-12.345").unwrap();
        assert_eq!((n.value(), n.scale()), (-12345, 3));
        assert_eq!(format_numeric(n.value(), n.scale()), "-12.345");
        assert_eq!(format_numeric(5, 3), "0.005");
        assert_eq!(format_numeric(-5, 2), "-0.05");
        assert_eq!(format_numeric(12345678901234567890123456789, 0), "12345678901234567890123456789");
        assert!(parse_decimal("1e5").is_none());
        assert!(parse_decimal("").is_none());
        assert!(parse_decimal("1.2.3").is_none());
        assert!(parse_decimal(&"9".repeat(39)).is_none());
    }

    #[test]
    fn described_binding() {
        let b = bind_described(1, &SqlType::Int, &json!(42)).unwrap();
        assert_eq!(b.decl, "int");
        assert!(matches!(b.value, ColumnData::I32(Some(42))));
        assert!(bind_described(1, &SqlType::Int, &json!(1i64 << 40)).unwrap_err().contains("out of range"));
        assert!(bind_described(2, &SqlType::Int, &json!("x")).unwrap_err().contains("@P2"));
        let b = bind_described(1, &SqlType::Decimal { precision: 10, scale: 2 }, &json!("12.50")).unwrap();
        assert_eq!(b.decl, "decimal(10,2)");
        assert!(matches!(b.value, ColumnData::Numeric(Some(n)) if n.value() == 1250 && n.scale() == 2));
        let b = bind_described(1, &SqlType::Binary, &json!("AAEC")).unwrap();
        assert!(matches!(&b.value, ColumnData::Binary(Some(v)) if v.as_ref() == [0u8, 1, 2]));
        assert!(bind_described(1, &SqlType::Binary, &json!("@@")).is_err());
        let b = bind_described(1, &SqlType::Uuid, &json!("6f9619ff-8b86-d011-b42d-00c04fc964ff")).unwrap();
        assert!(matches!(b.value, ColumnData::Guid(Some(_))));
        let b = bind_described(1, &SqlType::Bit, &json!(null)).unwrap();
        assert!(matches!(b.value, ColumnData::Bit(None)));
        let b = bind_described(1, &SqlType::DateTimeOffset, &json!("2024-03-01T10:00:00+02:00")).unwrap();
        match b.value {
            ColumnData::DateTimeOffset(Some(dto)) => {
                assert_eq!(dto.offset(), 120);
                assert_eq!(
                    cell_to_json(ColumnType::DatetimeOffsetn, &ColumnData::DateTimeOffset(Some(dto))),
                    json!("2024-03-01T10:00:00+02:00")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shape_binding() {
        assert!(matches!(from_shape(1, &json!(7)).unwrap().value, ColumnData::I64(Some(7))));
        assert!(matches!(from_shape(1, &json!(1.5)).unwrap().value, ColumnData::F64(Some(f)) if f == 1.5));
        assert!(matches!(from_shape(1, &json!(true)).unwrap().value, ColumnData::Bit(Some(true))));
        assert!(matches!(from_shape(1, &json!(null)).unwrap().value, ColumnData::String(None)));
        assert!(
            matches!(from_shape(1, &json!({"a": 1})).unwrap().value, ColumnData::String(Some(ref s)) if s == "{\"a\":1}")
        );
        assert_eq!(from_shape(1, &json!(u64::MAX)).unwrap().decl, "numeric(20,0)");
    }

    #[test]
    fn cells_to_json() {
        assert_eq!(cell_to_json(ColumnType::Int8, &ColumnData::I64(Some(1 << 53))), json!(1i64 << 53));
        assert_eq!(cell_to_json(ColumnType::Int8, &ColumnData::I64(Some((1 << 53) + 1))), json!("9007199254740993"));
        assert_eq!(cell_to_json(ColumnType::Money, &ColumnData::F64(Some(12.5))), json!("12.5000"));
        assert_eq!(cell_to_json(ColumnType::Float8, &ColumnData::F64(Some(f64::NAN))), json!("NaN"));
        assert_eq!(cell_to_json(ColumnType::Bitn, &ColumnData::Bit(Some(true))), json!(true));
        assert_eq!(cell_to_json(ColumnType::NVarchar, &ColumnData::String(None)), Value::Null);
        let jan1 = to_date(NaiveDate::from_ymd_opt(2024, 1, 1).unwrap()).unwrap();
        let dt = DateTime2::new(jan1, Time::new(123_456_789, 7));
        assert_eq!(
            cell_to_json(ColumnType::Datetime2, &ColumnData::DateTime2(Some(dt))),
            json!("2024-01-01T00:00:12.3456789")
        );
        let dto = DateTimeOffset::new(DateTime2::new(jan1, Time::new(0, 0)), -90);
        assert_eq!(
            cell_to_json(ColumnType::DatetimeOffsetn, &ColumnData::DateTimeOffset(Some(dto))),
            json!("2023-12-31T22:30:00-01:30")
        );
        assert_eq!(
            cell_to_json(ColumnType::BigVarBin, &ColumnData::Binary(Some(Cow::Owned(vec![0, 1, 2])))),
            json!("AAEC")
        );
        assert_eq!(
            cell_to_json(ColumnType::Decimaln, &ColumnData::Numeric(Some(Numeric::new_with_scale(-1050, 2)))),
            json!("-10.50")
        );
    }
}
