//! criterion benches. Each group runs its anchors (tower's own limiters, governor) beside
//! this crate's layers, so one run gives the ratios.

use criterion::{criterion_group, criterion_main};

mod backoff;
mod concurrency;
mod harness;
mod rate_limit;
#[cfg(feature = "redis")]
mod store;

criterion_group!(
    benches,
    rate_limit::client_fast_path,
    rate_limit::server_fast_path,
    rate_limit::contended,
    concurrency::job_request,
    concurrency::other_request,
    concurrency::contended,
    backoff::no_retry
);
#[cfg(feature = "redis")]
criterion_group!(shared_store, store::overhead);

#[cfg(feature = "redis")]
criterion_main!(benches, shared_store);
#[cfg(not(feature = "redis"))]
criterion_main!(benches);
