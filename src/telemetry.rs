//! Logs (tracing) and metrics (Prometheus text via metrics-exporter-prometheus). Installs the
//! process-wide recorder once; renders on the admin listener.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Every metric name cellgate records, defined once (docs/http-api.md lists them). Labels come
/// from bounded sets only: route, shard id, role, status, result — never cells.
pub mod names {
    pub const REQUESTS: &str = "cellgate_requests_total";
    pub const REQUEST_DURATION: &str = "cellgate_request_duration_seconds";
    pub const FENCE_HITS: &str = "cellgate_fence_hits_total";
    pub const MAP_RELOADS: &str = "cellgate_map_reloads_total";
    pub const MAP_VERSION: &str = "cellgate_map_version";
    pub const ENDPOINT_UP: &str = "cellgate_endpoint_up";
    pub const POOL_CONNECTIONS: &str = "cellgate_pool_connections";
    pub const POOL_IDLE: &str = "cellgate_pool_idle";
    pub const REPLICA_LAG_BYTES: &str = "cellgate_replica_lag_bytes";
    pub const REPLICA_LAG_SECONDS: &str = "cellgate_replica_lag_seconds";
    pub const MIGRATION_ACTIVE: &str = "cellgate_migration_active";
    pub const MIGRATION_HOLD: &str = "cellgate_migration_hold_seconds";
    pub const TASKS: &str = "cellgate_tasks";
}

/// Install the metrics recorder (idempotent: tests start several servers in one process).
pub fn init_metrics() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::REQUEST_DURATION.into()),
                &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            )
            .expect("buckets are non-empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding); then we render an empty set.
        let _ = metrics::set_global_recorder(recorder);
        // Histograms keep raw samples until upkeep folds them into buckets; without it memory
        // grows with every request until /metrics is scraped (seen: ~18 bytes per request).
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        });
        handle
    });
}

pub fn render_metrics() -> String {
    HANDLE.get().map(|h| h.render()).unwrap_or_default()
}

/// Logs to stderr; `RUST_LOG` filters (default `info`); `CELLGATE_LOG_FORMAT=json` for JSON lines.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("CELLGATE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
