//! `Backoff429`: the layer on tokio's paused clock, and over real sockets.

#[path = "../common/mod.rs"]
mod common;

mod bodies;
mod layer;
