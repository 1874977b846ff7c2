//! Live migrations in fleet mode (docs/migrations.md, "etcd mode"), against a real etcd started
//! here and real PostgreSQL shards. Phase 1: three instances on one etcd under ~300 writes/s, one
//! of them cut off from etcd (its link goes through a TCP forwarder the test stops); a populous
//! cell moves a → b; the cut-off instance keeps its old map, and its writes into the moved cell
//! are refused by the source's fence. Phase 2: its link restored, the cell moves back; the
//! orchestrator stops after the fence (failpoint, as a crash would) and leaves the fleet; a fourth
//! instance started then holds the freeze before it serves; another instance resumes the
//! migration (refused while the orchestrator is still live). Every outcome is checked by reading
//! both primaries: acknowledged writes applied exactly once on the final owner, refused ones absent.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellgate::server::Running;
use serde_json::{Value, json};
use support::etcd::{Etcd, free_port};
use support::*;

const PREFIX: &str = "/cellgate/migrate";

/// A TCP forwarder to etcd that the test can stop (every connection cut at once) and start again
/// on the same port: an instance behind it loses etcd as in a network partition.
struct Forwarder {
    port: u16,
    to: u16,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Forwarder {
    async fn start(to: u16) -> Forwarder {
        let f = Forwarder { port: free_port(), to, tasks: Arc::default() };
        f.listen().await;
        f
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn listen(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let (to, tasks) = (self.to, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Stop accepting and drop every open connection.
    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// What the shards must hold for one row id, from the answers the writers got.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Inserted (acknowledged) and `v` is its last acknowledged value.
    Live(i64),
    /// An acknowledged delete.
    Deleted,
    /// Its insert was refused: it must not exist.
    NeverWritten,
    /// An answer that does not say whether it ran (transport error, timeout): not checked.
    Unknown,
}

#[derive(Default)]
struct Writer {
    rows: BTreeMap<i64, ((f64, f64), Fate)>,
    live: Vec<i64>,
    sent: u64,
    acked: u64,
    refused: u64,
    unknown: u64,
    statuses: BTreeMap<String, u64>,
    /// Acknowledged writes whose effect was not what they asked for (0 rows from an old owner).
    wrong: Vec<String>,
}

enum Op {
    Insert(i64, (f64, f64)),
    Update(i64, i64),
    Delete(i64),
    /// Insert of a new id next to an existing row, and an update of that row.
    Batch(i64, i64, i64),
}

fn insert_stmt(id: i64, at: (f64, f64)) -> Value {
    json!({"sql": "INSERT INTO items (id, name, v, lat, lng, h3) VALUES ($1, 'w', 0, $2, $3, $4)",
           "params": [id, at.0, at.1, h3_of(at.0, at.1)]})
}

impl Writer {
    fn at(&self, id: i64) -> (f64, f64) {
        self.rows[&id].0
    }

    fn body(&self, op: &Op) -> (Value, u64) {
        let region = |at: (f64, f64)| json!({"lat": at.0, "lng": at.1});
        match op {
            Op::Insert(id, at) => {
                let mut b = insert_stmt(*id, *at);
                b["region"] = region(*at);
                (b, 1)
            }
            Op::Update(id, v) => (
                json!({"region": region(self.at(*id)), "sql": "UPDATE items SET v = $2 WHERE id = $1", "params": [id, v]}),
                1,
            ),
            Op::Delete(id) => {
                (json!({"region": region(self.at(*id)), "sql": "DELETE FROM items WHERE id = $1", "params": [id]}), 1)
            }
            Op::Batch(new, id, v) => {
                let at = self.at(*id);
                (
                    json!({"region": region(at), "batch": [insert_stmt(*new, at),
                        {"sql": "UPDATE items SET v = $2 WHERE id = $1", "params": [id, v]}]}),
                    2,
                )
            }
        }
    }

    /// Record the answer: the fates of the ids the op touched.
    fn record(&mut self, op: &Op, status: u16, v: &Value, want_rows: u64) {
        let code = v["error"]["code"].as_str().unwrap_or("").to_string();
        *self.statuses.entry(if status == 200 { "200".into() } else { format!("{status} {code}") }).or_default() += 1;
        self.sent += 1;
        // Nothing ran: cells_frozen (held past the hold, or refused by a fence and rolled back),
        // or request_timeout (the server never read the request: a keep-alive connection it
        // closed for idling as the client reused it).
        let refused = (status == 503 && code == "cells_frozen") || (status == 408 && code == "request_timeout");
        let ok = status == 200;
        if ok {
            self.acked += 1;
            if v["rows_affected"] != want_rows {
                self.wrong.push(format!("{} rows {} (want {want_rows}): {v}", self.describe(op), v["rows_affected"]));
            }
        } else if refused {
            self.refused += 1;
        } else {
            self.unknown += 1;
        }
        let batch_at = match op {
            Op::Batch(_, id, _) => Some(self.rows[id].0),
            _ => None,
        };
        let mut set = |id: i64, at: Option<(f64, f64)>, fate: Fate| {
            let at = at.unwrap_or_else(|| self.rows[&id].0);
            self.rows.insert(id, (at, fate));
            match fate {
                Fate::Live(_) => {
                    if !self.live.contains(&id) {
                        self.live.push(id);
                    }
                }
                _ => self.live.retain(|x| *x != id),
            }
        };
        match *op {
            Op::Insert(id, at) => set(
                id,
                Some(at),
                if ok {
                    Fate::Live(0)
                } else if refused {
                    Fate::NeverWritten
                } else {
                    Fate::Unknown
                },
            ),
            Op::Update(id, nv) => {
                if ok {
                    set(id, None, Fate::Live(nv));
                } else if !refused {
                    set(id, None, Fate::Unknown);
                }
            }
            Op::Delete(id) => {
                if ok {
                    set(id, None, Fate::Deleted);
                } else if !refused {
                    set(id, None, Fate::Unknown);
                }
            }
            Op::Batch(new, id, nv) => {
                let at = batch_at.expect("batch");
                if ok {
                    set(new, Some(at), Fate::Live(0));
                    set(id, None, Fate::Live(nv));
                } else if refused {
                    set(new, Some(at), Fate::NeverWritten);
                } else {
                    set(new, Some(at), Fate::Unknown);
                    set(id, None, Fate::Unknown);
                }
            }
        }
    }

    fn describe(&self, op: &Op) -> String {
        match op {
            Op::Insert(id, _) => format!("insert {id}"),
            Op::Update(id, _) => format!("update {id}"),
            Op::Delete(id) => format!("delete {id}"),
            Op::Batch(n, id, _) => format!("batch insert {n} + update {id}"),
        }
    }
}

/// One writer task: its own ids, one request at a time, through the instances in turn. A
/// request refused before it reached an instance (connection refused) ran nowhere.
async fn write_loop(
    w: u64,
    http: reqwest::Client,
    datas: Vec<String>,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> Writer {
    let mut me = Writer::default();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    let mut next_id = (w as i64 + 1) * 10_000_000;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let jitter = ((n % 17) as f64 - 8.0) * 0.004;
        // Most writes go into the moving cell: that is where the cutover can lose one.
        let place = match n % 4 {
            0..=2 => (MADRID.0 + jitter, MADRID.1 - jitter),
            _ => (PARIS.0 + jitter, PARIS.1),
        };
        let pick = |me: &Writer| me.live[(n as usize * 7919) % me.live.len()];
        let op = match (n % 10, me.live.len()) {
            (_, 0..=4) | (0..=3, _) => {
                next_id += 1;
                Op::Insert(next_id, place)
            }
            (4..=6, _) => Op::Update(pick(&me), n as i64),
            (7, _) => Op::Delete(pick(&me)),
            _ => {
                next_id += 1;
                Op::Batch(next_id, pick(&me), n as i64)
            }
        };
        let (body, want) = me.body(&op);
        let data = &datas[((w + n) % datas.len() as u64) as usize];
        let r = http.post(format!("{data}/v1/sql/core/execute")).bearer_auth(WRITE_TOKEN).json(&body).send().await;
        let (status, v) = match r {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.json::<Value>().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        };
        me.record(&op, status, &v, want);
    }
    me
}

/// One instance reading its map from etcd at `endpoint` (the etcd itself, or a forwarder).
async fn instance(stack: &Stack, endpoint: &str, id: &str) -> Running {
    let line = format!(
        "map = {{ etcd = {{ endpoints = [\"{endpoint}\"], prefix = \"{PREFIX}\", instance_id = \"{id}\", timeout_ms = 1000, lease_ttl_s = 2 }} }}"
    );
    let cfg: String = config_text(&stack.dir)
        .lines()
        .map(|l| if l.starts_with("map = ") { line.clone() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let running = cellgate::server::start(cellgate::config::Config::parse(&cfg).unwrap(), false).await.unwrap();
    wait_ready(&stack.http, &format!("http://{}", running.admin_addr), Duration::from_secs(30)).await;
    running
}

fn data(r: &Running) -> String {
    format!("http://{}", r.data_addr)
}

fn admin(r: &Running) -> String {
    format!("http://{}", r.admin_addr)
}

async fn admin_call(http: &reqwest::Client, r: &Running, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}{path}", admin(r));
    let req = match body {
        Some(b) => http.post(url).json(&b),
        None => http.get(url),
    };
    let resp = req.bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

async fn wait_done(http: &reqwest::Client, r: &Running, id: &str, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let (_, v) = admin_call(http, r, &format!("/admin/migrations/{id}"), None).await;
        match v["state"].as_str().unwrap_or("") {
            "done" => return v,
            "failed" | "aborted" => panic!("migration ended {}: {v}", v["state"]),
            _ => {}
        }
        assert!(t.elapsed() < within, "migration not done in {within:?}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// id → v of every row on a primary.
fn rows_on(node: &cellgate_harness::Node) -> HashMap<i64, i64> {
    let out = node.psql("core", "SELECT id, coalesce(v, -1) FROM items").unwrap();
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (id, v) = l.split_once('|').unwrap();
            (id.parse().unwrap(), v.parse().unwrap())
        })
        .collect()
}

/// Writers at ~300 writes/s over `datas`.
fn writers(
    http: &reqwest::Client,
    datas: Vec<String>,
    first: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Writer>> {
    let (workers, rate) = (12u64, 300u64);
    let period = Duration::from_micros(1_000_000 * workers / rate);
    (first..first + workers)
        .map(|w| tokio::spawn(write_loop(w, http.clone(), datas.clone(), period, stop.clone())))
        .collect()
}

/// Every writer's outcome against both primaries, `owner` owning the moving cell now.
fn check(label: &str, all: &[Writer], a: &HashMap<i64, i64>, b: &HashMap<i64, i64>, owner: &str) {
    let final_owner = if owner == "a" { a } else { b };
    let mut problems = Vec::new();
    let (mut sent, mut acked, mut refused, mut unknown, mut checked) = (0, 0, 0, 0, 0);
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for w in all {
        sent += w.sent;
        acked += w.acked;
        refused += w.refused;
        unknown += w.unknown;
        for (k, n) in &w.statuses {
            *statuses.entry(k.clone()).or_default() += n;
        }
        problems.extend(w.wrong.iter().cloned());
        for (id, (at, fate)) in &w.rows {
            let (home, other) = if in_moving(*at) {
                (final_owner, if owner == "a" { b } else { a })
            } else if at.0 > 45.0 {
                (b, a)
            } else {
                (a, b)
            };
            match fate {
                Fate::Live(v) => match home.get(id) {
                    Some(got) if got == v => {}
                    got => problems.push(format!("row {id} at {at:?}: want v={v}, owner has {got:?}")),
                },
                Fate::Deleted | Fate::NeverWritten => {
                    if home.contains_key(id) {
                        problems.push(format!("row {id} at {at:?} is {fate:?} but exists on its owner"));
                    }
                }
                Fate::Unknown => continue,
            }
            if !in_moving(*at) && other.contains_key(id) {
                problems.push(format!("row {id} at {at:?} is on the wrong shard too"));
            }
            checked += 1;
        }
    }
    eprintln!(
        "{label}: writes sent {sent}, acknowledged {acked}, refused {refused}, unknown {unknown}; {checked} rows checked on the primaries; statuses {statuses:?}"
    );
    assert!(
        problems.is_empty(),
        "{label}: {} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    assert_eq!(unknown, 0, "{label}: answers that do not say whether the write ran: {statuses:?}");
    assert!(acked > 500, "{label}: {statuses:?}");
}

/// Insert into the moving cell through `r`: (status, error code).
async fn insert_moving(http: &reqwest::Client, r: &Running, id: i64) -> (u16, String) {
    let at = (MADRID.0, MADRID.1);
    let body = json!({"region": {"lat": at.0, "lng": at.1},
        "sql": "INSERT INTO items (id, name, v, lat, lng, h3) VALUES ($1, 'probe', 0, $2, $3, $4)",
        "params": [id, at.0, at.1, h3_of(at.0, at.1)]});
    let resp = http
        .post(format!("{}/v1/sql/core/execute", data(r)))
        .bearer_auth(WRITE_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (s, v["error"]["code"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_through_etcd_survive_a_partition_a_late_joiner_and_the_orchestrators_death() {
    let etcd = tokio::task::block_in_place(Etcd::start);
    let stack = Stack::start(2, 0, |_| {}).await;
    let http = stack.http.clone();
    cellgate::etcd::push_map(&etcd.target(PREFIX), &map_toml(&stack.cluster, None), None).await.unwrap();
    let proxy = Forwarder::start(etcd.client_port).await;
    let mut i0 = Some(instance(&stack, &etcd.url(), "i0").await);
    let i1 = instance(&stack, &etcd.url(), "i1").await;
    let i2 = instance(&stack, &proxy.url(), "i2").await;
    let t0 = Instant::now();
    while cellgate::etcd::fleet_status(&etcd.target(PREFIX)).await.unwrap().instances.len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "three instances not registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ---- Phase 1: a → b under load through all three, i2 cut off from etcd.
    let stop = Arc::new(AtomicBool::new(false));
    let datas = vec![data(i0.as_ref().unwrap()), data(&i1), data(&i2)];
    let tasks = writers(&http, datas, 0, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    let (s, doc) = admin_call(
        &http,
        i0.as_ref().unwrap(),
        "/admin/migrations",
        Some(json!({"cells": [moving_cell()], "to": "b", "hold_ms": 3000})),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    let id1 = doc["id"].as_str().unwrap().to_string();
    let done = wait_done(&http, i0.as_ref().unwrap(), &id1, Duration::from_secs(90)).await;
    eprintln!("phase 1 migration: {done}");
    // Both linked instances serve v2; the cut-off one still serves v1 and refuses writes into
    // the moved cell (the source's fence), acknowledging none.
    for r in [i0.as_ref().unwrap(), &i1] {
        assert_eq!(admin_call(&http, r, "/admin/map", None).await.1["version"], 2);
    }
    assert_eq!(admin_call(&http, &i2, "/admin/map", None).await.1["version"], 1);
    assert_eq!(admin_call(&http, &i2, "/admin/fleet", None).await.1["etcd"]["connected"], false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut phase1 = Vec::new();
    for t in tasks {
        phase1.push(t.await.unwrap());
    }
    for k in 0..5 {
        let (s, code) = insert_moving(&http, &i2, 900_000_000 + k).await;
        assert_eq!((s, code.as_str()), (503, "cells_frozen"), "cut-off instance, write {k} into the moved cell");
    }
    let (a, b) = (rows_on(&stack.cluster.shards[0].primary), rows_on(&stack.cluster.shards[1].primary));
    check("phase 1", &phase1, &a, &b, "b");
    for k in 0..5 {
        assert!(
            !a.contains_key(&(900_000_000 + k)) && !b.contains_key(&(900_000_000 + k)),
            "refused probe {k} written"
        );
    }

    // ---- Phase 2: i2's link back (it catches up); b → a, the orchestrator stops after the fence.
    proxy.listen().await;
    let t0 = Instant::now();
    while admin_call(&http, &i2, "/admin/map", None).await.1["version"] != 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "i2 did not catch up with etcd");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(&http, vec![data(&i1), data(&i2)], 100, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cellgate::migrate::arm_failpoint("after_fence");
    let (s, doc) = admin_call(
        &http,
        i0.as_ref().unwrap(),
        "/admin/migrations",
        Some(json!({"cells": [moving_cell()], "to": "a", "hold_ms": 2000})),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    let id2 = doc["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let (_, d) = admin_call(&http, i0.as_ref().unwrap(), &format!("/admin/migrations/{id2}"), None).await;
        if d["fenced"] == true && d["running"] == false {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "orchestrator did not stop after the fence: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The freeze stays in etcd (nobody released it). A fourth instance holds it before it serves:
    // `start` returns with the listeners serving, so the hold must be in place by then.
    let i3 = instance(&stack, &etcd.url(), "i3").await;
    let held = i3.state.freeze.borrow().as_ref().map(|f| f.id.clone());
    assert_eq!(held.as_deref(), Some(id2.as_str()), "the late joiner does not hold the freeze");
    // While the orchestrator is registered, nobody else takes the migration over.
    let (s, v) = admin_call(&http, &i1, &format!("/admin/migrations/{id2}/resume"), Some(json!({}))).await;
    assert_eq!(s, 409, "{v}");
    assert!(v.to_string().contains("orchestrated by instance i0"), "{v}");
    // The orchestrator goes away; i1 resumes from etcd + the shards' progress tables.
    i0.take().unwrap().shutdown().await;
    let (s, v) = admin_call(&http, &i1, &format!("/admin/migrations/{id2}/resume"), Some(json!({}))).await;
    assert_eq!(s, 200, "{v}");
    let done = wait_done(&http, &i1, &id2, Duration::from_secs(90)).await;
    eprintln!("phase 2 migration (resumed by i1): {done}");
    for r in [&i1, &i2, &i3] {
        assert_eq!(admin_call(&http, r, "/admin/map", None).await.1["version"], 3);
        assert!(r.state.freeze.borrow().is_none(), "freeze released everywhere");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut phase2 = Vec::new();
    for t in tasks {
        phase2.push(t.await.unwrap());
    }
    let (a, b) = (rows_on(&stack.cluster.shards[0].primary), rows_on(&stack.cluster.shards[1].primary));
    // Phase 1's rows of the moving cell moved back with it: every writer checked against a.
    phase2.extend(phase1);
    check("phase 1 + 2", &phase2, &a, &b, "a");
    // i3 loaded the interrupted migration at its start; finished elsewhere, it no longer counts
    // as "one at a time" there: a migration started on i3 runs.
    let (s, doc) = admin_call(
        &http,
        &i3,
        "/admin/migrations",
        Some(json!({"cells": [moving_cell()], "to": "b", "hold_ms": 2000})),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    wait_done(&http, &i3, doc["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    for r in [&i1, &i2, &i3] {
        assert_eq!(admin_call(&http, r, "/admin/map", None).await.1["version"], 4);
    }
    for r in [i1, i2, i3] {
        r.shutdown().await;
    }
    stack.stop().await;
    proxy.cut();
}
