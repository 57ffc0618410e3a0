//! `RateLimitByRoute`: client mode, server mode, over real sockets, under floods of keys, and
//! fuzzed.

#[path = "../common/mod.rs"]
mod common;

mod client;
mod keyed;
mod named_quotas;
mod server;
mod server_flood;
mod server_fuzz;
mod server_sockets;
mod server_table;
mod server_tiers;
mod weighted;
