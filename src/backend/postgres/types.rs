//! JSON ↔ PostgreSQL value conversion: owns the type table, binding JSON parameters in the binary wire format of the server-inferred `$n` types, and decoding result columns to JSON (incl. its own numeric, date/time and array codecs); must not touch connections, SQL text, HTTP or routing.
//!
//! # Type table
//!
//! | PostgreSQL type | JSON out | JSON accepted in |
//! |---|---|---|
//! | `bool` | `true`/`false` | `true`/`false` |
//! | `int2`, `int4` | number | integer number, or a decimal string (`"42"`) |
//! | `int8` | number if \|v\| < 2^53, else decimal string | integer number (≤ 2^53 if written as a float), or a decimal string |
//! | `oid` | number | like `int8`, range `0..=4294967295` |
//! | `float4`, `float8` | number; `"NaN"`, `"Infinity"`, `"-Infinity"` | number, decimal string, or one of those three strings |
//! | `numeric` | string, exact, trailing zeros per scale (`"1.50"`); `"NaN"`, `"Infinity"`, `"-Infinity"` | string or number; plain or scientific notation (`"1e-20"`); the specials |
//! | `text`, `varchar`, `bpchar`, `name`, `unknown`, enums | string | string (no NUL characters) |
//! | `"char"` | one-character string (`""` for `\0`, `"\ooo"` above ASCII) | the same |
//! | `uuid` | lowercase hyphenated string | any form `uuid::Uuid::try_parse` accepts |
//! | `json`, `jsonb` | the JSON value | any JSON value (JSON `null` is SQL NULL) |
//! | `date` | `YYYY-MM-DD` (ISO 8601 years: `-0044`, `+10000`); `"infinity"`, `"-infinity"` | the same |
//! | `time` | `HH:MM:SS[.ffffff]` (fraction without trailing zeros) | `HH:MM[:SS[.f…]]`, rounded to µs; `24:00:00` |
//! | `timestamp` | `YYYY-MM-DDTHH:MM:SS[.ffffff]`; `"infinity"`, `"-infinity"` | that, `T`/`t`/space separator, date only, optional `Z`/`+00:00` (other offsets are rejected) |
//! | `timestamptz` | UTC, `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`; `"infinity"`, `"-infinity"` | RFC 3339 / ISO 8601 with offset `Z`, `±HH`, `±HHMM`, `±HH:MM[:SS]`; no offset means UTC |
//! | `bytea` | base64 (standard alphabet, padded) | base64 (standard alphabet, padding optional) |
//! | arrays of all the above | JSON array (nested for multi-dimensional values; lower bounds are dropped) | one-dimensional JSON array; `null` elements allowed |
//! | domains | as their base type | as their base type |
//!
//! SQL NULL is JSON `null` for every type, in both directions (a `null` parameter is accepted
//! even for a type that has no JSON conversion). Anything else is an error naming the
//! parameter (`$n`) or column, the type and what was received; nothing here panics.

use std::error::Error as StdError;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::{BufMut, Bytes, BytesMut};
use postgres_types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};
use serde_json::{Number, Value};
use tokio_postgres::Row;

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// One bound parameter, ready for `tokio_postgres::Client::query(&stmt, &refs)`.
///
/// Holds the value already encoded in the binary wire format of the type it was bound for
/// (or SQL NULL), so all validation happens in [`bind_params`]. Its [`ToSql`] impl refuses to
/// serialize for any other type than the one it was bound for.
#[derive(Clone)]
pub struct PgParam {
    ty: Type,
    value: Option<Bytes>,
}

impl PgParam {
    /// The PostgreSQL type this parameter was bound for.
    pub fn ty(&self) -> &Type {
        &self.ty
    }

    /// Whether this parameter is SQL NULL.
    pub fn is_null(&self) -> bool {
        self.value.is_none()
    }
}

impl fmt::Debug for PgParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PgParam");
        d.field("type", &self.ty.name());
        match &self.value {
            None => d.field("value", &"NULL"),
            Some(b) => d.field("bytes", &b.len()),
        };
        d.finish()
    }
}

impl ToSql for PgParam {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if *ty != self.ty {
            return Err(format!(
                "parameter was bound for type {} but the statement expects {}",
                self.ty.name(),
                ty.name()
            )
            .into());
        }
        match &self.value {
            None => Ok(IsNull::Yes),
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
        }
    }

    /// Every type is accepted here; [`PgParam::to_sql`] checks the actual type against the one
    /// the parameter was bound for.
    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A JSON parameter that cannot be bound. The `Display` text is meant for API clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    /// The number of JSON parameters differs from the number of `$n` placeholders.
    #[error("the statement takes {expected} parameter(s) but {got} were given")]
    CountMismatch {
        /// Placeholders in the prepared statement.
        expected: usize,
        /// JSON values supplied.
        got: usize,
    },
    /// The server inferred a type for `$position` that has no JSON conversion (only `null`
    /// can be bound to it).
    #[error("parameter ${position} has type {type_name}, which cannot be bound from JSON (only null is accepted)")]
    UnsupportedType {
        /// 1-based placeholder number.
        position: usize,
        /// Server type name, e.g. `point`.
        type_name: String,
    },
    /// The JSON value does not fit the parameter's type.
    #[error("parameter {} ({type_name}): {problem}; got {received}", param_label(*.position, *.element))]
    InvalidValue {
        /// 1-based placeholder number.
        position: usize,
        /// 1-based array element index, for array parameters.
        element: Option<usize>,
        /// Server type name of the parameter, e.g. `int4` or `_int4`.
        type_name: String,
        /// What is wrong, e.g. `expected an integer`.
        problem: String,
        /// Short description of the received JSON value (long strings are cut).
        received: String,
    },
}

/// A result column that cannot be converted to JSON. The `Display` text is meant for API
/// clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ColumnError {
    /// `idx` is not a column of the row.
    #[error("column index {index} is out of range (the row has {count} column(s))")]
    OutOfRange {
        /// Requested 0-based index.
        index: usize,
        /// Number of columns in the row.
        count: usize,
    },
    /// The column's type has no JSON conversion.
    #[error("column \"{column}\" has type {type_name}, which cannot be converted to JSON (cast it, e.g. to text)")]
    UnsupportedType {
        /// 0-based column index.
        index: usize,
        /// Column name.
        column: String,
        /// Server type name, e.g. `point`.
        type_name: String,
    },
    /// The server sent bytes that are not a valid value of the column's type.
    #[error("column \"{column}\" ({type_name}): cannot decode the value sent by the server: {detail}")]
    Decode {
        /// 0-based column index.
        index: usize,
        /// Column name.
        column: String,
        /// Server type name.
        type_name: String,
        /// What went wrong.
        detail: String,
    },
}

/// Converts JSON parameters to bound parameters for the types the server inferred for
/// `$1..$n` (`Statement::params()`). `types` and `params` must have the same length.
pub fn bind_params(types: &[Type], params: &[Value]) -> Result<Vec<PgParam>, ParamError> {
    if types.len() != params.len() {
        return Err(ParamError::CountMismatch { expected: types.len(), got: params.len() });
    }
    types.iter().zip(params).enumerate().map(|(i, (ty, v))| bind_one(i + 1, ty, v)).collect()
}

