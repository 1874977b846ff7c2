//! Admin-plane handler (design §4): liveness, readiness, metrics, map (secrets redacted) and its
//! pushes and reloads, shard health (what each endpoint serves), locate, migrations, freezes,
//! the listeners' TLS certificates, the read cache's state, the fleet (peers or etcd).
//! Requires the `admin` scope (a token's or a client certificate's) when auth is on. Parses and
//! renders; the work is the control plane's.

use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::backend::health::HealthView;
use crate::backend::{DatabaseBackend, Role};
use crate::config::Scope;
use crate::geo;
use crate::http::respond::{ApiError, Body, json_response, text_response};
use crate::shardmap::Fallback;

pub async fn handle(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    // Probes stay open: orchestrators call them without tokens.
    match (req.method(), path) {
        (&Method::GET, "/livez") => return json_response(StatusCode::OK, &json!({"live": true})),
        (&Method::GET, "/readyz") => {
            let ready = ready(state);
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            return json_response(status, &json!({"ready": ready}));
        }
        _ => {}
    }
    let (authorization, peer) = super::credentials(&req);
    match state.credentials.auth().check(authorization, peer, Scope::Admin) {
        Ok(_) => {}
        Err(crate::auth::AuthError::Unauthorized) => return ApiError::Unauthorized.into_response(),
        Err(crate::auth::AuthError::Forbidden(_)) => return ApiError::Forbidden("admin").into_response(),
        Err(crate::auth::AuthError::UnknownClient(ids)) => return ApiError::UnknownClient(ids).into_response(),
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
        })
        .unwrap_or_default();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            text_response(StatusCode::OK, "text/plain; version=0.0.4", crate::telemetry::render_metrics())
        }
        (&Method::GET, "/admin/map") => json_response(StatusCode::OK, &map_json(state)),
        (&Method::PUT, "/admin/map") => push_map(state, req).await,
        (&Method::POST, "/admin/map/reload") => {
            let src = crate::reload::Source::File { trigger: "admin" };
            reload_response(crate::reload::request(&state.reload_tx, src).await)
        }
        (&Method::GET, "/admin/shards") => json_response(StatusCode::OK, &shards_json(state)),
        (&Method::GET, "/admin/tls") => json_response(StatusCode::OK, &state.listen_tls.status_json()),
        (&Method::GET, "/admin/cache") => json_response(StatusCode::OK, &state.cache.status_json()),
        (&Method::GET, "/admin/fleet") => json_response(StatusCode::OK, &fleet_json(state)),
        (&Method::GET, "/admin/credentials") => json_response(StatusCode::OK, &state.credentials.status()),
        (&Method::POST, "/admin/credentials/reload") => {
            let creds = state.credentials.clone();
            match tokio::task::spawn_blocking(move || creds.reload("admin")).await {
                Ok(Ok(true)) => json_response(StatusCode::OK, &state.credentials.status()),
                Ok(Ok(false)) => ApiError::Conflict(
                    "this instance was started from config text, not a file: nothing to reload".into(),
                )
                .into_response(),
                Ok(Err(e)) => {
                    ApiError::InvalidParams(format!("credentials reload refused, the previous ones stay: {e}"))
                        .into_response()
                }
                Err(_) => ApiError::Conflict("credentials reload task failed".into()).into_response(),
            }
        }
        (&Method::GET, "/admin/migrations") => json_response(StatusCode::OK, &state.migrations.list()),
        (&Method::POST, "/admin/migrations") => match read_json::<crate::migrate::StartRequest>(req).await {
            Ok(r) => match crate::migrate::start(&host(state), r).await {
                Ok(doc) => json_response(StatusCode::ACCEPTED, &doc),
                Err(e) => ApiError::from(e).into_response(),
            },
            Err(e) => e.into_response(),
        },
        (&Method::POST, "/admin/freeze") => match read_json::<FreezeRequest>(req).await {
            Ok(r) => {
                let cells: Result<Vec<_>, _> = r.cells.iter().map(|c| crate::geo::parse_cell(c)).collect();
                match cells {
                    Ok(cells) => {
                        crate::migrate::freeze_local(
                            state.as_ref(),
                            &r.id,
                            &cells,
                            std::time::Duration::from_millis(r.hold_ms),
                        );
                        json_response(StatusCode::OK, &json!({"frozen": r.id}))
                    }
                    Err(e) => ApiError::InvalidParams(e.to_string()).into_response(),
                }
            }
            Err(e) => e.into_response(),
        },
        (&Method::POST, "/admin/release") => match read_json::<ReleaseRequest>(req).await {
            Ok(r) => {
                let released = crate::migrate::release_local(state.as_ref(), &r.id).is_some();
                json_response(StatusCode::OK, &json!({"released": released}))
            }
            Err(e) => e.into_response(),
        },
        (m, p) if p.starts_with("/admin/migrations/") => {
            let rest = &p["/admin/migrations/".len()..];
            let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
            let r = match (m, action) {
                (&Method::GET, "") => state.migrations.get(id).map(|m| m.doc()).ok_or(ApiError::NotFound),
                (&Method::POST, "abort") => crate::migrate::abort(&host(state), id).await.map_err(ApiError::from),
                (&Method::POST, "resume") => crate::migrate::resume(&host(state), id).await.map_err(ApiError::from),
                _ => Err(ApiError::NotFound),
            };
            match r {
                Ok(doc) => json_response(StatusCode::OK, &doc),
                Err(e) => e.into_response(),
            }
        }
        (&Method::GET, "/admin/locate") => match locate(state, &query) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => e.into_response(),
        },
        (
            _,
            "/metrics" | "/admin/map" | "/admin/shards" | "/admin/locate" | "/admin/tls" | "/admin/credentials"
            | "/admin/cache" | "/admin/fleet",
        ) => ApiError::MethodNotAllowed.into_response(),
        _ => ApiError::NotFound.into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeRequest {
    id: String,
    cells: Vec<String>,
    hold_ms: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    id: String,
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|_| ApiError::BodyTooLarge(1 << 20))?
        .to_bytes();
    super::parse::json(&body)
}

