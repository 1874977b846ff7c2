//! Strict request JSON: one parse of the body that refuses duplicate object keys at any depth and
//! arrays where an object is expected, with errors in the API's terms (JSON kinds and paths such
//! as `region.lat`, never Rust type names). Pure: no HTTP, no routing; `ApiError` is built by the
//! callers.
//!
//! Why two steps (body → `Node` → `T`) instead of `serde_json::from_slice::<T>`: serde_json's own
//! deserializer lets a derived struct read an array positionally, lets `serde_json::Value` and
//! maps keep the last of two equal keys, and words its errors with the visitor's Rust types
//! (`expected f64`). Walking our own order-preserving tree gives us the error type (so every
//! message is ours), the path, and the shape checks. Strings are moved, not copied, from the tree
//! into `T`, so the extra cost is the tree's skeleton, not a second copy of the body.
//! Why not `serde_json::Value` as the tree: this build's serde_json sorts object keys, and key
//! order carries meaning in MongoDB requests (`ejson`).

use std::fmt::{self, Display};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, Expected, IntoDeserializer, MapAccess, SeqAccess, Unexpected,
    VariantAccess, Visitor,
};
use serde_json::Value;

/// Parse a request body into `T`, refusing duplicate keys, arrays read as objects, and trailing
/// data. The error is a sentence for the client, e.g. `region.lat: expected a number, got a string`.
pub fn parse_strict<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    from_node(parse_node(body)?, &[])
}

/// Parse free-form request JSON with the same rules (no duplicate keys at any depth).
pub fn parse_value_strict(body: &[u8]) -> Result<Value, String> {
    parse_node(body).map(Node::into_value)
}

/// Read an already parsed value (e.g. the `region` field, kept as `Value` by the request type) as
/// `T` with the same shape rules; `at` names where the value sits in the request, for messages.
pub fn from_value_strict<T: DeserializeOwned>(v: Value, at: &str) -> Result<T, String> {
    from_node(Node::from_value(v), &[Seg::Key(at.to_string())])
}

fn from_node<T: DeserializeOwned>(node: Node, at: &[Seg]) -> Result<T, String> {
    T::deserialize(NodeDe(node)).map_err(|mut e| {
        e.path.extend(at.iter().rev().cloned());
        e.to_string()
    })
}

/// JSON as parsed, with object keys in the order they came (see the module note).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    String(String),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

impl Node {
    fn into_value(self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(b),
            Node::U64(n) => Value::from(n),
            Node::I64(n) => Value::from(n),
            Node::F64(f) => serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null),
            Node::String(s) => Value::String(s),
            Node::Array(a) => Value::Array(a.into_iter().map(Node::into_value).collect()),
            Node::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, v.into_value())).collect()),
        }
    }

    fn from_value(v: Value) -> Node {
        match v {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Node::U64(u),
                (_, Some(i), _) => Node::I64(i),
                (_, _, Some(f)) => Node::F64(f),
                _ => Node::Null,
            },
            Value::String(s) => Node::String(s),
            Value::Array(a) => Node::Array(a.into_iter().map(Node::from_value).collect()),
            Value::Object(o) => Node::Object(o.into_iter().map(|(k, v)| (k, Node::from_value(v))).collect()),
        }
    }

    fn unexpected(&self) -> Unexpected<'_> {
        match self {
            Node::Null => Unexpected::Unit,
            Node::Bool(b) => Unexpected::Bool(*b),
            Node::U64(n) => Unexpected::Unsigned(*n),
            Node::I64(n) => Unexpected::Signed(*n),
            Node::F64(f) => Unexpected::Float(*f),
            Node::String(s) => Unexpected::Str(s),
            Node::Array(_) => Unexpected::Seq,
            Node::Object(_) => Unexpected::Map,
        }
    }
}

// ---- step 1: bytes → Node (serde_json does the syntax, we refuse duplicate keys) ----

fn parse_node(body: &[u8]) -> Result<Node, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let node = NodeSeed { path: &PathRef::Root }.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(node)
}

/// Where the value being parsed sits, as a borrowed chain (no allocation unless there is an error).
enum PathRef<'a> {
    Root,
    Key(&'a PathRef<'a>, &'a str),
    Index(&'a PathRef<'a>, usize),
}

