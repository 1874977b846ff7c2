//! Raw map → validated [`ShardMap`]. Collects every error (with its line) before rejecting;
//! error texts never contain connection strings.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;

use h3o::{CellIndex, Resolution};
use toml::Spanned;

use super::raw::{RawDatabase, RawMap};
use super::ring::FallbackRing;
use super::secret::{ExpandError, Secret, expand};
use super::{CachePolicy, DatabaseSpec, DbKind, Fallback, Shard, ShardMap, TableSpec};
use crate::ids::{MapVersion, ShardId, ShardIdx};

/// Virtual nodes per shard on the fallback ring unless `fallback.vnodes` says otherwise.
pub const DEFAULT_VNODES: usize = 160;

/// One thing wrong with a map, with the 1-based line it was found on (when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    pub line: Option<usize>,
    pub kind: MapErrorKind,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapErrorKind {
    #[error("syntax: {0}")]
    Syntax(String),
    #[error("version must be >= 1, got {0}")]
    BadVersion(u64),
    #[error("resolution must be in 0..=15, got {0}")]
    BadResolution(i64),
    #[error("shard id must be non-empty and use only [A-Za-z0-9._-], got {0:?}")]
    BadShardId(String),
    #[error("duplicate shard id {id:?} (first defined on line {first_line})")]
    DuplicateShard { id: String, first_line: usize },
    #[error("unknown shard id {id:?} in {context}")]
    UnknownShard { id: String, context: &'static str },
    #[error("invalid H3 cell {cell:?} (shard {shard:?}): {reason}")]
    InvalidCell { cell: String, shard: String, reason: String },
    #[error("cell {cell} (shard {shard:?}) is at resolution {cell_res}, finer than the map resolution {resolution}")]
    CellTooFine { cell: String, shard: String, cell_res: u8, resolution: u8 },
    #[error("cell {cell} assigned twice: to {first:?} (line {first_line}) and to {second:?}")]
    CellAssignedTwice { cell: String, first: String, first_line: usize, second: String },
    #[error("shard {shard:?} database {db:?}: unknown kind {kind:?} (expected postgres, sqlserver or mongodb)")]
    UnknownKind { shard: String, db: String, kind: String },
    #[error("database {db:?} is {kind} on shard {shard:?} but {first_kind} on shard {first_shard:?}")]
    KindMismatch { db: String, shard: String, kind: &'static str, first_shard: String, first_kind: &'static str },
    #[error("shard {shard:?} database {db:?}: {problem}")]
    BadDatabase { shard: String, db: String, problem: String },
    #[error("shard {shard:?} database {db:?}: {error}")]
    Env { shard: String, db: String, error: ExpandError },
    #[error("[tables.{db}.{table}] names database {db:?}, which no shard has")]
    TableUnknownDatabase { db: String, table: String },
    #[error("[tables.{db}.{table}]: {problem}")]
    BadTable { db: String, table: String, problem: String },
    #[error("fallback mode must be \"hash\" or \"reject\", got {0:?}")]
    BadFallbackMode(String),
    #[error("fallback: {0}")]
    BadFallback(String),
}

/// Every error found in one map, in source order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapErrors(pub Vec<MapError>);

impl fmt::Display for MapErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MapErrors {}

/// Parse TOML text and compile it, expanding `${VAR}` from the process environment.
pub fn compile_str(src: &str) -> Result<ShardMap, MapErrors> {
    parse_and_compile(src, |k| std::env::var(k).ok())
}

/// Parse TOML text and compile it with an explicit environment (tests, admin pushes).
pub fn parse_and_compile(src: &str, env: impl Fn(&str) -> Option<String>) -> Result<ShardMap, MapErrors> {
    let raw: RawMap = toml::from_str(src).map_err(|e| {
        let line = e.span().map(|s| Lines::new(src).line(s.start));
        MapErrors(vec![MapError { line, kind: MapErrorKind::Syntax(e.message().to_string()) }])
    })?;
    compile(raw, src, env)
}

/// Byte offset → line, by binary search over newline positions: maps with a million cells
/// ask for a million lines, which a scan from the start would make quadratic.
struct Lines(Vec<usize>);

impl Lines {
    fn new(src: &str) -> Self {
        Self(src.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i).collect())
    }
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|nl| *nl < offset) + 1
    }
}

