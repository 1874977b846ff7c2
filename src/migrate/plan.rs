//! Step 1 of a migration, pure over the map: validate the request (cells, owners, target,
//! database kinds), name the databases and tables to move and the privileged connections to
//! use, and build map v+1. No I/O.

use std::collections::BTreeMap;
use std::str::FromStr;

use h3o::CellIndex;

use super::MigrateError;
use super::doc::{Doc, State};
use crate::geo;
use crate::routing;
use crate::shardmap::{DatabaseSpec, DbKind, ShardMap};

/// One side of a database pair: the shard and its privileged connection.
#[derive(Clone)]
pub(super) struct Endpoint {
    pub shard: String,
    pub config: tokio_postgres::Config,
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

/// Passwords of every connection of the pairs: masked out of persisted and reported errors.
pub(super) fn secrets(pairs: &[DbPair]) -> Vec<String> {
    pairs
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
            let config = tokio_postgres::Config::from_str(s.expose())
                .map_err(|e| MigrateError::InvalidRequest(format!("shard {shard} database {db}: {e}")))?;
            Ok(Endpoint { shard: shard.to_string(), config })
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
pub(super) fn plan(
    map: &ShardMap,
    cells: &[String],
    to: &str,
    hold_ms: u64,
) -> Result<(Doc, Vec<DbPair>), MigrateError> {
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
    let mut pairs = Vec::new();
    for (db, spec) in &src.databases {
        if spec.kind() != DbKind::Postgres {
            return Err(MigrateError::Unsupported(format!(
                "database {db:?} on shard {from} is {}: migrations move PostgreSQL databases only",
                spec.kind().as_str()
            )));
        }
        match dst.databases.get(db) {
            Some(d) if d.kind() == DbKind::Postgres => {}
            Some(d) => {
                return Err(MigrateError::Unsupported(format!(
                    "database {db:?} on shard {to} is {}: migrations move PostgreSQL databases only",
                    d.kind().as_str()
                )));
            }
            None => return Err(MigrateError::InvalidRequest(format!("target shard {to} has no database {db:?}"))),
        }
        let tables: Vec<(String, String)> = map
            .tables()
            .get(db)
            .map(|ts| ts.iter().filter_map(|(t, s)| s.cell_column.clone().map(|c| (t.clone(), c))).collect())
            .unwrap_or_default();
        if tables.is_empty() {
            continue;
        }
        pairs.push(DbPair {
            db: db.clone(),
            tables,
            source: admin_config(map, &from, db)?,
            target: admin_config(map, to, db)?,
        });
    }
    if pairs.is_empty() {
        return Err(MigrateError::InvalidRequest(
            "no [tables] with a cell_column on the source: nothing to move".into(),
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
        tables: pairs.iter().flat_map(|p| p.tables.iter().map(move |(t, _)| format!("{}.{t}", p.db))).collect(),
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
pub(super) fn pairs_for(map: &ShardMap, doc: &Doc) -> Result<Vec<DbPair>, MigrateError> {
    let mut by_db: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for dt in &doc.tables {
        let (db, t) = dt.split_once('.').ok_or_else(|| MigrateError::InvalidRequest(format!("bad table name {dt}")))?;
        let col = map
            .tables()
            .get(db)
            .and_then(|ts| ts.get(t))
            .and_then(|s| s.cell_column.clone())
            .ok_or_else(|| MigrateError::InvalidRequest(format!("table {dt} is no longer in the map")))?;
        by_db.entry(db.to_string()).or_default().push((t.to_string(), col));
    }
    by_db
        .into_iter()
        .map(|(db, tables)| {
            Ok(DbPair {
                source: admin_config(map, &doc.from, &db)?,
                target: admin_config(map, &doc.to, &db)?,
                db,
                tables,
            })
        })
        .collect()
}

pub(super) fn cells_of(doc: &Doc) -> Vec<CellIndex> {
    doc.cells.iter().filter_map(|c| geo::parse_cell(c).ok()).collect()
}
