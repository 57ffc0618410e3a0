//! Client mode: a request waits for its route's turn, in this process or in a shared store,
//! and holds its place until its response.

pub(crate) mod future;
mod service;
pub(crate) mod state;
#[cfg(feature = "redis")]
pub(crate) mod store;
