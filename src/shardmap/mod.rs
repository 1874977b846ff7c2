//! The validated shard map (design §2): types that can only be built by [`compile`]. Pure: no I/O
//! except reading the environment for `${VAR}` through the caller-supplied lookup.

mod compile;
pub mod diff;
pub mod raw;
pub mod ring;
pub mod secret;

use std::collections::{BTreeMap, HashMap};

use h3o::{CellIndex, Resolution};
use rustc_hash::FxBuildHasher;

pub use compile::{MapError, MapErrorKind, MapErrors, compile, compile_str, parse_and_compile};
pub use secret::Secret;

use crate::ids::{MapVersion, ShardId, ShardIdx};
use ring::FallbackRing;

/// Backend kind of a logical database. The same name has the same kind on every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DbKind {
    Postgres,
    Sqlserver,
    Mongodb,
}

impl DbKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DbKind::Postgres => "postgres",
            DbKind::Sqlserver => "sqlserver",
            DbKind::Mongodb => "mongodb",
        }
    }
}

/// Where one logical database of one shard lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DatabaseSpec {
    Postgres {
        primary: Secret,
        replicas: Vec<Secret>,
        #[serde(skip_serializing_if = "Option::is_none")]
        admin: Option<Secret>,
    },
    Sqlserver {
        primary: Secret,
        replicas: Vec<Secret>,
    },
    Mongodb {
        uri: Secret,
    },
}

impl DatabaseSpec {
    pub fn kind(&self) -> DbKind {
        match self {
            DatabaseSpec::Postgres { .. } => DbKind::Postgres,
            DatabaseSpec::Sqlserver { .. } => DbKind::Sqlserver,
            DatabaseSpec::Mongodb { .. } => DbKind::Mongodb,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Shard {
    pub id: ShardId,
    pub zone: String,
    pub databases: BTreeMap<String, DatabaseSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell_column: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub geo_field: Option<String>,
    /// How long reads of this table may be cached when they do not say (docs/cache.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CachePolicy>,
}

/// A table's read cache policy: fresh for `ttl_ms` (≥ 1), then served stale for `swr_ms` while
/// one refresh runs. Capped by `[cache] max_ttl_ms` like a request's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CachePolicy {
    pub ttl_ms: u64,
    pub swr_ms: u64,
}

/// What happens to cells no assignment covers.
#[derive(Debug)]
pub enum Fallback {
    /// Consistent hashing of the owning cell's parent at `resolution` over `shards`.
    Hash { shards: Vec<ShardIdx>, resolution: Resolution, vnodes: usize, ring: FallbackRing },
    /// No shard: requests for such cells get `no_shard_for_region`.
    Reject,
}

/// A validated shard map. Construct with [`compile`]; there is no other way.
#[derive(Debug)]
pub struct ShardMap {
    version: MapVersion,
    resolution: Resolution,
    shards: Vec<Shard>,
    by_id: HashMap<ShardId, ShardIdx>,
    /// Assigned cell (any resolution <= R) → owner. Fx hash: keys are H3 indexes, not attacker-chosen
    /// in a way that matters (the map is operator input), and lookups are the hot path.
    assign: HashMap<u64, ShardIdx, FxBuildHasher>,
    /// Bit r set ⇔ some cell at resolution r is assigned. Lets lookups skip empty levels.
    assigned_levels: u16,
    /// Per resolution, the assigned cells sorted by index: descendants of a cell at one resolution
    /// form a contiguous index range, which answers "which assignments lie under C" for areas and diff.
    sorted: [Vec<(u64, ShardIdx)>; 16],
    fallback: Fallback,
    databases: BTreeMap<String, DbKind>,
    tables: BTreeMap<String, BTreeMap<String, TableSpec>>,
    /// MongoDB databases whose map opts into server-side JavaScript (`allow_server_js`).
    server_js: std::collections::BTreeSet<String>,
}

impl ShardMap {
    pub fn version(&self) -> MapVersion {
        self.version
    }

    /// The base resolution R at which ownership is decided.
    pub fn resolution(&self) -> Resolution {
        self.resolution
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn shard(&self, idx: ShardIdx) -> &Shard {
        &self.shards[idx.get()]
    }

    pub fn shard_idx(&self, id: &str) -> Option<ShardIdx> {
        self.by_id.get(&ShardId::new(id)).copied()
    }

    pub fn fallback(&self) -> &Fallback {
        &self.fallback
    }

    /// Logical database name → kind (the same on every shard that has it).
    pub fn databases(&self) -> &BTreeMap<String, DbKind> {
        &self.databases
    }

    pub fn tables(&self) -> &BTreeMap<String, BTreeMap<String, TableSpec>> {
        &self.tables
    }

    /// Whether requests on this MongoDB database may use server-side JavaScript.
    pub fn allows_server_js(&self, db: &str) -> bool {
        self.server_js.contains(db)
    }

    pub fn assigned_count(&self) -> usize {
        self.assign.len()
    }

    /// The owner of exactly this assigned cell, if it is assigned.
    pub(crate) fn assigned(&self, cell: u64) -> Option<ShardIdx> {
        self.assign.get(&cell).copied()
    }

    pub(crate) fn has_level(&self, res: Resolution) -> bool {
        self.assigned_levels & (1 << u8::from(res)) != 0
    }

    /// Assignments at `res` whose index lies in `lo..=hi` (used with descendant ranges).
    pub(crate) fn assigned_in_range(&self, res: Resolution, lo: u64, hi: u64) -> &[(u64, ShardIdx)] {
        let v = &self.sorted[usize::from(u8::from(res))];
        let start = v.partition_point(|(c, _)| *c < lo);
        let end = v.partition_point(|(c, _)| *c <= hi);
        &v[start..end]
    }

    /// Every assignment, coarse to fine, for display and diff.
    pub fn assignments(&self) -> impl Iterator<Item = (CellIndex, ShardIdx)> + '_ {
        self.sorted.iter().flatten().map(|(c, s)| (CellIndex::try_from(*c).expect("validated at compile"), *s))
    }
}
