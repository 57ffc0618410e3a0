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
//! [`Quota`]: crate::Quota

mod error;
mod future;
mod key;
mod layer;
mod remote;
mod server;
mod service;
mod state;

pub use error::RateLimitError;
pub use future::ResponseFuture;
pub use key::{ForwardedHeader, MissingKey, RequestHead};
pub use layer::{
    Builder, EmptyBody, KeyedRouteSnapshot, NextAdmission, RateLimitByRoute, Reject, RejectConfig,
    RejectReason, RejectResponse, Rejection, RouteSnapshot, Wait, WaitConfig,
};
pub use server::RejectFuture;
pub use service::RateLimitByRouteService;
