//! Migrations of a mixed shard: PostgreSQL `core` (logical replication) and MongoDB `profiles`
//! (documents copied by their `geo_field`, fenced on the old owner) move together, back and
//! forth, under inserts, updates and deletes of both kinds through three instances (current,
//! file without watch, own never-updated map). Checked by reading every server directly: each
//! acknowledged write applied exactly once on the final owner, refused ones absent, no document
//! of the moved cell left on the old owner. Runs on both MongoDB peers (CongoDB, SecantusDB).
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bson::{Document, doc};
use futures_util::TryStreamExt;
use serde_json::{Value, json};
use support::mongo::{Peer, PeerKind};
use support::*;
use tokio::sync::Mutex;

/// One test at a time: each drives two shards of both kinds on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Live(i64),
    Deleted,
    NeverWritten,
    Unknown,
}

#[derive(Default)]
struct Writer {
    /// MongoDB documents by business key `k`.
    docs: BTreeMap<i64, ((f64, f64), Fate)>,
    live: Vec<i64>,
    /// PostgreSQL rows (inserts only).
    rows: BTreeMap<i64, ((f64, f64), Fate)>,
    statuses: BTreeMap<String, u64>,
    wrong: Vec<String>,
}

impl Writer {
    fn fate(status: u16, v: &Value) -> Result<(), bool> {
        // Ok: acknowledged; Err(true): refused (nothing ran: cells_frozen, or request_timeout —
        // the server never read the request); Err(false): unknown.
        let code = &v["error"]["code"];
        if status == 200 {
            Ok(())
        } else {
            Err((status == 503 && code == "cells_frozen") || (status == 408 && code == "request_timeout"))
        }
    }

    fn set(&mut self, k: i64, at: (f64, f64), fate: Fate) {
        self.docs.insert(k, (at, fate));
        self.live.retain(|x| *x != k);
        if let Fate::Live(_) = fate {
            self.live.push(k);
        }
    }
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    match http.post(url).bearer_auth(WRITE_TOKEN).json(&body).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

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
    let mut next = (w as i64 + 1) * 10_000_000;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let data = &datas[((w + n) % datas.len() as u64) as usize];
        let jitter = ((n % 17) as f64 - 8.0) * 0.004;
        let place = match n % 4 {
            0 | 1 => (MADRID.0 + jitter, MADRID.1 - jitter),
            2 => (BARCELONA.0 + jitter, BARCELONA.1),
            _ => (PARIS.0 + jitter, PARIS.1),
        };
        let region = |at: (f64, f64)| json!({"lat": at.0, "lng": at.1});
        let (label, status, v) = if n.is_multiple_of(3) {
            // PostgreSQL insert on the same shard as the documents.
            next += 1;
            let id = next;
            let (s, v) = post(
                &http,
                format!("{data}/v1/sql/core/execute"),
                json!({"region": region(place),
                "sql": "INSERT INTO items (id, name, lat, lng, h3) VALUES ($1, 'w', $2, $3, $4)",
                "params": [id, place.0, place.1, h3_of(place.0, place.1)]}),
            )
            .await;
            let fate = match Writer::fate(s, &v) {
                Ok(()) => Fate::Live(0),
                Err(true) => Fate::NeverWritten,
                Err(false) => Fate::Unknown,
            };
            me.rows.insert(id, (place, fate));
            ("sql insert", s, v)
        } else if me.live.len() < 5 || n % 3 == 1 && n.is_multiple_of(2) {
            next += 1;
            let k = next;
            // No region: the document's own location routes it.
            let (s, v) = post(
                &http,
                format!("{data}/v1/docs/profiles/people/insert"),
                json!({"documents": [
                {"k": k, "v": 0, "loc": {"type": "Point", "coordinates": [place.1, place.0]}}]}),
            )
            .await;
            let fate = match Writer::fate(s, &v) {
                Ok(()) => {
                    if v["inserted_count"] != 1 {
                        me.wrong.push(format!("insert {k}: {v}"));
                    }
                    Fate::Live(0)
                }
                Err(true) => Fate::NeverWritten,
                Err(false) => Fate::Unknown,
            };
            me.set(k, place, fate);
            ("doc insert", s, v)
        } else {
            let k = me.live[(n as usize * 7919) % me.live.len()];
            let at = me.docs[&k].0;
            if n.is_multiple_of(5) {
                let (s, v) = post(
                    &http,
                    format!("{data}/v1/docs/profiles/people/delete"),
                    json!({"region": region(at), "filter": {"k": k}}),
                )
                .await;
                match Writer::fate(s, &v) {
                    Ok(()) => {
                        if v["deleted"] != 1 {
                            me.wrong.push(format!("delete {k} acknowledged without its effect: {v}"));
                        }
                        me.set(k, at, Fate::Deleted);
                    }
                    Err(true) => {}
                    Err(false) => me.set(k, at, Fate::Unknown),
                }
                ("doc delete", s, v)
            } else {
                let nv = n as i64;
                let (s, v) = post(
                    &http,
                    format!("{data}/v1/docs/profiles/people/update"),
                    json!({"region": region(at), "filter": {"k": k}, "update": {"$set": {"v": nv}}}),
                )
                .await;
                match Writer::fate(s, &v) {
                    Ok(()) => {
                        if v["matched"] != 1 {
                            me.wrong.push(format!("update {k} acknowledged without its effect: {v}"));
                        }
                        me.set(k, at, Fate::Live(nv));
                    }
                    Err(true) => {}
                    Err(false) => me.set(k, at, Fate::Unknown),
                }
                ("doc update", s, v)
            }
        };
        let code = v["error"]["code"].as_str().unwrap_or("");
        *me.statuses.entry(format!("{label} {status} {code}").trim().to_string()).or_default() += 1;
    }
    me
}

