//! A data plane that is safe to expose (issue 11), against real PostgreSQL: the statement policy
//! per endpoint and scope (refused statements never reach a server: pg_stat_statements), session
//! poisoning attempts through every endpoint, server-side read-only sessions as a second line,
//! batches that cannot break their own atomicity, and slow reads that cannot block fast ones.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{DDL_TOKEN, MADRID, READ_TOKEN, Stack, WRITE_TOKEN};

fn madrid() -> Value {
    json!({"lat": MADRID.0, "lng": MADRID.1})
}

/// Count of rows of `items` with this id, read on the primary directly.
fn rows_with_id(st: &Stack, id: i64) -> String {
    st.cluster.shards[0].primary.psql("core", &format!("SELECT count(*) FROM items WHERE id = {id}")).unwrap()
}

/// Statements executed on the primary since the last reset whose text matches `pattern`
/// (pg_stat_statements, as the superuser).
fn executed(st: &Stack, pattern: &str) -> String {
    st.cluster.shards[0]
        .primary
        .psql(
            "core",
            &format!(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query ~* '{pattern}' \
                 AND query !~* 'pg_stat_statements'"
            ),
        )
        .unwrap()
}

const NOT_READS: &[&str] = &[
    "INSERT INTO items (id, name, h3) VALUES (900001, 'x', 1)",
    "UPDATE items SET name = 'pwned' WHERE id = 1",
    "DELETE FROM items WHERE id = 1",
    "WITH x AS (INSERT INTO items (id, name, h3) VALUES (900002, 'x', 1) RETURNING *) SELECT * FROM x",
    "SELECT * FROM items WHERE id = 1 FOR UPDATE",
    "EXPLAIN ANALYZE DELETE FROM items WHERE id = 1",
    "SELECT 1; DELETE FROM items WHERE id = 1",
    "CREATE TABLE pwned (a int)",
    "TRUNCATE items",
    "SET search_path = pg_catalog",
    "SET statement_timeout = 0",
    "SELECT set_config('search_path', 'pg_catalog', false)",
    "SELECT pg_advisory_lock(42)",
    "SELECT nextval('items_seq')",
    "BEGIN",
    "COPY items TO STDOUT",
    "SELEC garbage FROM",
];

/// `/query` refuses every statement that is not a read with 400 `not_a_read`, whatever the
/// consistency, and nothing of it reaches PostgreSQL. Reads (tricky ones included) pass.
#[tokio::test]
async fn query_runs_reads_only_and_refusals_never_reach_a_server() {
    let conf = vec![("shared_preload_libraries".to_string(), "pg_stat_statements".to_string())];
    let st = Stack::start_conf(1, 1, None, conf, |_| {}).await;
    let p = &st.cluster.shards[0].primary;
    p.psql("core", "CREATE EXTENSION pg_stat_statements").unwrap();
    st.insert(1, "one", MADRID).await;
    p.psql("core", "SELECT pg_stat_statements_reset()").unwrap();
    for sql in NOT_READS {
        for consistency in ["replica", "primary"] {
            let (s, v, _) = st
                .post(
                    "/v1/sql/core/query",
                    Some(READ_TOKEN),
                    &json!({"region": madrid(), "sql": sql, "consistency": consistency}),
                )
                .await;
            assert_eq!((s, v["error"]["code"].as_str()), (400, Some("not_a_read")), "{sql} ({consistency}): {v}");
            assert_eq!(v["error"]["retryable"], false, "{v}");
        }
    }
    assert_eq!(
        executed(&st, "insert|update|delete|truncate|create table|set_config|advisory|search_path|nextval|copy"),
        "0",
        "a refused statement reached the primary"
    );
    assert_eq!(rows_with_id(&st, 900001), "0");
    // Reads pass, including ones whose text contains write keywords in literals or comments.
    for sql in [
        "SELECT name FROM items WHERE id = 1",
        "SELECT ';DELETE FROM items' AS s",
        "SELECT $$ DROP TABLE items $$ AS s",
        "/* DELETE */ SELECT 1 AS one -- ; DROP TABLE items",
        "WITH x AS (SELECT id FROM items) SELECT count(*) FROM x",
        "EXPLAIN SELECT * FROM items",
        "SELECT set_config('application_name', 'x', true)",
    ] {
        let (s, v) = st.query(json!({"region": madrid(), "sql": sql, "consistency": "primary"})).await;
        assert_eq!(s, 200, "{sql}: {v}");
    }
    assert_eq!(p.psql("core", "SELECT name FROM items WHERE id = 1").unwrap(), "one");
    st.stop().await;
}

