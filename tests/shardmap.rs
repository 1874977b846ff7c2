//! Shard-map compilation: every validation rule of design §2, each reported with its line.
#![allow(clippy::unwrap_used)] // tests, benches and examples may unwrap: a panic is the failure report

use cellgate::shardmap::{MapErrorKind, parse_and_compile};

fn env(name: &str) -> Option<String> {
    match name {
        "PW" => Some("canary-pw-123".into()),
        _ => None,
    }
}

const HEADER: &str = "version = 3\nresolution = 5\n";

fn shard(id: &str) -> String {
    format!(
        "[[shards]]\nid = \"{id}\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  primary = \"postgres://app:${{PW}}@127.0.0.1:5432/core\"\n"
    )
}

fn errors(src: &str) -> Vec<(Option<usize>, MapErrorKind)> {
    match parse_and_compile(src, env) {
        Ok(_) => vec![],
        Err(e) => e.0.into_iter().map(|e| (e.line, e.kind)).collect(),
    }
}

#[test]
fn a_valid_map_compiles() {
    let src = format!(
        "{HEADER}{}{}[[assign]]\nshard = \"eu-1\"\ncells = [\"8039fffffffffff\", \"85390cb3fffffff\"]\n[fallback]\nmode = \"hash\"\nshards = [\"eu-1\", \"am-1\"]\nresolution = 2\n[tables.core.musicians]\ncell_column = \"h3\"\n",
        shard("eu-1"),
        shard("am-1")
    );
    let m = parse_and_compile(&src, env).expect("valid");
    assert_eq!(m.tables()["core"]["musicians"].cache, None);
    let with_policy = src.replace("cell_column = \"h3\"\n", "cell_column = \"h3\"\ncache = { ttl_ms = 30000 }\n");
    let p = parse_and_compile(&with_policy, env).expect("valid with a cache policy");
    assert_eq!(
        p.tables()["core"]["musicians"].cache,
        Some(cellgate::shardmap::CachePolicy { ttl_ms: 30000, swr_ms: 0 })
    );
    assert_eq!(m.version().0, 3);
    assert_eq!(m.shards().len(), 2);
    assert_eq!(m.assigned_count(), 2);
    // Secrets are expanded but never printed.
    let dbg = format!("{m:?}");
    assert!(!dbg.contains("canary-pw-123"), "{dbg}");
    assert!(!serde_json::to_string(&m.shards()).unwrap().contains("canary-pw-123"));
}

#[test]
fn every_rule_is_reported_with_its_line() {
    // (source, expected (line, predicate) list)
    type Check = fn(&MapErrorKind) -> bool;
    let cases: Vec<(String, Vec<(usize, Check)>)> = vec![
        (
            format!("{HEADER}{}{}", shard("eu-1"), shard("eu-1")),
            vec![(9, |k| matches!(k, MapErrorKind::DuplicateShard { id, first_line: 4 } if id == "eu-1"))],
        ),
        (
            format!("{HEADER}{}[[assign]]\nshard = \"nope\"\ncells = [\"8039fffffffffff\"]\n", shard("eu-1")),
            vec![(9, |k| matches!(k, MapErrorKind::UnknownShard { id, .. } if id == "nope"))],
        ),
        (
            format!(
                "{HEADER}{}[[assign]]\nshard = \"eu-1\"\ncells = [\n\"zz\",\n\"ffffffffffffffff\"]\n",
                shard("eu-1")
            ),
            vec![
                (11, |k| matches!(k, MapErrorKind::InvalidCell { cell, .. } if cell == "zz")),
                (12, |k| matches!(k, MapErrorKind::InvalidCell { .. })),
            ],
        ),
        (
            format!("{HEADER}{}[[assign]]\nshard = \"eu-1\"\ncells = [\"8a390cb1a4dffff\"]\n", shard("eu-1")),
            vec![(10, |k| matches!(k, MapErrorKind::CellTooFine { cell_res: 10, resolution: 5, .. }))],
        ),
        (
            format!(
                "{HEADER}{}{}[[assign]]\nshard = \"eu-1\"\ncells = [\"8039fffffffffff\"]\n[[assign]]\nshard = \"am-1\"\ncells = [\"8039fffffffffff\"]\n",
                shard("eu-1"),
                shard("am-1")
            ),
            vec![(18, |k| matches!(k, MapErrorKind::CellAssignedTwice { first_line: 15, .. }))],
        ),
        (
            format!(
                "{HEADER}{}[fallback]\nmode = \"hash\"\nshards = [\"eu-1\", \"ghost\"]\nresolution = 2\n",
                shard("eu-1")
            ),
            vec![(10, |k| matches!(k, MapErrorKind::UnknownShard { id, .. } if id == "ghost"))],
        ),
        (
            format!("{HEADER}{}[fallback]\nmode = \"hash\"\nshards = [\"eu-1\"]\nresolution = 6\n", shard("eu-1")),
            vec![(11, |k| matches!(k, MapErrorKind::BadFallback(m) if m.contains("finer")))],
        ),
        (
            format!("{HEADER}{}[fallback]\nmode = \"random\"\n", shard("eu-1")),
            vec![(9, |k| matches!(k, MapErrorKind::BadFallbackMode(m) if m == "random"))],
        ),
        (
            format!(
                "{HEADER}{}[[shards]]\nid = \"am-1\"\n  [shards.databases.core]\n  kind = \"mongodb\"\n  uri = \"mongodb://127.0.0.1:27017/\"\n",
                shard("eu-1")
            ),
            vec![(10, |k| matches!(k, MapErrorKind::KindMismatch { db, .. } if db == "core"))],
        ),
        (
            format!("{HEADER}{}[tables.profiles.reviews]\ncell_column = \"h3\"\n", shard("eu-1")),
            vec![(8, |k| matches!(k, MapErrorKind::TableUnknownDatabase { db, .. } if db == "profiles"))],
        ),
        (
            format!(
                "{HEADER}{}[tables.core.musicians]\ncell_column = \"h3\"\ncache = {{ ttl_ms = 0, swr_ms = 5 }}\n[tables.core.gigs]\ncell_column = \"h3\"\ncache = {{ ttl_ms = 10, swr_ms = -1 }}\n",
                shard("eu-1")
            ),
            vec![
                (
                    8,
                    |k| matches!(k, MapErrorKind::BadTable { table, problem, .. } if table == "musicians" && problem.contains("ttl_ms")),
                ),
                (
                    11,
                    |k| matches!(k, MapErrorKind::BadTable { table, problem, .. } if table == "gigs" && problem.contains("swr_ms")),
                ),
            ],
        ),
        (
            format!("{HEADER}{}[tables.core.musicians]\ncell_column = \"h3\"\ncache = {{ ttl = 5 }}\n", shard("eu-1")),
            vec![(10, |k| matches!(k, MapErrorKind::Syntax(m) if m.contains("ttl")))],
        ),
        (
            format!(
                "{HEADER}[[shards]]\nid = \"eu-1\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  primary = \"postgres://app:${{MISSING_VAR}}@h/core\"\n"
            ),
            vec![(7, |k| matches!(k, MapErrorKind::Env { .. }))],
        ),
        (
            "version = 0\nresolution = 16\n".to_string(),
            vec![
                (1, |k| matches!(k, MapErrorKind::BadVersion(0))),
                (2, |k| matches!(k, MapErrorKind::BadResolution(16))),
            ],
        ),
        (
            format!(
                "{HEADER}{}[[assign]]\nshard = \"eu-1\"\ncells = [\"8039fffffffffff\"]\nbogus = 1\n",
                shard("eu-1")
            ),
            vec![(11, |k| matches!(k, MapErrorKind::Syntax(m) if m.contains("bogus")))],
        ),
    ];
    for (src, want) in cases {
        let got = errors(&src);
        assert_eq!(got.len(), want.len(), "source:\n{src}\ngot: {got:?}");
        for ((line, kind), (want_line, pred)) in got.iter().zip(want.iter()) {
            assert_eq!(*line, Some(*want_line), "source:\n{src}\ngot: {kind:?}");
            assert!(pred(kind), "source:\n{src}\nunexpected error: {kind:?}");
        }
    }
}

