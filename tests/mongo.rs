//! The document API (`/v1/docs/...`) against MongoDB test peers: every data test runs on two
//! independent wire-protocol servers, one per shard — CongoDB (in-memory, JavaScript) and
//! SecantusDB (WiredTiger, mongod's error codes) — a MockupDB replica set per shard for read
//! routing, and a real server when CELLGATE_TEST_MONGO_URL is set. cellgate runs in-process.
//! Peers are installed by `bash tests/peers/mongo/install.sh`; without them these tests fail.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::time::Duration;

use bson::{Bson, Document, doc};
use serde_json::{Value, json};
use support::mongo::{DocStack, MockupRs, Peer, PeerKind};
use support::{CANARY, MADRID, NOWHERE, PARIS, READ_TOKEN, WRITE_TOKEN, logs};

fn at((lat, lng): (f64, f64)) -> Value {
    json!({"lat": lat, "lng": lng})
}

fn geo((lat, lng): (f64, f64)) -> Value {
    json!({"type": "Point", "coordinates": [lng, lat]})
}

/// Everything in `profiles.<coll>` on one server, read directly with the driver.
async fn direct(client: &mongodb::Client, coll: &str) -> Vec<Document> {
    let mut cur = client.database("profiles").collection::<Document>(coll).find(doc! {}).await.unwrap();
    let mut out = Vec::new();
    while cur.advance().await.unwrap() {
        out.push(cur.deserialize_current().unwrap());
    }
    out
}

/// One `#[tokio::test]` per data peer for each test body taking a `PeerKind`: `congodb::name`
/// and `secantusdb::name`.
macro_rules! on_each_peer {
    ($($name:ident),* $(,)?) => {
        mod congodb {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::PeerKind::Congo).await
            })*
        }
        mod secantusdb {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::PeerKind::Secantus).await
            })*
        }
    };
}

on_each_peer!(
    crud_and_extended_json,
    insert_split_by_geo_field_and_area_merge,
    duplicate_key_is_database_error,
    down_shard_is_unavailable_and_secrets_stay_secret,
    freeze_holds_writes_and_reload_reuses_clients,
    updates_cannot_move_documents_off_their_shard,
    server_side_javascript_is_refused,
    integers_outside_int64_are_refused,
);

fn names(v: &Value) -> Vec<String> {
    v["documents"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_string()).collect()
}

