//! L1: this process's entries in a moka cache bounded by the bytes they hold (a weigher), each
//! expiring when its stale window ends. Knows entries and keys only; whether an entry may be
//! served (the Redis link, versions) is decided before anything is looked up here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;

use super::codec::Entry;
use super::key::Digest;
use crate::telemetry::names;

pub struct L1 {
    cache: moka::sync::Cache<Digest, Arc<Entry>>,
    max_bytes: u64,
    evicted: Arc<AtomicU64>,
}

/// Entries leave L1 when their stale window ends (they could never be served after it).
struct StaleUntil;

impl moka::Expiry<Digest, Arc<Entry>> for StaleUntil {
    fn expire_after_create(&self, _: &Digest, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(Duration::from_millis(e.stale_until_ms().saturating_sub(super::now_ms())))
    }
}

impl L1 {
    pub fn new(max_bytes: u64) -> Self {
        let evicted = Arc::new(AtomicU64::new(0));
        let ev = evicted.clone();
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Digest, e: &Arc<Entry>| u32::try_from(e.weight()).unwrap_or(u32::MAX))
            .expire_after(StaleUntil)
            .eviction_listener(move |_, _, cause| {
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    // Replaced by a newer fill, or cleared (a lost Redis link): not evictions.
                    RemovalCause::Replaced | RemovalCause::Explicit => return,
                };
                if cause == "size" {
                    ev.fetch_add(1, Ordering::Relaxed);
                }
                metrics::counter!(names::CACHE_EVICTIONS, "level" => "l1", "cause" => cause).increment(1);
            })
            .build();
        L1 { cache, max_bytes, evicted }
    }

    pub fn get(&self, k: &Digest) -> Option<Arc<Entry>> {
        self.cache.get(k)
    }

    /// Store `e` unless it alone is larger than the whole level.
    pub fn insert(&self, k: Digest, e: Arc<Entry>) -> bool {
        if e.weight() > self.max_bytes {
            return false;
        }
        self.cache.insert(k, e);
        metrics::gauge!(names::CACHE_BYTES, "level" => "l1").set(self.cache.weighted_size() as f64);
        true
    }

    /// Drop every entry (a Redis link came back: nothing learned before may be trusted).
    pub fn clear(&self) {
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
        metrics::gauge!(names::CACHE_BYTES, "level" => "l1").set(0.0);
    }

    /// (entries, bytes held, capacity, entries evicted for size) after moka's pending maintenance
    /// (its counts lag inserts until then).
    pub fn usage(&self) -> (u64, u64, u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size(), self.max_bytes, self.evicted.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(n: usize) -> Arc<Entry> {
        Arc::new(Entry {
            body: Bytes::from(vec![b'x'; n]),
            filled_at_ms: super::super::now_ms(),
            ttl_ms: 60_000,
            swr_ms: 0,
        })
    }

    #[test]
    fn bounded_in_bytes() {
        let l1 = L1::new(100_000);
        for i in 0..200u8 {
            let mut k = [0u8; 32];
            k[0] = i;
            assert!(l1.insert(Digest(k), entry(10_000)));
        }
        let (n, bytes, cap, evicted) = l1.usage();
        assert!(bytes <= cap, "{bytes} > {cap}");
        assert!(n <= 10 && n > 0, "{n}");
        assert!(evicted > 0);
        assert!(!l1.insert(Digest([9; 32]), entry(200_000)), "larger than the level");
    }

    #[test]
    fn expired_entries_are_gone() {
        let l1 = L1::new(1 << 20);
        let old = Arc::new(Entry { body: Bytes::from_static(b"x"), filled_at_ms: 1, ttl_ms: 10, swr_ms: 10 });
        l1.insert(Digest([1; 32]), old);
        assert!(l1.get(&Digest([1; 32])).is_none());
        l1.insert(Digest([2; 32]), entry(10));
        assert!(l1.get(&Digest([2; 32])).is_some());
        l1.clear();
        assert!(l1.get(&Digest([2; 32])).is_none());
    }
}