/// k → (copies, v) of every document on a server, read directly.
async fn docs_on(peer: &Peer) -> HashMap<i64, (usize, i64)> {
    let c = peer.client().await;
    let all: Vec<Document> = c
        .database("profiles")
        .collection::<Document>("people")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut out: HashMap<i64, (usize, i64)> = HashMap::new();
    for d in all {
        let k = d.get_i64("k").or_else(|_| d.get_i32("k").map(i64::from)).unwrap();
        let v = d.get_i64("v").or_else(|_| d.get_i32("v").map(i64::from)).unwrap_or(-1);
        let e = out.entry(k).or_insert((0, v));
        e.0 += 1;
        e.1 = v;
    }
    out
}

fn rows_on(node: &cellgate_harness::Node) -> HashMap<i64, i64> {
    let out = node.psql("core", "SELECT id, 0 FROM items").unwrap();
    out.lines().filter(|l| !l.is_empty()).map(|l| (l.split_once('|').unwrap().0.parse().unwrap(), 0)).collect()
}

/// Two shards, each with PostgreSQL `core` and MongoDB `profiles` (on its own peer). Without
/// `sql_moves`, `core` has no `[tables]` entry with a cell column: migrations move MongoDB only
/// (and keep their records only on MongoDB).
async fn mixed_stack(kind: PeerKind, sql_moves: bool) -> (Stack, [Peer; 2]) {
    let peers = [Peer::start(kind), Peer::start(kind)];
    let uris: Vec<String> = peers.iter().map(Peer::uri).collect();
    let st = Stack::start_map(
        2,
        0,
        |map| {
            // Each shard also holds the `profiles` MongoDB database on its own peer.
            for (id, uri) in ["a", "b"].iter().zip(&uris) {
                let at = map.find(&format!("id = \"{id}\"")).unwrap();
                let end = map[at..].find("[[").map(|i| at + i).unwrap_or(map.len());
                map.insert_str(
                    end,
                    &format!("  [shards.databases.profiles]\n  kind = \"mongodb\"\n  uri = \"{uri}\"\n"),
                );
            }
            map.push_str("[tables.profiles.people]\ngeo_field = \"loc\"\n");
            if !sql_moves {
                *map = map.replace("[tables.core.items]\ncell_column = \"h3\"\n", "");
            }
        },
        |_| {},
    )
    .await;
    (st, peers)
}

