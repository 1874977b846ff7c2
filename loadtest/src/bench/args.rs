//! Command line of `cellgate-bench`.

use std::path::PathBuf;

/// The workspace root, found from the build's source tree (like the load test's cities CSV).
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The workspace root as a clean absolute path.
pub fn workspace() -> String {
    std::fs::canonicalize(WORKSPACE).map(|p| p.display().to_string()).unwrap_or_else(|_| WORKSPACE.to_string())
}

pub const HELP: &str = "\
cellgate-bench: point reads directly against PostgreSQL vs through cellgate, in alternating pairs,
plus the 100k-concurrent-streams test (G4), the latency-under-100k-open-streams test (G7) and,
on request, the read cache (L1 and L2 hits next to pgbench -S) and the TLS variants (HTTPS
clients, TLS to PostgreSQL, handshakes per core).
Starts its own loopback cluster (harness) and release cellgate processes; stops everything it
started, also on error and Ctrl-C. Writes a markdown report and an SVG latency chart.

Usage: cellgate-bench [OPTIONS]

Parts:
  --only PARTS          comma-separated subset of pairs,streams,g7,cache,tls (repeatable)
                        [default: pairs,streams,g7; cache and tls only when asked for]
  --cache               same as --only cache (added to --only when both are given)
  --tls                 same as --only tls (added to --only when both are given)

Pairs (G1-G3):
  --pairs N             alternating direct/proxied pairs [default: 3]
  --secs S              seconds per measured run [default: 10]
  --concurrency C       clients (pgbench -c, h2load -c, Rust tasks) and cellgate pool size [default: 16]
  --client-threads T    pgbench -j and h2load -t [default: 1]
  --scale N             pgbench -i scale (100,000 accounts per unit) [default: 1]
  --proto h1|h2c        protocol of h2load in the pairs [default: h1]
  --noise-threshold X   CPU of other processes (cores, averaged over a run) that marks it noisy
                        [default: 0.2]

Streams (G4):
  --streams-connections N   h2load -c [default: 100]
  --streams-per-conn M      h2load -m [default: 1000]
  --streams-requests R      h2load -n [default: 200000]
  --streams-pool P          cellgate pool.max_size per endpoint [default: 8]

G7:
  --g7-rps R            offered req/s in total (point reads + area searches) [default: 10000]
  --g7-area-share F     share of the offered rate that is area searches [default: 0.1]
  --g7-secs S           measured seconds [default: 10]
  --g7-radius-km K      radius of the area search [default: 10]

Cache (issue 17; starts its own redis-server, needs it on PATH or REDIS_SERVER):
  --cache-out FILE      markdown report of the cache part [default: docs/performance-cache.md]
  Uses --pairs, --secs, --concurrency, --client-threads and --proto: each pair runs pgbench -S,
  the uncached proxied point read, L1 hits, L2 hits (and L1 hits over h2c with 32 streams per
  connection, for the breakdown) in rotated order.

TLS (issue 14; runs after the other parts: it turns ssl on in the cluster):
  --tls-out FILE        markdown report of the TLS part [default: docs/performance-tls.md]
  Uses --pairs, --secs, --concurrency, --client-threads and --proto (h1: --h1 on every variant;
  h2c: h2c prior knowledge in cleartext, h2 via ALPN over TLS).

Output and build:
  --out FILE            markdown report [default: docs/performance-runner.md]
  --svg FILE            latency chart [default: docs/performance-latency.svg]
  --keep-work           keep the work directory (configs, h2load/pgbench logs)
  --build               run `cargo build --release -p cellgate` first
  -h, --help            this text

Environment: CELLGATE_BIN (default <workspace>/target/release/cellgate), H2LOAD (default h2load
on PATH), PGBENCH (default pgbench on PATH), REDIS_SERVER (default redis-server on PATH; --cache).
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Pairs,
    Streams,
    G7,
    /// Cached point reads (L1 hit, L2 hit) next to pgbench -S and the uncached read (opt-in).
    Cache,
    /// TLS variants of the proxied point read, and handshakes per core (opt-in).
    Tls,
}

#[derive(Debug, Clone)]
pub struct Args {
    pub parts: Vec<Part>,
    pub pairs: usize,
    pub secs: u64,
    pub concurrency: usize,
    pub client_threads: usize,
    pub scale: u32,
    pub h2c: bool,
    pub noise_threshold: f64,
    pub streams_connections: usize,
    pub streams_per_conn: usize,
    pub streams_requests: u64,
    pub streams_pool: usize,
    pub g7_rps: f64,
    pub g7_area_share: f64,
    pub g7_secs: u64,
    pub g7_radius_km: f64,
    pub out: PathBuf,
    pub svg: PathBuf,
    pub tls_out: PathBuf,
    pub cache_out: PathBuf,
    pub keep_work: bool,
    pub build: bool,
    pub help: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            parts: vec![Part::Pairs, Part::Streams, Part::G7],
            pairs: 3,
            secs: 10,
            concurrency: 16,
            client_threads: 1,
            scale: 1,
            h2c: false,
            noise_threshold: 0.2,
            streams_connections: 100,
            streams_per_conn: 1000,
            streams_requests: 200_000,
            streams_pool: 8,
            g7_rps: 10_000.0,
            g7_area_share: 0.1,
            g7_secs: 10,
            g7_radius_km: 10.0,
            out: PathBuf::from(workspace()).join("docs/performance-runner.md"),
            svg: PathBuf::from(workspace()).join("docs/performance-latency.svg"),
            tls_out: PathBuf::from(workspace()).join("docs/performance-tls.md"),
            cache_out: PathBuf::from(workspace()).join("docs/performance-cache.md"),
            keep_work: false,
            build: false,
            help: false,
        }
    }
}

