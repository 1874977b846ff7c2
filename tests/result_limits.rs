//! Bounded results (issue 11 finding 4), against real PostgreSQL: a read of a million rows is
//! refused with 422 `result_too_large` naming the limit crossed, the statement is cancelled at the
//! server, and this process's resident memory returns near its baseline. Its own test binary,
//! so no other test's allocations move the RSS it measures.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use serde_json::json;
use support::{MADRID, Stack};

/// Resident set size of this process, bytes (/proc/self/statm: pages).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn a_million_rows_are_refused_cancelled_and_leave_no_memory_behind() {
    // Default byte limit (16 MiB); a row limit of 100,000 so that limit is reachable below it.
    let st = Stack::start(1, 1, |c| *c = c.replace("[limits]\n", "[limits]\nmax_result_rows = 100000\n")).await;
    st.insert(1, "one", MADRID).await;
    let region = json!({"lat": MADRID.0, "lng": MADRID.1});
    // Warm up (connections, caches) before the baseline.
    for c in ["replica", "primary"] {
        let (s, v) = st.query(json!({"region": region, "sql": "SELECT 1", "consistency": c})).await;
        assert_eq!(s, 200, "{v}");
    }
    let baseline = rss();
    let sql = "SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 1000000) g";
    for c in ["replica", "primary"] {
        let (s, v) = st.query(json!({"region": region, "sql": sql, "consistency": c})).await;
        assert_eq!((s, v["error"]["code"].as_str()), (422, Some("result_too_large")), "{c}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("limits.max_result_bytes"), "{v}");
    }
    // The row limit is named when it is the one crossed.
    let (s, v) = st
        .query(json!({"region": region, "sql": "SELECT g FROM generate_series(1, 100001) g", "consistency": "primary"}))
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (422, Some("result_too_large")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("limits.max_result_rows"), "{v}");
    // Cancelled at the server: no generate_series keeps running.
    let p = &st.cluster.shards[0].primary;
    let running = support::wait_statement_gone(p, "generate_series").await;
    assert_eq!(running, "0", "the refused statement still runs at the server");
    // The shard still serves.
    let (s, v) = st.query(json!({"region": region, "sql": "SELECT name FROM items", "consistency": "primary"})).await;
    assert_eq!(s, 200, "{v}");
    let after = rss();
    let grown = after.saturating_sub(baseline);
    eprintln!("RSS baseline {} MiB, after three refused 1M-row reads {} MiB", baseline >> 20, after >> 20);
    assert!(grown < 50 << 20, "RSS grew by {} MiB", grown >> 20);
    st.stop().await;
}
