//! SQL Server's probe: is the endpoint read-only (`DATABASEPROPERTYEX(.., 'Updateability')`),
//! plugged into the generic prober loop (`backend::health::run_loop`). There is no replay
//! position or lag for SQL Server (docs/sqlserver.md). Owns no health rules.

use std::sync::Arc;
use std::time::Duration;

use super::{MssqlDatabase, MssqlEndpoint};
use crate::backend::health::{Meta, Probed, run_loop};
use crate::config;

pub const PROBE_SQL: &str = "SELECT CAST(DATABASEPROPERTYEX(DB_NAME(), 'Updateability') AS nvarchar(20))";

impl Probed for MssqlEndpoint {
    type Answer = bool;

    fn probed(&self) -> Meta<'_> {
        Meta { label: &self.label, role: self.role, health: &self.health, pool: self.pool.state() }
    }

    /// Is this endpoint read-only? `DATABASEPROPERTYEX(.., 'Updateability')` is `READ_ONLY` on a
    /// readable secondary (and on a read-only database), `READ_WRITE` on a primary.
    async fn probe(&self, timeout: Duration) -> Result<bool, String> {
        let mut slot = self.probe_client.lock().await;
        let fut = async {
            if slot.is_none() {
                *slot = Some(super::dial(&self.config).await.map_err(|e| e.to_string())?);
            }
            let c = slot.as_mut().expect("just set");
            let rows = c
                .simple_query(PROBE_SQL)
                .await
                .map_err(|e| e.to_string())?
                .into_first_result()
                .await
                .map_err(|e| e.to_string())?;
            let v: Option<&str> = rows.first().and_then(|r| r.try_get(0).ok().flatten());
            match v {
                Some(s) => Ok(s.eq_ignore_ascii_case("READ_ONLY")),
                None => Err("probe returned no Updateability".to_string()),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(ro)) => Ok(ro),
            Ok(Err(e)) => {
                *slot = None;
                Err(e)
            }
            Err(_) => {
                *slot = None;
                Err(format!("probe timed out after {timeout:?}"))
            }
        }
    }
}

/// Probe every endpoint of one database forever (until the task is aborted).
pub async fn run(db: Arc<MssqlDatabase>, h: config::Health) {
    let eps: Vec<Arc<MssqlEndpoint>> = db.endpoints().cloned().collect();
    let cfg = h.clone();
    run_loop(eps, h, move |eps, results, _| {
        for (ep, r) in eps.iter().zip(results) {
            ep.health.record_role(&ep.label, r, &cfg);
        }
    })
    .await
}
