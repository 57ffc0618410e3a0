//! End to end: what server mode costs a real axum server over real sockets.
//!
//! One axum app (`GET /v2/generations/{id}`, a small JSON answer) served on one Tokio worker
//! thread, and a load generator on a thread of its own sending over keep-alive HTTP/1
//! connections on 127.0.0.1, each thread pinned to its own core where the machine has two.
//! Every request carries an `x-api-key` drawn in turn from 5,000 clients. The variants of the
//! app, each on its own port of the same server thread:
//!
//! - bare axum;
//! - tower_governor keyed by the same header;
//! - `RateLimitByRoute` server mode, sliding window;
//! - `RateLimitByRoute` server mode, GCRA;
//! - and, beside them, server mode (sliding window) without its `RateLimit` fields, which
//!   tower_governor does not write by default either.
//!
//! Server mode writes its `RateLimit` and `RateLimit-Policy` fields by default.
//!
//! Quotas are set so that no client reaches its own (100 requests a second each; the load
//! gives each about 10): the rows are the cost of admitting. Each variant runs twice, with
//! the 5,000 clients alone and with a flood in the mix (one request in ten from a key never
//! seen before). Server mode tracks at most 8,192 clients here (`.max_keys`), so the flood
//! runs through its bounded table, forgetting clients into its shadow table (the default is
//! 65,536); tower_governor keeps every key it has seen.
//!
//! The runs are interleaved (every variant once per round, rounds repeated) and each figure is
//! the median over rounds: requests per second, and the server thread's CPU time per request
//! (from `/proc/thread-self/schedstat`, Linux); the comparisons with bare axum are the medians
//! of each round's variant against bare axum in the same round, so that the machine's drift
//! between rounds cancels out. Not a criterion bench: it needs the server's
//! CPU time, and interleaved runs, which one criterion group cannot give.
//!
//! `cargo bench --bench end_to_end` (`TOWER_QUOTA_E2E_ROUNDS`, default 25, and
//! `TOWER_QUOTA_E2E_SECONDS`, default 1, per run; `TOWER_QUOTA_E2E_CONNECTIONS`, default 32).

// Pinning a thread to a core is one `libc` call.
#![allow(unsafe_code)]
#![allow(missing_docs)]

use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};
use tower_quota::{Quota, RateLimitByRoute};

const KEYS: u64 = 5_000;
/// One request in this many is from a fresh key in the flood mix.
const FLOOD_ONE_IN: u64 = 10;
const MAX_KEYS: usize = 8_192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    TowerGovernor,
    Sliding,
    Gcra,
    SlidingNoFields,
}

const VARIANTS: [Variant; 5] = [
    Variant::Bare,
    Variant::TowerGovernor,
    Variant::Sliding,
    Variant::Gcra,
    Variant::SlidingNoFields,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare axum",
            Variant::TowerGovernor => "tower_governor, keyed by x-api-key",
            Variant::Sliding => "RateLimitByRoute server mode, sliding window",
            Variant::Gcra => "RateLimitByRoute server mode, GCRA",
            Variant::SlidingNoFields => {
                "RateLimitByRoute server mode, sliding window, `.rate_limit_headers(false)`"
            }
        }
    }
}

/// tower_governor's key: the `x-api-key` header, as server mode reads it.
#[derive(Debug, Clone, Copy)]
struct ApiKey;

impl KeyExtractor for ApiKey {
    type Key = HeaderValue;

