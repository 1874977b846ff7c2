//! Writers and checks shared by the fleet-mode migration tests (tests/etcd_migrate.rs,
//! tests/etcd_takeover.rs): ~300 writes/s through a set of instances, each answer recorded as
//! the fate of the rows it touched, and the check of every fate against both primaries
//! (acknowledged writes applied exactly once on the final owner, refused ones absent).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

/// GET (no body) or POST `path` on an admin base URL as the admin; (status, JSON or null).
pub async fn admin_at(http: &reqwest::Client, admin: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{admin}{path}");
    let req = match body {
        Some(b) => http.post(url).json(&b),
        None => http.get(url),
    };
    let resp = req.bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

/// Poll migration `id` on an admin base URL until it is done; fails on failed/aborted or after
/// `within`.
pub async fn wait_done_at(http: &reqwest::Client, admin: &str, id: &str, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let (_, v) = admin_at(http, admin, &format!("/admin/migrations/{id}"), None).await;
        match v["state"].as_str().unwrap_or("") {
            "done" => return v,
            "failed" | "aborted" => panic!("migration ended {}: {v}", v["state"]),
            _ => {}
        }
        assert!(t.elapsed() < within, "migration not done in {within:?}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the shards must hold for one row id, from the answers the writers got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fate {
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
pub struct Writer {
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

pub enum Op {
    Insert(i64, (f64, f64)),
    Update(i64, i64),
    Delete(i64),
    /// Insert of a new id next to an existing row, and an update of that row.
    Batch(i64, i64, i64),
}

pub fn insert_stmt(id: i64, at: (f64, f64)) -> Value {
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
pub async fn write_loop(
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

/// id → v of every row on a primary.
pub fn rows_on(node: &cellgate_harness::Node) -> HashMap<i64, i64> {
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
pub fn writers(
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
pub fn check(label: &str, all: &[Writer], a: &HashMap<i64, i64>, b: &HashMap<i64, i64>, owner: &str) {
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
