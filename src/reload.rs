//! The only writer of the published snapshot. File watch, SIGHUP, `PUT /admin/map`,
//! `POST /admin/map/reload` and the etcd watch (fleet mode) all send a [`Request`] on one
//! channel; one task compiles, checks, reuses unchanged pools, and publishes — or publishes
//! nothing and keeps the old map.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use arc_swap::ArcSwap;

use crate::backend::Backends;
use crate::config::Config;
use crate::shardmap;
use crate::state::{Snapshot, text_sha256};

/// Where a candidate map comes from.
#[derive(Debug)]
pub enum Source {
    /// Re-read the configured map file (file watch, SIGHUP, `POST /admin/map/reload`).
    File { trigger: &'static str },
    /// A map pushed over the admin API. `json`: the body is JSON (converted to TOML first).
    Push { body: String, json: bool, if_match: Option<u64> },
    /// The map key in etcd as read or watched (fleet mode, `crate::etcd`): its text and the
    /// revision that wrote it. Never persisted here: etcd is where it lives.
    Etcd { text: String, revision: i64 },
}

pub struct Request {
    pub source: Source,
    pub reply: Option<oneshot::Sender<Outcome>>,
}

/// What a reload attempt ended as (serialised as these lowercase words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadResult {
    /// A new snapshot serves.
    Published,
    /// The same bytes as the serving map: nothing to do.
    Unchanged,
    /// The candidate is invalid (compile errors, unreachable endpoints, unwritable file).
    Rejected,
    /// The candidate does not move the version forward, or If-Match named another version.
    Conflict,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Published => "published",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Rejected => "rejected",
            ReloadResult::Conflict => "conflict",
        }
    }
}

/// What a reload did (the admin API maps `result` to its HTTP status).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub result: ReloadResult,
    pub version: u64,
    pub previous_version: u64,
    pub errors: Vec<String>,
    pub trigger: String,
    #[serde(serialize_with = "unix_secs")]
    pub at: SystemTime,
}

fn unix_secs<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// What the reload writer works on, provided by the application state (the reload floor sits
/// below it and names only these three things).
pub trait Host: Send + Sync + 'static {
    /// The published snapshot: the reload writer is its only writer.
    fn snapshot(&self) -> &ArcSwap<Snapshot>;
    fn config(&self) -> &Config;
    /// Where the last outcome is kept for `GET /admin/map`.
    fn reload_status(&self) -> &Status;
}

/// The last outcome, shown by `GET /admin/map`.
#[derive(Default)]
pub struct Status(pub Mutex<Option<Outcome>>);

pub type Sender = mpsc::Sender<Request>;

/// Ask for a reload and wait for its outcome.
pub async fn request(tx: &Sender, source: Source) -> Option<Outcome> {
    let (reply, rx) = oneshot::channel();
    tx.send(Request { source, reply: Some(reply) }).await.ok()?;
    rx.await.ok()
}

/// The reload loop. Owns no state but the channel; everything it changes goes through
/// `state.snapshot.store`.
pub async fn run<H: Host>(state: Arc<H>, mut rx: mpsc::Receiver<Request>) {
    while let Some(req) = rx.recv().await {
        let outcome = apply(state.as_ref(), req.source).await;
        if let Some(r) = req.reply {
            let _ = r.send(outcome);
        }
    }
}

fn outcome(state: &impl Host, result: ReloadResult, version: u64, errors: Vec<String>, trigger: &str) -> Outcome {
    let o = Outcome {
        result,
        version,
        previous_version: state.snapshot().load().map.version().0,
        errors,
        trigger: trigger.to_string(),
        at: SystemTime::now(),
    };
    metrics::counter!(crate::telemetry::names::MAP_RELOADS, "result" => result.as_str()).increment(1);
    let r = result.as_str();
    match result {
        ReloadResult::Published | ReloadResult::Unchanged => tracing::info!(version, trigger, result = r, "map reload"),
        _ => tracing::warn!(version, trigger, result = r, errors = ?o.errors, "map reload refused; old map kept"),
    }
    // A no-op (the watcher seeing our own write, a reload of the same bytes) does not hide
    // the outcome of the last real attempt.
    if result != ReloadResult::Unchanged {
        *state.reload_status().0.lock().expect("reload status") = Some(o.clone());
    }
    o
}

/// JSON map → TOML text (line numbers in errors then refer to this rendering).
fn json_to_toml(body: &str) -> Result<String, String> {
    let v: toml::Value = serde_json::from_str(body).map_err(|e| format!("invalid JSON map: {e}"))?;
    toml::to_string(&v).map_err(|e| format!("JSON map cannot be expressed as TOML: {e}"))
}

