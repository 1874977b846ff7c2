//! A deposed orchestrator wakes up (docs/fleet.md, *When the orchestrator dies*), against a real
//! etcd and real PostgreSQL shards. The orchestrator `k1` reaches etcd through a TCP forwarder;
//! right after the fence it pauses (failpoint `after_fence:sleep`), and its link is cut, so its
//! lease expires while it sleeps. `i1` takes the migration over and finishes it under ~300
//! writes/s. Then k1's link comes back and k1 wakes up and carries on where it paused: it must
//! stop without touching anything — the record in etcd, the shards' progress rows, the map and
//! the freeze stay what i1 left; every acknowledged write is on the new owner exactly once.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cellgate::server::Running;
use serde_json::json;
use support::etcd::{Etcd, Forwarder};
use support::fleet::*;
use support::*;

const PREFIX: &str = "/cellgate/deposed";
/// How long the orchestrator pauses after the fence: long enough for its lease to expire (2 s)
/// and i1 to take over and finish.
const PAUSE_MS: u64 = 12_000;

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

/// The progress row of migration `id` on a primary: (state, map_version_after).
fn progress_row(node: &cellgate_harness::Node, id: &str) -> String {
    node.psql(
        "core",
        &format!(
            "SELECT state || ' ' || coalesce(doc->>'map_version_after', '-') FROM cellgate.migrations WHERE id = '{id}'"
        ),
    )
    .unwrap()
    .trim()
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_orchestrator_that_wakes_up_touches_nothing() {
    let etcd = tokio::task::block_in_place(Etcd::start);
    let stack = Stack::start(2, 0, |_| {}).await;
    let http = stack.http.clone();
    let target = etcd.target(PREFIX);
    cellgate::etcd::push_map(&target, &map_toml(&stack.cluster, None), None).await.unwrap();
    let proxy = Forwarder::start(etcd.client_port).await;
    let k1 = instance(&stack, &proxy.url(), "k1").await;
    let i1 = instance(&stack, &etcd.url(), "i1").await;
    let (k1_admin, i1_admin) = (format!("http://{}", k1.admin_addr), format!("http://{}", i1.admin_addr));
    let t0 = Instant::now();
    while cellgate::etcd::fleet_status(&target).await.unwrap().instances.len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "two instances not registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(&http, vec![format!("http://{}", i1.data_addr)], 0, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cellgate::migrate::arm_failpoint(&format!("after_fence:sleep={PAUSE_MS}"));
    let (s, doc) = admin_at(
        &http,
        &k1_admin,
        "/admin/migrations",
        Some(json!({"cells": [moving_cell()], "to": "b", "hold_ms": 2000})),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    let id = doc["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let (_, d) = admin_at(&http, &k1_admin, &format!("/admin/migrations/{id}"), None).await;
        if d["fenced"] == true {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "not fenced: {d}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let paused = Instant::now();
    proxy.cut();
    while cellgate::etcd::fleet_status(&target).await.unwrap().instances.iter().any(|r| r.id == "k1") {
        assert!(paused.elapsed() < Duration::from_secs(10), "k1's lease did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, v) = admin_at(&http, &i1_admin, &format!("/admin/migrations/{id}/resume"), Some(json!({}))).await;
    assert_eq!(s, 200, "{v}");
    wait_done_at(&http, &i1_admin, &id, Duration::from_secs(60)).await;
    let finished = paused.elapsed();
    assert!(
        finished < Duration::from_millis(PAUSE_MS),
        "i1 finished {finished:?} after the pause began, after k1 woke: the test proves nothing"
    );
    // What i1 left: the record (done, by i1), the progress rows, the map, no freeze.
    let t0 = Instant::now();
    let settled = loop {
        let (r, _) = cellgate::etcd::migration_record(&target, &id).await.unwrap().unwrap();
        if r.doc["state"] == "done" {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "record not done: {:?}", r.doc);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(settled.orchestrator, "i1");
    let rows = |stack: &Stack| {
        (progress_row(&stack.cluster.shards[0].primary, &id), progress_row(&stack.cluster.shards[1].primary, &id))
    };
    let rows_done = rows(&stack);
    assert_eq!(rows_done, ("done 2".to_string(), "done 2".to_string()));

    // k1's link back; it wakes up and carries on from the fence.
    proxy.listen().await;
    let t0 = Instant::now();
    loop {
        let (_, d) = admin_at(&http, &k1_admin, &format!("/admin/migrations/{id}"), None).await;
        if paused.elapsed() > Duration::from_millis(PAUSE_MS) && d["running"] == false {
            eprintln!("k1 after waking up: {d}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "k1's orchestrator did not stop: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing moved: the record, the rows, the map (v2, nothing published over it), no freeze;
    // k1 itself follows etcd again and serves v2.
    let (r, _) = cellgate::etcd::migration_record(&target, &id).await.unwrap().unwrap();
    assert_eq!((r.orchestrator.as_str(), &r.doc["state"]), ("i1", &json!("done")), "{:?}", r.doc);
    assert_eq!(rows(&stack), rows_done);
    let fleet = cellgate::etcd::fleet_status(&target).await.unwrap();
    assert_eq!(fleet.map_version, Some(2));
    let mut client = etcd.client().await;
    let freezes =
        client.get(format!("{PREFIX}/freezes/"), Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert!(freezes.kvs().is_empty(), "a freeze key is back");
    let logged = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(
        logged.lines().any(|l| l.contains(&id) && l.contains("i1") && l.contains("another instance")),
        "k1 did not say it was deposed"
    );
    let t0 = Instant::now();
    while admin_at(&http, &k1_admin, "/admin/map", None).await.1["version"] != 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "k1 did not catch up with etcd");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let (a, b) = (rows_on(&stack.cluster.shards[0].primary), rows_on(&stack.cluster.shards[1].primary));
    check("deposed orchestrator", &all, &a, &b, "b");
    for r in [k1, i1] {
        r.shutdown().await;
    }
    stack.stop().await;
    proxy.cut();
}
