//! Live migration between real PostgreSQL shards (logical replication), two cellgate instances,
//! one of them stale: no acknowledged write lost, none on the old owner after the fence, no
//! duplicates; ping-pong; abort during copy.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use tokio::sync::Mutex;

/// The tests of this file run one at a time: each drives hundreds of writes per second through
/// two shards on a 2-core machine, and overlapping them measures the machine, not cellgate.
static SERIAL: Mutex<()> = Mutex::const_new(());

#[derive(Default)]
struct Ledger {
    /// id → (lat, lng) of every acknowledged write
    acked: BTreeMap<i64, (f64, f64)>,
    refused: u64,
    statuses: BTreeMap<u16, u64>,
    details: Vec<String>,
}

/// Writers at ~`rate` writes/s in total over moving and non-moving cells, alternating instances.
fn start_writers(
    http: reqwest::Client,
    datas: Vec<String>,
    rate: u64,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    next_id: Arc<AtomicI64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let workers = 8u64;
    let period = Duration::from_micros(1_000_000 * workers / rate);
    (0..workers)
        .map(|w| {
            let (http, datas, stop, ledger, next_id) =
                (http.clone(), datas.clone(), stop.clone(), ledger.clone(), next_id.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    i += 1;
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let jitter = ((id % 17) as f64 - 8.0) * 0.004;
                    let at = match id % 4 {
                        0 | 1 => (MADRID.0 + jitter, MADRID.1 - jitter),
                        2 => (BARCELONA.0 + jitter, BARCELONA.1),
                        _ => (PARIS.0 + jitter, PARIS.1),
                    };
                    let data = &datas[((w + i) % datas.len() as u64) as usize];
                    let r = http
                        .post(format!("{data}/v1/sql/core/execute"))
                        .bearer_auth(WRITE_TOKEN)
                        .json(&json!({"region": {"lat": at.0, "lng": at.1},
                            "sql": "INSERT INTO items (id, name, lat, lng, h3) VALUES ($1, 'w', $2, $3, $4)",
                            "params": [id, at.0, at.1, h3_of(at.0, at.1)]}))
                        .send()
                        .await;
                    let status = r.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
                    let detail = match r {
                        Ok(r) if status != 200 => r.text().await.unwrap_or_default(),
                        Err(e) => format!("{e:?}"),
                        _ => String::new(),
                    };
                    let mut l = ledger.lock().await;
                    if status != 200 {
                        l.details.push(format!("{status} {detail}"));
                    }
                    *l.statuses.entry(status).or_default() += 1;
                    if status == 200 {
                        l.acked.insert(id, at);
                    } else {
                        l.refused += 1;
                    }
                }
            })
        })
        .collect()
}

