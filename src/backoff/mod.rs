//! Retries that respect the server: [`Backoff429`].
//!
//! The common advice for a 429 (Sync's among others) is to wait and retry with exponential
//! backoff (1 s, 2 s, 4 s, 8 s, 16 s), never in a tight loop, and to treat a rate-limit 429
//! apart from a concurrency one. This layer does that, and gets right what retry layers commonly get wrong:
//!
//! - **What the server says wins.** `Retry-After` (delta-seconds or HTTP-date),
//!   `retry-after-ms`, and the reset of `RateLimit` / `X-RateLimit-Reset` set the least wait:
//!   jitter never takes a wait below it. A server asking for longer than the schedule's
//!   `max_delay`, or than the request's deadline leaves, gets its 429 handed back to the caller
//!   at once instead of a pointless sleep. Garbage values fall back to the schedule, with a
//!   tracing event.
//! - **Never a tight loop, never a panic**: no wait is shorter than a millisecond or longer
//!   than `max_delay`, and the default jitter ([`Jitter::Equal`]) keeps every wait between
//!   half and all of the nominal delay. Delays saturate: no valid setting panics, however
//!   large.
//! - **Which limit**: a classifier of yours, or a vendor's (Sync's JSON `errorCode`,
//!   `rate_limit_exceeded` / `concurrency_limit_reached`:
//!   [`presets::sync::error_code`](crate::presets::sync::error_code)), tells a rate-limit 429
//!   from a concurrency one, and each kind can have its own [`Schedule`]; by default every 429
//!   is a rate-limit one. The body read to classify is not lost: the response the
//!   caller finally gets carries all of it. The read is bounded in bytes
//!   ([`Backoff429::max_body`], 64 KiB), in frames ([`Backoff429::max_read_frames`], 1,024)
//!   and in time ([`Backoff429::max_read_time`], 10 s): at a bound the layer stops reading
//!   and decides on what it has, so a body that stalls or never ends holds no request.
//! - **A retry budget** ([`RetryBudget`], tower's `TpsBudget` settings at a fraction of its
//!   cost per request; any [`Budget`](tower::retry::budget::Budget) can replace it): in a
//!   storm, retries stay a bounded share of traffic.
//! - **Transient failures** (502, 503, 504, connection errors) are retried only when asked
//!   ([`Backoff429::retry_transient`]), and a request that may have been processed only when
//!   replaying it is safe: an idempotent method, or an `Idempotency-Key` (the caller's, or one
//!   the layer adds once per logical request and sends on every retry of it). This crate's
//!   own errors (a request a layer below gave back unsent, a failed store, a setting) are
//!   never retried, even inside another error such as the one tower's `Buffer` wraps.
//! - **Every retry goes through the layers below**: put this layer above
//!   [`ConcurrencyLimitByPlan`](crate::ConcurrencyLimitByPlan) and
//!   [`RateLimitByRoute`](crate::RateLimitByRoute), and a retry queues for its slot and its
//!   turn like any request.
//! - **A deadline bounds the whole call** ([`Backoff429::deadline`]): the first attempt,
//!   reading refusals, waits and retries in flight. A wait that would end at or past it is
//!   not slept (the last refusal goes back at once); if it passes while an attempt or a read
//!   is under way, or while a retry waits for the service below to be ready, the call ends
//!   then with [`BackoffError::DeadlineExceeded`].
//!
//! When retries run out the caller gets the last response (a [`Retried`] in its extensions
//! says how many attempts and how much waiting it took), or, with
//! [`Backoff429::error_on_exhaustion`], a [`BackoffError::Exhausted`].
//!
//! A retry sends a copy of the request, so by default its body must be a [`ReplayBody`]
//! (every `Clone` body: `Full<Bytes>`, `String`, `Bytes`): a streaming body is a compile
//! error, not a silent no-retry. [`Backoff429::buffer_bodies`] takes any body: one of known
//! size within its bound is read whole and replayed, any other streamed once and never
//! retried (the service below gets a [`Buffered`] body).
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_quota::backoff::Retried;
//! use tower_quota::Backoff429;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_quota::BoxError> {
//! // A server that refuses the first two calls.
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let api = service_fn(move |_: Request<String>| {
//!     let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         let status = if n < 2 { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::OK };
//!         Ok::<_, std::convert::Infallible>(
//!             Response::builder().status(status).body(String::new()).unwrap(),
//!         )
//!     }
//! });
//! let backoff = Backoff429::new().max_retries(5).base_delay(Duration::from_secs(1));
//! let svc = ServiceBuilder::new().layer(backoff).service(api);
//!
//! let response = svc.oneshot(Request::new(String::new())).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(response.extensions().get::<Retried>().unwrap().attempts, 3);
//! # Ok(())
//! # }
//! ```
//!
//! # Readiness
//!
//! `poll_ready` forwards to the inner service: a ready [`Backoff429Service`] is one whose
//! inner service is ready for a request's first attempt, which is sent with it. A request
//! that waits (reading a refusal, sleeping in backoff) holds no service driven ready: its
//! response future keeps a clone of the inner service of its own, and the readiness the
//! caller reserved (a slot of tower's `Buffer`, a permit of its `ConcurrencyLimit`) went with
//! the first attempt. When its wait ends the request drives its clone ready, and calls it at
//! once. So a request sleeping in backoff never stops the others that share the service
//! below.

mod body;
mod budget;
mod classify;
mod decide;
mod error;
mod future;
mod layer;
mod random;
mod replay;
mod schedule;
mod service;
#[cfg(test)]
mod tests;

pub use body::BackoffBody;
pub use budget::RetryBudget;
pub use classify::LimitKind;
pub use decide::{Decision, Retries};
pub use error::{BackoffError, Retried};
pub use future::ResponseFuture;
pub use layer::Backoff429;
pub use replay::{
    BufferBodies, BufferBodiesService, BufferFuture, Buffered, ReplayBodies, ReplayBody,
};
pub use schedule::{Jitter, Schedule};
pub use service::Backoff429Service;
