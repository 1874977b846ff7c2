//! Integration tests of `cellgate::backend::pg_types` (JSON ↔ PostgreSQL values) against a real PostgreSQL started with `cellgate-harness`; owns nothing outside its own throwaway cluster.
//!
//! One cluster (1 shard, no replicas) is shared by every test in this file; the harness's
//! watchdog removes it when the test process exits. Each test uses its own connection and its
//! own tables. Table-driven tests collect every mismatch and fail once, listing all of them.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

use std::future::Future;
use std::sync::OnceLock;

use cellgate::backend::postgres::types::{
    ColumnError, ParamError, as_sql_refs, bind_params, column_to_json, is_supported, row_to_json, type_name,
};
use cellgate_harness::{Cluster, ClusterSpec};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

struct Db {
    _cluster: Cluster,
    url: String,
}

/// URL of the shared test database; starts the cluster on first use.
fn db_url() -> &'static str {
    static DB: OnceLock<Result<Db, String>> = OnceLock::new();
    let db = DB.get_or_init(|| {
        Cluster::start(ClusterSpec { shards: 1, replicas_per_shard: 0, ..ClusterSpec::default() })
            .map(|cluster| {
                let url = cluster.shards[0].primary.app_url("core");
                Db { _cluster: cluster, url }
            })
            .map_err(|e| {
                format!(
                    "these tests need a real PostgreSQL, started by cellgate-harness; it failed \
                     (is PostgreSQL installed? set CELLGATE_PG_BINDIR to its bin directory): {e}"
                )
            })
    });
    match db {
        Ok(db) => &db.url,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `f` with a fresh connection (session time zone UTC, so `::text` renderings are stable).
fn with_client<F, Fut>(f: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = ()>,
{
    let url = db_url(); // synchronous cluster start, outside the runtime
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect to the test database");
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("connection error: {e}");
            }
        });
        client.batch_execute("SET TimeZone = 'UTC'").await.expect("SET TimeZone");
        f(client).await;
    });
}

