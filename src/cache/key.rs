//! Cache keys: a SHA-256 over length-prefixed parts (what the read asks, where, and the version of
//! every cell and shard it reads), the statement normalisation, and the set of cells at the map
//! resolution a region reads. Pure: no I/O, no knowledge of SQL or documents beyond bytes.

use std::fmt::Write as _;

use h3o::{CellIndex, Resolution};
use sha2::{Digest as _, Sha256};

/// Most cells at the map resolution one cached read may cover (the area cover budget of
/// `routing::AREA_COVER_BUDGET`); a larger area is not cached (its key would need the version of
/// every cell).
pub const MAX_CELLS: u64 = 4096;

/// An entry's key: SHA-256 of its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

/// Builds a [`Digest`]. Every part is length-prefixed, so no two different part lists hash the
/// same bytes (`"ab","c"` ≠ `"a","bc"`).
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    /// `kind` separates the key spaces of different reads (SQL, find, count, ...); the leading
    /// format tag changes when the key layout does.
    pub fn new(kind: &str) -> Self {
        let mut b = KeyBuilder(Sha256::new());
        b.str("cellgate-cache-key-1").str(kind);
        b
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.update((v.len() as u64).to_le_bytes());
        self.0.update(v);
        self
    }

    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.update(v.to_le_bytes());
        self
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// A statement as the key sees it: surrounding whitespace and trailing semicolons removed.
/// Everything else counts byte for byte (collapsing inner whitespace would need a lexer that
/// knows string literals, dollar quotes and comments; applications send the same text anyway).
pub fn normalize_statement(sql: &str) -> &str {
    sql.trim().trim_end_matches(|c: char| c == ';' || c.is_whitespace())
}

/// The cells at resolution `r` that `cover` (cells at any resolution) reads, sorted and without
/// duplicates: a finer cell counts as its parent at `r`, a coarser one as all its children.
/// `None` when that is more than [`MAX_CELLS`].
pub fn cells_at(r: Resolution, cover: &[CellIndex]) -> Option<Vec<CellIndex>> {
    let mut total = 0u64;
    for c in cover {
        total += if c.resolution() >= r { 1 } else { c.children_count(r) };
        if total > MAX_CELLS {
            return None;
        }
    }
    let mut out = Vec::with_capacity(total as usize);
    for c in cover {
        if c.resolution() >= r {
            out.extend(c.parent(r));
        } else {
            out.extend(c.children(r));
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed() {
        let mut a = KeyBuilder::new("sql");
        a.str("ab").str("c");
        let mut b = KeyBuilder::new("sql");
        b.str("a").str("bc");
        assert_ne!(a.finish(), b.finish());
        let mut c = KeyBuilder::new("sql");
        c.str("ab").str("c");
        let mut d = KeyBuilder::new("sql");
        d.str("ab").str("c");
        let (c, d) = (c.finish(), d.finish());
        assert_eq!(c, d);
        assert_eq!(c.hex().len(), 64);
        assert_ne!(KeyBuilder::new("sql").finish(), KeyBuilder::new("find").finish());
    }

    #[test]
    fn statements_normalise_only_at_the_ends() {
        assert_eq!(normalize_statement("  SELECT 1 ;\n; "), "SELECT 1");
        assert_eq!(normalize_statement("SELECT ' a ;'"), "SELECT ' a ;'");
        assert_ne!(normalize_statement("SELECT  1"), normalize_statement("SELECT 1"));
    }

    #[test]
    fn cells_at_the_map_resolution() {
        let p = h3o::LatLng::new(40.4168, -3.7038).unwrap();
        let r5 = p.to_cell(Resolution::Five);
        // By index, not by point: H3 does not nest geometrically (a point's cell at 7 need not
        // lie in its cell at 5).
        let r7 = r5.center_child(Resolution::Seven).unwrap();
        let r4 = r5.parent(Resolution::Four).unwrap();
        assert_eq!(cells_at(Resolution::Five, &[r7, r5]).unwrap(), vec![r5]);
        let kids = cells_at(Resolution::Five, &[r4]).unwrap();
        assert_eq!(kids.len(), 7);
        assert!(kids.contains(&r5));
        // Resolution 0 at 5 is 7^5 cells (about 16,807): over the budget.
        assert!(cells_at(Resolution::Five, &[p.to_cell(Resolution::Zero)]).is_none());
    }
}
