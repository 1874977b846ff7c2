//! The markdown report (`docs/performance-runner.md`) and the SVG chart.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellgate_harness::Cluster;

use super::stats::{H2Summary, Lat, median};
use super::svg::{self, Group, Series};
use super::{Ctx, G7Out, PairsOut, Run, StreamsOut, args};

pub struct Report<'a> {
    pub ctx: &'a Ctx,
    pub pairs: Option<&'a PairsOut>,
    pub streams: Option<&'a StreamsOut>,
    pub g7: Option<&'a G7Out>,
}

/// One line of the targets table.
pub struct Target {
    pub id: &'static str,
    pub what: &'static str,
    pub measured: String,
    pub quiet: String,
    pub target: &'static str,
    pub met: Option<bool>,
}

pub(super) fn f0(v: f64) -> String {
    if v.is_finite() { format!("{v:.0}") } else { "–".into() }
}
pub(super) fn f1(v: f64) -> String {
    if v.is_finite() { format!("{v:.1}") } else { "–".into() }
}
pub(super) fn f2(v: f64) -> String {
    if v.is_finite() { format!("{v:.2}") } else { "–".into() }
}
pub(super) fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
pub(super) fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// UTC `YYYY-MM-DD HH:MM` of a time.
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

pub(super) fn first_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&s).lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "?".into())
}

