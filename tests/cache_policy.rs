//! Per-table cache policies in the map (`[tables.DB.T] cache = { ttl_ms, swr_ms }`) against real
//! PostgreSQL: which reads a policy covers (every table the statement reads must have one; the
//! shortest wins; a body's own `cache` member or `false` wins over it; table functions, `TABLE t`,
//! several statements are not covered), and that every kind of write through cellgate — UPDATE,
//! DELETE, INSERT, a batch, DDL — makes the cached answer of its cell unreachable before it is
//! acknowledged (the next read sees the servers' rows, read here directly with psql). One
//! instance with the in-process cache (no Redis: the policy decision and the version bumps are
//! the same with it; tests/cache.rs covers Redis).
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use serde_json::{Value, json};
use support::*;

/// Status, `Cache-Status` (empty when the cache was not used), body.
async fn post(stack: &Stack, path: &str, token: &str, body: &Value) -> (u16, String, Value) {
    let r = stack.http.post(format!("{}{path}", stack.data())).bearer_auth(token).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let cache = r.headers().get("cache-status").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, cache, r.json().await.unwrap())
}

async fn read(stack: &Stack, body: Value) -> (String, Value) {
    let (s, c, v) = post(stack, "/v1/sql/core/query", READ_TOKEN, &body).await;
    assert_eq!(s, 200, "{body}: {v}");
    (c, v)
}

fn at_madrid(sql: &str, params: Value) -> Value {
    json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": sql, "params": params})
}