/// Borrows bound parameters the way `tokio_postgres::Client::query` wants them.
pub fn as_sql_refs(params: &[PgParam]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// Converts column `idx` (0-based) of `row` to JSON. SQL NULL is `null`; a column of a type
/// without a JSON conversion is an error even when the value is NULL.
pub fn column_to_json(row: &Row, idx: usize) -> Result<Value, ColumnError> {
    let columns = row.columns();
    let col = columns.get(idx).ok_or(ColumnError::OutOfRange { index: idx, count: columns.len() })?;
    let ty = col.type_();
    let decode_err = |detail: String| ColumnError::Decode {
        index: idx,
        column: col.name().to_owned(),
        type_name: ty.name().to_owned(),
        detail,
    };
    let codec = codec_for(ty).ok_or_else(|| ColumnError::UnsupportedType {
        index: idx,
        column: col.name().to_owned(),
        type_name: ty.name().to_owned(),
    })?;
    let raw: Option<RawValue<'_>> = row.try_get(idx).map_err(|e| decode_err(e.to_string()))?;
    match raw {
        None => Ok(Value::Null),
        Some(RawValue(bytes)) => decode_value(&codec, bytes).map_err(decode_err),
    }
}

/// All columns of `row` as JSON values, in column order.
pub fn row_to_json(row: &Row) -> Result<Vec<Value>, ColumnError> {
    (0..row.len()).map(|i| column_to_json(row, i)).collect()
}

/// The name reported for a type in responses (`columns[].type`): PostgreSQL's type name,
/// e.g. `int4`, `text`, `_int4` (arrays), or the name of a domain / enum / extension type.
pub fn type_name(t: &Type) -> &str {
    t.name()
}

/// Whether values of `t` convert to and from JSON (see the module docs for the table).
pub fn is_supported(t: &Type) -> bool {
    codec_for(t).is_some()
}

// ---------------------------------------------------------------------------------------------
// Type table
// ---------------------------------------------------------------------------------------------

/// Scalar conversions; each knows one binary wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    Text,
    Char,
    Uuid,
    Json,
    Jsonb,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    Bytea,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Scalar(Scalar),
    /// Array whose elements use `elem`; `elem_oid` goes into the array header.
    Array {
        elem: Scalar,
        elem_oid: u32,
    },
}

fn scalar_for(ty: &Type) -> Option<Scalar> {
    let s = match *ty {
        Type::BOOL => Scalar::Bool,
        Type::INT2 => Scalar::Int2,
        Type::INT4 => Scalar::Int4,
        Type::INT8 => Scalar::Int8,
        Type::OID => Scalar::Oid,
        Type::FLOAT4 => Scalar::Float4,
        Type::FLOAT8 => Scalar::Float8,
        Type::NUMERIC => Scalar::Numeric,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Scalar::Text,
        Type::CHAR => Scalar::Char,
        Type::UUID => Scalar::Uuid,
        Type::JSON => Scalar::Json,
        Type::JSONB => Scalar::Jsonb,
        Type::DATE => Scalar::Date,
        Type::TIME => Scalar::Time,
        Type::TIMESTAMP => Scalar::Timestamp,
        Type::TIMESTAMPTZ => Scalar::Timestamptz,
        Type::BYTEA => Scalar::Bytea,
        _ => {
            return match ty.kind() {
                // Enum labels travel as text in the binary format.
                Kind::Enum(_) => Some(Scalar::Text),
                Kind::Domain(base) => scalar_for(base),
                _ => None,
            };
        }
    };
    Some(s)
}

fn codec_for(ty: &Type) -> Option<Codec> {
    if let Some(s) = scalar_for(ty) {
        return Some(Codec::Scalar(s));
    }
    match ty.kind() {
        Kind::Array(member) => scalar_for(member).map(|elem| Codec::Array { elem, elem_oid: member.oid() }),
        Kind::Domain(base) => codec_for(base),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Binding (JSON → wire)
// ---------------------------------------------------------------------------------------------

fn param_label(position: usize, element: Option<usize>) -> String {
    match element {
        None => format!("${position}"),
        Some(e) => format!("${position}[{e}]"),
    }
}

/// Longest piece of a received string quoted back in error messages.
const RECEIVED_MAX_CHARS: usize = 40;

/// Short, client-safe description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {}", cut(s)),
        Value::Array(a) => format!("an array of {} element(s)", a.len()),
        Value::Object(o) => format!("an object with {} key(s)", o.len()),
    }
}

/// JSON-quotes `s`, cut to [`RECEIVED_MAX_CHARS`] characters.
fn cut(s: &str) -> String {
    let mut chars = s.char_indices();
    match chars.nth(RECEIVED_MAX_CHARS) {
        None => Value::String(s.to_owned()).to_string(),
        Some((end, _)) => format!("{}…", Value::String(s[..end].to_owned())),
    }
}

struct EncodeFailure {
    element: Option<usize>,
    problem: String,
    received: String,
}

fn bind_one(position: usize, ty: &Type, v: &Value) -> Result<PgParam, ParamError> {
    if v.is_null() {
        return Ok(PgParam { ty: ty.clone(), value: None });
    }
    let codec =
        codec_for(ty).ok_or_else(|| ParamError::UnsupportedType { position, type_name: ty.name().to_owned() })?;
    let mut out = BytesMut::new();
    encode_value(codec, v, &mut out).map_err(|f| ParamError::InvalidValue {
        position,
        element: f.element,
        type_name: ty.name().to_owned(),
        problem: f.problem,
        received: f.received,
    })?;
    Ok(PgParam { ty: ty.clone(), value: Some(out.freeze()) })
}

fn encode_value(codec: Codec, v: &Value, out: &mut BytesMut) -> Result<(), EncodeFailure> {
    let fail = |element, problem: String, item: &Value| EncodeFailure { element, problem, received: describe(item) };
    match codec {
        Codec::Scalar(s) => encode_scalar(s, v, out).map_err(|p| fail(None, p, v)),
        Codec::Array { elem, elem_oid } => {
            let Value::Array(items) = v else {
                return Err(fail(None, "expected a JSON array".to_owned(), v));
            };
            let has_null = items.iter().any(Value::is_null);
            if items.is_empty() {
                out.put_i32(0); // ndim
                out.put_i32(0); // has nulls
                out.put_u32(elem_oid);
                return Ok(());
            }
            let len = i32::try_from(items.len()).map_err(|_| fail(None, "array too long".to_owned(), v))?;
            out.put_i32(1);
            out.put_i32(i32::from(has_null));
            out.put_u32(elem_oid);
            out.put_i32(len);
            out.put_i32(1); // lower bound
            let mut scratch = BytesMut::new();
            for (k, item) in items.iter().enumerate() {
                if item.is_null() {
                    out.put_i32(-1);
                    continue;
                }
                if item.is_array() && !matches!(elem, Scalar::Json | Scalar::Jsonb) {
                    return Err(fail(
                        Some(k + 1),
                        "nested arrays (multi-dimensional array parameters) are not supported".to_owned(),
                        item,
                    ));
                }
                scratch.clear();
                encode_scalar(elem, item, &mut scratch).map_err(|p| fail(Some(k + 1), p, item))?;
                let n =
                    i32::try_from(scratch.len()).map_err(|_| fail(Some(k + 1), "value too large".to_owned(), item))?;
                out.put_i32(n);
                out.extend_from_slice(&scratch);
            }
            Ok(())
        }
    }
}

fn scalar_name(s: Scalar) -> &'static str {
    match s {
        Scalar::Bool => "bool",
        Scalar::Int2 => "int2",
        Scalar::Int4 => "int4",
        Scalar::Int8 => "int8",
        Scalar::Oid => "oid",
        Scalar::Float4 => "float4",
        Scalar::Float8 => "float8",
        Scalar::Numeric => "numeric",
        Scalar::Text => "text",
        Scalar::Char => "\"char\"",
        Scalar::Uuid => "uuid",
        Scalar::Json => "json",
        Scalar::Jsonb => "jsonb",
        Scalar::Date => "date",
        Scalar::Time => "time",
        Scalar::Timestamp => "timestamp",
        Scalar::Timestamptz => "timestamptz",
        Scalar::Bytea => "bytea",
    }
}