struct Collector {
    lines: Lines,
    errors: Vec<MapError>,
}

impl Collector {
    fn at(&mut self, span: Range<usize>, kind: MapErrorKind) {
        let line = Some(self.lines.line(span.start));
        self.errors.push(MapError { line, kind });
    }
    fn line(&self, span: Range<usize>) -> usize {
        self.lines.line(span.start)
    }
}

fn valid_shard_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn resolution_of(v: i64) -> Option<Resolution> {
    u8::try_from(v).ok().and_then(|r| Resolution::try_from(r).ok())
}

/// Raw → validated. Every check runs even after earlier failures so the operator sees all of them.
pub fn compile(raw: RawMap, src: &str, env: impl Fn(&str) -> Option<String>) -> Result<ShardMap, MapErrors> {
    let mut c = Collector { lines: Lines::new(src), errors: Vec::new() };

    let version = *raw.version.get_ref();
    if version == 0 {
        c.at(raw.version.span(), MapErrorKind::BadVersion(version));
    }
    let resolution = resolution_of(*raw.resolution.get_ref());
    if resolution.is_none() {
        c.at(raw.resolution.span(), MapErrorKind::BadResolution(*raw.resolution.get_ref()));
    }
    // Checks that depend on R use the finest resolution when R is invalid, so they still run
    // without reporting follow-on errors.
    let r = resolution.unwrap_or(Resolution::Fifteen);

    // 1.–4. Each step reports into the collector and goes on, so one run lists every error.
    let (shards, by_id, db_kinds, server_js) = compile_shards(&mut c, raw.shards, &env);
    let (assign, assigned_levels) = compile_assignments(&mut c, raw.assign, &shards, &by_id, r);
    let fallback = compile_fallback(&mut c, raw.fallback, &by_id, r);
    let tables = compile_tables(&mut c, raw.tables, &db_kinds);

    if !c.errors.is_empty() {
        c.errors.sort_by_key(|e| e.line.unwrap_or(0));
        return Err(MapErrors(c.errors));
    }

    let mut sorted: [Vec<(u64, ShardIdx)>; 16] = Default::default();
    for (cell, owner) in &assign {
        let res = CellIndex::try_from(*cell).expect("validated").resolution();
        sorted[usize::from(u8::from(res))].push((*cell, *owner));
    }
    for v in &mut sorted {
        v.sort_unstable();
    }
    Ok(ShardMap {
        version: MapVersion(version),
        resolution: r,
        shards,
        by_id,
        assign,
        assigned_levels,
        sorted,
        fallback,
        databases: db_kinds.into_iter().map(|(k, (kind, _))| (k, kind)).collect(),
        tables,
        server_js,
    })
}

/// Each database's kind and the first shard that declared it.
type DbKinds = BTreeMap<String, (DbKind, String)>;
type Assign = HashMap<u64, ShardIdx, rustc_hash::FxBuildHasher>;
type Tables = BTreeMap<String, BTreeMap<String, TableSpec>>;
type RawTables = BTreeMap<String, BTreeMap<String, serde_spanned::Spanned<super::raw::RawTable>>>;

