//! SQL Server backend end to end: cellgate in-process on 127.0.0.1:0, a map whose `tx` database
//! is `kind = "sqlserver"` on two shards, each a primary + a replica played by the TDS test
//! server (tests/support/tds.rs — a protocol fixture, not SQL Server). Checks what reached the
//! wire (SQL text, `@Pn` values and types, transactions, ReadOnly intent) and what came back.
//! Owns only in-process servers on free loopback ports, stopped by each test; must not need a
//! PostgreSQL cluster or a real SQL Server (except `real_server_round_trip`, opt-in).
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;
#[path = "support/tds.rs"]
mod tds;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellgate::config::Config;
use cellgate::server::{self, Running};
use chrono::NaiveDate;
use serde_json::{Value, json};
use support::{ADMIN_TOKEN, CANARY, MADRID, PARIS, READ_TOKEN, WRITE_TOKEN};
use tds::{ColTy, Handler, Param, Reply, Request, TdsServer, Val};

/// Described by the test server: @P1 int, @P2 decimal(10,2).
const DESCRIBED: &str = "SELECT id, name FROM items WHERE id = @P1 AND price > @P2";
/// Described: uniqueidentifier, varbinary, datetime2, datetimeoffset.
const DESCRIBED_TYPES: &str = "UPDATE blobs SET b = @P2, ts = @P3, tso = @P4 WHERE g = @P1";
/// Not describable (the server answers an error): parameters typed by JSON shape.
const SHAPED: &str = "SELECT @P1, @P2, @P3, @P4, @P5, @P6";
const ALL_TYPES: &str = "SELECT * FROM all_types";
const INSERT: &str = "INSERT INTO items (id, name) VALUES (@P1, @P2)";

fn days(y: i32, m: u32, d: u32) -> u32 {
    NaiveDate::from_ymd_opt(y, m, d)
        .unwrap()
        .signed_duration_since(NaiveDate::from_ymd_opt(1, 1, 1).unwrap())
        .num_days() as u32
}

