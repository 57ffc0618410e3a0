//! criterion benches. Each group runs its anchors (tower's own limiters, governor) beside
//! this crate's layers, so one run gives the ratios.
//!
//! The fast-path groups can also be counted rather than timed, for an instruction counter
//! that this noisy machine does not disturb: see [`harness::count`] and
//! `benches/instructions.sh`.

// criterion's macros make public functions that cannot carry docs.
#![allow(missing_docs)]

use criterion::{criterion_group, Criterion};

mod backoff;
mod concurrency;
mod harness;
mod rate_limit;
#[cfg(feature = "redis")]
mod redis_server;
#[cfg(feature = "redis")]
mod store;
mod waiting;

use harness::Rows;

/// The fast-path groups: one request at a time, each row beside its anchors.
const FAST_PATHS: &[(&str, Rows)] = &[
    ("client_fast_path", rate_limit::client_rows),
    ("server_fast_path", rate_limit::server_rows),
    (
        "concurrency_job_request_free_slot",
        concurrency::job_request_rows,
    ),
    ("concurrency_other_request", concurrency::other_request_rows),
    ("backoff_no_retry", backoff::no_retry_rows),
    ("waiting_at_scale", waiting::rows),
];

fn fast_paths(c: &mut Criterion) {
    for (name, rows) in FAST_PATHS {
        harness::fast_path(c, name, *rows);
    }
}

criterion_group!(
    benches,
    fast_paths,
    rate_limit::contended,
    concurrency::contended
);
#[cfg(feature = "redis")]
criterion_group!(shared_store, store::overhead);

fn main() {
    if harness::count(FAST_PATHS) {
        return;
    }
    benches();
    #[cfg(feature = "redis")]
    shared_store();
    Criterion::default().configure_from_args().final_summary();
}
