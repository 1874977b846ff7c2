//! Step 1 of a migration, pure over the map: validate the request (cells, owners, target,
//! database kinds), name the databases and tables to move and the privileged connections to
//! use, and build map v+1. No I/O.

use std::collections::BTreeMap;

use h3o::CellIndex;

use super::MigrateError;
use super::doc::{Doc, State};
use super::mongo::DocPair;
use crate::backend::postgres::tls::{self, ConnInfo, TlsSettings};
use crate::geo;
use crate::routing;
use crate::shardmap::{DatabaseSpec, DbKind, ShardMap};

/// One side of a database pair: the shard and its privileged connection.
#[derive(Clone)]
pub(super) struct Endpoint {
    pub shard: String,
    pub config: tokio_postgres::Config,
    /// `sslmode` / `sslrootcert` / client certificate of the connection string.
    pub tls: TlsSettings,
}

/// One logical database moved between two shards.
#[derive(Clone)]
pub(super) struct DbPair {
    pub db: String,
    /// (table, cell_column)
    pub tables: Vec<(String, String)>,
    pub source: Endpoint,
    pub target: Endpoint,
}

/// Every database a migration moves: PostgreSQL by logical replication, MongoDB by copy.
#[derive(Clone, Default)]
pub(super) struct Pairs {
    pub sql: Vec<DbPair>,
    pub docs: Vec<DocPair>,
}

impl Pairs {
    fn is_empty(&self) -> bool {
        self.sql.is_empty() && self.docs.is_empty()
    }
}

/// Passwords of every connection of the pairs: masked out of persisted and reported errors.
/// (MongoDB errors are scrubbed of their URI's password by the backend.)
pub(super) fn secrets(pairs: &Pairs) -> Vec<String> {
    pairs
        .sql
        .iter()
        .flat_map(|p| [&p.source, &p.target])
        .filter_map(|e| e.config.get_password().map(|b| String::from_utf8_lossy(b).into_owned()))
        .collect()
}

pub(super) fn admin_config(map: &ShardMap, shard: &str, db: &str) -> Result<Endpoint, MigrateError> {
    let idx = map.shard_idx(shard).ok_or_else(|| MigrateError::InvalidRequest(format!("unknown shard {shard}")))?;
    match map.shard(idx).databases.get(db) {
        Some(DatabaseSpec::Postgres { primary, admin, .. }) => {
            let s = admin.as_ref().unwrap_or(primary);
            let ConnInfo { config, tls } = tls::parse(s.expose())
                .map_err(|e| MigrateError::InvalidRequest(format!("shard {shard} database {db}: {e}")))?;
            Ok(Endpoint { shard: shard.to_string(), config, tls })
        }
        Some(other) => {
            Err(MigrateError::Unsupported(format!("shard {shard} database {db} is {}", other.kind().as_str())))
        }
        None => Err(MigrateError::InvalidRequest(format!("shard {shard} has no database {db}"))),
    }
}

pub(super) fn parse_cells(map: &ShardMap, cells: &[String]) -> Result<Vec<CellIndex>, MigrateError> {
    let mut out: Vec<CellIndex> = Vec::new();
    for c in cells {
        let cell = geo::parse_cell(c).map_err(|e| MigrateError::InvalidRequest(format!("cells: {e}")))?;
        if cell.resolution() > map.resolution() {
            return Err(MigrateError::InvalidRequest(format!(
                "cell {cell} is finer than the map resolution {}",
                u8::from(map.resolution())
            )));
        }
        out.push(cell);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(MigrateError::InvalidRequest("cells must not be empty".into()));
    }
    for a in &out {
        for b in &out {
            if a != b && b.resolution() > a.resolution() && b.parent(a.resolution()) == Some(*a) {
                return Err(MigrateError::InvalidRequest(format!("cells overlap: {b} lies inside {a}")));
            }
        }
    }
    Ok(out)
}

