//! Warming's Redis side (docs/cache.md, *Warming*): counts the cached reads this instance answers
//! and flushes the counts in batches to a bounded per-database sorted set in Redis (each read's
//! description in a hash beside it), reads the hottest descriptions back, carries the migration
//! cutovers that reach this instance through the bump channel to whoever warms, and keeps the
//! last warming run for `/admin/cache`. Works on databases, digests and opaque description bytes:
//! what a description says, and running it as a read, is the data plane's (`dataplane::warm`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::broadcast;

use super::l2::{Link, LinkError, deadline};
use crate::telemetry::names;

/// Members kept per database's hot set (the lowest scores are trimmed at every flush): the most
/// `warm_keys` may ask for.
pub const HOT_KEPT: usize = 1_000;
/// Distinct reads counted between two flushes; further new reads wait for the next window (the
/// ones already counted keep counting).
const PENDING_MAX: usize = 4_096;
/// Longest description recorded, bytes: a read with a larger statement or parameters is not.
pub const DESCRIPTION_MAX: usize = 8 * 1024;
/// How often the counts go to Redis.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Members per flush script: one script blocks Redis (and every instance's bumps) while it runs.
const FLUSH_BATCH: usize = 256;
/// Members per `HMGET` when the hottest descriptions are read.
const READ_BATCH: usize = 100;
/// Scores are halved this often (the first flush after the period does it), so the set follows
/// what is hot now rather than what was hot once.
const DECAY_EVERY_MS: u64 = 10 * 60 * 1000;
/// A hot set nobody writes to any more disappears after this long.
const KEYS_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Migration cutovers queued for the warming task; more while it is busy are dropped (logged).
const MOVES_QUEUED: usize = 16;

/// Count reads into KEYS[1] (sorted set), their descriptions into KEYS[2] (hash); KEYS[3] holds
/// when scores were last halved. ARGV: kept, now (ms), decay period (ms), keys' TTL (ms), then
/// (member, count, description) triples. Trims the set to `kept` and the hash with it.
const FLUSH: &str = r"
local kept, now, every, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
if now - last >= every then
  if last > 0 then redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', 0.5) end
  redis.call('SET', KEYS[3], now, 'PX', ttl)
end
for i = 5, #ARGV, 3 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
end
local n = redis.call('ZCARD', KEYS[1])
if n > kept then
  local gone = redis.call('ZRANGE', KEYS[1], 0, n - kept - 1)
  for i = 1, #gone, 500 do
    redis.call('HDEL', KEYS[2], unpack(gone, i, math.min(i + 499, #gone)))
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - kept - 1)
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return math.min(n, kept)
";

/// A read counted since the last flush.
struct Pending {
    hits: u64,
    description: Arc<[u8]>,
}

/// A recorded read, as read back: its database, member (digest), score and description.
#[derive(Debug, Clone)]
pub struct HotRead {
    pub db: String,
    pub member: String,
    pub score: f64,
    pub description: Vec<u8>,
}

/// Version keys a migration cutover bumped (cells at the map resolution, or whole shards), as they
/// came through the channel.
pub type Moved = Arc<Vec<String>>;

/// Why a warming run ran (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Start,
    Migration,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Migration => "migration",
        }
    }
}

/// What a warming run did, for `/admin/cache`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Unix ms when it started.
    pub at_ms: u64,
    pub reason: &'static str,
    /// Recorded reads it was to run (the hottest `warm_keys`; after a migration, those of them
    /// that read a moved cell).
    pub asked: u64,
    /// Read from the backend and stored.
    pub filled: u64,
    /// Found in Redis and copied into L1.
    pub from_l2: u64,
    /// Already in L1 (or answered by a client's fill of the same key under way).
    pub cached: u64,
    /// Answered but not stored (too large, the cache not serving, no longer opted in).
    pub not_stored: u64,
    /// Failed (counted, not retried).
    pub failed: u64,
    /// Refused before running: the statement no longer passes the read check, the database is
    /// gone, or the description cannot be read.
    pub skipped: u64,
    /// Not finished within the time budget (not started, or abandoned at the deadline).
    pub cut: u64,
    pub ms: u64,
    /// Why the run could not read the hot set at all.
    pub error: Option<String>,
}

#[derive(Default)]
struct Counters {
    noted: AtomicU64,
    dropped: AtomicU64,
    flushed: AtomicU64,
    lost: AtomicU64,
    runs: AtomicU64,
}

pub struct Hot {
    prefix: String,
    /// Count answered reads at all (`[cache] warm_record`, with Redis).
    record: bool,
    pending: Mutex<HashMap<String, HashMap<[u8; 16], Pending>>>,
    pending_len: AtomicU64,
    moves: broadcast::Sender<Moved>,
    last: Mutex<Option<Report>>,
    counters: Counters,
}

/// A description's member in the hot set: the first 16 bytes of its SHA-256, in hex.
pub fn member_of(description: &[u8]) -> [u8; 16] {
    let d: [u8; 32] = Sha256::digest(description).into();
    let mut m = [0u8; 16];
    m.copy_from_slice(&d[..16]);
    m
}

