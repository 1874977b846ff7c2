//! The fallback hash ring: consistent_hash's `StaticHashRing` behind a hash we specify byte by byte,
//! so placement is identical on every instance, build and toolchain. Must not depend on std `Hash` output.

use std::hash::{Hash, Hasher};

use consistent_hash::{Node, RingHash, StaticHashRing};
use siphasher::sip::SipHasher13;

use crate::ids::ShardIdx;

/// Fixed SipHash-1-3 keys. Changing them moves every fallback cell: treat as a format constant.
const KEY0: u64 = 0x6365_6c6c_6761_7465; // "cellgate"
const KEY1: u64 = 0x7269_6e67_2d76_3031; // "ring-v01"

/// Ring key: the shard id's UTF-8 bytes. Its `Hash` writes exactly those bytes and a 0xff
/// terminator through `Hasher::write`, which [`StableHasher`] feeds to SipHash verbatim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RingKey {
    name: String,
    idx: ShardIdx,
}

impl Hash for RingKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.name.as_bytes());
        state.write(&[0xff]);
    }
}

/// Ring item: an H3 cell index hashed as 8 little-endian bytes.
struct RingItem(u64);

impl Hash for RingItem {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0.to_le_bytes());
    }
}

/// Forwards only explicit bytes. Integer writes from foreign `Hash` impls are
/// re-encoded little-endian so even those cannot depend on the platform.
struct StableHasher(SipHasher13);

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        self.0.finish()
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }
    fn write_u64(&mut self, v: u64) {
        self.0.write(&v.to_le_bytes());
    }
    fn write_usize(&mut self, v: usize) {
        self.0.write(&(v as u64).to_le_bytes());
    }
}

#[derive(Debug, Clone, Copy)]
struct StableHash;

impl RingHash for StableHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut h = StableHasher(SipHasher13::new_with_keys(KEY0, KEY1));
        item.hash(&mut h);
        h.finish()
    }

    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        let mut h = StableHasher(SipHasher13::new_with_keys(KEY0, KEY1));
        node_key.hash(&mut h);
        h.write(&(vnode_seq as u64).to_le_bytes());
        h.finish()
    }
}

/// An immutable ring over the fallback shards.
pub struct FallbackRing {
    ring: StaticHashRing<'static, RingKey, (), StableHash>,
}

impl std::fmt::Debug for FallbackRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackRing").field("vnodes", &self.ring.len()).finish()
    }
}

impl FallbackRing {
    /// `shards` must be non-empty and unique (compile checks both).
    pub fn new(shards: &[(String, ShardIdx)], vnodes: usize) -> Self {
        let nodes =
            shards.iter().map(|(name, idx)| Node::new(RingKey { name: name.clone(), idx: *idx }).quantity(vnodes));
        Self { ring: StaticHashRing::new(StableHash, nodes) }
    }

    /// The shard for a cell key (the owning cell's parent at the fallback resolution).
    pub fn lookup(&self, cell: u64) -> ShardIdx {
        self.ring
            .calc_candidates(&RingItem(cell))
            .next()
            .map(|n| n.key.idx)
            .expect("ring is never empty: compile rejects an empty hash fallback")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> FallbackRing {
        let shards: Vec<(String, ShardIdx)> =
            ["am-1", "eu-1", "as-1"].iter().enumerate().map(|(i, s)| (s.to_string(), ShardIdx(i as u32))).collect();
        FallbackRing::new(&shards, 160)
    }

    /// Pins placement. If this fails, fallback placement moved: that is a data-moving change,
    /// not a refactor. Do not update the table without a migration plan.
    #[test]
    fn golden_placement() {
        let r = ring();
        let keys: [u64; 8] = [
            0x820007fffffffff,
            0x821f87fffffffff,
            0x8229a7fffffffff,
            0x823d67fffffffff,
            0x8244f7fffffffff,
            0x825a17fffffffff,
            0x826a47fffffffff,
            0x82f2b7fffffffff,
        ];
        let got: Vec<usize> = keys.iter().map(|k| r.lookup(*k).get()).collect();
        assert_eq!(got, GOLDEN, "fallback placement changed");
    }

    const GOLDEN: [usize; 8] = [2, 0, 2, 2, 0, 0, 0, 0];

    #[test]
    fn spreads_and_is_order_independent() {
        let r = ring();
        let mut counts = [0usize; 3];
        for i in 0..30_000u64 {
            counts[r.lookup(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).get()] += 1;
        }
        for c in counts {
            assert!(c > 6_000, "unbalanced ring: {counts:?}");
        }
        let mut shuffled: Vec<(String, ShardIdx)> = ["as-1", "am-1", "eu-1"]
            .iter()
            .map(|s| (s.to_string(), ShardIdx(["am-1", "eu-1", "as-1"].iter().position(|x| x == s).unwrap() as u32)))
            .collect();
        shuffled.reverse();
        let r2 = FallbackRing::new(&shuffled, 160);
        for i in 0..1000u64 {
            assert_eq!(r.lookup(i * 7919), r2.lookup(i * 7919));
        }
    }
}
