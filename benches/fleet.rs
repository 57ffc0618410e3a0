//! A fleet sharing one quota through Redis: three processes in client mode, each sending as
//! fast as `RateLimitByRoute` lets it, share `Quota::per_second(2_000)` on one route through
//! one `RedisStore`. Reports the requests per second the fleet sent, as a share of the 2,000
//! the quota allows, and the most sent in any one-second window (never more than 2,000).
//!
//! The API answers at once (a service in each process), so the figures are the store's:
//! each request takes its place in one round trip on its path, and gives it back in the
//! background once answered.
//!
//! `cargo bench --bench fleet --features redis`. Needs `redis-server` on the `PATH` (started
//! here on a free port) or `TOWER_QUOTA_REDIS_URL`. `TOWER_QUOTA_FLEET_SECONDS` (default 10)
//! and `TOWER_QUOTA_FLEET_TASKS` (requests in flight per process, default 32).

#![allow(missing_docs)]

use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, Response};
use tower::{service_fn, Layer, ServiceExt};
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{Quota, RateLimitByRoute};

mod redis_server;

const PROCESSES: usize = 3;
const RATE: u32 = 2_000;

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One process of the fleet: sends from `tasks` tasks from `start` (wall clock, µs) for
/// `seconds`, and prints when each request was sent (µs since the epoch), one per line.
fn member(url: String, prefix: String, start: u64, seconds: u64, tasks: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sent = runtime.block_on(async move {
        let store = RedisStore::builder(url)
            .prefix(prefix)
            .fail_mode(FailMode::Closed)
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let limits = RateLimitByRoute::builder()
            .route("GET /v2/generate/{id}", Quota::per_second(RATE))
            .max_wait(Duration::from_secs(30))
            .store(store.clone())
            .build()
            .unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let api = {
            let sent = sent.clone();
            service_fn(move |_: Request<()>| {
                sent.lock().unwrap().push(micros_now());
                std::future::ready(Ok::<_, Infallible>(Response::new(())))
            })
        };
        let service = limits.layer(api);
        let wait = start.saturating_sub(micros_now());
        tokio::time::sleep(Duration::from_micros(wait)).await;
        let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let senders: Vec<_> = (0..tasks)
            .map(|_| {
                let service = service.clone();
                tokio::spawn(async move {
                    while tokio::time::Instant::now() < until {
                        let request = Request::get("http://api.test/v2/generate/6e6e1f0a")
                            .body(())
                            .unwrap();
                        service.clone().oneshot(request).await.unwrap();
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.await.unwrap();
        }
        store.flush().await;
        let sent = sent.lock().unwrap().clone();
        sent
    });
    let lines: Vec<String> = sent.iter().map(u64::to_string).collect();
    println!("{}", lines.join("\n"));
}

fn main() {
    let seconds: u64 = setting("TOWER_QUOTA_FLEET_SECONDS", 10);
    let tasks: usize = setting("TOWER_QUOTA_FLEET_TASKS", 32);
    if let Ok(child) = std::env::var("TOWER_QUOTA_FLEET_MEMBER") {
        let mut parts = child.split(' ');
        let (url, prefix, start) = (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().parse().unwrap(),
        );
        member(url, prefix, start, seconds, tasks);
        return;
    }
    let Some(server) = redis_server::redis() else {
        eprintln!("fleet bench skipped: no redis-server on the PATH and no TOWER_QUOTA_REDIS_URL");
        return;
    };
    let prefix = format!("fleet-{}", micros_now());
    // Every process starts sending at the same moment, a second from now.
    let start = micros_now() + 1_000_000;
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .env(
                    "TOWER_QUOTA_FLEET_MEMBER",
                    format!("{} {prefix} {start}", server.1),
                )
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut sent: Vec<u64> = Vec::new();
    let mut each = Vec::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "a fleet member failed");
        let times: Vec<u64> = String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .filter_map(|line| line.parse().ok())
            .collect();
        each.push(times.len());
        sent.extend(times);
    }
    sent.sort_unstable();
    // The most sent in any window of one second.
    let mut most = 0;
    let mut from = 0;
    for (i, &at) in sent.iter().enumerate() {
        while sent[from] + 1_000_000 <= at {
            from += 1;
        }
        most = most.max(i + 1 - from);
    }
    // Requests still waiting at the end are sent after it: the span is the sends'.
    let span = (sent.last().unwrap_or(&0) - sent.first().unwrap_or(&0)) as f64 / 1e6;
    let rate = sent.len() as f64 / span;
    assert!(
        most <= RATE as usize,
        "{most} requests in one second, over the quota of {RATE}"
    );
    // After the first second, whose window the fleet fills at once: the steady rate.
    let first = sent.first().copied().unwrap_or(0);
    let steady = sent.iter().filter(|&&at| at >= first + 1_000_000).count() as f64 / (span - 1.0);
    println!(
        "{PROCESSES} processes, {tasks} requests in flight each, sending for {seconds} s \
         ({span:.2} s from the first send to the last), sharing {RATE} requests/s:"
    );
    println!(
        "sent {} ({each:?} per process): {rate:.0} requests/s, {:.1}% of the quota; \
         at most {most} in any one-second window",
        sent.len(),
        100.0 * rate / f64::from(RATE)
    );
    println!(
        "after the first second: {steady:.0} requests/s, {:.1}% of the quota",
        100.0 * steady / f64::from(RATE)
    );
}