fn hex(m: &[u8; 16]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect()
}

impl Hot {
    pub fn new(prefix: &str, record: bool) -> Self {
        Hot {
            prefix: prefix.to_string(),
            record,
            pending: Mutex::new(HashMap::new()),
            pending_len: AtomicU64::new(0),
            moves: broadcast::channel(MOVES_QUEUED).0,
            last: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    pub fn records(&self) -> bool {
        self.record
    }

    pub fn set_key(&self, db: &str) -> String {
        format!("{}:warm:{db}", self.prefix)
    }

    pub fn descriptions_key(&self, db: &str) -> String {
        format!("{}:warm:{db}:d", self.prefix)
    }

    fn decay_key(&self, db: &str) -> String {
        format!("{}:warm:{db}:decay", self.prefix)
    }

    /// Count one answered read (no Redis call: the counts go out with the next flush).
    /// `describe` runs only for a read not yet counted in this window.
    pub fn note(&self, db: &str, member: [u8; 16], describe: impl FnOnce() -> Vec<u8>) {
        if !self.record {
            return;
        }
        self.counters.noted.fetch_add(1, Ordering::Relaxed);
        let mut p = self.pending.lock().expect("warm pending lock");
        if let Some(e) = p.get_mut(db).and_then(|m| m.get_mut(&member)) {
            e.hits += 1;
            return;
        }
        if self.pending_len.load(Ordering::Relaxed) as usize >= PENDING_MAX {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(names::CACHE_WARM_RECORDED, "result" => "dropped").increment(1);
            return;
        }
        let description = describe();
        if description.len() > DESCRIPTION_MAX {
            return;
        }
        self.pending_len.fetch_add(1, Ordering::Relaxed);
        p.entry(db.to_string()).or_default().insert(member, Pending { hits: 1, description: description.into() });
    }

    /// Send what was counted since the last flush, in batches of [`FLUSH_BATCH`] (one script
    /// each, under the Redis deadline). A batch that fails is lost: hotness is advisory, and a
    /// retry would only delay the next window's counts.
    pub async fn flush(&self, link: &Link) {
        let taken = {
            let mut p = self.pending.lock().expect("warm pending lock");
            self.pending_len.store(0, Ordering::Relaxed);
            std::mem::take(&mut *p)
        };
        let now = super::now_ms();
        for (db, reads) in taken {
            let reads: Vec<([u8; 16], Pending)> = reads.into_iter().collect();
            for batch in reads.chunks(FLUSH_BATCH) {
                let hits: u64 = batch.iter().map(|(_, p)| p.hits).sum();
                match self.flush_batch(link, &db, batch, now).await {
                    Ok(()) => {
                        self.counters.flushed.fetch_add(hits, Ordering::Relaxed);
                        metrics::counter!(names::CACHE_WARM_RECORDED, "result" => "flushed").increment(hits);
                    }
                    Err(e) => {
                        link.error(&e);
                        self.counters.lost.fetch_add(hits, Ordering::Relaxed);
                        metrics::counter!(names::CACHE_WARM_RECORDED, "result" => "lost").increment(hits);
                        tracing::debug!(error = %e, db, "cache: hot reads not recorded");
                    }
                }
            }
        }
    }

    async fn flush_batch(
        &self,
        link: &Link,
        db: &str,
        batch: &[([u8; 16], Pending)],
        now: u64,
    ) -> Result<(), LinkError> {
        let mut c = link.connection()?;
        let script = redis::Script::new(FLUSH);
        let mut inv = script.prepare_invoke();
        inv.key(self.set_key(db)).key(self.descriptions_key(db)).key(self.decay_key(db));
        inv.arg(HOT_KEPT).arg(now).arg(DECAY_EVERY_MS).arg(KEYS_TTL_MS);
        for (m, p) in batch {
            inv.arg(hex(m)).arg(p.hits).arg(&*p.description);
        }
        deadline(link.timeout(), "warm_record", inv.invoke_async::<u64>(&mut c)).await.map(|_| ())
    }

    /// The flusher: every [`FLUSH_EVERY`], send the counts (nothing when none were taken).
    pub async fn flush_loop(self: Arc<Self>, link: Arc<Link>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.pending_len.load(Ordering::Relaxed) > 0 {
                self.flush(&link).await;
            }
        }
    }

    /// The `n` hottest recorded reads over `dbs`, hottest first, with their descriptions (a
    /// member whose description is gone is left out). Every call under the Redis deadline.
    pub async fn hottest(&self, link: &Link, dbs: &[String], n: usize) -> Result<Vec<HotRead>, LinkError> {
        let n = n.min(HOT_KEPT);
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut c = link.connection()?;
        let mut all: Vec<(String, String, f64)> = Vec::new();
        for db in dbs {
            let key = self.set_key(db);
            let top: Vec<(String, f64)> = deadline(link.timeout(), "warm_read", async {
                redis::cmd("ZREVRANGE").arg(key).arg(0).arg(n - 1).arg("WITHSCORES").query_async(&mut c).await
            })
            .await
            .inspect_err(|e| link.error(e))?;
            all.extend(top.into_iter().map(|(m, s)| (db.clone(), m, s)));
        }
        // Hottest first across databases; ties by database and member, so a run is repeatable.
        all.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
        all.truncate(n);
        let mut out = Vec::with_capacity(all.len());
        let mut by_db: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, (db, _, _)) in all.iter().enumerate() {
            by_db.entry(db.as_str()).or_default().push(i);
        }
        let mut descriptions: Vec<Option<Vec<u8>>> = vec![None; all.len()];
        for (db, idx) in by_db {
            let key = self.descriptions_key(db);
            for chunk in idx.chunks(READ_BATCH) {
                let members: Vec<&str> = chunk.iter().map(|i| all[*i].1.as_str()).collect();
                let got: Vec<Option<Vec<u8>>> = deadline(link.timeout(), "warm_read", async {
                    redis::cmd("HMGET").arg(&key).arg(&members).query_async(&mut c).await
                })
                .await
                .inspect_err(|e| link.error(e))?;
                for (i, d) in chunk.iter().zip(got) {
                    descriptions[*i] = d;
                }
            }
        }
        for ((db, member, score), d) in all.into_iter().zip(descriptions) {
            if let Some(description) = d {
                out.push(HotRead { db, member, score, description });
            }
        }
        Ok(out)
    }