impl PathRef<'_> {
    fn segs(&self) -> Vec<Seg> {
        let mut out = Vec::new();
        let mut p = self;
        loop {
            match p {
                PathRef::Root => break,
                PathRef::Key(up, k) => {
                    out.push(Seg::Key(k.to_string()));
                    p = up;
                }
                PathRef::Index(up, i) => {
                    out.push(Seg::Index(*i));
                    p = up;
                }
            }
        }
        out
    }
}

struct NodeSeed<'a> {
    path: &'a PathRef<'a>,
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Node;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::I64(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::U64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::F64(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut out = Vec::new();
        while let Some(n) = seq.next_element_seed(NodeSeed { path: &PathRef::Index(self.path, out.len()) })? {
            out.push(n);
        }
        Ok(Node::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut out: Vec<(String, Node)> = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            // Most request objects are small: a linear scan beats hashing them.
            if out.len() < 32 && out.iter().any(|(seen, _)| *seen == k) {
                return Err(duplicate(self.path, &k));
            }
            let v = map.next_value_seed(NodeSeed { path: &PathRef::Key(self.path, &k) })?;
            out.push((k, v));
        }
        if out.len() >= 32 {
            let mut keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
            keys.sort_unstable();
            if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
                return Err(duplicate(self.path, w[0]));
            }
        }
        Ok(Node::Object(out))
    }
}

fn duplicate<E: de::Error>(path: &PathRef<'_>, key: &str) -> E {
    let mut segs = path.segs();
    segs.reverse();
    let at = if segs.is_empty() { String::new() } else { format!("{}: ", PathDisplay(&segs)) };
    E::custom(format!("{at}duplicate key {}", quote(key)))
}

// ---- step 2: Node → T, with our own error type ----

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Segments in root-first order, written `a.b[0].c`; keys that are not plain words are quoted.
struct PathDisplay<'a>(&'a [Seg]);

impl Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k)
                    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') =>
                {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Key(k) => write!(f, "[{}]", serde_json::Value::String(k.clone()))?,
            }
        }
        Ok(())
    }
}

fn quote(k: &str) -> String {
    format!("`{}`", k.escape_debug())
}

/// A refusal with the path it happened at (innermost segment first while it bubbles up).
#[derive(Debug)]
struct StrictError {
    path: Vec<Seg>,
    msg: String,
}

impl StrictError {
    fn at(mut self, seg: Seg) -> Self {
        self.path.push(seg);
        self
    }
}

impl Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            return f.write_str(&self.msg);
        }
        let segs: Vec<Seg> = self.path.iter().rev().cloned().collect();
        write!(f, "{}: {}", PathDisplay(&segs), self.msg)
    }
}

impl std::error::Error for StrictError {}

/// What a visitor expected, in JSON terms. serde's primitive and derived visitors describe
/// themselves with Rust names (`f64`, `struct QueryRequest`, `a sequence`); the client never sees those.
fn expected_json(exp: &dyn Expected) -> String {
    let e = exp.to_string();
    let s = e.as_str();
    match s {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a string" | "a borrowed string" | "a character" | "string or map" => "a string".into(),
        "unit" => "null".into(),
        "a map" => "an object".into(),
        "a sequence" => "an array".into(),
        _ if s.starts_with("struct ") || s.starts_with("a map") => "an object".into(),
        _ if s.starts_with("tuple") || s.starts_with("an array") || s.starts_with("a sequence") => "an array".into(),
        _ if s.starts_with("enum ") || s.ends_with("identifier") => "a string".into(),
        // Hand-written visitors (e.g. "an Extended JSON value") already speak JSON; anything else
        // that looks like a Rust name is not shown.
        _ if s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) || s.contains("::") => "a different value".into(),
        _ => e,
    }
}

/// What the client sent, in JSON terms (with the value for scalars, where it helps).
fn unexpected_json(u: Unexpected<'_>, with_value: bool) -> String {
    match u {
        Unexpected::Bool(b) => format!("{b}"),
        Unexpected::Unsigned(n) if with_value => format!("the number {n}"),
        Unexpected::Signed(n) if with_value => format!("the number {n}"),
        Unexpected::Float(f) if with_value => format!("the number {f}"),
        Unexpected::Unsigned(_) | Unexpected::Signed(_) => "an integer".into(),
        Unexpected::Float(_) => "a fractional number".into(),
        Unexpected::Str(s) if with_value => format!("the string {}", serde_json::Value::String(s.into())),
        Unexpected::Str(_) | Unexpected::Char(_) => "a string".into(),
        Unexpected::Unit | Unexpected::Option => "null".into(),
        Unexpected::Seq => "an array".into(),
        Unexpected::Map => "an object".into(),
        other => other.to_string(),
    }
}

