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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cellgate::server::Running;
use serde_json::{Value, json};
use support::etcd::{Etcd, Forwarder};
use support::fleet::*;
use support::*;

const PREFIX: &str = "/cellgate/migrate";

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
    admin_at(http, &admin(r), path, body).await
}

async fn wait_done(http: &reqwest::Client, r: &Running, id: &str, within: Duration) -> Value {
    wait_done_at(http, &admin(r), id, within).await
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
