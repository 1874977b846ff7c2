//! Endpoint health: probes (role, WAL position, replay lag), consecutive fail/ok thresholds
//! (hysteresis), and the read-eligibility rule. Owns the probe loop; must not touch pools.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::NoTls;

use super::Role;
use super::postgres::{PgDatabase, PgEndpoint, parse_lsn};
use crate::config;

/// What the prober last learned about one endpoint.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthView {
    /// Up after `ok_threshold` good probes, down after `fail_threshold` bad ones.
    pub up: bool,
    /// Probed at least once (readiness waits for the first pass).
    pub probed: bool,
    /// `pg_is_in_recovery()`: true on a replica.
    pub in_recovery: Option<bool>,
    /// Primary: current WAL LSN; replica: last replayed LSN.
    pub lsn: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub lag_ms: Option<u64>,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub consecutive_ok: u32,
    #[serde(skip)]
    pub consecutive_fail: u32,
}

#[derive(Debug)]
pub struct EndpointHealth {
    configured: Role,
    view: Mutex<HealthView>,
    recheck: Notify,
}

impl EndpointHealth {
    pub fn new(configured: Role) -> Self {
        Self { configured, view: Mutex::new(HealthView::default()), recheck: Notify::new() }
    }

    pub fn view(&self) -> HealthView {
        self.view.lock().expect("health lock").clone()
    }

    /// Until the first probe answers, an endpoint is assumed up: the pool's own errors then
    /// decide, and readiness waits for the first pass anyway.
    pub fn is_up(&self) -> bool {
        let v = self.view.lock().expect("health lock");
        v.up || !v.probed
    }

    /// May this replica serve a read now? Up, really in recovery, and within both lag bounds.
    /// Unknown lag counts as too much.
    pub fn readable(&self, max_lag_ms: u64, max_lag_bytes: u64) -> bool {
        let v = self.view.lock().expect("health lock");
        v.up && v.in_recovery == Some(true)
            && v.lag_ms.is_some_and(|l| l <= max_lag_ms)
            && v.lag_bytes.is_some_and(|l| l <= max_lag_bytes)
    }

    /// Is this endpoint a writable primary as far as we know?
    pub fn writable(&self) -> bool {
        let v = self.view.lock().expect("health lock");
        !v.probed || (v.up && v.in_recovery != Some(true))
    }

    pub fn note_error(&self, e: &str) {
        self.view.lock().expect("health lock").last_error = Some(e.chars().take(300).collect());
    }

    /// Ask the prober to probe now (a read-only error on a "primary", a broken connection).
    pub fn request_recheck(&self) {
        self.recheck.notify_one();
    }

    pub fn configured_role(&self) -> Role {
        self.configured
    }

    /// A re-check was requested (see [`request_recheck`](Self::request_recheck)).
    pub(crate) async fn recheck_requested(&self) {
        self.recheck.notified().await
    }

    /// Record a probe of a backend that reports only its role (SQL Server): `Ok(read_only)`.
    /// No replay position or lag exists for it, so both stay unknown.
    pub(crate) fn record_role(&self, label: &str, result: Result<bool, String>, h: &config::Health) {
        self.record(label, result.map(|ro| Probe { in_recovery: ro, lsn: 0, replay_age_ms: None }), h);
    }

    /// May this replica serve reads, judged by role alone (SQL Server: up and answering as a
    /// read-only secondary; there is no lag measurement).
    pub fn readable_by_role(&self) -> bool {
        let v = self.view.lock().expect("health lock");
        v.up && v.in_recovery == Some(true)
    }

