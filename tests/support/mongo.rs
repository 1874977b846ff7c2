//! MongoDB test peers (a data server per shard — CongoDB or SecantusDB —, a MockupDB replica set
//! per shard) started on free loopback ports and stopped by PID on drop, plus a cellgate instance
//! whose map serves the `profiles` database from them. Installs nothing:
//! `tests/peers/mongo/install.sh` does.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellgate::config::Config;
use cellgate::server::{self, Running};
use serde_json::{Value, json};

use super::{ADMIN_TOKEN, READ_TOKEN, WRITE_TOKEN, config_text, logs};

fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/mongo")
}

pub const INSTALL_HINT: &str = "MongoDB test peers are not installed: run `bash tests/peers/mongo/install.sh`";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed (SIGKILL, by its PID) when dropped, with its stdout lines.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{INSTALL_HINT} (spawn failed: {e})"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// The next stdout line, or None when the process ended or `timeout` passed.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }
}

impl Proc {
    /// SIGTERM by PID, so a server can remove its temporary storage (SecantusDB's `:memory:`
    /// is a temporary WiredTiger directory); SIGKILL if it has not exited within 3 s.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Which implementation a data peer is. Two independent servers catch different mistakes:
/// CongoDB (JavaScript, standalone) and SecantusDB (Python on WiredTiger, a one-node replica set
/// with mongod's error codes, unique secondary indexes and bytewise string order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    Congo,
    Secantus,
}

/// One data server (in-memory) on a free port.
pub struct Peer {
    proc: Proc,
    pub kind: PeerKind,
    pub port: u16,
}

impl Peer {
    pub fn start(kind: PeerKind) -> Peer {
        match kind {
            PeerKind::Congo => Self::start_congo(),
            PeerKind::Secantus => Self::start_secantus(),
        }
    }

    fn start_congo() -> Peer {
        let dir = peers_dir().join(".congodb");
        assert!(dir.join("congo-start.mjs").exists() && dir.join("package").exists(), "{INSTALL_HINT}");
        // A free port can be taken between the probe and node's bind: try a few.
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new("node");
            cmd.arg("congo-start.mjs").current_dir(&dir).env("CONGO_PORT", port.to_string());
            let proc = Proc::spawn(cmd);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match proc.next_line(Duration::from_millis(200)) {
                    Some(l) if l.contains("listening") => return Peer { proc, kind: PeerKind::Congo, port },
                    _ => {}
                }
            }
        }
        panic!("CongoDB did not start (no listening line); is the install complete? {INSTALL_HINT}");
    }

    fn start_secantus() -> Peer {
        Self::start_secantus_with(&[])
    }

    /// SecantusDB with `extra` arguments after the usual ones (e.g. `--tls-cert-file C
    /// --tls-key-file K` for a TLS-only server; readiness is still a TCP connect).
    pub fn start_secantus_with(extra: &[&str]) -> Peer {
        let bin = peers_dir().join(".secantus/bin/secantusd-py");
        assert!(bin.exists(), "SecantusDB is not installed ({} missing): {INSTALL_HINT}", bin.display());
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(&bin);
            // It logs to stderr ("listening" included); readiness is a TCP connect instead.
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--storage-path", ":memory:"])
                .args(["--log-level", "WARNING"])
                .args(extra);
            let mut proc = Proc::spawn(cmd);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Peer { proc, kind: PeerKind::Secantus, port };
                }
                if proc.child.try_wait().ok().flatten().is_some() {
                    break; // exited (port taken?): try another port
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            proc.stop();
        }
        panic!("SecantusDB did not start listening; is the install complete? {INSTALL_HINT}");
    }

    /// The peer's process id (for CPU accounting).
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// The URI cellgate and the tests use (a direct connection: CongoDB is standalone,
    /// SecantusDB a one-node replica set whose single member is its primary).
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// A driver client for reading the server directly (build one per test: clients are bound
    /// to the runtime they were created in).
    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(self.uri()).await.expect("direct client")
    }
}

/// One command a MockupDB member received.
#[derive(Debug, Clone)]
pub struct SeenCommand {
    pub member: String,
    pub command: String,
    pub read_preference: Value,
    pub after_cluster_time: bool,
    pub max_time_ms: Option<i64>,
}

/// A two-member MockupDB replica set (primary + secondary).
pub struct MockupRs {
    proc: Proc,
    pub set_name: String,
    pub primary: String,
    pub secondary: String,
    seen: Arc<Mutex<Vec<SeenCommand>>>,
}

