//! The three layers together: against the local Sync API, end to end, and as an outsider
//! would try them.

#[path = "../common/mod.rs"]
mod common;

mod against_mock;
mod backoff_sockets;
mod completion;
mod dialects;
mod e2e;
mod hostile;
mod integration;
mod plan_slots_store;
mod prometheus;