/// The single owner of every moving cell today, or why there is none.
fn source_of(map: &ShardMap, cells: &[CellIndex]) -> Result<String, MigrateError> {
    let mut owners = Vec::new();
    for c in cells {
        if c.resolution() == map.resolution() {
            match routing::locate(map, *c) {
                Ok(routing::Route { shard: Some(s), .. }) => owners.push(s),
                _ => return Err(MigrateError::InvalidRequest(format!("cell {c} has no owner today"))),
            }
        } else {
            routing::owners_under(map, *c, &mut owners);
        }
    }
    owners.sort_unstable();
    owners.dedup();
    match owners.as_slice() {
        [one] => Ok(map.shard(*one).id.to_string()),
        [] => Err(MigrateError::InvalidRequest("the cells have no owner today".into())),
        many => Err(MigrateError::InvalidRequest(format!(
            "the cells are owned by several shards today ({}); migrate them per source",
            many.iter().map(|s| map.shard(*s).id.to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Map v+1: the moving cells assigned to `to` (assignments at or inside them removed), version + 1.
/// Built from the source text, so `${VAR}` references stay references.
pub fn next_map_text(text: &str, cells: &[CellIndex], to: &str) -> Result<(String, u64), String> {
    let mut raw: crate::shardmap::raw::RawMap = toml::from_str(text).map_err(|e| e.to_string())?;
    let inside = |hex: &str| -> bool {
        geo::parse_cell(hex)
            .map(|c| cells.iter().any(|m| c.resolution() >= m.resolution() && c.parent(m.resolution()) == Some(*m)))
            .unwrap_or(false)
    };
    for a in &mut raw.assign {
        a.cells.retain(|c| !inside(c.get_ref()));
    }
    raw.assign.retain(|a| !a.cells.is_empty());
    raw.assign.push(crate::shardmap::raw::RawAssign {
        shard: toml::Spanned::new(0..0, to.to_string()),
        cells: cells.iter().map(|c| toml::Spanned::new(0..0, c.to_string())).collect(),
    });
    let version = raw.version.get_ref() + 1;
    raw.version = toml::Spanned::new(0..0, version);
    let body = toml::to_string(&raw).map_err(|e| e.to_string())?;
    Ok((format!("# written by cellgate live migration (version {version})\n{body}"), version))
}

/// Validate a start request against the map; the new migration's record and its databases.
/// (table, cell_column) of the SQL tables of `db` that move with their cells.
fn cell_columns(map: &ShardMap, db: &str) -> Vec<(String, String)> {
    map.tables()
        .get(db)
        .map(|ts| ts.iter().filter_map(|(t, s)| s.cell_column.clone().map(|c| (t.clone(), c))).collect())
        .unwrap_or_default()
}

/// (collection, geo_field) of the MongoDB collections of `db` that move with their cells.
fn geo_fields(map: &ShardMap, db: &str) -> Vec<(String, String)> {
    map.tables()
        .get(db)
        .map(|ts| ts.iter().filter_map(|(t, s)| s.geo_field.clone().map(|g| (t.clone(), g))).collect())
        .unwrap_or_default()
}

pub(super) fn plan(map: &ShardMap, cells: &[String], to: &str, hold_ms: u64) -> Result<(Doc, Pairs), MigrateError> {
    let cells = parse_cells(map, cells)?;
    if map.shard_idx(to).is_none() {
        return Err(MigrateError::InvalidRequest(format!("unknown target shard {to:?}")));
    }
    let from = source_of(map, &cells)?;
    if from == to {
        return Err(MigrateError::InvalidRequest(format!("the cells are already owned by {from}")));
    }
    let src = map.shard(map.shard_idx(&from).ok_or(MigrateError::NotFound)?);
    let dst = map.shard(map.shard_idx(to).ok_or(MigrateError::NotFound)?);
    let mut pairs = Pairs::default();
    for (db, spec) in &src.databases {
        let kind = spec.kind();
        if !matches!(kind, DbKind::Postgres | DbKind::Mongodb) {
            return Err(MigrateError::Unsupported(format!(
                "database {db:?} on shard {from} is {}: migrations move PostgreSQL and MongoDB databases only",
                kind.as_str()
            )));
        }
        match dst.databases.get(db) {
            Some(d) if d.kind() == kind => {}
            Some(d) => {
                return Err(MigrateError::Unsupported(format!(
                    "database {db:?} is {} on shard {from} but {} on shard {to}",
                    kind.as_str(),
                    d.kind().as_str()
                )));
            }
            None => return Err(MigrateError::InvalidRequest(format!("target shard {to} has no database {db:?}"))),
        }
        if kind == DbKind::Mongodb {
            let collections = geo_fields(map, db);
            if !collections.is_empty() {
                pairs.docs.push(DocPair { db: db.clone(), collections, source: from.clone(), target: to.to_string() });
            }
            continue;
        }
        let tables = cell_columns(map, db);
        if tables.is_empty() {
            continue;
        }
        pairs.sql.push(DbPair {
            db: db.clone(),
            tables,
            source: admin_config(map, &from, db)?,
            target: admin_config(map, to, db)?,
        });
    }
    if pairs.is_empty() {
        return Err(MigrateError::InvalidRequest(
            "no [tables] with a cell_column or geo_field on the source: nothing to move".into(),
        ));
    }
    let id = format!(
        "m{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
    );
    let doc = Doc {
        id,
        state: State::Planned,
        cells: cells.iter().map(ToString::to_string).collect(),
        from,
        to: to.to_string(),
        tables: pairs
            .sql
            .iter()
            .flat_map(|p| p.tables.iter().map(move |(t, _)| format!("{}.{t}", p.db)))
            .chain(pairs.docs.iter().flat_map(|p| p.collections.iter().map(move |(c, _)| format!("{}.{c}", p.db))))
            .collect(),
        rows_copied: 0,
        lag_bytes: None,
        hold_ms: hold_ms.clamp(1, 60_000),
        hold_ms_max: None,
        map_version_before: map.version().0,
        map_version_after: None,
        error: None,
        fenced: false,
        peer_problems: Vec::new(),
        cleanup_pending: false,
        running: false,
    };
    Ok((doc, pairs))
}

/// The database pairs of a recorded migration, from today's map (resume, abort after a crash).
pub(super) fn pairs_for(map: &ShardMap, doc: &Doc) -> Result<Pairs, MigrateError> {
    let mut by_db: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for dt in &doc.tables {
        let (db, t) = dt.split_once('.').ok_or_else(|| MigrateError::InvalidRequest(format!("bad table name {dt}")))?;
        by_db.entry(db.to_string()).or_default().push(t.to_string());
    }
    let src = map.shard(
        map.shard_idx(&doc.from).ok_or_else(|| MigrateError::InvalidRequest(format!("unknown shard {}", doc.from)))?,
    );
    let mut pairs = Pairs::default();
    for (db, names) in by_db {
        let gone = |t: &str| MigrateError::InvalidRequest(format!("table {db}.{t} is no longer in the map"));
        let spec = |t: &str| map.tables().get(&db).and_then(|ts| ts.get(t)).cloned();
        if src.databases.get(&db).map(|d| d.kind()) == Some(DbKind::Mongodb) {
            let collections = names
                .iter()
                .map(|t| spec(t).and_then(|s| s.geo_field).map(|g| (t.clone(), g)).ok_or_else(|| gone(t)))
                .collect::<Result<_, _>>()?;
            pairs.docs.push(DocPair { db, collections, source: doc.from.clone(), target: doc.to.clone() });
        } else {
            let tables = names
                .iter()
                .map(|t| spec(t).and_then(|s| s.cell_column).map(|c| (t.clone(), c)).ok_or_else(|| gone(t)))
                .collect::<Result<_, _>>()?;
            pairs.sql.push(DbPair {
                source: admin_config(map, &doc.from, &db)?,
                target: admin_config(map, &doc.to, &db)?,
                db,
                tables,
            });
        }
    }
    Ok(pairs)
}

pub(super) fn cells_of(doc: &Doc) -> Vec<CellIndex> {
    doc.cells.iter().filter_map(|c| geo::parse_cell(c).ok()).collect()
}