fn encode_scalar(s: Scalar, v: &Value, out: &mut BytesMut) -> Result<(), String> {
    fn range<T: TryFrom<i64>>(i: i64, s: Scalar, min: i64, max: i64) -> Result<T, String> {
        T::try_from(i).map_err(|_| format!("{i} is out of range for {} ({min} to {max})", scalar_name(s)))
    }
    match s {
        Scalar::Bool => match v {
            Value::Bool(b) => out.put_u8(u8::from(*b)),
            _ => return Err("expected true or false".to_owned()),
        },
        Scalar::Int2 => out.put_i16(range(json_int(v)?, s, i16::MIN.into(), i16::MAX.into())?),
        Scalar::Int4 => out.put_i32(range(json_int(v)?, s, i32::MIN.into(), i32::MAX.into())?),
        Scalar::Int8 => out.put_i64(json_int(v)?),
        Scalar::Oid => out.put_u32(range(json_int(v)?, s, 0, u32::MAX.into())?),
        Scalar::Float4 => {
            let f = json_float(v)?;
            // Overflow and underflow are rejected below; otherwise float4 rounding is intended.
            let g = f as f32;
            if f.is_finite() && g.is_infinite() {
                return Err("value is out of range for float4".to_owned());
            }
            if f != 0.0 && g == 0.0 {
                return Err("value is too close to zero for float4".to_owned());
            }
            out.put_f32(g);
        }
        Scalar::Float8 => out.put_f64(json_float(v)?),
        Scalar::Numeric => {
            let parsed = match v {
                Value::Number(n) => parse_numeric(&n.to_string()),
                Value::String(s) => parse_numeric(s),
                _ => Err("expected a decimal number (JSON string or number)".to_owned()),
            }?;
            parsed.write(out);
        }
        Scalar::Text => {
            let t = json_str(v, "expected a string")?;
            if t.contains('\0') {
                return Err("text cannot contain the NUL character (\\u0000)".to_owned());
            }
            out.put_slice(t.as_bytes());
        }
        Scalar::Char => out.put_u8(parse_char(json_str(v, CHAR_EXPECTED)?)?),
        Scalar::Uuid => {
            let t = json_str(v, UUID_EXPECTED)?;
            let u = uuid::Uuid::try_parse(t).map_err(|_| UUID_EXPECTED.to_owned())?;
            out.put_slice(u.as_bytes());
        }
        Scalar::Json => out.put_slice(v.to_string().as_bytes()),
        Scalar::Jsonb => {
            out.put_u8(1); // jsonb binary format version
            out.put_slice(v.to_string().as_bytes());
        }
        Scalar::Date => out.put_i32(parse_date(json_str(v, DATE_EXPECTED)?)?),
        Scalar::Time => out.put_i64(parse_time(json_str(v, TIME_EXPECTED)?)?),
        Scalar::Timestamp => out.put_i64(parse_timestamp(json_str(v, TIMESTAMP_EXPECTED)?, false)?),
        Scalar::Timestamptz => out.put_i64(parse_timestamp(json_str(v, TIMESTAMPTZ_EXPECTED)?, true)?),
        Scalar::Bytea => {
            let t = json_str(v, "expected a base64 string")?;
            let bytes = BASE64_LENIENT.decode(t).map_err(|e| format!("expected a base64 string ({e})"))?;
            out.put_slice(&bytes);
        }
    }
    Ok(())
}

/// Standard alphabet; padding optional on input.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const UUID_EXPECTED: &str = "expected a UUID string like \"123e4567-e89b-12d3-a456-426614174000\"";
const CHAR_EXPECTED: &str = "expected a single ASCII character, \"\" or an octal escape like \"\\\\377\"";
const DATE_EXPECTED: &str = "expected a date string YYYY-MM-DD";
const TIME_EXPECTED: &str = "expected a time string HH:MM:SS[.ffffff]";
const TIMESTAMP_EXPECTED: &str = "expected a timestamp string YYYY-MM-DDTHH:MM:SS[.ffffff]";
const TIMESTAMPTZ_EXPECTED: &str = "expected an RFC 3339 timestamp string like 2024-05-01T12:30:00Z";

fn json_str<'a>(v: &'a Value, expected: &str) -> Result<&'a str, String> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(expected.to_owned()),
    }
}

/// 2^53: the largest magnitude up to which every integer is exact as an f64 (and a JS number).
const F64_EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// An integer from a JSON number (integral; floats only up to 2^53) or a decimal string.
fn json_int(v: &Value) -> Result<i64, String> {
    const EXPECTED: &str = "expected an integer (JSON number or decimal string)";
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i)
            } else if n.is_u64() {
                Err(format!("{n} is out of range for int8"))
            } else {
                let f = n.as_f64().filter(|f| f.is_finite()).ok_or_else(|| EXPECTED.to_owned())?;
                if f.fract() != 0.0 {
                    Err(format!("expected an integer, not a fractional number ({EXPECTED})"))
                } else if f.abs() > F64_EXACT_INT {
                    Err("integer in floating-point notation beyond 2^53 is not exact; send it as a plain integer or a decimal string".to_owned())
                } else {
                    // Integral and within ±2^53: exact.
                    Ok(f as i64)
                }
            }
        }
        Value::String(s) => parse_int_str(s),
        _ => Err(EXPECTED.to_owned()),
    }
}

/// `[+-]?[0-9]+` as i64.
fn parse_int_str(s: &str) -> Result<i64, String> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected an integer (JSON number or decimal string of digits)".to_owned());
    }
    s.parse::<i64>().map_err(|_| format!("{} is out of range for int8", cut(s)))
}

/// A float from a JSON number, a decimal string or `"NaN"` / `"Infinity"` / `"-Infinity"`.
fn json_float(v: &Value) -> Result<f64, String> {
    const EXPECTED: &str = "expected a number (JSON number, decimal string, \"NaN\", \"Infinity\" or \"-Infinity\")";
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(f),
            _ => Err("number is out of range for float8".to_owned()),
        },
        Value::String(s) => {
            if let Some(sp) = special_value(s) {
                return Ok(match sp {
                    Special::NaN => f64::NAN,
                    Special::PosInf => f64::INFINITY,
                    Special::NegInf => f64::NEG_INFINITY,
                });
            }
            if lex_decimal(s).is_none() {
                return Err(EXPECTED.to_owned());
            }
            match s.parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(f),
                Ok(_) => Err("value is out of range for float8".to_owned()),
                Err(_) => Err(EXPECTED.to_owned()),
            }
        }
        _ => Err(EXPECTED.to_owned()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    NaN,
    PosInf,
    NegInf,
}

/// `NaN`, `[+-]Infinity`, `[+-]inf`, case-insensitive (as PostgreSQL accepts them).
fn special_value(s: &str) -> Option<Special> {
    if s.len() > 9 {
        return None;
    }
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if s.eq_ignore_ascii_case("nan") {
        Some(Special::NaN)
    } else if body.eq_ignore_ascii_case("infinity") || body.eq_ignore_ascii_case("inf") {
        Some(if neg { Special::NegInf } else { Special::PosInf })
    } else {
        None
    }
}

