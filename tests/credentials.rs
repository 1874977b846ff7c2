//! Credentials without a restart: a token whose digest comes from a `${file:}` secret is
//! rotated by replacing the file; a token added to `cellgate.toml` works within seconds; a
//! group-readable secret file is refused and the serving credentials stay; `/admin/credentials`
//! shows names and counts, never a secret. Real PostgreSQL behind a real cellgate.

#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

fn write_secret(path: &std::path::Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

async fn read_status(st: &Stack, token: &str) -> u16 {
    let body = json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT 1 AS one"});
    st.post("/v1/sql/core/query", Some(token), &body).await.0
}

/// Polls `f` until it holds (credentials are polled once a second) or 10 s pass.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < Duration::from_secs(10), "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn credentials(st: &Stack) -> Value {
    let (code, text) = st.admin_get("/admin/credentials").await;
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_by_file_and_config_change_without_a_restart() {
    let secrets = std::env::temp_dir().join(format!("cellgate-creds-test-{}", std::process::id()));
    std::fs::create_dir_all(&secrets).unwrap();
    let digest_file = secrets.join("rotating.sha256");
    write_secret(&digest_file, &format!("{}\n", cellgate::auth::digest_hex("tok-one")), 0o600);
    let entry = format!(
        "\n[[tokens]]\nname = \"rotating\"\nsha256 = \"${{file:{}}}\"\nscopes = [\"read\"]\n",
        digest_file.display()
    );
    let st = Stack::start(1, 0, |c| c.push_str(&entry)).await;

    // 1. The token from the secret file works; its successor does not yet.
    assert_eq!(read_status(&st, "tok-one").await, 200);
    assert_eq!(read_status(&st, "tok-two").await, 401);
    let status = credentials(&st).await;
    assert_eq!(status["secret_files"], json!([digest_file.display().to_string()]), "{status}");
    let tokens_before = status["tokens"].as_u64().unwrap();

    // 2. Rotation: the file is replaced (mode kept private); the new token works, the old one
    // stops, with no restart and no signal.
    write_secret(&digest_file, &format!("{}\n", cellgate::auth::digest_hex("tok-two")), 0o600);
    eventually("tok-two accepted", async || read_status(&st, "tok-two").await == 200).await;
    assert_eq!(read_status(&st, "tok-one").await, 401);

    // 3. A group-readable secret is refused: the serving credentials stay, the error names the
    // file and its mode, never its content.
    std::fs::set_permissions(&digest_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    eventually("refused reload reported", async || credentials(&st).await["last_attempt"]["result"] == "refused").await;
    let status = credentials(&st).await;
    let error = status["last_attempt"]["error"].as_str().unwrap();
    let secret = cellgate::auth::digest_hex("tok-two");
    assert!(error.contains("0644") && error.contains("rotating") && !error.contains(&secret), "{error}");
    assert!(!status.to_string().contains(&secret), "{status}");
    assert_eq!(read_status(&st, "tok-two").await, 200, "old credentials keep serving");
    // The admin endpoint refuses the same reload with 400 and the same reason.
    let resp = st.http.post(format!("{}/admin/credentials/reload", st.admin())).bearer_auth(ADMIN_TOKEN).send().await;
    let resp = resp.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    std::fs::set_permissions(&digest_file, std::fs::Permissions::from_mode(0o400)).unwrap();

    // 4. A token added to cellgate.toml works once the file is saved.
    let config = st.dir.join("cellgate.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[tokens]]\nname = \"added\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
        cellgate::auth::digest_hex("tok-added")
    ));
    std::fs::write(&config, text).unwrap();
    eventually("added token accepted", async || read_status(&st, "tok-added").await == 200).await;
    let status = credentials(&st).await;
    assert_eq!(status["tokens"].as_u64().unwrap(), tokens_before + 1, "{status}");
    assert_eq!(status["last_attempt"]["result"], "loaded", "{status}");

    st.stop().await;
    std::fs::remove_dir_all(&secrets).unwrap();
}