fn db_err(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// Prepares `sql`, binds the JSON params for the inferred types, runs it, converts all rows.
async fn query_json(client: &Client, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, String> {
    let stmt = client.prepare(sql).await.map_err(|e| format!("prepare: {}", db_err(&e)))?;
    let bound = bind_params(stmt.params(), params).map_err(|e| format!("bind: {e}"))?;
    let rows = client.query(&stmt, &as_sql_refs(&bound)).await.map_err(|e| format!("query: {}", db_err(&e)))?;
    rows.iter().map(|r| row_to_json(r).map_err(|e| format!("column: {e}"))).collect()
}

async fn bind_error(client: &Client, sql: &str, params: &[Value]) -> ParamError {
    let stmt = client.prepare(sql).await.unwrap_or_else(|e| panic!("prepare {sql}: {}", db_err(&e)));
    match bind_params(stmt.params(), params) {
        Ok(p) => panic!("{sql} with {params:?} should not bind, got {p:?}"),
        Err(e) => e,
    }
}

fn report(failures: &[String]) {
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// `SELECT $1::T, ($1::T)::text`: our JSON out, and the server's own rendering of what we sent.
#[test]
fn scalar_round_trips_through_the_server() {
    // (type, JSON in, JSON out, server text of the value or None to skip)
    let big_numeric = format!("{}.{}", "9".repeat(1000), "0".repeat(999) + "1");
    let cases: Vec<(&str, Value, Value, Option<String>)> = vec![
        ("bool", json!(true), json!(true), Some("true".into())),
        ("bool", json!(false), json!(false), Some("false".into())),
        ("int2", json!(32767), json!(32767), Some("32767".into())),
        ("int2", json!(-32768), json!(-32768), Some("-32768".into())),
        ("int2", json!("123"), json!(123), Some("123".into())),
        ("int4", json!(2_147_483_647), json!(2_147_483_647), Some("2147483647".into())),
        ("int4", json!(-2_147_483_648_i64), json!(-2_147_483_648_i64), Some("-2147483648".into())),
        ("int4", json!(3.0), json!(3), Some("3".into())),
        ("int8", json!(42), json!(42), Some("42".into())),
        ("int8", json!(9_007_199_254_740_991_i64), json!(9_007_199_254_740_991_i64), Some("9007199254740991".into())),
        ("int8", json!(-9_007_199_254_740_991_i64), json!(-9_007_199_254_740_991_i64), None),
        ("int8", json!(9_007_199_254_740_992_i64), json!("9007199254740992"), Some("9007199254740992".into())),
        ("int8", json!("9007199254740993"), json!("9007199254740993"), Some("9007199254740993".into())),
        ("int8", json!(i64::MAX), json!("9223372036854775807"), Some("9223372036854775807".into())),
        ("int8", json!("-9223372036854775808"), json!("-9223372036854775808"), Some("-9223372036854775808".into())),
        ("int8", json!("+17"), json!(17), Some("17".into())),
        ("oid", json!(4_294_967_295_u32), json!(4_294_967_295_u32), Some("4294967295".into())),
        ("float4", json!(0.1), json!(0.1), Some("0.1".into())),
        ("float4", json!(3.4e38), json!(3.4e38), Some("3.4e+38".into())),
        ("float4", json!("NaN"), json!("NaN"), Some("NaN".into())),
        ("float4", json!("-Infinity"), json!("-Infinity"), Some("-Infinity".into())),
        ("float8", json!(0.1), json!(0.1), Some("0.1".into())),
        ("float8", json!(1e308), json!(1e308), Some("1e+308".into())),
        ("float8", json!(-2.5e-300), json!(-2.5e-300), Some("-2.5e-300".into())),
        ("float8", json!("1.5"), json!(1.5), Some("1.5".into())),
        ("float8", json!("Infinity"), json!("Infinity"), Some("Infinity".into())),
        ("float8", json!(7), json!(7.0), Some("7".into())),
        ("numeric", json!("0"), json!("0"), Some("0".into())),
        ("numeric", json!("-0"), json!("0"), Some("0".into())),
        ("numeric", json!("-0.000100"), json!("-0.000100"), Some("-0.000100".into())),
        (
            "numeric",
            json!("12345678901234567890.123456789"),
            json!("12345678901234567890.123456789"),
            Some("12345678901234567890.123456789".into()),
        ),
        ("numeric", json!("1e-20"), json!("0.00000000000000000001"), Some("0.00000000000000000001".into())),
        ("numeric", json!("-1.5E+3"), json!("-1500"), Some("-1500".into())),
        ("numeric", json!("1.50e1"), json!("15.0"), Some("15.0".into())),
        ("numeric", json!(1.5), json!("1.5"), Some("1.5".into())),
        ("numeric", json!(12345), json!("12345"), Some("12345".into())),
        ("numeric", json!(-9_223_372_036_854_775_808_i64), json!("-9223372036854775808"), None),
        ("numeric", json!(1e21), json!("1000000000000000000000"), Some("1000000000000000000000".into())),
        ("numeric", json!("99990000.00010000"), json!("99990000.00010000"), Some("99990000.00010000".into())),
        ("numeric", json!(big_numeric.clone()), json!(big_numeric.clone()), Some(big_numeric.clone())),
        ("numeric", json!("1e100"), json!(format!("1{}", "0".repeat(100))), Some(format!("1{}", "0".repeat(100)))),
        ("numeric", json!("NaN"), json!("NaN"), Some("NaN".into())),
        ("numeric", json!("Infinity"), json!("Infinity"), Some("Infinity".into())),
        ("numeric", json!("-Infinity"), json!("-Infinity"), Some("-Infinity".into())),
        ("numeric(10,2)", json!("1.5"), json!("1.50"), Some("1.50".into())),
        ("numeric(10,2)", json!("1.50"), json!("1.50"), Some("1.50".into())),
        ("numeric(10,2)", json!("2.345"), json!("2.35"), Some("2.35".into())),
        (
            "text",
            json!("héllo wörld ✓ \"q\" 'x'"),
            json!("héllo wörld ✓ \"q\" 'x'"),
            Some("héllo wörld ✓ \"q\" 'x'".into()),
        ),
        ("text", json!(""), json!(""), Some(String::new())),
        ("varchar", json!("abc"), json!("abc"), Some("abc".into())),
        ("varchar(5)", json!("abc"), json!("abc"), Some("abc".into())),
        ("char(5)", json!("ab"), json!("ab   "), Some("ab".into())),
        ("name", json!("some_name"), json!("some_name"), Some("some_name".into())),
        ("\"char\"", json!("a"), json!("a"), Some("a".into())),
        ("\"char\"", json!(""), json!(""), Some(String::new())),
        ("\"char\"", json!("\\377"), json!("\\377"), Some("\\377".into())),
        (
            "uuid",
            json!("123E4567-E89B-12D3-A456-426614174000"),
            json!("123e4567-e89b-12d3-a456-426614174000"),
            Some("123e4567-e89b-12d3-a456-426614174000".into()),
        ),
        (
            "uuid",
            json!("{123e4567-e89b-12d3-a456-426614174000}"),
            json!("123e4567-e89b-12d3-a456-426614174000"),
            Some("123e4567-e89b-12d3-a456-426614174000".into()),
        ),
        (
            "uuid",
            json!("123e4567e89b12d3a456426614174000"),
            json!("123e4567-e89b-12d3-a456-426614174000"),
            Some("123e4567-e89b-12d3-a456-426614174000".into()),
        ),
        (
            "json",
            json!({"a": [1, 2, {"b": null}], "c": "x"}),
            json!({"a": [1, 2, {"b": null}], "c": "x"}),
            Some(r#"{"a":[1,2,{"b":null}],"c":"x"}"#.into()),
        ),
        (
            "jsonb",
            json!({"a": [1, 2.5, {"b": null}], "c": "x"}),
            json!({"a": [1, 2.5, {"b": null}], "c": "x"}),
            Some(r#"{"a": [1, 2.5, {"b": null}], "c": "x"}"#.into()),
        ),
        ("jsonb", json!("str"), json!("str"), Some("\"str\"".into())),
        ("jsonb", json!(5), json!(5), Some("5".into())),
        ("jsonb", json!([true, false]), json!([true, false]), Some("[true, false]".into())),
        ("date", json!("2024-02-29"), json!("2024-02-29"), Some("2024-02-29".into())),
        ("date", json!("-4713-11-24"), json!("-4713-11-24"), Some("4714-11-24 BC".into())),
        ("date", json!("0000-01-01"), json!("0000-01-01"), Some("0001-01-01 BC".into())),
        ("date", json!("+5874897-12-31"), json!("+5874897-12-31"), Some("5874897-12-31".into())),
        ("date", json!("infinity"), json!("infinity"), Some("infinity".into())),
        ("date", json!("-infinity"), json!("-infinity"), Some("-infinity".into())),
        ("time", json!("12:34:56.789"), json!("12:34:56.789"), Some("12:34:56.789".into())),
        ("time", json!("08:00"), json!("08:00:00"), Some("08:00:00".into())),
        ("time", json!("00:00:00.000001"), json!("00:00:00.000001"), Some("00:00:00.000001".into())),
        ("time", json!("24:00:00"), json!("24:00:00"), Some("24:00:00".into())),
        (
            "timestamp",
            json!("2024-03-10T12:34:56.123456"),
            json!("2024-03-10T12:34:56.123456"),
            Some("2024-03-10 12:34:56.123456".into()),
        ),
        ("timestamp", json!("2024-03-10 00:00:00Z"), json!("2024-03-10T00:00:00"), Some("2024-03-10 00:00:00".into())),
        ("timestamp", json!("1999-12-31"), json!("1999-12-31T00:00:00"), Some("1999-12-31 00:00:00".into())),
        ("timestamp", json!("0001-01-01T00:00:00"), json!("0001-01-01T00:00:00"), Some("0001-01-01 00:00:00".into())),
        ("timestamp", json!("-infinity"), json!("-infinity"), Some("-infinity".into())),
        (
            "timestamptz",
            json!("2024-03-10T12:34:56.789+02:00"),
            json!("2024-03-10T10:34:56.789Z"),
            Some("2024-03-10 10:34:56.789+00".into()),
        ),
        (
            "timestamptz",
            json!("2024-03-10T12:00:00-05:30"),
            json!("2024-03-10T17:30:00Z"),
            Some("2024-03-10 17:30:00+00".into()),
        ),
        (
            "timestamptz",
            json!("2024-01-01T00:30:00+0100"),
            json!("2023-12-31T23:30:00Z"),
            Some("2023-12-31 23:30:00+00".into()),
        ),
        (
            "timestamptz",
            json!("2024-03-10T12:00:00"),
            json!("2024-03-10T12:00:00Z"),
            Some("2024-03-10 12:00:00+00".into()),
        ),
        (
            "timestamptz",
            json!("1969-07-20T20:17:40Z"),
            json!("1969-07-20T20:17:40Z"),
            Some("1969-07-20 20:17:40+00".into()),
        ),
        ("timestamptz", json!("infinity"), json!("infinity"), Some("infinity".into())),
        ("bytea", json!("AAEC/w=="), json!("AAEC/w=="), Some("\\x000102ff".into())),
        ("bytea", json!("AAEC/w"), json!("AAEC/w=="), Some("\\x000102ff".into())),
        ("bytea", json!(""), json!(""), Some("\\x".into())),
        ("int2[]", json!([1, null, -3]), json!([1, null, -3]), Some("{1,NULL,-3}".into())),
        ("int4[]", json!([]), json!([]), Some("{}".into())),
        ("int4[]", json!([2_147_483_647, "5"]), json!([2_147_483_647, 5]), Some("{2147483647,5}".into())),
        (
            "int8[]",
            json!([1, "9007199254740993", null]),
            json!([1, "9007199254740993", null]),
            Some("{1,9007199254740993,NULL}".into()),
        ),
        (
            "text[]",
            json!(["a", null, "b,c", "NULL", ""]),
            json!(["a", null, "b,c", "NULL", ""]),
            Some(r#"{a,NULL,"b,c","NULL",""}"#.into()),
        ),
        ("varchar[]", json!(["x", null]), json!(["x", null]), Some("{x,NULL}".into())),
        ("numeric[]", json!(["1.50", 2, null]), json!(["1.50", "2", null]), Some("{1.50,2,NULL}".into())),
        ("bool[]", json!([true, null]), json!([true, null]), Some("{t,NULL}".into())),
        (
            "timestamptz[]",
            json!(["2024-01-01T00:00:00+01:00"]),
            json!(["2023-12-31T23:00:00Z"]),
            Some(r#"{"2023-12-31 23:00:00+00"}"#.into()),
        ),
        ("jsonb[]", json!([{"a": 1}, [1, 2]]), json!([{"a": 1}, [1, 2]]), Some(r#"{"{\"a\": 1}","[1, 2]"}"#.into())),
    ];
    with_client(|client| async move {
        let mut failures = Vec::new();
        for (ty, input, want, want_text) in &cases {
            let sql = format!("SELECT $1::{ty} AS v, ($1::{ty})::text AS t");
            match query_json(&client, &sql, std::slice::from_ref(input)).await {
                Err(e) => failures.push(format!("{ty} {input}: {e}")),
                Ok(rows) => {
                    let got = &rows[0][0];
                    if got != want {
                        failures.push(format!("{ty} {input}: JSON out {got}, want {want}"));
                    }
                    if let Some(text) = want_text
                        && rows[0][1] != json!(text)
                    {
                        failures.push(format!("{ty} {input}: server text {}, want {text:?}", rows[0][1]));
                    }
                }
            }
        }
        // NULL in, NULL out, for every type.
        let mut types: Vec<&str> = cases.iter().map(|c| c.0).collect();
        types.dedup();
        for ty in types {
            let sql = format!("SELECT $1::{ty}, $1::{ty} IS NULL");
            match query_json(&client, &sql, &[Value::Null]).await {
                Ok(rows) if rows[0] == [Value::Null, json!(true)] => {}
                other => failures.push(format!("{ty} null: {other:?}")),
            }
        }
        report(&failures);
    });
}

/// Values produced by the server itself (not by our encoder) decode as documented.
#[test]
fn server_values_decode() {
    let cases: Vec<(&str, Value)> = vec![
        ("'-0.000100'::numeric", json!("-0.000100")),
        ("1.50::numeric(10,2)", json!("1.50")),
        ("0::numeric(10,3)", json!("0.000")),
        ("0.1::numeric * 3", json!("0.3")),
        ("1::numeric / 3", json!("0.33333333333333333333")),
        (
            "'123456789012345678901234567890.000000000000000000001'::numeric",
            json!("123456789012345678901234567890.000000000000000000001"),
        ),
        ("'1e100'::numeric", json!(format!("1{}", "0".repeat(100)))),
        ("'1e-100'::numeric", json!(format!("0.{}1", "0".repeat(99)))),
        ("'-12345.6789'::numeric", json!("-12345.6789")),
        ("'NaN'::numeric", json!("NaN")),
        ("'Infinity'::numeric", json!("Infinity")),
        ("'-Infinity'::numeric", json!("-Infinity")),
        ("9223372036854775807::int8", json!("9223372036854775807")),
        ("(-9223372036854775807 - 1)::int8", json!("-9223372036854775808")),
        ("(-9007199254740991)::int8", json!(-9_007_199_254_740_991_i64)),
        ("(-9007199254740992)::int8", json!("-9007199254740992")),
        ("32767::int2", json!(32767)),
        ("'pg_class'::regclass::oid", json!(1259)),
        ("0.1::float4", json!(0.1)),
        ("'NaN'::float8", json!("NaN")),
        ("'-Infinity'::float4", json!("-Infinity")),
        ("'-0'::float8", json!(-0.0)),
        ("'abc'::\"char\"", json!("a")),
        ("'a b'::name", json!("a b")),
        ("'x'::char(3)", json!("x  ")),
        ("'00000000-0000-0000-0000-00000000000A'::uuid", json!("00000000-0000-0000-0000-00000000000a")),
        (r#"'{"k": [1, 2.5, "x"], "n": null}'::jsonb"#, json!({"k": [1, 2.5, "x"], "n": null})),
        ("'null'::jsonb", json!(null)),
        (r#"'[1, {"a" : "b"}]'::json"#, json!([1, {"a": "b"}])),
        ("'infinity'::timestamp", json!("infinity")),
        ("'-infinity'::timestamptz", json!("-infinity")),
        ("'infinity'::date", json!("infinity")),
        ("'24:00:00'::time", json!("24:00:00")),
        ("'4714-11-24 BC'::date", json!("-4713-11-24")),
        ("'0044-03-15 BC'::date", json!("-0043-03-15")),
        ("'294276-12-31 23:59:59.999999'::timestamp", json!("+294276-12-31T23:59:59.999999")),
        ("'4714-11-24 00:00:00 BC'::timestamp", json!("-4713-11-24T00:00:00")),
        ("'2024-03-10 12:34:56.5+02'::timestamptz", json!("2024-03-10T10:34:56.5Z")),
        ("'2000-01-01 00:00:00'::timestamp - interval '1 microsecond'", json!("1999-12-31T23:59:59.999999")),
        ("'5874897-12-31'::date", json!("+5874897-12-31")),
        ("ARRAY[[1,2],[3,4]]", json!([[1, 2], [3, 4]])),
        ("ARRAY[[['a']],[[NULL]]]::text[]", json!([[["a"]], [[null]]])),
        ("'{}'::int[]", json!([])),
        ("'[0:1]={7,8}'::int[]", json!([7, 8])),
        ("ARRAY[NULL::int]", json!([null])),
        ("ARRAY[9223372036854775807, 1]::int8[]", json!(["9223372036854775807", 1])),
        ("ARRAY['1.10'::numeric, 'NaN']", json!(["1.10", "NaN"])),
        ("ARRAY['2024-01-01'::date]", json!(["2024-01-01"])),
        ("'\\x00ff'::bytea", json!("AP8=")),
        ("''::bytea", json!("")),
        ("NULL::int4", json!(null)),
        ("NULL::int4[]", json!(null)),
        ("'plain'::unknown", json!("plain")),
    ];
    with_client(|client| async move {
        let mut failures = Vec::new();
        for (expr, want) in &cases {
            match query_json(&client, &format!("SELECT {expr}"), &[]).await {
                Ok(rows) if rows[0][0] == *want => {}
                Ok(rows) => failures.push(format!("{expr}: got {}, want {want}", rows[0][0])),
                Err(e) => failures.push(format!("{expr}: {e}")),
            }
        }
        report(&failures);
    });
}

/// A table with a column of every supported type: insert with bound params, select back.
#[test]
fn table_insert_and_select_every_type() {
    with_client(|client| async move {
        client
            .batch_execute(
                "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
                 CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
                 CREATE TABLE every_type (
                     id int4 PRIMARY KEY, c_bool bool, c_int2 int2, c_int4 int4, c_int8 int8,
                     c_oid oid, c_float4 float4, c_float8 float8, c_numeric numeric,
                     c_numeric_2 numeric(10,2), c_text text, c_varchar varchar(20), c_bpchar char(4),
                     c_name name, c_char \"char\", c_uuid uuid, c_json json, c_jsonb jsonb, c_date date,
                     c_time time, c_ts timestamp, c_tstz timestamptz, c_bytea bytea, c_int2a int2[],
                     c_int4a int4[], c_int8a int8[], c_texta text[], c_varchara varchar[],
                     c_mood mood, c_moods mood[], c_posint posint)",
            )
            .await
            .expect("create table");
        let stmt = client.prepare("SELECT * FROM every_type LIMIT 0").await.expect("prepare");
        let ncols = stmt.columns().len();
        let placeholders: Vec<String> = (1..=ncols).map(|i| format!("${i}")).collect();
        let insert = format!("INSERT INTO every_type VALUES ({})", placeholders.join(", "));
        let values = vec![
            json!(1),
            json!(true),
            json!(-7),
            json!(123_456),
            json!("9007199254740993"),
            json!(42),
            json!(1.5),
            json!(-0.25),
            json!("-1234567890.0987654321"),
            json!(3.1),
            json!("tëxt"),
            json!("vc"),
            json!("ab"),
            json!("nm"),
            json!("z"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!({"j": [1, "two"]}),
            json!({"jb": {"nested": true}}),
            json!("2024-06-30"),
            json!("23:59:59.5"),
            json!("2024-06-30T23:59:59.5"),
            json!("2024-06-30T23:59:59.5-07:00"),
            json!("3q2+7w=="),
            json!([1, null]),
            json!([]),
            json!([null, "-9007199254740993", 5]),
            json!(["x", null, "{y}"]),
            json!(["v"]),
            json!("happy"),
            json!(["sad", null, "ok"]),
            json!(5),
        ];
        assert_eq!(values.len(), ncols, "one value per column");
        let expected = vec![
            json!(1),
            json!(true),
            json!(-7),
            json!(123_456),
            json!("9007199254740993"),
            json!(42),
            json!(1.5),
            json!(-0.25),
            json!("-1234567890.0987654321"),
            json!("3.10"),
            json!("tëxt"),
            json!("vc"),
            json!("ab  "),
            json!("nm"),
            json!("z"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!({"j": [1, "two"]}),
            json!({"jb": {"nested": true}}),
            json!("2024-06-30"),
            json!("23:59:59.5"),
            json!("2024-06-30T23:59:59.5"),
            json!("2024-07-01T06:59:59.5Z"),
            json!("3q2+7w=="),
            json!([1, null]),
            json!([]),
            json!([null, "-9007199254740993", 5]),
            json!(["x", null, "{y}"]),
            json!(["v"]),
            json!("happy"),
            json!(["sad", null, "ok"]),
            json!(5),
        ];
        query_json(&client, &insert, &values).await.expect("insert row 1");
        let mut nulls = vec![Value::Null; ncols];
        nulls[0] = json!(2);
        query_json(&client, &insert, &nulls).await.expect("insert row 2 (all NULL)");

        let rows = query_json(&client, "SELECT * FROM every_type WHERE id = $1", &[json!(1)]).await.expect("select 1");
        let mut failures = Vec::new();
        for (i, col) in stmt.columns().iter().enumerate() {
            if rows[0][i] != expected[i] {
                failures.push(format!(
                    "{} ({}): got {}, want {}",
                    col.name(),
                    type_name(col.type_()),
                    rows[0][i],
                    expected[i]
                ));
            }
            if !is_supported(col.type_()) {
                failures.push(format!("{} ({}) should be supported", col.name(), type_name(col.type_())));
            }
        }
        let rows =
            query_json(&client, "SELECT * FROM every_type WHERE id = $1", &[json!("2")]).await.expect("select 2");
        if rows[0] != nulls {
            failures.push(format!("all-NULL row came back as {:?}", rows[0]));
        }
        // Filters with bound values of the exotic kinds find the row again.
        let filters = [
            ("c_int8 = $1", json!("9007199254740993")),
            ("c_numeric = $1", json!("-1234567890.098765432100")),
            ("c_numeric_2 = $1", json!(3.1)),
            ("c_tstz = $1", json!("2024-07-01T06:59:59.5Z")),
            ("c_uuid = $1", json!("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11")),
            ("c_int8a = $1", json!([null, "-9007199254740993", 5])),
            ("$1 = ANY(c_texta)", json!("{y}")),
            ("c_mood = $1", json!("happy")),
            ("c_posint = $1", json!(5)),
            ("c_jsonb @> $1", json!({"jb": {}})),
            ("c_bytea = $1", json!("3q2+7w")),
        ];
        for (filter, value) in filters {
            let sql = format!("SELECT id FROM every_type WHERE {filter}");
            match query_json(&client, &sql, std::slice::from_ref(&value)).await {
                Ok(rows) if rows == [[json!(1)]] => {}
                other => failures.push(format!("WHERE {filter} with {value}: {other:?}")),
            }
        }
        // RETURNING converts like SELECT; a domain violation is the server's error, not ours.
        let returning = query_json(
            &client,
            "UPDATE every_type SET c_int8 = $1 WHERE id = 1 RETURNING c_int8, c_posint",
            &[json!(-9_007_199_254_740_991_i64)],
        )
        .await;
        if returning != Ok(vec![vec![json!(-9_007_199_254_740_991_i64), json!(5)]]) {
            failures.push(format!("UPDATE … RETURNING: {returning:?}"));
        }
        match query_json(&client, "UPDATE every_type SET c_posint = $1 WHERE id = 1", &[json!(-1)]).await {
            Err(e) if e.contains("posint") => {}
            other => failures.push(format!("domain check violation should come from the server: {other:?}")),
        }
        report(&failures);
    });
}

/// Wrong-shape JSON is a ParamError naming `$n`, the server type and what was received.
#[test]
fn wrong_shapes_are_clear_param_errors() {
    // (sql, params, position, substrings the message must contain)
    let cases: Vec<(&str, Vec<Value>, usize, Vec<&str>)> = vec![
        ("SELECT $1::int4", vec![json!("abc")], 1, vec!["$1", "int4", "\"abc\""]),
        ("SELECT $1::int4", vec![json!(3.5)], 1, vec!["$1", "int4", "3.5"]),
        ("SELECT $1::int4, $2::int2", vec![json!(1), json!(70000)], 2, vec!["$2", "int2", "70000", "out of range"]),
        ("SELECT $1::int4", vec![json!(2_147_483_648_i64)], 1, vec!["$1", "int4", "out of range"]),
        ("SELECT $1::text, $2::text", vec![json!("a"), json!({"x": 1})], 2, vec!["$2", "text", "object"]),
        ("SELECT $1::text", vec![json!(5)], 1, vec!["$1", "text", "number 5"]),
        ("SELECT $1::text", vec![json!("a\u{0}b")], 1, vec!["$1", "text", "NUL"]),
        ("SELECT $1::int8", vec![json!("12abc")], 1, vec!["$1", "int8", "\"12abc\""]),
        ("SELECT $1::int8", vec![json!("9223372036854775808")], 1, vec!["$1", "int8", "out of range"]),
        ("SELECT $1::int8", vec![json!(1e20)], 1, vec!["$1", "int8", "2^53"]),
        ("SELECT $1::int8", vec![json!(u64::MAX)], 1, vec!["$1", "int8", "out of range"]),
        ("SELECT $1::bool", vec![json!("true")], 1, vec!["$1", "bool", "\"true\""]),
        ("SELECT $1::float4", vec![json!(1e39)], 1, vec!["$1", "float4", "out of range"]),
        ("SELECT $1::float8", vec![json!("fast")], 1, vec!["$1", "float8", "\"fast\""]),
        ("SELECT $1::numeric", vec![json!("1.2.3")], 1, vec!["$1", "numeric", "\"1.2.3\""]),
        ("SELECT $1::numeric", vec![json!(true)], 1, vec!["$1", "numeric", "boolean true"]),
        ("SELECT $1::numeric", vec![json!("1e-20000")], 1, vec!["$1", "numeric", "decimal point"]),
        ("SELECT $1::numeric", vec![json!("1e200000")], 1, vec!["$1", "numeric", "too large"]),
        ("SELECT $1::uuid", vec![json!("not-a-uuid")], 1, vec!["$1", "uuid", "\"not-a-uuid\""]),
        ("SELECT $1::date", vec![json!("2024-02-30")], 1, vec!["$1", "date", "\"2024-02-30\""]),
        ("SELECT $1::date", vec![json!("30/01/2024")], 1, vec!["$1", "date", "YYYY-MM-DD"]),
        ("SELECT $1::time", vec![json!("25:00")], 1, vec!["$1", "time", "\"25:00\""]),
        ("SELECT $1::timestamp", vec![json!("2024-01-01T00:00:00+02:00")], 1, vec!["$1", "timestamp", "offset"]),
        ("SELECT $1::timestamptz", vec![json!(1_700_000_000)], 1, vec!["$1", "timestamptz", "number 1700000000"]),
        ("SELECT $1::timestamptz", vec![json!("yesterday")], 1, vec!["$1", "timestamptz", "\"yesterday\""]),
        ("SELECT $1::bytea", vec![json!("@@@")], 1, vec!["$1", "bytea", "base64"]),
        ("SELECT $1::jsonb, $2::int4[]", vec![json!({}), json!([1, "x"])], 2, vec!["$2[2]", "_int4", "\"x\""]),
        ("SELECT $1::int4[]", vec![json!([[1], [2]])], 1, vec!["$1[1]", "_int4", "nested"]),
        ("SELECT $1::text[]", vec![json!("a")], 1, vec!["$1", "_text", "array"]),
        ("SELECT $1::\"char\"", vec![json!("ab")], 1, vec!["$1", "char", "\"ab\""]),
        ("SELECT $1::oid", vec![json!(-1)], 1, vec!["$1", "oid", "out of range"]),
    ];
    with_client(|client| async move {
        let mut failures = Vec::new();
        for (sql, params, position, needles) in &cases {
            let err = bind_error(&client, sql, params).await;
            let msg = err.to_string();
            match &err {
                ParamError::InvalidValue { position: p, .. } if p == position => {}
                other => failures.push(format!("{sql}: expected InvalidValue at ${position}, got {other:?}")),
            }
            for needle in needles {
                if !msg.contains(needle) {
                    failures.push(format!("{sql} {params:?}: message {msg:?} lacks {needle:?}"));
                }
            }
        }
        report(&failures);
    });
}

#[test]
fn param_count_mismatch_is_an_error() {
    with_client(|client| async move {
        for params in [vec![json!(1)], vec![json!(1), json!(2), json!(3)], vec![]] {
            let err = bind_error(&client, "SELECT $1::int4 + $2::int4", &params).await;
            assert!(matches!(err, ParamError::CountMismatch { expected: 2, got } if got == params.len()), "{err:?}");
            assert!(
                err.to_string().contains(&format!("takes 2 parameter(s) but {} were given", params.len())),
                "{err}"
            );
        }
        let err = bind_error(&client, "SELECT 1", &[json!(1)]).await;
        assert!(matches!(err, ParamError::CountMismatch { expected: 0, got: 1 }), "{err:?}");
    });
}

/// Columns without a JSON conversion are a ColumnError (never a panic), even when NULL;
/// parameters without one accept only null.
#[test]
fn unsupported_types_are_clear_errors() {
    with_client(|client| async move {
        let rows = client
            .query("SELECT '(1,2)'::point AS p, NULL::point AS q, interval '1 day' AS i, 1 AS ok", &[])
            .await
            .expect("query");
        let row = &rows[0];
        for (idx, name, ty) in [(0, "p", "point"), (1, "q", "point"), (2, "i", "interval")] {
            match column_to_json(row, idx) {
                Err(e @ ColumnError::UnsupportedType { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("\"{name}\"")) && msg.contains(ty), "{msg}");
                }
                other => panic!("column {name}: expected UnsupportedType, got {other:?}"),
            }
        }
        assert_eq!(column_to_json(row, 3).expect("int column"), json!(1));
        match column_to_json(row, 4) {
            Err(ColumnError::OutOfRange { index: 4, count: 4 }) => {}
            other => panic!("expected OutOfRange, got {other:?}"),
        }

        let err = bind_error(&client, "SELECT $1::point", &[json!([1, 2])]).await;
        match &err {
            ParamError::UnsupportedType { position: 1, type_name } if type_name == "point" => {}
            other => panic!("expected UnsupportedType, got {other:?}"),
        }
        assert!(err.to_string().contains("$1") && err.to_string().contains("point"), "{err}");
        let rows = query_json(&client, "SELECT $1::point IS NULL", &[Value::Null]).await.expect("null point");
        assert_eq!(rows, vec![vec![json!(true)]]);
    });
}
