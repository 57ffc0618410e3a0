//! The handle API under clients that are not tower services (`acquire` / `finish`,
//! `Backoff429::retries`), and the reqwest middlewares built on it (feature
//! `reqwest-middleware`): one set of counters whichever way a request comes.

#[path = "../common/mod.rs"]
mod common;

mod handles;
mod hostile;
#[cfg(feature = "reqwest-middleware")]
mod middleware;
