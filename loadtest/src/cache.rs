//! What cellgate's read cache answered, as the load test sees it: the `Cache-Status` response
//! header (RFC 9211, cache name `cellgate`; docs/cache.md, *HTTP*) of every successful read
//! that asked to be cached (`"cache": {"ttl_ms": …}` in its body), counted for the summary.

use std::sync::atomic::{AtomicU64, Ordering};

/// The cache's answer to one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `cellgate; hit; …`: from L1, from Redis (`detail=l2`), or served stale while it is
    /// refreshed (negative `ttl`).
    Hit { l2: bool, stale: bool },
    /// `cellgate; fwd=miss; …` or `fwd=request` (`no-cache`): read from the backend;
    /// `collapsed` when another request's read of the same key answered (single flight).
    Miss { collapsed: bool },
    /// `cellgate; fwd=bypass; detail=…`: the cache was not used (Redis down, disabled, …).
    Bypass,
    /// No `cellgate` member in `Cache-Status`, or no header at all: the server has no cache.
    NoHeader,
}

/// The `cellgate` member of a `Cache-Status` value (a list: one member per cache, each
/// `name; param; param=value`).
pub fn classify(header: Option<&str>) -> Outcome {
    let Some(member) = header.into_iter().flat_map(|h| h.split(',')).find(|m| {
        let name = m.split(';').next().unwrap_or_default().trim();
        name == "cellgate" || name == "\"cellgate\""
    }) else {
        return Outcome::NoHeader;
    };
    let (mut hit, mut fwd, mut l2, mut stale, mut collapsed) = (false, None, false, false, false);
    for param in member.split(';').skip(1).map(str::trim) {
        let (key, value) = param.split_once('=').map_or((param, ""), |(k, v)| (k.trim(), v.trim()));
        match key {
            "hit" => hit = true,
            "fwd" => fwd = Some(value.to_string()),
            "collapsed" => collapsed = true,
            "detail" => l2 |= value == "l2",
            "ttl" => stale = value.starts_with('-'),
            _ => {}
        }
    }
    match fwd.as_deref() {
        _ if hit => Outcome::Hit { l2, stale },
        Some("bypass") => Outcome::Bypass,
        Some(_) => Outcome::Miss { collapsed },
        None => Outcome::NoHeader,
    }
}

/// Counters shared by every user of the run.
#[derive(Debug, Default)]
pub struct Counts {
    reads: AtomicU64,
    hits: AtomicU64,
    l2_hits: AtomicU64,
    stale_hits: AtomicU64,
    misses: AtomicU64,
    collapsed: AtomicU64,
    bypassed: AtomicU64,
    no_header: AtomicU64,
}

pub static COUNTS: Counts = Counts {
    reads: AtomicU64::new(0),
    hits: AtomicU64::new(0),
    l2_hits: AtomicU64::new(0),
    stale_hits: AtomicU64::new(0),
    misses: AtomicU64::new(0),
    collapsed: AtomicU64::new(0),
    bypassed: AtomicU64::new(0),
    no_header: AtomicU64::new(0),
};

impl Counts {
    /// Count one successful cached-eligible read by its `Cache-Status`.
    pub fn record(&self, header: Option<&str>) {
        let add = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        add(&self.reads);
        match classify(header) {
            Outcome::Hit { l2, stale } => {
                add(&self.hits);
                if l2 {
                    add(&self.l2_hits);
                }
                if stale {
                    add(&self.stale_hits);
                }
            }
            Outcome::Miss { collapsed } => {
                add(&self.misses);
                if collapsed {
                    add(&self.collapsed);
                }
            }
            Outcome::Bypass => add(&self.bypassed),
            Outcome::NoHeader => add(&self.no_header),
        }
    }

    pub fn snapshot(&self) -> CacheSummary {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheSummary {
            reads: n(&self.reads),
            hits: n(&self.hits),
            l2_hits: n(&self.l2_hits),
            stale_hits: n(&self.stale_hits),
            misses: n(&self.misses),
            collapsed: n(&self.collapsed),
            bypassed: n(&self.bypassed),
            no_header: n(&self.no_header),
        }
    }
}

/// The counts at the end of the run. `hits + misses + bypassed + no_header = reads`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSummary {
    /// Successful reads that asked to be cached.
    pub reads: u64,
    pub hits: u64,
    /// Of the hits: from Redis (L2), served stale.
    pub l2_hits: u64,
    pub stale_hits: u64,
    pub misses: u64,
    /// Of the misses: answered by another request's backend read.
    pub collapsed: u64,
    pub bypassed: u64,
    pub no_header: u64,
}

impl CacheSummary {
    /// Hits over every cached-eligible read (misses, bypassed and header-less ones count
    /// against it); `None` when no read got a `Cache-Status` (the server has no cache).
    pub fn hit_ratio(&self) -> Option<f64> {
        (self.reads > self.no_header).then(|| self.hits as f64 / self.reads as f64)
    }

    /// `41.3%`, or `n/a` without a cache.
    pub fn ratio_text(&self) -> String {
        self.hit_ratio().map_or_else(|| "n/a".into(), |r| format!("{:.1}%", r * 100.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cache_status_of_docs_caching_md() {
        let c = |h: &str| classify(Some(h));
        assert_eq!(c("cellgate; hit; ttl=12"), Outcome::Hit { l2: false, stale: false });
        assert_eq!(c("cellgate; hit; ttl=12; detail=l2"), Outcome::Hit { l2: true, stale: false });
        assert_eq!(c("cellgate; hit; ttl=-3"), Outcome::Hit { l2: false, stale: true });
        assert_eq!(c("cellgate; fwd=miss; stored; ttl=30"), Outcome::Miss { collapsed: false });
        assert_eq!(c("cellgate; fwd=miss; collapsed"), Outcome::Miss { collapsed: true });
        assert_eq!(c("cellgate; fwd=miss"), Outcome::Miss { collapsed: false });
        assert_eq!(c("cellgate; fwd=request; stored; ttl=30"), Outcome::Miss { collapsed: false });
        assert_eq!(c("cellgate; fwd=bypass; detail=redis-down"), Outcome::Bypass);
        assert_eq!(c("cellgate; fwd=bypass; detail=disabled"), Outcome::Bypass);
        // Another cache's member first (closest to the origin), then ours; spacing is free.
        assert_eq!(c("origin-cache; fwd=uri-miss, cellgate;hit;ttl=5"), Outcome::Hit { l2: false, stale: false });
        assert_eq!(c("edge; hit"), Outcome::NoHeader);
        assert_eq!(classify(None), Outcome::NoHeader);
    }

    #[test]
    fn counts_and_ratio() {
        let counts = Counts::default();
        for h in ["cellgate; hit; ttl=29", "cellgate; hit; ttl=2; detail=l2", "cellgate; fwd=miss; stored; ttl=30"] {
            counts.record(Some(h));
        }
        counts.record(Some("cellgate; fwd=bypass; detail=redis-down"));
        let s = counts.snapshot();
        assert_eq!((s.reads, s.hits, s.l2_hits, s.misses, s.bypassed, s.no_header), (4, 2, 1, 1, 1, 0));
        assert_eq!(s.ratio_text(), "50.0%");

        let off = Counts::default();
        off.record(None);
        assert_eq!(off.snapshot().hit_ratio(), None);
        assert_eq!(off.snapshot().ratio_text(), "n/a");
        assert_eq!(CacheSummary::default().ratio_text(), "n/a");
    }
}