    /// A `moved` bump came through the channel (this instance's cutover or another's).
    pub fn moved(&self, keys: Vec<String>) {
        // No receiver (warming off): nothing to tell.
        let _ = self.moves.send(Arc::new(keys));
    }

    /// Cutovers from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Moved> {
        self.moves.subscribe()
    }

    /// Record a finished run (counters, metrics, `/admin/cache`).
    pub fn finished(&self, r: Report) {
        self.counters.runs.fetch_add(1, Ordering::Relaxed);
        let reason = r.reason;
        metrics::counter!(names::CACHE_WARM_RUNS, "reason" => reason).increment(1);
        metrics::histogram!(names::CACHE_WARM_DURATION, "reason" => reason).record(r.ms as f64 / 1000.0);
        for (result, n) in [
            ("filled", r.filled),
            ("from_l2", r.from_l2),
            ("cached", r.cached),
            ("not_stored", r.not_stored),
            ("failed", r.failed),
            ("skipped", r.skipped),
            ("cut", r.cut),
        ] {
            if n > 0 {
                metrics::counter!(names::CACHE_WARM_READS, "reason" => reason, "result" => result).increment(n);
            }
        }
        *self.last.lock().expect("warm last lock") = Some(r);
    }

    /// For `/admin/cache`.
    pub fn status(&self, keys: usize, budget: Duration) -> serde_json::Value {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "keys": keys,
            "budget_ms": budget.as_millis() as u64,
            "record": self.record,
            "recorded": {
                "noted": n(&c.noted), "pending": n(&self.pending_len), "flushed": n(&c.flushed),
                "dropped": n(&c.dropped), "lost": n(&c.lost),
            },
            "runs": n(&c.runs),
            "last": *self.last.lock().expect("warm last lock"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_count_and_stay_bounded() {
        let h = Hot::new("p", true);
        let mut described = 0;
        for _ in 0..3 {
            h.note("core", [1; 16], || {
                described += 1;
                b"{}".to_vec()
            });
        }
        assert_eq!(described, 1, "a read already counted is not described again");
        assert_eq!(h.pending.lock().unwrap()["core"][&[1; 16]].hits, 3);
        for i in 0..PENDING_MAX + 10 {
            let mut m = [0u8; 16];
            m[..8].copy_from_slice(&(i as u64 + 100).to_le_bytes());
            h.note("core", m, || b"{}".to_vec());
        }
        assert_eq!(h.pending_len.load(Ordering::Relaxed) as usize, PENDING_MAX);
        assert_eq!(h.counters.dropped.load(Ordering::Relaxed), 11);
        // Counted ones keep counting when the window is full.
        h.note("core", [1; 16], Vec::new);
        assert_eq!(h.pending.lock().unwrap()["core"][&[1; 16]].hits, 4);
        // Too large: not recorded.
        h.note("other", [2; 16], || vec![b'x'; DESCRIPTION_MAX + 1]);
        assert!(!h.pending.lock().unwrap().contains_key("other"));
    }

    #[test]
    fn off_records_nothing() {
        let h = Hot::new("p", false);
        h.note("core", [1; 16], || panic!("not described when recording is off"));
        assert_eq!(h.pending_len.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_config_cap_is_the_kept_set() {
        // config.rs cannot name this constant (a floor below): it says 1000.
        assert_eq!(HOT_KEPT, 1000);
    }

    #[test]
    fn members_and_keys() {
        assert_eq!(member_of(b"a"), member_of(b"a"));
        assert_ne!(member_of(b"a"), member_of(b"b"));
        assert_eq!(hex(&[0xab; 16]).len(), 32);
        let h = Hot::new("cg", true);
        assert_eq!(h.set_key("core"), "cg:warm:core");
        assert_eq!(h.descriptions_key("core"), "cg:warm:core:d");
    }
}
