//! The TLS part (`--tls`, issue 14 "Measure"): the same proxied point read in four variants —
//! (a) cleartext on both sides, (b) HTTPS from the client only, (c) TLS to PostgreSQL only
//! (verify-full), (d) both — in rotated order within each pair, each as a ratio to (a) of the same
//! pair; plus new connections per request (h2load `--h1` with `connection: close`) against the
//! cleartext and the HTTPS listener, for TLS handshakes per second per core of cellgate.
//!
//! Certificates are made here (rcgen, ECDSA P-256): one CA, one leaf for `localhost` and
//! `127.0.0.1` that serves both PostgreSQL (`ssl = on`, keys 0600 in each data directory) and
//! cellgate's HTTPS listener (key 0600 in the work directory). The cluster keeps its pg_hba
//! (`host`, which accepts TLS and cleartext), so the cleartext variants connect with
//! `sslmode=disable` and the TLS ones with `sslmode=verify-full` to the same nodes.

use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellgate_harness::{Cluster, Node};

use super::procs::{self, Samples};
use super::report::{self, command_block, elide_hash, f0, f1, f2, machine, met, mib};
use super::setup::{self, Cellgate, Profile};
use super::stats::{self, H2Conn, median};
use super::{Ctx, Run, h2_run, measure, per_req, say, tools};

/// The issue's target: TLS on both sides keeps ≥ 85 % of cleartext keep-alive throughput.
pub const TARGET_BOTH: f64 = 0.85;

/// One of the four variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub key: &'static str,
    pub name: &'static str,
    pub tool: &'static str,
    pub https: bool,
    pub pg_tls: bool,
}

pub const VARIANTS: [Variant; 4] = [
    Variant { key: "a", name: "cleartext both sides", tool: "h2load (a) cleartext", https: false, pg_tls: false },
    Variant { key: "b", name: "HTTPS client side only", tool: "h2load (b) HTTPS", https: true, pg_tls: false },
    Variant { key: "c", name: "TLS to PostgreSQL only", tool: "h2load (c) PG TLS", https: false, pg_tls: true },
    Variant { key: "d", name: "TLS on both sides", tool: "h2load (d) both", https: true, pg_tls: true },
];

/// One keep-alive run of a variant.
#[derive(Debug, Clone)]
pub struct VRun {
    pub run: Run,
    /// Position in the pair's order (1-based).
    pub position: usize,
    /// CPU of the replica's postmaster and backends per request, µs.
    pub replica_us_per_req: Option<f64>,
    /// Busy CPU of the whole machine per request (h2load, cellgate, PostgreSQL, everyone), µs.
    pub machine_us_per_req: Option<f64>,
    pub secs: f64,
    pub cpu_us: Option<f64>,
}

impl VRun {
    /// cellgate cores used: CPU seconds ÷ wall seconds.
    pub fn cores(&self) -> f64 {
        self.cpu_us.map(|c| c / 1e6 / self.secs.max(1e-9)).unwrap_or(f64::NAN)
    }
}

/// One run with a new connection per request.
#[derive(Debug, Clone)]
pub struct Handshakes {
    pub https: bool,
    pub position: usize,
    pub succeeded: u64,
    pub done: u64,
    pub errors: u64,
    pub secs: f64,
    pub cpu_us: Option<f64>,
    pub samples: Samples,
    pub command: String,
    pub conn: H2Conn,
}

impl Handshakes {
    /// New connections (each with one request) per second.
    pub fn per_sec(&self) -> f64 {
        self.succeeded as f64 / self.secs.max(1e-9)
    }
    /// cellgate cores used.
    pub fn cores(&self) -> f64 {
        self.cpu_us.map(|c| c / 1e6 / self.secs.max(1e-9)).unwrap_or(f64::NAN)
    }
    /// Connections per second per cellgate core = connections ÷ cellgate CPU seconds.
    pub fn per_core(&self) -> f64 {
        self.per_sec() / self.cores()
    }
    /// cellgate CPU per connection (accept, handshake if any, one point read, close), µs.
    pub fn us_per_conn(&self) -> f64 {
        self.cpu_us.map(|c| c / self.done.max(1) as f64).unwrap_or(f64::NAN)
    }
}

#[derive(Debug, Clone)]
pub struct TlsPair {
    pub idx: usize,
    /// Indexes into [`VARIANTS`] in the order they ran.
    pub order: Vec<usize>,
    /// By variant index.
    pub runs: Vec<VRun>,
    pub hs_plain: Handshakes,
    pub hs_tls: Handshakes,
}