/// Write `text` to `path` atomically (temp file in the same directory, fsync, rename), so a
/// restart loads what was published and a watcher never sees half a file.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp: PathBuf =
        dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("map"), std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn apply(state: &impl Host, source: Source) -> Outcome {
    use crate::config::MapSource;
    let current = state.snapshot().load_full();
    // What the candidate is, where a published map is persisted (file mode pushes) and the
    // snapshot's source label. A source that does not match the configured mode is refused:
    // in etcd mode etcd is the only truth (a local push or file would be overwritten by the
    // next watch event, and the fleet would disagree).
    let (trigger, text, if_match, persist, label) = match (source, &state.config().map) {
        (Source::File { trigger }, MapSource::File { path, .. }) => match tokio::fs::read_to_string(path).await {
            Ok(t) => (trigger.to_string(), t, None, None, path.display().to_string()),
            Err(e) => {
                return outcome(state, ReloadResult::Rejected, 0, vec![format!("{}: {e}", path.display())], trigger);
            }
        },
        (Source::Push { body, json, if_match }, MapSource::File { path, .. }) => {
            let text = if json {
                match json_to_toml(&body) {
                    Ok(t) => t,
                    Err(e) => return outcome(state, ReloadResult::Rejected, 0, vec![e], "push"),
                }
            } else {
                body
            };
            ("push".to_string(), text, if_match, Some(path.clone()), path.display().to_string())
        }
        (Source::Etcd { text, revision }, MapSource::Etcd(e)) => {
            let label = format!("etcd {}/map@{revision}", e.prefix);
            (format!("etcd@{revision}"), text, None, None, label)
        }
        (Source::File { trigger }, MapSource::Etcd(e)) => {
            let msg = format!(
                "the map comes from etcd ({}/map): there is no map file to reload; it follows etcd by itself",
                e.prefix
            );
            return outcome(state, ReloadResult::Rejected, 0, vec![msg], trigger);
        }
        (Source::Push { .. }, MapSource::Etcd(e)) => {
            let msg = format!(
                "the map comes from etcd ({}/map): push with `cellgate map push FILE --etcd ... --prefix {}`",
                e.prefix, e.prefix
            );
            return outcome(state, ReloadResult::Rejected, 0, vec![msg], "push");
        }
        (Source::Etcd { revision, .. }, MapSource::File { .. }) => {
            let msg = "a map from etcd, but this instance reads its map from a file".to_string();
            return outcome(state, ReloadResult::Rejected, 0, vec![msg], &format!("etcd@{revision}"));
        }
    };
    // 1. Optimistic concurrency: If-Match names the version the pusher based its change on.
    if let Some(v) = if_match
        && v != current.map.version().0
    {
        let msg = format!("If-Match version {v} but the current version is {}", current.map.version());
        return outcome(state, ReloadResult::Conflict, v, vec![msg], &trigger);
    }
    // 2. Same bytes as what is serving: nothing to do (the watcher sees our own pushes).
    if text_sha256(&text) == current.sha256 {
        return outcome(state, ReloadResult::Unchanged, current.map.version().0, vec![], &trigger);
    }
    // 3. Compile, collecting every error.
    let map = match shardmap::compile_str(&text) {
        Ok(m) => m,
        Err(errs) => {
            let errors = errs.0.iter().map(ToString::to_string).collect();
            return outcome(state, ReloadResult::Rejected, 0, errors, &trigger);
        }
    };
    let version = map.version().0;
    // 4. Versions only move forward.
    if map.version() <= current.map.version() {
        let msg = format!("version {version} is not greater than the current version {}", current.map.version());
        return outcome(state, ReloadResult::Conflict, version, vec![msg], &trigger);
    }
    // 5. Backends: unchanged endpoints keep their pools (and open connections); new ones are
    //    connected and checked before anything is published.
    let backends = match Backends::build_reusing(&map, state.config(), Some(&current.backends)) {
        Ok(b) => b,
        Err(errors) => return outcome(state, ReloadResult::Rejected, version, errors, &trigger),
    };
    if let Err(errors) = backends.check_new(state.config()).await {
        return outcome(state, ReloadResult::Rejected, version, errors, &trigger);
    }
    // 6. Persist a pushed map before publishing it: a restart must not go back in time.
    if let Some(path) = &persist
        && let Err(e) = write_atomic(path, &text)
    {
        return outcome(
            state,
            ReloadResult::Rejected,
            version,
            vec![format!("cannot write {}: {e}", path.display())],
            &trigger,
        );
    }
    // 7. Publish. Requests that pinned the old snapshot finish on it; new ones see this one.
    state.snapshot().store(Arc::new(Snapshot::new(map, backends, text, label)));
    metrics::gauge!(crate::telemetry::names::MAP_VERSION).set(version as f64);
    outcome(state, ReloadResult::Published, version, vec![], &trigger)
}

/// The symlink a Kubernetes ConfigMap (or Secret) volume swaps atomically on every update.
const KUBERNETES_DATA_LINK: &str = "..data";

/// Watch the map file's directory (editors and Kubernetes ConfigMaps replace files by rename,
/// so the file itself is the wrong thing to watch). File events come in bursts (write, rename,
/// chmod): a debounce task waits for 200 ms of quiet, then asks the reload loop once, so the
/// loop itself never sleeps. Returns the watcher (dropping it stops it) and the debounce task.
pub fn watch(path: &Path, tx: Sender) -> notify::Result<(notify::RecommendedWatcher, tokio::task::JoinHandle<()>)> {
    use notify::Watcher;
    let name = path.file_name().map(|n| n.to_os_string());
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if ev.kind.is_access() {
            return;
        }
        // A Kubernetes ConfigMap volume never touches `map.toml` (a fixed symlink to
        // `..data/map.toml`): the kubelet publishes an update by renaming a new symlink
        // `..data_tmp` over `..data`, so that rename is the only event naming our file's data.
        let ours = |p: &PathBuf| {
            let n = p.file_name().map(|n| n.to_os_string());
            n == name || n.as_deref() == Some(std::ffi::OsStr::new(KUBERNETES_DATA_LINK))
        };
        if ev.paths.iter().any(ours) {
            // Full channel = an event is already pending; one reload reads the newest file.
            let _ = ev_tx.try_send(());
        }
    })?;
    w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let debounce = crate::tasks::spawn("map_watch_debounce", async move {
        while ev_rx.recv().await.is_some() {
            loop {
                match tokio::time::timeout(Duration::from_millis(200), ev_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(Request { source: Source::File { trigger: "watch" }, reply: None }).await.is_err() {
                return;
            }
        }
    });
    Ok((w, debounce))
}
