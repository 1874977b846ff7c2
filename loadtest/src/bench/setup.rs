//! The cluster, the pgbench data, the shard map, cellgate's config and process, and a tiny
//! blocking HTTP/1.1 client for readiness, preflight requests and metrics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellgate_harness::{Cluster, ClusterSpec, Node};

use super::procs::{self, Guard};
use super::tools;

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-password";
pub const SU_PASSWORD: &str = "postgres-password";

/// Every point read goes to this place (Madrid); the map decides which shard owns it.
pub const POINT: (f64, f64) = (40.4168, -3.7038);

pub fn start_cluster(shards: usize) -> Result<Cluster, String> {
    Cluster::start(ClusterSpec {
        shards,
        replicas_per_shard: 1,
        fsync: false,
        extra_conf: vec![
            // pgbench -s 1..4 stays in shared buffers: no OS-cache reads on either path.
            ("shared_buffers".into(), "256MB".into()),
            // Backends of a killed cellgate (G7's pg_sleep holders) end within a second.
            ("client_connection_check_interval".into(), "1s".into()),
        ],
        ..ClusterSpec::default()
    })
    .map_err(|e| format!("cluster: {e}"))
}

/// `pgbench -i -s scale` on every primary as superuser, SELECT for the app role, then wait until
/// every replica has replayed it.
pub async fn load_pgbench(cluster: &Cluster, pgbench: &str, scale: u32) -> Result<Vec<String>, String> {
    let mut shown = Vec::new();
    for sh in &cluster.shards {
        let args: Vec<String> = [
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &sh.primary.port.to_string(),
            "-U",
            "postgres",
            "core",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = tools::run(pgbench, &args, &[("PGPASSWORD", SU_PASSWORD)], Duration::from_secs(600)).await?;
        if !out.ok {
            return Err(format!("pgbench -i on {}: {}{}", sh.primary.name, out.stdout, out.stderr));
        }
        shown.push(tools::show(pgbench, &args, Path::new("/nonexistent"), ""));
        sh.primary
            .psql("core", "GRANT SELECT ON pgbench_branches, pgbench_tellers, pgbench_history TO app; GRANT SELECT ON pgbench_accounts TO app; ANALYZE;")
            .map_err(|e| e.to_string())?;
    }
    let want = (100_000 * scale as u64).to_string();
    for sh in &cluster.shards {
        for r in &sh.replicas {
            wait_replayed(r, &want)?;
        }
    }
    Ok(shown)
}

fn wait_replayed(replica: &Node, want: &str) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let got = replica.psql_as(APP_USER, APP_PASSWORD, "core", "SELECT count(*) FROM pgbench_accounts");
        if matches!(&got, Ok(v) if v.trim() == want) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(format!("{} did not replay pgbench_accounts within 120 s: {got:?}", replica.name));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// Shards `s0..`, hash fallback at the map resolution (so an area of a few cells spans every
/// shard). Returns the file.
pub fn write_map(cluster: &Cluster, dir: &Path) -> Result<PathBuf, String> {
    let mut s = String::from("version = 1\nresolution = 5\n");
    let mut ids = Vec::new();
    for sh in &cluster.shards {
        let id = format!("s{}", sh.index);
        s.push_str(&format!(
            "\n[[shards]]\nid = \"{id}\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  primary = \"{}\"\n  replicas = [{}]\n",
            sh.primary.app_url("core"),
            sh.replicas.iter().map(|r| format!("\"{}\"", r.app_url("core"))).collect::<Vec<_>>().join(", ")
        ));
        ids.push(format!("\"{id}\""));
    }
    s.push_str(&format!("\n[fallback]\nmode = \"hash\"\nshards = [{}]\nresolution = 5\n", ids.join(", ")));
    let path = dir.join("map.toml");
    std::fs::write(&path, s).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// `cellgate locate --json` for the point or an area around it.
pub fn locate(bin: &str, map: &Path, radius_km: Option<f64>) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["locate", "--map"]).arg(map).args([
        "--lat",
        &POINT.0.to_string(),
        "--lng",
        &POINT.1.to_string(),
        "--json",
    ]);
    if let Some(r) = radius_km {
        cmd.args(["--radius-km", &r.to_string()]);
    }
    let out = cmd.output().map_err(|e| format!("{bin} locate: {e}"))?;
    if !out.status.success() {
        return Err(format!("{bin} locate: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("locate --json: {e}"))
}

pub fn token_hash(bin: &str, token: &str) -> Result<String, String> {
    let out = Command::new(bin).args(["token-hash", token]).output().map_err(|e| format!("{bin} token-hash: {e}"))?;
    let h = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && h.len() == 64 { Ok(h) } else { Err(format!("{bin} token-hash: {h}")) }
}

/// A fresh random token (hex of 16 bytes of /dev/urandom).
pub fn new_token() -> Result<String, String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).map_err(|e| format!("urandom: {e}"))?;
    Ok(format!("bench-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()))
}

/// The knobs that differ between the parts.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub pool_max: usize,
    pub max_in_flight: u64,
    pub request_timeout_ms: u64,
    pub checkout_timeout_ms: u64,
}

pub fn config_text(map: &Path, data: u16, admin: u16, p: &Profile, hash: &str) -> String {
    format!(
        "map = {{ path = \"{}\", watch = false }}\n\n[listen]\ndata = \"127.0.0.1:{data}\"\nadmin = \"127.0.0.1:{admin}\"\n\n[limits]\nmax_in_flight = {}\nrequest_timeout_ms = {}\n\n[pool]\nmax_size = {}\nmin_idle = {}\ncheckout_timeout_ms = {}\n\n[[tokens]]\nname = \"bench\"\nsha256 = \"{hash}\"\nscopes = [\"read\", \"admin\"]\n",
        map.display(),
        p.max_in_flight,
        p.request_timeout_ms,
        p.pool_max,
        p.pool_max,
        p.checkout_timeout_ms,
    )
}

/// A running cellgate.
pub struct Cellgate {
    pub guard: Guard,
    /// `http` or `https` (`[listen.data_tls]`) on the data listener.
    pub scheme: &'static str,
    pub data: String,
    pub admin: String,
    pub config: String,
    pub log: PathBuf,
}

impl Cellgate {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

pub fn start_cellgate(bin: &str, dir: &Path, map: &Path, p: &Profile, hash: &str) -> Result<Cellgate, String> {
    start_cellgate_with(bin, dir, map, p, hash, None)
}

/// Like [`start_cellgate`], with HTTPS on the data listener when `data_tls` is (certificate
/// chain, key) — the key file must be owner-only. The admin listener stays cleartext.
pub fn start_cellgate_with(
    bin: &str,
    dir: &Path,
    map: &Path,
    p: &Profile,
    hash: &str,
    data_tls: Option<(&Path, &Path)>,
) -> Result<Cellgate, String> {
    start_cellgate_extra(bin, dir, map, p, hash, data_tls, "")
}

/// Like [`start_cellgate_with`], with `extra` appended to the config (whole tables, e.g. the
/// cache part's `[cache]`).
pub fn start_cellgate_extra(
    bin: &str,
    dir: &Path,
    map: &Path,
    p: &Profile,
    hash: &str,
    data_tls: Option<(&Path, &Path)>,
    extra: &str,
) -> Result<Cellgate, String> {
    let (data, admin) = (free_port()?, free_port()?);
    let mut config = config_text(map, data, admin, p, hash);
    if let Some((cert, key)) = data_tls {
        config.push_str(&format!("\n[listen.data_tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display()));
    }
    config.push_str(extra);
    let cfg = dir.join(format!("cellgate-{}.toml", p.name));
    std::fs::write(&cfg, &config).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let log = dir.join(format!("cellgate-{}.log", p.name));
    let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = {
        use std::os::unix::process::CommandExt;
        Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("start {bin}: {e} (build it: cargo build --release -p cellgate)"))?
    };
    let mut cg = Cellgate {
        guard: Guard::new(child, Duration::from_secs(3)),
        scheme: if data_tls.is_some() { "https" } else { "http" },
        data: format!("127.0.0.1:{data}"),
        admin: format!("127.0.0.1:{admin}"),
        config,
        log,
    };
    let t = Instant::now();
    loop {
        if let Ok((200, _)) = http(&cg.admin, "GET", "/readyz", "", None) {
            return Ok(cg);
        }
        if !cg.guard.alive() {
            return Err(format!("cellgate exited during startup:\n{}", cg.log_tail()));
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("cellgate not ready within 30 s:\n{}", cg.log_tail()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One blocking HTTP/1.1 request with `connection: close`; (status, body).
pub fn http(addr: &str, method: &str, path: &str, token: &str, body: Option<&str>) -> Result<(u16, String), String> {
    http_head(addr, method, path, token, body).map(|(status, _, body)| (status, body))
}

/// Response header lines: (name lower-cased, value trimmed).
pub type Headers = Vec<(String, String)>;

/// Like [`http`], with the response's header lines (names lower-cased, values trimmed).
pub fn http_head(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> Result<(u16, Headers, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    if !token.is_empty() {
        req.push_str(&format!("authorization: Bearer {token}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).ok_or("no HTTP status")?;
    let (head, body) = out.split_once("\r\n\r\n").map(|(h, b)| (h, b.to_string())).unwrap_or((&out, String::new()));
    let headers: Headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(&body) } else { body };
    Ok((status, headers, body))
}

/// The payload of a chunked HTTP/1.1 body (extensions and trailers ignored).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else { break };
        let (Some(chunk), Some(after)) = (rest.get(..n), rest.get(n..)) else { break };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        s = after.strip_prefix("\r\n").unwrap_or(after);
    }
    out
}

/// A request that must answer 200 with rows (so a wrong token or SQL fails loudly before a run).
pub fn preflight(cg: &Cellgate, token: &str, body: &str) -> Result<String, String> {
    let (status, resp) = http(&cg.data, "POST", "/v1/sql/core/query", token, Some(body))?;
    if status != 200 || !resp.contains("\"rows\"") {
        return Err(format!("preflight {body} → {status}: {resp}"));
    }
    Ok(resp)
}

/// Sum of `cellgate_requests_total` samples whose labels contain every `want` (`k="v"`).
pub fn requests_total(metrics: &str, want: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("cellgate_requests_total{") && want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

pub fn postmaster_pids(cluster: &Cluster) -> Vec<u32> {
    cluster.nodes().filter_map(|n| n.pid()).collect()
}

pub fn rss_kib(cg: &Cellgate) -> u64 {
    procs::status_kib(cg.pid(), "VmRSS").unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n"), "{\"a\": 1}");
        assert_eq!(dechunk("zz\r\nx"), "");
        assert_eq!(dechunk("10\r\nshort"), "");
    }
}