impl TlsPair {
    pub fn rps_ratio(&self, v: usize) -> f64 {
        self.runs[v].run.rps / self.runs[0].run.rps
    }
    pub fn cpu_ratio(&self, v: usize) -> f64 {
        self.runs[v].run.cpu_us_per_req.unwrap_or(f64::NAN) / self.runs[0].run.cpu_us_per_req.unwrap_or(f64::NAN)
    }
    pub fn machine_ratio(&self, v: usize) -> f64 {
        self.runs[v].machine_us_per_req.unwrap_or(f64::NAN) / self.runs[0].machine_us_per_req.unwrap_or(f64::NAN)
    }
    pub fn noisy(&self, thr: f64) -> bool {
        self.runs.iter().any(|r| r.run.noisy(thr))
            || self.hs_plain.samples.noise.cores() > thr
            || self.hs_tls.samples.noise.cores() > thr
    }
    /// Extra cellgate CPU of a TLS handshake: per connection over HTTPS − per cleartext connection.
    pub fn handshake_extra_us(&self) -> f64 {
        self.hs_tls.us_per_conn() - self.hs_plain.us_per_conn()
    }
}

pub struct TlsOut {
    pub pairs: Vec<TlsPair>,
    /// (variant key, config text) of the four cellgates.
    pub configs: Vec<(&'static str, String)>,
    pub plain_params: String,
    pub tls_params: String,
    /// What h2load negotiated with each variant (preflight).
    pub conns: Vec<H2Conn>,
    /// `pg_stat_ssl` of the app sessions on the point's shard, one line per node and application.
    pub sessions: Vec<String>,
    pub warmup: String,
    pub handshake_preflight: String,
    /// Connections per measured run: cleartext, HTTPS.
    pub hs_n: [u64; 2],
    pub cert: String,
}

/// Write `text` to a new file with mode 0600.
pub(super) fn write_private(path: &Path, text: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a leaf for `localhost` / `127.0.0.1` (ECDSA P-256 keys, rcgen's default), written to
/// `dir`: `ca.pem`, `server.crt`, `server.key` (0600).
pub fn make_pki(dir: &Path) -> Result<Pki, String> {
    let e = |e: rcgen::Error| format!("certificates: {e}");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "cellgate-bench CA");
    let ca_key = rcgen::KeyPair::generate().map_err(e)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).map_err(e)?;
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &issuer).map_err(e)?;
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).map_err(|e| format!("{}: {e}", pki.ca.display()))?;
    std::fs::write(&pki.cert, &pki.cert_pem).map_err(|e| format!("{}: {e}", pki.cert.display()))?;
    write_private(&pki.key, &pki.key_pem)?;
    Ok(pki)
}

