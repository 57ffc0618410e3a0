//! Tower middleware for living within an HTTP API's limits, from either side of the wire.
//!
//! Job APIs publish per-route request rates ("`POST /v2/generate`: 60 requests per minute,
//! every other endpoint 600") and answer `429 Too Many Requests` on excess. This crate
//! provides [`tower::Layer`]s that keep a client inside those limits, or make a server
//! enforce them:
//!
//! - [`RateLimitByRoute`]: per-route quotas. As a client it makes each request wait for its
//!   turn so the server never sees more than the quota; as a server (`.reject()`) it answers
//!   the excess with a `429` and a `Retry-After` that says exactly when to come back.
//! - [`ConcurrencyLimitByPlan`]: job slots per subscription plan, each held for its job's
//!   whole life (until the job is seen to end), not just its HTTP request.
//! - [`Backoff429`]: retries 429s with exponential backoff and jitter, honouring
//!   `Retry-After`, and, given a classifier (Sync's is in [`presets::sync`]), telling a
//!   rate-limit 429 from a concurrency one.
//!
//! The layers assume nothing of any vendor; [`presets`] holds what one vendor's API needs.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_quota::{Quota, RateLimitByRoute};
//! # fn wrap<S>(client: S) -> Result<(), tower_quota::ConfigError> {
//! let limits = RateLimitByRoute::builder()
//!     .route("POST /v2/generate", Quota::per_minute(60))
//!     .default_quota(Quota::per_minute(600)) // every other route
//!     .build()?;
//! let svc = ServiceBuilder::new().layer(limits.clone()).service(client);
//! # drop(svc);
//! # Ok(())
//! # }
//! ```
//!
//! Every clone of a layer, and every service it makes, shares one set of counters: cloning
//! never creates a new limit. Keep a clone of the layer to look inside it
//! ([`RateLimitByRoute::snapshot`]) or to change a quota at run time.
//!
//! All timing runs on [`tokio::time`], so every behaviour can be tested on a paused clock.
//!
//! # Events, counters and metrics
//!
//! Every snapshot carries cumulative counters, each builder takes a `name` and an `on_event`
//! listener of typed [`event::Event`]s (see [`event`]), and with the feature `metrics` every
//! layer records its counters, gauges and histograms through the
//! [`metrics`](https://docs.rs/metrics) facade; the README lists the metrics and their labels.
//!
//! # Logging
//!
//! The crate logs through [`tracing`], with one level policy: what a server sends that cannot
//! be read (a malformed header, a body that is not JSON) is `debug`; this crate's own leaks
//! (a job slot whose lease ran out) and a shared store's failures are `warn`, a store's
//! failure once when it begins (each further one at `debug`, its end at `info`); a setting
//! that makes a layer fail every request is `error`, once; nothing is logged per request
//! above `debug`. Targets are the module paths, so a filter such as
//! `tower_quota::rate_limit=debug,tower_quota::store=warn` picks a layer:
//! `tower_quota::rate_limit`, `tower_quota::concurrency`, `tower_quota::backoff`,
//! `tower_quota::store`, `tower_quota::headers` and `tower_quota::limiter`. A request that
//! waits or is retried runs in a span at `debug`: `rate_limit_wait` (field `route`) while it
//! waits in its route's queue, `plan_wait` (`plan`) while a create waits for a slot, and
//! `backoff_retry` (`attempt`, the latest) once it has been refused and retried.

#![cfg_attr(docsrs, feature(doc_cfg))]

/// `get_ref`, `get_mut` and `into_inner`, written once for the layers' services, each of
/// which wraps its inner service `S` in a field `inner`.
macro_rules! inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes the service, returning the inner one.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

/// `name`, `metrics` and `on_event`, written once for the builders of the rate-limit and
/// plan layers, each of which keeps its events' settings in a field `events`.
macro_rules! event_setters {
    ($default:literal) => {
        #[doc = concat!("Names the layer (default `", $default, "`): the `layer` of its")]
        /// [`Event`](crate::event::Event)s and the `layer` label of its metrics, to tell
        /// several layers of a kind apart.
        pub fn name(mut self, name: impl Into<String>) -> Self {
            self.events.name = Some(name.into().into());
            self
        }

        /// Whether the layer records its metrics through the `metrics` facade (default: yes,
        /// with feature `metrics`). Its events and counters are kept either way.
        #[cfg(feature = "metrics")]
        pub fn metrics(mut self, enabled: bool) -> Self {
            self.events.metrics = enabled;
            self
        }

        /// Calls `listener` with each of the layer's [`Event`](crate::event::Event)s as it
        /// happens (see [`event`](crate::event)). A second call replaces the first listener.
        pub fn on_event<L>(mut self, listener: L) -> Self
        where
            L: Fn(&crate::event::Event<'_>) + Send + Sync + 'static,
        {
            self.events.listener(listener);
            self
        }
    };
}

pub mod backoff;
mod builder;
mod clock;
pub mod concurrency;
#[cfg(feature = "serde")]
pub mod config;
mod error;
pub mod event;
mod handoff;
pub mod headers;
mod json;
mod limiter;
mod lock;
#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "reqwest-middleware")]
pub mod middleware;
pub mod presets;
mod queue;
mod quota;
pub mod rate_limit;
mod readiness;
mod route;
pub mod store;

pub use backoff::Backoff429;
pub use builder::ServiceBuilderExt;
pub use concurrency::{ConcurrencyLimitByPlan, Plan};
pub use error::ConfigError;
pub use quota::{ParseQuotaError, Quota};
pub use rate_limit::RateLimitByRoute;
pub use rate_limit::RequestHead;

/// Alias for a type-erased error type, as used by tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The README's snippets, compiled as doctests (with every feature, as CI runs them).
#[cfg(all(
    doctest,
    feature = "axum",
    feature = "redis",
    feature = "redis-tls",
    feature = "serde",
    feature = "reqwest-middleware",
    feature = "sync-webhook",
    feature = "metrics"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