    fn record(&self, label: &str, result: Result<Probe, String>, h: &config::Health) {
        let mut v = self.view.lock().expect("health lock");
        let was_up = v.up;
        v.probed = true;
        match result {
            Ok(p) => {
                v.consecutive_fail = 0;
                v.consecutive_ok = v.consecutive_ok.saturating_add(1);
                // First answer, or enough good ones in a row after being down.
                if !v.up && (v.consecutive_ok >= h.ok_threshold || v.lsn.is_none()) {
                    v.up = true;
                }
                v.in_recovery = Some(p.in_recovery);
                v.lsn = Some(p.lsn);
                v.lag_ms = p.replay_age_ms;
            }
            Err(e) => {
                v.consecutive_ok = 0;
                v.consecutive_fail = v.consecutive_fail.saturating_add(1);
                if v.consecutive_fail >= h.fail_threshold {
                    v.up = false;
                }
                tracing::debug!(endpoint = label, error = %e, "probe failed");
                v.last_error = Some(e);
            }
        }
        // Transitions are what operators need in the log; every probe result is in /admin/shards.
        match (was_up, v.up) {
            (false, true) => tracing::info!(endpoint = label, "endpoint up"),
            (true, false) => {
                tracing::warn!(endpoint = label, error = v.last_error.as_deref().unwrap_or(""), "endpoint down")
            }
            _ if !v.up && v.consecutive_fail == h.fail_threshold => {
                tracing::warn!(endpoint = label, error = v.last_error.as_deref().unwrap_or(""), "endpoint unreachable")
            }
            _ => {}
        }
    }
}

struct Probe {
    in_recovery: bool,
    lsn: u64,
    /// Replica only: ms since the last replayed transaction committed on the primary.
    replay_age_ms: Option<u64>,
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
     (EXTRACT(EPOCH FROM (clock_timestamp() - pg_last_xact_replay_timestamp())) * 1000)::float8";

/// Probes one endpoint over a dedicated connection (never borrowed from the pool, so a full
/// pool cannot make a healthy endpoint look dead). The connection is kept on the endpoint.
struct Prober {
    ep: Arc<PgEndpoint>,
}

impl Prober {
    async fn probe(&self, timeout: Duration) -> Result<Probe, String> {
        let mut slot = self.ep.probe_client.lock().await;
        let fut = async {
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                let (client, conn) = self.ep.pg_config.connect(NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                *slot = Some(client);
            }
            let client = slot.as_ref().expect("just set");
            let row = client.query_one(PROBE_SQL, &[]).await.map_err(|e| e.to_string())?;
            let in_recovery: bool = row.get(0);
            let lsn = row.get::<_, Option<&str>>(1).and_then(parse_lsn).unwrap_or(0);
            let age: Option<f64> = row.get(2);
            Ok(Probe { in_recovery, lsn, replay_age_ms: age.map(|a| a.max(0.0) as u64) })
        };
        let r = tokio::time::timeout(timeout, fut).await;
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => {
                *slot = None;
                Err(e)
            }
            Err(_) => {
                // A black-holed server: drop the connection so the next probe reconnects.
                *slot = None;
                Err(format!("probe timed out after {timeout:?}"))
            }
        }
    }
}

/// Recent primary WAL positions with the time they were observed. A replica's time lag is how
/// long ago the primary first reached a position the replica has not replayed yet: robust when
/// the primary is idle (no "last replayed transaction is old" false alarm) and measurable with
/// the primary down (the last known positions still apply).
struct PrimaryHistory {
    samples: std::collections::VecDeque<(u64, Instant)>,
}

impl PrimaryHistory {
    const CAP: usize = 1024;

    fn push(&mut self, lsn: u64, at: Instant) {
        if self.samples.back().is_some_and(|(l, _)| *l == lsn) {
            return; // unchanged position: the first time it was seen is what matters
        }
        if self.samples.len() == Self::CAP {
            self.samples.pop_front();
        }
        self.samples.push_back((lsn, at));
    }

    fn last_lsn(&self) -> Option<u64> {
        self.samples.back().map(|(l, _)| *l)
    }

