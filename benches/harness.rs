//! What the benches share: many tasks on a small runtime sending through one shared limit.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use futures::FutureExt;
use http_body_util::{BodyExt, Either, Full};

/// Tasks sharing one limit in a contended group, and the sends each makes per iteration.
pub(crate) const TASKS: u64 = 64;
pub(crate) const PER_TASK: u64 = 1_000;

/// The runtime of the contended groups: two workers, as many as this machine has cores.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

/// A contended group, its throughput counted in sends.
pub(crate) fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(TASKS * PER_TASK));
    group
}

/// Makes one task's sender: a closure that sends one request.
pub(crate) type MakeSender = Arc<dyn Fn() -> Box<dyn FnMut() + Send> + Send + Sync>;

/// Runs [`TASKS`] tasks of [`PER_TASK`] sends each, `iters` times, on `runtime`.
pub(crate) fn contended(
    runtime: &tokio::runtime::Runtime,
    make: MakeSender,
    iters: u64,
) -> Duration {
    runtime.block_on(async move {
        let start = Instant::now();
        for _ in 0..iters {
            let handles: Vec<_> = (0..TASKS)
                .map(|_| {
                    let mut send = make();
                    tokio::spawn(async move {
                        for _ in 0..PER_TASK {
                            send();
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.await.unwrap();
            }
        }
        start.elapsed()
    })
}

/// One row of a fast-path group: its name, and a closure that sends one request through it
/// and reads the answer.
pub(crate) type Row = (&'static str, Box<dyn FnMut()>);

/// The rows of one fast-path group, made on the runtime the group runs on.
pub(crate) type Rows = fn() -> Vec<Row>;

/// The runtime of the fast-path groups: one thread, so that each row is the cost of one
/// request and nothing else.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// A fast-path group: its rows in turn, each beside the others in one criterion group.
pub(crate) fn fast_path(c: &mut Criterion, name: &str, rows: Rows) {
    let runtime = current_thread();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group(name);
    for (row, mut send) in rows() {
        group.bench_function(row, |b| b.iter(&mut send));
    }
    group.finish();
}

/// Counting instead of timing, for an instruction counter such as `valgrind --tool=callgrind`
/// (`benches/instructions.sh` drives it): with `TOWER_QUOTA_COUNT=n` set, the bench binary
/// sends `n` requests through each fast-path row whose `group/row` name is one of its
/// arguments, outside criterion; with `TOWER_QUOTA_LIST` set, it lists the rows. Returns
/// whether it did either.
pub(crate) fn count(groups: &[(&str, Rows)]) -> bool {
    let list = std::env::var_os("TOWER_QUOTA_LIST").is_some();
    let n = std::env::var("TOWER_QUOTA_COUNT").ok();
    if !list && n.is_none() {
        return false;
    }
    let n: u64 = n.map_or(0, |n| n.parse().expect("TOWER_QUOTA_COUNT is a number"));
    let names: Vec<String> = std::env::args().skip(1).collect();
    let runtime = current_thread();
    let _guard = runtime.enter();
    for (group, rows) in groups {
        for (row, mut send) in rows() {
            let name = format!("{group}/{row}");
            if list {
                println!("{name}");
            } else if names.contains(&name) {
                send_many(&mut send, n);
            }
        }
    }
    true
}

/// The counted part of [`count`]: `instructions.sh` counts inside this function only, so that
/// setup (governor's clock calibrates itself in a loop of clock reads) stays out.
#[inline(never)]
fn send_many(send: &mut dyn FnMut(), n: u64) {
    for _ in 0..n {
        send();
    }
}

/// Reads a body that is ready at once (as the benches' bodies are) to its end.
pub(crate) fn drain<B: http_body::Body + Unpin>(mut body: B) {
    while let Some(Some(frame)) = body.frame().now_or_never() {
        black_box(frame.ok());
    }
}

/// A row that sends `request()` through `svc`, which answers at once, and reads the body.
pub(crate) fn answered<S, R: 'static, B>(name: &'static str, mut svc: S, request: fn() -> R) -> Row
where
    S: tower::Service<R, Response = http::Response<B>> + 'static,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Unpin,
{
    let send = move || {
        let response = svc.call(black_box(request())).now_or_never().unwrap();
        drain(response.unwrap().into_body())
    };
    (name, Box::new(send))
}

/// matchit over the routes the benches' requests take (`/v2/generate`, its status route, the
/// list route), for the anchors that look a route up.
pub(crate) fn matchit_table() -> matchit::Router<usize> {
    let mut router = matchit::Router::new();
    router.insert("/v2/generate", 0).unwrap();
    router.insert("/v2/generate/{id}", 1).unwrap();
    router.insert("/v2/generations", 2).unwrap();
    router
}

/// Wraps a response's body the way a layer must that may read, watch or hand back a body: the
/// map of the body-wrapping reference rows.
pub(crate) fn either(
    response: http::Response<Full<Bytes>>,
) -> http::Response<Either<Full<Bytes>, Box<Full<Bytes>>>> {
    response.map(Either::Left)
}
