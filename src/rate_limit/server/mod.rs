//! Server mode: each client's requests are counted under its key, and a request over its
//! quota is answered 429 at once.

pub(crate) mod future;
pub(crate) mod key;
pub(crate) mod service;
pub(crate) mod state;
#[cfg(feature = "redis")]
mod store;
pub(crate) mod tier;
