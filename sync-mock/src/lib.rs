//! A faithful local mock of Sync's lip-sync HTTP API, for testing `tower-quota` against.
//!
//! It counts its limits with its own code, written apart from `tower-quota`'s, so that one
//! shared mistake cannot hide itself:
//!
//! - route rate limits per API key (`x-api-key`), by a fixed window, a sliding window or a
//!   leaky bucket like nginx's `limit_req`; Sync's defaults are 60 `POST /v2/generate` and 600
//!   of each other endpoint a minute;
//! - plan concurrency: generations stay `PENDING` then `PROCESSING` for set durations, and a
//!   create while the plan's slots are all held gets a 429;
//! - Sync's error bodies, with `errorCode` `rate_limit_exceeded` or
//!   `concurrency_limit_reached` (or none, as the older API), and `Retry-After` on or off;
//! - `Idempotency-Key` replays, long polls (`?wait=true&timeout=`), list and count filters,
//!   and signed webhooks.
//!
//! All its timing runs on `tokio::time`, so a test on a paused clock drives it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sync_mock::{Config, MockServer};
//!
//! let server = MockServer::start(Config::default().api_key("sk-live", 3)).await?;
//! // ... send requests to server.url("/v2/generate") with `x-api-key: sk-live` ...
//! let stats = server.stats();
//! assert_eq!(stats.too_many_requests(), 0);
//! server.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Routes: `POST /v2/generate`, `GET /v2/generate/{id}`, `GET /v2/generations`
//! (`status=PENDING,PROCESSING`, `limit` 1..=100, `cursor` = the last id of the previous
//! page; newest first), `GET /v2/generations/count`, and, outside the API and its limits,
//! `GET /_mock/stats` with the counters as JSON.

mod api;
mod config;
mod limits;
mod server;
mod state;
mod stats;
pub mod webhook;

pub use config::{
    Algorithm, Config, ConfigError, Endpoint, Limit, DEFAULT_KEY, DEFAULT_WEBHOOK_SECRET,
};
pub use server::{MockServer, StartError};
pub use state::Status;
pub use stats::{Arrival, Stats};