    /// (bytes behind the last known primary position, ms since the primary first passed `replayed`).
    fn lag(&self, replayed: u64, now: Instant) -> Option<(u64, u64)> {
        let last = self.last_lsn()?;
        let ms = self
            .samples
            .iter()
            .find(|(l, _)| *l > replayed)
            .map(|(_, t)| now.saturating_duration_since(*t).as_millis() as u64)
            .unwrap_or(0);
        Some((last.saturating_sub(replayed), ms))
    }
}

/// Probe one shard database forever (until the task is aborted): primary and replicas
/// concurrently, then replica lag against the primary's recent positions.
pub async fn run(db: Arc<PgDatabase>, h: config::Health) {
    let timeout = Duration::from_millis(h.probe_timeout_ms);
    let interval = Duration::from_millis(h.interval_ms);
    let probers: Vec<Prober> = db.endpoints().map(|ep| Prober { ep: ep.clone() }).collect();
    let mut history = PrimaryHistory { samples: Default::default() };
    loop {
        let started = Instant::now();
        // Probes run concurrently: one black-holed replica must not delay the others.
        let results = futures_util::future::join_all(probers.iter().map(|p| p.probe(timeout))).await;
        let now = Instant::now();
        if let Some(Ok(p)) = results.first()
            && !p.in_recovery
        {
            history.push(p.lsn, now);
        }
        for (prober, result) in probers.iter().zip(results) {
            let ep = &prober.ep;
            let result = result.map(|mut p| {
                if p.in_recovery {
                    match history.lag(p.lsn, now) {
                        Some((bytes, ms)) => {
                            p.replay_age_ms = Some(ms);
                            set_lag_bytes(ep, Some(bytes));
                        }
                        // Never saw the primary: keep the server's replay-timestamp age; bytes unknown.
                        None => set_lag_bytes(ep, None),
                    }
                } else {
                    p.replay_age_ms = Some(0);
                    set_lag_bytes(ep, Some(0));
                }
                p
            });
            ep.health.record(&ep.label, result, &h);
            publish_metrics(ep);
        }
        // Sleep until the next tick, or until some endpoint asks for a re-check.
        let next = started + interval;
        let rechecks =
            futures_util::future::select_all(probers.iter().map(|p| Box::pin(p.ep.health.recheck.notified())));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = rechecks => {}
        }
    }
}

fn set_lag_bytes(ep: &PgEndpoint, v: Option<u64>) {
    ep.health.view.lock().expect("health lock").lag_bytes = v;
}

fn publish_metrics(ep: &PgEndpoint) {
    let v = ep.health.view();
    let labels = [("endpoint", ep.label.to_string()), ("role", ep.role.as_str().to_string())];
    metrics::gauge!(crate::telemetry::names::ENDPOINT_UP, &labels).set(if v.up { 1.0 } else { 0.0 });
    if let Some(l) = v.lag_bytes {
        metrics::gauge!(crate::telemetry::names::REPLICA_LAG_BYTES, &labels).set(l as f64);
    }
    if let Some(l) = v.lag_ms {
        metrics::gauge!(crate::telemetry::names::REPLICA_LAG_SECONDS, &labels).set(l as f64 / 1000.0);
    }
    let st = ep.pool.state();
    metrics::gauge!(crate::telemetry::names::POOL_CONNECTIONS, &labels).set(st.connections as f64);
    metrics::gauge!(crate::telemetry::names::POOL_IDLE, &labels).set(st.idle_connections as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_from_primary_history() {
        let t0 = Instant::now();
        let mut h = PrimaryHistory { samples: Default::default() };
        assert_eq!(h.lag(0, t0), None);
        h.push(100, t0);
        h.push(100, t0 + Duration::from_millis(500)); // idle primary: still first seen at t0
        h.push(200, t0 + Duration::from_millis(1000));
        let now = t0 + Duration::from_millis(1500);
        assert_eq!(h.lag(200, now), Some((0, 0)), "caught up");
        assert_eq!(h.lag(150, now), Some((50, 500)), "behind since the primary reached 200");
        assert_eq!(h.lag(50, now), Some((150, 1500)));
    }
}
