//! The external load generators: pgbench (direct) and h2load (through cellgate). Each runs as a
//! child in its own process group (a terminal Ctrl-C reaches only the runner, which stops it),
//! bounded in time, killed by PID if it overstays or the run is abandoned.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::stats::{self, H2Entry, H2Summary, Lat};

/// A command line as it can be pasted, with the work dir and the token replaced by `$WORK` and
/// `$TOKEN`.
pub fn show(program: &str, args: &[String], work: &Path, token: &str) -> String {
    let work = work.display().to_string();
    let quote = |a: &str| {
        let a = a.replace(&work, "$WORK");
        let a = if token.is_empty() { a } else { a.replace(token, "$TOKEN") };
        if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,$@%+".contains(c)) {
            a
        } else {
            format!("\"{}\"", a.replace('"', "\\\""))
        }
    };
    let prog = Path::new(program).file_name().map_or(program.to_string(), |f| f.to_string_lossy().to_string());
    std::iter::once(prog).chain(args.iter().map(|a| quote(a))).collect::<Vec<_>>().join(" ")
}

pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub ok: bool,
}

/// Run to completion within `limit` (killed by PID otherwise).
pub async fn run(program: &str, args: &[String], env: &[(&str, &str)], limit: Duration) -> Result<Output, String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(|e| format!("start {program}: {e}"))?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(o)) => Ok(Output {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            ok: o.status.success(),
        }),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        // Dropping the future dropped the child: kill_on_drop sent SIGKILL to its PID.
        Err(_) => Err(format!("{program} did not finish within {} s; killed", limit.as_secs())),
    }
}

/// Spawn without waiting (the G7 stream holders); killed by PID when the handle is dropped.
pub fn spawn(program: &str, args: &[String]) -> Result<tokio::process::Child, String> {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("start {program}: {e}"))
}

pub struct Pgbench<'a> {
    pub bin: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub clients: usize,
    pub threads: usize,
    pub secs: u64,
    /// Total transactions per second (`-R`), or as fast as possible.
    pub rate: Option<f64>,
    pub dir: PathBuf,
}

pub struct PgbenchResult {
    pub tps: f64,
    pub failed: u64,
    pub lat: Lat,
    pub args: Vec<String>,
}

impl Pgbench<'_> {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-n".into(),
            "-S".into(),
            "-M".into(),
            "prepared".into(),
            "-c".into(),
            self.clients.to_string(),
            "-j".into(),
            self.threads.min(self.clients).to_string(),
            "-T".into(),
            self.secs.to_string(),
        ];
        if let Some(r) = self.rate {
            a.extend(["-R".into(), format!("{r:.0}")]);
        }
        a.extend([
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            self.user.into(),
            "--log".into(),
            format!("--log-prefix={}", self.dir.join("pgbench").display()),
            "core".into(),
        ]);
        a
    }

    pub async fn run(&self) -> Result<PgbenchResult, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let args = self.args();
        let out = run(self.bin, &args, &[("PGPASSWORD", self.password)], Duration::from_secs(self.secs + 60)).await?;
        let (tps, failed) = stats::parse_pgbench_stdout(&out.stdout)
            .filter(|_| out.ok)
            .ok_or_else(|| format!("pgbench failed:\n{}\n{}", out.stdout, out.stderr))?;
        let (lat, log_failed) = stats::read_pgbench_logs(&self.dir, "pgbench", self.rate.is_some());
        // The logs are big; the numbers are taken.
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(PgbenchResult { tps, failed: failed.max(log_failed), lat: stats::summarize(lat), args })
    }
}

pub struct H2load<'a> {
    pub bin: &'a str,
    pub url: String,
    pub body: PathBuf,
    pub token: &'a str,
    pub clients: usize,
    pub streams: usize,
    pub threads: usize,
    pub h1: bool,
    /// More `-H` headers (e.g. `connection: close` for a new connection per request).
    pub headers: Vec<String>,
    /// `-D secs` or `-n requests`.
    pub secs: Option<u64>,
    pub requests: Option<u64>,
    /// Requests per second per client (`--rps`).
    pub rps_per_client: Option<f64>,
    /// Per-request log (`--log-file`); `None` for the G7 holders.
    pub log: Option<PathBuf>,
    pub limit: Duration,
}

pub struct H2Result {
    pub summary: H2Summary,
    pub entries: Vec<H2Entry>,
    pub args: Vec<String>,
    /// What h2load printed (its TLS and application-protocol lines are read from it).
    pub stdout: String,
}

impl H2load<'_> {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        if self.h1 {
            a.push("--h1".into());
        }
        a.extend([
            "-c".into(),
            self.clients.to_string(),
            "-m".into(),
            self.streams.to_string(),
            "-t".into(),
            self.threads.min(self.clients).to_string(),
        ]);
        if let Some(s) = self.secs {
            a.extend(["-D".into(), s.to_string()]);
        }
        if let Some(n) = self.requests {
            a.extend(["-n".into(), n.to_string()]);
        }
        if let Some(r) = self.rps_per_client {
            a.push(format!("--rps={r:.1}"));
        }
        a.extend(["-d".into(), self.body.display().to_string(), "-H".into(), "content-type: application/json".into()]);
        if !self.token.is_empty() {
            a.extend(["-H".into(), format!("authorization: Bearer {}", self.token)]);
        }
        for h in &self.headers {
            a.extend(["-H".into(), h.clone()]);
        }
        if let Some(l) = &self.log {
            a.push(format!("--log-file={}", l.display()));
        }
        a.push(self.url.clone());
        a
    }

    pub async fn run(&self) -> Result<H2Result, String> {
        let args = self.args();
        let out = run(self.bin, &args, &[], self.limit).await?;
        let summary = stats::parse_h2load_stdout(&out.stdout)
            .ok_or_else(|| format!("h2load failed (no summary):\n{}\n{}", out.stdout, out.stderr))?;
        let entries = match &self.log {
            Some(l) => {
                let text = std::fs::read_to_string(l).map_err(|e| format!("{}: {e}", l.display()))?;
                let _ = std::fs::remove_file(l);
                stats::parse_h2load_log(&text)
            }
            None => Vec::new(),
        };
        Ok(H2Result { summary, entries, args, stdout: out.stdout })
    }
}
