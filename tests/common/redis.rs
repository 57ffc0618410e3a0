//! A `redis-server` of a test's own, on a free port of 127.0.0.1, that the test can stop and
//! start again; or the shared one `TOWER_QUOTA_REDIS_URL` names (CI starts it).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct RedisServer {
    port: u16,
    child: Option<Child>,
}

/// Whether `redis-server` can be run here. Where it cannot, the test calling this is skipped,
/// and says so on the terminal (past the test harness's capture); with
/// `TOWER_QUOTA_REQUIRE_REDIS` set (CI sets it) the test fails instead.
pub(crate) fn redis_available() -> bool {
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if installed {
        return true;
    }
    assert!(
        std::env::var_os("TOWER_QUOTA_REQUIRE_REDIS").is_none(),
        "redis-server is not installed, and TOWER_QUOTA_REQUIRE_REDIS requires the Redis tests"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("a Redis test")
        .to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: redis-server is not installed (apt-get install redis-server)"
    );
    false
}

impl RedisServer {
    /// A server of the test's own, or `None` (the test is skipped) without `redis-server`.
    pub(crate) fn start() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self { port, child: None };
        server.restart();
        Some(server)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts (again) on the same port, with no data, and waits until it accepts connections.
    pub(crate) fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared server CI starts, or one of the test's own; `None` (the test is skipped)
/// without either.
pub(crate) fn shared_redis() -> Option<(String, Option<RedisServer>)> {
    match std::env::var("TOWER_QUOTA_REDIS_URL") {
        Ok(url) => Some((url, None)),
        Err(_) => {
            let server = RedisServer::start()?;
            Some((server.url(), Some(server)))
        }
    }
}

/// A prefix no other test (or earlier run) uses.
pub(crate) fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test:{test}:{nanos:x}")
}
