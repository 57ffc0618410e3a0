//! criterion benches. Each group runs its anchors (tower's own limiters, governor) beside
//! this crate's layers, so one run gives the ratios.

use criterion::{criterion_group, criterion_main};

mod backoff;
mod concurrency;
mod harness;
mod rate_limit;

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
criterion_main!(benches);
