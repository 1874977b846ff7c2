//! The `cellgate` binary as an operator uses it: map check / diff / locate.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

use std::process::Command;

fn cellgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cellgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn shipped_maps_check_clean() {
    let maps: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shard-maps"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".toml"))
        .collect();
    assert!(maps.len() >= 2);
    let args: Vec<&str> = ["map", "check"].into_iter().chain(maps.iter().map(String::as_str)).collect();
    let (code, out, err) = cellgate(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(": ok").count(), maps.len(), "{out}");
}

#[test]
fn three_mistakes_are_all_reported_with_lines() {
    let (code, out, err) = cellgate(&["map", "check", "tests/fixtures/maps/three-mistakes.toml"]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].contains(":12: unknown shard id \"eu-9\""), "{err}");
    assert!(lines[1].contains(":17: cell 8a390cb1a4dffff"), "{err}");
    assert!(lines[2].contains(":17: invalid H3 cell \"not-a-cell\""), "{err}");
    assert!(!err.contains("canary-secret"));
}

#[test]
fn locate_json_shapes() {
    let (code, out, err) =
        cellgate(&["locate", "--map", "shard-maps/demo.toml", "--lat", "40.4168", "--lng", "-3.7038", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cell"], "85390cb3fffffff");
    assert_eq!(v["resolution"], 5);
    assert_eq!(v["shard"], "eu-1");
    assert_eq!(v["rule"], "assign:8039fffffffffff");
    assert_eq!(v["point_cell"], "8f390cb1b091a9b");

    let (code, out, _) = cellgate(&["locate", "--map", "shard-maps/demo.toml", "--cell", "8a390cb1a4dffff", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cell"], "85390cb3fffffff");
    assert!(v.get("point_cell").is_none());

    let (code, out, _) = cellgate(&[
        "locate",
        "--map",
        "shard-maps/demo.toml",
        "--lat",
        "48.85",
        "--lng",
        "2.35",
        "--radius-km",
        "25",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["cells"].as_u64().unwrap() > 7);
    assert_eq!(v["shards"], serde_json::json!(["eu-1"]));

    let (code, _, err) = cellgate(&["locate", "--map", "shard-maps/demo.toml", "--lat", "91", "--lng", "0", "--json"]);
    assert_eq!(code, 2);
    assert!(err.contains("lat must be within"), "{err}");
}

#[test]
fn reject_map_prints_null_shard() {
    let (code, out, err) =
        cellgate(&["locate", "--map", "shard-maps/continents.toml", "--lat", "0", "--lng", "-140", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["shard"].is_string(), "continents assigns all 122 base cells: {v}");
}

/// `cellgate locate --json` agrees with Uber's h3 (4.5.0) on the cell of every golden point.
#[test]
fn locate_agrees_with_uber_h3_on_every_golden_point() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/cities_golden.csv")).unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let mut n = 0;
    for rec in rdr.records() {
        let rec = rec.unwrap();
        let (lat, lng, cell15, parent5) = (&rec[3], &rec[4], &rec[5], &rec[9]);
        let (code, out, err) =
            cellgate(&["locate", "--map", "shard-maps/demo.toml", "--lat", lat, "--lng", lng, "--json"]);
        assert_eq!(code, 0, "{lat} {lng}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["point_cell"], cell15, "{lat} {lng}");
        assert_eq!(v["cell"], parent5, "{lat} {lng}");
        n += 1;
    }
    assert!(n >= 1000);
}

#[test]
fn diff_reports_moves() {
    let dir = std::env::temp_dir().join(format!("cellgate-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = "version = 1\nresolution = 5\n[[shards]]\nid = \"a\"\n[[shards]]\nid = \"b\"\n";
    let old = format!("{base}[[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n");
    let new = format!(
        "{base}[[assign]]\nshard = \"a\"\ncells = [\"8039fffffffffff\"]\n[[assign]]\nshard = \"b\"\ncells = [\"82390ffffffffff\", \"85380003fffffff\"]\n"
    );
    std::fs::write(dir.join("old.toml"), old).unwrap();
    std::fs::write(dir.join("new.toml"), new).unwrap();
    let (code, out, err) =
        cellgate(&["map", "diff", dir.join("old.toml").to_str().unwrap(), dir.join("new.toml").to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "{err}");
    // 82390f.. at res 2 holds 7^3 = 343 cells at res 5, plus one more cell.
    assert!(out.contains("a -> b: 344 cells at resolution 5 (2 compacted)"), "{out}");
    assert!(out.contains("82390ffffffffff (res 2)"), "{out}");
}
