//! L2 and the invalidation link: one Redis (commands on a multiplexed connection, every call under
//! `redis_timeout_ms`), the version scripts, the pub/sub subscription that carries bumps to every
//! instance, the heartbeat through it, the bumps this instance owes Redis, and the one rule for
//! whether anything may be served: the subscription is live (a heartbeat came back recently) and
//! no bump is owed. The supervisor task (re)connects and, before serving again, sends the owed
//! bumps, forgets every version it knew and empties L1. Does not decide what is cached.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;

use super::key::Digest;
use super::l1::L1;
use super::versions::{Mode, Rec, Table};
use super::warm::Hot;
use crate::telemetry::names;

/// Bump a list of version keys, publish the new records, return them. KEYS: the version keys.
/// ARGV: channel, message header, mode, then one shard tag per key, then one position (16 hex
/// digits) per key. The same rule as `versions::Rec::bumped` (unit-tested there; the Redis tests
/// run this one).
const BUMP: &str = r"
local n = #KEYS
local mode = ARGV[3]
local lines = {ARGV[2]}
local out = {}
for i = 1, n do
  local v, s, p = 0, '', '0000000000000000'
  local cur = redis.call('GET', KEYS[i])
  if cur then
    local a, b, c = string.match(cur, '^(%d+)|([^|]*)|(%x+)$')
    if a then v = tonumber(a); s = b; p = c end
  end
  v = v + 1
  local tag, pos = ARGV[3 + i], ARGV[3 + n + i]
  if mode == 'commit' then
    if s ~= tag or pos > p then s = tag; p = pos end
  elseif mode == 'moved' then
    s = '~'; p = pos
  end
  local rec = string.format('%d|%s|%s', v, s, p)
  redis.call('SET', KEYS[i], rec)
  out[i] = rec
  lines[#lines + 1] = KEYS[i] .. ' ' .. rec
end
redis.call('PUBLISH', ARGV[1], table.concat(lines, '\n'))
return out
";

/// The serving Redis's `run_id`, the generation and the records of KEYS[2..], read atomically
/// (one script), so versions are never paired with another Redis's run id.
const READ: &str = r"
local info = redis.call('INFO', 'server')
local run = string.match(info, 'run_id:(%x+)')
local recs = {}
if #KEYS > 1 then recs = redis.call('MGET', unpack(KEYS, 2)) end
return {run, redis.call('GET', KEYS[1]) or '0', recs}
";

/// Move the generation (KEYS[1]) and publish it. ARGV: channel.
const GEN: &str = r"
local g = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], 'g ' .. g)
return g
";

/// Most bumps queued while Redis cannot be reached; past it the queue is replaced by one
/// generation bump (which makes every older entry unreachable).
const MAX_OWED: usize = 10_000;
/// Bump-to-visible delays kept for `/admin/cache`.
const DELAYS_KEPT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("redis {op}: {message}")]
    Redis { op: &'static str, message: String },
    #[error("redis {0}: no answer within the deadline")]
    Timeout(&'static str),
    #[error("not connected to redis")]
    NotConnected,
    #[error("{0}")]
    Lost(&'static str),
}

impl LinkError {
    fn op(&self) -> &'static str {
        match self {
            LinkError::Redis { op, .. } | LinkError::Timeout(op) => op,
            LinkError::NotConnected => "not_connected",
            LinkError::Lost(_) => "subscription",
        }
    }
}

/// A bump not yet in Redis.
struct Owed {
    mode: Mode,
    items: Vec<(String, String, u64)>,
}

/// What one read learned from Redis: who answered, its generation, the records (missing = v 0).
pub struct Fetched {
    pub run_id: Arc<str>,
    pub generation: u64,
    pub recs: Vec<Rec>,
}

pub struct Link {
    client: redis::Client,
    channel: String,
    gen_key: String,
    prefix: String,
    timeout: Duration,
    heartbeat: Duration,
    /// Names this instance's heartbeats on the shared channel.
    instance: String,
    table: Arc<Table>,
    l1: Arc<L1>,
    /// Told of every `moved` bump that comes through the channel (warming after a cutover).
    hot: Arc<Hot>,
    conn: ArcSwapOption<MultiplexedConnection>,
    run_id: ArcSwap<String>,
    generation: AtomicU64,
    /// Subscribed, with the versions and L1 reset for this session.
    subscribed: AtomicBool,
    owed: Mutex<VecDeque<Owed>>,
    /// `owed` is not empty, or overflowed into a generation bump.
    owing: AtomicBool,
    owe_generation: AtomicBool,
    base: Instant,
    /// When (µs after `base`) the newest of our heartbeats that came back through the channel was
    /// sent: every bump Redis published before then has been applied here.
    last_pong_us: AtomicU64,
    pub(super) stats: LinkStats,
    delays_us: Mutex<VecDeque<u64>>,
}

#[derive(Default)]
pub(super) struct LinkStats {
    pub sessions: AtomicU64,
    pub errors: AtomicU64,
    pub bumps_sent: AtomicU64,
    pub bumps_owed: AtomicU64,
    pub generation_bumps: AtomicU64,
    pub remote_bumps: AtomicU64,
    pub heartbeat_rtt_us: AtomicU64,
}

pub(super) async fn deadline<T>(
    t: Duration,
    op: &'static str,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(t, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(LinkError::Redis { op, message: e.to_string() }),
        Err(_) => Err(LinkError::Timeout(op)),
    }
}