/// The scripted behaviour of one test server (`shard`, `read_only` = a readable secondary).
fn script(shard: &'static str, read_only: bool) -> Handler {
    Arc::new(move |req: &Request| {
        if let Request::Batch(sql) = req {
            if sql.contains("Updateability") {
                let v = if read_only { "READ_ONLY" } else { "READ_WRITE" };
                return Reply::Rows {
                    cols: vec![(String::new(), ColTy::NVarChar)],
                    rows: vec![vec![Val::Str(v.into())]],
                };
            }
            return Reply::Affected(0); // BEGIN / COMMIT / ROLLBACK
        }
        if let Request::Rpc { proc_name, params } = req
            && proc_name == "sp_describe_undeclared_parameters"
        {
            let tsql = match params.first().map(|p| &p.val) {
                Some(Val::Str(s)) => s.clone(),
                _ => String::new(),
            };
            let described: &[(&str, &str)] = match tsql.as_str() {
                DESCRIBED => &[("@P1", "int"), ("@P2", "decimal(10,2)")],
                DESCRIBED_TYPES => &[
                    ("@P1", "uniqueidentifier"),
                    ("@P2", "varbinary(max)"),
                    ("@P3", "datetime2(7)"),
                    ("@P4", "datetimeoffset(7)"),
                ],
                INSERT => &[("@P1", "bigint"), ("@P2", "nvarchar(100)")],
                _ => {
                    return Reply::Error {
                        code: 11508,
                        class: 16,
                        message: "The undeclared parameter '@P1' is used more than once in the batch being analyzed."
                            .into(),
                    };
                }
            };
            return Reply::Rows {
                cols: vec![
                    ("parameter_ordinal".into(), ColTy::Int),
                    ("name".into(), ColTy::NVarChar),
                    ("suggested_system_type_name".into(), ColTy::NVarChar),
                ],
                rows: described
                    .iter()
                    .enumerate()
                    .map(|(i, (n, t))| vec![Val::Int(i as i64 + 1), Val::Str((*n).into()), Val::Str((*t).into())])
                    .collect(),
            };
        }
        let Some((sql, _, params)) = req.executesql() else {
            return Reply::Error { code: 2812, class: 16, message: "Could not find stored procedure.".into() };
        };
        let role = if read_only { "replica" } else { "primary" };
        match sql.as_str() {
            s if s.starts_with("INSERT") => {
                if params.iter().any(|p| p.val == Val::Int(666)) {
                    Reply::Error {
                        code: 2627,
                        class: 14,
                        message: "Violation of PRIMARY KEY constraint 'PK_items'. Cannot insert duplicate key.".into(),
                    }
                } else {
                    Reply::Affected(1)
                }
            }
            "RAISE" => Reply::Error { code: 50000, class: 16, message: "scripted failure".into() },
            "SLEEP" => Reply::Sleep(Duration::from_secs(6), Box::new(Reply::Affected(0))),
            "KILL" => Reply::Kill,
            "SELECT dist FROM places ORDER BY dist" => {
                let d: &[i64] = if shard == "a" { &[1, 4, 9] } else { &[2, 3] };
                Reply::Rows {
                    cols: vec![("dist".into(), ColTy::Int), ("shard".into(), ColTy::NVarChar)],
                    rows: d.iter().map(|x| vec![Val::Int(*x), Val::Str(shard.into())]).collect(),
                }
            }
            ALL_TYPES => Reply::Rows {
                cols: vec![
                    ("i".into(), ColTy::Int),
                    ("big".into(), ColTy::BigInt),
                    ("huge".into(), ColTy::BigInt),
                    ("flag".into(), ColTy::Bit),
                    ("f".into(), ColTy::Float),
                    ("price".into(), ColTy::Decimal(10, 2)),
                    ("cash".into(), ColTy::Money),
                    ("name".into(), ColTy::NVarChar),
                    ("bytes".into(), ColTy::VarBinary),
                    ("g".into(), ColTy::Guid),
                    ("ts".into(), ColTy::DateTime2),
                    ("tso".into(), ColTy::DateTimeOffset),
                    ("d".into(), ColTy::Date),
                    ("nothing".into(), ColTy::NVarChar),
                ],
                rows: vec![vec![
                    Val::Int(-7),
                    Val::Int(1 << 40),
                    Val::Int(i64::MAX),
                    Val::Bit(true),
                    Val::Float(2.5),
                    Val::Decimal(-1050, 2),
                    Val::Money(123_4500),
                    Val::Str("Zürich ✓".into()),
                    Val::Bin(vec![0, 1, 2, 255]),
                    Val::Guid("6f9619ff-8b86-d011-b42d-00c04fc964ff".into()),
                    Val::DateTime2(days(2024, 3, 1), (10 * 3600 + 5) * 10_000_000 + 1_234_500),
                    // 08:00 UTC stored, shown at +02:00.
                    Val::DateTimeOffset(days(2024, 3, 1), 8 * 3600 * 10_000_000, 120),
                    Val::Date(days(1999, 12, 31)),
                    Val::Null,
                ]],
            },
            _ => Reply::Rows {
                cols: vec![
                    ("id".into(), ColTy::BigInt),
                    ("shard".into(), ColTy::NVarChar),
                    ("role".into(), ColTy::NVarChar),
                ],
                rows: vec![vec![Val::Int(1), Val::Str(shard.into()), Val::Str(role.into())]],
            },
        }
    })
}

struct Peers {
    /// [shard a primary, shard a replica, shard b primary, shard b replica]
    servers: Vec<TdsServer>,
}

impl Peers {
    async fn start() -> Peers {
        let mut servers = Vec::new();
        for (shard, ro) in [("a", false), ("a", true), ("b", false), ("b", true)] {
            servers.push(TdsServer::start(script(shard, ro)).await);
        }
        Peers { servers }
    }
}

