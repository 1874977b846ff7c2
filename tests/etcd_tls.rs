//! Fleet mode on an etcd that requires TLS with client certificates (`--client-cert-auth`, test
//! CA from rcgen) and has its auth enabled (a `cellgate` user allowed the fleet's prefix only),
//! against a real etcd started here and a real PostgreSQL shard: `map push --etcd https://...`
//! with CA, client certificate, user and password (from the environment, then from a file) works
//! and `--wait` sees the instance apply it; an instance with the right settings serves the map;
//! the wrong CA, no client certificate, a client certificate from another CA and a wrong password
//! are each refused with an error that says so and never contains the password, which appears in
//! no admin output and no log line either.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellgate::server::Running;
use serde_json::{Value, json};
use support::etcd::Etcd;
use support::*;

const PREFIX: &str = "/cellgate/tls";
const USER: &str = "cellgate";
/// Canaries: must show up in no error, admin answer or log line.
const PASSWORD: &str = "etcd-Pw-5d7a1c";
const WRONG_PASSWORD: &str = "wrong-Pw-77aa31";
const ROOT_PASSWORD: &str = "root-Pw-0b3e9f";

/// The `map = { etcd = { ... } }` line of an instance: `access` is the TLS/auth part.
fn etcd_line(etcd: &Etcd, id: &str, access: &str) -> String {
    format!(
        "map = {{ etcd = {{ endpoints = [\"{}\"], prefix = \"{PREFIX}\", instance_id = \"{id}\", timeout_ms = 1500, lease_ttl_s = 2{access} }} }}",
        etcd.url()
    )
}

fn access_line(ca: &Path, cert: Option<(&Path, &Path)>, password: Option<&Path>) -> String {
    let mut s = format!(", ca = \"{}\"", ca.display());
    if let Some((c, k)) = cert {
        s += &format!(", cert = \"{}\", key = \"{}\"", c.display(), k.display());
    }
    if let Some(p) = password {
        s += &format!(", user = \"{USER}\", password = \"${{file:{}}}\"", p.display());
    }
    s
}