/// Largest map accepted by `PUT /admin/map` (a 1M-cell map is about 19 MB of TOML).
const MAX_MAP_BYTES: usize = 256 << 20;

async fn push_map(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    use http_body_util::BodyExt;
    let from_peer = req.headers().contains_key(crate::fleet::FROM_PEER);
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    // If-Match: "7" (an entity tag holding the version the pusher based its change on), or
    // `?if_match=7` for clients that cannot set headers (`cellgate map push --if-version`).
    let query_if_match = req.uri().query().and_then(|q| q.strip_prefix("if_match=")).map(str::to_string);
    let header_if_match = req.headers().get(header::IF_MATCH).map(|v| v.to_str().unwrap_or("").to_string());
    let if_match = match header_if_match.or(query_if_match).as_deref() {
        None => None,
        Some(v) => match v.trim().trim_start_matches("W/").trim_matches('"').parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return ApiError::InvalidParams(format!("If-Match must be a quoted map version, got {v:?}"))
                    .into_response();
            }
        },
    };
    let body = match http_body_util::Limited::new(req.into_body(), MAX_MAP_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return ApiError::BodyTooLarge(MAX_MAP_BYTES).into_response(),
    };
    let Ok(body) = String::from_utf8(body.to_vec()) else {
        return ApiError::InvalidJson("map must be UTF-8 text".into()).into_response();
    };
    let src = crate::reload::Source::Push { body: body.clone(), json, if_match };
    let outcome = crate::reload::request(&state.reload_tx, src).await;
    // Fleet: a map an operator published here goes to every peer (a push from a peer does not
    // travel on, so there are no loops). Each peer's answer is reported, failures included.
    match outcome {
        Some(o)
            if o.result == crate::reload::ReloadResult::Published && !from_peer && !state.config.peers.is_empty() =>
        {
            let ct = if json { "application/json" } else { "application/toml" };
            let token = state.credentials.auth().peer_token().map(str::to_string);
            let peers = crate::fleet::broadcast(
                &state.config.peers,
                &state.config.tls,
                token.as_deref(),
                Method::PUT,
                "/admin/map",
                ct,
                bytes::Bytes::from(body),
                std::time::Duration::from_secs(10),
            )
            .await;
            for p in peers.iter().filter(|p| !p.ok) {
                tracing::warn!(peer = %p.peer, error = ?p.error, status = ?p.status, "peer did not acknowledge the map");
            }
            let mut v = serde_json::to_value(&o).expect("outcome serialises");
            v["peers"] = json!(peers
                .iter()
                .map(|p| json!({
                    "peer": p.peer,
                    "acknowledged": p.ok,
                    "version": p.body.as_ref().and_then(|b| b.get("version")).cloned(),
                    "result": p.body.as_ref().and_then(|b| b.get("result")).cloned(),
                    "error": p.error.clone().or_else(|| (!p.ok).then(|| format!("status {}", p.status.unwrap_or(0)))),
                }))
                .collect::<Vec<_>>());
            json_response(StatusCode::OK, &v)
        }
        other => reload_response(other),
    }
}

