//! A Redis server for the benches that need one: the one `TOWER_QUOTA_REDIS_URL` names, or
//! one started from `redis-server` on the `PATH` on a free port of 127.0.0.1.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A Redis server for the bench, stopped when dropped.
pub(crate) struct Server(Option<Child>, pub(crate) String);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn redis() -> Option<Server> {
    if let Ok(url) = std::env::var("TOWER_QUOTA_REDIS_URL") {
        return Some(Server(None, url));
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server(Some(child), format!("redis://127.0.0.1:{port}/"));
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}
