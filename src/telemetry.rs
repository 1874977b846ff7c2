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
    // Fleet mode on etcd (docs/fleet.md): 1 while the link is up; the Unix time it was lost
    // (0 while up).
    pub const ETCD_CONNECTED: &str = "cellgate_etcd_connected";
    pub const ETCD_LOST_SINCE: &str = "cellgate_etcd_lost_since_seconds";
    // The read cache (docs/cache.md). Labels: level (l1, l2, stale), db, cause, mode,
    // source (local, remote), op, reason.
    pub const CACHE_HITS: &str = "cellgate_cache_hits_total";
    pub const CACHE_MISSES: &str = "cellgate_cache_misses_total";
    pub const CACHE_FILLS: &str = "cellgate_cache_fills_total";
    pub const CACHE_NOT_STORED: &str = "cellgate_cache_not_stored_total";
    pub const CACHE_EVICTIONS: &str = "cellgate_cache_evictions_total";
    pub const CACHE_BYTES: &str = "cellgate_cache_bytes";
    pub const CACHE_STORED_BYTES: &str = "cellgate_cache_stored_bytes_total";
    pub const CACHE_INVALIDATIONS: &str = "cellgate_cache_invalidations_total";
    pub const CACHE_INVALIDATION_DELAY: &str = "cellgate_cache_invalidation_delay_seconds";
    pub const CACHE_MERGES: &str = "cellgate_cache_single_flight_merges_total";
    pub const CACHE_BYPASS: &str = "cellgate_cache_bypass_total";
    pub const CACHE_REDIS_ERRORS: &str = "cellgate_cache_redis_errors_total";
    pub const CACHE_LIVE: &str = "cellgate_cache_live";
    pub const CACHE_OWED: &str = "cellgate_cache_owed_bumps";
    // Warming (docs/cache.md, *Warming*). Labels: result, reason (start, migration).
    pub const CACHE_WARM_RECORDED: &str = "cellgate_cache_warm_recorded_total";
    pub const CACHE_WARM_RUNS: &str = "cellgate_cache_warm_runs_total";
    pub const CACHE_WARM_READS: &str = "cellgate_cache_warm_reads_total";
    pub const CACHE_WARM_DURATION: &str = "cellgate_cache_warm_duration_seconds";
}

/// Install the metrics recorder (idempotent: tests start several servers in one process).
pub fn init_metrics() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::REQUEST_DURATION.into()),
                &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            )
            .expect("buckets are non-empty")
            .set_buckets_for_metric(
                Matcher::Full(names::CACHE_INVALIDATION_DELAY.into()),
                &[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0],
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

/// How log lines are written: human-readable text, or one JSON object per line for log shippers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The serve path's log subscriber writing to `out`. ANSI colours only when `out` is a terminal:
/// a redirected stderr (a log file, journald, a pipe) gets plain text, not escape codes.
pub fn subscriber<W>(format: LogFormat, filter: tracing_subscriber::EnvFilter, out: W) -> tracing::Dispatch
where
    W: std::io::Write + std::io::IsTerminal + Send + 'static,
{
    let ansi = out.is_terminal();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::sync::Mutex::new(out));
    match format {
        LogFormat::Text => tracing::Dispatch::new(builder.finish()),
        LogFormat::Json => tracing::Dispatch::new(builder.json().finish()),
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`); `format` from `--log-format` or
/// `CELLGATE_LOG_FORMAT`.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing::dispatcher::set_global_default(subscriber(format, filter, std::io::stderr()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_to_file(format: LogFormat) -> String {
        let path = std::env::temp_dir().join(format!("cellgate-log-{}-{format:?}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let d = subscriber(format, tracing_subscriber::EnvFilter::new("info"), file);
        tracing::dispatcher::with_default(&d, || {
            let span = tracing::info_span!("request", route = "sql_query", shard = "a");
            let _g = span.enter();
            tracing::info!(answer = 42, "served");
            tracing::warn!(code = "shard_unavailable", error = "connection refused", "request failed");
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        text
    }

    #[test]
    fn no_colour_codes_when_not_a_terminal() {
        let text = log_to_file(LogFormat::Text);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("request failed") && text.contains("shard_unavailable"), "{text}");
        assert!(!text.contains("\x1b["), "{text:?}");
    }

    #[test]
    fn json_lines_parse() {
        let text = log_to_file(LogFormat::Json);
        assert!(!text.contains("\x1b["), "{text:?}");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["fields"]["code"], "shard_unavailable");
        assert_eq!(lines[1]["span"]["shard"], "a");
    }
}
