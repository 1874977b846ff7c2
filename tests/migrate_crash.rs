//! A crash of the orchestrating instance after the fence and before the publish: after a
//! restart, status is truthful (state, fence, error) and resume completes with every
//! acknowledged write on the new owner. A second crash is aborted instead.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

async fn get(st: &Stack, path: &str) -> Value {
    let (_, body) = st.admin_get(path).await;
    serde_json::from_str(&body).unwrap()
}

async fn restart(st: &mut Stack) {
    // 1. The "crash": the orchestrating instance goes away mid-migration (its held writes and
    //    in-memory state with it).
    st.server.take().unwrap().shutdown().await;
    // 2. A new process on the same config.
    let cfg = cellgate::config::Config::parse(&config_text(&st.dir)).unwrap();
    st.server = Some(cellgate::server::start(cfg, false).await.unwrap());
    st.wait_ready().await;
}

async fn wait_for(st: &Stack, id: &str, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = get(st, &format!("/admin/migrations/{id}")).await;
        if pred(&v) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_fence_then_resume_or_abort() {
    let mut st = Stack::start(2, 0, |_| {}).await;
    let mut acked = Vec::new();
    for i in 0..100 {
        st.insert(i + 1, "before", (MADRID.0 + (i % 10) as f64 * 0.003, MADRID.1)).await;
        acked.push(i + 1);
    }
    cellgate::migrate::arm_failpoint("after_fence");
    let r = st
        .http
        .post(format!("{}/admin/migrations", st.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"cells": [moving_cell()], "to": "b", "hold_ms": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    wait_for(&st, &id, |v| v["fenced"] == true && v["state"] == "cutover", "fence").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While the orchestrator is dead: the source refuses writes to the cells (fence), nothing
    // lands on a; the client gets a retryable 503.
    let (s, v) = st.execute(json!({"region": {"lat": MADRID.0, "lng": MADRID.1},
        "sql": "INSERT INTO items (id, name, h3) VALUES (999, 'during-crash', $1)", "params": [h3_of(MADRID.0, MADRID.1)]})).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "cells_frozen");

    restart(&mut st).await;
    let v = get(&st, &format!("/admin/migrations/{id}")).await;
    assert_eq!(v["state"], "cutover", "status after restart is truthful: {v}");
    assert_eq!(v["fenced"], true);
    assert!(v["error"].as_str().unwrap().contains("interrupted"), "{v}");
    assert_eq!(v["map_version_after"], Value::Null);
    let r = st
        .http
        .post(format!("{}/admin/migrations/{id}/resume", st.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let done = wait_for(&st, &id, |v| v["state"] == "done", "resume").await;
    assert_eq!(done["map_version_after"], 2);
    let b = &st.cluster.shards[1].primary;
    let a = &st.cluster.shards[0].primary;
    assert_eq!(
        b.psql("core", "SELECT count(*) FROM items").unwrap(),
        "100",
        "every acknowledged write on the new owner"
    );
    assert_eq!(a.psql("core", "SELECT count(*) FROM items WHERE id = 999").unwrap(), "0");
    // Writes now go to b.
    let w = st.insert(1000, "after", MADRID).await;
    assert_eq!(w["shards"][0]["id"], "b");

    // Second crash on the way back, then abort: a owns nothing new, b keeps serving.
    cellgate::migrate::arm_failpoint("after_fence");
    let r = st
        .http
        .post(format!("{}/admin/migrations", st.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"cells": [moving_cell()], "to": "a", "hold_ms": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id2 = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    wait_for(&st, &id2, |v| v["fenced"] == true, "fence 2").await;
    restart(&mut st).await;
    let r = st
        .http
        .post(format!("{}/admin/migrations/{id2}/abort", st.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for(&st, &id2, |v| v["state"] == "aborted", "abort").await;
    let b = &st.cluster.shards[1].primary;
    assert_eq!(b.psql("core", "SELECT count(*) FROM cellgate.fenced_cells").unwrap(), "0", "fence lifted on b");
    let w = st.insert(1001, "after-abort", MADRID).await;
    assert_eq!(w["shards"][0]["id"], "b");
    assert_eq!(b.psql("core", "SELECT count(*) FROM items").unwrap(), "102");
    st.stop().await;
}