/// Step 1: shards and their databases (each database one kind on every shard).
fn compile_shards(
    c: &mut Collector,
    raw_shards: Vec<super::raw::RawShard>,
    env: &impl Fn(&str) -> Option<String>,
) -> (Vec<Shard>, HashMap<ShardId, ShardIdx>, DbKinds, std::collections::BTreeSet<String>) {
    let mut shards: Vec<Shard> = Vec::with_capacity(raw_shards.len());
    let mut by_id: HashMap<ShardId, ShardIdx> = HashMap::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let mut db_kinds: BTreeMap<String, (DbKind, String)> = BTreeMap::new();
    // database → (allow_server_js, first shard that said so)
    let mut server_js: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for rs in raw_shards {
        let id = rs.id.get_ref().clone();
        if !valid_shard_id(&id) {
            c.at(rs.id.span(), MapErrorKind::BadShardId(id.clone()));
        }
        if let Some(fl) = first_line.get(&id) {
            c.at(rs.id.span(), MapErrorKind::DuplicateShard { id: id.clone(), first_line: *fl });
            continue;
        }
        first_line.insert(id.clone(), c.line(rs.id.span()));
        let mut databases = BTreeMap::new();
        for (db, spanned) in rs.databases {
            let span = spanned.span();
            let js = spanned.get_ref().allow_server_js.as_ref().map(|b| (*b.get_ref(), b.span()));
            let allow = js.as_ref().is_some_and(|(b, _)| *b);
            if js.is_some() && spanned.get_ref().kind.get_ref() != "mongodb" {
                c.at(
                    span.clone(),
                    MapErrorKind::BadDatabase {
                        shard: id.clone(),
                        db: db.clone(),
                        problem: "allow_server_js applies to mongodb databases only".into(),
                    },
                );
            }
            match server_js.get(&db) {
                Some((first, first_shard)) if *first != allow => c.at(
                    js.map_or(span.clone(), |(_, s)| s),
                    MapErrorKind::BadDatabase {
                        shard: id.clone(),
                        db: db.clone(),
                        problem: format!(
                            "allow_server_js is {allow} here but {first} on shard {first_shard}: it must be the same on every shard"
                        ),
                    },
                ),
                Some(_) => {}
                None => {
                    server_js.insert(db.clone(), (allow, id.clone()));
                }
            }
            if let Some(spec) = compile_database(c, &id, &db, spanned, env) {
                let kind = spec.kind();
                match db_kinds.get(&db) {
                    Some((k, first_shard)) if *k != kind => c.at(
                        span.clone(),
                        MapErrorKind::KindMismatch {
                            db: db.clone(),
                            shard: id.clone(),
                            kind: kind.as_str(),
                            first_shard: first_shard.clone(),
                            first_kind: k.as_str(),
                        },
                    ),
                    Some(_) => {}
                    None => {
                        db_kinds.insert(db.clone(), (kind, id.clone()));
                    }
                }
                databases.insert(db, spec);
            }
        }
        let idx = ShardIdx(shards.len() as u32);
        let sid = ShardId::new(&id);
        by_id.insert(sid.clone(), idx);
        shards.push(Shard { id: sid, zone: rs.zone, databases });
    }

    let server_js = server_js.into_iter().filter(|(_, (allow, _))| *allow).map(|(db, _)| db).collect();
    (shards, by_id, db_kinds, server_js)
}