impl Args {
    pub fn has(&self, p: Part) -> bool {
        self.parts.contains(&p)
    }
    /// Any of the parts that write the main report (`--out`, `--svg`).
    pub fn main_report(&self) -> bool {
        self.has(Part::Pairs) || self.has(Part::Streams) || self.has(Part::G7)
    }
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{flag}: not a valid number: {v:?}"))
}

pub fn parse(argv: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    let mut only: Vec<Part> = Vec::new();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => a.help = true,
            "--only" => {
                for p in value()?.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    only.push(match p {
                        "pairs" => Part::Pairs,
                        "streams" => Part::Streams,
                        "g7" => Part::G7,
                        "cache" => Part::Cache,
                        "tls" => Part::Tls,
                        other => {
                            return Err(format!("--only: unknown part {other:?} (pairs, streams, g7, cache, tls)"));
                        }
                    });
                }
            }
            "--tls" => only.push(Part::Tls),
            "--cache" => only.push(Part::Cache),
            "--pairs" => a.pairs = num(&flag, &value()?)?,
            "--secs" => a.secs = num(&flag, &value()?)?,
            "--concurrency" => a.concurrency = num(&flag, &value()?)?,
            "--client-threads" => a.client_threads = num(&flag, &value()?)?,
            "--scale" => a.scale = num(&flag, &value()?)?,
            "--proto" => {
                a.h2c = match value()?.as_str() {
                    "h1" => false,
                    "h2c" => true,
                    other => return Err(format!("--proto: {other:?} (h1 or h2c)")),
                }
            }
            "--noise-threshold" => a.noise_threshold = num(&flag, &value()?)?,
            "--streams-connections" => a.streams_connections = num(&flag, &value()?)?,
            "--streams-per-conn" => a.streams_per_conn = num(&flag, &value()?)?,
            "--streams-requests" => a.streams_requests = num(&flag, &value()?)?,
            "--streams-pool" => a.streams_pool = num(&flag, &value()?)?,
            "--g7-rps" => a.g7_rps = num(&flag, &value()?)?,
            "--g7-area-share" => a.g7_area_share = num(&flag, &value()?)?,
            "--g7-secs" => a.g7_secs = num(&flag, &value()?)?,
            "--g7-radius-km" => a.g7_radius_km = num(&flag, &value()?)?,
            "--out" => a.out = PathBuf::from(value()?),
            "--svg" => a.svg = PathBuf::from(value()?),
            "--tls-out" => a.tls_out = PathBuf::from(value()?),
            "--cache-out" => a.cache_out = PathBuf::from(value()?),
            "--keep-work" => a.keep_work = true,
            "--build" => a.build = true,
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    if !only.is_empty() {
        // Order of the parts is fixed (pairs, streams, g7, cache, tls): tls turns ssl on in the
        // cluster, which would change what pgbench (sslmode=prefer) measures in the other parts.
        a.parts = [Part::Pairs, Part::Streams, Part::G7, Part::Cache, Part::Tls]
            .into_iter()
            .filter(|p| only.contains(p))
            .collect();
    }
    if a.pairs == 0 || a.secs == 0 || a.concurrency == 0 || a.client_threads == 0 || a.scale == 0 {
        return Err("--pairs, --secs, --concurrency, --client-threads and --scale must be > 0".into());
    }
    if a.secs > 600 || a.g7_secs > 600 || a.g7_secs == 0 {
        return Err("--secs and --g7-secs must be in 1..=600 (runs are bounded)".into());
    }
    if a.streams_connections == 0 || a.streams_per_conn == 0 || a.streams_requests == 0 || a.streams_pool == 0 {
        return Err("the --streams-* values must be > 0".into());
    }
    if !(0.0..1.0).contains(&a.g7_area_share) || a.g7_rps <= 0.0 || a.g7_radius_km <= 0.0 {
        return Err("--g7-area-share must be in [0, 1), --g7-rps and --g7-radius-km > 0".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags() {
        let a = p(&["--pairs", "5", "--secs=3", "--only", "pairs,streams", "--proto", "h2c"]).unwrap();
        assert_eq!((a.pairs, a.secs, a.h2c), (5, 3, true));
        assert_eq!(a.parts, vec![Part::Pairs, Part::Streams]);
        assert_eq!(p(&[]).unwrap().parts.len(), 3);
        assert!(p(&["--only", "x"]).is_err());
        assert!(p(&["--pairs", "0"]).is_err());
        assert!(p(&["--secs"]).is_err());
        assert!(p(&["--bogus"]).is_err());
        assert_eq!(p(&["--tls"]).unwrap().parts, vec![Part::Tls]);
        assert_eq!(p(&["--tls", "--only", "pairs"]).unwrap().parts, vec![Part::Pairs, Part::Tls]);
        assert_eq!(p(&["--only", "tls,g7"]).unwrap().parts, vec![Part::G7, Part::Tls]);
        assert!(!p(&[]).unwrap().has(Part::Tls));
        assert!(!p(&["--tls"]).unwrap().main_report());
        assert_eq!(p(&["--tls", "--cache"]).unwrap().parts, vec![Part::Cache, Part::Tls]);
        assert_eq!(p(&["--only", "cache,pairs"]).unwrap().parts, vec![Part::Pairs, Part::Cache]);
        assert!(!p(&[]).unwrap().has(Part::Cache));
        assert!(!p(&["--cache"]).unwrap().main_report());
    }
}