fn reload_response(outcome: Option<crate::reload::Outcome>) -> Response<Body> {
    match outcome {
        Some(o) => {
            let (status, body) = reload_json(&o);
            json_response(status, &body)
        }
        None => ApiError::ShardUnavailable { shard: "-".into(), reason: "reload loop stopped".into() }.into_response(),
    }
}

/// A reload outcome as the admin API shows it: its HTTP status, also inside the body.
fn reload_json(o: &crate::reload::Outcome) -> (StatusCode, Value) {
    use crate::reload::ReloadResult;
    let status = match o.result {
        ReloadResult::Published | ReloadResult::Unchanged => StatusCode::OK,
        ReloadResult::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        ReloadResult::Conflict => StatusCode::CONFLICT,
    };
    let mut body = serde_json::to_value(o).unwrap_or_default();
    body["status"] = json!(status.as_u16());
    (status, body)
}

/// `GET /admin/fleet`: in etcd mode the link (connected, or since when it is lost), this
/// instance's registration and the fleet as last read; in file mode the configured peers.
fn fleet_json(state: &AppState) -> Value {
    let serving = state.pin().map.version().0;
    match &state.etcd {
        Some(link) => link.status_json(serving),
        None => json!({"mode": "file", "serving_version": serving, "peers": state.config.peers}),
    }
}

/// The application state as the migration orchestrator's host.
fn host(state: &Arc<AppState>) -> Arc<dyn crate::migrate::Host> {
    state.clone()
}

/// Ready once a map is published and every endpoint has been probed once, until shutdown starts.
pub fn ready(state: &AppState) -> bool {
    state.accepting.load(std::sync::atomic::Ordering::Relaxed) && state.snapshot.load().backends.first_pass_done()
}

fn locate(state: &AppState, q: &HashMap<String, String>) -> Result<Value, ApiError> {
    let snap = state.pin();
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        q.get(k)
            .map(|v| v.parse::<f64>().map_err(|_| ApiError::InvalidRegion(format!("{k} must be a number"))))
            .transpose()
    };
    let region = geo::region(
        num("lat")?,
        num("lng")?,
        q.get("cell").map(String::as_str),
        num("radius_km")?,
        snap.map.resolution(),
    )
    .map_err(|e| ApiError::InvalidRegion(e.to_string()))?;
    Ok(crate::locate::locate_json(&snap.map, &region))
}

fn map_json(state: &AppState) -> Value {
    let snap = state.pin();
    let m = &snap.map;
    let mut assign: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (cell, s) in m.assignments() {
        assign.entry(m.shard(s).id.to_string()).or_default().push(cell.to_string());
    }
    let fallback = match m.fallback() {
        Fallback::Hash { shards, resolution, vnodes, .. } => json!({
            "mode": "hash",
            "shards": shards.iter().map(|s| m.shard(*s).id.to_string()).collect::<Vec<_>>(),
            "resolution": u8::from(*resolution),
            "vnodes": vnodes,
        }),
        Fallback::Reject => json!({"mode": "reject"}),
    };
    let loaded_at = snap.loaded_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let last_reload = state.reload_status.0.lock().expect("reload status").as_ref().map(|o| reload_json(o).1);
    json!({
        "version": m.version().0,
        "last_reload": last_reload,
        "sha256": snap.sha256,
        "source": snap.source,
        "loaded_at": loaded_at,
        "map": {
            "version": m.version().0,
            "resolution": u8::from(m.resolution()),
            // Secret connection strings serialise as "***".
            "shards": m.shards(),
            "assign": assign,
            "fallback": fallback,
            "tables": m.tables(),
        }
    })
}