/// Step 2: assignments — valid cells at resolution <= R, each cell once. Returns the owners
/// and the bit set of resolutions that have assignments.
fn compile_assignments(
    c: &mut Collector,
    raw_assign: Vec<super::raw::RawAssign>,
    shards: &[Shard],
    by_id: &HashMap<ShardId, ShardIdx>,
    r: Resolution,
) -> (Assign, u16) {
    let mut assign: HashMap<u64, ShardIdx, rustc_hash::FxBuildHasher> = HashMap::default();
    let mut assign_line: HashMap<u64, usize, rustc_hash::FxBuildHasher> = HashMap::default();
    let mut assigned_levels = 0u16;
    for ra in raw_assign {
        let shard_name = ra.shard.get_ref().clone();
        let owner = by_id.get(&ShardId::new(&shard_name)).copied();
        if owner.is_none() {
            c.at(ra.shard.span(), MapErrorKind::UnknownShard { id: shard_name.clone(), context: "[[assign]]" });
        }
        for cell in ra.cells {
            let text = cell.get_ref().trim();
            let parsed = u64::from_str_radix(text.trim_start_matches("0x"), 16)
                .map_err(|e| e.to_string())
                .and_then(|v| CellIndex::try_from(v).map_err(|e| e.to_string()));
            let ci = match parsed {
                Ok(ci) => ci,
                Err(reason) => {
                    c.at(
                        cell.span(),
                        MapErrorKind::InvalidCell { cell: text.to_string(), shard: shard_name.clone(), reason },
                    );
                    continue;
                }
            };
            if ci.resolution() > r {
                c.at(
                    cell.span(),
                    MapErrorKind::CellTooFine {
                        cell: ci.to_string(),
                        shard: shard_name.clone(),
                        cell_res: ci.resolution().into(),
                        resolution: r.into(),
                    },
                );
                continue;
            }
            let Some(owner) = owner else { continue };
            let key = u64::from(ci);
            if let Some(prev) = assign.get(&key) {
                let first = shards[prev.get()].id.to_string();
                c.at(
                    cell.span(),
                    MapErrorKind::CellAssignedTwice {
                        cell: ci.to_string(),
                        first,
                        first_line: assign_line[&key],
                        second: shard_name.clone(),
                    },
                );
                continue;
            }
            assign.insert(key, owner);
            assign_line.insert(key, c.line(cell.span()));
            assigned_levels |= 1 << u8::from(ci.resolution());
        }
    }

    (assign, assigned_levels)
}

/// Step 3: the fallback. No `[fallback]` section means reject: an unassigned cell has no owner.
fn compile_fallback(
    c: &mut Collector,
    raw_fallback: Option<serde_spanned::Spanned<super::raw::RawFallback>>,
    by_id: &HashMap<ShardId, ShardIdx>,
    r: Resolution,
) -> Fallback {
    match raw_fallback {
        None => Fallback::Reject,
        Some(fb) => {
            let fb_span = fb.span();
            let fb = fb.into_inner();
            match fb.mode.get_ref().as_str() {
                "reject" => {
                    if !fb.shards.is_empty() {
                        c.at(fb.mode.span(), MapErrorKind::BadFallback("mode \"reject\" takes no shards".into()));
                    }
                    Fallback::Reject
                }
                "hash" => compile_hash_fallback(c, fb, fb_span, by_id, r).unwrap_or(Fallback::Reject),
                other => {
                    c.at(fb.mode.span(), MapErrorKind::BadFallbackMode(other.to_string()));
                    Fallback::Reject
                }
            }
        }
    }
}

/// Step 4: tables — the database must exist; SQL tables need a cell column.
fn compile_tables(c: &mut Collector, raw_tables: RawTables, db_kinds: &DbKinds) -> Tables {
    let mut tables: BTreeMap<String, BTreeMap<String, TableSpec>> = BTreeMap::new();
    for (db, ts) in raw_tables {
        for (table, spec) in ts {
            let span = spec.span();
            let spec = spec.into_inner();
            match db_kinds.get(&db) {
                None => c.at(span.clone(), MapErrorKind::TableUnknownDatabase { db: db.clone(), table: table.clone() }),
                // A Mongo collection may carry a geo field, a numeric cell field, or both.
                Some((DbKind::Mongodb, _)) => {}
                Some((_, _)) => {
                    if spec.cell_column.is_none() {
                        c.at(
                            span.clone(),
                            MapErrorKind::BadTable {
                                db: db.clone(),
                                table: table.clone(),
                                problem: "SQL tables need cell_column".into(),
                            },
                        );
                    }
                    if spec.geo_field.is_some() {
                        c.at(
                            span.clone(),
                            MapErrorKind::BadTable {
                                db: db.clone(),
                                table: table.clone(),
                                problem: "geo_field applies to MongoDB collections only".into(),
                            },
                        );
                    }
                }
            }
            if let Some(col) = &spec.cell_column
                && !valid_identifier(col)
            {
                c.at(
                    span.clone(),
                    MapErrorKind::BadTable {
                        db: db.clone(),
                        table: table.clone(),
                        problem: format!("cell_column {col:?} is not a plain identifier"),
                    },
                );
            }
            if !valid_identifier(&table) {
                c.at(
                    span.clone(),
                    MapErrorKind::BadTable {
                        db: db.clone(),
                        table: table.clone(),
                        problem: "table name is not a plain identifier".into(),
                    },
                );
            }
            let cache = spec.cache.and_then(|p| {
                let bad = |problem: String| MapErrorKind::BadTable { db: db.clone(), table: table.clone(), problem };
                if p.ttl_ms < 1 {
                    c.at(span.clone(), bad(format!("cache.ttl_ms must be at least 1 (got {})", p.ttl_ms)));
                    return None;
                }
                if p.swr_ms < 0 {
                    c.at(span.clone(), bad(format!("cache.swr_ms must not be negative (got {})", p.swr_ms)));
                    return None;
                }
                Some(CachePolicy { ttl_ms: p.ttl_ms as u64, swr_ms: p.swr_ms as u64 })
            });
            tables
                .entry(db.clone())
                .or_default()
                .insert(table, TableSpec { cell_column: spec.cell_column, geo_field: spec.geo_field, cache });
        }
    }

    tables
}

