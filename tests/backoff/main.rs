//! `Backoff429`: the layer on tokio's paused clock, and over real sockets.

mod layer;
mod sockets;
