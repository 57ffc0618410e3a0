//! Redis deployments of the tests' own, on 127.0.0.1: a cluster of masters and replicas made
//! with `redis-cli --cluster create`, and a server speaking TLS with certificates made here.
//! Where `redis-server` cannot run them, the test is skipped, loudly (or fails, with
//! `TOWER_QUOTA_REQUIRE_REDIS` set, as in CI).

#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::redis::redis_available;

/// Skips the calling test (saying why), or fails it where the Redis tests are required.
fn unavailable(why: &str) -> bool {
    assert!(
        std::env::var_os("TOWER_QUOTA_REQUIRE_REDIS").is_none(),
        "{why}, and TOWER_QUOTA_REQUIRE_REDIS requires the Redis tests"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("a Redis test")
        .to_owned();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

fn scratch_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("tower-quota-{what}-{nanos:x}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `port` accepts connections, or `child` has exited (`false`).
fn accepting(port: u16, child: &mut Child) -> bool {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis-server did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn query<T: redis::FromRedisValue>(port: u16, command: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut connection = client.get_connection_with_timeout(Duration::from_secs(1))?;
    command.query(&mut connection)
}

// ===== a cluster =====

pub(crate) struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<(u16, Option<Child>)>,
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each, every slot assigned and every replica
    /// in sync; `None` (skipped) where `redis-server` or `redis-cli` is missing.
    pub(crate) fn start(masters: usize, replicas: usize) -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let cli = Command::new("redis-cli")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !cli {
            unavailable("redis-cli is not installed (apt-get install redis-tools)");
            return None;
        }
        let dir = scratch_dir("cluster");
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
        };
        while cluster.nodes.len() < masters * (1 + replicas) {
            // A node's cluster bus listens on its port + 10000.
            let port = free_port();
            if port > 55_000
                || TcpListener::bind(("127.0.0.1", port + 10_000)).is_err()
                || cluster.nodes.iter().any(|(p, _)| *p == port)
            {
                continue;
            }
            let mut child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", "1000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server runs");
            if !accepting(port, &mut child) {
                continue; // the port was taken meanwhile
            }
            cluster.nodes.push((port, Some(child)));
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|(port, _)| format!("127.0.0.1:{port}")),
            )
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_until_whole(Duration::from_secs(30));
        Some(cluster)
    }

    /// The nodes' URLs, for `RedisStore::cluster`.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(port, _)| format!("redis://127.0.0.1:{port}/"))
            .collect()
    }

    fn live(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|(_, child)| child.is_some())
            .map(|(port, _)| *port)
    }

    /// Every slot's master, as a live node sees them: (first slot, last slot, port).
    fn masters(&self) -> Vec<(u16, u16, u16)> {
        for port in self.live() {
            let Ok(nodes) = query::<String>(port, redis::cmd("CLUSTER").arg("NODES")) else {
                continue;
            };
            let mut masters = Vec::new();
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split(' ').collect();
                if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                    continue;
                }
                let address = fields[1].split('@').next().unwrap();
                let master: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
                for range in &fields[8..] {
                    if range.starts_with('[') {
                        continue; // a slot being migrated
                    }
                    let (first, last) = range.split_once('-').unwrap_or((range, range));
                    masters.push((first.parse().unwrap(), last.parse().unwrap(), master));
                }
            }
            return masters;
        }
        Vec::new()
    }

    /// The port of the master serving `key`.
    pub(crate) fn master_of(&self, key: &str) -> u16 {
        let port = self.live().next().unwrap();
        let slot: u16 = query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).unwrap();
        self.masters()
            .into_iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, port)| port)
            .expect("every slot has a master")
    }

    /// The keys matching `pattern` on each live master: (port, key).
    pub(crate) fn keys_on_masters(&self, pattern: &str) -> Vec<(u16, String)> {
        let masters: BTreeSet<u16> = self
            .masters()
            .into_iter()
            .map(|(_, _, port)| port)
            .collect();
        let mut keys = Vec::new();
        for port in masters {
            let held: Vec<String> = query(port, redis::cmd("KEYS").arg(pattern)).unwrap();
            keys.extend(held.into_iter().map(|key| (port, key)));
        }
        keys
    }

    /// Every master's port.
    pub(crate) fn master_ports(&self) -> Vec<u16> {
        let masters: BTreeSet<u16> = self
            .masters()
            .into_iter()
            .map(|(_, _, port)| port)
            .collect();
        masters.into_iter().collect()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the node on `port`: a hung node, its socket open.
    pub(crate) fn signal(&self, port: u16, stop: bool) {
        let (_, child) = self.nodes.iter().find(|(p, _)| *p == port).unwrap();
        let pid = child.as_ref().expect("a live node").id();
        let status = Command::new("kill")
            .arg(if stop { "-STOP" } else { "-CONT" })
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kills the node on `port` (SIGKILL: no goodbye to the cluster).
    pub(crate) fn kill(&mut self, port: u16) {
        let (_, child) = self.nodes.iter_mut().find(|(p, _)| *p == port).unwrap();
        let mut child = child.take().expect("a live node");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Whether every live node says the cluster is whole, and every live replica is in sync.
    fn whole(&self) -> bool {
        self.live().all(|port| {
            let Ok(info) = query::<String>(port, redis::cmd("CLUSTER").arg("INFO")) else {
                return false;
            };
            let Ok(replication) = query::<String>(port, redis::cmd("INFO").arg("replication"))
            else {
                return false;
            };
            info.contains("cluster_state:ok")
                && info.contains("cluster_slots_ok:16384")
                && (replication.contains("role:master")
                    || replication.contains("master_link_status:up"))
        })
    }

    /// Waits until the cluster is whole again; how long that took.
    pub(crate) fn wait_until_whole(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        while !self.whole() {
            assert!(
                started.elapsed() < limit,
                "the cluster was not whole within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ===== a server speaking TLS =====

#[cfg(feature = "redis-tls")]
/// PEM certificates made for one test: a CA, the server's (for 127.0.0.1 and localhost) and a
/// client's, both signed by the CA.
pub(crate) struct Certificates {
    pub(crate) ca: String,
    pub(crate) server: (String, String),
    pub(crate) client: (String, String),
}

#[cfg(feature = "redis-tls")]
impl Certificates {
    pub(crate) fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        // Each with a name of its own: OpenSSL takes a certificate named as its issuer for a
        // self-signed one.
        let named = |names: Vec<String>, common_name: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = named(Vec::new(), "tower-quota test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let signed = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let common_name = names[0].clone();
            let certificate = named(names, &common_name)
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            (certificate.pem(), key.serialize_pem())
        };
        Self {
            ca: ca.pem(),
            server: signed(vec!["127.0.0.1".into(), "localhost".into()]),
            client: signed(vec!["tower-quota-test-client".into()]),
        }
    }
}

#[cfg(feature = "redis-tls")]
pub(crate) struct TlsRedis {
    pub(crate) port: u16,
    pub(crate) certificates: Certificates,
    child: Child,
    dir: PathBuf,
}

#[cfg(feature = "redis-tls")]
impl TlsRedis {
    /// A server answering only TLS, on certificates made now, asking for `password`, and for
    /// a client certificate if `client_certificates`; `None` (skipped) where `redis-server`
    /// is missing or was built without TLS.
    pub(crate) fn start(password: &str, client_certificates: bool) -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let certificates = Certificates::generate();
        let dir = scratch_dir("tls");
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca = write("ca.pem", &certificates.ca);
        let cert = write("server.pem", &certificates.server.0);
        let key = write("server.key", &certificates.server.1);
        let log = dir.join("redis.log");
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", "0"])
                .args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&ca)
                .args([
                    "--tls-auth-clients",
                    if client_certificates { "yes" } else { "no" },
                ])
                .args(["--requirepass", password])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs");
            if accepting(port, &mut child) {
                return Some(Self {
                    port,
                    certificates,
                    child,
                    dir,
                });
            }
        }
        // It exited each time: this build has no TLS, or something else is wrong.
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.contains("TLS") || said.contains("tls") {
            unavailable("this redis-server cannot serve TLS");
            return None;
        }
        panic!("redis-server with TLS did not start: {said}");
    }

    pub(crate) fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }
}

#[cfg(feature = "redis-tls")]
impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