fn one_of(names: &'static [&'static str]) -> String {
    if names.is_empty() { "none are accepted here".into() } else { format!("expected one of {}", names.join(", ")) }
}

impl de::Error for StrictError {
    fn custom<T: Display>(msg: T) -> Self {
        StrictError { path: Vec::new(), msg: msg.to_string() }
    }
    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format!("expected {}, got {}", expected_json(exp), unexpected_json(unexp, false)))
    }
    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format!("expected {}, got {}", expected_json(exp), unexpected_json(unexp, true)))
    }
    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        Self::custom(format!("expected {}, got an array of {len}", expected_json(exp)))
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format!("unknown value {}; {}", quote(variant), one_of(expected)))
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format!("unknown field {}; {}", quote(field), one_of(expected)))
    }
    fn missing_field(field: &'static str) -> Self {
        Self::custom(format!("missing field {}", quote(field)))
    }
    fn duplicate_field(field: &'static str) -> Self {
        Self::custom(format!("duplicate key {}", quote(field)))
    }
}

/// Deserializer over one `Node`, consuming it (strings move into the target).
struct NodeDe(Node);

impl<'de> de::Deserializer<'de> for NodeDe {
    type Error = StrictError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        match self.0 {
            Node::Null => v.visit_unit(),
            Node::Bool(b) => v.visit_bool(b),
            Node::U64(n) => v.visit_u64(n),
            Node::I64(n) => v.visit_i64(n),
            Node::F64(f) => v.visit_f64(f),
            Node::String(s) => v.visit_string(s),
            Node::Array(a) => v.visit_seq(Seq { items: a.into_iter(), index: 0 }),
            Node::Object(o) => v.visit_map(Map { entries: o.into_iter(), value: None }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        match self.0 {
            Node::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, v: V) -> Result<V::Value, StrictError> {
        v.visit_newtype_struct(self)
    }

    /// The point of this deserializer: a struct is an object, never an array read by position.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, StrictError> {
        match self.0 {
            Node::Object(o) => v.visit_map(Map { entries: o.into_iter(), value: None }),
            other => Err(de::Error::invalid_type(other.unexpected(), &"an object")),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        match self.0 {
            Node::Object(o) => v.visit_map(Map { entries: o.into_iter(), value: None }),
            other => Err(de::Error::invalid_type(other.unexpected(), &"an object")),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        match self.0 {
            Node::Array(a) => v.visit_seq(Seq { items: a.into_iter(), index: 0 }),
            other => Err(de::Error::invalid_type(other.unexpected(), &"an array")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, StrictError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, StrictError> {
        self.deserialize_seq(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, StrictError> {
        match self.0 {
            Node::String(s) => v.visit_enum(s.into_deserializer()),
            Node::Object(o) if o.len() == 1 => {
                let (k, val) = o.into_iter().next().expect("one entry");
                v.visit_enum(Variant { name: k, value: val })
            }
            other => Err(de::Error::invalid_type(other.unexpected(), &"a string")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        v.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct identifier
    }
}

struct Seq {
    items: std::vec::IntoIter<Node>,
    index: usize,
}

impl<'de> SeqAccess<'de> for Seq {
    type Error = StrictError;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, StrictError> {
        let Some(n) = self.items.next() else { return Ok(None) };
        let i = self.index;
        self.index += 1;
        seed.deserialize(NodeDe(n)).map(Some).map_err(|e| e.at(Seg::Index(i)))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Map {
    entries: std::vec::IntoIter<(String, Node)>,
    /// The value of the key just handed out, with that key for the path.
    value: Option<(String, Node)>,
}

impl<'de> MapAccess<'de> for Map {
    type Error = StrictError;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, StrictError> {
        let Some((k, v)) = self.entries.next() else { return Ok(None) };
        let key = seed.deserialize(de::value::StrDeserializer::<StrictError>::new(&k))?;
        self.value = Some((k, v));
        Ok(Some(key))
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, StrictError> {
        let (k, v) = self.value.take().ok_or_else(|| de::Error::custom("value requested before its key"))?;
        seed.deserialize(NodeDe(v)).map_err(|e| e.at(Seg::Key(k)))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// `{"variant": value}` as an externally tagged enum.
struct Variant {
    name: String,
    value: Node,
}

impl<'de> EnumAccess<'de> for Variant {
    type Error = StrictError;
    type Variant = VariantValue;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, VariantValue), StrictError> {
        let tag = seed.deserialize(de::value::StrDeserializer::<StrictError>::new(&self.name))?;
        Ok((tag, VariantValue { name: self.name, value: self.value }))
    }
}

struct VariantValue {
    name: String,
    value: Node,
}

impl<'de> VariantAccess<'de> for VariantValue {
    type Error = StrictError;
    fn unit_variant(self) -> Result<(), StrictError> {
        match self.value {
            Node::Null => Ok(()),
            other => Err(StrictError::invalid_type_at(other.unexpected(), "null", self.name)),
        }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, StrictError> {
        let name = self.name;
        seed.deserialize(NodeDe(self.value)).map_err(|e| e.at(Seg::Key(name)))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, StrictError> {
        let name = self.name;
        de::Deserializer::deserialize_seq(NodeDe(self.value), v).map_err(|e| e.at(Seg::Key(name)))
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> Result<V::Value, StrictError> {
        let name = self.name;
        de::Deserializer::deserialize_struct(NodeDe(self.value), "", fields, v).map_err(|e| e.at(Seg::Key(name)))
    }
}

impl StrictError {
    fn invalid_type_at(unexp: Unexpected<'_>, exp: &str, key: String) -> Self {
        <Self as de::Error>::invalid_type(unexp, &exp).at(Seg::Key(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Req {
        region: Option<Value>,
        sql: String,
        #[serde(default)]
        params: Vec<Value>,
        limit: Option<u64>,
        radius: Option<f64>,
        batch: Option<Vec<Stmt>>,
        format: Option<Format>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Stmt {
        sql: String,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Format {
        Object,
        Array,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Region {
        lat: Option<f64>,
        lng: Option<f64>,
    }

    fn err<T: DeserializeOwned + fmt::Debug>(body: &str) -> String {
        parse_strict::<T>(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn accepts_a_well_formed_request() {
        let r: Req = parse_strict(
            br#"{"region":{"lat":40.4,"lng":-3.7},"sql":"SELECT $1","params":[1,"a",null],"limit":5,
                "batch":[{"sql":"x"}],"format":"array"}"#,
        )
        .unwrap();
        assert_eq!(r.region, Some(json!({"lat": 40.4, "lng": -3.7})));
        assert_eq!(r.params, vec![json!(1), json!("a"), Value::Null]);
        assert_eq!(r.limit, Some(5));
        assert_eq!(r.batch, Some(vec![Stmt { sql: "x".into() }]));
        assert_eq!(r.format, Some(Format::Array));
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        // The probe's case: a Madrid request with a second `lat` (Tokyo's) was routed by the last.
        let e = err::<Req>(r#"{"region":{"lat":40.4,"lng":-3.7,"lat":35.7},"sql":"SELECT 1"}"#);
        assert!(e.starts_with("region: duplicate key `lat`"), "{e}");
        let e = err::<Req>(r#"{"sql":"a","sql":"b"}"#);
        assert!(e.starts_with("duplicate key `sql`"), "{e}");
        let e = parse_value_strict(br#"{"a":[{"b":{"c":1,"c":2}}]}"#).unwrap_err();
        assert!(e.starts_with("a[0].b: duplicate key `c`"), "{e}");
        // Large objects take the sorting path.
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        let body = format!("{{{},\"k3\":0}}", many.join(","));
        let e = parse_value_strict(body.as_bytes()).unwrap_err();
        assert!(e.contains("duplicate key `k3`"), "{e}");
        let ok = format!("{{{}}}", many.join(","));
        assert_eq!(parse_value_strict(ok.as_bytes()).unwrap().as_object().unwrap().len(), 40);
    }

    #[test]
    fn arrays_are_never_read_as_objects() {
        let e = err::<Req>(r#"[{"lat":1},"SELECT 1",[],null,null,null,null]"#);
        assert_eq!(e, "expected an object, got an array");
        let e = err::<Req>(r#"{"sql":"x","batch":[["SELECT 1"]]}"#);
        assert_eq!(e, "batch[0]: expected an object, got an array");
        let e = from_value_strict::<Region>(json!([40.4, -3.7]), "region").unwrap_err();
        assert_eq!(e, "region: expected an object, got an array");
    }

    #[test]
    fn messages_speak_json_not_rust() {
        let r: Region = from_value_strict(json!({"lat": 1.5, "lng": 2}), "region").unwrap();
        assert_eq!((r.lat, r.lng), (Some(1.5), Some(2.0)));
        let e = from_value_strict::<Region>(json!({"lat": "x"}), "region").unwrap_err();
        assert_eq!(e, "region.lat: expected a number, got a string");
        assert_eq!(err::<Req>(r#"{"sql":"x","limit":"5"}"#), "limit: expected a non-negative integer, got a string");
        assert_eq!(
            err::<Req>(r#"{"sql":"x","limit":-1}"#),
            "limit: expected a non-negative integer, got the number -1"
        );
        assert_eq!(
            err::<Req>(r#"{"sql":"x","limit":1.5}"#),
            "limit: expected a non-negative integer, got a fractional number"
        );
        assert_eq!(err::<Req>(r#"{"sql":"x","radius":true}"#), "radius: expected a number, got true");
        assert_eq!(err::<Req>(r#"{"sql":7}"#), "sql: expected a string, got an integer");
        assert_eq!(err::<Req>(r#"{"sql":"x","params":{}}"#), "params: expected an array, got an object");
        assert_eq!(err::<Req>(r#"{"params":[]}"#), "missing field `sql`");
        assert_eq!(err::<Req>(r#"{"sql":"x","batch":[{}]}"#), "batch[0]: missing field `sql`");
        assert_eq!(
            err::<Req>(r#"{"sql":"x","foo":1}"#),
            "unknown field `foo`; expected one of region, sql, params, limit, radius, batch, format"
        );
        assert_eq!(
            err::<Req>(r#"{"sql":"x","format":"csv"}"#),
            "format: unknown value `csv`; expected one of object, array"
        );
        assert_eq!(err::<Req>(r#"{"sql":"x","format":3}"#), "format: expected a string, got an integer");
        assert_eq!(err::<Req>(r#""SELECT 1""#), "expected an object, got a string");
        for e in [
            err::<Req>(r#"[1,2]"#),
            err::<Req>(r#"{"sql":"x","limit":"5"}"#),
            err::<Req>(r#"{"sql":"x","radius":"5"}"#),
            err::<Req>(r#"{"sql":"x","format":1}"#),
        ] {
            for rust in ["f64", "u64", "struct", "Req", "sequence", "enum", "elements"] {
                assert!(!e.contains(rust), "{e:?} mentions {rust}");
            }
        }
    }

    #[test]
    fn syntax_errors_and_trailing_data_are_refused() {
        assert!(err::<Req>(r#"{"sql":"x""#).contains("EOF"));
        assert!(err::<Req>(r#"{"sql":"x"} {}"#).contains("trailing characters"));
        assert!(parse_value_strict(b"").is_err());
        assert!(parse_value_strict(b"[1,2,]").is_err());
        // serde_json's nesting limit still holds through our visitor.
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse_value_strict(deep.as_bytes()).unwrap_err().contains("recursion limit"));
    }

    #[test]
    fn key_order_is_kept_for_order_sensitive_targets() {
        // ExtJson-like targets see the keys in the order the client wrote them.
        #[derive(Debug)]
        struct Keys(Vec<String>);
        impl<'de> serde::Deserialize<'de> for Keys {
            fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Keys;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                        let mut out = Vec::new();
                        while let Some((k, _)) = m.next_entry::<String, de::IgnoredAny>()? {
                            out.push(k);
                        }
                        Ok(Keys(out))
                    }
                }
                d.deserialize_any(V)
            }
        }
        let k: Keys = parse_strict(br#"{"b":1,"a":-1,"c":0}"#).unwrap();
        assert_eq!(k.0, ["b", "a", "c"]);
    }

    #[test]
    fn value_round_trip_and_numbers() {
        let v = parse_value_strict(br#"{"a":1,"b":-2,"c":1.5,"d":[true,null,"s"],"e":18446744073709551615}"#).unwrap();
        assert_eq!(v, json!({"a":1,"b":-2,"c":1.5,"d":[true,null,"s"],"e":18446744073709551615u64}));
        let odd = parse_value_strict(br#"{"a b":{"x":1,"x":2}}"#).unwrap_err();
        assert!(odd.starts_with(r#"["a b"]: duplicate key `x`"#), "{odd}");
    }
}
