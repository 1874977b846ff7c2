//! Credentials that change without a restart: the `[[tokens]]`, `[[clients]]` and `peer_token` of
//! `cellgate.toml` (and the `${file:}` secrets they name) are read again when one of those files
//! changes (checked once a second) or on SIGHUP, compiled into a new [`Auth`] and swapped in whole.
//! A config that does not load keeps the old credentials, with the error in the log and in
//! `GET /admin/credentials`. Every other setting of the file needs a restart; this module never
//! touches them. Never stores, logs or shows a secret: only names, counts and file paths.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::auth::Auth;
use crate::config::Config;

/// How often the config file and its secret files are checked for a change.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What `GET /admin/credentials` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    /// The config file (none: the process was started from text, not a file; nothing reloads).
    pub config_file: Option<String>,
    /// The `${file:}` secret files the config names, watched with it.
    pub secret_files: Vec<String>,
    /// Counts of what serves now.
    pub tokens: usize,
    pub clients: usize,
    pub peer_token: bool,
    /// RFC 3339, UTC: when the serving credentials were loaded.
    pub loaded_at: String,
    /// The last reload attempt: `loaded` or `refused` (the serving credentials stay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<Attempt>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub at: String,
    pub trigger: &'static str,
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The serving credentials and their reload state, shared by the listeners, the fleet pushes and
/// the reload task.
pub struct Credentials {
    auth: ArcSwap<Auth>,
    source: Option<PathBuf>,
    status: Mutex<Status>,
    /// What the files looked like when last read.
    seen: Mutex<Vec<(PathBuf, Option<Stamp>)>>,
}

use crate::secrets::FileStamp as Stamp;

impl Credentials {
    /// The credentials of a loaded config (`cfg.source` is the file later reloads read).
    pub fn new(cfg: &Config) -> Self {
        let files = cfg.source.as_deref().map(watched_files).unwrap_or_default();
        let status = Status {
            config_file: cfg.source.as_ref().map(|p| p.display().to_string()),
            secret_files: files.iter().skip(1).map(|p| p.display().to_string()).collect(),
            tokens: cfg.tokens.len(),
            clients: cfg.clients.len(),
            peer_token: cfg.peer_token.is_some(),
            loaded_at: now_rfc3339(),
            last_attempt: None,
        };
        Self {
            auth: ArcSwap::from_pointee(Auth::from_config(cfg)),
            source: cfg.source.clone(),
            status: Mutex::new(status),
            seen: Mutex::new(stamps(&files)),
        }
    }

    /// The serving credentials; a request holds one `Auth` for its whole life.
    pub fn auth(&self) -> arc_swap::Guard<Arc<Auth>> {
        self.auth.load()
    }

    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether any watched file changed since the last read (blocking: file metadata).
    fn changed(&self) -> bool {
        let Some(path) = &self.source else { return false };
        let now = stamps(&watched_files(path));
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    /// Read the config file again and swap in its credentials. Blocking (file reads): call it off
    /// the async workers. `Ok(false)`: nothing to reload from (started from text).
    pub fn reload(&self, trigger: &'static str) -> Result<bool, String> {
        let Some(path) = &self.source else { return Ok(false) };
        // 1. Stamp the files before reading them: a change made while we read is seen next poll.
        let files = watched_files(path);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&files);
        // 2. Load and validate the whole file (every `${file:}` read again); refuse on any error.
        let at = now_rfc3339();
        let result = Config::load(path).map_err(|e| e.to_string());
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.secret_files = files.iter().skip(1).map(|p| p.display().to_string()).collect();
        match result {
            Ok(cfg) => {
                // 3. Publish: new requests see the new tokens and clients; a request in flight
                // finishes with the `Auth` it pinned.
                self.auth.store(Arc::new(Auth::from_config(&cfg)));
                status.tokens = cfg.tokens.len();
                status.clients = cfg.clients.len();
                status.peer_token = cfg.peer_token.is_some();
                status.loaded_at = at.clone();
                status.last_attempt = Some(Attempt { at, trigger, result: "loaded", error: None });
                tracing::info!(trigger, tokens = cfg.tokens.len(), clients = cfg.clients.len(), "credentials reloaded");
                Ok(true)
            }
            Err(e) => {
                // Config errors name fields and files, never values (config::expand_secrets).
                tracing::error!(trigger, error = %e, "credentials reload refused; the previous ones stay");
                status.last_attempt = Some(Attempt { at, trigger, result: "refused", error: Some(e.clone()) });
                Err(e)
            }
        }
    }
}

/// The config file and the absolute paths of the `${file:…}` references in it (read as text:
/// a reference in a comment is watched too, which costs one `stat`).
fn watched_files(config: &Path) -> Vec<PathBuf> {
    let mut files = vec![config.to_path_buf()];
    if let Ok(text) = std::fs::read_to_string(config) {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("${file:") {
            let after = &rest[i + "${file:".len()..];
            let Some(end) = after.find('}') else { break };
            files.push(PathBuf::from(&after[..end]));
            rest = &after[end..];
        }
    }
    files
}

/// The stamp of each file (`crate::secrets::file_stamp`).
fn stamps(files: &[PathBuf]) -> Vec<(PathBuf, Option<Stamp>)> {
    files.iter().map(|p| (p.clone(), crate::secrets::file_stamp(p))).collect()
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Once a second: reload when the config file or one of its secret files changed.
pub async fn poll_loop(creds: Arc<Credentials>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = creds.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if c.changed() {
                let _ = c.reload("file change");
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_references_are_watched() {
        let dir = std::env::temp_dir().join(format!("cellgate-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = dir.join("cellgate.toml");
        std::fs::write(&cfg, "peer_token = \"${file:/run/a}\"\n# ${file:/run/b}\nx = \"${file:/unterminated\"\n")
            .expect("write");
        let files = watched_files(&cfg);
        assert_eq!(files, vec![cfg.clone(), PathBuf::from("/run/a"), PathBuf::from("/run/b")]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