fn parse_char(s: &str) -> Result<u8, String> {
    let b = s.as_bytes();
    match b {
        [] => Ok(0),
        [c] if c.is_ascii() => Ok(*c),
        [b'\\', o @ ..] if o.len() == 3 && o.iter().all(|d| (b'0'..=b'7').contains(d)) => {
            let n = o.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            u8::try_from(n).map_err(|_| CHAR_EXPECTED.to_owned())
        }
        _ => Err(CHAR_EXPECTED.to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding (wire → JSON)
// ---------------------------------------------------------------------------------------------

/// The undecoded bytes of a non-NULL column value.
struct RawValue<'a>(&'a [u8]);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(RawValue(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Big-endian reader over a wire value; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!("value truncated (needed {n} more bytes, {} left)", self.buf.len()));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let bytes = self.take(N)?;
        bytes.try_into().map_err(|_| "value truncated".to_owned())
    }

    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn finish(&self) -> Result<(), String> {
        if self.buf.is_empty() { Ok(()) } else { Err(format!("{} unexpected trailing bytes", self.buf.len())) }
    }
}

fn fixed<const N: usize>(raw: &[u8]) -> Result<[u8; N], String> {
    raw.try_into().map_err(|_| format!("expected {N} bytes, got {}", raw.len()))
}

fn decode_value(codec: &Codec, raw: &[u8]) -> Result<Value, String> {
    match *codec {
        Codec::Scalar(s) => decode_scalar(s, raw),
        Codec::Array { elem, .. } => decode_array(elem, raw),
    }
}

/// JSON for an int8: a number when JavaScript can hold it exactly (|v| < 2^53), else a string.
fn int8_json(v: i64) -> Value {
    if v.unsigned_abs() < 1 << 53 { Value::from(v) } else { Value::String(v.to_string()) }
}

fn f64_json(f: f64) -> Value {
    if f.is_nan() {
        Value::String("NaN".to_owned())
    } else if f == f64::INFINITY {
        Value::String("Infinity".to_owned())
    } else if f == f64::NEG_INFINITY {
        Value::String("-Infinity".to_owned())
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

/// Goes through the shortest decimal form of the f32 so that e.g. `0.1::float4` comes out as
/// `0.1`, not `0.10000000149011612`.
fn f32_json(f: f32) -> Value {
    if !f.is_finite() {
        return f64_json(f64::from(f));
    }
    f64_json(f.to_string().parse::<f64>().unwrap_or(f64::from(f)))
}

fn decode_scalar(s: Scalar, raw: &[u8]) -> Result<Value, String> {
    let v = match s {
        Scalar::Bool => match raw {
            [b] => Value::Bool(*b != 0),
            _ => return Err(format!("expected 1 byte, got {}", raw.len())),
        },
        Scalar::Int2 => Value::from(i16::from_be_bytes(fixed(raw)?)),
        Scalar::Int4 => Value::from(i32::from_be_bytes(fixed(raw)?)),
        Scalar::Int8 => int8_json(i64::from_be_bytes(fixed(raw)?)),
        Scalar::Oid => Value::from(u32::from_be_bytes(fixed(raw)?)),
        Scalar::Float4 => f32_json(f32::from_be_bytes(fixed(raw)?)),
        Scalar::Float8 => f64_json(f64::from_be_bytes(fixed(raw)?)),
        Scalar::Numeric => Value::String(numeric_to_string(raw)?),
        Scalar::Text => Value::String(utf8(raw)?.to_owned()),
        Scalar::Char => {
            let [b] = fixed::<1>(raw)?;
            Value::String(match b {
                0 => String::new(),
                1..=127 => char::from(b).to_string(),
                _ => format!("\\{b:03o}"),
            })
        }
        Scalar::Uuid => Value::String(uuid::Uuid::from_bytes(fixed(raw)?).hyphenated().to_string()),
        Scalar::Json => parse_json(raw)?,
        Scalar::Jsonb => match raw.split_first() {
            Some((1, rest)) => parse_json(rest)?,
            Some((v, _)) => return Err(format!("unsupported jsonb format version {v}")),
            None => return Err("empty jsonb value".to_owned()),
        },
        Scalar::Date => Value::String(format_date(i32::from_be_bytes(fixed(raw)?))),
        Scalar::Time => Value::String(format_time(i64::from_be_bytes(fixed(raw)?))?),
        Scalar::Timestamp => Value::String(format_timestamp(i64::from_be_bytes(fixed(raw)?), false)),
        Scalar::Timestamptz => Value::String(format_timestamp(i64::from_be_bytes(fixed(raw)?), true)),
        Scalar::Bytea => Value::String(BASE64_STANDARD.encode(raw)),
    };
    Ok(v)
}

fn utf8(raw: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(raw).map_err(|e| format!("invalid UTF-8 ({e})"))
}

fn parse_json(raw: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(raw).map_err(|e| format!("invalid JSON ({e})"))
}

/// PostgreSQL's MAXDIM.
const MAX_ARRAY_DIMS: i32 = 6;

fn decode_array(elem: Scalar, raw: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf: raw };
    let ndim = r.i32()?;
    if !(0..=MAX_ARRAY_DIMS).contains(&ndim) {
        return Err(format!("invalid number of array dimensions {ndim}"));
    }
    let _has_nulls = r.i32()?;
    let _elem_oid = r.u32()?;
    let mut dims = Vec::new();
    let mut total: usize = 1;
    for _ in 0..ndim {
        let len = usize::try_from(r.i32()?).map_err(|_| "negative array dimension".to_owned())?;
        let _lower_bound = r.i32()?;
        dims.push(len);
        total = total.checked_mul(len).ok_or("array too large")?;
    }
    if dims.is_empty() {
        r.finish()?;
        return Ok(Value::Array(Vec::new()));
    }
    // Each element takes at least its 4-byte length: bounds the allocation by the input size.
    if total > r.buf.len() / 4 {
        return Err("array value truncated".to_owned());
    }
    let mut elems = Vec::with_capacity(total);
    for _ in 0..total {
        let len = r.i32()?;
        if len == -1 {
            elems.push(Value::Null);
        } else {
            let n = usize::try_from(len).map_err(|_| format!("invalid element length {len}"))?;
            elems.push(decode_scalar(elem, r.take(n)?)?);
        }
    }
    r.finish()?;
    let mut it = elems.into_iter();
    Ok(nest(&mut it, &dims))
}

/// Builds nested JSON arrays of shape `dims` from a row-major element iterator.
fn nest(it: &mut impl Iterator<Item = Value>, dims: &[usize]) -> Value {
    match dims {
        [] => it.next().unwrap_or(Value::Null),
        [n] => Value::Array(it.take(*n).collect()),
        [n, rest @ ..] => Value::Array((0..*n).map(|_| nest(it, rest)).collect()),
    }
}

// ---------------------------------------------------------------------------------------------
// numeric
// ---------------------------------------------------------------------------------------------

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
/// Largest display scale PostgreSQL stores (NUMERIC_DSCALE_MASK).
const NUMERIC_MAX_DSCALE: i64 = 0x3FFF;
/// Most digits before the decimal point PostgreSQL stores (weight ≤ i16::MAX base-10000 digits).
const NUMERIC_MAX_INT_DIGITS: i64 = 131_072;

const NUMERIC_EXPECTED: &str =
    "expected a decimal number like \"-12.50\" or \"1e-20\" (or \"NaN\", \"Infinity\", \"-Infinity\")";

/// A numeric in PostgreSQL's binary layout: base-10000 `digits`, the first one worth
/// 10000^`weight`; `dscale` is the number of decimal digits after the point.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WireNumeric {
    sign: u16,
    weight: i16,
    dscale: u16,
    digits: Vec<i16>,
}

impl WireNumeric {
    fn special(sign: u16) -> Self {
        WireNumeric { sign, weight: 0, dscale: 0, digits: Vec::new() }
    }

    fn write(&self, out: &mut BytesMut) {
        // Parsing bounds the digit count by ~36,900, well below u16::MAX.
        out.put_u16(u16::try_from(self.digits.len()).unwrap_or(u16::MAX));
        out.put_i16(self.weight);
        out.put_u16(self.sign);
        out.put_u16(self.dscale);
        for d in &self.digits {
            out.put_i16(*d);
        }
    }
}

/// Lexed `[+-]?digits[.digits][(e|E)[+-]?digits]`.
struct Decimal<'a> {
    negative: bool,
    int_digits: &'a [u8],
    frac_digits: &'a [u8],
    /// Exponent, saturated at ±10^12 (far outside any representable range).
    exp: i64,
}

