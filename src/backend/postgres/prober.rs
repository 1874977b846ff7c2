//! PostgreSQL's probe: role (`pg_is_in_recovery`), WAL position, and replica lag measured
//! against the primary's recent positions, plugged into the generic prober loop
//! (`backend::health::run_loop`). Owns no health rules; must not touch pools.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{PgDatabase, PgEndpoint, parse_lsn};
use crate::backend::health::{Meta, Probe, Probed, run_loop};
use crate::config;

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
     (EXTRACT(EPOCH FROM (clock_timestamp() - pg_last_xact_replay_timestamp())) * 1000)::float8";

/// The probe runs over the endpoint's own connection, kept on the endpoint across reloads.
impl Probed for PgEndpoint {
    type Answer = Probe;

    fn probed(&self) -> Meta<'_> {
        Meta { label: &self.label, role: self.role, health: &self.health, pool: self.pool.state() }
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, String> {
        let mut slot = self.probe_client.lock().await;
        let fut = async {
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                let (client, conn) =
                    self.pg_config.connect(self.tls.clone()).await.map_err(|e| crate::backend::error_chain(&e))?;
                crate::tasks::spawn("pg_probe_connection", async move {
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

/// Probe one shard database forever: primary and replicas concurrently, then each replica's lag
/// against the primary's recent positions (the primary is the first endpoint).
pub async fn run(db: Arc<PgDatabase>, h: config::Health) {
    let eps: Vec<Arc<PgEndpoint>> = db.endpoints().cloned().collect();
    let mut history = PrimaryHistory { samples: Default::default() };
    let cfg = h.clone();
    run_loop(eps, h, move |eps, results, now| {
        if let Some(Ok(p)) = results.first()
            && !p.in_recovery
        {
            history.push(p.lsn, now);
        }
        for (ep, result) in eps.iter().zip(results) {
            let result = result.map(|mut p| {
                if p.in_recovery {
                    match history.lag(p.lsn, now) {
                        Some((bytes, ms)) => {
                            p.replay_age_ms = Some(ms);
                            ep.health.set_lag_bytes(Some(bytes));
                        }
                        // Never saw the primary: keep the server's replay-timestamp age; bytes unknown.
                        None => ep.health.set_lag_bytes(None),
                    }
                } else {
                    p.replay_age_ms = Some(0);
                    ep.health.set_lag_bytes(Some(0));
                }
                p
            });
            ep.health.record(&ep.label, result, &cfg);
        }
    })
    .await
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
