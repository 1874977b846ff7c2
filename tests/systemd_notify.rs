//! systemd `Type=notify` (deploy/systemd/cellgate.service): the `cellgate serve` binary, started
//! with `NOTIFY_SOCKET` pointing at a datagram socket this test owns (as systemd would), sends
//! `READY=1` only once `/readyz` answers 200, `RELOADING=1` … `READY=1` around a SIGHUP reload,
//! and `STOPPING=1` when SIGTERM starts the drain.
//!
//! A child process, not `server::start` in-process: `NOTIFY_SOCKET` is process-wide state (and
//! setting it needs `unsafe`, which this crate forbids), and this also covers the real signal
//! handling of `serve`. No PostgreSQL is needed: the map's only endpoint is a TCP listener that
//! accepts and never answers, so the first health probe — and with it readiness — takes
//! `probe_timeout_ms`, which leaves a window where `/readyz` is 503 and READY=1 must not have come.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longer than the 3 s `migrate::recover` gives each shard while `start` runs (it meets the same
/// black hole), so there is a window where cellgate serves `/readyz` but is not ready.
const PROBE_TIMEOUT_MS: u64 = 8_000;

/// The child is killed if the test fails half-way.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Status code of `GET path` (HTTP/1.1, connection closed after the answer).
fn get_status(addr: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status line: {text:?}"))
}

fn recv(sock: &UnixDatagram, timeout: Duration) -> String {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no sd_notify message within {timeout:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_reloading_stopping_reach_the_notify_socket() {
    let dir = std::env::temp_dir().join(format!("cellgate-sdnotify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // A PostgreSQL endpoint that never answers: the kernel completes the handshake (backlog),
    // nobody reads, so the first probe ends only at its timeout.
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let pg = blackhole.local_addr().unwrap();
    let map = format!(
        "version = 1\nresolution = 5\n[[shards]]\nid = \"a\"\nzone = \"test\"\n  [shards.databases.core]\n  \
         kind = \"postgres\"\n  primary = \"postgres://app:pw@{pg}/core\"\n[[assign]]\nshard = \"a\"\n\
         cells = [\"8039fffffffffff\"]\n[fallback]\nmode = \"reject\"\n"
    );
    std::fs::write(dir.join("map.toml"), map).unwrap();
    let cfg = format!(
        "map = {{ path = \"{}\", watch = false }}\n[listen]\ndata = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [health]\ninterval_ms = 60000\nprobe_timeout_ms = {PROBE_TIMEOUT_MS}\n[pool]\nconnect_timeout_ms = {PROBE_TIMEOUT_MS}\n\
         [shutdown]\ngrace_ms = 2000\n",
        dir.join("map.toml").display()
    );
    std::fs::write(dir.join("cellgate.toml"), cfg).unwrap();

    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let started = Instant::now();
    let mut serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args(["serve", "--config"])
            .arg(dir.join("cellgate.toml"))
            .args(["--log-format", "json"])
            .env("NOTIFY_SOCKET", &sock_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cellgate serve"),
    );
    let pid = serve.0.id();

    // The admin address is in the "cellgate serving" log line (ports are picked by the kernel).
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = serve.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            all += &line;
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let admin = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("cellgate logs that it serves");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "cellgate serving" {
            break v["fields"]["admin_addr"].as_str().unwrap().to_string();
        }
    };

    // Listening, but the first probe is still waiting on the black hole: not ready, no READY=1.
    assert_eq!(get_status(&admin, "/livez"), 200);
    assert_eq!(get_status(&admin, "/readyz"), 503, "readiness must wait for the first probe");
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("sd_notify message while /readyz says 503: {other:?}"),
    }
    sock.set_nonblocking(false).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(PROBE_TIMEOUT_MS),
        "the not-ready window was checked after the probe could have ended; the test proves nothing"
    );

    // READY=1 after the probe timed out (a down endpoint counts as probed), and /readyz agrees.
    let ready = recv(&sock, Duration::from_secs(30));
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.lines().any(|l| l == "STATUS=serving map version 1"), "{ready:?}");
    assert_eq!(get_status(&admin, "/readyz"), 200, "READY=1 was sent before /readyz turned true");

    // SIGHUP (ExecReload): RELOADING=1 with the monotonic timestamp, then READY=1 again.
    signal(pid, "HUP");
    let reloading = recv(&sock, Duration::from_secs(30));
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading:?}");
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    let reloaded = recv(&sock, Duration::from_secs(30));
    assert!(reloaded.lines().any(|l| l == "READY=1"), "{reloaded:?}");
    assert!(reloaded.contains("last reload: unchanged"), "{reloaded:?}");

    // SIGTERM (systemctl stop): STOPPING=1, then a clean exit within the grace period.
    signal(pid, "TERM");
    let stopping = recv(&sock, Duration::from_secs(30));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = serve.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "cellgate still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let logs = reader.join().unwrap();
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(!logs.contains("sd_notify: cannot reach"), "{logs}");
    drop(blackhole);
    let _ = std::fs::remove_dir_all(&dir);
}