impl Link {
    pub fn new(
        client: redis::Client,
        prefix: &str,
        timeout: Duration,
        heartbeat: Duration,
        table: Arc<Table>,
        l1: Arc<L1>,
        hot: Arc<Hot>,
    ) -> Self {
        Link {
            client,
            channel: format!("{prefix}:bumps"),
            gen_key: format!("{prefix}:generation"),
            prefix: prefix.to_string(),
            timeout,
            heartbeat,
            instance: super::instance_id(),
            table,
            l1,
            hot,
            conn: ArcSwapOption::empty(),
            run_id: ArcSwap::from_pointee(String::new()),
            generation: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            owed: Mutex::new(VecDeque::new()),
            owing: AtomicBool::new(false),
            owe_generation: AtomicBool::new(false),
            base: Instant::now(),
            last_pong_us: AtomicU64::new(0),
            stats: LinkStats::default(),
            delays_us: Mutex::new(VecDeque::new()),
        }
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn pong_age(&self) -> Duration {
        Duration::from_micros(self.now_us().saturating_sub(self.last_pong_us.load(Ordering::SeqCst)))
    }

    /// May anything be served or stored now? Only while subscribed, a heartbeat sent less than
    /// three periods ago came back through the channel (so every bump published before it was
    /// sent has been applied: the bound on a plain read's staleness), and this instance owes
    /// Redis no bump. Then `(run_id, generation)`.
    pub fn serving(&self) -> Option<(Arc<str>, u64)> {
        if !self.subscribed.load(Ordering::SeqCst)
            || self.owing.load(Ordering::SeqCst)
            || self.pong_age() > self.heartbeat * 3
        {
            return None;
        }
        Some((Arc::from(self.run_id.load().as_str()), self.generation.load(Ordering::SeqCst)))
    }

    pub(super) fn error(&self, e: &LinkError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::CACHE_REDIS_ERRORS, "op" => e.op()).increment(1);
    }

    pub(super) fn connection(&self) -> Result<MultiplexedConnection, LinkError> {
        self.conn.load_full().map(|c| (*c).clone()).ok_or(LinkError::NotConnected)
    }