/// `/execute`: writes run; DDL needs the ddl scope; session and transaction control are refused
/// (a batch cannot commit or roll back half of itself); SET LOCAL inside a batch stays.
#[tokio::test]
async fn execute_statement_policy_and_atomic_batches() {
    let st = Stack::start(1, 0, |_| {}).await;
    let ins = |id: i64| json!({"sql": "INSERT INTO items (id, name, h3) VALUES ($1, 'b', $2)", "params": [id, support::h3_of(MADRID.0, MADRID.1)]});
    // DDL: write scope is not enough; the ddl scope is.
    let ddl = json!({"region": madrid(), "sql": "CREATE TABLE extra (a int)"});
    let (s, v, _) = st.post("/v1/sql/core/execute", Some(WRITE_TOKEN), &ddl).await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v, _) = st.post("/v1/sql/core/execute", Some(DDL_TOKEN), &ddl).await;
    assert_eq!(s, 200, "{v}");
    // Transaction control inside a batch: refused before anything runs; nothing committed.
    for (n, batch) in [
        (10, json!([ins(10), {"sql": "COMMIT"}, {"sql": "SELECT 1/0"}])),
        (11, json!([{"sql": "ROLLBACK"}, ins(11)])),
        (12, json!([{"sql": "SAVEPOINT a"}, ins(12), {"sql": "RELEASE SAVEPOINT a"}])),
        (13, json!([ins(13), {"sql": "END"}])),
        (14, json!([{"sql": "SET search_path = pg_catalog"}, ins(14)])),
        (15, json!([ins(15), {"sql": "SELECT pg_advisory_lock(7)"}])),
    ] {
        let (s, v) = st.execute(json!({"region": madrid(), "batch": batch})).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("statement_refused")), "{batch}: {v}");
        assert_eq!(rows_with_id(&st, n), "0", "batch {n} left a row behind");
    }
    for sql in ["SET statement_timeout = 0", "BEGIN", "SELECT set_config('search_path', 'x', false)", "DISCARD ALL"] {
        let (s, v) = st.execute(json!({"region": madrid(), "sql": sql})).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("statement_refused")), "{sql}: {v}");
    }
    // Transaction-scoped settings inside a batch die with it: allowed.
    let (s, v) = st
        .execute(json!({"region": madrid(), "batch": [{"sql": "SET LOCAL statement_timeout = 2000"}, ins(20)]}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(rows_with_id(&st, 20), "1");
    // A failed batch keeps nothing.
    let (s, v) = st.execute(json!({"region": madrid(), "batch": [ins(21), {"sql": "SELECT 1/0"}]})).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(rows_with_id(&st, 21), "0");
    st.stop().await;
}

/// The four session-poisoning attacks (search_path, statement_timeout, advisory lock,
/// set_config) through every endpoint and consistency are refused; afterwards another client's
/// 100 reads all succeed, no advisory lock is held, and statement_timeout still cancels a
/// pg_sleep at the server. A function that writes, called from /query, is refused by the
/// server's read-only session (the second line of defence).
#[tokio::test]
async fn no_client_can_change_another_clients_connection() {
    let st = Stack::start(1, 1, |c| *c = c.replace("[pool]\n", "[pool]\npipeline_connections = 2\n")).await;
    st.insert(1, "one", MADRID).await;
    let attacks = [
        "SET search_path = pg_catalog",
        "SET statement_timeout = 0",
        "SELECT pg_advisory_lock(4242)",
        "SELECT set_config('search_path', 'pg_catalog', false)",
        "SELECT set_config('statement_timeout', '0', false)",
    ];
    for sql in attacks {
        for c in ["replica", "primary"] {
            let (s, v) = st.query(json!({"region": madrid(), "sql": sql, "consistency": c})).await;
            assert_eq!(s, 400, "{sql} /query {c}: {v}");
        }
        let (s, v) = st.execute(json!({"region": madrid(), "sql": sql})).await;
        assert_eq!(s, 400, "{sql} /execute: {v}");
        let (s, v) = st.execute(json!({"region": madrid(), "batch": [{"sql": sql}, {"sql": "SELECT 1"}]})).await;
        assert_eq!(s, 400, "{sql} /execute batch: {v}");
    }
    for c in ["replica", "primary"] {
        for _ in 0..50 {
            let (s, v) = st.query(json!({"region": madrid(), "sql": "SELECT name FROM items", "consistency": c})).await;
            assert_eq!((s, v["rows"][0]["name"].as_str()), (200, Some("one")), "{v}");
        }
    }
    let p = &st.cluster.shards[0].primary;
    assert_eq!(p.psql("core", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").unwrap(), "0");
    // The server-side deadline still holds on the shared connections: the request times out
    // (request_timeout_ms = 3000) and the statement does not keep running.
    let (s, v) = st.query(json!({"region": madrid(), "sql": "SELECT pg_sleep(20)", "consistency": "primary"})).await;
    assert_eq!(s, 504, "{v}");
    assert_eq!(support::wait_statement_gone(p, "pg_sleep(20)").await, "0", "the abandoned pg_sleep still runs");
    // Second line: a function that writes passes the classifier (it is a SELECT) but the
    // read-only session refuses it, on the shared and on the exclusive path.
    p.psql_as(
        "app",
        support::CANARY,
        "core",
        "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS $$ INSERT INTO items (id, name, h3) VALUES (777, 'x', 1) RETURNING 1 $$",
    )
    .unwrap();
    let (s, v) = st.query(json!({"region": madrid(), "sql": "SELECT sneaky()", "consistency": "primary"})).await;
    assert_ne!(s, 200, "{v}");
    assert_eq!(rows_with_id(&st, 777), "0");
    st.stop().await;
}

/// Head-of-line blocking: 8 slow reads on one shard, then 200 fast reads: every fast read is
/// served by a connection that is not stuck behind a slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reads_do_not_block_fast_reads() {
    // A running service's pool is warm: 16 pooled connections open (min_idle) before the test.
    let stack = Stack::start(1, 0, |c| {
        *c = c.replace("max_size = 8", "max_size = 16").replace("min_idle = 0", "min_idle = 16")
    })
    .await;
    let st = &stack;
    st.insert(1, "one", MADRID).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ... and its shared connections: a burst opens all four.
    let warm = (0..16)
        .map(|_| st.query(json!({"region": madrid(), "sql": "SELECT pg_sleep(0.05)::text", "consistency": "primary"})));
    for (s, v) in futures_util::future::join_all(warm).await {
        assert_eq!(s, 200, "{v}");
    }
    let slow: Vec<_> = (0..8)
        .map(|_| async {
            let t = Instant::now();
            let r = st
                .query(json!({"region": madrid(), "sql": "SELECT pg_backend_pid() AS pid, pg_sleep(1)::text", "consistency": "primary"}))
                .await;
            (r, t.elapsed())
        })
        .collect();
    let slow = futures_util::future::join_all(slow);
    let fast = async {
        // The slow reads are in flight first (a read arriving in the same instant as a slow one
        // cannot know it is slow); from then on, no fast read may queue behind one. 200 fast
        // reads from 10 clients at once, each client one read after another.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let lanes = (0..10).map(|_| async {
            let mut took = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                let (s, v) =
                    st.query(json!({"region": madrid(), "sql": "SELECT 1 AS one", "consistency": "primary"})).await;
                assert_eq!(s, 200, "{v}");
                took.push(t.elapsed());
            }
            took
        });
        futures_util::future::join_all(lanes).await.into_iter().flatten().collect::<Vec<_>>()
    };
    let (slow, mut fast) = tokio::join!(slow, fast);
    let mut slowest = Duration::ZERO;
    for ((s, v), took) in slow {
        assert_eq!(s, 200, "{v}");
        slowest = slowest.max(took);
    }
    fast.sort();
    let p99 = fast[fast.len() * 99 / 100 - 1];
    let max = *fast.last().unwrap();
    eprintln!(
        "HOL: 200 fast reads beside 8 slow ones (slowest {slowest:?}): p50 {:?} p99 {p99:?} max {max:?}",
        fast[fast.len() / 2]
    );
    assert!(max < Duration::from_millis(900), "a fast read waited {max:?}: it queued behind a slow one");
    assert!(p99 < Duration::from_millis(100), "fast-read p99 {p99:?}");
    stack.stop().await;
}
