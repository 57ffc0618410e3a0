//! Per-route rate limits: [`RateLimitByRoute`].
//!
//! A job API publishes a request rate per route: Sync's lip-sync API allows 60
//! `POST /v2/generate` a minute and 600 a minute on every other endpoint, and answers 429 past
//! that. [`RateLimitByRoute`] maps `"METHOD /path/{param}"` patterns to [`Quota`]s and keeps
//! requests inside them, from either side of the wire:
//!
//! - **Client mode** (the default): a request whose route has no quota left waits, first come
//!   first served, inside its response future on a tokio timer, and is sent when its turn
//!   comes. The server never sees more than the quota, and the whole quota is used. A request
//!   holds its place until its response is back plus the quota's period, because the server
//!   counts it at some moment in between. 429s and rate-limit header fields in the responses
//!   can only tighten the local limit.
//! - **Server mode** ([`Builder::reject`]): requests over their client's quota are answered at
//!   once with 429, a `Retry-After` in whole seconds rounded up (never 0), and the IETF draft
//!   `RateLimit-Policy` / `RateLimit` fields. The service keeps `type Error = S::Error`, so it
//!   drops into axum without `HandleErrorLayer`.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_quota::{Quota, RateLimitByRoute};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_quota::BoxError> {
//! let limits = RateLimitByRoute::builder()
//!     .route("POST /v2/generate", Quota::per_minute(60))
//!     .route("GET /v2/generate/{id}", Quota::per_minute(600))
//!     .default_quota(Quota::per_minute(600)) // every other route
//!     .max_wait(Duration::from_secs(120))
//!     .build()?;
//!
//! let client = service_fn(|_req: Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(String::from("{}")))
//! });
//! let mut svc = ServiceBuilder::new().layer(limits.clone()).service(client);
//!
//! let request = Request::post("https://api.sync.so/v2/generate").body(String::new())?;
//! let response = svc.ready().await?.call(request).await?;
//! assert!(response.status().is_success());
//! assert_eq!(limits.snapshot()[0].remaining, 59);
//! # Ok(())
//! # }
//! ```
//!
//!
//! # Client mode: readiness, queues, abandoned requests
//!
//! `poll_ready` forwards to the inner service, and means what the inner service's does: it
//! says nothing about quotas. The route, and so the quota, is only known from the request,
//! so a request that must wait for its turn waits inside its response future, never in
//! `poll_ready`.
//!
//! A request sent at once is sent with the service the caller drove ready. A request that
//! waits (in its route's queue, or asking a shared store) holds no service driven ready: it
//! keeps a clone of the inner service of its own, and the readiness the caller reserved (a
//! slot of tower's `Buffer`, a permit of its `ConcurrencyLimit`) is given back at the call.
//! When its turn comes it drives its clone ready, holding its place meanwhile, then sends.
//! So requests waiting on an exhausted route never stop those of another route, whatever
//! reserves capacity below the layer. If the inner service fails to get ready, the request
//! is returned with that error, and its place is given back as if never taken (it was never
//! sent); the same when the future is dropped before the request was sent.
//!
//! Each route's queue is first come, first served, and unbounded by default: every waiting
//! request holds its request and a clone of the inner service. [`Builder::max_queue`] bounds
//! it; a request that would have to wait while the queue is full is returned at once with
//! [`RateLimitError::QueueFull`], and one that would wait longer than [`Builder::max_wait`]
//! with [`RateLimitError::WaitTooLong`].
//!
//! A request given up on after its send (its future dropped, or a transport error) may still
//! be counted by a stalled or queueing server. It keeps its place as in flight for
//! [`Builder::abandoned_hold`] (60 s by default), then as answered then: a server that counts
//! it no later than that after the client gave up never sees more than the quota.
//!
//! [`Quota`]: crate::Quota

mod error;
mod future;
mod key;
mod layer;
mod remote;
mod service;
mod state;

pub use error::RateLimitError;
pub use future::{RejectFuture, ResponseFuture};
pub use key::RequestHead;
pub use layer::{
    Builder, EmptyBody, KeyedRouteSnapshot, NextAdmission, RateLimitByRoute, Reject, RejectConfig,
    RejectResponse, Rejection, RouteSnapshot, Wait, WaitConfig,
};
pub use service::RateLimitByRouteService;
