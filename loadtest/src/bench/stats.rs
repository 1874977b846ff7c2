//! Percentiles, medians, and the per-request logs of h2load and pgbench.

use std::path::Path;

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lat {
    pub n: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile of sorted values (p in 0..=1).
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1] as f64
}

pub fn summarize(mut v: Vec<u64>) -> Lat {
    v.sort_unstable();
    if v.is_empty() {
        return Lat { n: 0, p50: f64::NAN, p99: f64::NAN, p999: f64::NAN, max: f64::NAN, mean: f64::NAN };
    }
    let sum: u128 = v.iter().map(|&x| x as u128).sum();
    Lat {
        n: v.len() as u64,
        p50: percentile(&v, 0.50),
        p99: percentile(&v, 0.99),
        p999: percentile(&v, 0.999),
        max: *v.last().unwrap_or(&0) as f64,
        mean: sum as f64 / v.len() as f64,
    }
}

/// Median (mean of the middle two for an even count); NaNs are ignored.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// One request of h2load's `--log-file`: start (µs since epoch), status, duration (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Entry {
    pub start_us: u64,
    pub status: u16,
    pub dur_us: u64,
}

pub fn parse_h2load_log(text: &str) -> Vec<H2Entry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(H2Entry {
                start_us: f.next()?.trim().parse().ok()?,
                status: f.next()?.trim().parse().ok()?,
                dur_us: f.next()?.trim().parse().ok()?,
            })
        })
        .collect()
}

/// The most requests in flight at once (sweep over start/end events).
pub fn peak_concurrency(entries: &[H2Entry]) -> u64 {
    let mut ev: Vec<(u64, i64)> = Vec::with_capacity(entries.len() * 2);
    for e in entries {
        ev.push((e.start_us, 1));
        ev.push((e.start_us + e.dur_us, -1));
    }
    // Ends before starts at the same instant.
    ev.sort_unstable();
    let (mut cur, mut peak) = (0i64, 0i64);
    for (_, d) in ev {
        cur += d;
        peak = peak.max(cur);
    }
    peak.max(0) as u64
}

/// pgbench's per-transaction log (`--log`): `client_id transaction_no time script_no time_epoch
/// time_us [schedule_lag] [retries]`. Returns service latencies in µs (time minus schedule lag,
/// so that rate-limited runs measure from the actual start like h2load) and the failed count
/// (`failed`/`serialization`/`deadlock` in the time column).
pub fn parse_pgbench_log(text: &str, rate_limited: bool) -> (Vec<u64>, u64) {
    let mut lat = Vec::new();
    let mut failed = 0;
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        match f[2].parse::<u64>() {
            Ok(t) => {
                let lag = if rate_limited { f.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) } else { 0 };
                lat.push(t.saturating_sub(lag));
            }
            Err(_) => failed += 1,
        }
    }
    (lat, failed)
}

/// All per-transaction log files pgbench wrote for `prefix` (`prefix.<pid>` and
/// `prefix.<pid>.<thread>`).
pub fn read_pgbench_logs(dir: &Path, prefix: &str, rate_limited: bool) -> (Vec<u64>, u64) {
    let mut lat = Vec::new();
    let mut failed = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{prefix}."))
                && let Ok(t) = std::fs::read_to_string(e.path())
            {
                let (l, f) = parse_pgbench_log(&t, rate_limited);
                lat.extend(l);
                failed += f;
            }
        }
    }
    (lat, failed)
}

/// h2load's summary (stdout).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct H2Summary {
    pub secs: f64,
    pub rps: f64,
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub s2xx: u64,
    pub s3xx: u64,
    pub s4xx: u64,
    pub s5xx: u64,
}

fn secs_of(v: &str) -> Option<f64> {
    let v = v.trim();
    for (unit, mul) in [("ms", 1e-3), ("us", 1e-6), ("s", 1.0)] {
        if let Some(n) = v.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|x| x * mul);
        }
    }
    None
}

/// `N word` pairs of a line like `requests: 10 total, 10 started, ...`.
fn counts(line: &str) -> Vec<(String, u64)> {
    let body = line.split_once(':').map_or(line, |(_, b)| b);
    body.split(',')
        .filter_map(|part| {
            let mut f = part.split_whitespace();
            let n = f.next()?.parse().ok()?;
            Some((f.next()?.to_string(), n))
        })
        .collect()
}

pub fn parse_h2load_stdout(out: &str) -> Option<H2Summary> {
    let mut s = H2Summary::default();
    let mut seen = false;
    for line in out.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in ") {
            let mut f = rest.split(',');
            s.secs = secs_of(f.next()?)?;
            s.rps = f.next()?.trim().strip_suffix("req/s")?.trim().parse().ok()?;
            seen = true;
        } else if line.starts_with("requests:") {
            for (k, n) in counts(line) {
                match k.as_str() {
                    "total" => s.total = n,
                    "started" => s.started = n,
                    "done" => s.done = n,
                    "succeeded" => s.succeeded = n,
                    "failed" => s.failed = n,
                    "errored" => s.errored = n,
                    "timeout" => s.timeout = n,
                    _ => {}
                }
            }
        } else if line.starts_with("status codes:") {
            for (k, n) in counts(line) {
                match k.as_str() {
                    "2xx" => s.s2xx = n,
                    "3xx" => s.s3xx = n,
                    "4xx" => s.s4xx = n,
                    "5xx" => s.s5xx = n,
                    _ => {}
                }
            }
        }
    }
    seen.then_some(s)
}

