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
//!   once with 429, a `Retry-After` in whole seconds rounded up (never 0) that says when the
//!   client will be admitted, and the IETF draft `RateLimit-Policy` / `RateLimit` fields, which
//!   every response of a limited route carries. The service keeps `type Error = S::Error`, so
//!   it drops into axum without `HandleErrorLayer`. See [Deploying server
//!   mode](#deploying-server-mode).
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
//! # Deploying server mode
//!
//! A limiter in front of a public API is attacked, so server mode assumes the worst of what it
//! is sent.
//!
//! **Keys.** [`Builder::key_header`] (an API key), [`Builder::key_peer_ip`],
//! [`Builder::key_forwarded_ip`] or [`Builder::key_fn`] tell clients apart; keys are kept only
//! as hashes keyed with this process's random keys, so clients cannot choose colliding keys. A
//! request with no key follows [`Builder::on_missing_key`]: one anonymous quota per route
//! (the default), a `400`, or no limit. A layer keyed by address that the server gives no
//! peer address (axum served without `into_make_service_with_connect_info::<SocketAddr>()`,
//! or this crate built without the `axum` feature) answers `500` and logs a warning, instead
//! of quietly counting every client against one quota. An IPv6 client is one quota per `/64`
//! network, since a host can take a fresh address from its `/64` for every request
//! ([`Builder::ipv6_prefix`] sets another length). A header key is only as good as its
//! check: a key the server never issued is a fresh quota the client made up.
//!
//! **Proxies.** Behind a load balancer every peer is the balancer. [`Builder::key_forwarded_ip`]
//! reads the client's address from the field your proxy writes (`Forwarded`,
//! `X-Forwarded-For` or `X-Real-IP`), only when the request comes from one of the trusted
//! proxy addresses or ranges you list, and walks the list from the right, only as far as the
//! first address that is not a proxy: the client writes what it likes on the left, and
//! neither a forged entry nor garbage there buys a fresh quota or hides its address.
//!
//! **Routing.** Patterns match as axum routes: the most specific path first (static over
//! parameter over wildcard, whatever the methods), then the method, and a `HEAD` request
//! counts under the `GET` route of its path. Paths are matched as sent, byte for byte (axum
//! does not decode percent-escapes, fold case or drop a trailing slash before routing, and
//! neither does the layer; `/v2/jobs//cancel` reaches `/v2/jobs/{id}/cancel` with an empty
//! `id`); a path that matches no pattern so matches again with runs of `/` read as one:
//! should a router let `/svc//v2/generate` reach a handler nested at `/v2/generate` (axum
//! 0.8.9 answers it 404), it counts as `/svc/v2/generate`. A pattern with `//`
//! in it is a [`ConfigError`](crate::ConfigError): write single `/`s, under which requests
//! with `//` fall anyway. No form of a request that reaches a
//! handler escapes its route's quota. Inside `Router::nest` and `nest_service` axum strips the prefix from
//! the URI; with the `axum` feature the layer reads the path the client sent (`OriginalUri`),
//! so patterns are always written in full. Without the feature, put the layer on the
//! outermost router. A service that reads the path its own way (tower-http's `ServeDir`
//! decodes escapes, drops `./` and merges `//`) serves many spellings of one file: limit it
//! with a wildcard over its whole mount (`GET /static/{*path}`), not a pattern per file.
//!
//! **Memory.** Each client's limit takes a fixed 88 bytes whatever the quota (146 bytes per
//! tracked client in a full table, with the shadow of forgotten clients and the scan's
//! candidates around it, measured in `tests/alloc.rs`), so `per_hour(10_000)` costs what `per_minute(60)` does. A sliding
//! window is kept as 16 buckets: it never admits more than the count in any window of the
//! period, never refuses a client pacing itself at 90 % of its quota, and after a burst may
//! admit up to a sixteenth of the period later than an exact log would (`Retry-After: 64`
//! for a minute's quota used at once, while `RateLimit-Policy` states the quota itself,
//! `w=60`). A route tracks at most [`Builder::max_keys`] clients (65,536 by default: about
//! 12 MiB).
//!
//! **Floods.** A flood of fresh keys can neither grow memory nor lock newcomers out,
//! whatever it sends per key. A new client at a full table takes the place of the least-used
//! of 16 sampled clients if that one is below its quota, else of a client known to be below
//! it (a full scan keeps the sixteenth of the table that drops below soonest as candidates,
//! and runs again only once a client outside them may have), else, when every tracked client
//! is at its quota (quota-1 limits, or a flood that sends each fresh key its whole quota), of
//! the sampled client whose count clears first. A forgotten client's count goes to a
//! fixed-size shadow table (any of eight slots in two buckets) and is restored if it comes
//! back while the count still matters, so a client told to come back at a time is admitted
//! then; the shadow drops a count only for a heavier one, never for an equal one. The price, with bounded memory against an
//! unbounded supply of keys: a client whose count the shadow dropped starts afresh, and can
//! exceed its quota in that window by what it had counted (at most its quota). While any
//! tracked client is below its quota, only such clients are forgotten, so a client at its
//! quota is never let through; a flood of `u` requests per key costs this only to clients
//! that had counted at most `u`, and one that keeps every tracked client at its quota (which
//! costs it the whole quota of every fresh key it uses) also to clients at their quota, once
//! all eight of their shadow slots hold counts at least as heavy when they are forgotten.
//!
//! [`Quota`]: crate::Quota

mod builder;
mod client;
pub(crate) mod cost;
mod error;
mod handle;
mod layer;
mod permit;
mod reject;
pub(crate) mod server;
mod service;

pub use builder::{Builder, RejectConfig, WaitConfig};
pub use client::future::ResponseFuture;
pub use cost::{Quotas, ResponseHead};
pub use error::RateLimitError;
pub use handle::{KeyedRouteSnapshot, NextAdmission, RouteSnapshot};
pub use layer::{RateLimitByRoute, Reject, Wait};
pub use permit::Permit;
pub use reject::{EmptyBody, RejectReason, RejectResponse, Rejection};
pub use server::future::RejectFuture;
pub use server::key::{ForwardedHeader, MissingKey, RequestHead};
pub use server::tier::UnknownTier;
pub use service::RateLimitByRouteService;
