//! The orchestrator of a fleet-mode migration killed for real, and the takeover that follows
//! (docs/fleet.md, *When the orchestrator dies*), against a real etcd and real PostgreSQL shards.
//! The orchestrator is a separate `cellgate serve` process that hangs right after the fence
//! (`CELLGATE_FAILPOINT=after_fence:hang`, the test build's failpoints) and is then SIGKILLed,
//! while two in-process instances take ~300 writes/s. Once its lease has expired both survivors
//! resume the migration at the same moment: exactly one gets 200, the other 409 naming the
//! winner (the takeover is one etcd transaction on the record's mod_revision); the migration
//! completes once (map v1 → v2, nothing more), every acknowledged write is found exactly once on
//! the new owner and every refused one nowhere; a record write in the dead orchestrator's name
//! is refused, naming the new one.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cellgate::server::Running;
use serde_json::json;
use support::etcd::{Etcd, free_port};
use support::fleet::*;
use support::*;

const PREFIX: &str = "/cellgate/takeover";

/// The config of an instance in etcd mode (`id`), listening on `ports` (0: any).
fn etcd_config(stack: &Stack, etcd: &Etcd, id: &str, ports: (u16, u16)) -> String {
    let line = format!(
        "map = {{ etcd = {{ endpoints = [\"{}\"], prefix = \"{PREFIX}\", instance_id = \"{id}\", timeout_ms = 1000, lease_ttl_s = 2 }} }}",
        etcd.url()
    );
    config_text(&stack.dir)
        .lines()
        .map(|l| {
            if l.starts_with("map = ") {
                line.clone()
            } else if l.starts_with("data = \"127.0.0.1:0\"") {
                format!("data = \"127.0.0.1:{}\"", ports.0)
            } else if l.starts_with("admin = \"127.0.0.1:0\"") {
                format!("admin = \"127.0.0.1:{}\"", ports.1)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn instance(stack: &Stack, etcd: &Etcd, id: &str) -> Running {
    let cfg = etcd_config(stack, etcd, id, (0, 0));
    let running = cellgate::server::start(cellgate::config::Config::parse(&cfg).unwrap(), false).await.unwrap();
    wait_ready(&stack.http, &format!("http://{}", running.admin_addr), Duration::from_secs(30)).await;
    running
}

/// The orchestrator's process, SIGKILLed when dropped (a failing test leaves nothing running).
struct Process(Option<Child>);

impl Process {
    /// SIGKILL, by PID, and reap it.
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orchestrator_sigkilled_after_the_fence_then_two_instances_race_to_resume() {
    let etcd = tokio::task::block_in_place(Etcd::start);
    let stack = Stack::start(2, 0, |_| {}).await;
    let http = stack.http.clone();
    cellgate::etcd::push_map(&etcd.target(PREFIX), &map_toml(&stack.cluster, None), None).await.unwrap();

    // The orchestrator: `cellgate serve` in its own process, armed to hang after the fence.
    let (data_port, admin_port) = (free_port(), free_port());
    let cfg_path = stack.dir.join("k0.toml");
    std::fs::write(&cfg_path, etcd_config(&stack, &etcd, "k0", (data_port, admin_port))).unwrap();
    let log_path = stack.dir.join("k0.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut k0 = Process(Some(
        Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .env("CELLGATE_FAILPOINT", "after_fence:hang")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    ));
    let k0_admin = format!("http://127.0.0.1:{admin_port}");
    wait_ready(&http, &k0_admin, Duration::from_secs(30)).await;
    let i1 = instance(&stack, &etcd, "i1").await;
    let i2 = instance(&stack, &etcd, "i2").await;
    let t0 = Instant::now();
    while cellgate::etcd::fleet_status(&etcd.target(PREFIX)).await.unwrap().instances.len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "three instances not registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load through the two survivors (a request in flight to a killed process has no knowable
    // outcome, so none is sent there).
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(&http, vec![format!("http://{}", i1.data_addr), format!("http://{}", i2.data_addr)], 0, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s, doc) = admin_at(
        &http,
        &k0_admin,
        "/admin/migrations",
        Some(json!({"cells": [moving_cell()], "to": "b", "hold_ms": 2000})),
    )
    .await;
    assert_eq!(s, 202, "{doc}");
    let id = doc["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    loop {
        let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
        if logged.contains("orchestrator hangs here") {
            break;
        }
        let (_, d) = admin_at(&http, &k0_admin, &format!("/admin/migrations/{id}"), None).await;
        assert_ne!(d["state"], "done", "the orchestrator did not hang: is the binary built without `failpoints`? {d}");
        assert!(started.elapsed() < Duration::from_secs(60), "no hang after the fence within 60 s: {d}\n{logged}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, d) = admin_at(&http, &k0_admin, &format!("/admin/migrations/{id}"), None).await;
    assert_eq!(d["fenced"], true, "{d}");
    k0.kill();
    let killed = Instant::now();
    eprintln!("k0 fenced and hung {:?} after the start; SIGKILLed", started.elapsed());

    // While k0's lease lives its registration says it orchestrates: nobody takes over.
    let (s, v) = admin_at(
        &http,
        &format!("http://{}", i1.admin_addr),
        &format!("/admin/migrations/{id}/resume"),
        Some(json!({})),
    )
    .await;
    if killed.elapsed() < Duration::from_secs(1) {
        assert_eq!(s, 409, "{v}");
        assert!(v.to_string().contains("orchestrated by instance k0"), "{v}");
    }
    while cellgate::etcd::fleet_status(&etcd.target(PREFIX)).await.unwrap().instances.iter().any(|r| r.id == "k0") {
        assert!(killed.elapsed() < Duration::from_secs(15), "k0's lease did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired = killed.elapsed();

    // Both survivors resume at the same moment: one takes it over, the other is told who did.
    let path = format!("/admin/migrations/{id}/resume");
    let (a1, a2) = (format!("http://{}", i1.admin_addr), format!("http://{}", i2.admin_addr));
    let (r1, r2) =
        tokio::join!(admin_at(&http, &a1, &path, Some(json!({}))), admin_at(&http, &a2, &path, Some(json!({}))));
    eprintln!("resume on i1: {} {}\nresume on i2: {} {}", r1.0, r1.1, r2.0, r2.1);
    let (winner, winner_admin, loser) = match (r1.0, r2.0) {
        (200, 409) => ("i1", &a1, r2.1),
        (409, 200) => ("i2", &a2, r1.1),
        other => panic!("want exactly one 200 and one 409, got {other:?}: {} / {}", r1.1, r2.1),
    };
    assert!(loser.to_string().contains(&format!("instance {winner}")), "the 409 does not name {winner}: {loser}");
    let done = wait_done_at(&http, winner_admin, &id, Duration::from_secs(90)).await;
    let resumed_in = killed.elapsed();
    eprintln!("resumed by {winner}: {done}");
    eprintln!(
        "k0 killed → lease gone {expired:?} → migration done {resumed_in:?} after the kill ({:?} after its start)",
        started.elapsed()
    );

    // Done once: v2 everywhere (a second run would have published v3), the freeze gone, the
    // loser never ran it, the record in etcd names the winner.
    for r in [&i1, &i2] {
        let (_, map) = admin_at(&http, &format!("http://{}", r.admin_addr), "/admin/map", None).await;
        assert_eq!(map["version"], 2, "{map}");
        assert!(r.state.freeze.borrow().is_none(), "freeze released everywhere");
    }
    let loser_admin = if winner == "i1" { &a2 } else { &a1 };
    let (_, l) = admin_at(&http, loser_admin, &format!("/admin/migrations/{id}"), None).await;
    assert_eq!(l["running"], false, "the loser runs it too: {l}");
    let target = etcd.target(PREFIX);
    // (The admin answer shows the in-memory record, which is set just before it is persisted.)
    let t0 = Instant::now();
    let record = loop {
        let (record, _) = cellgate::etcd::migration_record(&target, &id).await.unwrap().unwrap();
        if record.doc["state"] == "done" || t0.elapsed() > Duration::from_secs(5) {
            break record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((record.orchestrator.as_str(), &record.doc["state"]), (winner, &json!("done")));
    // The dead orchestrator, had it woken up, could not write its record over the winner's.
    let stale =
        cellgate::etcd::MigrationRecord { orchestrator: "k0".into(), doc: json!({"id": id, "state": "cutover"}) };
    match cellgate::etcd::put_migration(&target, &id, &stale).await {
        Err(cellgate::etcd::EtcdError::Orchestrated { by, .. }) => assert_eq!(by, winner),
        other => panic!("a deposed orchestrator's write was not refused: {other:?}"),
    }
    assert_eq!(cellgate::etcd::migration_record(&target, &id).await.unwrap().unwrap().0.doc["state"], "done");
    // The claim itself, raced where the HTTP race above may have come one after the other: 8
    // claimants that all read the same record revision; the transaction lets exactly one through
    // and tells the 7 others its name.
    let orphan = format!("{id}-orphan");
    let dead = cellgate::etcd::MigrationRecord { orchestrator: "dead".into(), doc: json!({"id": orphan}) };
    cellgate::etcd::put_migration(&target, &orphan, &dead).await.unwrap();
    let (_, seen) = cellgate::etcd::migration_record(&target, &orphan).await.unwrap().unwrap();
    let claims = (0..8).map(|k| {
        let (target, orphan) = (target.clone(), orphan.clone());
        tokio::spawn(async move {
            let mine = cellgate::etcd::MigrationRecord { orchestrator: format!("c{k}"), doc: json!({"id": orphan}) };
            (k, cellgate::etcd::claim_migration(&target, &orphan, seen, &mine).await)
        })
    });
    let outcomes: Vec<_> = futures_util::future::join_all(claims).await.into_iter().map(|r| r.unwrap()).collect();
    let winners: Vec<usize> = outcomes.iter().filter(|(_, r)| r.is_ok()).map(|(k, _)| *k).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let claimant = format!("c{}", winners[0]);
    for (_, r) in &outcomes {
        if let Err(e) = r {
            assert!(
                matches!(e, cellgate::etcd::EtcdError::Orchestrated { by, .. } if *by == claimant),
                "a loser not told the winner {claimant}: {e}"
            );
        }
    }
    assert_eq!(cellgate::etcd::migration_record(&target, &orphan).await.unwrap().unwrap().0.orchestrator, claimant);

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let (a, b) = (rows_on(&stack.cluster.shards[0].primary), rows_on(&stack.cluster.shards[1].primary));
    check("orchestrator killed", &all, &a, &b, "b");
    for r in [i1, i2] {
        r.shutdown().await;
    }
    stack.stop().await;
}