/// The fields every pooled SQL endpoint (PostgreSQL, SQL Server) shows in `/admin/shards`;
/// callers add their kind's own (PostgreSQL: lag and LSN).
fn sql_endpoint_json(
    state: &AppState,
    label: &str,
    role: Role,
    h: &HealthView,
    readable: bool,
    st: bb8::State,
) -> Value {
    json!({
        "endpoint": label,
        "role": role,
        "observed_role": h.in_recovery.map(|r| if r { "replica" } else { "primary" }),
        "up": h.up,
        "probed": h.probed,
        "readable": readable,
        "serves": serves(role, h, readable),
        "pool": {
            "size": st.connections,
            "idle": st.idle_connections,
            "max": state.config.pool.max_size,
            // Gets started but not finished = requests parked waiting for a connection.
            "waiting": st.statistics.get_started.saturating_sub(
                st.statistics.get_direct + st.statistics.get_waited + st.statistics.get_timed_out),
        },
        "last_error": h.last_error,
    })
}

/// How the data plane uses an endpoint now, in words: a primary takes writes and the reads that
/// ask for it or find no fit replica; a replica takes replica reads while it is fit.
fn serves(role: Role, h: &HealthView, readable: bool) -> &'static str {
    let down = h.probed && !h.up;
    match role {
        Role::Primary if down => "nothing: down (writes fail fast with 503, reads use the replicas)",
        Role::Primary if h.in_recovery == Some(true) => "nothing: answers as a replica (writes refused)",
        Role::Primary => "writes; reads with consistency primary, and reads no fit replica can take",
        Role::Replica if readable => "replica reads",
        Role::Replica if down => "nothing: down (its reads go to the primary)",
        Role::Replica => "nothing: lagging or not yet probed (its reads go to the primary)",
    }
}

fn shards_json(state: &AppState) -> Value {
    let snap = state.pin();
    let mut shards = Vec::new();
    for (i, shard) in snap.map.shards().iter().enumerate() {
        let mut dbs = serde_json::Map::new();
        for (name, db) in &snap.backends.shards[i] {
            let v = match db {
                DatabaseBackend::Postgres(pg) => {
                    let eps: Vec<Value> = pg
                        .endpoints()
                        .map(|ep| {
                            let h = ep.health.view();
                            let readable = ep.role == Role::Replica
                                && ep
                                    .health
                                    .readable(state.config.health.max_lag_ms, state.config.health.max_lag_bytes);
                            let mut v = sql_endpoint_json(state, &ep.label, ep.role, &h, readable, ep.pool.state());
                            v["lag_ms"] = json!(h.lag_ms);
                            v["lag_bytes"] = json!(h.lag_bytes);
                            v["lsn"] = json!(h.lsn.map(crate::backend::postgres::format_lsn));
                            v
                        })
                        .collect();
                    json!({"kind": "postgres", "endpoints": eps})
                }
                DatabaseBackend::Mongo(m) => {
                    // The driver picks members itself; this is cellgate's view of the database.
                    let st = m.status();
                    json!({"kind": "mongodb", "endpoints": [{
                        "endpoint": st.endpoint,
                        "database": st.database,
                        "warmed": st.warmed,
                        "up": st.up,
                        "max_staleness_s": m.max_staleness().as_secs(),
                        "last_error": st.last_error,
                    }]})
                }
                DatabaseBackend::Sqlserver(ms) => {
                    let eps: Vec<Value> = ms
                        .endpoints()
                        .map(|ep| {
                            let h = ep.health.view();
                            let readable = ep.role == Role::Replica && ep.health.readable_by_role();
                            sql_endpoint_json(state, &ep.label, ep.role, &h, readable, ep.pool.state())
                        })
                        .collect();
                    json!({"kind": "sqlserver", "endpoints": eps})
                }
            };
            dbs.insert(name.clone(), v);
        }
        shards.push(json!({"id": shard.id.to_string(), "zone": shard.zone, "databases": dbs}));
    }
    json!({"map_version": snap.map.version().0, "shards": shards})
}