async fn admin_post(st: &Stack, admin: &str, path: &str, body: Value) -> (u16, Value) {
    let r = st.http.post(format!("{admin}{path}")).bearer_auth(ADMIN_TOKEN).json(&body).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

async fn wait_state(st: &Stack, admin: &str, id: &str, want: &[&str], within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let r = st.http.get(format!("{admin}/admin/migrations/{id}")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        if want.contains(&v["state"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(
            !["failed"].contains(&v["state"].as_str().unwrap_or("")) || want.contains(&"failed"),
            "migration failed: {v}"
        );
        assert!(t.elapsed() < within, "migration not {want:?} in {within:?}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids_on(node: &cellgate_harness::Node, cond: &str) -> Vec<i64> {
    let out = node.psql("core", &format!("SELECT id FROM items WHERE {cond} ORDER BY id")).unwrap();
    out.lines().filter(|l| !l.is_empty()).map(|l| l.parse().unwrap()).collect()
}

/// Every acknowledged write is on its owner now; no moved-cell row on the old owner was written
/// after the fence; nothing duplicated. Returns (acked, found).
fn verify(st: &Stack, ledger: &Ledger, owner_of_moving: usize) -> (usize, usize) {
    let (a, b) = (&st.cluster.shards[0].primary, &st.cluster.shards[1].primary);
    let on_a: HashSet<i64> = ids_on(a, "true").into_iter().collect();
    let on_b: HashSet<i64> = ids_on(b, "true").into_iter().collect();
    let moving_owner = if owner_of_moving == 0 { &on_a } else { &on_b };
    let mut found = 0;
    for (id, (lat, lng)) in &ledger.acked {
        let home = if in_moving((*lat, *lng)) {
            moving_owner
        } else if lat > &45.0 {
            &on_b
        } else {
            &on_a
        };
        assert!(home.contains(id), "acknowledged write {id} at {lat},{lng} is missing on its owner");
        found += 1;
    }
    // No duplicates across shards, except moved-cell rows left behind on the old owner (the
    // design's step 6 deletes them later): those must also be on the new owner.
    let moving_filter = cellgate::migrate::sql::cell_filter("h3", &[moving_cell().parse().unwrap()]);
    let old = if owner_of_moving == 0 { b } else { a };
    let left_behind: HashSet<i64> = ids_on(old, &moving_filter).into_iter().collect();
    for id in on_a.intersection(&on_b) {
        assert!(left_behind.contains(id), "row {id} is on both shards but is not a moved-cell leftover");
        assert!(moving_owner.contains(id));
    }
    // Nothing written on the old owner after its fence.
    let late = old
        .psql(
            "core",
            &format!(
                "SELECT count(*) FROM items i WHERE {moving_filter} AND i.created_at > (SELECT min(fenced_at) FROM cellgate.fenced_cells)"
            ),
        )
        .unwrap();
    assert_eq!(late, "0", "rows of moved cells written on the old owner after the fence");
    (ledger.acked.len(), found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_under_load_with_a_stale_instance() {
    let _serial = SERIAL.lock().await;
    let mut st = Stack::start(2, 1, |_| {}).await;
    // Instance 2 never hears about the change (no peer push reaches it, no file watch): it is
    // stale and learns from the fence.
    let stale = st
        .add_instance(|c| {
            *c = c.replacen("\" }\n[listen]", "\", watch = false }\n[listen]", 1);
        })
        .await;
    let datas = vec![st.data(), st.data_of(stale)];
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let writers = start_writers(st.http.clone(), datas, 240, stop.clone(), ledger.clone(), Arc::new(AtomicI64::new(1)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let (s, doc) = admin_post(
        &st,
        &st.admin(),
        "/admin/migrations",
        json!({"cells": [moving_cell()], "to": "b", "hold_ms": 2000}),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    assert_eq!(doc["from"], "a");
    let id = doc["id"].as_str().unwrap().to_string();
    let done = wait_state(&st, &st.admin(), &id, &["done"], Duration::from_secs(60)).await;
    let took = t0.elapsed();
    // Keep writing past 10 s in total.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(took).max(Duration::from_secs(3))).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let ledger = ledger.lock().await;
    let (acked, found) = verify(&st, &ledger, 1);
    eprintln!(
        "migration {id}: {took:?}, write pause (hold_ms_max) {} ms, map v{} -> v{}; writes: {acked} acknowledged, {found} found on their owner, {} refused ({:?})",
        done["hold_ms_max"], done["map_version_before"], done["map_version_after"], ledger.refused, ledger.statuses
    );
    eprintln!("refused: {:?}", ledger.details);
    // Only the stale instance may refuse (cells_frozen while the new map is not yet published).
    assert!(ledger.details.iter().all(|d| d.starts_with("503") && d.contains("cells_frozen")), "{:?}", ledger.details);
    assert!(acked >= 2000, "at least 200 writes/s for 10 s: {acked}");
    assert_eq!(done["map_version_after"], 2);
    assert!(done["hold_ms_max"].as_u64().unwrap() <= 2000 + 500, "{done}");
    // Reads of moved cells through both instances return the data (the stale one refreshed on
    // its first fenced write).
    let moved: Vec<i64> = ledger.acked.iter().filter(|(_, (la, ln))| in_moving((*la, *ln))).map(|(i, _)| *i).collect();
    for data in [st.data(), st.data_of(stale)] {
        let r = st
            .http
            .post(format!("{data}/v1/sql/core/query"))
            .bearer_auth(READ_TOKEN)
            .json(&json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT count(*) AS n FROM items WHERE id = ANY($1)", "params": [moved], "consistency": "primary"}))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["shards"][0]["id"], "b", "{data}: {v}");
        assert_eq!(v["rows"][0]["n"], moved.len() as i64, "{data}: {v}");
    }
    // The map file holds the new owner (a restart loads it).
    let file = std::fs::read_to_string(st.dir.join("map.toml")).unwrap();
    assert!(file.contains(&moving_cell()) && file.contains("version = 2"), "{file}");
    st.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_five_times() {
    let _serial = SERIAL.lock().await;
    let mut st = Stack::start(2, 0, |_| {}).await;
    // A second, up-to-date instance: the first pushes maps and freezes to it.
    let peer = st.add_instance(|_| {}).await;
    let peer_admin = st.admin_of(peer);
    let first = st.server.take().unwrap();
    first.shutdown().await;
    // Restart the orchestrating instance with the peer configured.
    let first = cellgate::server::start(
        cellgate::config::Config::parse(&format!(
            "peers = [\"{peer_admin}\"]\npeer_token = \"{ADMIN_TOKEN}\"\n{}",
            config_text(&st.dir)
        ))
        .unwrap(),
        false,
    )
    .await
    .unwrap();
    st.server = Some(first);
    st.wait_ready().await;
    let datas = vec![st.data(), st.data_of(peer)];
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let writers = start_writers(st.http.clone(), datas, 200, stop.clone(), ledger.clone(), Arc::new(AtomicI64::new(1)));
    let mut owner = 0usize;
    let mut pauses = Vec::new();
    for round in 0..5 {
        let to = if owner == 0 { "b" } else { "a" };
        let (s, doc) = admin_post(
            &st,
            &st.admin(),
            "/admin/migrations",
            json!({"cells": [moving_cell()], "to": to, "hold_ms": 2000}),
        )
        .await;
        assert_eq!(s, 202, "round {round}: {doc}");
        let done = wait_state(&st, &st.admin(), doc["id"].as_str().unwrap(), &["done"], Duration::from_secs(60)).await;
        assert!(done["peer_problems"].as_array().unwrap().is_empty(), "{done}");
        pauses.push(done["hold_ms_max"].as_u64().unwrap());
        owner = 1 - owner;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let ledger = ledger.lock().await;
    // After an odd number of moves the cells live on b.
    let (acked, found) = verify_pingpong(&st, &ledger, owner);
    eprintln!(
        "ping-pong: write pauses {pauses:?} ms; writes: {acked} acknowledged, {found} found, {} refused ({:?}) {:?}",
        ledger.refused, ledger.statuses, ledger.details
    );
    assert_eq!(ledger.refused, 0, "no failed write beyond the hold: {:?}", ledger.details);
    st.stop().await;
}

/// After moves back and forth, the current owner has every acknowledged moved-cell write.
fn verify_pingpong(st: &Stack, ledger: &Ledger, owner: usize) -> (usize, usize) {
    let nodes = [&st.cluster.shards[0].primary, &st.cluster.shards[1].primary];
    let on: Vec<HashSet<i64>> = nodes.iter().map(|n| ids_on(n, "true").into_iter().collect()).collect();
    let mut found = 0;
    for (id, (lat, lng)) in &ledger.acked {
        let home = if in_moving((*lat, *lng)) {
            owner
        } else if *lat > 45.0 {
            1
        } else {
            0
        };
        assert!(on[home].contains(id), "acknowledged write {id} missing on its owner");
        found += 1;
    }
    (ledger.acked.len(), found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_copy_leaves_the_source_in_charge() {
    let _serial = SERIAL.lock().await;
    let st = Stack::start(2, 0, |_| {}).await;
    for i in 0..200 {
        st.insert(i + 1, "before", (MADRID.0 + (i % 10) as f64 * 0.003, MADRID.1)).await;
    }
    let (s, doc) =
        admin_post(&st, &st.admin(), "/admin/migrations", json!({"cells": [moving_cell()], "to": "b"})).await;
    assert_eq!(s, 202, "{doc}");
    let id = doc["id"].as_str().unwrap();
    let (s, v) = admin_post(&st, &st.admin(), &format!("/admin/migrations/{id}/abort"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    let done = wait_state(&st, &st.admin(), id, &["aborted"], Duration::from_secs(30)).await;
    assert_eq!(done["map_version_after"], Value::Null);
    let b = &st.cluster.shards[1].primary;
    assert_eq!(b.psql("core", "SELECT count(*) FROM items").unwrap(), "0", "target holds none of the rows");
    assert_eq!(b.psql("core", "SELECT count(*) FROM pg_subscription").unwrap(), "0");
    let a = &st.cluster.shards[0].primary;
    assert_eq!(a.psql("core", "SELECT count(*) FROM pg_publication").unwrap(), "0");
    assert_eq!(a.psql("core", "SELECT count(*) FROM cellgate.fenced_cells").unwrap(), "0");
    // The source still owns and serves the cells: reads and writes go to a.
    let w = st.insert(10_000, "after-abort", MADRID).await;
    assert_eq!(w["shards"][0]["id"], "a");
    let (_, r) = st.query(json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT count(*) AS n FROM items", "consistency": "primary"})).await;
    assert_eq!(r["rows"][0]["n"], 201);
    // Bad requests are refused up front.
    let (s, v) = admin_post(
        &st,
        &st.admin(),
        "/admin/migrations",
        json!({"cells": ["801ffffffffffff", "8039fffffffffff"], "to": "b"}),
    )
    .await;
    assert_eq!(s, 400, "cells of two owners: {v}");
    let (s, v) = admin_post(&st, &st.admin(), "/admin/migrations", json!({"cells": [moving_cell()], "to": "a"})).await;
    assert_eq!(s, 400, "already owned: {v}");
    st.stop().await;
}

/// Send one write through `data`; (status, body).
async fn write_via(st: &Stack, data: &str, body: Value) -> (u16, Value) {
    let r =
        st.http.post(format!("{data}/v1/sql/core/execute")).bearer_auth(WRITE_TOKEN).json(&body).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

/// A write sent through a stale instance right after the cutover either reached the new owner
/// (`b`, with the rows it should have affected) or was refused as retryable; never an
/// acknowledgement from the old owner.
fn assert_not_lost(what: &str, s: u16, v: &Value, affected: u64) -> bool {
    if s == 503 {
        assert_eq!(v["error"]["code"], "cells_frozen", "{what}: {v}");
        return false;
    }
    assert_eq!(s, 200, "{what}: {v}");
    assert_eq!(v["shards"][0]["id"], "b", "{what} acknowledged by the old owner: {v}");
    assert_eq!(v["rows_affected"], affected, "{what}: {v}");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_update_delete_of_rows_only_on_the_new_owner_are_not_lost() {
    let _serial = SERIAL.lock().await;
    let mut st = Stack::start(2, 0, |_| {}).await;
    // One stale instance per probe: each learns the new map from its first fenced write.
    let mut stale = Vec::new();
    for _ in 0..4 {
        stale.push(st.add_instance(|c| *c = c.replacen("\" }\n[listen]", "\", watch = false }\n[listen]", 1)).await);
    }
    for i in 0..20 {
        st.insert(i + 1, "before", (MADRID.0 + (i % 5) as f64 * 0.003, MADRID.1)).await;
    }
    // Every stale instance has written to the cell on map v1 (pools open, map pinned at v1).
    for (k, s) in stale.iter().enumerate() {
        let data = st.data_of(*s);
        let (code, v) = write_via(
            &st,
            &data,
            json!({"region": {"lat": MADRID.0, "lng": MADRID.1},
            "sql": "UPDATE items SET v = $1 WHERE id = 1", "params": [k as i64]}),
        )
        .await;
        assert_eq!((code, v["shards"][0]["id"].clone()), (200, json!("a")), "{v}");
    }
    let (s, doc) = admin_post(
        &st,
        &st.admin(),
        "/admin/migrations",
        json!({"cells": [moving_cell()], "to": "b", "hold_ms": 1000}),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    wait_state(&st, &st.admin(), doc["id"].as_str().unwrap(), &["done"], Duration::from_secs(60)).await;
    // Rows written after the cutover exist only on the new owner.
    for id in 101..=110 {
        let w = st.insert(id, "after", (MADRID.0 + 0.001, MADRID.1 + 0.001)).await;
        assert_eq!(w["shards"][0]["id"], "b");
    }
    let (a, b) = (&st.cluster.shards[0].primary, &st.cluster.shards[1].primary);
    assert_eq!(a.psql("core", "SELECT count(*) FROM items WHERE id > 100").unwrap(), "0");
    let at = json!({"lat": MADRID.0, "lng": MADRID.1});

    let (s, v) = write_via(
        &st,
        &st.data_of(stale[0]),
        json!({"region": at,
        "sql": "UPDATE items SET name = 'updated' WHERE id IN (101, 102)"}),
    )
    .await;
    if assert_not_lost("UPDATE", s, &v, 2) {
        assert_eq!(b.psql("core", "SELECT count(*) FROM items WHERE name = 'updated'").unwrap(), "2");
    }
    let (s, v) = write_via(
        &st,
        &st.data_of(stale[1]),
        json!({"region": at,
        "sql": "DELETE FROM items WHERE id IN (103, 104, 105)"}),
    )
    .await;
    if assert_not_lost("DELETE", s, &v, 3) {
        assert_eq!(b.psql("core", "SELECT count(*) FROM items WHERE id IN (103, 104, 105)").unwrap(), "0");
    }
    let (s, v) = write_via(&st, &st.data_of(stale[2]), json!({"region": at,
        "sql": "INSERT INTO items (id, name, lat, lng, h3) SELECT id + 1000, 'copied', lat, lng, h3 FROM items WHERE id = 106"}))
    .await;
    if assert_not_lost("INSERT ... SELECT", s, &v, 1) {
        assert_eq!(b.psql("core", "SELECT name FROM items WHERE id = 1106").unwrap(), "copied");
    }
    let (s, v) = write_via(
        &st,
        &st.data_of(stale[3]),
        json!({"region": at, "batch": [
        {"sql": "UPDATE items SET v = 77 WHERE id = 107"},
        {"sql": "DELETE FROM items WHERE id = 108"}]}),
    )
    .await;
    if assert_not_lost("2-statement batch", s, &v, 2) {
        assert_eq!(b.psql("core", "SELECT v FROM items WHERE id = 107").unwrap(), "77");
        assert_eq!(b.psql("core", "SELECT count(*) FROM items WHERE id = 108").unwrap(), "0");
    }
    // The old owner got nothing.
    assert_eq!(a.psql("core", "SELECT count(*) FROM items WHERE id > 100").unwrap(), "0");
    st.stop().await;
}

/// The write fence's cost on the write path, on one connection to a fenced shard: today's
/// cellgate write (autocommit INSERT, then the WAL position) against the fenced one as
/// `PgEndpoint::execute` sends it (BEGIN + set_config, the INSERT, COMMIT and the WAL position
/// pipelined, with the statement trigger checking the fence table). Interleaved rounds, 2,000 inserts each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_fence_cost() {
    let _serial = SERIAL.lock().await;
    let st = Stack::start(1, 0, |_| {}).await;
    let a = &st.cluster.shards[0].primary;
    let fenced: h3o::CellIndex = moving_cell().parse().unwrap();
    a.psql("core", cellgate::migrate::sql::SCHEMA).unwrap();
    a.psql("core", &cellgate::migrate::sql::fence_trigger("items", "h3")).unwrap();
    a.psql("core", &cellgate::migrate::sql::fence(&[("items".into(), "h3".into())], &[fenced], "mcost", 5)).unwrap();
    let (c, conn) = tokio_postgres::connect(&a.app_url("core"), tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    let insert = c.prepare("INSERT INTO items (id, name, lat, lng, h3) VALUES ($1, 'cost', $2, $3, $4)").await.unwrap();
    let lsn = c.prepare("SELECT pg_current_wal_lsn()::text").await.unwrap();
    let route = u64::from(cellgate::geo::owning_cell(
        cellgate::geo::point(BARCELONA.0, BARCELONA.1).unwrap(),
        h3o::Resolution::Five,
    ));
    let begin = format!("BEGIN; SELECT set_config('cellgate.route', '{}:5', true)", route as i64);
    let h3 = h3_of(BARCELONA.0, BARCELONA.1);
    let (mut old, mut new) = (Duration::ZERO, Duration::ZERO);
    let mut id = 0i64;
    for _round in 0..4 {
        // Today's path: the statement trigger did not exist.
        a.psql("core", "ALTER TABLE items DISABLE TRIGGER cellgate_fence_stmt").unwrap();
        let t = Instant::now();
        for _ in 0..500 {
            id += 1;
            c.execute(&insert, &[&id, &BARCELONA.0, &BARCELONA.1, &h3]).await.unwrap();
            c.query_one(&lsn, &[]).await.unwrap();
        }
        old += t.elapsed();
        a.psql("core", "ALTER TABLE items ENABLE TRIGGER cellgate_fence_stmt").unwrap();
        let t = Instant::now();
        for _ in 0..500 {
            id += 1;
            let (b, i, cm, l) = futures_util::future::join4(
                c.batch_execute(&begin),
                c.execute(&insert, &[&id, &BARCELONA.0, &BARCELONA.1, &h3]),
                c.batch_execute("COMMIT"),
                c.query_one(&lsn, &[]),
            )
            .await;
            b.unwrap();
            i.unwrap();
            cm.unwrap();
            l.unwrap();
        }
        new += t.elapsed();
    }
    // The fence really is checked on this path: a route into the fenced cell with an older map
    // is refused, one with the fence's version passes.
    let stale = format!("BEGIN; SELECT set_config('cellgate.route', '{}:4', true)", u64::from(fenced) as i64);
    c.batch_execute(&stale).await.unwrap();
    let e = c.execute(&insert, &[&0i64, &MADRID.0, &MADRID.1, &h3_of(MADRID.0, MADRID.1)]).await.unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some(cellgate::migrate::sql::FENCE_SQLSTATE), "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    let ratio = new.as_secs_f64() / old.as_secs_f64();
    eprintln!(
        "write fence cost: 2000 inserts today {:.0} ms ({:.0} µs each), fenced path {:.0} ms ({:.0} µs each), ratio {ratio:.2}",
        old.as_secs_f64() * 1e3,
        old.as_secs_f64() * 1e6 / 2000.0,
        new.as_secs_f64() * 1e3,
        new.as_secs_f64() * 1e6 / 2000.0
    );
    assert!(ratio < 2.0, "the fenced write path costs {ratio:.2}x today's");
    drop(c);
    let _ = driver.await;
    st.stop().await;
}

/// The migration once no task of the orchestrator works on it any more.
async fn settled(st: &Stack, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let r =
            st.http.get(format!("{}/admin/migrations/{id}", st.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        if v["running"] == false {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "migration still running: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A migration whose `admin` role may not set `session_replication_role` (issue 12): it ends
/// `failed` with PostgreSQL's own message, never stays `aborting`, never blocks the next one;
/// after the privilege problem is fixed, `abort` finishes its cleanup and a new migration runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_cleanup_never_wedges_later_migrations() {
    let _serial = SERIAL.lock().await;
    let st = Stack::start(2, 0, |_| {}).await;
    for i in 0..30 {
        st.insert(i + 1, "before", (MADRID.0 + (i % 10) as f64 * 0.003, MADRID.1)).await;
    }
    const MIG_PW: &str = "mig-Pw-4417";
    for sh in &st.cluster.shards {
        // Everything app may do (it owns the database and the tables), but not superuser.
        sh.primary
            .psql("core", &format!("CREATE ROLE migrator LOGIN PASSWORD '{MIG_PW}'; GRANT app TO migrator;"))
            .unwrap();
    }
    let good = std::fs::read_to_string(st.dir.join("map.toml")).unwrap();
    let weak = good
        .replace("version = 1\n", "version = 2\n")
        .replace("postgres:postgres-password@", &format!("migrator:{MIG_PW}@"));
    assert_ne!(weak.matches("migrator:").count(), 0, "{good}");
    std::fs::write(st.dir.join("map.toml"), &weak).unwrap();
    let (s, v) = admin_post(&st, &st.admin(), "/admin/map/reload", json!({})).await;
    assert_eq!(s, 200, "{v}");

    let admin = st.admin();
    let start = || admin_post(&st, &admin, "/admin/migrations", json!({"cells": [moving_cell()], "to": "b"}));
    let (s, doc) = start().await;
    assert_eq!(s, 202, "{doc}");
    let first = doc["id"].as_str().unwrap().to_string();
    // Failed at once (terminal), then its cleanup is tried (and retried) in the background.
    wait_state(&st, &st.admin(), &first, &["failed"], Duration::from_secs(60)).await;
    let failed = settled(&st, &first).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("permission denied to set parameter \"session_replication_role\""), "{failed}");
    assert!(error.contains("SQLSTATE 42501"), "{failed}");
    assert!(error.contains("cleanup failed"), "the failed cleanup is reported: {failed}");
    assert!(!error.contains(MIG_PW) && !failed.to_string().contains(MIG_PW), "{failed}");
    assert_eq!(failed["cleanup_pending"], true, "{failed}");
    assert_eq!(failed["map_version_after"], Value::Null);
    // Not wedged: the next migration starts at once (and fails the same way).
    let (s, doc) = start().await;
    assert_eq!(s, 202, "a failed migration must not block the next one: {doc}");
    let second = doc["id"].as_str().unwrap().to_string();
    wait_state(&st, &st.admin(), &second, &["failed"], Duration::from_secs(60)).await;
    settled(&st, &second).await;
    // The source kept the cells all along.
    let w = st.insert(500, "during", MADRID).await;
    assert_eq!(w["shards"][0]["id"], "a");

    // Privilege problem fixed (the superuser again): abort retries the first one's cleanup.
    std::fs::write(st.dir.join("map.toml"), good.replace("version = 1\n", "version = 3\n")).unwrap();
    let (s, v) = admin_post(&st, &st.admin(), "/admin/map/reload", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = admin_post(&st, &st.admin(), &format!("/admin/migrations/{first}/abort"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    wait_state(&st, &st.admin(), &first, &["aborted"], Duration::from_secs(60)).await;
    let aborted = settled(&st, &first).await;
    assert_eq!(aborted["cleanup_pending"], false, "{aborted}");
    let (s, v) = admin_post(&st, &st.admin(), &format!("/admin/migrations/{first}/abort"), json!({})).await;
    assert_eq!(s, 409, "aborted is terminal: {v}");
    // And a new migration runs to the end.
    let (s, doc) = start().await;
    assert_eq!(s, 202, "{doc}");
    let done = wait_state(&st, &st.admin(), doc["id"].as_str().unwrap(), &["done"], Duration::from_secs(60)).await;
    assert_eq!(done["map_version_after"], 4, "{done}");
    let b = &st.cluster.shards[1].primary;
    assert_eq!(b.psql("core", "SELECT count(*) FROM items").unwrap(), "31");
    st.stop().await;
}