impl MockupRs {
    pub fn start(set_name: &str) -> MockupRs {
        let dir = peers_dir();
        let python = dir.join(".venv/bin/python");
        assert!(python.exists(), "{INSTALL_HINT}");
        let mut cmd = Command::new(python);
        cmd.arg(dir.join("mockup_rs.py")).arg("--set-name").arg(set_name);
        let proc = Proc::spawn(cmd);
        let line =
            proc.next_line(Duration::from_secs(20)).unwrap_or_else(|| panic!("MockupDB did not start. {INSTALL_HINT}"));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("MockupDB said {line:?}"));
        assert_eq!(v["event"], "listening", "{v}");
        MockupRs {
            proc,
            set_name: set_name.to_string(),
            primary: v["primary"].as_str().unwrap().to_string(),
            secondary: v["secondary"].as_str().unwrap().to_string(),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn uri(&self) -> String {
        format!("mongodb://{},{}/?replicaSet={}", self.primary, self.secondary, self.set_name)
    }

    /// Drain what the members reported so far (waiting up to `wait` for at least `n` commands).
    pub fn commands(&self, n: usize, wait: Duration) -> Vec<SeenCommand> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(line) = self.proc.next_line(Duration::from_millis(20)) {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["event"] == "command" {
                    self.seen.lock().unwrap().push(SeenCommand {
                        member: v["member"].as_str().unwrap_or("").into(),
                        command: v["command"].as_str().unwrap_or("").into(),
                        read_preference: v["read_preference"].clone(),
                        after_cluster_time: v["after_cluster_time"] == true,
                        max_time_ms: v["max_time_ms"].as_i64(),
                    });
                }
            }
            let seen = self.seen.lock().unwrap();
            if seen.len() >= n || Instant::now() >= deadline {
                return seen.clone();
            }
        }
    }

    /// Forget what was reported so far.
    pub fn clear(&self) {
        self.commands(0, Duration::ZERO);
        self.seen.lock().unwrap().clear();
    }
}

/// Madrid's resolution-0 cell belongs to shard "a", Paris's to "b"; everything else is rejected.
pub fn map_toml(uris: &[String]) -> String {
    map_toml_with(uris, "")
}

/// `map_toml` with `extra` (TOML lines) added to each shard's `profiles` database.
pub fn map_toml_with(uris: &[String], extra: &str) -> String {
    let mut s = String::from("version = 1\nresolution = 5\n");
    for (id, uri) in ["a", "b"].iter().zip(uris) {
        s += &format!(
            "[[shards]]\nid = \"{id}\"\nzone = \"test\"\n  [shards.databases.profiles]\n  kind = \"mongodb\"\n  uri = \"{uri}\"\n{extra}"
        );
    }
    s += "[[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n";
    s += "[[assign]]\nshard = \"b\"\ncells = [\"801ffffffffffff\"]\n";
    s += "[fallback]\nmode = \"reject\"\n[tables.profiles.people]\ngeo_field = \"loc\"\n";
    s
}

/// cellgate in-process on a map whose `profiles` database lives at `uris` (shard a, shard b).
pub struct DocStack {
    pub server: Option<Running>,
    pub http: reqwest::Client,
    pub dir: PathBuf,
}

impl DocStack {
    pub async fn start(uris: &[String]) -> DocStack {
        Self::start_map(&map_toml(uris)).await
    }

    /// cellgate in-process on this map text.
    pub async fn start_map(map: &str) -> DocStack {
        Self::start_map_conf(map, |_| {}).await
    }

    /// cellgate in-process on this map text, the process config edited by `tweak` (e.g. a
    /// `[tls]` section appended).
    pub async fn start_map_conf(map: &str, tweak: impl FnOnce(&mut String)) -> DocStack {
        logs();
        let dir = std::env::temp_dir().join(format!("cellgate-mongo-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("map.toml"), map).unwrap();
        let mut text = config_text(&dir);
        tweak(&mut text);
        let config = Config::parse(&text).expect("test config");
        let server = server::start(config, false).await.expect("cellgate starts");
        let st = DocStack { server: Some(server), http: reqwest::Client::new(), dir };
        super::wait_ready(&st.http, &st.admin(), Duration::from_secs(30)).await;
        st
    }

    pub fn data(&self) -> String {
        format!("http://{}", self.server.as_ref().unwrap().data_addr)
    }

    pub fn admin(&self) -> String {
        format!("http://{}", self.server.as_ref().unwrap().admin_addr)
    }

    /// POST `body` (raw text, so Extended JSON key order is the test's) to `/v1/docs/profiles/{path}`.
    pub async fn raw(&self, path: &str, token: &str, body: &str) -> (u16, Value, Option<String>) {
        let resp = self
            .http
            .post(format!("{}/v1/docs/{path}", self.data()))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
        (status, v, retry)
    }

    /// A read op on `profiles.<coll>`.
    pub async fn read(&self, coll_op: &str, body: Value) -> (u16, Value) {
        let (s, v, _) = self.raw(&format!("profiles/{coll_op}"), READ_TOKEN, &body.to_string()).await;
        (s, v)
    }

    /// A write op on `profiles.<coll>`.
    pub async fn write(&self, coll_op: &str, body: Value) -> (u16, Value) {
        let (s, v, _) = self.raw(&format!("profiles/{coll_op}"), WRITE_TOKEN, &body.to_string()).await;
        (s, v)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(format!("{}{path}", self.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

impl Drop for DocStack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
