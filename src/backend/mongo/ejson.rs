//! Extended JSON (relaxed) in and out of BSON, keeping field order, plus BSON's sort order for
//! merging per-shard results. Pure: no I/O, no driver, no HTTP.
//!
//! Why not `serde_json::Value`: this build's serde_json sorts object keys, and key order carries
//! meaning in MongoDB (`sort: {"b": 1, "a": -1}`, compound index keys, document field order).
//! So requests deserialize straight into BSON and responses serialize straight from it.

use std::cmp::Ordering;
use std::fmt;

use bson::{Bson, Document};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::geo::Region;

/// Keys that make an object an Extended JSON type wrapper rather than a document. `$regex` is
/// deliberately absent: in a filter it is the query operator.
const WRAPPERS: &[&str] = &[
    "$oid",
    "$date",
    "$numberLong",
    "$numberInt",
    "$numberDouble",
    "$numberDecimal",
    "$binary",
    "$uuid",
    "$code",
    "$timestamp",
    "$regularExpression",
    "$dbPointer",
    "$minKey",
    "$maxKey",
    "$undefined",
    "$symbol",
];

/// Integers beyond ±2^53 are written as `{"$numberLong": "..."}`: JSON clients that parse numbers
/// as doubles would silently round them.
const MAX_SAFE: i64 = (1 << 53) - 1;

/// One Extended JSON value parsed into BSON (order-preserving; JSON integers that fit 32 bits
/// become int32, larger ones int64, as the MongoDB shell does).
#[derive(Debug, Clone, PartialEq)]
pub struct ExtJson(pub Bson);

impl ExtJson {
    /// The value as a document, or why not (`what` names the field for the message).
    pub fn into_document(self, what: &str) -> Result<Document, String> {
        match self.0 {
            Bson::Document(d) => Ok(d),
            other => Err(format!("{what} must be an object, got {}", type_name(&other))),
        }
    }
}

impl<'de> Deserialize<'de> for ExtJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ExtVisitor).map(ExtJson)
    }
}

struct ExtVisitor;

fn int(v: i64) -> Bson {
    match i32::try_from(v) {
        Ok(i) => Bson::Int32(i),
        Err(_) => Bson::Int64(v),
    }
}

