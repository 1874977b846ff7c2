//! A real etcd for the fleet-mode tests (tests/etcd.rs, tests/etcd_migrate.rs): started on free
//! loopback ports with its own data directory, killed by PID (and the directory removed) when
//! dropped; fails with a clear message when the `etcd` binary is missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellgate::etcd::Target;

/// A real etcd on free loopback ports, killed by PID when dropped (its data directory removed).
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!("cellgate-etcd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut e = Etcd { child: None, dir, client_port: free_port(), peer_port: free_port() };
        e.spawn();
        e
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn target(&self, prefix: &str) -> Target {
        Target { endpoints: vec![self.url()], prefix: prefix.into(), timeout: Duration::from_secs(2) }
    }

    /// Start the process (again, on the same data and ports) and wait until it answers.
    pub fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url(), "--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("etcd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `etcd` ({e}): install it (apt-get install etcd-server etcd-client; bash scripts/test.sh does)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        loop {
            let up = rt.block_on(async {
                let c = etcd_client::Client::connect([self.url()], None).await;
                match c {
                    Ok(mut c) => tokio::time::timeout(Duration::from_millis(500), c.get("/probe", None))
                        .await
                        .is_ok_and(|r| r.is_ok()),
                    Err(_) => false,
                }
            });
            if up {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                panic!("etcd exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "etcd did not answer within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill the process (SIGKILL, by PID) and wait for it: a crash, not a clean stop.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Write a value straight into etcd, past every check `cellgate map push` makes.
    pub async fn put_raw(&self, key: &str, value: &str) {
        let mut c = etcd_client::Client::connect([self.url()], None).await.unwrap();
        c.put(key, value, None).await.unwrap();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
