//! The one-line summary printed after goose's own report, from the metrics `execute()` returns:
//! totals and the read cache's hit ratio, then per scenario its requests, failures, req/s and
//! p50/p99 response times (over all its requests: `write_read` counts its execute and its
//! query), then the cache's counts (`Cache-Status` of every successful cached-eligible read).

use std::fmt::Write as _;

use goose::metrics::{GooseMetrics, GooseRequestMetricTimingData};

use crate::cache::CacheSummary;
use crate::scenarios::WEIGHTS;

#[derive(Debug, Default)]
pub struct Row {
    pub name: String,
    pub requests: usize,
    pub failures: usize,
    pub timing: GooseRequestMetricTimingData,
}

#[derive(Debug)]
pub struct Summary {
    pub duration_secs: usize,
    pub total: Row,
    pub scenarios: Vec<Row>,
    /// Transactions that failed (each failed request fails its transaction; a transaction can
    /// also fail without a request, e.g. when the run's ids are used up).
    pub transaction_failures: usize,
    pub cache: CacheSummary,
}

/// Merge request timings (bucket counts add up; goose keeps its merge private).
fn merge(into: &mut GooseRequestMetricTimingData, from: &GooseRequestMetricTimingData) {
    if from.counter == 0 {
        return;
    }
    if into.counter == 0 || from.minimum_time_us < into.minimum_time_us {
        into.minimum_time_us = from.minimum_time_us;
    }
    into.maximum_time_us = into.maximum_time_us.max(from.maximum_time_us);
    into.total_time_us += from.total_time_us;
    into.counter += from.counter;
    into.times_us = into.times_us.iter().chain(from.times_us.iter()).map(|(&b, &c)| (b, c)).collect();
}

pub fn summarize(metrics: &GooseMetrics, cache: CacheSummary) -> Summary {
    let mut scenarios: Vec<Row> =
        WEIGHTS.iter().map(|(name, _)| Row { name: name.to_string(), ..Row::default() }).collect();
    let mut total = Row { name: "total".into(), ..Row::default() };
    // Sorted for a deterministic merge order.
    let mut requests: Vec<_> = metrics.requests.values().collect();
    requests.sort_by(|a, b| a.path.cmp(&b.path));
    for request in requests {
        let scenario = request.path.split(':').next().unwrap_or_default();
        let row = match scenarios.iter_mut().position(|r| r.name == scenario) {
            Some(i) => &mut scenarios[i],
            None => {
                scenarios.push(Row { name: scenario.to_string(), ..Row::default() });
                scenarios.last_mut().expect("just pushed")
            }
        };
        for row in [row, &mut total] {
            row.requests += request.success_count + request.fail_count;
            row.failures += request.fail_count;
            merge(&mut row.timing, &request.raw_data);
        }
    }
    let transaction_failures = metrics.transactions.iter().flatten().map(|t| t.fail_count).sum();
    Summary { duration_secs: metrics.duration, total, scenarios, transaction_failures, cache }
}

impl Summary {
    /// Nothing failed and something ran.
    pub fn ok(&self) -> bool {
        self.total.requests > 0 && self.total.failures == 0 && self.transaction_failures == 0
    }

    fn rate(&self, requests: usize) -> f64 {
        requests as f64 / self.duration_secs.max(1) as f64
    }

    pub fn line(&self) -> String {
        let t = &self.total;
        let mut line = format!(
            "cellgate-loadtest summary: requests={} failures={} req/s={:.1} duration={}s cache_hit_ratio={}",
            t.requests,
            t.failures,
            self.rate(t.requests),
            self.duration_secs,
            self.cache.ratio_text(),
        );
        if self.transaction_failures > t.failures {
            let _ = write!(line, " transaction_failures={}", self.transaction_failures);
        }
        for row in &self.scenarios {
            let _ = write!(
                line,
                " | {} requests={} failures={} req/s={:.1} p50={} p99={}",
                row.name,
                row.requests,
                row.failures,
                self.rate(row.requests),
                ms(row.timing.percentile_us(0.50)),
                ms(row.timing.percentile_us(0.99)),
            );
        }
        let c = &self.cache;
        let _ = write!(
            line,
            " | cache reads={} hits={} l2_hits={} stale_hits={} misses={} collapsed={} bypassed={} no_header={} hit_ratio={}",
            c.reads,
            c.hits,
            c.l2_hits,
            c.stale_hits,
            c.misses,
            c.collapsed,
            c.bypassed,
            c.no_header,
            c.ratio_text(),
        );
        line
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use goose::metrics::TimeBuckets;

    fn timing(times_us: &[u64]) -> GooseRequestMetricTimingData {
        let mut t = GooseRequestMetricTimingData::default();
        for &us in times_us {
            let part = GooseRequestMetricTimingData {
                times_us: TimeBuckets::from_iter([(us, 1)]),
                minimum_time_us: us,
                maximum_time_us: us,
                total_time_us: us,
                counter: 1,
            };
            merge(&mut t, &part);
        }
        t
    }

    #[test]
    fn merged_timings_keep_counts_and_extremes() {
        let mut a = timing(&[100, 100, 100]);
        merge(&mut a, &timing(&[5, 120]));
        merge(&mut a, &GooseRequestMetricTimingData::default());
        assert_eq!(a.counter, 5);
        assert_eq!((a.minimum_time_us, a.maximum_time_us, a.total_time_us), (5, 120, 425));
        assert_eq!(a.percentile_us(0.5), 100);
        assert_eq!(a.percentile_us(0.99), 120);
    }

    #[test]
    fn empty_metrics_are_not_ok() {
        let summary = summarize(&GooseMetrics::default(), CacheSummary::default());
        assert!(!summary.ok());
        let line = summary.line();
        assert!(line.starts_with("cellgate-loadtest summary: requests=0 failures=0"), "{line}");
        assert!(line.contains("duration=0s cache_hit_ratio=n/a | point_read requests=0"), "{line}");
        assert!(line.ends_with(" | cache reads=0 hits=0 l2_hits=0 stale_hits=0 misses=0 collapsed=0 bypassed=0 no_header=0 hit_ratio=n/a"), "{line}");
    }

    #[test]
    fn the_hit_ratio_is_in_the_first_part() {
        let cache = CacheSummary { reads: 1000, hits: 412, misses: 588, ..CacheSummary::default() };
        let line = summarize(&GooseMetrics::default(), cache).line();
        // scripts/demo-smoke.sh prints the part before the first " | ".
        let head = line.split(" | ").next().unwrap();
        assert!(head.ends_with(" cache_hit_ratio=41.2%"), "{line}");
        assert!(line.contains(" | cache reads=1000 hits=412 l2_hits=0 stale_hits=0 misses=588 "), "{line}");
    }
}
