//! Test stack: a real PostgreSQL cluster (harness), a shard map pointing at it, and cellgate
//! serving in-process on 127.0.0.1:0. Dropping the stack stops cellgate and the cluster.
#![allow(dead_code)]

pub mod etcd;
pub mod fleet;
pub mod mongo;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cellgate::config::Config;
use cellgate::server::{self, Running};
use cellgate_harness::{Cluster, ClusterSpec};
use serde_json::{Value, json};

/// The app role's password in every test cluster: a canary that must never show up in logs,
/// errors, metrics or admin output.
pub const CANARY: &str = "canary-Pw-9f1c2e";
pub const READ_TOKEN: &str = "tok-read-1";
pub const WRITE_TOKEN: &str = "tok-write-1";
pub const ADMIN_TOKEN: &str = "tok-admin-1";
/// write + ddl: may run CREATE/ALTER/DROP through /execute.
pub const DDL_TOKEN: &str = "tok-ddl-1";

/// Everything the process logged (all levels), for the secrets check.
pub fn logs() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || LogWriter(b.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Stack {
    pub cluster: Cluster,
    pub server: Option<Running>,
    pub http: reqwest::Client,
    pub dir: std::path::PathBuf,
    /// More instances on the same map file.
    pub extra: Vec<Running>,
}

/// Two shards: "a" owns the resolution-0 cell around Madrid, "b" the one around Paris;
/// everything else has no owner (reject fallback), so `no_shard_for_region` is reachable.
pub const MADRID: (f64, f64) = (40.4168, -3.7038);
pub const PARIS: (f64, f64) = (48.8566, 2.3522);
pub const NOWHERE: (f64, f64) = (0.0, -140.0);
/// On shard "a" with Madrid, outside the cell the migration tests move.
pub const BARCELONA: (f64, f64) = (41.3874, 2.1686);

/// The resolution-3 cell around Madrid that the migration tests move; Barcelona (same shard) and
/// Paris do not lie in it.
pub fn moving_cell() -> String {
    let p = cellgate::geo::point(MADRID.0, MADRID.1).unwrap();
    cellgate::geo::owning_cell(p, h3o::Resolution::Three).to_string()
}

/// Does the point (lat, lng) lie in [`moving_cell`]?
pub fn in_moving(at: (f64, f64)) -> bool {
    let p = cellgate::geo::point(at.0, at.1).unwrap();
    cellgate::geo::owning_cell(p, h3o::Resolution::Three).to_string() == moving_cell()
}

pub fn map_toml(cluster: &Cluster, extra_replica: Option<&str>) -> String {
    let mut s = String::from("version = 1\nresolution = 5\n");
    for (i, id) in ["a", "b"].iter().enumerate().take(cluster.shards.len()) {
        let sh = &cluster.shards[i];
        let mut replicas: Vec<String> = sh.replicas.iter().map(|r| format!("\"{}\"", r.app_url("core"))).collect();
        if let Some(extra) = extra_replica {
            replicas.push(format!("\"{extra}\""));
        }
        s += &format!(
            "[[shards]]\nid = \"{id}\"\nzone = \"test\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  primary = \"{}\"\n  replicas = [{}]\n  admin = \"{}\"\n",
            sh.primary.app_url("core"),
            replicas.join(", "),
            sh.primary.admin_url("core")
        );
    }
    s += "[[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n";
    if cluster.shards.len() > 1 {
        s += "[[assign]]\nshard = \"b\"\ncells = [\"801ffffffffffff\"]\n";
    }
    s += "[fallback]\nmode = \"reject\"\n[tables.core.items]\ncell_column = \"h3\"\n";
    s
}

pub const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, v int, \
    lat float8, lng float8, h3 bigint NOT NULL, created_at timestamptz DEFAULT now())";

impl Stack {
    /// `shards` × (primary + `replicas`), schema created on every primary and replicated.
    pub async fn start(shards: usize, replicas: usize, tweak: impl FnOnce(&mut String)) -> Stack {
        Self::start_with(shards, replicas, None, tweak).await
    }

