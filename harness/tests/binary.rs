//! Integration tests of the `cellgate-cluster` binary and the watchdog, against the real
//! PostgreSQL on this machine (they FAIL, never skip, when it is missing). Touch only the
//! clusters they start and their own state files.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{alive, poll, processes_mentioning};

const BIN: &str = env!("CARGO_BIN_EXE_cellgate-cluster");

fn state_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cellgate-cluster-test-{tag}-{}.json", std::process::id()))
}

/// Starts `cellgate-cluster up ARGS --state-file PATH` and waits for the state file.
fn spawn_up(args: &[&str], state: &Path) -> (Child, serde_json::Value) {
    let _ = std::fs::remove_file(state);
    let mut child = Command::new(BIN)
        .arg("up")
        .args(args)
        .arg("--state-file")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn cellgate-cluster");
    let doc = poll("cellgate-cluster state file", Duration::from_secs(120), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("cellgate-cluster exited early with {status}");
        }
        let text = std::fs::read_to_string(state).ok()?;
        Some(serde_json::from_str::<serde_json::Value>(&text).expect("state file is JSON"))
    });
    (child, doc)
}

fn node_pids(doc: &serde_json::Value) -> Vec<u32> {
    let mut pids = Vec::new();
    for shard in doc["shards"].as_array().unwrap() {
        pids.push(shard["primary"]["pid"].as_u64().unwrap() as u32);
        for r in shard["replicas"].as_array().unwrap() {
            pids.push(r["pid"].as_u64().unwrap() as u32);
        }
    }
    pids
}

fn psql(url: &str, sql: &str) -> String {
    let bindir = cellgate_harness::pg_bindir().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(bindir.join("psql"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, url])
        .output()
        .expect("run psql");
    assert!(out.status.success(), "psql {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn up_serves_two_shards_and_sigterm_stops_everything() {
    let state = state_path("term");
    let (mut child, doc) = spawn_up(&["--shards", "2", "--replicas", "1"], &state);
    assert_eq!(doc["pid"].as_u64().unwrap() as u32, child.id());
    let shards = doc["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    for (i, shard) in shards.iter().enumerate() {
        assert_eq!(shard["index"].as_u64().unwrap() as usize, i);
        let p = &shard["primary"];
        // No fixed passwords: both are random per run when none is given.
        for (url, fixed) in [(&p["url"], "app-password"), (&p["admin_url"], "postgres-password")] {
            assert!(!url.as_str().unwrap().contains(fixed), "{url}");
        }
        assert_eq!(psql(p["url"].as_str().unwrap(), "SELECT pg_is_in_recovery()"), "f");
        assert_eq!(psql(p["admin_url"].as_str().unwrap(), "SELECT current_user"), "postgres");
        let replicas = shard["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 1);
        assert_eq!(psql(replicas[0]["url"].as_str().unwrap(), "SELECT pg_is_in_recovery()"), "t");
    }
    // stdout carries the same document.
    let mut stdout = child.stdout.take().unwrap();
    let root = PathBuf::from(doc["root_dir"].as_str().unwrap());
    let pids = node_pids(&doc);
    assert!(root.is_dir());

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = poll("cellgate-cluster exit", Duration::from_secs(60), || child.try_wait().unwrap());
    assert!(status.success(), "exit status {status}");
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let printed: serde_json::Value = serde_json::from_str(&out).expect("stdout is one JSON doc");
    assert_eq!(printed, doc);

    assert!(!root.exists(), "{} still exists", root.display());
    assert!(!state.exists(), "state file left behind");
    for pid in pids {
        assert!(!alive(pid), "postmaster {pid} survived SIGTERM");
    }
    assert!(processes_mentioning(&root.display().to_string()).is_empty());
}

/// Passwords come from the environment or an owner-only file, never argv; the state file that
/// carries them (in its URLs) is 0600; no process's command line shows them while the cluster runs.
#[test]
fn passwords_stay_off_command_lines_and_out_of_readable_files() {
    use std::os::unix::fs::PermissionsExt;
    let pid = std::process::id();
    let app_pw = format!("appcanary{pid}x7");
    let su_pw = format!("sucanary{pid}q3");

    // Refused: a password on argv, and a password file others can read.
    let out = Command::new(BIN).args(["up", "--app-password", &app_pw]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("command line"), "{out:?}");
    let su_file = std::env::temp_dir().join(format!("cellgate-cluster-test-su-{pid}.pw"));
    std::fs::write(&su_file, format!("{su_pw}\n")).unwrap();
    std::fs::set_permissions(&su_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN).args(["up", "--superuser-password-file"]).arg(&su_file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"), "{out:?}");
    std::fs::set_permissions(&su_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let state = state_path("secrets");
    let _ = std::fs::remove_file(&state);
    let mut child = Command::new(BIN)
        .args(["up", "--shards", "1", "--replicas", "1", "--superuser-password-file"])
        .arg(&su_file)
        .arg("--state-file")
        .arg(&state)
        .env("CELLGATE_CLUSTER_APP_PASSWORD", &app_pw)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn cellgate-cluster");
    // Watch every command line while the cluster starts (initdb, pg_basebackup, psql, postgres).
    let mut seen = Vec::new();
    let doc = poll("cellgate-cluster state file", Duration::from_secs(120), || {
        seen.extend(processes_mentioning(&app_pw));
        seen.extend(processes_mentioning(&su_pw));
        if let Ok(Some(status)) = child.try_wait() {
            panic!("cellgate-cluster exited early with {status}");
        }
        let text = std::fs::read_to_string(&state).ok()?;
        Some(serde_json::from_str::<serde_json::Value>(&text).expect("state file is JSON"))
    });
    let p = &doc["shards"][0]["primary"];
    assert!(p["url"].as_str().unwrap().contains(&app_pw), "{p}");
    assert!(p["admin_url"].as_str().unwrap().contains(&su_pw), "{p}");
    assert_eq!(psql(p["admin_url"].as_str().unwrap(), "SELECT current_user"), "postgres");
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);
    seen.extend(processes_mentioning(&app_pw));
    seen.extend(processes_mentioning(&su_pw));
    assert!(seen.is_empty(), "passwords on command lines: {seen:?}");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = poll("cellgate-cluster exit", Duration::from_secs(60), || child.try_wait().unwrap());
    assert!(status.success(), "exit status {status}");
    let _ = std::fs::remove_file(&su_file);
}

#[test]
fn watchdog_cleans_up_after_sigkill_of_the_owner() {
    let state = state_path("kill");
    let (mut child, doc) = spawn_up(&["--shards", "1", "--replicas", "1"], &state);
    let root = PathBuf::from(doc["root_dir"].as_str().unwrap());
    let pids = node_pids(&doc);
    assert!(pids.iter().all(|&p| alive(p)));

    child.kill().unwrap(); // SIGKILL: no Drop runs
    child.wait().unwrap();
    poll("watchdog removing the cluster", Duration::from_secs(30), || {
        (!root.exists()
            && pids.iter().all(|&p| !alive(p))
            && processes_mentioning(&root.display().to_string()).is_empty())
        .then_some(())
    });
    let _ = std::fs::remove_file(&state);
}

#[test]
fn missing_postgres_fails_clearly() {
    let out = Command::new(BIN)
        .args(["up", "--shards", "1"])
        .env("CELLGATE_PG_BINDIR", "/nonexistent/pg/bin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CELLGATE_PG_BINDIR"), "{err}");
    assert!(err.contains("initdb"), "{err}");
}

#[test]
fn help_and_bad_args() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cellgate-cluster up"));
    let out = Command::new(BIN).args(["up", "--shards", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
