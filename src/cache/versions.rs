//! Cell and shard versions: the record format (shared with the Redis scripts in `l2.rs`), the
//! one bump rule, and this instance's table of the versions it knows. Pure data and locks; no
//! I/O, and nothing here decides whether a version may be trusted (that is `l2::Link`'s).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The shard tag of a record whose cell moved (a migration cutover): no shard's write position
/// describes it until the next write, so fills go to the primary for a while (docs/cache.md).
/// Shard ids never contain `~`.
pub const MOVED: &str = "~";

/// What a version bump records besides `v + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Before a write runs: the version only.
    Pre,
    /// After a write committed on `tag` at position `pos`: same shard keeps the higher position,
    /// another shard replaces it.
    Commit,
    /// A migration cutover moved the cell (or a shard's cells): tag [`MOVED`], `pos` = the
    /// cutover's unix time in ms.
    Moved,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pre => "pre",
            Mode::Commit => "commit",
            Mode::Moved => "moved",
        }
    }
}

/// One version record: `v` counts bumps; `shard` and `pos` say which shard the last write that
/// carried a position committed on, and where (PostgreSQL WAL LSN, MongoDB operation time; 0 when
/// the backend reports none). `shard` empty = no write recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rec {
    pub v: u64,
    pub shard: String,
    pub pos: u64,
}

impl Rec {
    /// `"<v>|<shard>|<pos as 16 hex digits>"`: fixed-width hex so the Lua script compares
    /// positions as strings (Lua numbers are doubles; 64-bit positions would lose bits).
    pub fn format(&self) -> String {
        format!("{}|{}|{:016x}", self.v, self.shard, self.pos)
    }

    pub fn parse(s: &str) -> Option<Rec> {
        let mut it = s.splitn(3, '|');
        let v = it.next()?.parse().ok()?;
        let shard = it.next()?.to_string();
        let pos = it.next()?;
        if pos.len() != 16 {
            return None;
        }
        Some(Rec { v, shard, pos: u64::from_str_radix(pos, 16).ok()? })
    }

    /// The record after one bump (the Lua bump script in `l2.rs` does exactly this).
    pub fn bumped(&self, mode: Mode, tag: &str, pos: u64) -> Rec {
        let mut r = Rec { v: self.v + 1, ..self.clone() };
        match mode {
            Mode::Pre => {}
            Mode::Commit => {
                if r.shard != tag || pos > r.pos {
                    r.shard = tag.to_string();
                    r.pos = pos;
                }
            }
            Mode::Moved => {
                r.shard = MOVED.to_string();
                r.pos = pos;
            }
        }
        r
    }
}

/// The Redis key (and table key) of a version: `<prefix>:v:<db>:c:<cell hex>` for a cell at the
/// map resolution, `<prefix>:v:<db>:s:<shard id>` for a shard (shard-wide writes).
pub fn cell_key(prefix: &str, db: &str, cell: u64) -> String {
    format!("{prefix}:v:{db}:c:{cell:x}")
}

pub fn shard_key(prefix: &str, db: &str, shard: &str) -> String {
    format!("{prefix}:v:{db}:s:{shard}")
}

const SLOTS: usize = 32;

/// The versions this instance knows. Records only move forward (a higher `v` wins whole), so a
/// pub/sub message and a fetch racing for one key leave the newer record whatever their order.
/// `clear` empties the table and moves the epoch; a fetch that started in an older epoch is not
/// stored ([`Table::fill`]), so nothing learned before a clear (say, before a lost subscription)
/// survives it. Bounded: when `cap` records are held the table is cleared (and re-learned).
pub struct Table {
    slots: Vec<RwLock<HashMap<String, Rec>>>,
    epoch: AtomicU64,
    len: AtomicUsize,
    cap: usize,
}

impl Table {
    pub fn new(cap: usize) -> Self {
        Table {
            slots: (0..SLOTS).map(|_| RwLock::new(HashMap::new())).collect(),
            epoch: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            cap,
        }
    }