#[test]
fn errors_never_contain_connection_strings() {
    let src = format!(
        "{HEADER}[[shards]]\nid = \"eu-1\"\n  [shards.databases.core]\n  kind = \"postgres\"\n  primary = \"mysql://app:canary-pw-123@h/core\"\n  replicas = [\"postgres://app:${{PW}}@h/core\", \"oops://canary-pw-123\"]\n"
    );
    let e = parse_and_compile(&src, env).unwrap_err();
    let text = e.to_string();
    assert_eq!(e.0.len(), 2, "{text}");
    assert!(!text.contains("canary-pw-123"), "{text}");
}

#[test]
fn collects_all_errors_in_one_pass() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/maps/three-mistakes.toml"))
        .unwrap();
    let e = parse_and_compile(&src, env).unwrap_err();
    assert_eq!(e.0.len(), 3, "{e}");
    assert!(!e.to_string().contains("canary-secret"));
}

#[test]
fn allow_server_js_is_a_mongodb_option_equal_on_every_shard() {
    let mongo = |id: &str, extra: &str| {
        format!(
            "[[shards]]\nid = \"{id}\"\n  [shards.databases.profiles]\n  kind = \"mongodb\"\n  uri = \"mongodb://127.0.0.1:1/\"\n{extra}"
        )
    };
    let on = "  allow_server_js = true\n";
    let m = parse_and_compile(&format!("{HEADER}{}{}", mongo("a", on), mongo("b", on)), env).expect("valid");
    assert!(m.allows_server_js("profiles"));
    let m = parse_and_compile(&format!("{HEADER}{}{}", mongo("a", ""), mongo("b", "  allow_server_js = false\n")), env)
        .expect("valid");
    assert!(!m.allows_server_js("profiles"), "off by default");
    // Different on two shards: refused at the second shard's database table (line 11).
    let errs = errors(&format!("{HEADER}{}{}", mongo("a", on), mongo("b", "")));
    assert!(
        matches!(&errs[..], [(Some(11), MapErrorKind::BadDatabase { shard, problem, .. })]
            if shard == "b" && problem.contains("same on every shard")),
        "{errs:?}"
    );
    // Not a SQL option.
    let errs = errors(&format!("{HEADER}{}", shard("eu-1") + on));
    assert!(
        matches!(&errs[..], [(_, MapErrorKind::BadDatabase { problem, .. })] if problem.contains("mongodb databases only")),
        "{errs:?}"
    );
}