/// The rows of `id` in `items` as the primary holds them (psql, not through cellgate).
fn on_primary(stack: &Stack, sql: &str) -> String {
    stack.cluster.shards[0].primary.psql("core", sql).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_policies_cover_reads_and_every_write_invalidates() {
    let stack = Stack::start_map(
        1,
        0,
        |map| {
            *map = map.replace(
                "[tables.core.items]\ncell_column = \"h3\"\n",
                "[tables.core.items]\ncell_column = \"h3\"\ncache = { ttl_ms = 60000, swr_ms = 1000 }\n\
                 [tables.core.tags]\ncell_column = \"h3\"\ncache = { ttl_ms = 20000 }\n\
                 [tables.core.notes]\ncell_column = \"h3\"\n",
            );
        },
        |cfg| cfg.push_str("\n[cache]\nenabled = true\n"),
    )
    .await;
    for t in ["tags", "notes"] {
        stack.cluster.shards[0]
            .primary
            .psql_as("app", CANARY, "core", &format!("CREATE TABLE {t} (id bigint, h3 bigint)"))
            .unwrap();
    }
    stack.insert(1, "one", MADRID).await;
    stack.insert(2, "two", MADRID).await;

    // A read of a table with a policy: stored with the table's TTL, then a hit.
    let by_id = |id: i64| at_madrid("SELECT id, name, v FROM items WHERE id = $1", json!([id]));
    let (c, _) = read(&stack, by_id(1)).await;
    assert_eq!(c, "cellgate; fwd=miss; stored; ttl=60");
    let (c, v) = read(&stack, by_id(1)).await;
    assert!(c.starts_with("cellgate; hit; ttl=5"), "{c}");
    assert_eq!(v["rows"][0]["name"], "one");

    // The body's own cache member wins; `false` opts out; both leave the policy's entry alone.
    let mut own = by_id(2);
    own["cache"] = json!({"ttl_ms": 5000});
    assert_eq!(read(&stack, own).await.0, "cellgate; fwd=miss; stored; ttl=5");
    let mut off = by_id(1);
    off["cache"] = json!(false);
    assert_eq!(read(&stack, off).await.0, "", "cache: false must not use the cache");

    // Every table must be covered; the shortest TTL of those read wins.
    let join = "SELECT i.id FROM items i JOIN tags t ON t.id = i.id WHERE i.id = $1";
    assert_eq!(read(&stack, at_madrid(join, json!([1]))).await.0, "cellgate; fwd=miss; stored; ttl=20");
    let uncovered = "SELECT i.id FROM items i JOIN notes n ON n.id = i.id WHERE i.id = $1";
    assert_eq!(read(&stack, at_madrid(uncovered, json!([1]))).await.0, "", "notes has no policy");
    let cte = "WITH x AS (SELECT id FROM items) SELECT id FROM x WHERE id = $1";
    assert_eq!(read(&stack, at_madrid(cte, json!([1]))).await.0, "cellgate; fwd=miss; stored; ttl=60");
    for sql in ["SELECT 1", "SELECT * FROM generate_series(1, 2)", "SELECT now()"] {
        assert_eq!(read(&stack, at_madrid(sql, json!([]))).await.0, "", "{sql} must not be covered");
    }

    // Every kind of write through cellgate: the cached answer is not served after the ack.
    let count = at_madrid("SELECT count(*)::int AS n, coalesce(sum(v), 0)::int AS s FROM items", json!([]));
    let n_s = |v: &Value| (v["rows"][0]["n"].as_i64().unwrap(), v["rows"][0]["s"].as_i64().unwrap());
    let (c, v) = read(&stack, count.clone()).await;
    assert_eq!((c.as_str(), n_s(&v)), ("cellgate; fwd=miss; stored; ttl=60", (2, 3)));
    assert!(read(&stack, count.clone()).await.0.contains("hit"));
    let primary = |stack: &Stack| {
        let t = on_primary(stack, "SELECT count(*) || ',' || coalesce(sum(v), 0) FROM items");
        let (n, s) = t.split_once(',').unwrap();
        (n.parse::<i64>().unwrap(), s.parse::<i64>().unwrap())
    };
    // A write that bypasses cellgate is bounded by the TTL only (documented): the old answer.
    on_primary(&stack, "UPDATE items SET v = 999 WHERE id = 1");
    let (c, v) = read(&stack, count.clone()).await;
    assert!(c.contains("hit"), "{c}");
    assert_eq!((n_s(&v), primary(&stack)), ((2, 3), (2, 1001)));
    let writes: Vec<(&str, &str, Value)> = vec![
        ("UPDATE", WRITE_TOKEN, at_madrid("UPDATE items SET v = v + 10 WHERE id = $1", json!([1]))),
        ("DELETE", WRITE_TOKEN, at_madrid("DELETE FROM items WHERE id = $1", json!([2]))),
        (
            "INSERT",
            WRITE_TOKEN,
            at_madrid(
                "INSERT INTO items (id, name, v, h3) VALUES ($1, 'three', 7, $2)",
                json!([3, h3_of(MADRID.0, MADRID.1)]),
            ),
        ),
        (
            "batch",
            WRITE_TOKEN,
            json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "batch": [
                {"sql": "UPDATE items SET v = v + 100 WHERE id = $1", "params": [1]},
                {"sql": "UPDATE items SET v = v + 100 WHERE id = $1", "params": [3]},
            ]}),
        ),
        // DDL moves the whole shard's version: even one that changes no row.
        ("ALTER", DDL_TOKEN, at_madrid("ALTER TABLE items ALTER COLUMN v SET DEFAULT 5", json!([]))),
        ("TRUNCATE", DDL_TOKEN, at_madrid("TRUNCATE items", json!([]))),
    ];
    for (what, token, body) in writes {
        let (s, _, v) = post(&stack, "/v1/sql/core/execute", token, &body).await;
        assert_eq!(s, 200, "{what}: {v}");
        let (c, v) = read(&stack, count.clone()).await;
        assert!(c.contains("fwd=miss"), "{what}: the read after the write was served from the cache: {c}");
        assert_eq!(n_s(&v), primary(&stack), "{what}: cellgate's answer differs from the primary's rows");
        assert!(read(&stack, count.clone()).await.0.contains("hit"), "{what}: refilled");
    }
    stack.stop().await;
}