pub(super) fn machine(cluster: &Cluster, ctx: &Ctx) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "?".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|k| format!("{:.1} GiB", k / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let postgres = cluster.bindir().join("postgres");
    let commit = first_line("git", &["-C", &args::workspace(), "rev-parse", "--short", "HEAD"]);
    let dirty = std::process::Command::new("git")
        .args(["-C", &args::workspace(), "status", "--porcelain", "--", "src", "Cargo.toml"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let bin_time = std::fs::metadata(&ctx.cellgate).and_then(|m| m.modified()).map(utc).unwrap_or_default();
    vec![
        ("CPU".into(), format!("{nproc} × {model}")),
        ("memory".into(), mem),
        ("kernel".into(), kernel),
        ("PostgreSQL".into(), first_line(&postgres.display().to_string(), &["--version"])),
        ("pgbench".into(), first_line(&ctx.pgbench, &["--version"])),
        ("h2load".into(), first_line(&ctx.h2load, &["--version"])),
        (
            "cellgate".into(),
            format!(
                "`{}` built {bin_time}, workspace at {commit}{}",
                ctx.cellgate.replace(&args::workspace(), "."),
                if dirty { " with uncommitted changes in src/ or Cargo.toml" } else { "" }
            ),
        ),
        (
            "open files".into(),
            format!(
                "runner soft limit {} → {} (raised to the hard limit; children inherit it)",
                ctx.nofile.0, ctx.nofile.1
            ),
        ),
    ]
}

fn lat_cells(l: &Lat) -> String {
    format!("{} | {} | {}", f0(l.p50), f0(l.p99), f0(l.p999))
}

fn run_row(pair: usize, r: &Run, threshold: f64) -> String {
    format!(
        "| {pair} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
        if r.direct { "direct" } else { "proxied" },
        r.tool,
        r.offered.map(f0).unwrap_or_else(|| "max".into()),
        r.requests,
        f0(r.rps),
        r.errors,
        lat_cells(&r.lat),
        if r.direct { "–".into() } else { r.cpu_us_per_req.map(f1).unwrap_or_else(|| "–".into()) },
        r.samples.rss_max_kib.map(mib).unwrap_or_else(|| "–".into()),
        r.samples.fds_max.map(|v| v.to_string()).unwrap_or_else(|| "–".into()),
        if r.noisy(threshold) { "**noisy**: " } else { "" },
        r.samples.noise.describe()
    )
}

impl Report<'_> {
    pub fn targets(&self) -> Vec<Target> {
        let thr = self.ctx.args.noise_threshold;
        let mut t = Vec::new();
        let pair_target = |id, what, target, f: &dyn Fn(&super::Pair) -> f64, ok: &dyn Fn(f64) -> bool| {
            let (m, q, m_ok) = match self.pairs {
                Some(p) => {
                    let all: Vec<f64> = p.pairs.iter().map(f).collect();
                    let quiet: Vec<f64> = p.pairs.iter().filter(|x| !x.noisy(thr)).map(f).collect();
                    let m = median(&all);
                    let q = if quiet.len() == all.len() {
                        "same (no noisy pair)".to_string()
                    } else if quiet.is_empty() {
                        "– (every pair noisy)".to_string()
                    } else {
                        format!("{} ({} pairs)", f2(median(&quiet)), quiet.len())
                    };
                    // G3 is defined at 50 % of the direct ceiling: if the proxy could not carry that
                    // rate in most pairs, the condition of the target is not met whatever the ratio.
                    let sat = p.pairs.iter().filter(|x| x.half_saturated()).count();
                    if id == "G3" && sat * 2 > p.pairs.len() {
                        let m = format!("{} (proxied saturated at 50 % in {sat} of {} pairs)", f2(m), p.pairs.len());
                        (m, q, Some(false))
                    } else {
                        (f2(m), q, m.is_finite().then(|| ok(m)))
                    }
                }
                None => ("–".into(), "–".into(), None),
            };
            Target { id, what, measured: m, quiet: q, target, met: m_ok }
        };
        t.push(pair_target(
            "G1",
            "proxied point reads/s ÷ direct pgbench tps (h2load vs pgbench -S, same clients)",
            "≥ 0.70",
            &|p| p.g1(),
            &|v| v >= 0.70,
        ));
        t.push(pair_target(
            "G2",
            "cellgate CPU per point read, µs (utime+stime delta ÷ requests, h2load run)",
            "≤ 13",
            &|p| p.g2(),
            &|v| v <= 13.0,
        ));
        t.push(pair_target(
            "G3",
            "added p50 at 50 % of the direct ceiling, µs (h2load --rps p50 − pgbench -R p50)",
            "≤ 150",
            &|p| p.added_p50_half(),
            &|v| v <= 150.0,
        ));
        t.push(pair_target(
            "G3",
            "proxied p99 ÷ direct p99 at 50 % of the direct ceiling",
            "≤ 1.5",
            &|p| p.p99_ratio_half(),
            &|v| v <= 1.5,
        ));
        let s = self.streams;
        let quiet_s = |noisy: bool| if noisy { "run was noisy".to_string() } else { "quiet run".to_string() };
        let s_noisy = s.map(|s| s.noise.cores() > thr).unwrap_or(false);
        t.push(Target {
            id: "G4",
            what: "every request of the 100k-stream run completed with 2xx (h2load succeeded = requested)",
            measured: s
                .map(|s| {
                    format!(
                        "{} of {} 2xx; {} failed, {} errored, {} timeout; 4xx {}, 5xx {}",
                        s.summary.s2xx,
                        s.summary.total,
                        s.summary.failed,
                        s.summary.errored,
                        s.summary.timeout,
                        s.summary.s4xx,
                        s.summary.s5xx
                    )
                })
                .unwrap_or_else(|| "–".into()),
            quiet: s.map(|_| quiet_s(s_noisy)).unwrap_or_default(),
            target: "all",
            met: s.map(|s| s.summary.s2xx == s.summary.total && s.summary.total > 0),
        });
        t.push(Target {
            id: "G4",
            what: "RSS per in-flight request: (peak RSS − idle RSS) ÷ streams, bytes",
            measured: s
                .map(|s| {
                    format!(
                        "{} (({} − {}) MiB ÷ {})",
                        f0(s.bytes_per_stream()),
                        mib(s.peak_rss_kib),
                        mib(s.idle_rss_kib),
                        s.nominal_streams
                    )
                })
                .unwrap_or_else(|| "–".into()),
            quiet: s.map(|_| quiet_s(s_noisy)).unwrap_or_default(),
            target: "≤ 4096",
            met: s.map(|s| s.bytes_per_stream() <= 4096.0),
        });
        t.push(Target {
            id: "G4",
            what: "peak RSS during the 100k-stream run, MiB",
            measured: s.map(|s| mib(s.peak_rss_kib)).unwrap_or_else(|| "–".into()),
            quiet: s.map(|_| quiet_s(s_noisy)).unwrap_or_default(),
            target: "≤ 512",
            met: s.map(|s| s.peak_rss_kib <= 512 * 1024),
        });
        t.push(Target {
            id: "G4",
            what: "peak open fds during the 100k-stream run",
            measured: s.map(|s| s.peak_fds.to_string()).unwrap_or_else(|| "–".into()),
            quiet: s.map(|_| quiet_s(s_noisy)).unwrap_or_default(),
            target: "≤ 10000",
            met: s.map(|s| s.peak_fds <= 10_000),
        });
        let g = self.g7;
        let g_noisy = g.map(|g| g.with.samples.noise.cores() > thr).unwrap_or(false);
        let reached = |l: &(H2Summary, Lat), offered: f64| l.0.s2xx as f64 / l.0.secs.max(1e-9) >= 0.95 * offered;
        let g_note = |base: Option<f64>, load: Option<&(H2Summary, Lat)>, offered: f64| {
            let achieved = load.map(|l| l.0.s2xx as f64 / l.0.secs.max(1e-9)).unwrap_or(f64::NAN);
            format!(
                "{}; achieved {} of {} req/s offered{}; without parked streams: {} ms",
                quiet_s(g_noisy),
                f0(achieved),
                f0(offered),
                if achieved < 0.95 * offered { " (**saturated**)" } else { "" },
                base.map(|v| f2(v / 1000.0)).unwrap_or_else(|| "–".into())
            )
        };
        t.push(Target {
            id: "G7",
            what: "point read p99 at the offered rate with 100k streams parked, ms",
            measured: g.map(|g| f2(g.with.point.1.p99 / 1000.0)).unwrap_or_else(|| "–".into()),
            quiet: g
                .map(|g| g_note(Some(g.baseline.point.1.p99), Some(&g.with.point), g.offered_point))
                .unwrap_or_default(),
            target: "≤ 10",
            met: g.map(|g| g.with.point.1.p99 <= 10_000.0 && reached(&g.with.point, g.offered_point)),
        });
        t.push(Target {
            id: "G7",
            what: "area search (≤ 3 shards) p99 at the offered rate with 100k streams parked, ms",
            measured: g.and_then(|g| g.with.area.as_ref()).map(|a| f2(a.1.p99 / 1000.0)).unwrap_or_else(|| "–".into()),
            quiet: g
                .map(|g| g_note(g.baseline.area.as_ref().map(|a| a.1.p99), g.with.area.as_ref(), g.offered_area))
                .unwrap_or_default(),
            target: "≤ 20",
            met: g.and_then(|g| g.with.area.as_ref().map(|a| a.1.p99 <= 20_000.0 && reached(a, g.offered_area))),
        });
        t
    }

    pub fn summary_lines(&self) -> Vec<String> {
        self.targets()
            .iter()
            .map(|t| format!("{} {}: {} (target {}) {}", t.id, t.what, t.measured, t.target, met(t.met)))
            .collect()
    }

    fn chart(&self) -> String {
        let series = [
            Series { name: "direct p50", color: "#1f77b4" },
            Series { name: "direct p99", color: "#9ecae9" },
            Series { name: "proxied p50", color: "#d62728" },
            Series { name: "proxied p99", color: "#ff9f9b" },
        ];
        let mut groups = Vec::new();
        if let Some(p) = self.pairs {
            for pair in &p.pairs {
                groups.push(Group {
                    label: format!("pair {}\nmax", pair.idx),
                    values: vec![pair.pgbench.lat.p50, pair.pgbench.lat.p99, pair.h2load.lat.p50, pair.h2load.lat.p99],
                });
                groups.push(Group {
                    label: format!("pair {}\n@50%", pair.idx),
                    values: vec![
                        pair.pgbench_half.lat.p50,
                        pair.pgbench_half.lat.p99,
                        pair.h2load_half.lat.p50,
                        pair.h2load_half.lat.p99,
                    ],
                });
            }
        }
        if let Some(g) = self.g7 {
            for l in [&g.baseline, &g.with] {
                let short = if std::ptr::eq(l, &g.baseline) { "0 parked" } else { "100k parked" };
                groups.push(Group {
                    label: format!("G7 point\n{short}"),
                    values: vec![f64::NAN, f64::NAN, l.point.1.p50, l.point.1.p99],
                });
                if let Some(a) = &l.area {
                    groups.push(Group {
                        label: format!("G7 area\n{short}"),
                        values: vec![f64::NAN, f64::NAN, a.1.p50, a.1.p99],
                    });
                }
            }
        }
        let sub = format!(
            "direct = pgbench -S on the replica, proxied = h2load through cellgate, {} clients each; max = unthrottled,\n@50% = both offered half the pair's pgbench tps; G7 = point reads and area searches at a fixed offered rate; {}",
            self.ctx.args.concurrency,
            utc(self.ctx.started)
        );
        svg::chart("Point-read latency: direct vs through cellgate", &sub, &series, &groups)
    }

    pub fn render(&self, cluster: &Cluster, elapsed: Duration) -> (String, String) {
        let ctx = self.ctx;
        let a = &ctx.args;
        let thr = a.noise_threshold;
        let mut m = String::new();
        let _ = writeln!(m, "# Performance runner: direct vs through cellgate\n");
        let _ = writeln!(
            m,
            "Generated by `cellgate-bench` (`loadtest/src/bin/cellgate-bench.rs`, see `loadtest/bench/README.md`) on {}; the whole invocation took {:.0} s. Rerun it to refresh this file and the chart; do not edit by hand. Hand-written analysis lives in `docs/performance.md`.\n",
            utc(ctx.started),
            elapsed.as_secs_f64()
        );
        let _ = writeln!(m, "{}", command_block(ctx));
        if a.has(args::Part::Tls) {
            let _ = writeln!(
                m,
                "The TLS part of this invocation (`--tls`) is in its own file, `{}`.\n",
                rel_file(&a.out, &a.tls_out)
            );
        }

        let _ = writeln!(m, "## Targets\n");
        let _ = writeln!(
            m,
            "Pair targets are the **median of the per-pair values**; \"quiet pairs\" repeats the median without the pairs in which other programs (or hypervisor steal) took more than {thr} cores (see *noise* below). Missed targets are listed with their measured value.\n"
        );
        let _ = writeln!(m, "| target | what | measured | quiet pairs / run | target | |\n|---|---|---|---|---|---|");
        for t in self.targets() {
            let _ =
                writeln!(m, "| {} | {} | {} | {} | {} | {} |", t.id, t.what, t.measured, t.quiet, t.target, met(t.met));
        }
        let _ = writeln!(m);

        let _ = writeln!(m, "## Machine\n\n| | |\n|---|---|");
        for (k, v) in machine(cluster, ctx) {
            let _ = writeln!(m, "| {k} | {v} |");
        }
        let _ = writeln!(
            m,
            "\nEverything (PostgreSQL, cellgate, the load generators) runs on this one machine over 127.0.0.1: the client's CPU competes with cellgate's and PostgreSQL's, so absolute numbers depend on the core count; ratios within a pair are the comparable figures.\n"
        );

        let _ = writeln!(m, "## Setup\n");
        let _ = writeln!(
            m,
            "- Cluster (harness): {} shard(s) × (primary + 1 streaming replica), PostgreSQL settings of the harness plus `shared_buffers = 256MB` and `client_connection_check_interval = 1s`, fsync off.",
            ctx.shards
        );
        let _ = writeln!(
            m,
            "- Data: `pgbench -i -s {}` on every primary as superuser ({} accounts), `GRANT SELECT` on the pgbench tables to `app`, then the runner waits until every replica has the rows. Commands:",
            a.scale, ctx.accounts
        );
        for c in &ctx.load_commands {
            let _ = writeln!(m, "  `PGPASSWORD=… {c}`");
        }
        let _ = writeln!(
            m,
            "- Map: shards `s0..s{}`, resolution 5, hash fallback at resolution 5 over all shards. The point read's region is ({}, {}) (Madrid); its owner is shard `s{}`, whose replica is the direct target.",
            ctx.shards - 1,
            super::setup::POINT.0,
            super::setup::POINT.1,
            ctx.owner_index
        );
        let _ = writeln!(
            m,
            "- Point read: `{}` with `aid` as the parameter. pgbench (`-S -M prepared`) and the in-process clients pick a random `aid` per request; h2load sends one fixed body file (`aid` 4242) for every request, since it cannot vary a POST body. The whole table is in shared buffers on every path.",
            super::clients::POINT_SQL
        );
        let _ = writeln!(
            m,
            "- Proxied requests: `POST /v1/sql/core/query` with `{{\"region\": {{\"lat\", \"lng\"}}, \"sql\", \"params\": [aid], \"row_format\": \"array\"}}` and `authorization: Bearer $TOKEN` (a fresh random token with the `read` and `admin` scopes; `$WORK` below is the runner's temporary directory).",
        );
        let _ = writeln!(
            m,
            "- cellgate: `{} serve --config $WORK/cellgate-<part>.toml` as a separate process with `RUST_LOG=warn`, a fresh process per part. CPU per request = (utime + stime of its /proc/<pid>/stat after − before the run) ÷ the run's requests; RSS (`VmRSS`) and open fds (entries of /proc/<pid>/fd) are sampled every 250 ms (50 ms in the streams run) and their maxima reported.",
            ctx.cellgate.replace(&args::workspace(), ".")
        );
        let _ = writeln!(
            m,
            "- Noise: during every run the runner samples the CPU time of every process that is not its own (itself, its children, the cluster's postmasters and their backends; kernel threads excluded). It also reads the hypervisor's steal time (/proc/stat). A run in which other processes plus steal took more than {thr} cores on average is marked **noisy**, and so is its pair. `load1` is /proc/loadavg at the start and end of the run (it counts our own processes too).",
        );
        let _ = writeln!(
            m,
            "- goose (`cellgate-loadtest`) is **not** part of the runner: its only scenario is the marketplace mix (70 % point reads of the 10 nearest musicians, plus area searches and writes) and it cannot select a transaction, so it cannot run \"the same point read\". h2load and the in-process hyper client stand in for it.\n"
        );

        if let Some(p) = self.pairs {
            let _ = writeln!(m, "## Pairs (G1–G3)\n");
            let _ = writeln!(
                m,
                "{} pairs, {} s per run, {} clients (pgbench `-c {c}`, h2load `-c {c} -m 1`, {c} Rust tasks), client threads {}, h2load protocol {}. Warm-up: {}. Each pair runs, in this order: **direct** pgbench, direct tokio-postgres, **proxied** h2load, proxied hyper; then, at 50 % of the pair's pgbench tps (the direct ceiling), pgbench `-R` and h2load `--rps` (per connection = total ÷ clients). For the rate-limited pgbench run the latency is the service time (pgbench's per-transaction time minus its schedule lag), which is what h2load measures.\n",
                p.pairs.len(),
                a.secs,
                a.concurrency,
                a.client_threads,
                if a.h2c { "h2c (prior knowledge)" } else { "HTTP/1.1 keep-alive (`--h1`)" },
                p.warmup,
                c = a.concurrency
            );
            let _ = writeln!(
                m,
                "cellgate config (`$WORK/cellgate-pairs.toml`, the token hash elided):\n\n```toml\n{}```\n",
                elide_hash(&p.config)
            );
            if let Some(first) = p.pairs.first() {
                let _ = writeln!(m, "Commands of pair 1 (ports are picked at run time):\n\n```");
                for r in first.runs() {
                    let _ = writeln!(m, "{}", r.command);
                }
                let _ = writeln!(m, "```\n");
            }
            let _ = writeln!(
                m,
                "| pair | path | tool | offered/s | requests | req/s | errors | p50 µs | p99 µs | p99.9 µs | cellgate CPU µs/req | cellgate RSS MiB (max) | cellgate fds (max) | noise |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for pair in &p.pairs {
                for r in pair.runs() {
                    let _ = writeln!(m, "{}", run_row(pair.idx, r, thr));
                }
            }
            let _ = writeln!(m, "\nPer-pair ratios:\n");
            let _ = writeln!(
                m,
                "| pair | G1 h2load ÷ pgbench | hyper ÷ tokio-postgres | G2 CPU µs/req (h2load) | CPU µs/req (hyper) | added p50 µs at max | G3 added p50 µs @50% | G3 p99 ratio @50% | proxied @50% reached the offered rate | noisy |\n|---|---|---|---|---|---|---|---|---|---|"
            );
            for pair in &p.pairs {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    pair.idx,
                    f2(pair.g1()),
                    f2(pair.g1_rust()),
                    f1(pair.g2()),
                    pair.hyper.cpu_us_per_req.map(f1).unwrap_or_else(|| "–".into()),
                    f0(pair.added_p50_full()),
                    f0(pair.added_p50_half()),
                    f2(pair.p99_ratio_half()),
                    if pair.half_saturated() {
                        format!(
                            "**no**: {} of {}/s (saturated)",
                            f0(pair.h2load_half.rps),
                            f0(pair.h2load_half.offered.unwrap_or(f64::NAN))
                        )
                    } else {
                        "yes".to_string()
                    },
                    if pair.noisy(thr) { "yes" } else { "no" }
                );
            }
            let med = |f: &dyn Fn(&super::Pair) -> f64| median(&p.pairs.iter().map(f).collect::<Vec<_>>());
            let sat = p.pairs.iter().filter(|x| x.half_saturated()).count();
            let _ = writeln!(
                m,
                "| **median** | **{}** | {} | **{}** | {} | {} | **{}** | **{}** | | |\n",
                f2(med(&|x| x.g1())),
                f2(med(&|x| x.g1_rust())),
                f1(med(&|x| x.g2())),
                f1(med(&|x| x.hyper.cpu_us_per_req.unwrap_or(f64::NAN))),
                f0(med(&|x| x.added_p50_full())),
                f0(med(&|x| x.added_p50_half())),
                f2(med(&|x| x.p99_ratio_half()))
            );
            if let (Some(first), Some(last)) = (p.pairs.first(), p.pairs.last()) {
                let (r0, r1) =
                    (first.pgbench.samples.rss_max_kib.unwrap_or(0), last.h2load_half.samples.rss_max_kib.unwrap_or(0));
                let served: u64 =
                    p.pairs.iter().map(|x| x.h2load.requests + x.hyper.requests + x.h2load_half.requests).sum();
                let _ = writeln!(
                    m,
                    "cellgate's RSS over the pairs: {} MiB at the first run, {} MiB at the last, after {} proxied requests ({} bytes per request retained; a steady state stays flat).\n",
                    mib(r0),
                    mib(r1),
                    served,
                    f1(r1.saturating_sub(r0) as f64 * 1024.0 / served.max(1) as f64)
                );
            }
            if sat > 0 {
                let _ = writeln!(
                    m,
                    "In {sat} of {} pairs the proxied path could not even carry half the direct ceiling (achieved < 95 % of the offered rate): its ceiling is below 50 % of pgbench's (G1 < 0.5), so its \"@50%\" latencies are those of a saturated proxy and G3 cannot be met until G1 is well above 0.5.\n",
                    p.pairs.len()
                );
            }
        }

        if let Some(s) = self.streams {
            let _ = writeln!(m, "## 100k concurrent streams (G4)\n");
            let _ = writeln!(
                m,
                "A fresh cellgate with a deliberately small pool, so nearly every stream waits inside cellgate for a connection (config, token hash elided):\n\n```toml\n{}```\n\nAfter a warm-up (`h2load -c 8 -m 8 -n 5000`, h2c) and 1 s of rest the idle RSS is read, then:\n\n```\n{}\n```\n",
                elide_hash(&s.config),
                s.command
            );
            let sm = &s.summary;
            let rows: Vec<(&str, String)> = vec![
                (
                    "requests (h2load)",
                    format!(
                        "{} total, {} started, {} done, {} succeeded, {} failed, {} errored, {} timeout",
                        sm.total, sm.started, sm.done, sm.succeeded, sm.failed, sm.errored, sm.timeout
                    ),
                ),
                ("status codes", format!("{} 2xx, {} 3xx, {} 4xx, {} 5xx", sm.s2xx, sm.s3xx, sm.s4xx, sm.s5xx)),
                ("duration, throughput", format!("{:.2} s, {} req/s", sm.secs, f0(sm.rps))),
                (
                    "latency p50 / p99 / p99.9 / max",
                    format!(
                        "{} / {} / {} / {} ms",
                        f1(s.lat.p50 / 1000.0),
                        f1(s.lat.p99 / 1000.0),
                        f1(s.lat.p999 / 1000.0),
                        f1(s.lat.max / 1000.0)
                    ),
                ),
                (
                    "peak requests in flight (client view: sweep over h2load's per-request log)",
                    s.peak_concurrency.to_string(),
                ),
                ("mean requests in flight (Little's law: req/s × mean latency)", f0(sm.rps * s.lat.mean / 1e6)),
                (
                    "idle RSS → peak RSS (max of sampled VmRSS and VmHWM)",
                    format!("{} → {} MiB", mib(s.idle_rss_kib), mib(s.peak_rss_kib)),
                ),
                (
                    "RSS per in-flight request (peak − idle) ÷ streams",
                    format!(
                        "{} bytes (÷ {}); ÷ measured peak in flight: {} bytes",
                        f0(s.bytes_per_stream()),
                        s.nominal_streams,
                        f0((s.peak_rss_kib.saturating_sub(s.idle_rss_kib)) as f64 * 1024.0
                            / s.peak_concurrency.max(1) as f64)
                    ),
                ),
                ("open fds idle → peak", format!("{} → {}", s.idle_fds, s.peak_fds)),
                ("cellgate CPU per request", format!("{} µs", s.cpu_us_per_req.map(f1).unwrap_or_else(|| "–".into()))),
                (
                    "cellgate open-file limit (soft / hard, /proc/<pid>/limits)",
                    s.nofile.as_ref().map(|(a, b)| format!("{a} / {b}")).unwrap_or_else(|| "?".into()),
                ),
                ("noise", format!("{}{}", if s.noise.cores() > thr { "**noisy**: " } else { "" }, s.noise.describe())),
            ];
            let _ = writeln!(m, "| | |\n|---|---|");
            for (k, v) in rows {
                let _ = writeln!(m, "| {k} | {v} |");
            }
            let _ = writeln!(m);
        }

        if let Some(g) = self.g7 {
            let _ = writeln!(m, "## Latency with 100k streams open (G7)\n");
            let _ = writeln!(
                m,
                "How the 100,000 open streams are made: one h2load with {} connections × {} streams sends `SELECT 1 AS x FROM pg_sleep(55)` with `consistency: \"primary\"` to the point's shard. {} of them hold the primary's pool connections, the rest wait inside cellgate for a connection (checkout and request timeouts 60 s), so they stay open for the whole measurement without costing PostgreSQL anything. Two more h2load processes (h2c) offer point reads and area searches at a fixed rate to the **replicas** (other pools): first without the parked streams (baseline), then with them, once cellgate is idle again (CPU < 0.05 cores and RSS flat for 1 s). Area search: radius {} km around the point = {}; `SELECT aid, abalance FROM pgbench_accounts WHERE aid BETWEEN $1 AND $2 ORDER BY aid` with a 10-row k-way merge.\n",
                a.streams_connections, a.streams_per_conn, a.concurrency, a.g7_radius_km, g.area_shards
            );
            let _ = writeln!(m, "```toml\n{}```\n\n```\n{}", elide_hash(&g.config), g.holder_command);
            for c in &g.with.commands {
                let _ = writeln!(m, "{c}");
            }
            let _ = writeln!(m, "```\n");
            let _ = writeln!(
                m,
                "| | point read, no parked streams | point read, 100k parked | area search, no parked streams | area search, 100k parked |\n|---|---|---|---|---|"
            );
            let loads = [&g.baseline.point, &g.with.point];
            let areas = [g.baseline.area.as_ref(), g.with.area.as_ref()];
            let cells = |f: &dyn Fn(&(H2Summary, Lat)) -> String| {
                let mut v: Vec<String> = loads.iter().map(|l| f(l)).collect();
                v.extend(areas.iter().map(|a| a.map(f).unwrap_or_else(|| "–".into())));
                v.join(" | ")
            };
            let _ = writeln!(
                m,
                "| offered req/s | {} | {} | {} | {} |",
                f0(g.offered_point),
                f0(g.offered_point),
                f0(g.offered_area),
                f0(g.offered_area)
            );
            let _ = writeln!(m, "| achieved 2xx req/s | {} |", cells(&|l| f0(l.0.s2xx as f64 / l.0.secs.max(1e-9))));
            let _ = writeln!(
                m,
                "| non-2xx / errored / timeout | {} |",
                cells(&|l| format!("{} / {} / {}", l.0.done.saturating_sub(l.0.s2xx), l.0.errored, l.0.timeout))
            );
            let _ = writeln!(m, "| p50 / p99 / p99.9 / max ms | {} |", cells(&|l| lat_ms(&l.1)));
            let _ = writeln!(m);
            for l in [&g.baseline, &g.with] {
                let _ = writeln!(
                    m,
                    "- {}: cellgate RSS max {} MiB, fds max {}; {}{}.",
                    l.tag,
                    l.samples.rss_max_kib.map(mib).unwrap_or_else(|| "–".into()),
                    l.samples.fds_max.map(|v| v.to_string()).unwrap_or_else(|| "–".into()),
                    if l.samples.noise.cores() > thr { "**noisy**: " } else { "" },
                    l.samples.noise.describe()
                );
            }
            let _ = writeln!(
                m,
                "- Parked streams: {} sent; cellgate {} after {:.1} s; RSS {} MiB before → {} MiB parked (≈ {} bytes per parked stream); holder requests that finished before the end (cellgate_requests_total on a primary or without a shard): {}; holders' h2load still running at the end: {}.\n",
                g.holders,
                if g.parked { "idle again" } else { "**still busy** (wait timed out)" },
                g.ramp_secs,
                mib(g.rss_idle_kib),
                mib(g.rss_holders_kib),
                f0(g.rss_holders_kib.saturating_sub(g.rss_idle_kib) as f64 * 1024.0 / g.holders as f64),
                g.holders_finished,
                if g.holders_alive { "yes" } else { "**no**" },
            );
        }

        let svg_name = rel_file(&a.out, &a.svg);
        let _ = writeln!(m, "## Chart\n\n![point-read latency, direct vs proxied]({svg_name})\n");
        (m, self.chart())
    }
}