struct Gate {
    server: Option<Running>,
    http: reqwest::Client,
    dir: std::path::PathBuf,
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Primaries in the URL form, replicas in the ADO form: both must work.
fn map_toml(p: &Peers) -> String {
    map_toml_v(p, 1, None)
}

/// `b_replica`: point shard b's replica at this port instead.
fn map_toml_v(p: &Peers, version: u64, b_replica: Option<u16>) -> String {
    let mut s = format!("version = {version}\nresolution = 5\n");
    for (i, id) in ["a", "b"].iter().enumerate() {
        let primary =
            format!("sqlserver://app:{CANARY}@127.0.0.1:{}/tx?encrypt=not_supported", p.servers[i * 2].port());
        let port = match (i, b_replica) {
            (1, Some(port)) => port,
            _ => p.servers[i * 2 + 1].port(),
        };
        let replica =
            format!("server=tcp:127.0.0.1,{port};user id=app;password={CANARY};database=tx;encrypt=DANGER_PLAINTEXT");
        s += &format!(
            "[[shards]]\nid = \"{id}\"\nzone = \"test\"\n  [shards.databases.tx]\n  kind = \"sqlserver\"\n  primary = \"{primary}\"\n  replicas = [\"{replica}\"]\n"
        );
    }
    s += "[[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n[[assign]]\nshard = \"b\"\ncells = [\"801ffffffffffff\"]\n";
    s += "[fallback]\nmode = \"reject\"\n";
    s
}

impl Gate {
    async fn start(p: &Peers) -> Gate {
        support::logs();
        let dir = std::env::temp_dir().join(format!("cellgate-mssql-{}-{}", std::process::id(), p.servers[0].port()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("map.toml"), map_toml(p)).unwrap();
        // The fixture's scripted commands (SLEEP, KILL) are not SQL: the test database opts into
        // passing unparseable text through, as a user's legacy database could.
        let text = format!("{}\n[sql]\npass_unparsed = [\"tx\"]\n", support::config_text(&dir));
        let config = Config::parse(&text).expect("test config");
        let server = server::start(config, false).await.expect("cellgate starts");
        let g = Gate { server: Some(server), http: reqwest::Client::new(), dir };
        support::wait_ready(&g.http, &g.admin(), Duration::from_secs(20)).await;
        g
    }

    fn data(&self) -> String {
        format!("http://{}", self.server.as_ref().unwrap().data_addr)
    }

    fn admin(&self) -> String {
        format!("http://{}", self.server.as_ref().unwrap().admin_addr)
    }

    async fn post(&self, op: &str, token: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/sql/tx/{op}", self.data()))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, serde_json::from_str(&r.text().await.unwrap()).unwrap())
    }

    async fn query(&self, body: Value) -> (u16, Value) {
        self.post("query", READ_TOKEN, body).await
    }

    async fn execute(&self, body: Value) -> (u16, Value) {
        self.post("execute", WRITE_TOKEN, body).await
    }

    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

fn madrid() -> Value {
    json!({"lat": MADRID.0, "lng": MADRID.1})
}

/// The `sp_executesql` calls a server saw for `sql`: (declaration, parameters).
fn calls(s: &TdsServer, sql: &str) -> Vec<(String, Vec<Param>)> {
    s.requests().iter().filter_map(|r| r.executesql()).filter(|(t, _, _)| t == sql).map(|(_, d, p)| (d, p)).collect()
}

fn param(name: &str, ty: &str, val: Val) -> Param {
    Param { name: name.into(), ty: ty.into(), val }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_reach_the_server_typed_as_described() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let primary = &p.servers[0];

    let (s, r) =
        g.query(json!({"region": madrid(), "sql": DESCRIBED, "params": [7, "12.50"], "consistency": "primary"})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["shards"][0]["role"], "primary");
    assert_eq!(r["shards"][0]["endpoint"], format!("127.0.0.1:{}/tx", primary.port()));
    // The server was asked to describe the exact text, then ran it with typed parameters.
    let described: Vec<_> = primary
        .requests()
        .into_iter()
        .filter(|r| matches!(r, Request::Rpc { proc_name, .. } if proc_name == "sp_describe_undeclared_parameters"))
        .collect();
    assert_eq!(
        described,
        vec![Request::Rpc {
            proc_name: "sp_describe_undeclared_parameters".into(),
            params: vec![param("@tsql", "nvarchar", Val::Str(DESCRIBED.into()))]
        }]
    );
    let c = calls(primary, DESCRIBED);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, "@P1 int,@P2 decimal(10,2)");
    assert_eq!(
        c[0].1,
        vec![param("@P1", "intn(4)", Val::Int(7)), param("@P2", "numericn(4,2)", Val::Decimal(1250, 2))]
    );

    // The description is cached per SQL text: a second call does not ask again.
    let (s, _) =
        g.query(json!({"region": madrid(), "sql": DESCRIBED, "params": [8, "1"], "consistency": "primary"})).await;
    assert_eq!(s, 200);
    let asks = primary
        .requests()
        .iter()
        .filter(|r| matches!(r, Request::Rpc { proc_name, .. } if proc_name == "sp_describe_undeclared_parameters"))
        .count();
    assert_eq!(asks, 1);
    assert_eq!(calls(primary, DESCRIBED)[1].1[1], param("@P2", "numericn(1,0)", Val::Decimal(1, 0)));

    // uuid, base64 varbinary, datetime2, datetimeoffset.
    let (s, r) = g
        .execute(json!({"region": madrid(), "sql": DESCRIBED_TYPES,
            "params": ["6F9619FF-8B86-D011-B42D-00C04FC964FF", "AAEC/w==", "2024-03-01T10:00:00.5", "2024-03-01T10:00:00+02:00"]}))
        .await;
    assert_eq!(s, 200, "{r}");
    let c = calls(primary, DESCRIBED_TYPES);
    assert_eq!(c[0].0, "@P1 uniqueidentifier,@P2 varbinary(max),@P3 datetime2(7),@P4 datetimeoffset(7)");
    let d = days(2024, 3, 1);
    assert_eq!(
        c[0].1,
        vec![
            param("@P1", "guid", Val::Guid("6f9619ff-8b86-d011-b42d-00c04fc964ff".into())),
            param("@P2", "varbinary", Val::Bin(vec![0, 1, 2, 255])),
            param("@P3", "datetime2n(7)", Val::DateTime2(d, 36_000 * 10_000_000 + 5_000_000)),
            param("@P4", "datetimeoffsetn(7)", Val::DateTimeOffset(d, 8 * 3600 * 10_000_000, 120)),
        ]
    );

    // A value that does not fit the described type is the client's error, and nothing runs.
    let before = primary.requests().len();
    let (s, r) = g
        .query(json!({"region": madrid(), "sql": DESCRIBED, "params": ["seven", "1"], "consistency": "primary"}))
        .await;
    assert_eq!(s, 400, "{r}");
    assert_eq!(r["error"]["code"], "invalid_params");
    assert!(r["error"]["message"].as_str().unwrap().contains("@P1"), "{r}");
    assert_eq!(primary.requests().len(), before);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undescribable_parameters_are_typed_by_json_shape() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let primary = &p.servers[0];
    let (s, r) = g
        .query(json!({"region": madrid(), "sql": SHAPED, "params": [42, 1.5, true, "héllo", null, {"k": [1]}], "consistency": "primary"}))
        .await;
    assert_eq!(s, 200, "{r}");
    let c = calls(primary, SHAPED);
    assert_eq!(c[0].0, "@P1 bigint,@P2 float,@P3 bit,@P4 nvarchar(max),@P5 nvarchar(4000),@P6 nvarchar(max)");
    assert_eq!(
        c[0].1,
        vec![
            param("@P1", "intn(8)", Val::Int(42)),
            param("@P2", "floatn(8)", Val::Float(1.5)),
            param("@P3", "bitn", Val::Bit(true)),
            param("@P4", "nvarchar", Val::Str("héllo".into())),
            param("@P5", "null", Val::Null),
            param("@P6", "nvarchar", Val::Str("{\"k\":[1]}".into())),
        ]
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_columns_convert_to_json() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let (s, r) = g.query(json!({"region": madrid(), "sql": ALL_TYPES, "consistency": "primary"})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        r["rows"][0],
        json!({
            "i": -7, "big": 1i64 << 40, "huge": "9223372036854775807", "flag": true, "f": 2.5,
            "price": "-10.50", "cash": "123.4500", "name": "Zürich ✓", "bytes": "AAEC/w==",
            "g": "6f9619ff-8b86-d011-b42d-00c04fc964ff", "ts": "2024-03-01T10:00:05.12345",
            "tso": "2024-03-01T10:00:00+02:00", "d": "1999-12-31", "nothing": null,
        })
    );
    let types: Vec<&str> = r["columns"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "int",
            "bigint",
            "bigint",
            "bit",
            "float",
            "decimal",
            "money",
            "nvarchar",
            "varbinary",
            "uniqueidentifier",
            "datetime2",
            "datetimeoffset",
            "date",
            "nvarchar"
        ]
    );
    // No @params at all when there are no parameters, and no describe round trip.
    let c = calls(&p.servers[0], ALL_TYPES);
    assert_eq!(c[0], (String::new(), vec![]));
    // Array row format.
    let (_, r) =
        g.query(json!({"region": madrid(), "sql": "SELECT 1", "row_format": "array", "consistency": "primary"})).await;
    assert_eq!(r["rows"], json!([[1, "a", "primary"]]));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_batches_transactions_and_server_errors() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let primary = &p.servers[0];

    // One statement: autocommit, no transaction around it.
    let (s, r) = g.execute(json!({"region": madrid(), "sql": INSERT, "params": [1, "one"]})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["rows_affected"], 1);
    assert_eq!(r["shards"][0]["role"], "primary");
    assert_eq!(
        calls(primary, INSERT)[0].1,
        vec![param("@P1", "intn(8)", Val::Int(1)), param("@P2", "nvarchar", Val::Str("one".into()))]
    );
    assert!(!primary.requests().iter().any(|r| matches!(r, Request::Batch(b) if b.contains("TRANSACTION"))));
    let token = r["token"].as_str().expect("a token").to_string();

    // A read after the write goes to the primary (no replay position to wait for).
    let (s, r) = g.query(json!({"region": madrid(), "sql": "SELECT 1", "consistency": {"after": token}})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["shards"][0]["role"], "primary");

    // A batch runs in one transaction.
    primary.clear_requests();
    let (s, r) = g
        .execute(json!({"region": madrid(), "batch": [
            {"sql": INSERT, "params": [2, "two"]}, {"sql": INSERT, "params": [3, "three"]}]}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["rows_affected"], 2);
    let seq: Vec<String> = primary
        .requests()
        .iter()
        .map(|r| match r {
            Request::Batch(b) => b.clone(),
            r => r.sql().unwrap_or_default(),
        })
        .collect();
    assert_eq!(seq, ["BEGIN TRANSACTION", INSERT, INSERT, "COMMIT TRANSACTION"]);

    // A failing statement rolls the batch back; the server's number reaches the client.
    primary.clear_requests();
    let (s, r) = g
        .execute(json!({"region": madrid(), "batch": [
            {"sql": INSERT, "params": [4, "four"]}, {"sql": INSERT, "params": [666, "dup"]}, {"sql": INSERT, "params": [5, "five"]}]}))
        .await;
    assert_eq!(s, 422, "{r}");
    assert_eq!(r["error"]["code"], "database_error");
    assert_eq!(r["error"]["server_code"], 2627);
    assert_eq!(r["error"]["statement"], 1);
    assert!(r["error"]["message"].as_str().unwrap().contains("PRIMARY KEY"));
    let seq: Vec<String> = primary
        .requests()
        .iter()
        .map(|r| match r {
            Request::Batch(b) => b.clone(),
            r => r.sql().unwrap_or_default(),
        })
        .collect();
    assert_eq!(seq, ["BEGIN TRANSACTION", INSERT, INSERT, "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION"]);

    // A read error: 422 with the server's number; the connection stays usable.
    let accepted = primary.accepted();
    let (s, r) = g.query(json!({"region": madrid(), "sql": "RAISE", "consistency": "primary"})).await;
    assert_eq!((s, r["error"]["server_code"].clone()), (422, json!(50000)), "{r}");
    assert!(r["error"].get("sqlstate").is_none());
    let (s, _) = g.query(json!({"region": madrid(), "sql": "SELECT 1", "consistency": "primary"})).await;
    assert_eq!(s, 200);
    assert_eq!(primary.accepted(), accepted, "a server error must not cost a connection");

    // Writes to an area are refused before any backend is asked.
    let (s, _) = g
        .execute(json!({"region": {"lat": 44.0, "lng": 0.0, "radius_km": 700}, "sql": INSERT, "params": [9, "x"]}))
        .await;
    assert_eq!(s, 400);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_use_read_only_intent_and_primaries_do_not() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let (s, r) = g.query(json!({"region": madrid(), "sql": "SELECT 1"})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["shards"][0]["role"], "replica");
    assert_eq!(r["rows"][0]["role"], "replica");
    assert_eq!(r["shards"][0]["endpoint"], format!("127.0.0.1:{}/tx", p.servers[1].port()));
    for (i, srv) in p.servers.iter().enumerate() {
        let logins = srv.logins();
        assert!(!logins.is_empty(), "server {i} was probed");
        let replica = i % 2 == 1;
        assert!(logins.iter().all(|l| l.read_only_intent == replica), "server {i}: {logins:?}");
        assert!(logins.iter().all(|l| l.user == "app" && l.database == "tx"), "{logins:?}");
    }
    // Secrets stay out of admin output and logs.
    let admin = g.http.get(format!("{}/admin/shards", g.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let text = admin.text().await.unwrap();
    assert!(text.contains("\"kind\":\"sqlserver\""), "{text}");
    assert!(!text.contains(CANARY));
    let logs = String::from_utf8_lossy(&support::logs().lock().unwrap()).to_string();
    assert!(!logs.contains(CANARY), "password in the logs");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_to_the_primary_when_the_replica_dies() {
    let mut p = Peers::start().await;
    let g = Gate::start(&p).await;
    let q = json!({"region": madrid(), "sql": "SELECT 1"});
    assert_eq!(g.query(q.clone()).await.1["shards"][0]["role"], "replica");
    drop(p.servers.remove(1)); // shard a's replica: listener and connections gone
    // Every read still answers: retried on the primary until the prober excludes the replica.
    for _ in 0..10 {
        let (s, r) = g.query(q.clone()).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["shards"][0]["role"], "primary");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_routing_redirect_is_followed() {
    let mut p = Peers::start().await;
    // Shard a's replica address is a listener that redirects to the real secondary.
    let secondary = TdsServer::start(script("a", true)).await;
    p.servers[1].set_routing(Some(("127.0.0.1".into(), secondary.port())));
    let g = Gate::start(&p).await;
    let (s, r) = g.query(json!({"region": madrid(), "sql": "SELECT 1"})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["shards"][0]["role"], "replica");
    assert!(calls(&secondary, "SELECT 1").len() == 1, "the read ran on the routed-to secondary");
    assert!(p.servers[1].requests().iter().all(|r| r.executesql().is_none()), "nothing ran on the listener");
    assert!(secondary.logins().iter().all(|l| l.read_only_intent));
    p.servers.push(secondary);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_replaced() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let primary = &p.servers[0];
    let q = json!({"region": madrid(), "sql": "SELECT 1", "consistency": "primary"});
    assert_eq!(g.query(q.clone()).await.0, 200);
    let accepted = primary.accepted();
    primary.kill_all();
    // The pooled connection is dead; the read is answered on a new one.
    let (s, r) = g.query(q.clone()).await;
    assert_eq!(s, 200, "{r}");
    assert!(primary.accepted() > accepted, "a new connection was opened");
    // A connection the server drops mid-request: that request fails (503, retryable), and
    // the next one works.
    let (s, r) = g.execute(json!({"region": madrid(), "sql": "KILL"})).await;
    assert_eq!(s, 503, "{r}");
    assert_eq!(r["error"]["retryable"], true);
    let (s, r) = g.execute(json!({"region": madrid(), "sql": INSERT, "params": [10, "ten"]})).await;
    assert_eq!(s, 200, "{r}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_gives_504_and_the_abandoned_connection_is_dropped() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let primary = &p.servers[0];
    let t = Instant::now();
    let (s, r) = g.query(json!({"region": madrid(), "sql": "SLEEP", "consistency": "primary"})).await;
    assert_eq!(s, 504, "{r}");
    assert_eq!(r["error"]["code"], "timeout");
    assert!(t.elapsed() < Duration::from_millis(4500), "answered at the 3 s deadline, took {:?}", t.elapsed());
    // The connection left mid-answer is not reused: the next read opens a new one.
    let accepted = primary.accepted();
    let (s, _) = g.query(json!({"region": madrid(), "sql": "SELECT 1", "consistency": "primary"})).await;
    assert_eq!(s, 200);
    assert!(primary.accepted() > accepted, "the abandoned connection was reused");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn area_reads_merge_both_shards() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let (s, r) = g
        .query(json!({
            "region": {"lat": 44.0, "lng": 0.0, "radius_km": 700},
            "sql": "SELECT dist FROM places ORDER BY dist",
            "merge": {"order_by": [{"column": "dist"}], "limit": 4},
            "row_format": "array",
        }))
        .await;
    assert_eq!(s, 200, "{r}");
    let ids: Vec<&str> = r["shards"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(r["rows"], json!([[1, "a"], [2, "b"], [3, "b"], [4, "a"]]));
    assert_eq!(r["map_version"], 1);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_fails_writes_fast_and_reads_continue() {
    let mut p = Peers::start().await;
    let g = Gate::start(&p).await;
    let paris = json!({"lat": PARIS.0, "lng": PARIS.1});
    // Shard b's primary goes away (listener and connections).
    drop(p.servers.remove(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, r) = g.execute(json!({"region": paris, "sql": INSERT, "params": [1, "x"]})).await;
        if s == 503 && r["error"]["message"].as_str().unwrap_or("").contains("is down") {
            break;
        }
        assert!(Instant::now() < deadline, "primary never marked down: {s} {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    let (s, r) = g.execute(json!({"region": paris, "sql": INSERT, "params": [1, "x"]})).await;
    assert_eq!(s, 503, "{r}");
    assert_eq!(r["error"]["code"], "shard_unavailable");
    assert!(t.elapsed() < Duration::from_millis(500), "fail fast, took {:?}", t.elapsed());
    let (s, r) = g.query(json!({"region": paris, "sql": "SELECT 1"})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["shards"][0]["role"], "replica");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_429() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    // pool.max_size = 8: eight slow reads hold every connection of shard a's primary.
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let http = g.http.clone();
            let url = format!("{}/v1/sql/tx/query", g.data());
            tokio::spawn(async move {
                let body = json!({"region": madrid(), "sql": "SLEEP", "consistency": "primary"});
                http.post(url).bearer_auth(READ_TOKEN).json(&body).send().await.unwrap().status().as_u16()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let (s, r) = g.query(json!({"region": madrid(), "sql": "SELECT 1", "consistency": "primary"})).await;
    assert_eq!(s, 429, "{r}");
    assert_eq!(r["error"]["code"], "overloaded");
    assert!(t.elapsed() < Duration::from_millis(2500), "checkout_timeout_ms bounds the wait: {:?}", t.elapsed());
    for h in slow {
        assert_eq!(h.await.unwrap(), 504);
    }
    // The abandoned connections were dropped, and the pool serves again.
    let (s, _) = g.query(json!({"region": madrid(), "sql": "SELECT 1", "consistency": "primary"})).await;
    assert_eq!(s, 200);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_endpoints_and_checks_new_ones() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let q = json!({"region": madrid(), "sql": "SELECT 1", "consistency": "primary"});
    assert_eq!(g.query(q.clone()).await.0, 200);
    let before: Vec<usize> = p.servers.iter().map(|s| s.accepted()).collect();
    let path = g.dir.join("map.toml");
    let reload = || async {
        let r = g.http.post(format!("{}/admin/map/reload", g.admin())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    // Same endpoints, new version: published (by the file watcher or this call) without a
    // single new connection.
    std::fs::write(&path, map_toml_v(&p, 2, None)).unwrap();
    let (s, out) = reload().await;
    assert_eq!(s, 200, "{out}");
    let (s, r) = g.query(q.clone()).await;
    assert_eq!((s, r["map_version"].clone()), (200, json!(2)), "{r}");
    let after: Vec<usize> = p.servers.iter().map(|s| s.accepted()).collect();
    assert_eq!(before, after, "unchanged endpoints keep their pools and probe connections");
    // A new endpoint that does not answer: the reload is refused, version 2 keeps serving.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    std::fs::write(&path, map_toml_v(&p, 3, Some(dead_port))).unwrap();
    let (s, out) = reload().await;
    assert_eq!(s, 422, "{out}");
    let text = out.to_string();
    assert!(text.contains(&format!("127.0.0.1:{dead_port}/tx")), "{text}");
    assert!(!text.contains(CANARY));
    let (s, r) = g.query(q).await;
    assert_eq!((s, r["map_version"].clone()), (200, json!(2)));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migrations_refuse_sqlserver_databases() {
    let p = Peers::start().await;
    let g = Gate::start(&p).await;
    let r = g
        .http
        .post(format!("{}/admin/migrations", g.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"cells": ["8039fffffffffff"], "to": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported", "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("is sqlserver") && m.contains("database \""), "names the database and its kind: {v}");
    g.stop().await;
}

/// Against a real SQL Server when `CELLGATE_TEST_MSSQL_URL` is set (a `sqlserver://` URL or an
/// ADO string with the password; the database must exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_round_trip() {
    let Ok(url) = std::env::var("CELLGATE_TEST_MSSQL_URL") else {
        println!("SKIPPED real_server_round_trip: CELLGATE_TEST_MSSQL_URL not set");
        return;
    };
    support::logs();
    let dir = std::env::temp_dir().join(format!("cellgate-mssql-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let map = format!(
        "version = 1\nresolution = 5\n[[shards]]\nid = \"a\"\nzone = \"test\"\n  [shards.databases.tx]\n  kind = \"sqlserver\"\n  primary = \"{}\"\n[[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n[fallback]\nmode = \"reject\"\n",
        url.replace('"', "\\\"")
    );
    std::fs::write(dir.join("map.toml"), map).unwrap();
    let config = Config::parse(&support::config_text(&dir)).unwrap();
    let g =
        Gate { server: Some(server::start(config, false).await.expect("starts")), http: reqwest::Client::new(), dir };
    // DDL through /execute needs the ddl scope.
    let (s, r) = g
        .post("execute", support::DDL_TOKEN, json!({"region": madrid(), "batch": [
            {"sql": "IF OBJECT_ID('dbo.cellgate_t') IS NOT NULL DROP TABLE dbo.cellgate_t"},
            {"sql": "CREATE TABLE dbo.cellgate_t (id int PRIMARY KEY, price decimal(10,2), g uniqueidentifier, b varbinary(10), ts datetimeoffset)"},
            {"sql": "INSERT INTO dbo.cellgate_t VALUES (@P1, @P2, @P3, @P4, @P5)",
             "params": [1, "12.50", "6f9619ff-8b86-d011-b42d-00c04fc964ff", "AAEC", "2024-03-01T10:00:00+02:00"]}]}))
        .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = g.query(json!({"region": madrid(), "sql": "SELECT id, price, g, b, ts FROM dbo.cellgate_t WHERE id = @P1", "params": [1], "consistency": "primary"})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        r["rows"][0],
        json!({"id": 1, "price": "12.50", "g": "6f9619ff-8b86-d011-b42d-00c04fc964ff", "b": "AAEC", "ts": "2024-03-01T10:00:00+02:00"})
    );
    let (s, r) = g
        .execute(json!({"region": madrid(), "sql": "INSERT INTO dbo.cellgate_t (id) VALUES (@P1)", "params": [1]}))
        .await;
    assert_eq!((s, r["error"]["server_code"].clone()), (422, json!(2627)), "{r}");
    g.stop().await;
}