/// Identifiers we splice into SQL (migration filters, triggers): lowercase-safe plain names only.
fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn compile_hash_fallback(
    c: &mut Collector,
    fb: super::raw::RawFallback,
    fb_span: Range<usize>,
    by_id: &HashMap<ShardId, ShardIdx>,
    r: Resolution,
) -> Option<Fallback> {
    let mut ok = true;
    let mut members: Vec<(String, ShardIdx)> = Vec::new();
    if fb.shards.is_empty() {
        c.at(fb.mode.span(), MapErrorKind::BadFallback("mode \"hash\" needs at least one shard".into()));
        ok = false;
    }
    for s in &fb.shards {
        let name = s.get_ref();
        match by_id.get(&ShardId::new(name)) {
            None => {
                c.at(s.span(), MapErrorKind::UnknownShard { id: name.clone(), context: "[fallback] shards" });
                ok = false;
            }
            Some(idx) if members.iter().any(|(_, i)| i == idx) => {
                c.at(s.span(), MapErrorKind::BadFallback(format!("shard {name:?} listed twice")));
                ok = false;
            }
            Some(idx) => members.push((name.clone(), *idx)),
        }
    }
    let resolution = match &fb.resolution {
        None => {
            c.at(fb_span, MapErrorKind::BadFallback("mode \"hash\" needs resolution".into()));
            None
        }
        Some(v) => match resolution_of(*v.get_ref()) {
            None => {
                c.at(v.span(), MapErrorKind::BadFallback(format!("resolution must be in 0..=15, got {}", v.get_ref())));
                None
            }
            Some(res) if res > r => {
                c.at(
                    v.span(),
                    MapErrorKind::BadFallback(format!(
                        "resolution {} is finer than the map resolution {}",
                        u8::from(res),
                        u8::from(r)
                    )),
                );
                None
            }
            Some(res) => Some(res),
        },
    };
    let vnodes = match &fb.vnodes {
        None => DEFAULT_VNODES,
        Some(v) if (1..=10_000).contains(v.get_ref()) => *v.get_ref() as usize,
        Some(v) => {
            c.at(v.span(), MapErrorKind::BadFallback(format!("vnodes must be in 1..=10000, got {}", v.get_ref())));
            ok = false;
            DEFAULT_VNODES
        }
    };
    let resolution = resolution?;
    if !ok {
        return None;
    }
    let ring = FallbackRing::new(&members, vnodes);
    Some(Fallback::Hash { shards: members.into_iter().map(|(_, i)| i).collect(), resolution, vnodes, ring })
}