impl<'de> Visitor<'de> for ExtVisitor {
    type Value = Bson;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an Extended JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Bson, E> {
        Ok(Bson::Boolean(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bson, E> {
        Ok(int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bson, E> {
        match i64::try_from(v) {
            Ok(i) => Ok(int(i)),
            Err(_) => Err(E::custom(out_of_range(&v.to_string()))),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Bson, E> {
        Ok(Bson::Double(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bson, E> {
        Ok(Bson::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Bson, E> {
        Ok(Bson::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Bson, E> {
        Ok(Bson::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Bson, E> {
        Ok(Bson::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bson, A::Error> {
        let mut out = Vec::new();
        while let Some(ExtJson(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Bson::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Bson, A::Error> {
        let mut entries: Vec<(String, Bson)> = Vec::new();
        while let Some((k, ExtJson(v))) = map.next_entry::<String, ExtJson>()? {
            entries.push((k, v));
        }
        if entries.first().is_some_and(|(k, _)| WRAPPERS.contains(&k.as_str())) {
            // A type wrapper: small and order-free, so the bson crate's Extended JSON parser can
            // take it through serde_json::Value. Nested wrappers (`{"$date": {"$numberLong":
            // ..}}`) were already parsed into BSON; their canonical form parses back the same.
            let obj: serde_json::Map<String, serde_json::Value> =
                entries.into_iter().map(|(k, v)| (k, v.into_canonical_extjson())).collect();
            return Bson::try_from(serde_json::Value::Object(obj)).map_err(|e| de::Error::custom(e.to_string()));
        }
        Ok(Bson::Document(entries.into_iter().collect()))
    }
}

/// Serializes BSON as relaxed Extended JSON in field order (integers beyond ±2^53 canonical).
pub struct Relaxed<'a>(pub &'a Bson);

/// Serializes a list of documents as a JSON array of relaxed Extended JSON objects.
pub struct RelaxedDocs<'a>(pub &'a [Document]);

impl Serialize for RelaxedDocs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for d in self.0 {
            seq.serialize_element(&RelaxedDoc(d))?;
        }
        seq.end()
    }
}

pub struct RelaxedDoc<'a>(pub &'a Document);

impl Serialize for RelaxedDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, &Relaxed(v))?;
        }
        m.end()
    }
}

impl Serialize for Relaxed<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Bson::Document(d) => RelaxedDoc(d).serialize(s),
            Bson::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Relaxed(v))?;
                }
                seq.end()
            }
            Bson::String(v) => s.serialize_str(v),
            Bson::Boolean(v) => s.serialize_bool(*v),
            Bson::Null => s.serialize_unit(),
            Bson::Int32(v) => s.serialize_i32(*v),
            Bson::Int64(v) if (-MAX_SAFE..=MAX_SAFE).contains(v) => s.serialize_i64(*v),
            Bson::Int64(v) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("$numberLong", &v.to_string())?;
                m.end()
            }
            Bson::Double(v) if v.is_finite() => s.serialize_f64(*v),
            // Wrappers ($oid, $date, $numberDecimal, NaN, ...): small objects whose key order
            // does not matter, so the bson crate's own relaxed rendering is used.
            other => other.clone().into_relaxed_extjson().serialize(s),
        }
    }
}

/// Parse one Extended JSON value (for tests and for values that arrive outside a request body).
pub fn parse(text: &str) -> Result<Bson, String> {
    check_integers(text.as_bytes())?;
    serde_json::from_str::<ExtJson>(text).map(|e| e.0).map_err(|e| e.to_string())
}

fn out_of_range(literal: &str) -> String {
    let shown = if literal.len() > 40 { format!("{}...", &literal[..40]) } else { literal.to_string() };
    format!(
        "integer {shown} is outside the signed 64-bit range (-2^63 to 2^63-1); send it as \
         {{\"$numberDecimal\": \"...\"}} or as a double (with a decimal point)"
    )
}

/// Refuse JSON integer literals outside int64 anywhere in `text` (outside strings). Needed
/// because serde_json (without `arbitrary_precision`) hands an integer literal >= 2^64 to the
/// visitor as an f64, indistinguishable from a double: it would be stored silently rounded.
/// Literals up to u64::MAX reach `visit_u64` and get the same message there.
pub fn check_integers(text: &[u8]) -> Result<(), String> {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < text.len() && matches!(text[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                let tok = &text[start..i];
                if !tok.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
                    let lit = std::str::from_utf8(tok).unwrap_or("");
                    let digits = lit.strip_prefix('-').unwrap_or(lit);
                    // An integer literal that does not parse as i64 is out of range (too many
                    // digits for i128 included); a malformed token is left to the JSON parser.
                    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && lit.parse::<i64>().is_err() {
                        return Err(out_of_range(lit));
                    }
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Relaxed Extended JSON text of a value.
pub fn to_string(v: &Bson) -> String {
    serde_json::to_string(&Relaxed(v)).unwrap_or_default()
}

pub fn type_name(v: &Bson) -> &'static str {
    match v {
        Bson::Document(_) => "an object",
        Bson::Array(_) => "an array",
        Bson::String(_) => "a string",
        Bson::Null => "null",
        Bson::Boolean(_) => "a boolean",
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => "a number",
        _ => "a BSON value",
    }
}

/// A document's location from its GeoJSON Point field: `Ok(None)` if the field is absent.
pub fn geo_point(doc: &Document, field: &str) -> Result<Option<Region>, String> {
    get_path(doc, field).map(|v| geo_value(v, field)).transpose()
}

/// The location a GeoJSON Point value names (`field` is for messages).
pub fn geo_value(v: &Bson, field: &str) -> Result<Region, String> {
    let Bson::Document(g) = v else { return Err(format!("{field} is not a GeoJSON object")) };
    if g.get_str("type").ok() != Some("Point") {
        return Err(format!("{field} is not a GeoJSON Point"));
    }
    let coords = match g.get("coordinates") {
        Some(Bson::Array(a)) if a.len() >= 2 => a,
        _ => return Err(format!("{field}.coordinates must be [lng, lat]")),
    };
    let num = |b: &Bson| match b {
        Bson::Double(d) => Some(*d),
        Bson::Int32(i) => Some(f64::from(*i)),
        Bson::Int64(i) => Some(*i as f64),
        _ => None,
    };
    let (Some(lng), Some(lat)) = (num(&coords[0]), num(&coords[1])) else {
        return Err(format!("{field}.coordinates must be numbers [lng, lat]"));
    };
    crate::geo::point(lat, lng).map(Region::Point).map_err(|e| format!("{field}: {e}"))
}

/// The value at a dotted path (`"a.b"`); missing fields are `None` (sorted as null).
pub fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut cur = doc.get(parts.next()?)?;
    for p in parts {
        cur = match cur {
            Bson::Document(d) => d.get(p)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// BSON comparison/sort order between types (MongoDB's documented order).
fn type_rank(v: &Bson) -> u8 {
    match v {
        Bson::MinKey => 0,
        Bson::Null | Bson::Undefined => 1,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 2,
        Bson::String(_) | Bson::Symbol(_) => 3,
        Bson::Document(_) => 4,
        Bson::Array(_) => 5,
        Bson::Binary(_) => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Timestamp(_) => 10,
        Bson::RegularExpression(_) => 11,
        Bson::MaxKey => 13,
        _ => 12,
    }
}

fn as_f64(v: &Bson) -> f64 {
    match v {
        Bson::Int32(i) => f64::from(*i),
        Bson::Int64(i) => *i as f64,
        Bson::Double(d) => *d,
        // Decimal128 has no arithmetic in the bson crate; its string form parses as f64
        // (precision beyond a double is lost only for ordering between shards).
        Bson::Decimal128(d) => d.to_string().parse().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

/// Compare two values in BSON order (binary string comparison, the default collation).
/// Arrays compare element-wise; MongoDB's own sort uses an array's min/max element instead:
/// merging on array-valued sort keys is therefore approximate.
pub fn compare(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => x.cmp(y),
        (Bson::Int64(x), Bson::Int64(y)) => x.cmp(y),
        (Bson::Int32(x), Bson::Int64(y)) => i64::from(*x).cmp(y),
        (Bson::Int64(x), Bson::Int32(y)) => x.cmp(&i64::from(*y)),
        _ if ra == 2 => {
            // NaN sorts below every other number in MongoDB.
            let (x, y) = (as_f64(a), as_f64(b));
            match (x.is_nan(), y.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                _ => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            }
        }
        (Bson::String(x) | Bson::Symbol(x), Bson::String(y) | Bson::Symbol(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Bson::Document(x), Bson::Document(y)) => {
            for ((ka, va), (kb, vb)) in x.iter().zip(y.iter()) {
                let o = compare(va, vb).then_with(|| ka.cmp(kb));
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Array(x), Bson::Array(y)) => {
            for (va, vb) in x.iter().zip(y.iter()) {
                let o = compare(va, vb);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then(u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then_with(|| x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.timestamp_millis().cmp(&y.timestamp_millis()),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => (x.time, x.increment).cmp(&(y.time, y.increment)),
        (Bson::RegularExpression(x), Bson::RegularExpression(y)) => {
            x.pattern.as_str().cmp(y.pattern.as_str()).then_with(|| x.options.as_str().cmp(y.options.as_str()))
        }
        _ => Ordering::Equal,
    }
}

/// Compare two documents on a MongoDB sort specification (`{"field": 1 | -1, ...}`); a missing
/// field sorts as null.
pub fn compare_on(sort: &[(String, bool)], a: &Document, b: &Document) -> Ordering {
    for (path, desc) in sort {
        let x = get_path(a, path).unwrap_or(&Bson::Null);
        let y = get_path(b, path).unwrap_or(&Bson::Null);
        let o = compare(x, y);
        let o = if *desc { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Read a sort specification: each value must be 1 or -1 (text-score and other meta sorts
/// cannot be merged across shards). Returns (path, descending) in order.
pub fn sort_keys(sort: &Document) -> Result<Vec<(String, bool)>, String> {
    sort.iter()
        .map(|(k, v)| {
            let dir = match v {
                Bson::Int32(i) => i64::from(*i),
                Bson::Int64(i) => *i,
                Bson::Double(d) if d.fract() == 0.0 => *d as i64,
                _ => 0,
            };
            match dir {
                1 => Ok((k.clone(), false)),
                -1 => Ok((k.clone(), true)),
                _ => Err(format!("sort.{k} must be 1 or -1")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId};

    #[test]
    fn keeps_order_and_types() {
        let text = r#"{"b": 1, "a": {"$numberLong": "9007199254740993"}, "_id": {"$oid": "5f1d7e3a2b4c5d6e7f809192"},
            "d": {"$date": "2024-05-01T10:00:00Z"}, "x": {"$numberDecimal": "1.10"}, "n": -3, "f": 1.5,
            "q": {"$gt": 5, "$regex": "a"}, "l": [1, {"$numberLong": "2"}]}"#;
        let Bson::Document(d) = parse(text).unwrap() else { panic!("document") };
        let keys: Vec<&str> = d.keys().map(String::as_str).collect();
        assert_eq!(keys, ["b", "a", "_id", "d", "x", "n", "f", "q", "l"]);
        assert_eq!(d.get("b"), Some(&Bson::Int32(1)));
        assert_eq!(d.get("a"), Some(&Bson::Int64(9_007_199_254_740_993)));
        assert_eq!(d.get("_id"), Some(&Bson::ObjectId(ObjectId::parse_str("5f1d7e3a2b4c5d6e7f809192").unwrap())));
        assert!(matches!(d.get("d"), Some(Bson::DateTime(_))));
        assert!(matches!(d.get("x"), Some(Bson::Decimal128(_))));
        assert_eq!(d.get("n"), Some(&Bson::Int32(-3)));
        assert_eq!(d.get("q"), Some(&Bson::Document(doc! {"$gt": 5, "$regex": "a"})));
        assert_eq!(d.get("l"), Some(&Bson::Array(vec![Bson::Int32(1), Bson::Int64(2)])));
        let out = to_string(&Bson::Document(d));
        assert_eq!(
            out,
            r#"{"b":1,"a":{"$numberLong":"9007199254740993"},"_id":{"$oid":"5f1d7e3a2b4c5d6e7f809192"},"d":{"$date":"2024-05-01T10:00:00Z"},"x":{"$numberDecimal":"1.10"},"n":-3,"f":1.5,"q":{"$gt":5,"$regex":"a"},"l":[1,2]}"#
        );
    }

    #[test]
    fn bad_wrappers_are_errors() {
        assert!(parse(r#"{"$oid": "nothex"}"#).is_err());
        assert!(parse(r#"{"$numberLong": "12x"}"#).is_err());
        assert!(parse(r#"{"a": {"$date": {"bad": 1}}}"#).is_err());
        assert!(parse("18446744073709551615").is_err());
    }

    #[test]
    fn integers_outside_int64_are_refused_whatever_their_size() {
        for text in [
            "9223372036854775808",                           // 2^63: reaches visit_u64
            "18446744073709551616",                          // 2^64: serde_json would make it an f64
            r#"{"a": [1, {"b": -9223372036854775809}]}"#,    // below -2^63
            "340282366920938463463374607431768211456",       // 2^128: 39 digits, beyond i128
            "123456789012345678901234567890123456789012345", // longer than any i128
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains("outside the signed 64-bit range"), "{text}: {err}");
        }
        assert_eq!(parse("9223372036854775807").unwrap(), Bson::Int64(i64::MAX));
        assert_eq!(parse("-9223372036854775808").unwrap(), Bson::Int64(i64::MIN));
        // Doubles, exponents and digits inside strings (escaped quotes included) are not integers.
        assert_eq!(parse("18446744073709551616.0").unwrap(), Bson::Double(18446744073709551616.0));
        assert_eq!(parse("1e19").unwrap(), Bson::Double(1e19));
        assert!(parse(r#"{"s": "x\"18446744073709551616", "k": 1}"#).is_ok());
        assert!(check_integers(br#"{"18446744073709551616": 1}"#).is_ok(), "keys are strings");
    }

    #[test]
    fn bson_order() {
        use Ordering::*;
        assert_eq!(compare(&Bson::Int32(2), &Bson::Double(2.5)), Less);
        assert_eq!(compare(&Bson::Int64(i64::MAX), &Bson::Int64(i64::MAX - 1)), Greater);
        assert_eq!(compare(&Bson::Null, &Bson::Int32(0)), Less);
        assert_eq!(compare(&Bson::String("b".into()), &Bson::Int32(9)), Greater);
        assert_eq!(compare(&Bson::Boolean(false), &Bson::ObjectId(ObjectId::new())), Greater);
        let sort = sort_keys(&doc! {"a.b": -1, "c": 1}).unwrap();
        let x = doc! {"a": {"b": 2}, "c": 1};
        let y = doc! {"a": {"b": 2}, "c": 0};
        let z = doc! {"c": 5};
        assert_eq!(compare_on(&sort, &x, &y), Greater);
        assert_eq!(compare_on(&sort, &x, &z), Less, "missing sorts as null, last when descending");
        assert!(sort_keys(&doc! {"a": {"$meta": "textScore"}}).is_err());
    }
}
