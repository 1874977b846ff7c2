//! Raw serde mirror of the shard-map TOML (design §2). Only shape, no meaning: `compile` owns validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMap {
    pub version: Spanned<u64>,
    pub resolution: Spanned<i64>,
    #[serde(default)]
    pub shards: Vec<RawShard>,
    #[serde(default)]
    pub assign: Vec<RawAssign>,
    pub fallback: Option<Spanned<RawFallback>>,
    /// database name → table name → table settings
    #[serde(default)]
    pub tables: BTreeMap<String, BTreeMap<String, Spanned<RawTable>>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShard {
    pub id: Spanned<String>,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub databases: BTreeMap<String, Spanned<RawDatabase>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub kind: Spanned<String>,
    /// SQL kinds: the primary's connection string.
    pub primary: Option<Spanned<String>>,
    /// SQL kinds: replica connection strings (may be empty).
    #[serde(default)]
    pub replicas: Vec<Spanned<String>>,
    /// MongoDB: the driver URI (replica set or mongos).
    pub uri: Option<Spanned<String>>,
    /// PostgreSQL: a privileged connection to the primary for live migration (publications,
    /// subscriptions, fence triggers). Default: `primary`.
    pub admin: Option<Spanned<String>>,
    /// MongoDB: let requests use server-side JavaScript (`$where`, `$function`, `$accumulator`).
    /// Default false; must be the same on every shard that has the database.
    pub allow_server_js: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssign {
    pub shard: Spanned<String>,
    pub cells: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub mode: Spanned<String>,
    #[serde(default)]
    pub shards: Vec<Spanned<String>>,
    pub resolution: Option<Spanned<i64>>,
    /// Virtual nodes per shard on the hash ring (default 160).
    pub vnodes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTable {
    /// BIGINT column holding the row's resolution-15 H3 cell (or a parent at resolution >= R).
    pub cell_column: Option<String>,
    /// MongoDB: the GeoJSON Point field a document's region is taken from on insert.
    pub geo_field: Option<String>,
    /// Read cache policy for reads of this table / collection that do not say themselves
    /// (docs/cache.md, *Per-table policies*).
    pub cache: Option<RawCachePolicy>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCachePolicy {
    pub ttl_ms: i64,
    #[serde(default)]
    pub swr_ms: i64,
}
