//! Integration tests of the cluster harness against the real PostgreSQL on this machine: they
//! FAIL (never skip) when PostgreSQL is missing. Touch only the clusters they start.

mod support;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellgate_harness::{Cluster, ClusterSpec, Node, Role};
use support::{alive, poll, processes_mentioning};

fn start(spec: ClusterSpec) -> Cluster {
    Cluster::start(spec).unwrap_or_else(|e| panic!("could not start the test cluster: {e}"))
}

/// Waits until `node` has row `id` with `name` in table `items` of db `core`.
fn wait_for_row(node: &Node, id: i32, name: &str) {
    let sql = format!("SELECT name FROM items WHERE id = {id}");
    poll(&format!("row {id} on {}", node.name), Duration::from_secs(30), || match node.psql("core", &sql) {
        Ok(v) if v == name => Some(()),
        _ => None,
    });
}

#[test]
fn one_shard_one_replica_replicates_survives_crashes_and_cleans_up() {
    let t0 = Instant::now();
    let cluster = start(ClusterSpec::default());
    eprintln!("1x1 cluster started in {:?}", t0.elapsed());
    let root = cluster.root_dir().to_path_buf();
    assert!(root.is_dir());
    assert_eq!(cluster.shards.len(), 1);
    let shard = &cluster.shards[0];
    assert_eq!(shard.index, 0);
    assert_eq!(shard.replicas.len(), 1);
    let (primary, replica) = (&shard.primary, &shard.replicas[0]);
    assert_eq!(primary.role, Role::Primary);
    assert_eq!(replica.role, Role::Replica);
    assert_ne!(primary.port, replica.port);
    assert_eq!(primary.app_url("core"), format!("postgres://app:app-password@127.0.0.1:{}/core", primary.port));

    assert_eq!(primary.psql("core", "SELECT pg_is_in_recovery()").unwrap(), "f");
    assert_eq!(replica.psql("core", "SELECT pg_is_in_recovery()").unwrap(), "t");

    // The app role logs in with its password and owns the database.
    assert_eq!(primary.psql_as("app", "app-password", "core", "SELECT current_user").unwrap(), "app");
    assert_eq!(
        primary.psql("core", "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'core'").unwrap(),
        "app"
    );
    // Wrong password is rejected (SCRAM over TCP, not trust).
    let err = primary.psql_as("app", "wrong", "core", "SELECT 1").unwrap_err();
    assert!(err.to_string().contains("password authentication failed"), "{err}");

    primary
        .psql_as(
            "app",
            "app-password",
            "core",
            "CREATE TABLE items (id int PRIMARY KEY, name text);\n\
             INSERT INTO items VALUES (1, 'one');",
        )
        .unwrap();
    wait_for_row(replica, 1, "one");

    // A replica is read-only, and psql errors carry the server's message and the node name.
    let err = replica.psql("core", "INSERT INTO items VALUES (99, 'no')").unwrap_err().to_string();
    assert!(err.contains("read-only transaction"), "{err}");
    assert!(err.contains("shard0-replica0"), "{err}");

    // Crash the replica, write meanwhile, restart it on the same port: it catches up.
    let replica_pid = replica.pid().expect("replica running");
    let port = replica.port;
    replica.kill().unwrap();
    assert!(!alive(replica_pid));
    assert_eq!(replica.pid(), None);
    primary.psql("core", "INSERT INTO items VALUES (2, 'two')").unwrap();
    replica.start().unwrap();
    assert_eq!(replica.port, port);
    assert!(replica.pid().is_some_and(|p| p != replica_pid));
    shard.wait_for_replicas(Duration::from_secs(30)).unwrap();
    wait_for_row(replica, 2, "two");

    // Restart the primary (fast stop): the replica reconnects and keeps replicating.
    primary.stop().unwrap();
    assert_eq!(primary.pid(), None);
    primary.start().unwrap();
    primary.psql("core", "INSERT INTO items VALUES (3, 'three')").unwrap();
    wait_for_row(replica, 3, "three");
    shard.wait_for_replicas(Duration::from_secs(30)).unwrap();

    // Crash the primary (crash recovery on restart): same.
    primary.kill().unwrap();
    primary.start().unwrap();
    primary.psql("core", "INSERT INTO items VALUES (4, 'four')").unwrap();
    wait_for_row(replica, 4, "four");
    assert!(primary.log_tail(5).lines().count() <= 5);
    assert!(!primary.log_tail(50).is_empty());

    let pids: Vec<u32> = cluster.nodes().filter_map(|n| n.pid()).collect();
    assert_eq!(pids.len(), 2);
    drop(cluster);
    assert!(!root.exists(), "{} still exists after drop", root.display());
    for pid in pids {
        assert!(!alive(pid), "postmaster {pid} survived drop");
    }
    assert!(processes_mentioning(&root.display().to_string()).is_empty());
}

