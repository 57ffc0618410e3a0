//! Limits shared across processes through Redis (feature `redis`): rate limits and plan slots.

#[path = "../common/mod.rs"]
mod common;

mod plan_slots;
mod rate_limits;