async fn start_instance(stack: &Stack, line: &str) -> Result<Running, String> {
    let cfg: String = config_text(&stack.dir)
        .lines()
        .map(|l| if l.starts_with("map = ") { line.to_string() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg = cellgate::config::Config::parse(&cfg).map_err(|e| format!("config: {e}"))?;
    cellgate::server::start(cfg, false).await.map_err(|e| e.to_string())
}

fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Run the CLI binary with `env`; returns (exit code, stdout, stderr).
async fn cli(args: &[String], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cellgate"));
    cmd.args(args).env_remove("CELLGATE_ETCD_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn no_secret(what: &str, text: &str) {
    for s in [PASSWORD, WRONG_PASSWORD, ROOT_PASSWORD] {
        assert!(!text.contains(s), "{what} contains a password: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_mode_over_mutual_tls_with_etcd_auth() {
    let mut etcd = tokio::task::block_in_place(Etcd::start_tls);
    etcd.enable_auth(ROOT_PASSWORD, USER, PASSWORD, PREFIX).await;
    let stack = Stack::start(1, 0, |_| {}).await;
    let tls = etcd.tls.as_ref().unwrap();
    let pw_file = secret_file(&stack.dir, "etcd-password", PASSWORD);
    let wrong_pw_file = secret_file(&stack.dir, "etcd-wrong-password", WRONG_PASSWORD);
    let tls_flags: Vec<String> = [
        "--etcd-ca",
        &tls.ca.display().to_string(),
        "--etcd-cert",
        &tls.client_cert.display().to_string(),
        "--etcd-key",
        &tls.client_key.display().to_string(),
        "--etcd-user",
        USER,
    ]
    .map(String::from)
    .into();
    let push = |file: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> =
            ["map", "push", &file.display().to_string(), "--etcd", &etcd.url(), "--prefix", PREFIX]
                .map(String::from)
                .into();
        a.extend(tls_flags.iter().cloned());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // 1. The operator pushes over HTTPS as the `cellgate` user, the password in the environment.
    let map1 = stack.dir.join("etcd-map-1.toml");
    std::fs::write(&map1, map_toml(&stack.cluster, None)).unwrap();
    let (code, out, err) = cli(&push(&map1, &[]), &[("CELLGATE_ETCD_PASSWORD", PASSWORD)]).await;
    assert_eq!(code, 0, "push over TLS with auth: {out} {err}");
    assert!(out.contains("\"version\":1"), "{out}");

    // 2. An instance with the right CA, client certificate, user and password serves it.
    let right = access_line(&tls.ca, Some((&tls.client_cert, &tls.client_key)), Some(&pw_file));
    let i = start_instance(&stack, &etcd_line(&etcd, "i-tls", &right)).await.unwrap();
    let admin = format!("http://{}", i.admin_addr);
    wait_ready(&stack.http, &admin, Duration::from_secs(30)).await;
    let get = |path: &str| {
        let req = stack.http.get(format!("{admin}{path}")).bearer_auth(ADMIN_TOKEN);
        let path = path.to_string();
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            r.text().await.unwrap()
        }
    };
    let map: Value = serde_json::from_str(&get("/admin/map").await).unwrap();
    assert_eq!(map["version"], 1, "{map}");
    let r = stack
        .http
        .post(format!("http://{}/v1/sql/core/query", i.data_addr))
        .bearer_auth(READ_TOKEN)
        .json(&json!({"region": {"lat": MADRID.0, "lng": MADRID.1}, "sql": "SELECT count(*) AS n FROM items"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a read through the instance on the etcd map");
    // Connected (a registration was written under its lease: the user may write the prefix).
    let t0 = std::time::Instant::now();
    let fleet: Value = loop {
        let f: Value = serde_json::from_str(&get("/admin/fleet").await).unwrap();
        if f["etcd"]["connected"] == true && f["registration"]["id"] == "i-tls" {
            break f;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "not connected and registered: {f}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (&fleet["tls"], &fleet["client_cert"], &fleet["user"]),
        (&json!(true), &json!(true), &json!(USER)),
        "{fleet}"
    );
    no_secret("/admin/fleet", &fleet.to_string());
    no_secret("/admin/map", &map.to_string());

    // 3. A push with --wait, the password from a file: the instance's watch (over TLS, as the
    //    user) applies it before the CLI returns; `fleet status` reads the registration.
    let map2 = stack.dir.join("etcd-map-2.toml");
    std::fs::write(&map2, map_toml(&stack.cluster, None).replacen("version = 1\n", "version = 2\n", 1)).unwrap();
    let pw_flag = pw_file.display().to_string();
    let (code, out, err) = cli(&push(&map2, &["--wait=10s", "--etcd-password-file", &pw_flag]), &[]).await;
    assert_eq!(code, 0, "push --wait over TLS with auth: {out} {err}");
    assert!(out.contains("\"applied\"") && out.contains("i-tls"), "{out}");
    let map: Value = serde_json::from_str(&get("/admin/map").await).unwrap();
    assert_eq!(map["version"], 2);
    let mut status: Vec<String> =
        ["fleet", "status", "--etcd", &etcd.url(), "--prefix", PREFIX].map(String::from).into();
    status.extend(tls_flags.iter().cloned());
    status.extend(["--etcd-password-file".to_string(), pw_flag.clone()]);
    let (code, out, err) = cli(&status, &[]).await;
    assert_eq!(code, 0, "fleet status: {out} {err}");
    assert!(out.contains("\"i-tls\""), "{out}");

    // 4. Refused, each with a reason and without the password. An instance never starts
    //    without a map, so each shows as its start error.
    let cases = [
        (
            "the wrong CA",
            access_line(&tls.other_ca, Some((&tls.client_cert, &tls.client_key)), Some(&pw_file)),
            &["UnknownIssuer", "certificate"][..],
        ),
        (
            "no client certificate",
            access_line(&tls.ca, None, Some(&pw_file)),
            &["etcd ended the TLS connection; with no client certificate: if etcd requires client certificates"][..],
        ),
        (
            "a client certificate from another CA",
            access_line(&tls.ca, Some((&tls.other_client_cert, &tls.other_client_key)), Some(&pw_file)),
            &["etcd ended the TLS connection; with the client certificate given", "certificate"][..],
        ),
        (
            "a wrong password",
            access_line(&tls.ca, Some((&tls.client_cert, &tls.client_key)), Some(&wrong_pw_file)),
            &["authentication failed"][..],
        ),
        (
            "no user (auth is on)",
            access_line(&tls.ca, Some((&tls.client_cert, &tls.client_key)), None),
            &["user name not found", "permission denied", "invalid auth token", "user name is empty"][..],
        ),
    ];
    for (what, access, reasons) in cases {
        let t0 = std::time::Instant::now();
        let err = match start_instance(&stack, &etcd_line(&etcd, "i-bad", &access)).await {
            Ok(r) => {
                r.shutdown().await;
                panic!("an instance with {what} started");
            }
            Err(e) => e,
        };
        eprintln!("{what}: refused in {:?}: {err}", t0.elapsed());
        let lower = err.to_lowercase();
        assert!(err.starts_with("map from etcd: etcd"), "{what}: {err}");
        assert!(reasons.iter().any(|r| lower.contains(&r.to_lowercase())), "{what}: no reason in {err}");
        no_secret(what, &err);
    }
    // The CLI with a wrong password: exit 1, the reason, no password.
    let wrong_flag = wrong_pw_file.display().to_string();
    let (code, out, err) = cli(&push(&map2, &["--etcd-password-file", &wrong_flag]), &[]).await;
    assert_eq!(code, 1, "{out} {err}");
    assert!(err.contains("authentication failed"), "{err}");
    no_secret("the CLI's error", &format!("{out}{err}"));
    // Plaintext to the HTTPS port is refused too (not silently downgraded): a TLS config with
    // an http:// URL is a config error, and a bare http:// client gets no map.
    let plain = format!("http://127.0.0.1:{}", etcd.client_port);
    let (code, _, err) = cli(
        &[
            "fleet".into(),
            "status".into(),
            "--etcd".into(),
            plain,
            "--prefix".into(),
            PREFIX.into(),
            "--etcd-timeout-ms".into(),
            "1000".into(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{err}");

    // 5. The password is in no log line.
    let logged = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    no_secret("the log", &logged);

    i.shutdown().await;
    stack.stop().await;
}