    fn slot(&self, key: &str) -> &RwLock<HashMap<String, Rec>> {
        // FNV-1a: cheap, and only spreads lock contention.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        &self.slots[(h % SLOTS as u64) as usize]
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key's record, or `None` if any is unknown here.
    pub fn get_all(&self, keys: &[String]) -> Option<Vec<Rec>> {
        keys.iter().map(|k| self.slot(k).read().expect("versions lock").get(k).cloned()).collect()
    }

    /// The record, the default (v 0) when unknown: for L1-only mode, where this table is the
    /// authority.
    pub fn get_or_default(&self, key: &str) -> Rec {
        self.slot(key).read().expect("versions lock").get(key).cloned().unwrap_or_default()
    }

    /// Keep `rec` unless a newer record is held (pub/sub messages, own bump answers).
    pub fn apply(&self, key: &str, rec: Rec) {
        self.apply_if(key, rec, None);
    }

    /// [`apply`](Self::apply), but only while the epoch is still `epoch` (a fetch that began
    /// before a clear is dropped). Returns whether it was kept or already superseded.
    pub fn fill(&self, epoch: u64, key: &str, rec: Rec) -> bool {
        self.apply_if(key, rec, Some(epoch))
    }

    fn apply_if(&self, key: &str, rec: Rec, epoch: Option<u64>) -> bool {
        if self.len() >= self.cap {
            self.clear();
            if epoch.is_some() {
                return false;
            }
        }
        let mut slot = self.slot(key).write().expect("versions lock");
        // `clear` holds every slot's lock while it moves the epoch: checked under this lock,
        // the epoch cannot move between the check and the insert.
        if epoch.is_some_and(|e| e != self.epoch()) {
            return false;
        }
        match slot.get_mut(key) {
            Some(cur) if cur.v >= rec.v => {}
            Some(cur) => *cur = rec,
            None => {
                slot.insert(key.to_string(), rec);
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    /// L1-only mode: bump in place; returns the new record.
    pub fn bump_local(&self, key: &str, mode: Mode, tag: &str, pos: u64) -> Rec {
        let mut slot = self.slot(key).write().expect("versions lock");
        let cur = slot.get(key).cloned();
        let next = cur.clone().unwrap_or_default().bumped(mode, tag, pos);
        if cur.is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        slot.insert(key.to_string(), next.clone());
        next
    }

    /// Forget everything and move the epoch.
    pub fn clear(&self) {
        let mut guards: Vec<_> = self.slots.iter().map(|s| s.write().expect("versions lock")).collect();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for g in &mut guards {
            g.clear();
        }
        self.len.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bump() {
        let r = Rec { v: 7, shard: "eu-1".into(), pos: 0x16_b374_d848 };
        assert_eq!(r.format(), "7|eu-1|00000016b374d848");
        assert_eq!(Rec::parse(&r.format()), Some(r.clone()));
        assert_eq!(Rec::parse("7|eu-1|16b374d848"), None);
        assert_eq!(Rec::parse("x|a|0000000000000000"), None);
        // Same shard keeps the higher position; another shard replaces it.
        assert_eq!(r.bumped(Mode::Commit, "eu-1", 5), Rec { v: 8, shard: "eu-1".into(), pos: 0x16_b374_d848 });
        assert_eq!(r.bumped(Mode::Commit, "eu-2", 5), Rec { v: 8, shard: "eu-2".into(), pos: 5 });
        assert_eq!(r.bumped(Mode::Pre, "x", 1), Rec { v: 8, ..r.clone() });
        assert_eq!(r.bumped(Mode::Moved, "", 99), Rec { v: 8, shard: MOVED.into(), pos: 99 });
        assert_eq!(Rec::default().bumped(Mode::Commit, "a", 3).format(), "1|a|0000000000000003");
    }

    #[test]
    fn newer_wins_and_clear_drops_old_fetches() {
        let t = Table::new(100);
        let k = cell_key("cg", "core", 0x85);
        assert_eq!(k, "cg:v:core:c:85");
        t.apply(&k, Rec { v: 3, ..Default::default() });
        t.apply(&k, Rec { v: 2, ..Default::default() });
        assert_eq!(t.get_all(std::slice::from_ref(&k)).unwrap()[0].v, 3);
        let e = t.epoch();
        t.clear();
        assert!(t.get_all(std::slice::from_ref(&k)).is_none());
        // A fetch that began before the clear is not stored.
        assert!(!t.fill(e, &k, Rec { v: 3, ..Default::default() }));
        assert!(t.get_all(std::slice::from_ref(&k)).is_none());
        assert!(t.fill(t.epoch(), &k, Rec { v: 4, ..Default::default() }));
        assert_eq!(t.bump_local(&k, Mode::Pre, "", 0).v, 5);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn full_table_starts_over() {
        let t = Table::new(2);
        for c in 0..5u64 {
            t.apply(&cell_key("p", "d", c), Rec { v: 1, ..Default::default() });
        }
        assert!(t.len() <= 2, "{}", t.len());
    }
}