    fn extract<T>(&self, request: &Request<T>) -> Result<Self::Key, GovernorError> {
        request
            .headers()
            .get("x-api-key")
            .cloned()
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

async fn generation(Path(id): Path<String>) -> String {
    format!(r#"{{"id":"{id}","status":"COMPLETED"}}"#)
}

fn app(variant: Variant) -> Router {
    let app = Router::new().route("/v2/generations/{id}", get(generation));
    // 100 requests a second per client, in each limiter's terms.
    let quota = Quota::per_minute(6_000);
    let server_mode = |quota: Quota, fields: bool| {
        RateLimitByRoute::builder()
            .route("GET /v2/generations/{id}", quota)
            .reject()
            .key_header(HeaderName::from_static("x-api-key"))
            .max_keys(MAX_KEYS)
            .rate_limit_headers(fields)
            .build()
            .unwrap()
    };
    match variant {
        Variant::Bare => app,
        Variant::TowerGovernor => {
            let config = GovernorConfigBuilder::default()
                .per_millisecond(10)
                .burst_size(6_000)
                .key_extractor(ApiKey)
                .finish()
                .unwrap();
            app.layer(GovernorLayer::new(config))
        }
        Variant::Sliding => app.layer(server_mode(quota, true)),
        Variant::Gcra => app.layer(server_mode(quota.with_burst(6_000), true)),
        Variant::SlidingNoFields => app.layer(server_mode(quota, false)),
    }
}

/// Pins the calling thread to `core`, if the machine has it.
fn pin_to(core: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if core >= cores {
        return;
    }
    // SAFETY: a zeroed `cpu_set_t` is an empty set; `CPU_SET` writes inside it, and
    // `sched_setaffinity` reads `size_of` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A thread's CPU time so far, in nanoseconds, from its `schedstat` (`task` is
/// `/proc/self/task/<tid>`).
fn cpu_ns(task: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(task.join("schedstat")).unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

/// Starts the apps on one server thread: their addresses, and the thread's `/proc`
/// directory.
fn serve() -> (Vec<std::net::SocketAddr>, std::path::PathBuf) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pin_to(0);
        // "<pid>/task/<tid>"
        let task =
            std::path::Path::new("/proc").join(std::fs::read_link("/proc/thread-self").unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut addresses = Vec::new();
            for variant in VARIANTS {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addresses.push(listener.local_addr().unwrap());
                tokio::spawn(axum::serve(listener, app(variant)).into_future());
            }
            tx.send((addresses, task)).unwrap();
            std::future::pending::<()>().await
        })
    });
    rx.recv().unwrap()
}

struct Run {
    requests_per_second: f64,
    server_cpu_us: f64,
    not_ok: u64,
}

/// Sends from `connections` keep-alive connections to `address` for `seconds`.
async fn run(
    address: std::net::SocketAddr,
    server: &std::path::Path,
    connections: usize,
    seconds: f64,
    flood: bool,
    fresh: &Arc<AtomicU64>,
) -> Run {
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let not_ok = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..connections {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        senders.push(sender);
    }
    let cpu_before = cpu_ns(server);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let (next, ok, not_ok, fresh) =
                (next.clone(), ok.clone(), not_ok.clone(), fresh.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let key = if flood && n % FLOOD_ONE_IN == 0 {
                        format!("fresh-{}", fresh.fetch_add(1, Ordering::Relaxed))
                    } else {
                        format!("client-{}", n % KEYS)
                    };
                    let request = Request::get(format!("/v2/generations/{n}"))
                        .header("host", "127.0.0.1")
                        .header("x-api-key", key)
                        .body(Empty::<bytes::Bytes>::new())
                        .unwrap();
                    sender.ready().await.unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    let status = response.status();
                    response.into_body().collect().await.unwrap();
                    if status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        not_ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_ns(server) - cpu_before;
    let answered = ok.load(Ordering::Relaxed) + not_ok.load(Ordering::Relaxed);
    Run {
        requests_per_second: answered as f64 / elapsed,
        server_cpu_us: cpu as f64 / 1_000.0 / answered as f64,
        not_ok: not_ok.load(Ordering::Relaxed),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter, if any, is ignored: there is one table.
    let rounds: usize = setting("TOWER_QUOTA_E2E_ROUNDS", 25);
    let seconds: f64 = setting("TOWER_QUOTA_E2E_SECONDS", 1.0);
    let connections: usize = setting("TOWER_QUOTA_E2E_CONNECTIONS", 32);
    let (addresses, server) = serve();
    pin_to(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fresh = Arc::new(AtomicU64::new(0));
    // (flood, variant) -> runs
    let mut runs: Vec<Vec<Run>> = (0..2 * VARIANTS.len()).map(|_| Vec::new()).collect();
    runtime.block_on(async {
        // A warm-up run of each, not counted.
        for (address, _) in addresses.iter().zip(VARIANTS) {
            run(*address, &server, connections, seconds / 2.0, false, &fresh).await;
        }
        for round in 0..rounds {
            for flood in [false, true] {
                for (i, address) in addresses.iter().enumerate() {
                    let result = run(*address, &server, connections, seconds, flood, &fresh).await;
                    runs[usize::from(flood) * VARIANTS.len() + i].push(result);
                }
            }
            eprintln!("round {} of {rounds} done", round + 1);
        }
    });
    println!(
        "{rounds} interleaved rounds of {seconds} s per run, {connections} connections, \
         {KEYS} clients; medians, those against bare axum of each round's pair\n"
    );
    println!(
        "| mix | variant | requests/s | vs bare axum | server CPU per request | vs bare axum | not 200 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for flood in [false, true] {
        let mix = if flood {
            "5,000 clients + 1 in 10 fresh keys"
        } else {
            "5,000 clients"
        };
        let at = |i: usize| &runs[usize::from(flood) * VARIANTS.len() + i];
        for (i, variant) in VARIANTS.iter().enumerate() {
            let rps = median(at(i).iter().map(|r| r.requests_per_second).collect());
            let cpu = median(at(i).iter().map(|r| r.server_cpu_us).collect());
            // Each round's figure against bare axum's in the same round: the machine's drift
            // from round to round cancels out.
            let paired = |f: fn(&Run, &Run) -> f64| {
                median(
                    at(i)
                        .iter()
                        .zip(at(0))
                        .map(|(run, bare)| f(run, bare))
                        .collect(),
                )
            };
            let ratio = paired(|run, bare| run.requests_per_second / bare.requests_per_second);
            let extra = paired(|run, bare| run.server_cpu_us - bare.server_cpu_us);
            let not_ok: u64 = at(i).iter().map(|r| r.not_ok).sum();
            println!(
                "| {mix} | {} | {rps:.0} | {ratio:.3} | {cpu:.2} µs | {extra:+.2} µs | {not_ok} |",
                variant.name(),
            );
        }
    }
}