async fn mixed_shard_migrations_under_load(kind: PeerKind) {
    let _serial = SERIAL.lock().await;
    let (mut st, peers) = mixed_stack(kind, true).await;
    let off = |c: &mut String| *c = c.replacen("\" }\n[listen]", "\", watch = false }\n[listen]", 1);
    let no_watch = st.add_instance(off).await;
    let own_copy = st.add_instance_with_own_map(off).await;
    let datas = vec![st.data(), st.data_of(no_watch), st.data_of(own_copy)];
    let (workers, rate) = (12u64, 240u64);
    let period = Duration::from_micros(1_000_000 * workers / rate);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..workers)
        .map(|w| tokio::spawn(write_loop(w, st.http.clone(), datas.clone(), period, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let mut owner = 0usize;
    let mut report = Vec::new();
    for round in 0..6 {
        let to = if owner == 0 { "b" } else { "a" };
        let r = st
            .http
            .post(format!("{}/admin/migrations", st.admin()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"cells": [moving_cell()], "to": to, "hold_ms": 3000}))
            .send()
            .await
            .unwrap();
        let (s, doc): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
        assert_eq!(s, 202, "round {round}: {doc}");
        assert!(doc["tables"].as_array().unwrap().contains(&json!("profiles.people")), "{doc}");
        let id = doc["id"].as_str().unwrap().to_string();
        let done = loop {
            let v = st.admin_value(&format!("/admin/migrations/{id}")).await;
            match v["state"].as_str().unwrap() {
                "done" => break v,
                "failed" | "aborted" => panic!("round {round}: {v}"),
                _ => {}
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "{v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        report.push(format!(
            "{}→{to}: hold {} ms, {} rows+docs",
            if owner == 0 { "a" } else { "b" },
            done["hold_ms_max"],
            done["rows_copied"]
        ));
        owner = 1 - owner;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let docs = [docs_on(&peers[0]).await, docs_on(&peers[1]).await];
    let rows = [rows_on(&st.cluster.shards[0].primary), rows_on(&st.cluster.shards[1].primary)];
    let home_of = |at: (f64, f64)| {
        if in_moving(at) {
            owner
        } else if at.0 > 45.0 {
            1
        } else {
            0
        }
    };
    let mut problems = Vec::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let (mut checked_docs, mut checked_rows) = (0, 0);
    for w in &all {
        problems.extend(w.wrong.iter().cloned());
        for (k, n) in &w.statuses {
            *statuses.entry(k.clone()).or_default() += n;
        }
        for (k, (at, fate)) in &w.docs {
            let home = home_of(*at);
            let (here, there) = (docs[home].get(k), docs[1 - home].get(k));
            match fate {
                Fate::Live(v) => {
                    if here != Some(&(1, *v)) {
                        problems.push(format!(
                            "document k={k} at {at:?}: want one with v={v} on its owner, found {here:?}"
                        ));
                    }
                }
                Fate::Deleted | Fate::NeverWritten => {
                    if here.is_some() {
                        problems.push(format!("document k={k} at {at:?} is {fate:?} but its owner has {here:?}"));
                    }
                }
                Fate::Unknown => continue,
            }
            // Documents are removed from the old owner once a migration is done: nothing of
            // the moved cell (or anything else) stays on the other shard.
            if there.is_some() {
                problems.push(format!("document k={k} at {at:?} also on the non-owner: {there:?}"));
            }
            checked_docs += 1;
        }
        for (id, (at, fate)) in &w.rows {
            let home = home_of(*at);
            match fate {
                Fate::Live(_) if !rows[home].contains_key(id) => {
                    problems.push(format!("row {id} at {at:?} missing on its owner"))
                }
                Fate::NeverWritten if rows[home].contains_key(id) => problems.push(format!("refused row {id} exists")),
                _ => {}
            }
            checked_rows += 1;
        }
    }
    eprintln!(
        "{kind:?}: 6 cutovers of a PostgreSQL + MongoDB shard in {took:?} [{}]; {checked_docs} documents and {checked_rows} rows checked on the servers; {statuses:?}",
        report.join("; ")
    );
    assert!(problems.is_empty(), "{} problems, first: {:?}", problems.len(), &problems[..problems.len().min(10)]);
    let unknown: u64 = statuses
        .iter()
        .filter(|(k, _)| !k.contains(" 200") && !k.contains("cells_frozen") && !k.contains("request_timeout"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(unknown, 0, "answers that do not say whether the write ran: {statuses:?}");
    st.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_shard_migrations_under_load_congodb() {
    mixed_shard_migrations_under_load(PeerKind::Congo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_shard_migrations_under_load_secantusdb() {
    mixed_shard_migrations_under_load(PeerKind::Secantus).await;
}

async fn admin(st: &Stack, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = st.http.request(method, format!("{}{path}", st.admin())).bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn wait_for(st: &Stack, id: &str, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
    let t = Instant::now();
    loop {
        let (_, v) = admin(st, reqwest::Method::GET, &format!("/admin/migrations/{id}"), None).await;
        if pred(&v) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The orchestrating process "crashes" and a new one starts on the same config.
async fn restart(st: &mut Stack) {
    st.server.take().unwrap().shutdown().await;
    let cfg = cellgate::config::Config::parse(&config_text(&st.dir)).unwrap();
    st.server = Some(cellgate::server::start(cfg, false).await.unwrap());
    st.wait_ready().await;
}

/// k of the documents on a server whose location is in the moving cell, and how many fences it holds.
async fn moving_docs_and_fences(peer: &Peer) -> (Vec<i64>, u64) {
    let c = peer.client().await;
    let db = c.database("profiles");
    let all: Vec<Document> =
        db.collection::<Document>("people").find(doc! {}).await.unwrap().try_collect().await.unwrap();
    let mut ks: Vec<i64> = all
        .iter()
        .filter(|d| {
            let c = d.get_document("loc").unwrap().get_array("coordinates").unwrap();
            in_moving((c[1].as_f64().unwrap(), c[0].as_f64().unwrap()))
        })
        .map(|d| d.get_i64("k").or_else(|_| d.get_i32("k").map(i64::from)).unwrap())
        .collect();
    ks.sort_unstable();
    let fences = db.collection::<Document>("cellgate_fences").count_documents(doc! {}).await.unwrap();
    (ks, fences)
}

async fn insert_doc(st: &Stack, k: i64, at: (f64, f64)) -> (u16, Value) {
    post(
        &st.http,
        format!("{}/v1/docs/profiles/people/insert", st.data()),
        json!({"documents": [
        {"k": k, "v": 0, "loc": {"type": "Point", "coordinates": [at.1, at.0]}}]}),
    )
    .await
}

/// A crash of the orchestrator after the fence: while it is down the old owner refuses document
/// writes to the cell; after a restart, resume moves every document (and nothing stays on the
/// source); a second crash on the way back is aborted: the copies go, the fence is lifted, the
/// documents stay where they were. Each server read directly.
async fn crash_after_fence_then_resume_or_abort(kind: PeerKind, sql_moves: bool) {
    let _serial = SERIAL.lock().await;
    let (mut st, peers) = mixed_stack(kind, sql_moves).await;
    let mut moving = Vec::new();
    for k in 1..=30i64 {
        let at = (MADRID.0 + (k % 10) as f64 * 0.003, MADRID.1);
        let (s, v) = insert_doc(&st, k, at).await;
        assert_eq!(s, 200, "{v}");
        moving.push(k);
    }
    for k in 101..=110i64 {
        assert_eq!(insert_doc(&st, k, BARCELONA).await.0, 200);
    }
    cellgate::migrate::arm_failpoint("after_fence");
    let (s, doc) = admin(
        &st,
        reqwest::Method::POST,
        "/admin/migrations",
        Some(json!({"cells": [moving_cell()], "to": "b", "hold_ms": 1000})),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    if !sql_moves {
        assert_eq!(doc["tables"], json!(["profiles.people"]), "MongoDB alone moves: {doc}");
    }
    let id = doc["id"].as_str().unwrap().to_string();
    wait_for(&st, &id, |v| v["fenced"] == true && v["state"] == "cutover", "fence").await;
    restart(&mut st).await;
    let v = wait_for(&st, &id, |v| v["state"] == "cutover", "recovered").await;
    assert!(v["error"].as_str().unwrap_or("").contains("interrupted"), "{v}");
    // The orchestrator is gone and the map not published: the source's fence refuses the write.
    let (s, v) = insert_doc(&st, 999, MADRID).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("cells_frozen")), "{v}");
    let (s, v) = post(
        &st.http,
        format!("{}/v1/docs/profiles/people/update", st.data()),
        json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "filter": {"k": 1}, "update": {"$set": {"v": 5}}}),
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("cells_frozen")), "{v}");
    let (s, v) = admin(&st, reqwest::Method::POST, &format!("/admin/migrations/{id}/resume"), None).await;
    assert_eq!(s, 200, "{v}");
    wait_for(&st, &id, |v| v["state"] == "done", "resume").await;
    let (on_a, fences_a) = moving_docs_and_fences(&peers[0]).await;
    let (on_b, _) = moving_docs_and_fences(&peers[1]).await;
    assert_eq!(on_b, moving, "every acknowledged document on the new owner");
    assert!(on_a.is_empty(), "nothing of the cell left on the old owner: {on_a:?}");
    assert!(fences_a >= 1, "the old owner keeps its fence");
    assert_eq!(docs_on(&peers[0]).await.len(), 10, "other documents stay");
    let (s, v) = insert_doc(&st, 1000, MADRID).await;
    assert_eq!((s, v["shards"][0]["id"].as_str()), (200, Some("b")), "{v}");

    // Second crash on the way back, then abort.
    cellgate::migrate::arm_failpoint("after_fence");
    let (s, doc) = admin(
        &st,
        reqwest::Method::POST,
        "/admin/migrations",
        Some(json!({"cells": [moving_cell()], "to": "a", "hold_ms": 1000})),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    let id2 = doc["id"].as_str().unwrap().to_string();
    wait_for(&st, &id2, |v| v["fenced"] == true, "fence 2").await;
    restart(&mut st).await;
    let (s, v) = admin(&st, reqwest::Method::POST, &format!("/admin/migrations/{id2}/abort"), None).await;
    assert_eq!(s, 200, "{v}");
    wait_for(&st, &id2, |v| v["state"] == "aborted", "abort").await;
    let (on_a, _) = moving_docs_and_fences(&peers[0]).await;
    let (on_b, fences_b) = moving_docs_and_fences(&peers[1]).await;
    assert!(on_a.is_empty(), "the undo removed the copies from a: {on_a:?}");
    assert_eq!(on_b.len(), 31, "b keeps every document of the cell");
    assert_eq!(fences_b, 0, "b's fence of the aborted migration is lifted");
    let (s, v) = insert_doc(&st, 1001, MADRID).await;
    assert_eq!((s, v["shards"][0]["id"].as_str()), (200, Some("b")), "b serves the cell again: {v}");
    st.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_fence_then_resume_or_abort_congodb() {
    crash_after_fence_then_resume_or_abort(PeerKind::Congo, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_fence_then_resume_or_abort_secantusdb() {
    crash_after_fence_then_resume_or_abort(PeerKind::Secantus, true).await;
}

/// The same with MongoDB alone moving: the record survives the crash on MongoDB
/// (`cellgate_migrations`), so the restarted process finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_fence_then_resume_or_abort_mongodb_only_secantusdb() {
    crash_after_fence_then_resume_or_abort(PeerKind::Secantus, false).await;
}
