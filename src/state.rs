//! The published state: one [`Snapshot`] (map + backends + version) that requests pin from start
//! to finish. Built in one place ([`Snapshot::new`]); stored only by the reload writer. Imports
//! nothing above the backends.

use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::backend::Backends;
use crate::shardmap::ShardMap;

pub struct Snapshot {
    pub map: ShardMap,
    pub backends: Backends,
    /// SHA-256 of the map source text (hex).
    pub sha256: String,
    /// The map source text as loaded (`${VAR}` unexpanded). Migrations derive map v+1 from it.
    /// Never served: it may hold inline secrets.
    pub text: String,
    /// Where the map came from (file path).
    pub source: String,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// The one constructor: a compiled map, its backends, and the text it was compiled from.
    pub fn new(map: ShardMap, backends: Backends, text: String, source: String) -> Self {
        Self { map, backends, sha256: text_sha256(&text), text, source, loaded_at: SystemTime::now() }
    }
}

/// SHA-256 (hex) of a map's source text: how a reload recognises the map already serving.
pub fn text_sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}
