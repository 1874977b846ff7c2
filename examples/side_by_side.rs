//! Side-by-side point reads: the same prepared `SELECT ... WHERE id = $1` run directly against a
//! PostgreSQL replica, and through cellgate (HTTP/1.1 keep-alive) to that same replica, at the
//! same concurrency, in alternating pairs. Reports throughput, p50/p99 and cellgate's CPU time
//! per request (utime+stime of its process from /proc). Starts its own cluster (harness) and a
//! release cellgate process; stops both.
//!
//! Run: cargo build --release && cargo run --release --example side_by_side -- [--pairs 3] [--secs 5] [--concurrency 16]
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_harness::{Cluster, ClusterSpec};
use http_body_util::{BodyExt, Full};
use tokio_postgres::NoTls;

const ROWS: i64 = 10_000;
const SQL: &str = "SELECT id, name, v FROM items WHERE id = $1";

struct Run {
    requests: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: Option<f64>,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64
}

fn finish(mut lat: Vec<u32>, secs: f64, cpu: Option<f64>) -> Run {
    lat.sort_unstable();
    Run { requests: lat.len() as u64, secs, p50_us: pct(&lat, 0.5), p99_us: pct(&lat, 0.99), cpu_us_per_req: cpu }
}

/// CPU time (user + system) of a process, in microseconds.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let hz = 100.0; // USER_HZ on Linux
    ticks / hz * 1e6
}

async fn direct(url: &str, conc: usize, dur: Duration) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
        tokio::spawn(conn);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(SQL).await.unwrap();
            let mut lat = Vec::new();
            let mut id = w as i64;
            while !stop.load(Ordering::Relaxed) {
                id = (id * 7919 + 13) % ROWS + 1;
                let t = Instant::now();
                let rows = client.query(&stmt, &[&id]).await.unwrap();
                assert_eq!(rows.len(), 1);
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    finish(all, t.elapsed().as_secs_f64(), None)
}

async fn proxied(addr: &str, pid: u32, conc: usize, dur: Duration) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..conc {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let stop = stop.clone();
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut id = w as i64;
            while !stop.load(Ordering::Relaxed) {
                id = (id * 7919 + 13) % ROWS + 1;
                let body = format!(
                    r#"{{"region":{{"lat":40.4168,"lng":-3.7038}},"sql":"{SQL}","params":[{id}],"row_format":"array"}}"#
                );
                let req = http::Request::post("/v1/sql/core/query")
                    .header("host", &addr)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let t = Instant::now();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status();
                let b = resp.into_body().collect().await.unwrap().to_bytes();
                assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&b));
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let cpu0 = cpu_us(pid);
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let cpu = cpu_us(pid) - cpu0;
    let n = all.len().max(1) as f64;
    finish(all, t.elapsed().as_secs_f64(), Some(cpu / n))
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let pairs = arg("--pairs", 3) as usize;
    let secs = Duration::from_secs(arg("--secs", 5));
    let conc = arg("--concurrency", 16) as usize;
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterSpec { shards: 1, replicas_per_shard: 1, fsync: false, ..Default::default() }).unwrap()
    })
    .await
    .unwrap();
    let sh = &cluster.shards[0];
    sh.primary
        .psql(
            "core",
            &format!(
                "CREATE TABLE items (id bigint PRIMARY KEY, name text, v int, h3 bigint);
                 INSERT INTO items SELECT g, 'item-' || g, g % 100, 0 FROM generate_series(1, {ROWS}) g;
                 ALTER TABLE items OWNER TO app; ANALYZE items;"
            ),
        )
        .unwrap();
    sh.wait_for_replicas(Duration::from_secs(30)).unwrap();
    let dir = std::env::temp_dir().join(format!("cellgate-sbs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("map.toml"),
        format!(
            "version = 1\nresolution = 5\n[[shards]]\nid = \"a\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  primary = \"{}\"\n  replicas = [\"{}\"]\n[[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n",
            sh.primary.app_url("core"),
            sh.replicas[0].app_url("core")
        ),
    )
    .unwrap();
    let data_port = free_port();
    let admin_port = free_port();
    std::fs::write(
        dir.join("cellgate.toml"),
        format!(
            "map = {{ path = \"{}\" }}\n[listen]\ndata = \"127.0.0.1:{data_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n[pool]\nmax_size = {conc}\nmin_idle = {conc}\n",
            dir.join("map.toml").display()
        ),
    )
    .unwrap();
    let bin = std::env::var("CELLGATE_BIN").unwrap_or_else(|_| "target/release/cellgate".into());
    let child = Command::new(&bin)
        .args(["serve", "--config", dir.join("cellgate.toml").to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin} (cargo build --release first): {e}"));
    let pid = child.id();
    let _guard = Guard(child);
    let addr = format!("127.0.0.1:{data_port}");
    // Ready when /readyz says so.
    let t = Instant::now();
    loop {
        if let Ok(s) = std::net::TcpStream::connect(format!("127.0.0.1:{admin_port}")) {
            use std::io::{Read, Write};
            let mut s = s;
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "cellgate not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let replica_url = sh.replicas[0].app_url("core");
    // Warm both paths.
    let _ = direct(&replica_url, conc, Duration::from_secs(1)).await;
    let _ = proxied(&addr, pid, conc, Duration::from_secs(1)).await;
    println!(
        "| pair | direct req/s | direct p50 µs | direct p99 µs | cellgate req/s | cellgate p50 µs | cellgate p99 µs | ratio | added p50 µs | cellgate CPU µs/req |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut cpus = Vec::new();
    let mut added = Vec::new();
    for i in 0..pairs {
        let d = direct(&replica_url, conc, secs).await;
        let p = proxied(&addr, pid, conc, secs).await;
        let (dr, pr) = (d.requests as f64 / d.secs, p.requests as f64 / p.secs);
        ratios.push(pr / dr);
        cpus.push(p.cpu_us_per_req.unwrap_or(f64::NAN));
        added.push(p.p50_us - d.p50_us);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.1} |",
            i + 1,
            dr,
            d.p50_us,
            d.p99_us,
            pr,
            p.p50_us,
            p.p99_us,
            pr / dr,
            p.p50_us - d.p50_us,
            p.cpu_us_per_req.unwrap_or(f64::NAN)
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "\nmedian over {pairs} pairs (concurrency {conc}, {}s each): throughput ratio {:.2}, added p50 {:.0} µs, cellgate CPU {:.1} µs/req",
        secs.as_secs(),
        med(&mut ratios),
        med(&mut added),
        med(&mut cpus)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
