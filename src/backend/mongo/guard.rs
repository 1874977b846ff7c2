//! Document-API policy over parsed requests: server-side JavaScript operators, and where an
//! update would leave a document's location (`geo_field`). Pure functions over BSON: no I/O, no
//! routing, no HTTP — callers decide which shard owns a location and how to answer.

use bson::{Bson, Document};
use mongodb::options::UpdateModifications;

/// Operators that run JavaScript on the server (`$where` in queries, `$function` and
/// `$accumulator` in aggregation expressions, which `find` projections and update pipelines
/// accept too).
pub const SERVER_JS: &[&str] = &["$where", "$function", "$accumulator"];

/// A request part to search for server-side JavaScript, borrowed as the request holds it (no
/// copy into one BSON value per request).
#[derive(Clone, Copy)]
pub enum Part<'a> {
    Value(&'a Bson),
    Doc(&'a Document),
    /// A pipeline (aggregate stages, or an update pipeline).
    Docs(&'a [Document]),
}

impl<'a> Part<'a> {
    /// An update: its operator/replacement document, or its pipeline.
    pub fn update(u: &'a UpdateModifications) -> Part<'a> {
        static NONE: Bson = Bson::Null;
        match u {
            UpdateModifications::Document(d) => Part::Doc(d),
            UpdateModifications::Pipeline(p) => Part::Docs(p),
            _ => Part::Value(&NONE),
        }
    }

    /// The path below this part of the first server-side JavaScript operator, innermost segment
    /// first. Nothing is allocated unless one is found: this runs on every document request.
    fn js_segments(self) -> Option<Vec<String>> {
        let in_doc = |d: &Document| {
            d.iter().find_map(|(k, v)| {
                let below =
                    if SERVER_JS.contains(&k.as_str()) { Some(Vec::new()) } else { Part::Value(v).js_segments() };
                below.map(|mut s| {
                    s.push(format!(".{k}"));
                    s
                })
            })
        };
        let at = |i: usize, s: Option<Vec<String>>| {
            s.map(|mut s| {
                s.push(format!("[{i}]"));
                s
            })
        };
        match self {
            Part::Value(Bson::Document(d)) | Part::Doc(d) => in_doc(d),
            Part::Value(Bson::Array(a)) => a.iter().enumerate().find_map(|(i, v)| at(i, Part::Value(v).js_segments())),
            Part::Docs(ds) => ds.iter().enumerate().find_map(|(i, d)| at(i, in_doc(d))),
            Part::Value(_) => None,
        }
    }
}

/// The first server-side JavaScript operator anywhere in `v`, as a path (`filter.$or[1].$where`).
pub fn find_server_js(what: &str, v: &Bson) -> Option<String> {
    find_in(what, Part::Value(v))
}

fn find_in(what: &str, part: Part<'_>) -> Option<String> {
    part.js_segments().map(|s| s.iter().rev().fold(what.to_string(), |path, seg| path + seg))
}

/// Refuse server-side JavaScript in any of `parts` (name, part) unless the database opts in.
pub fn check_server_js(db: &str, allowed: bool, parts: &[(&str, Part<'_>)]) -> Result<(), String> {
    if allowed {
        return Ok(());
    }
    match parts.iter().find_map(|(what, p)| find_in(what, *p)) {
        Some(path) => Err(format!(
            "{path}: server-side JavaScript ($where, $function, $accumulator) is not allowed on database \
             {db:?} (the shard map's allow_server_js option enables it)"
        )),
        None => Ok(()),
    }
}

/// One location the document may end up with after an update, to be checked against the shard
/// the update runs on: where it came from (for the message) and the GeoJSON value.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLocation {
    pub source: String,
    pub value: Bson,
}

/// Do two dotted paths overlap (one is the other or a prefix of it at a `.` boundary)?
fn overlaps(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long == short || (long.starts_with(short) && long.as_bytes()[short.len()] == b'.')
}

/// The value of `field` inside a value assigned at `key`, a path that is `field` or one of its
/// ancestors (`$set: {"a": {"loc": ...}}` for field `a.loc`). `None`: the assignment removes it.
fn value_below<'a>(key: &str, value: &'a Bson, field: &str) -> Option<&'a Bson> {
    if key == field {
        return Some(value);
    }
    let rest = &field[key.len() + 1..];
    match value {
        Bson::Document(d) => crate::backend::mongo::ejson::get_path(d, rest),
        _ => None,
    }
}

/// The location the filter's equality on `field` gives an upserted document (MongoDB copies
/// equality conditions of the query into the inserted document), if any.
fn filter_equality(filter: &Document, field: &str, out: &mut Vec<NewLocation>) -> Result<(), String> {
    for (k, v) in filter {
        if k == "$and" {
            if let Bson::Array(items) = v {
                for item in items {
                    if let Bson::Document(d) = item {
                        filter_equality(d, field, out)?;
                    }
                }
            }
            continue;
        }
        if k.starts_with('$') || !overlaps(k, field) {
            continue;
        }
        if k.len() > field.len() {
            // `{"loc.coordinates": [..]}`: an upsert would build a partial location.
            return Err(format!("filter.{k} sets part of {field} on an upsert; give the whole {field}"));
        }
        let value = match v {
            // `{"loc": {"$eq": {...}}}` is an equality; other operators put nothing in the document.
            Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => match d.get("$eq") {
                Some(eq) => eq,
                None => continue,
            },
            other => other,
        };
        if let Some(value) = value_below(k, value, field) {
            out.push(NewLocation { source: format!("filter.{k}"), value: value.clone() });
        }
    }
    Ok(())
}

/// Where an update may put a document's location. `Ok(list)`: the update leaves the location
/// alone or sets it to each listed value (every one must belong to the shard the update runs on);
/// `Err(why)`: the update would remove the location or change it in a way that cannot be known
/// before it runs (an operator other than `$set`/`$setOnInsert`, a partial `$set`, a pipeline
/// stage that computes it), so it must be refused.
pub fn update_locations(
    filter: &Document,
    update: &UpdateModifications,
    upsert: bool,
    field: &str,
) -> Result<Vec<NewLocation>, String> {
    let mut out = Vec::new();
    match update {
        UpdateModifications::Document(u) if u.keys().next().is_some_and(|k| k.starts_with('$')) => {
            let mut sets_field = false;
            for (op, args) in u {
                let Bson::Document(args) = args else { continue };
                for (k, v) in args {
                    // `$rename: {"old": "loc"}` writes the destination path named by the value.
                    let touches =
                        overlaps(k, field) || (op == "$rename" && v.as_str().is_some_and(|to| overlaps(to, field)));
                    if !touches {
                        continue;
                    }
                    match op.as_str() {
                        "$set" | "$setOnInsert" if k.len() <= field.len() => {
                            sets_field = true;
                            match value_below(k, v, field) {
                                Some(value) => {
                                    out.push(NewLocation { source: format!("update.{op}.{k}"), value: value.clone() })
                                }
                                None => {
                                    return Err(format!(
                                        "update.{op}.{k} removes {field}; a document keeps its location"
                                    ));
                                }
                            }
                        }
                        "$set" | "$setOnInsert" => {
                            return Err(format!("update.{op}.{k} sets part of {field}; set the whole {field}"));
                        }
                        "$unset" => {
                            return Err(format!("update.$unset.{k} removes {field}; a document keeps its location"));
                        }
                        _ => {
                            return Err(format!(
                                "update.{op}.{k} changes {field} in a way cellgate cannot check; use $set with the new location"
                            ));
                        }
                    }
                }
            }
            if upsert && !sets_field {
                filter_equality(filter, field, &mut out)?;
            }
        }
        // A replacement is the whole new document: it must carry the location.
        UpdateModifications::Document(replacement) => {
            match crate::backend::mongo::ejson::get_path(replacement, field) {
                Some(v) => out.push(NewLocation { source: format!("update.{field}"), value: v.clone() }),
                None => return Err(format!("the replacement document has no {field}; a document keeps its location")),
            }
        }
        UpdateModifications::Pipeline(stages) => {
            for (i, stage) in stages.iter().enumerate() {
                for (op, args) in stage {
                    let touches = match (op.as_str(), args) {
                        ("$replaceRoot" | "$replaceWith" | "$project", _) => true,
                        ("$unset", Bson::String(s)) => overlaps(s, field),
                        ("$unset", Bson::Array(a)) => a.iter().any(|s| s.as_str().is_some_and(|s| overlaps(s, field))),
                        (_, Bson::Document(d)) => d.keys().any(|k| overlaps(k, field)),
                        _ => false,
                    };
                    if touches {
                        return Err(format!(
                            "update[{i}].{op} may change or remove {field}; a pipeline update cannot be checked \
                             (use $set with the new location)"
                        ));
                    }
                }
            }
            if upsert {
                filter_equality(filter, field, &mut out)?;
            }
        }
        _ => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{bson, doc};

    fn loc(lng: f64, lat: f64) -> Document {
        doc! {"type": "Point", "coordinates": [lng, lat]}
    }

    fn ops(u: Document) -> UpdateModifications {
        UpdateModifications::Document(u)
    }

    #[test]
    fn server_js_anywhere() {
        let f = bson!({"$or": [{"a": 1}, {"$where": "this.a > 1"}]});
        assert_eq!(find_server_js("filter", &f).as_deref(), Some("filter.$or[1].$where"));
        let p = bson!([{"$group": {"_id": null, "x": {"$accumulator": {"init": "function(){}"}}}}]);
        assert_eq!(find_server_js("pipeline", &p).as_deref(), Some("pipeline[0].$group.x.$accumulator"));
        let e = bson!({"$expr": {"$function": {"body": "f", "args": [], "lang": "js"}}});
        assert!(find_server_js("filter", &e).is_some());
        // A field *value* that names an operator is data, not code.
        assert_eq!(find_server_js("filter", &bson!({"note": "$where"})), None);
        let f = bson!({"a": {"$gt": 1}});
        assert!(check_server_js("db", false, &[("filter", Part::Value(&f))]).is_ok());
        let js = bson!({"$where": "1"});
        let err = check_server_js("profiles", false, &[("filter", Part::Value(&f)), ("update", Part::Value(&js))])
            .unwrap_err();
        assert!(err.starts_with("update.$where") && err.contains("allow_server_js"), "{err}");
        assert!(check_server_js("profiles", true, &[("filter", Part::Value(&js))]).is_ok());
        // Borrowed documents and pipelines give the same paths.
        let stages = [doc! {"$match": {}}, doc! {"$group": {"x": {"$accumulator": {}}}}];
        assert_eq!(find_in("pipeline", Part::Docs(&stages)).as_deref(), Some("pipeline[1].$group.x.$accumulator"));
        let d = doc! {"$or": [{"a": 1}, {"$where": "1"}]};
        assert_eq!(find_in("filter", Part::Doc(&d)).as_deref(), Some("filter.$or[1].$where"));
    }

    #[test]
    fn set_and_set_on_insert_are_checked() {
        let u = ops(doc! {"$set": {"n": 1, "loc": loc(2.35, 48.85)}, "$setOnInsert": {"loc": loc(1.0, 2.0)}});
        let got = update_locations(&doc! {}, &u, true, "loc").unwrap();
        let sources: Vec<&str> = got.iter().map(|l| l.source.as_str()).collect();
        assert_eq!(sources, ["update.$set.loc", "update.$setOnInsert.loc"]);
        assert_eq!(got[0].value, Bson::Document(loc(2.35, 48.85)));
        // Untouched location: nothing to check.
        assert!(update_locations(&doc! {"a": 1}, &ops(doc! {"$inc": {"n": 1}}), false, "loc").unwrap().is_empty());
        // An ancestor of a nested geo field.
        let u = ops(doc! {"$set": {"addr": {"street": "x", "loc": loc(1.0, 2.0)}}});
        assert_eq!(update_locations(&doc! {}, &u, false, "addr.loc").unwrap()[0].source, "update.$set.addr");
        let u = ops(doc! {"$set": {"addr": {"street": "x"}}});
        assert!(update_locations(&doc! {}, &u, false, "addr.loc").unwrap_err().contains("removes addr.loc"));
        // A sibling with a common prefix is not the field.
        assert!(update_locations(&doc! {}, &ops(doc! {"$set": {"location": 1}}), false, "loc").unwrap().is_empty());
    }

    #[test]
    fn unknowable_or_removing_changes_are_refused() {
        for u in [
            doc! {"$unset": {"loc": ""}},
            doc! {"$set": {"loc.coordinates": [1.0, 2.0]}},
            doc! {"$rename": {"loc": "old"}},
            doc! {"$rename": {"other": "loc"}},
            doc! {"$push": {"loc.coordinates": 1}},
            doc! {"$inc": {"loc.coordinates.0": 1}},
        ] {
            assert!(update_locations(&doc! {}, &ops(u.clone()), false, "loc").is_err(), "{u}");
        }
        // A replacement must carry the location.
        assert!(update_locations(&doc! {}, &ops(doc! {"name": "x"}), false, "loc").is_err());
        let got = update_locations(&doc! {}, &ops(doc! {"name": "x", "loc": loc(1.0, 2.0)}), false, "loc").unwrap();
        assert_eq!(got[0].source, "update.loc");
        // Pipelines: stages that may compute or drop the field are refused, others pass.
        let p = |s: Document| UpdateModifications::Pipeline(vec![s]);
        assert!(update_locations(&doc! {}, &p(doc! {"$set": {"loc": "$other"}}), false, "loc").is_err());
        assert!(update_locations(&doc! {}, &p(doc! {"$unset": ["a", "loc"]}), false, "loc").is_err());
        assert!(update_locations(&doc! {}, &p(doc! {"$replaceWith": "$x"}), false, "loc").is_err());
        assert!(update_locations(&doc! {}, &p(doc! {"$set": {"n": 1}}), false, "loc").unwrap().is_empty());
    }

    #[test]
    fn upsert_takes_the_filter_equality() {
        let set_n = ops(doc! {"$set": {"n": 1}});
        let f = doc! {"name": "x", "loc": loc(2.35, 48.85)};
        let got = update_locations(&f, &set_n, true, "loc").unwrap();
        assert_eq!((got.len(), got[0].source.as_str()), (1, "filter.loc"));
        assert!(update_locations(&f, &set_n, false, "loc").unwrap().is_empty(), "no upsert: the filter only matches");
        let f = doc! {"$and": [{"loc": {"$eq": loc(1.0, 2.0)}}]};
        assert_eq!(update_locations(&f, &set_n, true, "loc").unwrap()[0].source, "filter.loc");
        // A non-equality condition puts nothing in the upserted document.
        let f = doc! {"loc": {"$near": {"$geometry": loc(1.0, 2.0)}}};
        assert!(update_locations(&f, &set_n, true, "loc").unwrap().is_empty());
        assert!(update_locations(&doc! {"loc.coordinates": [1.0, 2.0]}, &set_n, true, "loc").is_err());
        // $set of the field wins over the filter's equality (MongoDB applies the update last).
        let u = ops(doc! {"$set": {"loc": loc(1.0, 2.0)}});
        let got = update_locations(&doc! {"loc": loc(9.0, 9.0)}, &u, true, "loc").unwrap();
        assert_eq!(got.iter().map(|l| l.source.as_str()).collect::<Vec<_>>(), ["update.$set.loc"]);
    }
}