    pub async fn start_with(
        shards: usize,
        replicas: usize,
        extra_replica: Option<&str>,
        tweak: impl FnOnce(&mut String),
    ) -> Stack {
        Self::start_conf(shards, replicas, extra_replica, Vec::new(), tweak).await
    }

    /// Like `start_with`, with extra `postgresql.conf` settings on every node.
    pub async fn start_conf(
        shards: usize,
        replicas: usize,
        extra_replica: Option<&str>,
        extra_conf: Vec<(String, String)>,
        tweak: impl FnOnce(&mut String),
    ) -> Stack {
        Self::start_full(shards, replicas, extra_replica, extra_conf, |_| {}, tweak).await
    }

    /// `start` with the map text edited by `map_tweak` before cellgate starts.
    pub async fn start_map(
        shards: usize,
        replicas: usize,
        map_tweak: impl FnOnce(&mut String),
        tweak: impl FnOnce(&mut String),
    ) -> Stack {
        Self::start_full(shards, replicas, None, Vec::new(), map_tweak, tweak).await
    }

    async fn start_full(
        shards: usize,
        replicas: usize,
        extra_replica: Option<&str>,
        extra_conf: Vec<(String, String)>,
        map_tweak: impl FnOnce(&mut String),
        tweak: impl FnOnce(&mut String),
    ) -> Stack {
        logs();
        let cluster = tokio::task::spawn_blocking(move || {
            Cluster::start(ClusterSpec {
                shards,
                replicas_per_shard: replicas,
                app_password: CANARY.into(),
                extra_conf,
                ..Default::default()
            })
            .expect("PostgreSQL cluster (install PostgreSQL: bash scripts/test.sh does)")
        })
        .await
        .unwrap();
        for sh in &cluster.shards {
            sh.primary.psql_as("app", CANARY, "core", SCHEMA).expect("schema");
        }
        for sh in &cluster.shards {
            sh.wait_for_replicas(Duration::from_secs(30)).expect("replicas streaming");
        }
        let dir = std::env::temp_dir().join(format!("cellgate-test-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut map = map_toml(&cluster, extra_replica);
        map_tweak(&mut map);
        std::fs::write(dir.join("map.toml"), map).unwrap();
        let mut cfg = config_text(&dir);
        tweak(&mut cfg);
        // Loaded from a file, as `cellgate serve` does: credentials reload from it.
        std::fs::write(dir.join("cellgate.toml"), &cfg).unwrap();
        let config = Config::load(&dir.join("cellgate.toml")).expect("test config");
        let server = server::start(config, false).await.expect("cellgate starts");
        let stack = Stack { cluster, server: Some(server), http: reqwest::Client::new(), dir, extra: Vec::new() };
        stack.wait_ready().await;
        stack
    }

    /// Start one more instance on the same map file (a fleet member); `tweak` edits its config.
    pub async fn add_instance(&mut self, tweak: impl FnOnce(&mut String)) -> usize {
        let mut cfg = config_text(&self.dir);
        tweak(&mut cfg);
        let server = server::start(Config::parse(&cfg).expect("config"), false).await.expect("instance starts");
        self.extra.push(server);
        self.extra.len() - 1
    }

    /// Start one more instance on its own copy of today's map file, which nothing updates (an
    /// instance that never hears of a change); `tweak` edits its config.
    pub async fn add_instance_with_own_map(&mut self, tweak: impl FnOnce(&mut String)) -> usize {
        let own = self.dir.join(format!("own-{}", self.extra.len()));
        std::fs::create_dir_all(&own).unwrap();
        std::fs::copy(self.dir.join("map.toml"), own.join("map.toml")).unwrap();
        let mut cfg = config_text(&own);
        tweak(&mut cfg);
        let server = server::start(Config::parse(&cfg).expect("config"), false).await.expect("instance starts");
        self.extra.push(server);
        self.extra.len() - 1
    }

    pub fn data_of(&self, i: usize) -> String {
        format!("http://{}", self.extra[i].data_addr)
    }

    pub fn admin_of(&self, i: usize) -> String {
        format!("http://{}", self.extra[i].admin_addr)
    }
}

/// The process config every test instance uses (tweaks edit the text).
/// Poll an instance's `/readyz` (admin base URL) until it answers 200; fail the test after `within`.
pub async fn wait_ready(http: &reqwest::Client, admin: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(format!("{admin}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "cellgate not ready in {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn config_text(dir: &std::path::Path) -> String {
    format!(
        r#"
map = {{ path = "{}" }}
[listen]
data = "127.0.0.1:0"
admin = "127.0.0.1:0"
[limits]
max_body_bytes = 65536
request_timeout_ms = 3000
header_timeout_ms = 1000
max_in_flight = 1000
[pool]
max_size = 8
min_idle = 0
connect_timeout_ms = 1000
checkout_timeout_ms = 1500
[health]
interval_ms = 200
probe_timeout_ms = 1000
fail_threshold = 2
ok_threshold = 2
max_lag_ms = 600
[[tokens]]
name = "reader"
sha256 = "{}"
scopes = ["read"]
[[tokens]]
name = "writer"
sha256 = "{}"
scopes = ["write"]
[[tokens]]
name = "admin"
sha256 = "{}"
scopes = ["admin"]
[[tokens]]
name = "ddl"
sha256 = "{}"
scopes = ["write", "ddl"]
"#,
        dir.join("map.toml").display(),
        cellgate::auth::digest_hex(READ_TOKEN),
        cellgate::auth::digest_hex(WRITE_TOKEN),
        cellgate::auth::digest_hex(ADMIN_TOKEN),
        cellgate::auth::digest_hex(DDL_TOKEN),
    )
}

impl Stack {
    pub fn data(&self) -> String {
        format!("http://{}", self.server.as_ref().unwrap().data_addr)
    }

    pub fn admin(&self) -> String {
        format!("http://{}", self.server.as_ref().unwrap().admin_addr)
    }

    pub async fn wait_ready(&self) {
        wait_ready(&self.http, &self.admin(), Duration::from_secs(30)).await;
    }

    /// POST to the data plane; returns (status, body JSON, Retry-After).
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value, Option<String>) {
        let mut req = self.http.post(format!("{}{path}", self.data())).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
        (status, v, retry)
    }

    pub async fn query(&self, body: Value) -> (u16, Value) {
        let (s, v, _) = self.post("/v1/sql/core/query", Some(READ_TOKEN), &body).await;
        (s, v)
    }

    pub async fn execute(&self, body: Value) -> (u16, Value) {
        let (s, v, _) = self.post("/v1/sql/core/execute", Some(WRITE_TOKEN), &body).await;
        (s, v)
    }

    /// `GET` an admin route that answers JSON (admin token); the body as JSON whatever the status.
    pub async fn admin_value(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        r.json().await.unwrap()
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(format!("{}{path}", self.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Insert one item at a point through cellgate; the h3 column is the point's res-15 cell.
    pub async fn insert(&self, id: i64, name: &str, (lat, lng): (f64, f64)) -> Value {
        let h3 = h3_of(lat, lng);
        let (s, v) = self
            .execute(json!({
                "region": {"lat": lat, "lng": lng},
                "sql": "INSERT INTO items (id, name, v, lat, lng, h3) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, inet_server_port() AS port",
                "params": [id, name, id % 100, lat, lng, h3],
            }))
            .await;
        assert_eq!(s, 200, "insert {id}: {v}");
        v
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        for s in std::mem::take(&mut self.extra) {
            s.shutdown().await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Wait (up to 5 s) until no active statement on `node` has `pattern` in its text (other than
/// this probe itself); returns how many still run then (0 = stopped).
pub async fn wait_statement_gone(node: &cellgate_harness::Node, pattern: &str) -> String {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{pattern}%' AND state = 'active' \
         AND pid <> pg_backend_pid()"
    );
    let mut running = String::new();
    for _ in 0..50 {
        running = node.psql("core", &sql).unwrap();
        if running == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running
}

pub fn h3_of(lat: f64, lng: f64) -> i64 {
    u64::from(cellgate::geo::point_cell(cellgate::geo::point(lat, lng).unwrap())) as i64
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