/// The connection lines h2load prints before its summary: `TLS Protocol:`, `Cipher:`,
/// `Server Temp Key:` (TLS only) and `Application protocol:` (every run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct H2Conn {
    pub tls_protocol: Option<String>,
    pub cipher: Option<String>,
    pub temp_key: Option<String>,
    pub alpn: Option<String>,
}

impl H2Conn {
    pub fn describe(&self) -> String {
        match (&self.tls_protocol, &self.alpn) {
            (Some(p), alpn) => format!(
                "{p}, {}, key exchange {}, application protocol {}",
                self.cipher.as_deref().unwrap_or("?"),
                self.temp_key.as_deref().unwrap_or("?"),
                alpn.as_deref().unwrap_or("?")
            ),
            (None, Some(a)) => format!("cleartext, application protocol {a}"),
            (None, None) => "?".into(),
        }
    }
}

pub fn parse_h2load_conn(out: &str) -> H2Conn {
    let field = |name: &str| {
        out.lines().find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string())).filter(|v| !v.is_empty())
    };
    H2Conn {
        tls_protocol: field("TLS Protocol:"),
        cipher: field("Cipher:"),
        temp_key: field("Server Temp Key:"),
        alpn: field("Application protocol:"),
    }
}

/// pgbench's `tps = X (without initial connection time)` and failed count.
pub fn parse_pgbench_stdout(out: &str) -> Option<(f64, u64)> {
    let tps = out.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("tps = ")?;
        if !rest.contains("without initial connection time") && rest.contains("including") {
            return None;
        }
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })?;
    let failed = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("number of failed transactions: ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some((tps, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_median() {
        let v: Vec<u64> = (1..=1000).collect();
        let l = summarize(v);
        assert_eq!((l.p50, l.p99, l.p999, l.max), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert!(summarize(vec![]).p50.is_nan());
    }

    #[test]
    fn h2load_output() {
        let out = "finished in 10.00s, 24446.30 req/s, 5.49MB/s
requests: 244463 total, 244463 started, 244463 done, 244460 succeeded, 3 failed, 0 errored, 0 timeout
status codes: 244460 2xx, 0 3xx, 3 4xx, 0 5xx
";
        let s = parse_h2load_stdout(out).unwrap();
        assert_eq!((s.secs, s.rps, s.done, s.succeeded, s.failed, s.s4xx), (10.0, 24446.3, 244463, 244460, 3, 3));
        assert_eq!(parse_h2load_stdout("finished in 827.55ms, 1.00 req/s, 1B/s").unwrap().secs, 0.82755);
        let log = parse_h2load_log("100\t200\t50\n120\t200\t10\n200\t429\t5\nbad\n");
        assert_eq!(log.len(), 3);
        assert_eq!(peak_concurrency(&log), 2);
    }

    #[test]
    fn h2load_connection_lines() {
        let out = "starting benchmark...\nspawning thread #0: 1 total client(s). 10 total requests\nTLS Protocol: TLSv1.3\nCipher: TLS_AES_256_GCM_SHA384\nServer Temp Key: X25519 253 bits\nApplication protocol: http/1.1\n\nfinished in 10.00s, 1.00 req/s, 1B/s\n";
        let c = parse_h2load_conn(out);
        assert_eq!(c.tls_protocol.as_deref(), Some("TLSv1.3"));
        assert_eq!(c.alpn.as_deref(), Some("http/1.1"));
        assert_eq!(
            c.describe(),
            "TLSv1.3, TLS_AES_256_GCM_SHA384, key exchange X25519 253 bits, application protocol http/1.1"
        );
        let c = parse_h2load_conn("Application protocol: h2c\nfinished in 1s, 1 req/s, 1B/s\n");
        assert_eq!(c.describe(), "cleartext, application protocol h2c");
    }

    #[test]
    fn pgbench_output() {
        let out = "number of failed transactions: 0 (0.000%)\nlatency average = 0.5 ms\ntps = 31234.567890 (without initial connection time)\n";
        assert_eq!(parse_pgbench_stdout(out), Some((31234.56789, 0)));
        let (lat, failed) = parse_pgbench_log("0 1 250 0 1700000000 123\n0 2 failed 0 1700000000 124\n", false);
        assert_eq!((lat, failed), (vec![250], 1));
        let (lat, _) = parse_pgbench_log("0 1 250 0 1700000000 123 40\n", true);
        assert_eq!(lat, vec![210]);
    }
}