    /// The deadline of every Redis call.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn entry_key(&self, k: &Digest) -> String {
        format!("{}:e:{}", self.prefix, k.hex())
    }

    /// L2 read.
    pub async fn get(&self, k: &Digest) -> Result<Option<Vec<u8>>, LinkError> {
        let mut c = self.connection()?;
        let key = self.entry_key(k);
        let r =
            deadline(self.timeout, "get", async move { redis::cmd("GET").arg(key).query_async(&mut c).await }).await;
        r.inspect_err(|e| self.error(e))
    }

    /// L2 write (expires with the entry's stale window).
    pub async fn set(&self, k: &Digest, bytes: Vec<u8>, ttl: Duration) -> Result<(), LinkError> {
        let mut c = self.connection()?;
        let key = self.entry_key(k);
        let ms = ttl.as_millis().max(1) as u64;
        let r = deadline(self.timeout, "set", async move {
            redis::cmd("SET").arg(key).arg(bytes).arg("PX").arg(ms).query_async::<()>(&mut c).await
        })
        .await;
        r.inspect_err(|e| self.error(e))
    }

    /// The run id, generation and records of `keys`, from Redis.
    pub async fn fetch(&self, keys: &[String]) -> Result<Fetched, LinkError> {
        let mut c = self.connection()?;
        let script = redis::Script::new(READ);
        let mut inv = script.prepare_invoke();
        inv.key(&self.gen_key);
        for k in keys {
            inv.key(k);
        }
        let r: Result<(String, String, Vec<Option<String>>), _> =
            deadline(self.timeout, "read_versions", inv.invoke_async(&mut c)).await;
        let (run, generation, vals) = r.inspect_err(|e| self.error(e))?;
        let recs = vals.iter().map(|v| v.as_deref().and_then(Rec::parse).unwrap_or_default()).collect();
        let generation: u64 = generation.parse().unwrap_or(0);
        self.generation.fetch_max(generation, Ordering::SeqCst);
        Ok(Fetched { run_id: Arc::from(run.as_str()), generation, recs })
    }

    /// Bump `items` (version key, shard tag, position), on the command connection whether or
    /// not the subscription is live (a late heartbeat stops this instance's serving, not its
    /// bumps). A `Commit` or `Moved` bump that timed out is sent again (twice at most: an extra
    /// increment only costs a miss); one that still does not reach Redis is owed: from this call
    /// on this instance serves nothing until the supervisor has sent it. A `Pre` bump only
    /// narrows a window (docs/cache.md, *Ordering*) and is not retried or owed.
    pub async fn bump(&self, mode: Mode, items: Vec<(String, String, u64)>) -> Result<(), LinkError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut tries = if mode == Mode::Pre { 1 } else { 3 };
        let r = loop {
            tries -= 1;
            let r = match self.connection() {
                Ok(mut c) => self.send_bump(&mut c, mode, &items).await,
                Err(e) => Err(e),
            };
            match r {
                Err(LinkError::Timeout(op)) if tries > 0 => self.error(&LinkError::Timeout(op)),
                r => break r,
            }
        };
        if let Err(e) = &r {
            self.error(e);
            if mode != Mode::Pre {
                self.owe(Owed { mode, items });
            }
        }
        r
    }

    async fn send_bump(
        &self,
        c: &mut MultiplexedConnection,
        mode: Mode,
        items: &[(String, String, u64)],
    ) -> Result<(), LinkError> {
        let epoch = self.table.epoch();
        let script = redis::Script::new(BUMP);
        let mut inv = script.prepare_invoke();
        let head = format!("b {} {} {}", self.instance, super::now_us(), mode.as_str());
        inv.arg(&self.channel).arg(head).arg(mode.as_str());
        for (k, _, _) in items {
            inv.key(k);
        }
        for (_, tag, _) in items {
            inv.arg(tag);
        }
        for (_, _, pos) in items {
            inv.arg(format!("{pos:016x}"));
        }
        let recs: Vec<String> = deadline(self.timeout, "bump", inv.invoke_async(c)).await?;
        // Our own reads see the bump at once (the pub/sub echo would too, a moment later);
        // records of an earlier session are not kept.
        for ((k, _, _), rec) in items.iter().zip(&recs) {
            if let Some(rec) = Rec::parse(rec) {
                self.table.fill(epoch, k, rec);
            }
        }
        self.stats.bumps_sent.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::CACHE_INVALIDATIONS, "mode" => mode.as_str(), "source" => "local")
            .increment(items.len() as u64);
        Ok(())
    }

    fn owe(&self, o: Owed) {
        let mut q = self.owed.lock().expect("owed lock");
        // Set before the write is acknowledged (the caller acknowledges after this returns).
        self.owing.store(true, Ordering::SeqCst);
        if q.len() >= MAX_OWED {
            q.clear();
            self.owe_generation.store(true, Ordering::SeqCst);
        } else if !self.owe_generation.load(Ordering::SeqCst) {
            q.push_back(o);
        }
        self.stats.bumps_owed.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(names::CACHE_OWED).set(q.len() as f64);
    }

    /// Send what is owed, oldest first; stop at the first failure (the rest stays owed).
    async fn pay(&self, c: &mut MultiplexedConnection) -> Result<(), LinkError> {
        if self.owe_generation.load(Ordering::SeqCst) {
            self.bump_generation(c).await?;
            self.owe_generation.store(false, Ordering::SeqCst);
            self.owed.lock().expect("owed lock").clear();
        }
        loop {
            let next = self.owed.lock().expect("owed lock").front().map(|o| (o.mode, o.items.clone()));
            let Some((mode, items)) = next else { break };
            self.send_bump(c, mode, &items).await?;
            self.owed.lock().expect("owed lock").pop_front();
        }
        let q = self.owed.lock().expect("owed lock");
        if q.is_empty() && !self.owe_generation.load(Ordering::SeqCst) {
            self.owing.store(false, Ordering::SeqCst);
        }
        metrics::gauge!(names::CACHE_OWED).set(q.len() as f64);
        Ok(())
    }

    async fn bump_generation(&self, c: &mut MultiplexedConnection) -> Result<(), LinkError> {
        let script = redis::Script::new(GEN);
        let mut inv = script.prepare_invoke();
        inv.key(&self.gen_key).arg(&self.channel);
        let g: u64 = deadline(self.timeout, "generation", inv.invoke_async(c)).await?;
        self.generation.fetch_max(g, Ordering::SeqCst);
        self.stats.generation_bumps.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn on_message(&self, payload: &str) {
        let mut lines = payload.lines();
        let head = lines.next().unwrap_or("");
        let mut words = head.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("b"), Some(from), Some(sent)) => {
                let mode = match words.next() {
                    Some("pre") => "pre",
                    Some("commit") => "commit",
                    Some("moved") => "moved",
                    _ => "unknown",
                };
                let mine = from == self.instance;
                let mut n = 0u64;
                let mut moved = Vec::new();
                for line in lines {
                    if let Some((k, rec)) = line.split_once(' ')
                        && let Some(rec) = Rec::parse(rec)
                    {
                        self.table.apply(k, rec);
                        n += 1;
                        if mode == "moved" {
                            moved.push(k.to_string());
                        }
                    }
                }
                // Applied first: a warming read of a moved cell keys on the bumped version.
                if !moved.is_empty() {
                    self.hot.moved(moved);
                }
                if !mine {
                    self.stats.remote_bumps.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!(names::CACHE_INVALIDATIONS, "mode" => mode, "source" => "remote").increment(n);
                    if let Ok(sent) = sent.parse::<u64>() {
                        // Writer's clock to ours: meaningful on one host or with synced clocks.
                        let d = super::now_us().saturating_sub(sent);
                        metrics::histogram!(names::CACHE_INVALIDATION_DELAY).record(d as f64 / 1e6);
                        let mut q = self.delays_us.lock().expect("delays lock");
                        if q.len() == DELAYS_KEPT {
                            q.pop_front();
                        }
                        q.push_back(d);
                    }
                }
            }
            (Some("g"), Some(g), None) => {
                if let Ok(g) = g.parse() {
                    self.generation.fetch_max(g, Ordering::SeqCst);
                }
            }
            (Some("p"), Some(from), Some(sent)) if from == self.instance => {
                if let Ok(sent) = sent.parse::<u64>() {
                    // The channel delivers in publish order: every bump published before this
                    // ping (it was published after `sent`) has been applied by now.
                    self.last_pong_us.fetch_max(sent, Ordering::SeqCst);
                    self.stats.heartbeat_rtt_us.store(self.now_us().saturating_sub(sent), Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    /// Stop serving and forget every version (a fetch under way is not stored either). The
    /// command connection stays for bumps until the next session replaces it (on a dead one they
    /// fail at once and are owed).
    fn down(&self) {
        self.subscribed.store(false, Ordering::SeqCst);
        self.table.clear();
        metrics::gauge!(names::CACHE_LIVE).set(0.0);
    }

    /// One connection's life, in order:
    /// 1. connect the command connection and the subscription (subscribed before anything is
    ///    read, so no bump published from here on is missed);
    /// 2. ask which Redis this is (`run_id`);
    /// 3. send the bumps this instance owes (to whatever Redis answers: on a new one they only
    ///    cost a miss);
    /// 4. back after a loss on the Redis we had (same `run_id`): move the generation, so entries
    ///    filled before now — when another instance may still have owed a bump — are
    ///    unreachable for every instance;
    /// 5. forget every version learned before and empty L1, then serve;
    /// 6. apply bumps from the channel, send a heartbeat each period through it and pay what is
    ///    owed, until the subscription closes or no heartbeat came back for 3 periods.
    async fn session(&self, had: &mut bool) -> Result<(), LinkError> {
        // 1.
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout * 4))
            .set_response_timeout(Some(self.timeout));
        let mut conn =
            deadline(self.timeout * 4, "connect", self.client.get_multiplexed_async_connection_with_config(&cfg))
                .await?;
        // Bumps go to the new connection from now on (the old one may be dead).
        self.conn.store(Some(Arc::new(conn.clone())));
        let mut pubsub = deadline(self.timeout * 4, "connect", self.client.get_async_pubsub()).await?;
        deadline(self.timeout, "subscribe", pubsub.subscribe(&self.channel)).await?;
        let (_sink, mut stream) = pubsub.split();
        // 2.
        let info: String =
            deadline(self.timeout, "info", redis::cmd("INFO").arg("server").query_async(&mut conn)).await?;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_string())
            .ok_or(LinkError::Lost("INFO server has no run_id"))?;
        let same = *self.run_id.load().as_str() == run_id;
        // 3.
        self.pay(&mut conn).await?;
        // 4.
        if *had && same {
            self.bump_generation(&mut conn).await?;
        }
        let generation: Option<u64> =
            deadline(self.timeout, "generation", redis::cmd("GET").arg(&self.gen_key).query_async(&mut conn)).await?;
        // 5.
        self.table.clear();
        self.l1.clear();
        self.generation.store(generation.unwrap_or(0), Ordering::SeqCst);
        self.run_id.store(Arc::new(run_id));
        self.last_pong_us.store(self.now_us(), Ordering::SeqCst);
        self.subscribed.store(true, Ordering::SeqCst);
        *had = true;
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(names::CACHE_LIVE).set(1.0);
        tracing::info!(channel = %self.channel, "cache: redis link live");
        // 6.
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(m) => self.on_message(&String::from_utf8_lossy(m.get_payload_bytes())),
                    None => return Err(LinkError::Lost("subscription closed")),
                },
                _ = tick.tick() => {
                    if self.pong_age() > self.heartbeat * 3 {
                        return Err(LinkError::Lost("heartbeat not back within 3 periods"));
                    }
                    // A failed heartbeat or payment does not end the session by itself: a
                    // heartbeat that does not come back does (above), and a dead Redis closes
                    // the subscription.
                    let ping = format!("p {} {}", self.instance, self.now_us());
                    let sent = deadline(self.timeout, "heartbeat", redis::cmd("PUBLISH").arg(&self.channel).arg(ping)
                        .query_async::<()>(&mut conn)).await;
                    if let Err(e) = sent {
                        self.error(&e);
                    } else if self.owing.load(Ordering::SeqCst) && let Err(e) = self.pay(&mut conn).await {
                        self.error(&e);
                    }
                }
            }
        }
    }

    /// The supervisor: sessions, one after the other, with a short backoff between them.
    pub async fn supervise(self: Arc<Self>) {
        let mut had = false;
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            let e = match self.session(&mut had).await {
                Ok(()) => LinkError::Lost("session ended"),
                Err(e) => e,
            };
            self.down();
            self.error(&e);
            if started.elapsed() > Duration::from_secs(5) {
                backoff = Duration::from_millis(50);
            }
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cache: redis link down; reads go to the backends");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// For `/admin/cache`.
    pub fn status(&self) -> serde_json::Value {
        let mut d: Vec<u64> = self.delays_us.lock().expect("delays lock").iter().copied().collect();
        d.sort_unstable();
        let pct = |p: f64| d.get(((d.len() as f64 - 1.0) * p).round() as usize).map(|v| *v as f64 / 1000.0);
        let s = &self.stats;
        serde_json::json!({
            "subscribed": self.subscribed.load(Ordering::SeqCst),
            "serving": self.serving().is_some(),
            "run_id": self.run_id.load().as_str(),
            "generation": self.generation.load(Ordering::SeqCst),
            "heartbeat_age_ms": self.pong_age().as_millis() as u64,
            "heartbeat_rtt_ms": s.heartbeat_rtt_us.load(Ordering::Relaxed) as f64 / 1000.0,
            "owed_bumps": self.owed.lock().expect("owed lock").len(),
            "owes_generation": self.owe_generation.load(Ordering::SeqCst),
            "sessions": s.sessions.load(Ordering::Relaxed),
            "errors": s.errors.load(Ordering::Relaxed),
            "bumps_sent": s.bumps_sent.load(Ordering::Relaxed),
            "bumps_owed_total": s.bumps_owed.load(Ordering::Relaxed),
            "generation_bumps": s.generation_bumps.load(Ordering::Relaxed),
            "remote_bumps": s.remote_bumps.load(Ordering::Relaxed),
            "bump_to_visible_ms": {"samples": d.len(), "p50": pct(0.5), "p99": pct(0.99), "max": d.last().map(|v| *v as f64 / 1000.0)},
        })
    }
}
