//! The map file mounted from a Kubernetes ConfigMap: the kubelet never writes `map.toml` itself.
//! Its atomic writer keeps the data in a timestamped directory and publishes an update by
//! swapping one symlink:
//!
//! ```text
//! <dir>/map.toml -> ..data/map.toml
//! <dir>/..data   -> ..2026_12_02_01_00_00.000000001
//! <dir>/..2026_12_02_01_00_00.000000001/map.toml
//! ```
//!
//! An update writes a new timestamped directory, creates `..data_tmp -> <new dir>`, renames
//! `..data_tmp` over `..data` (atomic) and deletes the old directory. No event in the watched
//! directory names `map.toml`. This test reproduces exactly that sequence and checks that the
//! served map follows it, twice in a row. The map's endpoint is unreachable on purpose: the
//! server starts without its backends, and a reload that keeps the same endpoints reuses them
//! (no new connection to check), so no database is needed.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use cellgate::config::Config;
use support::*;

fn map_text(version: u64) -> String {
    format!(
        "version = {version}\nresolution = 5\n\
         [[shards]]\nid = \"a\"\nzone = \"test\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  \
         primary = \"postgres://app:pw@127.0.0.1:1/core\"\n\
         [[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n\
         [fallback]\nmode = \"reject\"\n[tables.core.items]\ncell_column = \"h3\"\n"
    )
}

/// The kubelet's first write of a ConfigMap volume: data dir, `..data`, the user-visible link.
fn kubelet_initial(dir: &Path, ts: &str, text: &str) {
    std::fs::create_dir(dir.join(ts)).unwrap();
    std::fs::write(dir.join(ts).join("map.toml"), text).unwrap();
    symlink(ts, dir.join("..data")).unwrap();
    symlink("..data/map.toml", dir.join("map.toml")).unwrap();
}

/// The kubelet's update: new data dir, `..data_tmp` renamed over `..data`, old dir removed.
fn kubelet_update(dir: &Path, old_ts: &str, new_ts: &str, text: &str) {
    std::fs::create_dir(dir.join(new_ts)).unwrap();
    std::fs::write(dir.join(new_ts).join("map.toml"), text).unwrap();
    symlink(new_ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(old_ts)).unwrap();
}

async fn served(http: &reqwest::Client, admin: &str) -> serde_json::Value {
    http.get(format!("{admin}/admin/map")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap()
}

async fn wait_version(http: &reqwest::Client, admin: &str, want: u64) -> Duration {
    let t = Instant::now();
    loop {
        let m = served(http, admin).await;
        if m["version"] == want {
            assert_eq!(m["last_reload"]["trigger"], "watch", "{m}");
            assert_eq!(m["last_reload"]["result"], "published", "{m}");
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "map version {want} not served within 5 s: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swaps_are_reloaded() {
    logs();
    let dir = std::env::temp_dir().join(format!("cellgate-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ts1 = "..2026_12_02_01_00_00.000000001";
    let ts2 = "..2026_12_02_01_01_00.000000002";
    let ts3 = "..2026_12_02_01_02_00.000000003";
    kubelet_initial(&dir, ts1, &map_text(1));

    // config_text serves `<dir>/map.toml` with the file watch on (the default).
    let cfg = Config::parse(&config_text(&dir)).unwrap();
    assert!(matches!(cfg.map, cellgate::config::MapSource::File { watch: true, .. }));
    let server = cellgate::server::start(cfg, false).await.unwrap();
    let admin = format!("http://{}", server.admin_addr);
    let http = reqwest::Client::new();
    assert_eq!(served(&http, &admin).await["version"], 1);

    kubelet_update(&dir, ts1, ts2, &map_text(2));
    let took = wait_version(&http, &admin, 2).await;
    eprintln!("first swap served after {took:?}");

    kubelet_update(&dir, ts2, ts3, &map_text(3));
    let took = wait_version(&http, &admin, 3).await;
    eprintln!("second swap served after {took:?}");

    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
