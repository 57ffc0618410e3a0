//! Limits shared across processes through Redis (feature `redis`): rate limits, and plan slots
//! taken by batches (plan slots in a store are tested against the local Sync API, in
//! tests/stack/plan_slots_store.rs).

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod cluster_faults;
mod memory;
mod places;
mod plan_batches;
mod rate_limits;
mod servers;
mod tiers;
mod tls;
mod weighted;
