//! What the benches share: many tasks on a small runtime sending through one shared limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Makes one task's sender: a closure that sends one request.
pub(crate) type MakeSender = Arc<dyn Fn() -> Box<dyn FnMut() + Send> + Send + Sync>;

/// Runs `tasks` tasks of `per_task` sends each, `iters` times, on `runtime`.
pub(crate) fn contended(
    runtime: &tokio::runtime::Runtime,
    make: MakeSender,
    iters: u64,
    tasks: u64,
    per_task: u64,
) -> Duration {
    runtime.block_on(async move {
        let start = Instant::now();
        for _ in 0..iters {
            let handles: Vec<_> = (0..tasks)
                .map(|_| {
                    let mut send = make();
                    tokio::spawn(async move {
                        for _ in 0..per_task {
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