/// `ssl = on` with the leaf in the node's data directory (0600, owned like the directory: the
/// postgres user when the runner is root). pg_hba stays as the harness wrote it (`host` lines
/// accept TLS and cleartext). Works on standbys too (ALTER SYSTEM is not WAL-logged).
fn enable_ssl(node: &Node, pki: &Pki) -> Result<(), String> {
    let meta = std::fs::metadata(&node.data_dir).map_err(|e| format!("{}: {e}", node.data_dir.display()))?;
    for (name, text) in [("server.crt", &pki.cert_pem), ("server.key", &pki.key_pem)] {
        let path = node.data_dir.join(name);
        write_private(&path, text)?;
        std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
    }
    node.psql(
        "postgres",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'; ALTER SYSTEM SET ssl_key_file = 'server.key'; \
         ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf()",
    )
    .map_err(|e| format!("{}: ssl = on: {e}", node.name))?;
    let t = Instant::now();
    loop {
        match node.psql("postgres", "SHOW ssl") {
            Ok(v) if v.trim() == "on" => return Ok(()),
            got if t.elapsed() > Duration::from_secs(10) => {
                return Err(format!("{}: ssl not on after 10 s ({got:?}):\n{}", node.name, node.log_tail(20)));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The runner's map with `params` on every connection string, reaching the nodes via `host`.
fn map_with(map: &str, host: &str, params: &str) -> String {
    map.replace("@127.0.0.1:", &format!("@{host}:")).replace("/core\"", &format!("/core?{params}\""))
}

/// `pg_stat_ssl` of every app session on the nodes of the point's shard, attributed to the four
/// cellgates by client port (cellgate sets `application_name = cellgate` on every connection).
/// Fails if a cleartext variant has a TLS session or a TLS variant a cleartext one.
fn sessions(cluster: &Cluster, owner: usize, cgs: &[Cellgate]) -> Result<Vec<String>, String> {
    let ports: Vec<std::collections::HashSet<u16>> = cgs.iter().map(|c| procs::tcp_local_ports(c.pid())).collect();
    let mut out = Vec::new();
    for node in cluster.shards[owner].nodes() {
        let rows = node
            .psql(
                "postgres",
                "SELECT client_port, ssl, coalesce(version || ' ' || cipher, '') \
                 FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE usename = 'app' AND client_port IS NOT NULL",
            )
            .map_err(|e| format!("{}: pg_stat_ssl: {e}", node.name))?;
        // Per variant: (TLS sessions, all sessions, versions and ciphers seen).
        let mut per: Vec<(u64, u64, Vec<String>)> = vec![(0, 0, Vec::new()); VARIANTS.len()];
        for row in rows.lines() {
            let f: Vec<&str> = row.split('|').collect();
            let (Some(port), Some(ssl)) = (f.first().and_then(|p| p.parse::<u16>().ok()), f.get(1)) else {
                continue;
            };
            let Some(v) = ports.iter().position(|p| p.contains(&port)) else { continue };
            let tls = *ssl == "t";
            per[v].1 += 1;
            if tls {
                per[v].0 += 1;
                let what = f.get(2).unwrap_or(&"").to_string();
                if !per[v].2.contains(&what) {
                    per[v].2.push(what);
                }
            }
        }
        for (v, (tls, total, what)) in VARIANTS.iter().zip(per) {
            if total == 0 {
                continue;
            }
            if (v.pg_tls && tls != total) || (!v.pg_tls && tls != 0) {
                return Err(format!(
                    "{}: cellgate ({}) has {tls} of {total} sessions over TLS; the variant would not measure what it says",
                    node.name, v.key
                ));
            }
            out.push(format!(
                "{}: cellgate ({}) {tls} of {total} sessions over TLS{}",
                node.name,
                v.key,
                if what.is_empty() { String::new() } else { format!(" ({})", what.join(", ")) }
            ));
        }
    }
    for v in VARIANTS.iter().filter(|v| v.pg_tls) {
        if !out.iter().any(|l| l.contains(&format!("({}) ", v.key)) && !l.contains(" 0 of ")) {
            return Err(format!("no TLS session of cellgate ({}) on the point's shard (pg_stat_ssl)", v.key));
        }
    }
    Ok(out)
}

pub async fn run_tls(ctx: &Ctx, cluster: &Cluster) -> Result<TlsOut, String> {
    let a = &ctx.args;
    let dir = ctx.work.join("tls");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pki = make_pki(&dir)?;
    say("tls: ssl = on on every PostgreSQL node (certificates made by the runner)");
    for node in cluster.nodes() {
        enable_ssl(node, &pki)?;
    }
    let map = std::fs::read_to_string(&ctx.map).map_err(|e| format!("{}: {e}", ctx.map.display()))?;
    let plain_params = "sslmode=disable".to_string();
    let tls_params = format!("sslmode=verify-full&sslrootcert={}", pki.ca.display());
    let plain_map = ctx.work.join("map-tls-plain.toml");
    let tls_map = ctx.work.join("map-tls-pg.toml");
    std::fs::write(&plain_map, map_with(&map, "127.0.0.1", &plain_params)).map_err(|e| e.to_string())?;
    std::fs::write(&tls_map, map_with(&map, "localhost", &tls_params)).map_err(|e| e.to_string())?;

    let names = ["tls-a", "tls-b", "tls-c", "tls-d"];
    let mut cgs: Vec<Cellgate> = Vec::new();
    for (v, name) in VARIANTS.iter().zip(names) {
        let profile = Profile {
            name,
            pool_max: a.concurrency,
            max_in_flight: 100_000,
            request_timeout_ms: 5000,
            checkout_timeout_ms: 2000,
        };
        let m = if v.pg_tls { &tls_map } else { &plain_map };
        let tls = v.https.then_some((pki.cert.as_path(), pki.key.as_path()));
        cgs.push(setup::start_cellgate_with(&ctx.cellgate, &ctx.work, m, &profile, &ctx.hash, tls)?);
    }
    say("tls: 4 cellgates up: (a) cleartext, (b) HTTPS listener, (c) verify-full to PostgreSQL, (d) both");
    let body = ctx.body("point.json", &super::clients::point_body(setup::POINT.0, setup::POINT.1, 4242))?;
    let c = a.concurrency;
    let h2 = |cg: &Cellgate, secs: Option<u64>, n: Option<u64>, h1: bool, headers: Vec<String>, log: Option<&str>| {
        tools::H2load {
            bin: &ctx.h2load,
            url: ctx.url(cg),
            body: body.clone(),
            token: &ctx.token,
            clients: if n.is_some_and(|n| n < c as u64) { 1 } else { c },
            streams: 1,
            threads: a.client_threads,
            h1,
            headers,
            secs,
            requests: n,
            rps_per_client: None,
            log: log.map(|l| ctx.work.join(l)),
            limit: Duration::from_secs(secs.unwrap_or(3 * a.secs + 30) + 60),
        }
    };
    let close = || vec!["connection: close".to_string()];
    // Preflight: every variant answers 20 of 20 with 2xx, and h2load says what it negotiated.
    let mut conns = Vec::new();
    for (v, cg) in VARIANTS.iter().zip(&cgs) {
        let r = h2(cg, None, Some(20), !a.h2c, Vec::new(), None).run().await?;
        if r.summary.s2xx != 20 {
            return Err(format!(
                "tls preflight ({}) {}: {} of 20 2xx\n{}\n{}",
                v.key,
                v.name,
                r.summary.s2xx,
                r.stdout,
                cg.log_tail()
            ));
        }
        conns.push(stats::parse_h2load_conn(&r.stdout));
    }
    // A new connection per request must really work (h2load reconnects after `connection: close`).
    let r = h2(&cgs[1], None, Some(20), true, close(), None).run().await?;
    if r.summary.s2xx != 20 {
        return Err(format!("tls handshake preflight: {} of 20 2xx over 20 connections\n{}", r.summary.s2xx, r.stdout));
    }
    let handshake_preflight = format!(
        "`h2load --h1 -c 1 -n 20 -H \"connection: close\"` against (b) answered {} of 20 requests with 2xx from one client, so h2load opened a new connection (and TLS handshake) for each of them",
        r.summary.s2xx
    );
    say("tls: warm-up (2 s per variant)");
    for cg in &cgs {
        h2(cg, Some(2), None, !a.h2c, Vec::new(), None).run().await?;
    }
    let sessions = sessions(cluster, ctx.owner_index, &cgs)?;
    // New connection per request: h2load 1.52 does not stop a timed run (-D) whose clients
    // reconnect after `connection: close`, so these runs are counted (-n). A 2,000-connection
    // warm-up per listener gives the rate; each measured run then asks for about --secs of it.
    let mut hs_n = [0u64; 2];
    for (k, cg) in [&cgs[0], &cgs[1]].into_iter().enumerate() {
        let r = h2(cg, None, Some(2000), true, close(), None).run().await?;
        let rate = r.summary.succeeded as f64 / r.summary.secs.max(1e-3);
        let n = (rate * a.secs as f64).clamp(1000.0, 500_000.0) as u64;
        hs_n[k] = n.div_ceil(c as u64) * c as u64;
    }
    say(&format!(
        "tls: new connection per request: {} (cleartext) and {} (HTTPS) connections per measured run",
        hs_n[0], hs_n[1]
    ));
    let replica = cluster.shards[ctx.owner_index].replicas[0].pid();
    let replica_cpu = || replica.and_then(procs::tree_cpu_us);
    let iv = Duration::from_millis(250);
    let mut pairs = Vec::new();
    for i in 1..=a.pairs {
        let order: Vec<usize> = (0..4).map(|k| (k + i - 1) % 4).collect();
        say(&format!(
            "tls pair {i}/{}: keep-alive, order {}",
            a.pairs,
            order.iter().map(|&v| VARIANTS[v].key).collect::<Vec<_>>().join(" ")
        ));
        let mut runs: Vec<Option<VRun>> = vec![None, None, None, None];
        for (pos, &v) in order.iter().enumerate() {
            let cg = &cgs[v];
            let tool = h2(cg, Some(a.secs), None, !a.h2c, Vec::new(), Some("tls-h2.log"));
            let (rep0, box0) = (replica_cpu(), procs::machine_busy_us());
            let (r, cpu, s) = measure(ctx, Some(cg), iv, tool.run()).await?;
            let (rep1, box1) = (replica_cpu(), procs::machine_busy_us());
            let run = h2_run(VARIANTS[v].tool, None, &r, cpu, s, ctx.show(&ctx.h2load, &r.args));
            runs[v] = Some(VRun {
                position: pos + 1,
                replica_us_per_req: per_req(rep0.zip(rep1).map(|(x, y)| y - x), r.summary.done),
                machine_us_per_req: per_req(box0.zip(box1).map(|(x, y)| y - x), r.summary.done),
                secs: r.summary.secs,
                cpu_us: cpu,
                run,
            });
        }
        let runs: Vec<VRun> =
            runs.into_iter().map(|r| r.ok_or("tls: a variant did not run")).collect::<Result<_, _>>()?;
        // New connection per request: cleartext listener (a) and HTTPS listener (b), alternating
        // which goes first.
        let hs_order = if i % 2 == 1 { [false, true] } else { [true, false] };
        let (mut hs_plain, mut hs_tls) = (None, None);
        for (pos, https) in hs_order.into_iter().enumerate() {
            say(&format!(
                "tls pair {i}/{}: a new connection per request, {}",
                a.pairs,
                if https { "HTTPS" } else { "cleartext" }
            ));
            let cg = &cgs[if https { 1 } else { 0 }];
            let tool = h2(cg, None, Some(hs_n[usize::from(https)]), true, close(), None);
            let (r, cpu, s) = measure(ctx, Some(cg), iv, tool.run()).await?;
            let h = Handshakes {
                https,
                position: pos + 1,
                succeeded: r.summary.succeeded,
                done: r.summary.done,
                errors: r.summary.failed + r.summary.errored + r.summary.timeout,
                secs: r.summary.secs,
                cpu_us: cpu,
                samples: s,
                command: ctx.show(&ctx.h2load, &r.args),
                conn: stats::parse_h2load_conn(&r.stdout),
            };
            if https { hs_tls = Some(h) } else { hs_plain = Some(h) }
        }
        let pair = TlsPair {
            idx: i,
            order,
            runs,
            hs_plain: hs_plain.ok_or("tls: cleartext connection run missing")?,
            hs_tls: hs_tls.ok_or("tls: HTTPS connection run missing")?,
        };
        say(&format!(
            "tls pair {i}: req/s ÷ (a): b {:.2}, c {:.2}, d {:.2}; handshakes/s/core {:.0}{}",
            pair.rps_ratio(1),
            pair.rps_ratio(2),
            pair.rps_ratio(3),
            pair.hs_tls.per_core(),
            if pair.noisy(a.noise_threshold) { " (noisy)" } else { "" }
        ));
        pairs.push(pair);
    }
    let configs = VARIANTS.iter().zip(&cgs).map(|(v, cg)| (v.key, cg.config.clone())).collect();
    drop(cgs);
    Ok(TlsOut {
        pairs,
        configs,
        plain_params,
        tls_params,
        conns,
        sessions,
        warmup: "h2load, 2 s per variant, same options, not recorded".into(),
        handshake_preflight,
        hs_n,
        cert: "one CA and one leaf for `localhost` and `127.0.0.1` made by the runner with rcgen, ECDSA P-256 keys (rcgen's default), the leaf alone as the chain; the same leaf and key serve PostgreSQL and cellgate's HTTPS listener; key files mode 0600".into(),
    })
}

/// Medians of a per-pair value over all pairs and over the quiet ones.
fn med(t: &TlsOut, thr: f64, f: &dyn Fn(&TlsPair) -> f64) -> (f64, Option<f64>, usize) {
    let all: Vec<f64> = t.pairs.iter().map(f).collect();
    let quiet: Vec<f64> = t.pairs.iter().filter(|p| !p.noisy(thr)).map(f).collect();
    let q = (quiet.len() != all.len() && !quiet.is_empty()).then(|| median(&quiet));
    (median(&all), q, quiet.len())
}

pub fn summary_lines(ctx: &Ctx, t: &TlsOut) -> Vec<String> {
    let thr = ctx.args.noise_threshold;
    let (both, _, _) = med(t, thr, &|p| p.rps_ratio(3));
    let (hs, _, _) = med(t, thr, &|p| p.hs_tls.per_core());
    vec![
        format!(
            "TLS both sides ÷ cleartext, keep-alive req/s (median of {} pairs): {} (target ≥ {TARGET_BOTH}) {}",
            t.pairs.len(),
            f2(both),
            met(both.is_finite().then_some(both >= TARGET_BOTH))
        ),
        format!("TLS handshakes (new connection + one point read) per second per cellgate core: {}", f0(hs)),
    ]
}

fn quiet_note(q: Option<f64>, n: usize, fmt: fn(f64) -> String) -> String {
    match q {
        Some(v) => format!("{} ({n} quiet pairs)", fmt(v)),
        None if n == 0 => "– (every pair noisy)".into(),
        None => "same (no noisy pair)".into(),
    }
}

pub fn render(ctx: &Ctx, cluster: &Cluster, t: &TlsOut, elapsed: Duration) -> String {
    let a = &ctx.args;
    let thr = a.noise_threshold;
    let work = ctx.work.display().to_string();
    let unwork = |s: &str| s.replace(&work, "$WORK");
    let mut m = String::new();
    let _ = writeln!(m, "# Performance runner: TLS variants\n");
    let _ = writeln!(
        m,
        "Generated by `cellgate-bench --tls` (`loadtest/src/bench/tls.rs`, see `loadtest/bench/README.md`) on {}; the whole invocation took {:.0} s. Rerun it to refresh this file; do not edit by hand. Hand-written analysis lives in `docs/performance.md` (*TLS*).\n",
        report::utc(ctx.started),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(m, "{}", command_block(ctx));

    // Targets and headline figures.
    let (both, both_q, nq) = med(t, thr, &|p| p.rps_ratio(3));
    let _ = writeln!(m, "## Result\n");
    let _ = writeln!(
        m,
        "Medians of the per-pair values; \"quiet pairs\" repeats them without the pairs in which other programs (or hypervisor steal) took more than {thr} cores during any of the pair's runs.\n"
    );
    let _ = writeln!(m, "| what | measured | quiet pairs | target | |\n|---|---|---|---|---|");
    let _ = writeln!(
        m,
        "| (d) TLS on both sides: keep-alive point reads/s ÷ (a) cleartext, same pair | {} | {} | ≥ {TARGET_BOTH} (≤ 15 % lost) | {} |",
        f2(both),
        quiet_note(both_q, nq, f2),
        met(both.is_finite().then_some(both >= TARGET_BOTH))
    );
    for (v, what) in [(1, "(b) HTTPS client side only ÷ (a)"), (2, "(c) TLS to PostgreSQL only ÷ (a)")] {
        let (x, q, n) = med(t, thr, &|p| p.rps_ratio(v));
        let _ = writeln!(m, "| {what}, req/s | {} | {} | – | |", f2(x), quiet_note(q, n, f2));
    }
    for (v, what) in [(1, "(b)"), (2, "(c)"), (3, "(d)")] {
        let (x, q, n) = med(t, thr, &|p| p.cpu_ratio(v));
        let _ =
            writeln!(m, "| {what} cellgate CPU µs per request ÷ (a) | {} | {} | – | |", f2(x), quiet_note(q, n, f2));
    }
    let (x, q, n) = med(t, thr, &|p| p.machine_ratio(3));
    let _ = writeln!(
        m,
        "| (d) machine CPU µs per request ÷ (a) (every process on the box, h2load's TLS included) | {} | {} | – | |",
        f2(x),
        quiet_note(q, n, f2)
    );
    let (hs, hs_q, n) = med(t, thr, &|p| p.hs_tls.per_core());
    let _ = writeln!(
        m,
        "| TLS handshakes per second per cellgate core (HTTPS listener, a new connection per request, each with one point read) | {} | {} | – | |",
        f0(hs),
        quiet_note(hs_q, n, f0)
    );
    let (pc, pc_q, n) = med(t, thr, &|p| p.hs_plain.per_core());
    let _ = writeln!(
        m,
        "| same against the cleartext listener (TCP connections per second per core, no TLS) | {} | {} | – | |",
        f0(pc),
        quiet_note(pc_q, n, f0)
    );
    let (ex, ex_q, n) = med(t, thr, &|p| p.handshake_extra_us());
    let _ = writeln!(
        m,
        "| cellgate CPU of one TLS handshake, µs (CPU per HTTPS connection − per cleartext connection) | {} | {} | – | |\n",
        f0(ex),
        quiet_note(ex_q, n, f0)
    );

    let _ = writeln!(m, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in machine(cluster, ctx) {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    let _ = writeln!(
        m,
        "\nEverything (PostgreSQL, four cellgates of which one is loaded at a time, h2load) runs on this one machine over 127.0.0.1; h2load's own TLS work competes with cellgate's and PostgreSQL's for the same cores. Ratios within a pair are the comparable figures.\n"
    );

    let _ = writeln!(m, "## Setup\n");
    let _ = writeln!(
        m,
        "- Cluster, data, map and point read as in `docs/performance-runner.md` (*Setup*): {} shard(s) × (primary + 1 streaming replica), `pgbench -i -s {}`, the point read `{}` with `aid` 4242 in h2load's body file, to the replica of shard `s{}`. The TLS part runs after the other parts of an invocation: it turns `ssl = on` on every node (`ALTER SYSTEM` + reload; pg_hba unchanged, its `host` lines accept TLS and cleartext alike).",
        ctx.shards,
        a.scale,
        super::clients::POINT_SQL,
        ctx.owner_index
    );
    let _ = writeln!(m, "- Certificates: {}.", t.cert);
    let _ = writeln!(
        m,
        "- Four cellgates run side by side (only one is loaded at a time; the others idle with their pools open):\n  - (a) cleartext listener, map with `?{}`\n  - (b) HTTPS listener (`[listen.data_tls]`), same cleartext map\n  - (c) cleartext listener, map with `?{}` and the hosts written `localhost` (the certificate's name)\n  - (d) HTTPS listener and the verify-full map",
        t.plain_params,
        unwork(&t.tls_params)
    );
    let proto = if a.h2c {
        "HTTP/2 on every variant: h2c with prior knowledge in cleartext, h2 negotiated by ALPN over TLS".to_string()
    } else {
        "HTTP/1.1 keep-alive on every variant (`--h1`; over TLS h2load then offers ALPN `http/1.1`), so the only difference between (a) and (b) is TLS".to_string()
    };
    let _ = writeln!(m, "- Client protocol: {proto}. What h2load negotiated (preflight):");
    for (v, c) in VARIANTS.iter().zip(&t.conns) {
        let _ = writeln!(m, "  - ({}) {}: {}", v.key, v.name, c.describe());
    }
    let _ = writeln!(
        m,
        "- TLS to PostgreSQL, checked in `pg_stat_ssl` after the warm-up (the `app` sessions on the point's shard, attributed to the cellgates by client port):"
    );
    for s in &t.sessions {
        let _ = writeln!(m, "  - {s}");
    }
    let _ = writeln!(
        m,
        "- Pairs: {} pairs; in each, the four variants run for {} s each with {} connections × 1 request in flight (`-c {} -m 1`, client threads {}), in rotated order (pair 1: a b c d, pair 2: b c d a, …). Warm-up: {}. cellgate CPU per request = utime+stime delta of the loaded cellgate ÷ the run's requests; replica CPU per request = the same for the replica's postmaster and all its backends (the server side of TLS to PostgreSQL); machine CPU per request = busy time of all cores (/proc/stat: user, nice, system, irq, softirq) ÷ requests, which includes h2load's own TLS work and whatever else ran.",
        t.pairs.len(),
        a.secs,
        a.concurrency,
        a.concurrency,
        a.client_threads,
        t.warmup
    );
    let _ = writeln!(
        m,
        "- Handshakes: after the four keep-alive runs, each pair runs h2load with `--h1 -c {} -H \"connection: close\"` against the cleartext listener of (a) and against the HTTPS listener of (b) (alternating which goes first): cellgate answers and closes, h2load opens a new connection for the next request, so every request costs one TCP connection and, on (b), one full TLS handshake (h2load does not resume TLS sessions: it never calls `SSL_set_session`). {}. The runs are counted, not timed (h2load 1.52 does not end a `-D` run whose clients reconnect): a 2,000-connection warm-up per listener gives its rate, and each measured run asks for about {} s of it ({} cleartext, {} HTTPS connections). Handshakes per second per core = connections per second ÷ cellgate cores used (cellgate CPU seconds ÷ wall seconds) = connections ÷ cellgate CPU seconds; it includes the one point read each connection carries, which the cleartext row shows on its own.\n",
        a.concurrency, t.handshake_preflight, a.secs, t.hs_n[0], t.hs_n[1]
    );
    let _ = writeln!(
        m,
        "cellgate config of (d) (`$WORK/cellgate-tls-d.toml`, the token hash elided; (a)–(c) differ only in the map and the `[listen.data_tls]` table):\n"
    );
    if let Some((_, cfg)) = t.configs.iter().find(|(k, _)| *k == "d") {
        let _ = writeln!(m, "```toml\n{}```\n", unwork(&elide_hash(cfg)));
    }
    if let Some(first) = t.pairs.first() {
        let _ = writeln!(m, "Commands of pair 1 (ports are picked at run time):\n\n```");
        for &v in &first.order {
            let _ = writeln!(m, "{}", unwork(&first.runs[v].run.command));
        }
        for h in hs_in_order(first) {
            let _ = writeln!(m, "{}", unwork(&h.command));
        }
        let _ = writeln!(m, "```\n");
    }

    let _ = writeln!(m, "## Keep-alive runs\n");
    let _ = writeln!(
        m,
        "| pair | variant | ran | requests | req/s | errors | p50 µs | p99 µs | p99.9 µs | cellgate CPU µs/req | cellgate cores | replica CPU µs/req | machine CPU µs/req | cellgate RSS MiB (max) | noise |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &t.pairs {
        for (v, r) in VARIANTS.iter().zip(&p.runs) {
            let _ = writeln!(
                m,
                "| {} | ({}) {} | {}. | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
                p.idx,
                v.key,
                v.name,
                r.position,
                r.run.requests,
                f0(r.run.rps),
                r.run.errors,
                f0(r.run.lat.p50),
                f0(r.run.lat.p99),
                f0(r.run.lat.p999),
                r.run.cpu_us_per_req.map(f1).unwrap_or_else(|| "–".into()),
                f2(r.cores()),
                r.replica_us_per_req.map(f1).unwrap_or_else(|| "–".into()),
                r.machine_us_per_req.map(f1).unwrap_or_else(|| "–".into()),
                r.run.samples.rss_max_kib.map(mib).unwrap_or_else(|| "–".into()),
                if r.run.noisy(thr) { "**noisy**: " } else { "" },
                r.run.samples.noise.describe()
            );
        }
    }
    let _ = writeln!(m, "\nPer-pair ratios to (a) of the same pair:\n");
    let _ = writeln!(
        m,
        "| pair | order | (b) req/s | (c) req/s | (d) req/s | (b) cellgate CPU/req | (c) cellgate CPU/req | (d) cellgate CPU/req | (b) machine CPU/req | (c) machine CPU/req | (d) machine CPU/req | noisy |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &t.pairs {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.idx,
            p.order.iter().map(|&v| VARIANTS[v].key).collect::<Vec<_>>().join(" "),
            f2(p.rps_ratio(1)),
            f2(p.rps_ratio(2)),
            f2(p.rps_ratio(3)),
            f2(p.cpu_ratio(1)),
            f2(p.cpu_ratio(2)),
            f2(p.cpu_ratio(3)),
            f2(p.machine_ratio(1)),
            f2(p.machine_ratio(2)),
            f2(p.machine_ratio(3)),
            if p.noisy(thr) { "yes" } else { "no" }
        );
    }
    let mm = |f: &dyn Fn(&TlsPair) -> f64| f2(med(t, thr, f).0);
    let _ = writeln!(
        m,
        "| **median** | | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | |\n",
        mm(&|p| p.rps_ratio(1)),
        mm(&|p| p.rps_ratio(2)),
        mm(&|p| p.rps_ratio(3)),
        mm(&|p| p.cpu_ratio(1)),
        mm(&|p| p.cpu_ratio(2)),
        mm(&|p| p.cpu_ratio(3)),
        mm(&|p| p.machine_ratio(1)),
        mm(&|p| p.machine_ratio(2)),
        mm(&|p| p.machine_ratio(3)),
    );

    let _ = writeln!(m, "## A new connection per request (handshakes)\n");
    let _ = writeln!(
        m,
        "| pair | listener | ran | connections (= requests, 2xx) | errors | connections/s | cellgate CPU s | cellgate cores | connections/s per core | cellgate CPU µs per connection | negotiated | noise |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &t.pairs {
        for h in [&p.hs_plain, &p.hs_tls] {
            let _ = writeln!(
                m,
                "| {} | {} | {}. | {} | {} | {} | {} | {} | **{}** | {} | {} | {}{} |",
                p.idx,
                if h.https { "HTTPS (b)" } else { "cleartext (a)" },
                h.position,
                h.succeeded,
                h.errors,
                f0(h.per_sec()),
                h.cpu_us.map(|c| f2(c / 1e6)).unwrap_or_else(|| "–".into()),
                f2(h.cores()),
                f0(h.per_core()),
                f0(h.us_per_conn()),
                h.conn.describe(),
                if h.samples.noise.cores() > thr { "**noisy**: " } else { "" },
                h.samples.noise.describe()
            );
        }
    }
    let _ = writeln!(
        m,
        "\nPer pair, cellgate CPU of one TLS handshake (µs per HTTPS connection − µs per cleartext connection): {}; median {} µs.\n",
        t.pairs.iter().map(|p| format!("pair {} {}", p.idx, f0(p.handshake_extra_us()))).collect::<Vec<_>>().join(", "),
        f0(med(t, thr, &|p| p.handshake_extra_us()).0)
    );
    m
}

fn hs_in_order(p: &TlsPair) -> [&Handshakes; 2] {
    if p.hs_plain.position == 1 { [&p.hs_plain, &p.hs_tls] } else { [&p.hs_tls, &p.hs_plain] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_get_the_parameters_on_every_url() {
        let map = "[[shards]]\nprimary = \"postgres://app:pw@127.0.0.1:5432/core\"\nreplicas = [\"postgres://app:pw@127.0.0.1:5433/core\"]\n";
        let m = map_with(map, "localhost", "sslmode=verify-full&sslrootcert=/w/ca.pem");
        assert_eq!(m.matches("@localhost:").count(), 2);
        assert_eq!(m.matches("/core?sslmode=verify-full&sslrootcert=/w/ca.pem\"").count(), 2);
        assert!(!m.contains("127.0.0.1"));
    }

    #[test]
    fn certificates_and_private_key_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cellgate-bench-pki-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = make_pki(&dir).unwrap();
        let mode = std::fs::metadata(&pki.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(std::fs::read_to_string(&pki.cert).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(std::fs::read_to_string(&pki.ca).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