/// Every op on one shard; Extended JSON round trip, checked through cellgate and directly.
async fn crud_and_extended_json(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    let madrid = at(MADRID);

    // Insert with an explicit region; key order in the body is the test's (raw text).
    let body = r#"{"region": {"lat": 40.4168, "lng": -3.7038}, "documents": [{"name": "ana",
        "big": {"$numberLong": "9007199254740993"}, "born": {"$date": "1990-05-01T10:00:00Z"},
        "balance": {"$numberDecimal": "12.50"}, "ref": {"$oid": "5f1d7e3a2b4c5d6e7f809192"}, "n": 3}]}"#;
    let (s, v, _) = st.raw("profiles/people/insert", WRITE_TOKEN, body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["inserted_count"], 1);
    assert_eq!(v["shards"][0]["id"], "a");
    assert_eq!(v["shards"][0]["role"], "primary");
    assert!(v["shards"][0]["inserted_ids"][0]["$oid"].is_string(), "{v}");
    assert_eq!(v["map_version"], 1);
    // SecantusDB is a one-node replica set and stamps operation times: a read-your-writes token
    // of shard a. CongoDB is standalone: no operation time, no token.
    match kind {
        PeerKind::Secantus => {
            let token = v["token"].as_str().unwrap_or_else(|| panic!("a token: {v}"));
            use base64::Engine;
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).unwrap();
            assert!(String::from_utf8(raw).unwrap().starts_with("v1:a:"), "a token of shard a: {v}");
            let (s, r) = st.read("people/count", json!({"region": madrid, "consistency": {"after": token}})).await;
            assert_eq!((s, r["count"].as_u64()), (200, Some(1)), "read-your-writes: {r}");
        }
        PeerKind::Congo => assert!(v.get("token").is_none(), "standalone: no token: {v}"),
    }

    // Stored with the right BSON types (read directly, not through cellgate).
    let a = ca.client().await;
    let stored = direct(&a, "people").await;
    assert_eq!(stored.len(), 1);
    let d = &stored[0];
    assert_eq!(d.get("big"), Some(&Bson::Int64(9_007_199_254_740_993)));
    assert!(matches!(d.get("born"), Some(Bson::DateTime(t)) if t.timestamp_millis() == 641_556_000_000));
    assert!(matches!(d.get("balance"), Some(Bson::Decimal128(x)) if x.to_string() == "12.50"));
    assert!(matches!(d.get("ref"), Some(Bson::ObjectId(o)) if o.to_hex() == "5f1d7e3a2b4c5d6e7f809192"));
    assert_eq!(d.get("n"), Some(&Bson::Int32(3)));
    assert!(direct(&cb.client().await, "people").await.is_empty(), "nothing on shard b");

    // Read back: relaxed Extended JSON, field order kept, Extended JSON in the filter.
    let (s, text) = {
        let r = st
            .http
            .post(format!("{}/v1/docs/profiles/people/find", st.data()))
            .bearer_auth(READ_TOKEN)
            .header("content-type", "application/json")
            .body(r#"{"region": {"lat": 40.4168, "lng": -3.7038}, "filter": {"born": {"$gte": {"$date": "1990-01-01T00:00:00Z"}}}}"#)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(s, 200, "{text}");
    let pos: Vec<usize> =
        ["\"_id\"", "\"name\"", "\"big\"", "\"born\"", "\"balance\""].iter().map(|k| text.find(k).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "field order kept: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let doc = &v["documents"][0];
    assert_eq!(doc["big"], json!({"$numberLong": "9007199254740993"}));
    assert_eq!(doc["born"], json!({"$date": "1990-05-01T10:00:00Z"}));
    assert_eq!(doc["balance"], json!({"$numberDecimal": "12.50"}));
    assert_eq!(doc["ref"], json!({"$oid": "5f1d7e3a2b4c5d6e7f809192"}));
    assert_eq!(doc["n"], 3);
    assert_eq!(
        v["shards"],
        json!([{"id": "a", "role": "replica", "endpoint": format!("127.0.0.1:{}/profiles", ca.port)}])
    );

    // Projection, count, consistency primary.
    let (s, v) = st
        .read(
            "people/find",
            json!({"region": madrid, "filter": {"name": "ana"}, "projection": {"_id": 0, "name": 1}, "consistency": "primary"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["documents"], json!([{"name": "ana"}]));
    assert_eq!(v["shards"][0]["role"], "primary");
    let (_, v) = st.read("people/count", json!({"region": madrid, "filter": {"n": {"$gt": 2}}})).await;
    assert_eq!(v["count"], 1, "{v}");
    let (_, v) = st.read("people/count", json!({"region": at(PARIS)})).await;
    assert_eq!(v["count"], 0, "{v}");

    // Update, upsert, aggregate, delete.
    let (s, v) = st
        .write("people/update", json!({"region": madrid, "filter": {"name": "ana"}, "update": {"$set": {"n": 4}}}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["matched"].as_u64(), v["modified"].as_u64()), (Some(1), Some(1)), "{v}");
    assert_eq!(direct(&a, "people").await[0].get("n"), Some(&Bson::Int32(4)));
    let (s, v) = st
        .write(
            "people/update",
            json!({"region": madrid, "filter": {"name": "bob"}, "update": {"$set": {"n": 1}}, "upsert": true}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["upserted_id"]["$oid"].is_string(), "{v}");
    let pipeline =
        json!([{"$match": {"n": {"$gte": 1}}}, {"$sort": {"name": 1}}, {"$project": {"_id": 0, "name": 1, "n": 1}}]);
    let (s, v) = st.read("people/aggregate", json!({"region": madrid, "pipeline": pipeline})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["documents"], json!([{"name": "ana", "n": 4}, {"name": "bob", "n": 1}]));
    let (s, v) = st.write("people/delete", json!({"region": madrid, "filter": {"name": "bob"}})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["deleted"], 1);
    assert_eq!(direct(&a, "people").await.len(), 1);
    // A token of another shard is ignored; a garbage token is a 400.
    let other = cellgate::dataplane::make_token("b", 42);
    let (s, v) = st.read("people/find", json!({"region": madrid, "consistency": {"after": other}})).await;
    assert_eq!((s, names(&v)), (200, vec!["ana".to_string()]), "{v}");
    let (s, v) = st.read("people/find", json!({"region": madrid, "consistency": {"after": "nope"}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "{v}");

    // Input errors.
    let (s, v, _) = st.raw("profiles/people/drop", WRITE_TOKEN, "{}").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "unknown op: {v}");
    let (s, v, _) = st.raw("profiles/people/find", READ_TOKEN, "{not json").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_json")), "{v}");
    // Strict JSON at every depth: a repeated key inside a filter is refused, with its path.
    let body = r#"{"region": {"lat": 40.4168, "lng": -3.7038}, "filter": {"name": "ana", "name": "bob"}}"#;
    let (s, v, _) = st.raw("profiles/people/find", READ_TOKEN, body).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_json")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("filter: duplicate key `name`"), "{v}");
    let (s, v) = st.read("people/find", json!({"region": madrid, "filtre": {}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_json")), "unknown field: {v}");
    let (s, v) = st.read("people/find", json!({"region": madrid, "filter": {"_id": {"$oid": "xyz"}}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_json")), "bad $oid: {v}");
    let (s, v) = st.read("people/find", json!({"region": madrid, "filter": [1]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "{v}");
    let (s, v) = st.read("people/find", json!({"region": madrid, "sort": {"n": {"$meta": "textScore"}}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "{v}");
    let (s, v) = st.read("people/aggregate", json!({"region": madrid, "pipeline": [{"$out": "x"}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "$out: {v}");
    let (s, v) = st.read("people/find", json!({"filter": {}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("region_required")), "{v}");
    let area = json!({"lat": 44.0, "lng": 0.0, "radius_km": 700});
    let (s, v) = st.write("people/delete", json!({"region": area, "filter": {}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("area_write")), "{v}");
    let (s, v) = st.write("people/insert", json!({"region": area, "documents": [{"a": 1}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("area_write")), "{v}");
    let (s, v) = st.write("people/update", json!({"region": madrid, "filter": {}, "update": 5})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "{v}");
    let (s, v) =
        st.write("people/update", json!({"region": madrid, "filter": {}, "update": {"$bogus": {"n": 1}}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (422, Some("database_error")), "server rejects: {v}");
    assert!(v["error"]["server_code"].is_i64(), "{v}");
    let (s, v, _) = st.raw("profiles/people/insert", READ_TOKEN, "{}").await;
    assert_eq!(s, 403, "read token cannot write: {v}");
    let (s, v, _) = st.raw("nosuch/people/find", READ_TOKEN, &json!({"region": madrid}).to_string()).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("unknown_database")), "{v}");
    let (s, v, _) = st.raw("profiles/%24cmd/find", READ_TOKEN, &json!({"region": madrid}).to_string()).await;
    assert_eq!(s, 200, "percent-encoded names are taken verbatim: {v}");
    let (s, v) = st.read("system.users/find", json!({"region": madrid})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "{v}");
    let r = st
        .http
        .post(format!("{}/v1/sql/profiles/query", st.data()))
        .bearer_auth(READ_TOKEN)
        .json(&json!({"region": madrid, "sql": "SELECT 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "SQL on a MongoDB database is refused");

    // The admin plane shows the databases (no credentials in these URIs, but the shape).
    let (s, shards) = st.admin_get("/admin/shards").await;
    assert_eq!(s, 200);
    let shards: Value = serde_json::from_str(&shards).unwrap();
    assert_eq!(shards["shards"][0]["databases"]["profiles"]["kind"], "mongodb", "{shards}");
    assert_eq!(shards["shards"][0]["databases"]["profiles"]["endpoints"][0]["warmed"], true, "{shards}");
    st.stop().await;
}

/// A batch spanning both shards is split by each document's GeoJSON field (verified on each
/// server directly); an area find merged on sort+limit equals the merge of direct reads.
async fn insert_split_by_geo_field_and_area_merge(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    let mut docs = Vec::new();
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for i in 0..12 {
        let (base, list) = if i % 3 == 0 { (PARIS, &mut on_b) } else { (MADRID, &mut on_a) };
        let name = format!("p{i:02}");
        list.push(name.clone());
        docs.push(json!({"name": name, "score": (i * 7) % 5, "loc": geo((base.0 + i as f64 * 0.01, base.1))}));
    }
    let (s, v) = st.write("people/insert", json!({"documents": docs})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["inserted_count"], 12);
    let by_shard: Vec<(String, usize)> = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["inserted_ids"].as_array().unwrap().len()))
        .collect();
    assert_eq!(by_shard, [("a".to_string(), on_a.len()), ("b".to_string(), on_b.len())], "{v}");
    assert!(v.get("token").is_none() || v["token"].is_null(), "no single token for a split batch: {v}");

    let (a, b) = (ca.client().await, cb.client().await);
    let (da, db) = (direct(&a, "people").await, direct(&b, "people").await);
    let got = |ds: &[Document]| ds.iter().map(|d| d.get_str("name").unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(got(&da), on_a, "shard a holds exactly the Madrid documents, in batch order");
    assert_eq!(got(&db), on_b, "shard b holds exactly the Paris documents");
    // The ids cellgate reported are the ids stored.
    let ids_a: Vec<String> = da.iter().map(|d| d.get_object_id("_id").unwrap().to_hex()).collect();
    let reported: Vec<String> = v["shards"][0]["inserted_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["$oid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids_a, reported);

    // Area read: sort + skip + limit merged across shards equals the merge of direct reads.
    let area = json!({"lat": 44.0, "lng": 0.0, "radius_km": 700});
    // Raw text: the sort keys' order matters, and serde_json's json! would reorder them.
    let body = format!(
        r#"{{"region": {area}, "sort": {{"score": -1, "name": 1}}, "skip": 2, "limit": 5, "projection": {{"loc": 0}}}}"#
    );
    let (s, v, _) = st.raw("profiles/people/find", READ_TOKEN, &body).await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<&str> = v["shards"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b"], "both shards asked: {v}");
    let mut all: Vec<(i32, String)> =
        da.iter().chain(&db).map(|d| (d.get_i32("score").unwrap(), d.get_str("name").unwrap().to_string())).collect();
    all.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
    let expect: Vec<String> = all.into_iter().skip(2).take(5).map(|(_, n)| n).collect();
    assert_eq!(names(&v), expect);
    assert!(v["documents"][0].get("loc").is_none(), "projection applied: {v}");
    let (_, v) = st.read("people/count", json!({"region": area, "filter": {"score": {"$gte": 0}}})).await;
    assert_eq!(v["count"], 12, "{v}");
    // Without sort, an area find concatenates shard results (limit still applies).
    let (_, v) = st.read("people/find", json!({"region": area, "limit": 3})).await;
    assert_eq!(v["documents"].as_array().unwrap().len(), 3, "{v}");
    let (_, v) = st.read("people/find", json!({"region": area, "limit": 0})).await;
    assert_eq!(v["documents"].as_array().unwrap().len(), 12, "limit 0 is no limit, as in MongoDB: {v}");

    // Documents that cannot be placed.
    let (s, v) =
        st.write("people/insert", json!({"documents": [{"name": "ok", "loc": geo(MADRID)}, {"name": "lost"}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_region")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("documents[1]"), "{v}");
    let (s, v) =
        st.write("people/insert", json!({"documents": [{"loc": {"type": "Point", "coordinates": [1]}}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_region")), "{v}");
    let (s, v) = st.write("people/insert", json!({"documents": [{"loc": geo(NOWHERE)}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("no_shard_for_region")), "{v}");
    // A region that disagrees with a document's own location is refused, not written.
    let (s, v) = st.write("people/insert", json!({"region": at(MADRID), "documents": [{"loc": geo(PARIS)}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_region")), "{v}");
    // A collection without a geo field needs a region.
    let (s, v) = st.write("other/insert", json!({"documents": [{"loc": geo(PARIS)}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("region_required")), "{v}");
    assert_eq!(direct(&a, "people").await.len() + direct(&b, "people").await.len(), 12, "nothing more landed");
    st.stop().await;
}

/// A duplicate key is the server's 11000 as a 422; in a split batch only the failing shard's
/// part is reported failed (207). CongoDB enforces uniqueness of `_id` only (a unique index on
/// another field is accepted but not enforced), so the duplicates are `_id`s.
async fn duplicate_key_is_database_error(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    let a = ca.client().await;
    let id = |n: u32| json!({"$oid": format!("{n:024x}")});

    let (s, v) =
        st.write("people/insert", json!({"documents": [{"_id": id(1), "email": "x@a", "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["shards"][0]["inserted_ids"], json!([id(1)]), "{v}");
    let (s, v) =
        st.write("people/insert", json!({"documents": [{"_id": id(1), "email": "x@a", "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["code"], "database_error");
    assert_eq!(v["error"]["server_code"], 11000, "{v}");
    assert_eq!(v["error"]["retryable"], false);

    let batch = json!({"documents": [
        {"_id": id(2), "email": "y@b", "loc": geo(PARIS)},
        {"_id": id(3), "email": "z@a", "loc": geo(MADRID)},
        {"_id": id(1), "email": "x@a", "loc": geo(MADRID)},
        {"_id": id(4), "email": "w@a", "loc": geo(MADRID)},
    ]});
    let (s, v) = st.write("people/insert", batch).await;
    assert_eq!(s, 207, "{v}");
    assert_eq!(v["inserted_count"], 2, "{v}");
    let sa = &v["shards"][0];
    assert_eq!(sa["id"], "a");
    assert_eq!(sa["inserted_ids"], json!([id(3)]), "ordered: z@a landed, x@a failed, w@a not tried: {v}");
    assert_eq!(sa["error"]["server_code"], 11000, "{v}");
    assert_eq!(sa["error"]["code"], "database_error");
    let sb = &v["shards"][1];
    assert_eq!((sb["id"].as_str(), &sb["inserted_ids"]), (Some("b"), &json!([id(2)])), "{v}");
    assert!(sb.get("error").is_none(), "{v}");
    let emails: Vec<String> =
        direct(&a, "people").await.iter().map(|d| d.get_str("email").unwrap().to_string()).collect();
    assert_eq!(emails, ["x@a", "z@a"]);
    assert_eq!(direct(&cb.client().await, "people").await.len(), 1);
    st.stop().await;
}

/// A shard whose server is down: building and readiness do not hang, its requests get 503 +
/// Retry-After, the other shard keeps serving, and the URI's password shows up nowhere.
async fn down_shard_is_unavailable_and_secrets_stay_secret(kind: PeerKind) {
    let cb = Peer::start(kind);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = format!("mongodb://app:{CANARY}@127.0.0.1:{closed}/?directConnection=true");
    let started = std::time::Instant::now();
    let st = DocStack::start(&[down, cb.uri()]).await;
    assert!(started.elapsed() < Duration::from_secs(10), "start and readiness are bounded");
    let (s, v, retry) = st.raw("profiles/people/find", READ_TOKEN, &json!({"region": at(MADRID)}).to_string()).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("shard_unavailable")), "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(v["error"]["shard"], "a");
    let (s, v) = st.write("people/insert", json!({"documents": [{"loc": geo(MADRID)}, {"loc": geo(PARIS)}]})).await;
    assert_eq!(s, 207, "the reachable shard's part lands: {v}");
    assert_eq!(v["shards"][0]["error"]["code"], "shard_unavailable", "{v}");
    assert_eq!(v["shards"][1]["inserted_ids"].as_array().unwrap().len(), 1, "{v}");
    let (s, v) = st.read("people/count", json!({"region": at(PARIS)})).await;
    assert_eq!((s, v["count"].as_u64()), (200, Some(1)), "{v}");
    let (_, admin) = st.admin_get("/admin/shards").await;
    let (_, map) = st.admin_get("/admin/map").await;
    let (_, metrics) = st.admin_get("/metrics").await;
    for (what, text) in [("shards", &admin), ("map", &map), ("metrics", &metrics), ("error", &v.to_string())] {
        assert!(!text.contains(CANARY), "{what} leaks the password: {text}");
    }
    assert!(admin.contains(&format!("127.0.0.1:{closed}/profiles")), "endpoint label shown: {admin}");
    st.stop().await;
    let logged = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(!logged.contains(CANARY), "logs leak the password");
}

/// Writes honour the live-migration hold like SQL writes, and a reload keeps the client of an
/// unchanged URI (its pool and monitors) while building a new one for a changed URI.
async fn freeze_holds_writes_and_reload_reuses_clients(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    let cell = cellgate::geo::owning_cell(cellgate::geo::point(MADRID.0, MADRID.1).unwrap(), h3o::Resolution::Five);
    let admin_post = |path: &'static str, body: Value| {
        let req = st.http.post(format!("{}{path}", st.admin())).bearer_auth(support::ADMIN_TOKEN).json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // A hold that runs out: 503 cells_frozen, nothing written.
    assert_eq!(
        admin_post("/admin/freeze", json!({"id": "m1", "cells": [cell.to_string()], "hold_ms": 300})).await,
        200
    );
    let t = std::time::Instant::now();
    let (s, v, retry) =
        st.raw("profiles/people/insert", WRITE_TOKEN, &json!({"documents": [{"loc": geo(MADRID)}]}).to_string()).await;
    assert_eq!((s, v["error"]["code"].as_str(), retry.as_deref()), (503, Some("cells_frozen"), Some("1")), "{v}");
    assert!(t.elapsed() >= Duration::from_millis(250), "the write was held first");
    let (s, v) = st.write("people/delete", json!({"region": at(MADRID), "filter": {}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("cells_frozen")), "{v}");
    // Writes to other cells are not held.
    let (s, v) = st.write("people/insert", json!({"documents": [{"loc": geo(PARIS)}]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(admin_post("/admin/release", json!({"id": "m1"})).await, 200);
    // A hold released in time: the write proceeds.
    assert_eq!(
        admin_post("/admin/freeze", json!({"id": "m2", "cells": [cell.to_string()], "hold_ms": 5000})).await,
        200
    );
    let pending = st.write("people/insert", json!({"documents": [{"name": "held", "loc": geo(MADRID)}]}));
    let release = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        admin_post("/admin/release", json!({"id": "m2"})).await
    };
    let ((s, v), released) = tokio::join!(pending, release);
    assert_eq!((s, released), (200, 200), "{v}");
    let a = ca.client().await;
    assert_eq!(direct(&a, "people").await.len(), 1, "only the released write landed on a");

    // Reload: shard a unchanged keeps its client; shard b's new URI gets a new one.
    let cfg = cellgate::config::Config::parse(&support::config_text(&st.dir)).unwrap();
    let cc = Peer::start(kind);
    let v1 = cellgate::shardmap::compile_str(&support::mongo::map_toml(&[ca.uri(), cb.uri()])).unwrap();
    let v2 = cellgate::shardmap::compile_str(&support::mongo::map_toml(&[ca.uri(), cc.uri()])).unwrap();
    let old = cellgate::backend::Backends::build(&v1, &cfg).unwrap();
    let new = cellgate::backend::Backends::build_reusing(&v2, &cfg, Some(&old)).unwrap();
    let mongo = |b: &cellgate::backend::Backends, i: usize| match b.shards[i].get("profiles") {
        Some(cellgate::backend::DatabaseBackend::Mongo(m)) => m.clone(),
        _ => panic!("profiles is a MongoDB database"),
    };
    assert!(std::sync::Arc::ptr_eq(&mongo(&old, 0), &mongo(&new, 0)), "unchanged URI: same client");
    assert!(!std::sync::Arc::ptr_eq(&mongo(&old, 1), &mongo(&new, 1)), "changed URI: new client");
    new.check_new(&cfg).await.expect("the new database answers a ping");
    let gone = cellgate::shardmap::compile_str(&support::mongo::map_toml(&[
        ca.uri(),
        "mongodb://127.0.0.1:1/?directConnection=true".into(),
    ]))
    .unwrap();
    let bad = cellgate::backend::Backends::build_reusing(&gone, &cfg, Some(&old)).unwrap();
    let errs = bad.check_new(&cfg).await.expect_err("an unreachable new URI fails the reload check");
    assert!(errs[0].contains("shard b database profiles"), "{errs:?}");
    st.stop().await;
}

/// Read preferences reach the right member of a replica set (MockupDB records who got what).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_routing_against_mockupdb() {
    let (ra, rb) = (MockupRs::start("rsa"), MockupRs::start("rsb"));
    let st = DocStack::start(&[ra.uri(), rb.uri()]).await;
    let madrid = at(MADRID);
    // What start sent (pings, the primary `find` on cellgate_migrations looking for unfinished
    // migrations) is not under test here.
    ra.clear();
    rb.clear();

    let only = |cmds: Vec<support::mongo::SeenCommand>, name: &str| {
        let c: Vec<_> = cmds.into_iter().filter(|c| c.command == name).collect();
        assert_eq!(c.len(), 1, "exactly one {name}: {c:?}");
        c.into_iter().next().unwrap()
    };

    // Default (replica): secondaryPreferred with the clamped staleness bound, on the secondary.
    let (s, v) = st.read("people/find", json!({"region": madrid})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["documents"][0]["member"], "secondary", "{v}");
    assert_eq!(v["shards"][0]["role"], "replica");
    let c = only(ra.commands(1, Duration::from_secs(5)), "find");
    assert_eq!(c.member, "secondary");
    assert_eq!(c.read_preference, json!({"mode": "secondaryPreferred", "maxStalenessSeconds": 90}), "{c:?}");
    assert!(!c.after_cluster_time);
    assert!(c.max_time_ms.is_some_and(|t| t > 0 && t <= 3000), "reads carry the time left as maxTimeMS: {c:?}");
    ra.clear();

    // A member that never answers: the request deadline (3 s in the test config) gives a 504.
    let t = std::time::Instant::now();
    let (s, v) = st.read("slow/find", json!({"region": madrid})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (504, Some("timeout")), "{v}");
    assert!(t.elapsed() < Duration::from_secs(5), "bounded by the deadline");
    ra.clear();

    let (_, v) = st.read("people/count", json!({"region": madrid})).await;
    assert_eq!(v["count"], 1, "{v}");
    let c = only(ra.commands(1, Duration::from_secs(5)), "aggregate");
    assert_eq!((c.member.as_str(), &c.read_preference["mode"]), ("secondary", &json!("secondaryPreferred")));
    ra.clear();

    // Primary reads and every write reach the primary.
    let (_, v) = st.read("people/aggregate", json!({"region": madrid, "pipeline": [], "consistency": "primary"})).await;
    assert_eq!(v["documents"][0]["member"], "primary", "{v}");
    let c = only(ra.commands(1, Duration::from_secs(5)), "aggregate");
    assert_eq!(c.member, "primary");
    assert!(c.read_preference.is_null() || c.read_preference["mode"] == "primary", "{c:?}");
    ra.clear();

    let (s, v) = st.write("people/insert", json!({"documents": [{"name": "x", "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 200, "{v}");
    // MockupDB stamps operationTime Timestamp(1700000000, 7) on every reply.
    let token = cellgate::dataplane::make_token("a", (1_700_000_000u64 << 32) | 7);
    assert_eq!(v["token"], json!(token), "{v}");
    assert_eq!(v["shards"][0]["token"], json!(token));
    let (s, v) = st
        .write("people/update", json!({"region": madrid, "filter": {}, "update": {"$set": {"a": 1}}, "multi": true}))
        .await;
    assert_eq!((s, v["token"].as_str()), (200, Some(token.as_str())), "{v}");
    let (s, _) = st.write("people/delete", json!({"region": madrid, "filter": {"name": "x"}})).await;
    assert_eq!(s, 200);
    // Everything each write sent: its migration-fence read (a `find` on cellgate_fences, shared
    // by writes within 250 ms) goes to the primary too.
    let cmds = ra.commands(usize::MAX, Duration::from_millis(1500));
    for name in ["insert", "update", "delete"] {
        assert_eq!(only(cmds.clone(), name).member, "primary", "{name}: {cmds:?}");
    }
    assert!(cmds.iter().any(|c| c.command == "find"), "the fence read: {cmds:?}");
    assert!(cmds.iter().all(|c| c.member == "primary"), "{cmds:?}");
    ra.clear();

    // Read-your-writes: the token's operation time goes to the server as afterClusterTime.
    let (s, _) = st.read("people/find", json!({"region": madrid, "consistency": {"after": token}})).await;
    assert_eq!(s, 200);
    let c = only(ra.commands(1, Duration::from_secs(5)), "find");
    assert!(c.after_cluster_time, "{c:?}");
    ra.clear();
    // A token of shard a says nothing about shard b: ignored there.
    let (s, _) = st.read("people/find", json!({"region": at(PARIS), "consistency": {"after": token}})).await;
    assert_eq!(s, 200);
    let c = only(rb.commands(1, Duration::from_secs(5)), "find");
    assert!(!c.after_cluster_time, "{c:?}");
    assert_eq!(c.member, "secondary");
    st.stop().await;
}

/// Against a real MongoDB when CELLGATE_TEST_MONGO_URL is set (both shards on that server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_round_trip() {
    let Ok(url) = std::env::var("CELLGATE_TEST_MONGO_URL") else {
        println!("SKIPPED real_server_round_trip: CELLGATE_TEST_MONGO_URL not set");
        return;
    };
    let st = DocStack::start(&[url.clone(), url.clone()]).await;
    let coll = format!("t{}", std::process::id());
    let madrid = at(MADRID);
    let body = json!({"region": madrid, "documents": [{"k": 1, "big": {"$numberLong": "9007199254740993"}}]});
    let (s, v) = st.write(&format!("{coll}/insert"), body).await;
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().map(str::to_string);
    let consistency = token.map_or(json!("primary"), |t| json!({"after": t}));
    let (s, v) = st.read(&format!("{coll}/find"), json!({"region": madrid, "consistency": consistency})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["documents"][0]["big"], json!({"$numberLong": "9007199254740993"}), "{v}");
    let (s, v) = st.write(&format!("{coll}/delete"), json!({"region": madrid, "filter": {}, "multi": true})).await;
    assert_eq!((s, v["deleted"].as_u64()), (200, Some(1)), "{v}");
    st.stop().await;
}

/// Updates whose resulting document's geo field another shard owns are refused with
/// `invalid_region` naming the field (upsert from the filter's equality, `$set`,
/// `$setOnInsert`, replacement), as are updates that remove it; each server is read directly to
/// prove nothing moved or appeared. Updates that keep the location on the shard pass.
async fn updates_cannot_move_documents_off_their_shard(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    let madrid = at(MADRID);
    let (s, v) = st.write("people/insert", json!({"documents": [{"name": "ana", "n": 1, "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 200, "{v}");
    let paris = geo(PARIS);
    let refused = [
        (
            "upsert from the filter",
            json!({"filter": {"name": "eve", "loc": paris}, "update": {"$set": {"n": 2}}, "upsert": true}),
            "filter.loc",
        ),
        (
            "upsert $setOnInsert",
            json!({"filter": {"name": "eve"}, "update": {"$setOnInsert": {"loc": paris}}, "upsert": true}),
            "update.$setOnInsert.loc",
        ),
        (
            "upsert $set",
            json!({"filter": {"name": "eve"}, "update": {"$set": {"loc": paris}}, "upsert": true}),
            "update.$set.loc",
        ),
        ("$set", json!({"filter": {"name": "ana"}, "update": {"$set": {"loc": paris}}}), "update.$set.loc"),
        ("$set many", json!({"filter": {}, "update": {"$set": {"loc": paris}}, "multi": true}), "update.$set.loc"),
        ("replacement", json!({"filter": {"name": "ana"}, "update": {"name": "ana", "loc": paris}}), "update.loc"),
        ("$unset", json!({"filter": {"name": "ana"}, "update": {"$unset": {"loc": ""}}}), "$unset.loc"),
        ("replacement without loc", json!({"filter": {"name": "ana"}, "update": {"name": "ana"}}), "loc"),
        (
            "partial $set",
            json!({"filter": {"name": "ana"}, "update": {"$set": {"loc.coordinates": [2.35, 48.85]}}}),
            "loc.coordinates",
        ),
        ("pipeline", json!({"filter": {"name": "ana"}, "update": [{"$set": {"loc": "$elsewhere"}}]}), "loc"),
        ("nowhere", json!({"filter": {"name": "ana"}, "update": {"$set": {"loc": geo(NOWHERE)}}}), "update.$set.loc"),
    ];
    for (what, mut body, names_field) in refused {
        body["region"] = madrid.clone();
        let (s, v) = st.write("people/update", body).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_region")), "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(names_field), "{what}: the message names {names_field}: {msg}");
    }
    // Updates that keep the document where it belongs still work.
    let madrid2 = geo((MADRID.0 + 0.01, MADRID.1));
    let ok = [
        json!({"filter": {"name": "ana"}, "update": {"$set": {"n": 5, "loc": madrid2}}}),
        json!({"filter": {"name": "bob", "loc": geo(MADRID)}, "update": {"$set": {"n": 1}}, "upsert": true}),
        json!({"filter": {"name": "cy"}, "update": {"$setOnInsert": {"loc": geo(MADRID)}}, "upsert": true}),
        json!({"filter": {"name": "ana"}, "update": {"$inc": {"n": 1}}}),
    ];
    for mut body in ok {
        body["region"] = madrid.clone();
        let (s, v) = st.write("people/update", body.clone()).await;
        assert_eq!(s, 200, "{body}: {v}");
    }
    // Read each server directly: everything is on a, in Madrid; nothing reached b.
    let (da, db) = (direct(&ca.client().await, "people").await, direct(&cb.client().await, "people").await);
    assert!(db.is_empty(), "nothing appeared on shard b: {db:?}");
    let mut got: Vec<String> = da.iter().map(|d| d.get_str("name").unwrap().to_string()).collect();
    got.sort();
    assert_eq!(got, ["ana", "bob", "cy"], "no eve upserted anywhere");
    for d in &da {
        let lat = d.get_document("loc").unwrap().get_array("coordinates").unwrap()[1].as_f64().unwrap();
        assert!((lat - MADRID.0).abs() < 0.1, "still in Madrid: {d}");
    }
    let ana = da.iter().find(|d| d.get_str("name").ok() == Some("ana")).unwrap();
    assert_eq!(ana.get("n"), Some(&Bson::Int32(6)), "{ana}");
    st.stop().await;
}

/// `$where`, `$function` and `$accumulator` anywhere in a filter, projection, pipeline or update
/// are refused (400 invalid_params, nothing reaches the server) for read and write scopes,
/// unless the map opts the database in with `allow_server_js = true`.
async fn server_side_javascript_is_refused(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    let madrid = at(MADRID);
    let (s, v) = st.write("people/insert", json!({"documents": [{"name": "ana", "n": 1, "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 200, "{v}");
    let func = json!({"$function": {"body": "function(n) { return n > 0 }", "args": ["$n"], "lang": "js"}});
    let acc = json!({"$accumulator": {"init": "function() { return 0 }", "accumulate": "function(s, n) { return s + n }",
        "accumulateArgs": ["$n"], "merge": "function(a, b) { return a + b }", "lang": "js"}});
    let cases = [
        ("find", json!({"region": madrid, "filter": {"$where": "this.n > 0"}}), "filter.$where"),
        (
            "find",
            json!({"region": madrid, "filter": {"$or": [{"n": 2}, {"$expr": func}]}}),
            "filter.$or[1].$expr.$function",
        ),
        ("find", json!({"region": madrid, "projection": {"x": func}}), "projection.x.$function"),
        ("count", json!({"region": madrid, "filter": {"$where": "true"}}), "filter.$where"),
        (
            "aggregate",
            json!({"region": madrid, "pipeline": [{"$group": {"_id": null, "t": acc}}]}),
            "pipeline[0].$group.t.$accumulator",
        ),
        (
            "aggregate",
            json!({"region": {"lat": 44.0, "lng": 0.0, "radius_km": 700}, "pipeline": [{"$match": {"$expr": func}}]}),
            "$function",
        ),
    ];
    for (op, body, path) in &cases {
        let (s, v) = st.read(&format!("people/{op}"), body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "{op} {body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(path) && msg.contains("allow_server_js"), "{msg}");
    }
    let writes = [
        ("update", json!({"region": madrid, "filter": {"$where": "true"}, "update": {"$set": {"n": 9}}})),
        ("update", json!({"region": madrid, "filter": {}, "update": [{"$set": {"n": func}}]})),
        ("delete", json!({"region": madrid, "filter": {"$where": "true"}})),
    ];
    for (op, body) in &writes {
        let (s, v) = st.write(&format!("people/{op}"), body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_params")), "{op} {body}: {v}");
    }
    let stored = direct(&ca.client().await, "people").await;
    assert_eq!((stored.len(), stored[0].get("n")), (1, Some(&Bson::Int32(1))), "nothing changed: {stored:?}");
    // Field values that merely spell an operator are data.
    let (s, v) = st.read("people/find", json!({"region": madrid, "filter": {"name": "$where"}})).await;
    assert_eq!(s, 200, "{v}");
    st.stop().await;

    // Opted in: the operator reaches the server (which runs it, or answers with its own error).
    let map = support::mongo::map_toml_with(&[ca.uri(), cb.uri()], "  allow_server_js = true\n");
    let st = DocStack::start_map(&map).await;
    let (s, v) = st.read("people/find", json!({"region": madrid, "filter": {"$where": "this.n > 0"}})).await;
    assert!(s == 200 || (s == 422 && v["error"]["code"] == "database_error"), "passed to the server: {s} {v}");
    st.stop().await;
}

/// JSON integers outside int64 are refused the same way whatever their size (2^63 used to be
/// refused while 2^64 was stored as a double); nothing is stored.
async fn integers_outside_int64_are_refused(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    for big in [
        "9223372036854775808",
        "18446744073709551616",
        "-9223372036854775809",
        "340282366920938463463374607431768211456",
    ] {
        let body = format!(
            r#"{{"region": {{"lat": 40.4168, "lng": -3.7038}}, "documents": [{{"name": "x", "big": {big}}}]}}"#
        );
        let (s, v, _) = st.raw("profiles/people/insert", WRITE_TOKEN, &body).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_json")), "{big}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("outside the signed 64-bit range") && msg.contains(&big[..10]), "{msg}");
        let body =
            format!(r#"{{"region": {{"lat": 40.4168, "lng": -3.7038}}, "filter": {{"big": {{"$gt": {big}}}}}}}"#);
        let (s, v, _) = st.raw("profiles/people/find", READ_TOKEN, &body).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_json")), "filter {big}: {v}");
    }
    assert!(direct(&ca.client().await, "people").await.is_empty(), "nothing stored");
    // The limits themselves and doubles pass.
    let body = r#"{"region": {"lat": 40.4168, "lng": -3.7038}, "documents": [{"max": 9223372036854775807,
        "min": -9223372036854775808, "dbl": 18446744073709551616.0}]}"#;
    let (s, v, _) = st.raw("profiles/people/insert", WRITE_TOKEN, body).await;
    assert_eq!(s, 200, "{v}");
    let d = &direct(&ca.client().await, "people").await[0];
    assert_eq!((d.get("max"), d.get("min")), (Some(&Bson::Int64(i64::MAX)), Some(&Bson::Int64(i64::MIN))));
    assert_eq!(d.get("dbl"), Some(&Bson::Double(18446744073709551616.0)));
    st.stop().await;
}

/// SecantusDB enforces unique secondary indexes (CongoDB accepts the index but does not):
/// a duplicate through cellgate is the server's 11000 as a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_secondary_index_is_11000_on_secantusdb() {
    let (ca, cb) = (Peer::start(PeerKind::Secantus), Peer::start(PeerKind::Secantus));
    let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
    let a = ca.client().await;
    let index = mongodb::IndexModel::builder()
        .keys(doc! {"email": 1})
        .options(mongodb::options::IndexOptions::builder().unique(true).build())
        .build();
    a.database("profiles").collection::<Document>("people").create_index(index).await.unwrap();
    let (s, v) = st.write("people/insert", json!({"documents": [{"email": "x@a", "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = st.write("people/insert", json!({"documents": [{"email": "x@a", "loc": geo(MADRID)}]})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (422, Some("database_error")), "{v}");
    assert_eq!(v["error"]["server_code"], 11000, "{v}");
    assert_eq!(v["error"]["retryable"], false, "{v}");
    // An update that would duplicate the key is the same error.
    let (s, v) = st.write("people/insert", json!({"documents": [{"email": "y@a", "loc": geo(MADRID)}]})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = st
        .write(
            "people/update",
            json!({"region": at(MADRID), "filter": {"email": "y@a"}, "update": {"$set": {"email": "x@a"}}}),
        )
        .await;
    assert_eq!((s, v["error"]["server_code"].as_i64()), (422, Some(11000)), "{v}");
    let emails: Vec<String> =
        direct(&a, "people").await.iter().map(|d| d.get_str("email").unwrap().to_string()).collect();
    assert_eq!(emails, ["x@a", "y@a"]);
    st.stop().await;
}

/// User + system CPU time (seconds) of this process's threads named `prefix*`, or of `pid`.
fn cpu_seconds(stat_paths: &[std::path::PathBuf]) -> f64 {
    // Linux reports these in USER_HZ, which is 100 on every architecture it supports.
    const HZ: f64 = 100.0;
    stat_paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| {
            // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
            let rest = &s[s.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / HZ
        })
        .sum()
}

fn threads_named(prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .map(|t| t.path().join("stat"))
        .collect()
}

/// An idle cellgate with a warmed MongoDB database on each shard uses < 2 % of a core. Against
/// CongoDB (which answers awaitable `hello`s at once) the driver's streaming monitor used to
/// spin at ~5,000 hellos a second, ~80 % of a core. cellgate runs on its own runtime whose
/// threads carry a unique name, and only those threads are measured: other tests of this binary
/// and other processes on the machine do not count. The peer's CPU is printed for the report.
fn idle_cost(kind: PeerKind) {
    let (ca, cb) = (Peer::start(kind), Peer::start(kind));
    let name = format!("cg-idle-{}", if kind == PeerKind::Congo { "c" } else { "s" });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name.clone())
        .enable_all()
        .build()
        .unwrap();
    let st = rt.block_on(async {
        let st = DocStack::start(&[ca.uri(), cb.uri()]).await;
        // Warm both databases' pools and monitors with a real request each.
        for p in [MADRID, PARIS] {
            let (s, v) = st.read("people/count", json!({"region": at(p)})).await;
            assert_eq!(s, 200, "{v}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        st
    });
    let peers: Vec<std::path::PathBuf> =
        [ca.pid(), cb.pid()].iter().map(|p| std::path::PathBuf::from(format!("/proc/{p}/stat"))).collect();
    let window = Duration::from_secs(3);
    let (c0, p0, t0) = (cpu_seconds(&threads_named(&name)), cpu_seconds(&peers), std::time::Instant::now());
    std::thread::sleep(window);
    let (c1, p1) = (cpu_seconds(&threads_named(&name)), cpu_seconds(&peers));
    let secs = t0.elapsed().as_secs_f64();
    let (cellgate, peer) = ((c1 - c0) / secs, (p1 - p0) / secs / 2.0);
    println!(
        "idle {kind:?}: cellgate runtime {:.2} % of a core, each peer {:.2} % of a core ({secs:.1} s window)",
        cellgate * 100.0,
        peer * 100.0
    );
    rt.block_on(st.stop());
    assert!(cellgate < 0.02, "idle cellgate uses {:.1} % of a core against {kind:?}", cellgate * 100.0);
}

#[test]
fn idle_cellgate_costs_under_two_percent_of_a_core_congodb() {
    idle_cost(PeerKind::Congo);
}

#[test]
fn idle_cellgate_costs_under_two_percent_of_a_core_secantusdb() {
    idle_cost(PeerKind::Secantus);
}
