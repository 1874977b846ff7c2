//! A real etcd for the fleet-mode tests (tests/etcd.rs, tests/etcd_migrate.rs, tests/etcd_tls.rs):
//! started on free loopback ports with its own data directory, plaintext or HTTPS with required
//! client certificates from a test CA (rcgen), optionally with etcd's auth enabled; killed by PID
//! (and the directory removed) when dropped; fails with a clear message when the `etcd` binary
//! is missing. Also the TCP forwarder through which an instance can be cut off from it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellgate::config::EtcdAccess;
use cellgate::etcd::Target;

/// A real etcd on free loopback ports, killed by PID when dropped (its data directory removed).
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
    /// HTTPS mode: the files, and the root credentials once auth is enabled.
    pub tls: Option<EtcdTls>,
    root: Option<(String, String)>,
}

/// A test CA, etcd's server certificate (localhost and 127.0.0.1) and a client certificate it
/// accepts, as PEM files; plus a second CA and a client certificate from it, which etcd refuses.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

impl EtcdTls {
    fn generate(dir: &std::path::Path) -> EtcdTls {
        std::fs::create_dir_all(dir).unwrap();
        let ca = |name: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            (cert.pem(), rcgen::Issuer::new(p, key))
        };
        let leaf = |issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, cn: &str, server: bool| {
            let names = if server { vec!["localhost".to_string(), "127.0.0.1".to_string()] } else { vec![] };
            let mut p = rcgen::CertificateParams::new(names).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.extended_key_usages = if server {
                vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth]
            } else {
                vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
            };
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (ca_pem, issuer) = ca("etcd test CA");
        let (other_pem, other) = ca("another CA");
        let (server_cert, server_key) = leaf(&issuer, "etcd", true);
        // The CN is no etcd user: with --client-cert-auth etcd would take a user's CN as its login.
        let (client_cert, client_key) = leaf(&issuer, "cellgate-client", false);
        let (other_cert, other_key) = leaf(&other, "cellgate-client", false);
        EtcdTls {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &other_pem),
            other_client_cert: write("other-client.pem", &other_cert),
            other_client_key: write("other-client.key", &other_key),
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_mode(false)
    }

    /// HTTPS only, client certificates required (`--client-cert-auth`) and checked against the
    /// test CA in [`Etcd::tls`].
    pub fn start_tls() -> Etcd {
        Self::start_mode(true)
    }

    fn start_mode(tls: bool) -> Etcd {
        let dir = std::env::temp_dir().join(format!("cellgate-etcd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.then(|| EtcdTls::generate(&dir.join("tls")));
        let mut e = Etcd { child: None, dir, client_port: free_port(), peer_port: free_port(), tls, root: None };
        e.spawn();
        e
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The right CA and client certificate (HTTPS mode), no user.
    pub fn access(&self) -> EtcdAccess {
        match &self.tls {
            None => EtcdAccess::default(),
            Some(t) => EtcdAccess {
                ca: Some(t.ca.clone()),
                cert: Some(t.client_cert.clone()),
                key: Some(t.client_key.clone()),
                ..Default::default()
            },
        }
    }

    /// What the test itself uses: [`Etcd::access`] as root once auth is enabled.
    fn admin_access(&self) -> EtcdAccess {
        let mut a = self.access();
        if let Some((u, p)) = &self.root {
            (a.user, a.password) = (Some(u.clone()), Some(p.clone()));
        }
        a
    }

    pub fn target(&self, prefix: &str) -> Target {
        Target {
            endpoints: vec![self.url()],
            prefix: prefix.into(),
            timeout: Duration::from_secs(2),
            access: self.admin_access(),
        }
    }

    /// A client as the test's administrator (root once auth is on).
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], Some(options(&self.admin_access()))).await.unwrap()
    }

    /// Turn etcd's auth on: `root` (role root) and `user`, whose role may read and write the keys
    /// under `prefix` and nothing else. From then on the test's own calls log in as root.
    pub async fn enable_auth(&mut self, root_password: &str, user: &str, password: &str, prefix: &str) {
        let mut c = self.client().await;
        c.user_add("root", root_password, None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        let role = format!("{user}-role");
        c.role_add(&role).await.unwrap();
        c.role_grant_permission(&role, etcd_client::Permission::read_write(prefix).with_prefix()).await.unwrap();
        c.user_add(user, password, None).await.unwrap();
        c.user_grant_role(user, &role).await.unwrap();
        c.auth_enable().await.unwrap();
        self.root = Some(("root".into(), root_password.into()));
    }

    /// Start the process (again, on the same data and ports) and wait until it answers.
    pub fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url(), "--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")]);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
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
                let c = etcd_client::Client::connect([self.url()], Some(options(&self.admin_access()))).await;
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
        let mut c = self.client().await;
        c.put(key, value, None).await.unwrap();
    }
}

/// A TCP forwarder to etcd that the test can stop (every connection cut at once) and start again
/// on the same port: an instance behind it loses etcd as in a network partition.
pub struct Forwarder {
    pub port: u16,
    to: u16,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Forwarder {
    pub async fn start(to: u16) -> Forwarder {
        let f = Forwarder { port: free_port(), to, tasks: Arc::default() };
        f.listen().await;
        f
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn listen(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let (to, tasks) = (self.to, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Stop accepting and drop every open connection.
    pub fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Client options for `access` (what cellgate builds from the same settings, spelled out here
/// so the test does not depend on the code it checks).
fn options(access: &EtcdAccess) -> etcd_client::ConnectOptions {
    let mut o = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    if let Some(ca) = &access.ca {
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(ca).unwrap()));
        if let (Some(c), Some(k)) = (&access.cert, &access.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(std::fs::read(c).unwrap(), std::fs::read(k).unwrap()));
        }
        o = o.with_tls(tls);
    }
    if let (Some(u), Some(p)) = (&access.user, &access.password) {
        o = o.with_user(u.clone(), p.clone());
    }
    o
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