#[test]
fn drop_during_panic_cleans_up() {
    let seen: Mutex<Option<(PathBuf, Vec<u32>)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let cluster = start(ClusterSpec::default());
        let pids = cluster.nodes().filter_map(|n| n.pid()).collect();
        *seen.lock().unwrap() = Some((cluster.root_dir().to_path_buf(), pids));
        panic!("deliberate panic with a live cluster");
    });
    assert!(result.is_err());
    let (root, pids) = seen.lock().unwrap().take().expect("cluster was started");
    assert_eq!(pids.len(), 2);
    assert!(!root.exists(), "{} still exists", root.display());
    for pid in pids {
        assert!(!alive(pid), "postmaster {pid} survived the panic");
    }
    assert!(processes_mentioning(&root.display().to_string()).is_empty());
}

#[test]
fn graceful_stop_multiple_shards_and_databases() {
    let spec = ClusterSpec {
        shards: 2,
        replicas_per_shard: 0,
        databases: vec!["core".into(), "other db".into()],
        extra_conf: vec![("work_mem".into(), "8MB".into())],
        ..ClusterSpec::default()
    };
    let cluster = start(spec);
    let root = cluster.root_dir().to_path_buf();
    assert_eq!(cluster.shards.len(), 2);
    for shard in &cluster.shards {
        assert!(shard.replicas.is_empty());
        let p = &shard.primary;
        assert_eq!(p.psql("other db", "SHOW work_mem").unwrap(), "8MB");
        assert_eq!(p.psql("core", "SHOW fsync").unwrap(), "off");
        assert_eq!(p.psql("core", "SHOW wal_level").unwrap(), "logical");
        assert!(p.app_url("other db").ends_with("/other%20db"));
    }
    assert_ne!(cluster.shards[0].primary.port, cluster.shards[1].primary.port);
    let pids: Vec<u32> = cluster.nodes().filter_map(|n| n.pid()).collect();
    cluster.stop().unwrap();
    assert!(!root.exists());
    for pid in pids {
        assert!(!alive(pid));
    }
}

#[test]
fn failed_start_reports_the_node_log_and_cleans_up() {
    let spec = ClusterSpec {
        replicas_per_shard: 0,
        extra_conf: vec![("shared_buffers".into(), "banana".into())],
        ..ClusterSpec::default()
    };
    let err = Cluster::start(spec).expect_err("an invalid setting must fail the start").to_string();
    assert!(err.contains("shard0-primary"), "{err}");
    assert!(err.contains(r#"invalid value for parameter "shared_buffers""#), "{err}");
    // The log tail names the config file inside the (now removed) cluster root.
    let start = err.find("configuration file \"").expect("log tail in error") + "configuration file \"".len();
    let path = &err[start..];
    let root = PathBuf::from(&path[..path.find("/shard0-primary").expect("node path")]);
    assert!(root.is_absolute(), "{}", root.display());
    assert!(!root.exists(), "{} left behind", root.display());
}