fn lex_decimal(s: &str) -> Option<Decimal<'_>> {
    fn digits(b: &[u8], i: &mut usize) -> usize {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        start
    }
    const EXP_CAP: i64 = 1_000_000_000_000;
    let b = s.as_bytes();
    let mut i = 0;
    let negative = match b.first() {
        Some(b'-') => {
            i = 1;
            true
        }
        Some(b'+') => {
            i = 1;
            false
        }
        _ => false,
    };
    let start = digits(b, &mut i);
    let int_digits = &b[start..i];
    let mut frac_digits: &[u8] = &[];
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = digits(b, &mut i);
        frac_digits = &b[start..i];
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return None;
    }
    let mut exp = 0i64;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_negative = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = digits(b, &mut i);
        if start == i {
            return None;
        }
        for d in &b[start..i] {
            exp = (exp * 10 + i64::from(d - b'0')).min(EXP_CAP);
        }
        if exp_negative {
            exp = -exp;
        }
    }
    (i == b.len()).then_some(Decimal { negative, int_digits, frac_digits, exp })
}

/// Parses a decimal string (plain or scientific notation, or a special value) into the exact
/// numeric it denotes. The display scale is the number of digits after the point once the
/// exponent is applied (`"1.50"` → 2, `"1.5e-3"` → 4, `"15e2"` → 0), as PostgreSQL does.
fn parse_numeric(s: &str) -> Result<WireNumeric, String> {
    if let Some(sp) = special_value(s) {
        return Ok(WireNumeric::special(match sp {
            Special::NaN => NUMERIC_NAN,
            Special::PosInf => NUMERIC_PINF,
            Special::NegInf => NUMERIC_NINF,
        }));
    }
    let d = lex_decimal(s).ok_or_else(|| NUMERIC_EXPECTED.to_owned())?;
    let frac_len = i64::try_from(d.frac_digits.len()).map_err(|_| NUMERIC_EXPECTED.to_owned())?;
    // value = coefficient × 10^scale_exp
    let scale_exp = d.exp - frac_len;
    let dscale = (-scale_exp).max(0);
    if dscale > NUMERIC_MAX_DSCALE {
        return Err(format!(
            "too many digits after the decimal point ({dscale}; numeric allows at most {NUMERIC_MAX_DSCALE})"
        ));
    }
    let dscale = u16::try_from(dscale).map_err(|_| NUMERIC_EXPECTED.to_owned())?;
    let all = d.int_digits.iter().chain(d.frac_digits);
    let mut coef: Vec<u8> = all.skip_while(|c| **c == b'0').map(|c| c - b'0').collect();
    let mut trailing_zeros = 0i64;
    while coef.last() == Some(&0) {
        coef.pop();
        trailing_zeros += 1;
    }
    if coef.is_empty() {
        // Zero (also "-0"): PostgreSQL stores it positive, keeping the scale.
        return Ok(WireNumeric { sign: NUMERIC_POS, weight: 0, dscale, digits: Vec::new() });
    }
    let low = scale_exp + trailing_zeros; // decimal exponent of the last nonzero digit
    let ncoef = i64::try_from(coef.len()).map_err(|_| NUMERIC_EXPECTED.to_owned())?;
    let top = low + ncoef - 1; // decimal exponent of the leading digit
    if top >= NUMERIC_MAX_INT_DIGITS {
        return Err(format!(
            "value is too large for numeric (at most {NUMERIC_MAX_INT_DIGITS} digits before the decimal point)"
        ));
    }
    let weight = top.div_euclid(4);
    let ngroups = usize::try_from(weight - low.div_euclid(4) + 1).map_err(|_| NUMERIC_EXPECTED.to_owned())?;
    let mut digits = vec![0i16; ngroups];
    for (k, c) in (0i64..).zip(&coef) {
        let p = top - k;
        let idx = usize::try_from(weight - p.div_euclid(4)).map_err(|_| NUMERIC_EXPECTED.to_owned())?;
        let pow = [1i16, 10, 100, 1000][usize::try_from(p.rem_euclid(4)).unwrap_or(0)];
        if let Some(slot) = digits.get_mut(idx) {
            *slot += i16::from(*c) * pow;
        }
    }
    Ok(WireNumeric {
        sign: if d.negative { NUMERIC_NEG } else { NUMERIC_POS },
        weight: i16::try_from(weight).map_err(|_| NUMERIC_EXPECTED.to_owned())?,
        dscale,
        digits,
    })
}

