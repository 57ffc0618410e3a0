//! A faithful local mock of Sync's lip-sync HTTP API, for testing `tower-quota` against.
//!
//! It enforces Sync's limits and counts what happened:
//!
//! - route rate limits per API key (`x-api-key`), by a fixed window, a sliding window, a
//!   leaky bucket like nginx's `limit_req`, or `tower-quota`'s own bucketed window. The leaky
//!   bucket and the bucketed window are enforced by `tower-quota`'s server mode
//!   ([`RateLimitByRoute`](tower_quota::RateLimitByRoute) with `.reject()`, keyed by
//!   `x-api-key`); the fixed window and the exact sliding window (the default) are counted by
//!   the mock's own code, written apart from the crate, which has no fixed window and keeps
//!   its sliding window in 16 buckets per key (a place held up to a sixteenth of a period
//!   longer than an exact log holds it: see [`Algorithm::BucketedWindow`]). Sync's defaults
//!   are 60 `POST /v2/generate` and 600 of each other endpoint a minute;
//! - plan concurrency, enforced by `tower-quota`'s own server mode
//!   ([`KeyedPlans`](tower_quota::concurrency::KeyedPlans), keyed by `x-api-key`, each key
//!   on its plan): generations stay `PENDING` then `PROCESSING` for set durations, and a
//!   create while the plan's slots are all held gets a 429. The mock still counts its active
//!   generations itself (`max_active`, `max_active_by_key` in its stats), so a layer that let
//!   one too many through would show there;
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
mod quotas;
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
