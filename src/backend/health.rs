//! Endpoint health, driver-free: what the last probes said (role, replay position, lag),
//! consecutive fail/ok thresholds (hysteresis), the read/write eligibility rules, and the one
//! prober loop every SQL driver plugs its probe into. Must not touch pools or speak a protocol:
//! each driver's probe lives with its driver (`postgres/prober.rs`, `mssql/prober.rs`).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Role;
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
    pub(crate) view: Mutex<HealthView>,
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

    /// Bytes behind the primary (replicas), as the driver's prober measured it.
    pub(crate) fn set_lag_bytes(&self, v: Option<u64>) {
        self.view.lock().expect("health lock").lag_bytes = v;
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

    pub(crate) fn record(&self, label: &str, result: Result<Probe, String>, h: &config::Health) {
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

/// One probe's answer, in driver-neutral terms.
pub struct Probe {
    pub in_recovery: bool,
    /// Primary: current position; replica: last replayed position (0 where none exists).
    pub lsn: u64,
    /// Replica only: ms behind the primary.
    pub replay_age_ms: Option<u64>,
}

/// An endpoint as the prober loop sees it.
pub struct Meta<'a> {
    pub label: &'a str,
    pub role: Role,
    pub health: &'a EndpointHealth,
    pub pool: bb8::State,
}

/// An endpoint the prober loop can probe: its driver's probe plus what the gauges need.
pub trait Probed: Send + Sync + 'static {
    type Answer: Send;
    /// What the loop and the gauges need of the endpoint.
    fn probed(&self) -> Meta<'_>;
    /// Probe over the endpoint's own connection (never a pooled one, so a full pool cannot
    /// make a healthy endpoint look dead), within `timeout`.
    fn probe(&self, timeout: Duration) -> impl Future<Output = Result<Self::Answer, String>> + Send;
}

/// Probe one shard database's endpoints forever (until the task is aborted): (1) probe all
/// concurrently — one black-holed replica must not delay the others; (2) hand the answers to
/// the driver's `record` (which updates each endpoint's health); (3) publish the gauges;
/// (4) sleep until the next tick, or until some endpoint asks for a re-check.
pub async fn run_loop<E: Probed>(
    eps: Vec<Arc<E>>,
    h: config::Health,
    mut record: impl FnMut(&[Arc<E>], Vec<Result<E::Answer, String>>, Instant) + Send,
) {
    let timeout = Duration::from_millis(h.probe_timeout_ms);
    let interval = Duration::from_millis(h.interval_ms);
    loop {
        let started = Instant::now();
        // 1.
        let results = futures_util::future::join_all(eps.iter().map(|ep| ep.probe(timeout))).await;
        // 2.
        record(&eps, results, Instant::now());
        // 3.
        for ep in &eps {
            publish_gauges(ep.as_ref());
        }
        // 4.
        let rechecks =
            futures_util::future::select_all(eps.iter().map(|ep| Box::pin(ep.probed().health.recheck_requested())));
        tokio::select! {
            _ = tokio::time::sleep_until(started + interval) => {}
            _ = rechecks => {}
        }
    }
}

fn publish_gauges<E: Probed>(ep: &E) {
    use crate::telemetry::names;
    let m = ep.probed();
    let v = m.health.view();
    let labels = [("endpoint", m.label.to_string()), ("role", m.role.as_str().to_string())];
    metrics::gauge!(names::ENDPOINT_UP, &labels).set(if v.up { 1.0 } else { 0.0 });
    if let Some(l) = v.lag_bytes {
        metrics::gauge!(names::REPLICA_LAG_BYTES, &labels).set(l as f64);
    }
    if let Some(l) = v.lag_ms {
        metrics::gauge!(names::REPLICA_LAG_SECONDS, &labels).set(l as f64 / 1000.0);
    }
    metrics::gauge!(names::POOL_CONNECTIONS, &labels).set(m.pool.connections as f64);
    metrics::gauge!(names::POOL_IDLE, &labels).set(m.pool.idle_connections as f64);
}