fn lat_ms(l: &Lat) -> String {
    format!("{} / {} / {} / {}", f2(l.p50 / 1000.0), f2(l.p99 / 1000.0), f2(l.p999 / 1000.0), f2(l.max / 1000.0))
}

/// The commands that reproduce this invocation, as a fenced block.
pub(super) fn command_block(ctx: &Ctx) -> String {
    format!(
        "```\ncargo build --release -p cellgate\n{}cargo run --release -p cellgate-loadtest --bin cellgate-bench --{}{}\n```\n",
        std::env::var("CELLGATE_BIN")
            .ok()
            .filter(|b| !b.is_empty())
            .map(|b| format!("CELLGATE_BIN={b} "))
            .unwrap_or_default(),
        if ctx.argv.is_empty() { "" } else { " " },
        ctx.argv.join(" ").replace(&args::workspace(), ".")
    )
}

pub(super) fn elide_hash(config: &str) -> String {
    config
        .lines()
        .map(|l| if l.starts_with("sha256 = ") { "sha256 = \"…\"".to_string() } else { l.to_string() })
        .map(|l| {
            // The map path is in the temporary work directory.
            match l.strip_prefix("map = { path = \"") {
                Some(rest) => format!("map = {{ path = \"$WORK/{}", rest.rsplit_once('/').map_or(rest, |(_, f)| f)),
                None => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `other` relative to the directory of `md` when it is in the same directory, else as given.
pub(super) fn rel_file(md: &Path, other: &Path) -> String {
    match (md.parent(), other.parent(), other.file_name()) {
        (Some(a), Some(b), Some(f)) if a == b => f.to_string_lossy().to_string(),
        _ => other.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00 UTC");
        assert_eq!(utc(UNIX_EPOCH + Duration::from_secs(1_700_000_000)), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn config_is_shown_without_secrets() {
        let c = "map = { path = \"/tmp/x/map.toml\", watch = false }\nsha256 = \"abc\"\n";
        assert_eq!(elide_hash(c), "map = { path = \"$WORK/map.toml\", watch = false }\nsha256 = \"…\"\n");
        assert_eq!(rel_file(Path::new("docs/a.md"), Path::new("docs/b.svg")), "b.svg");
    }
}