/// Formats a binary numeric as PostgreSQL's text output does (plain notation, exactly
/// `dscale` digits after the point).
fn numeric_to_string(raw: &[u8]) -> Result<String, String> {
    let mut r = Reader { buf: raw };
    let ndigits = r.u16()?;
    let weight = i64::from(r.i16()?);
    let sign = r.u16()?;
    let dscale = r.u16()?;
    let mut digits = Vec::with_capacity(usize::from(ndigits).min(raw.len() / 2));
    for _ in 0..ndigits {
        let d = r.i16()?;
        if !(0..10_000).contains(&d) {
            return Err(format!("invalid numeric digit {d}"));
        }
        digits.push(d);
    }
    r.finish()?;
    let negative = match sign {
        NUMERIC_NAN => return Ok("NaN".to_owned()),
        NUMERIC_PINF => return Ok("Infinity".to_owned()),
        NUMERIC_NINF => return Ok("-Infinity".to_owned()),
        NUMERIC_POS => false,
        NUMERIC_NEG => true,
        _ => return Err(format!("invalid numeric sign 0x{sign:04x}")),
    };
    if i64::from(dscale) > NUMERIC_MAX_DSCALE {
        return Err(format!("invalid numeric scale {dscale}"));
    }
    // Digit at base-10000 exponent e sits at index weight - e.
    let digit_at =
        |e: i64| -> i16 { usize::try_from(weight - e).ok().and_then(|i| digits.get(i)).copied().unwrap_or(0) };
    let mut s = String::new();
    if negative && digits.iter().any(|d| *d != 0) {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        s.push_str(&digit_at(weight).to_string());
        for e in (0..weight).rev() {
            s.push_str(&format!("{:04}", digit_at(e)));
        }
    }
    if dscale > 0 {
        s.push('.');
        let mut left = usize::from(dscale);
        let mut e = -1i64;
        while left > 0 {
            let group = format!("{:04}", digit_at(e));
            let n = left.min(4);
            s.push_str(&group[..n]);
            left -= n;
            e -= 1;
        }
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// date / time / timestamp
// ---------------------------------------------------------------------------------------------

const USECS_PER_SEC: i64 = 1_000_000;
const USECS_PER_DAY: i64 = 86_400 * USECS_PER_SEC;
/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_UNIX_DAYS: i64 = 10_957;
/// First valid date, 4714-11-24 BC (ISO year -4713), in days since 2000-01-01.
const DATE_MIN: i64 = -2_451_545;
/// One past the last valid date, 5874898-01-01, in days since 2000-01-01.
const DATE_END: i64 = 2_145_031_949;
/// First valid timestamp (4714-11-24 BC 00:00), µs since 2000-01-01.
const TIMESTAMP_MIN: i64 = -211_813_488_000_000_000;
/// One past the last valid timestamp (294277-01-01 00:00), µs since 2000-01-01.
const TIMESTAMP_END: i64 = 9_223_371_331_200_000_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (ISO years: 0 is 1 BC).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`]: (year, month, day).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn infinity(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("infinity") || s.eq_ignore_ascii_case("+infinity") {
        Some(true)
    } else if s.eq_ignore_ascii_case("-infinity") {
        Some(false)
    } else {
        None
    }
}

/// Byte cursor for the date/time parsers.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn at_end(&self) -> bool {
        self.i >= self.b.len()
    }

    /// Between `min` and `max` ASCII digits as a number.
    fn digits(&mut self, min: usize, max: usize) -> Option<i64> {
        let start = self.i;
        let mut v = 0i64;
        while self.i - start < max {
            match self.peek() {
                Some(c) if c.is_ascii_digit() => {
                    v = v * 10 + i64::from(c - b'0');
                    self.i += 1;
                }
                _ => break,
            }
        }
        (self.i - start >= min).then_some(v)
    }
}

/// `[+-]?YYYY[Y…]-MM-DD` → days since 2000-01-01, range-checked.
fn parse_date_part(c: &mut Cursor<'_>, expected: &str) -> Result<i64, String> {
    let negative = if c.eat(b'-') {
        true
    } else {
        c.eat(b'+');
        false
    };
    let year = c.digits(4, 9).ok_or_else(|| expected.to_owned())?;
    let year = if negative { -year } else { year };
    if !c.eat(b'-') {
        return Err(expected.to_owned());
    }
    let month = c.digits(2, 2).ok_or_else(|| expected.to_owned())?;
    if !c.eat(b'-') {
        return Err(expected.to_owned());
    }
    let day = c.digits(2, 2).ok_or_else(|| expected.to_owned())?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is out of range"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(format!("day {day} is out of range for the month"));
    }
    let days = days_from_civil(year, month, day) - PG_EPOCH_UNIX_DAYS;
    if !(DATE_MIN..DATE_END).contains(&days) {
        return Err("date is out of PostgreSQL's range (4714-11-24 BC to 5874897-12-31)".to_owned());
    }
    Ok(days)
}

/// `HH:MM[:SS[.f…]]` → µs since midnight, rounded to the microsecond; `24:00:00` allowed.
fn parse_time_part(c: &mut Cursor<'_>, expected: &str) -> Result<i64, String> {
    let h = c.digits(2, 2).ok_or_else(|| expected.to_owned())?;
    if !c.eat(b':') {
        return Err(expected.to_owned());
    }
    let m = c.digits(2, 2).ok_or_else(|| expected.to_owned())?;
    let mut s = 0;
    let mut us = 0;
    if c.eat(b':') {
        s = c.digits(2, 2).ok_or_else(|| expected.to_owned())?;
        if c.eat(b'.') {
            let mut n = 0;
            let mut round_up = false;
            while let Some(d) = c.peek().filter(u8::is_ascii_digit) {
                let d = i64::from(d - b'0');
                if n < 6 {
                    us = us * 10 + d;
                } else if n == 6 {
                    round_up = d >= 5;
                }
                n += 1;
                c.i += 1;
            }
            if n == 0 {
                return Err(expected.to_owned());
            }
            for _ in n..6 {
                us *= 10;
            }
            us += i64::from(round_up);
        }
    }
    if h > 24 || m > 59 || s > 59 {
        return Err(format!("time {h:02}:{m:02}:{s:02} is out of range"));
    }
    let total = ((h * 60 + m) * 60 + s) * USECS_PER_SEC + us;
    if h == 24 && total != USECS_PER_DAY {
        return Err("hour 24 is only allowed as 24:00:00".to_owned());
    }
    Ok(total)
}

/// `Z`, `±HH`, `±HHMM`, `±HH:MM`, `±HH:MM:SS` → seconds east of UTC.
fn parse_offset(c: &mut Cursor<'_>, expected: &str) -> Result<i64, String> {
    if c.eat(b'Z') || c.eat(b'z') {
        return Ok(0);
    }
    let negative = if c.eat(b'-') {
        true
    } else if c.eat(b'+') {
        false
    } else {
        return Err(expected.to_owned());
    };
    let h = c.digits(2, 2).ok_or_else(|| expected.to_owned())?;
    let mut m = 0;
    let mut s = 0;
    let colon = c.eat(b':');
    if let Some(v) = c.digits(2, 2) {
        m = v;
        if (!colon || c.eat(b':'))
            && let Some(v) = c.digits(2, 2)
        {
            s = v;
        }
    } else if colon {
        return Err(expected.to_owned());
    }
    if h > 15 || m > 59 || s > 59 {
        return Err("UTC offset is out of range".to_owned());
    }
    let secs = (h * 60 + m) * 60 + s;
    Ok(if negative { -secs } else { secs })
}

fn parse_date(s: &str) -> Result<i32, String> {
    match infinity(s) {
        Some(true) => return Ok(i32::MAX),
        Some(false) => return Ok(i32::MIN),
        None => {}
    }
    let mut c = Cursor { b: s.as_bytes(), i: 0 };
    let days = parse_date_part(&mut c, DATE_EXPECTED)?;
    if !c.at_end() {
        return Err(DATE_EXPECTED.to_owned());
    }
    i32::try_from(days).map_err(|_| DATE_EXPECTED.to_owned())
}

fn parse_time(s: &str) -> Result<i64, String> {
    let mut c = Cursor { b: s.as_bytes(), i: 0 };
    let us = parse_time_part(&mut c, TIME_EXPECTED)?;
    if !c.at_end() {
        return Err(format!("{TIME_EXPECTED} (time zones are not supported for time)"));
    }
    Ok(us)
}

/// Timestamps as µs since 2000-01-01 (UTC for `with_tz`).
fn parse_timestamp(s: &str, with_tz: bool) -> Result<i64, String> {
    match infinity(s) {
        Some(true) => return Ok(i64::MAX),
        Some(false) => return Ok(i64::MIN),
        None => {}
    }
    let expected = if with_tz { TIMESTAMPTZ_EXPECTED } else { TIMESTAMP_EXPECTED };
    let mut c = Cursor { b: s.as_bytes(), i: 0 };
    let days = parse_date_part(&mut c, expected)?;
    let mut us = 0;
    let mut offset = 0;
    if !c.at_end() {
        if !(c.eat(b'T') || c.eat(b't') || c.eat(b' ')) {
            return Err(expected.to_owned());
        }
        us = parse_time_part(&mut c, expected)?;
        if !c.at_end() {
            offset = parse_offset(&mut c, expected)?;
            if !c.at_end() {
                return Err(expected.to_owned());
            }
        }
    }
    if !with_tz && offset != 0 {
        return Err("timestamp (without time zone) does not take a UTC offset; send the local time without an offset, or use timestamptz".to_owned());
    }
    let total =
        i128::from(days) * i128::from(USECS_PER_DAY) + i128::from(us) - i128::from(offset) * i128::from(USECS_PER_SEC);
    if total < i128::from(TIMESTAMP_MIN) || total >= i128::from(TIMESTAMP_END) {
        return Err("timestamp is out of PostgreSQL's range (4714-11-24 BC to 294276-12-31)".to_owned());
    }
    i64::try_from(total).map_err(|_| expected.to_owned())
}

/// ISO 8601 year: 4 digits for 0..=9999, else signed (`-0044`, `+10000`).
fn format_year(y: i64, out: &mut String) {
    if (0..=9999).contains(&y) {
        out.push_str(&format!("{y:04}"));
    } else if y > 9999 {
        out.push_str(&format!("+{y}"));
    } else {
        out.push_str(&format!("-{:04}", y.unsigned_abs()));
    }
}

fn format_days(days: i64, out: &mut String) {
    let (y, m, d) = civil_from_days(days + PG_EPOCH_UNIX_DAYS);
    format_year(y, out);
    out.push_str(&format!("-{m:02}-{d:02}"));
}

/// `HH:MM:SS[.f]`, fraction without trailing zeros.
fn format_tod(us: i64, out: &mut String) {
    let secs = us / USECS_PER_SEC;
    let frac = us % USECS_PER_SEC;
    out.push_str(&format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60));
    if frac != 0 {
        let f = format!("{frac:06}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
}

fn format_date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".to_owned(),
        i32::MIN => "-infinity".to_owned(),
        _ => {
            let mut s = String::new();
            format_days(i64::from(days), &mut s);
            s
        }
    }
}

fn format_time(us: i64) -> Result<String, String> {
    if !(0..=USECS_PER_DAY).contains(&us) {
        return Err(format!("time value {us} µs is out of range"));
    }
    let mut s = String::new();
    format_tod(us, &mut s);
    Ok(s)
}

fn format_timestamp(us: i64, with_tz: bool) -> String {
    match us {
        i64::MAX => "infinity".to_owned(),
        i64::MIN => "-infinity".to_owned(),
        _ => {
            let mut s = String::new();
            format_days(us.div_euclid(USECS_PER_DAY), &mut s);
            s.push('T');
            format_tod(us.rem_euclid(USECS_PER_DAY), &mut s);
            if with_tz {
                s.push('Z');
            }
            s
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Unit tests (no database; the round trips against a real server live in tests/pg_types.rs)
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn numeric_roundtrip(s: &str) -> Result<String, String> {
        let mut out = BytesMut::new();
        parse_numeric(s)?.write(&mut out);
        numeric_to_string(&out)
    }

    #[test]
    fn numeric_round_trips() {
        let cases = [
            ("0", "0"),
            ("-0", "0"),
            ("-0.00", "0.00"),
            ("0.000", "0.000"),
            ("-0.000100", "-0.000100"),
            ("12345678901234567890.123456789", "12345678901234567890.123456789"),
            ("1e-20", "0.00000000000000000001"),
            ("1E+20", "100000000000000000000"),
            ("1.5e3", "1500"),
            ("1.50e1", "15.0"),
            ("1.50", "1.50"),
            ("+7", "7"),
            (".5", "0.5"),
            ("5.", "5"),
            ("00012.3400", "12.3400"),
            ("10000", "10000"),
            ("9999.9999", "9999.9999"),
            ("0.0001", "0.0001"),
            ("0.00001", "0.00001"),
            ("-123456789.987654321", "-123456789.987654321"),
            ("nan", "NaN"),
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
            ("+inf", "Infinity"),
            ("0e99999999999999999999", "0"),
            ("1e-16383", &format!("0.{}1", "0".repeat(16382))),
            ("1e131071", &format!("1{}", "0".repeat(131_071))),
        ];
        for (input, want) in cases {
            assert_eq!(numeric_roundtrip(input).as_deref(), Ok(want), "input {input}");
        }
    }

    #[test]
    fn numeric_wire_layout() {
        // 12345.678 = digits [1, 2345, 6780], weight 1, dscale 3
        let n = parse_numeric("-12345.678").unwrap();
        assert_eq!(n, WireNumeric { sign: NUMERIC_NEG, weight: 1, dscale: 3, digits: vec![1, 2345, 6780] });
        // 0.00012 = 0.0001 2000: digits [1, 2000], weight -1
        let n = parse_numeric("0.00012").unwrap();
        assert_eq!(n, WireNumeric { sign: NUMERIC_POS, weight: -1, dscale: 5, digits: vec![1, 2000] });
        let n = parse_numeric("1e8").unwrap();
        assert_eq!(n, WireNumeric { sign: NUMERIC_POS, weight: 2, dscale: 0, digits: vec![1] });
    }

    #[test]
    fn numeric_rejects() {
        for bad in [
            "", "-", ".", "e5", "1e", "1e+", "abc", "1.2.3", " 1", "1 ", "0x10", "1e-16384", "1e131072", "--1", "1_000",
        ] {
            assert!(parse_numeric(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn numeric_decode_rejects_garbage() {
        assert!(numeric_to_string(&[]).is_err());
        assert!(numeric_to_string(&[0, 1, 0, 0, 0, 0, 0, 0]).is_err()); // missing digit
        assert!(numeric_to_string(&[0, 1, 0, 0, 0, 0, 0, 0, 0x27, 0x10]).is_err()); // digit 10000
        assert!(numeric_to_string(&[0, 0, 0, 0, 0x12, 0x34, 0, 0]).is_err()); // bad sign
    }

    #[test]
    fn date_algorithms() {
        assert_eq!(days_from_civil(2000, 1, 1), PG_EPOCH_UNIX_DAYS);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(-4713, 11, 24) - PG_EPOCH_UNIX_DAYS, DATE_MIN);
        assert_eq!(days_from_civil(5_874_898, 1, 1) - PG_EPOCH_UNIX_DAYS, DATE_END);
        assert_eq!((days_from_civil(294_277, 1, 1) - PG_EPOCH_UNIX_DAYS) * USECS_PER_DAY, TIMESTAMP_END);
        assert_eq!(DATE_MIN * USECS_PER_DAY, TIMESTAMP_MIN);
        for z in [-800_000_000i64, -2_451_545, -1, 0, 1, 59, 60, 365, 10_957, 2_145_031_948] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(parse_date("2000-01-01"), Ok(0));
        assert_eq!(parse_date("2000-01-02"), Ok(1));
        assert_eq!(parse_date("1999-12-31"), Ok(-1));
        assert_eq!(parse_date("infinity"), Ok(i32::MAX));
        assert_eq!(format_date(parse_date("-4713-11-24").unwrap()), "-4713-11-24");
        assert_eq!(format_date(parse_date("+5874897-12-31").unwrap()), "+5874897-12-31");
        assert_eq!(format_date(parse_date("0000-02-29").unwrap()), "0000-02-29");
        for bad in
            ["2024-02-30", "2023-02-29", "2024-13-01", "24-01-01", "2024-1-01", "-4713-11-23", "2024-01-01T00:00"]
        {
            assert!(parse_date(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_time("00:00"), Ok(0));
        assert_eq!(parse_time("24:00:00"), Ok(USECS_PER_DAY));
        assert_eq!(parse_time("12:34:56.5"), Ok(45_296_500_000));
        assert_eq!(parse_time("00:00:00.0000015"), Ok(2));
        assert_eq!(parse_time("23:59:59.9999995"), Ok(USECS_PER_DAY));
        assert_eq!(format_time(45_296_500_000).unwrap(), "12:34:56.5");
        assert_eq!(format_time(USECS_PER_DAY).unwrap(), "24:00:00");
        for bad in ["24:00:01", "12:60:00", "1:00", "12:00:00+01", "12:00:00.", "noon"] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
        let ts = |s: &str| parse_timestamp(s, true).map(|v| format_timestamp(v, true));
        assert_eq!(ts("2024-03-10T12:34:56.789+02:00").unwrap(), "2024-03-10T10:34:56.789Z");
        assert_eq!(ts("2024-03-10 12:34:56-0530").unwrap(), "2024-03-10T18:04:56Z");
        assert_eq!(ts("2024-03-10t00:30:00+01").unwrap(), "2024-03-09T23:30:00Z");
        assert_eq!(ts("2024-03-10").unwrap(), "2024-03-10T00:00:00Z");
        assert_eq!(ts("1999-12-31T23:59:59.999999Z").unwrap(), "1999-12-31T23:59:59.999999Z");
        assert_eq!(ts("-infinity").unwrap(), "-infinity");
        assert!(parse_timestamp("2024-03-10T12:00:00+02:00", false).is_err());
        assert_eq!(parse_timestamp("2024-03-10T12:00:00Z", false), parse_timestamp("2024-03-10T12:00:00", false));
        assert!(parse_timestamp("294277-01-01T00:00:00", false).is_err());
        assert!(parse_timestamp("294276-12-31T23:59:59.999999", false).is_ok());
    }

    #[test]
    fn integers_in_and_out() {
        assert_eq!(json_int(&json!(5)), Ok(5));
        assert_eq!(json_int(&json!("-9223372036854775808")), Ok(i64::MIN));
        assert_eq!(json_int(&json!(3.0)), Ok(3));
        assert!(json_int(&json!(3.5)).is_err());
        assert!(json_int(&json!(1e300)).is_err());
        assert!(json_int(&json!(u64::MAX)).is_err());
        assert!(json_int(&json!("9223372036854775808")).is_err());
        assert!(json_int(&json!("1e3")).is_err());
        assert!(json_int(&json!("")).is_err());
        assert_eq!(int8_json(9_007_199_254_740_991), json!(9_007_199_254_740_991_i64));
        assert_eq!(int8_json(9_007_199_254_740_992), json!("9007199254740992"));
        assert_eq!(int8_json(-9_007_199_254_740_992), json!("-9007199254740992"));
        assert_eq!(f32_json(0.1), json!(0.1));
    }

    #[test]
    fn errors_name_position_type_and_value() {
        let e = bind_params(&[Type::INT4, Type::INT2], &[json!(1), json!(70000)]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("$2") && msg.contains("int2") && msg.contains("70000"), "{msg}");
        let e = bind_params(&[Type::INT4_ARRAY], &[json!([1, "x"])]).unwrap_err().to_string();
        assert!(e.contains("$1[2]") && e.contains("_int4") && e.contains("\"x\""), "{e}");
        let e = bind_params(&[Type::TEXT], &[json!("a".repeat(1000))]);
        assert!(e.is_ok());
        let e = bind_params(&[Type::INT4], &[json!("a".repeat(1000))]).unwrap_err().to_string();
        assert!(e.len() < 300, "{e}");
        let e = bind_params(&[Type::INT4], &[]).unwrap_err();
        assert!(matches!(e, ParamError::CountMismatch { expected: 1, got: 0 }));
        let e = bind_params(&[Type::POINT], &[json!([1, 2])]).unwrap_err().to_string();
        assert!(e.contains("$1") && e.contains("point"), "{e}");
        assert!(bind_params(&[Type::POINT], &[Value::Null]).unwrap()[0].is_null());
    }

    #[test]
    fn param_is_send_sync_debug() {
        fn check<T: Send + Sync + fmt::Debug + ToSql>() {}
        check::<PgParam>();
        let p = bind_params(&[Type::INT4, Type::TEXT], &[json!(1), Value::Null]).unwrap();
        assert_eq!(
            format!("{p:?}"),
            r#"[PgParam { type: "int4", bytes: 4 }, PgParam { type: "text", value: "NULL" }]"#
        );
    }

    #[test]
    fn arrays_decode_nested() {
        let p = bind_params(&[Type::INT4_ARRAY], &[json!([1, null, 3])]).unwrap();
        let raw = p[0].value.clone().unwrap();
        assert_eq!(decode_array(Scalar::Int4, &raw).unwrap(), json!([1, null, 3]));
        // 2x2 int4 array {{1,2},{3,4}}
        let mut b = BytesMut::new();
        for v in [2i32, 0, 23, 2, 1, 2, 1] {
            b.put_i32(v);
        }
        for v in 1..=4 {
            b.put_i32(4);
            b.put_i32(v);
        }
        assert_eq!(decode_array(Scalar::Int4, &b).unwrap(), json!([[1, 2], [3, 4]]));
        assert!(decode_array(Scalar::Int4, &b[..b.len() - 1]).is_err());
    }

    fn all_types() -> Vec<Type> {
        vec![
            Type::BOOL,
            Type::INT2,
            Type::INT4,
            Type::INT8,
            Type::OID,
            Type::FLOAT4,
            Type::FLOAT8,
            Type::NUMERIC,
            Type::TEXT,
            Type::VARCHAR,
            Type::BPCHAR,
            Type::NAME,
            Type::CHAR,
            Type::UUID,
            Type::JSON,
            Type::JSONB,
            Type::DATE,
            Type::TIME,
            Type::TIMESTAMP,
            Type::TIMESTAMPTZ,
            Type::BYTEA,
            Type::INT2_ARRAY,
            Type::INT4_ARRAY,
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
            Type::VARCHAR_ARRAY,
            Type::NUMERIC_ARRAY,
            Type::JSONB_ARRAY,
            Type::TIMESTAMPTZ_ARRAY,
            Type::POINT,
            Type::INTERVAL,
        ]
    }

    fn interesting_string() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[-+]?[0-9]{0,30}(\\.[0-9]{0,30})?([eE][-+]?[0-9]{1,25})?",
            "[-+]?[0-9]{4,10}-[0-9]{1,2}-[0-9]{1,2}([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]{0,12})?)?)?(Z|[-+][0-9]{2}(:?[0-9]{2}(:?[0-9]{2})?)?)?",
            "[0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]{0,12})?)?",
            "[A-Za-z0-9+/]{0,12}={0,3}",
            "\\\\[0-9]{0,4}",
            Just("NaN".to_owned()),
            Just("-Infinity".to_owned()),
            Just("infinity".to_owned()),
            Just("\0".to_owned()),
        ]
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            interesting_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::hash_map("[a-z]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any JSON for any type: bind_params returns Ok or Err, never panics; whatever it
        /// accepts decodes again without error.
        #[test]
        fn bind_never_panics(ty_idx in 0usize..31, v in arb_json()) {
            let types = all_types();
            let ty = &types[ty_idx % types.len()];
            if let Ok(params) = bind_params(std::slice::from_ref(ty), std::slice::from_ref(&v))
                && let (Some(codec), Some(raw)) = (codec_for(ty), params[0].value.as_ref())
            {
                prop_assert!(decode_value(&codec, raw).is_ok(), "{ty} {v}");
            }
        }

        /// Plain decimals come back unchanged apart from redundant leading zeros and the
        /// sign of zero.
        #[test]
        fn numeric_plain_round_trip(neg in any::<bool>(), int in "[0-9]{1,40}", frac in "([0-9]{0,40})?") {
            let input = format!("{}{}{}{}", if neg { "-" } else { "" }, int, if frac.is_empty() { "" } else { "." }, frac);
            let int_norm = int.trim_start_matches('0');
            let int_norm = if int_norm.is_empty() { "0" } else { int_norm };
            let is_zero = int_norm == "0" && frac.bytes().all(|b| b == b'0');
            let want = format!("{}{}{}{}", if neg && !is_zero { "-" } else { "" }, int_norm, if frac.is_empty() { "" } else { "." }, frac);
            prop_assert_eq!(numeric_roundtrip(&input), Ok(want));
        }

        /// Scientific notation equals the same value written out.
        #[test]
        fn numeric_exponent_matches_shift(digits in "[1-9][0-9]{0,20}", exp in -60i64..60) {
            let got = numeric_roundtrip(&format!("{digits}e{exp}")).unwrap();
            let n = i64::try_from(digits.len()).unwrap();
            let want = if exp >= 0 {
                format!("{digits}{}", "0".repeat(usize::try_from(exp).unwrap()))
            } else if -exp < n {
                let split = usize::try_from(n + exp).unwrap();
                format!("{}.{}", &digits[..split], &digits[split..])
            } else {
                format!("0.{}{digits}", "0".repeat(usize::try_from(-exp - n).unwrap()))
            };
            prop_assert_eq!(got, want);
        }

        /// Every valid PostgreSQL date and timestamp survives format → parse.
        #[test]
        fn dates_round_trip(days in DATE_MIN..DATE_END, us in TIMESTAMP_MIN..TIMESTAMP_END) {
            let d = i32::try_from(days).unwrap();
            prop_assert_eq!(parse_date(&format_date(d)), Ok(d));
            prop_assert_eq!(parse_timestamp(&format_timestamp(us, true), true), Ok(us));
            prop_assert_eq!(parse_timestamp(&format_timestamp(us, false), false), Ok(us));
        }
    }
}