fn compile_database(
    c: &mut Collector,
    shard: &str,
    db: &str,
    spanned: Spanned<RawDatabase>,
    env: &impl Fn(&str) -> Option<String>,
) -> Option<DatabaseSpec> {
    let span = spanned.span();
    let raw = spanned.into_inner();
    let bad = |c: &mut Collector, span: Range<usize>, problem: &str| {
        c.at(span.clone(), MapErrorKind::BadDatabase { shard: shard.into(), db: db.into(), problem: problem.into() });
    };
    if !valid_identifier(db) {
        bad(c, span.clone(), "database name must be a plain identifier ([A-Za-z0-9_], not starting with a digit)");
    }
    let secret = |c: &mut Collector, s: &Spanned<String>, schemes: &[&str]| -> Option<Secret> {
        match expand(s.get_ref(), env) {
            Err(error) => {
                c.at(s.span(), MapErrorKind::Env { shard: shard.into(), db: db.into(), error });
                None
            }
            Ok(v) => {
                let lower = v.trim_start().to_ascii_lowercase();
                if !schemes.iter().any(|p| lower.starts_with(p)) {
                    c.at(
                        s.span(),
                        MapErrorKind::BadDatabase {
                            shard: shard.into(),
                            db: db.into(),
                            problem: format!("connection string must start with one of {schemes:?}"),
                        },
                    );
                    return None;
                }
                Some(Secret::new(v))
            }
        }
    };
    let kind = raw.kind.get_ref().as_str();
    match kind {
        "postgres" | "sqlserver" => {
            let schemes: &[&str] = if kind == "postgres" {
                &["postgres://", "postgresql://"]
            } else {
                // URL form or ADO form (`server=...;`): ADO strings start with a key.
                &["sqlserver://", "mssql://", "server=", "data source=", "addr=", "address="]
            };
            if raw.uri.is_some() {
                bad(c, span.clone(), "`uri` is for mongodb; SQL databases use `primary` and `replicas`");
            }
            let Some(p) = &raw.primary else {
                bad(c, span, "`primary` is required");
                return None;
            };
            let primary = secret(c, p, schemes);
            let replicas: Vec<Option<Secret>> = raw.replicas.iter().map(|r| secret(c, r, schemes)).collect();
            let admin = raw.admin.as_ref().map(|a| secret(c, a, schemes));
            if kind == "sqlserver" && raw.admin.is_some() {
                bad(c, span.clone(), "`admin` (migration connection) applies to postgres databases only");
            }
            let primary = primary?;
            let replicas: Option<Vec<Secret>> = replicas.into_iter().collect();
            let replicas = replicas?;
            let admin = match admin {
                None => None,
                Some(a) => Some(a?),
            };
            Some(if kind == "postgres" {
                DatabaseSpec::Postgres { primary, replicas, admin }
            } else {
                DatabaseSpec::Sqlserver { primary, replicas }
            })
        }
        "mongodb" => {
            if raw.primary.is_some() || !raw.replicas.is_empty() || raw.admin.is_some() {
                bad(
                    c,
                    span.clone(),
                    "mongodb databases take `uri` (the driver discovers replicas), not primary/replicas",
                );
            }
            let Some(u) = &raw.uri else {
                bad(c, span, "`uri` is required");
                return None;
            };
            let uri = secret(c, u, &["mongodb://", "mongodb+srv://"])?;
            Some(DatabaseSpec::Mongodb { uri })
        }
        other => {
            c.at(raw.kind.span(), MapErrorKind::UnknownKind { shard: shard.into(), db: db.into(), kind: other.into() });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Lines;

    #[test]
    fn lines_match_a_scan() {
        let src = "a\nbb\n\nccc\n";
        let lines = Lines::new(src);
        for off in 0..=src.len() + 2 {
            let scan = src.as_bytes()[..off.min(src.len())].iter().filter(|b| **b == b'\n').count() + 1;
            assert_eq!(lines.line(off), scan, "offset {off}");
        }
    }
}
