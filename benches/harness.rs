//! What the benches share: many tasks on a small runtime sending through one shared limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};

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
