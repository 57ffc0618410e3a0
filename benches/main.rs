//! criterion benches. Each group runs its anchors (tower's own limiters, governor) beside
//! this crate's layers, so one run gives the ratios.

use criterion::{criterion_group, criterion_main};

mod rate_limit;

criterion_group!(
    benches,
    rate_limit::client_fast_path,
    rate_limit::server_fast_path,
    rate_limit::contended
);
criterion_main!(benches);
