//! [`RateLimitByRouteService`]: the service a layer makes, in either mode (each mode's
//! `Service` impl is in its own part).

use super::layer::Wait;

/// The service made by a [`RateLimitByRoute`](super::RateLimitByRoute) layer.
///
/// `poll_ready` forwards to the inner service: which quota a request needs is only known from
/// the request, so waiting happens in the response future. In client mode a request that
/// waits does so with a clone of the inner service that it drives ready when its turn comes
/// (see [the module docs](super#client-mode-readiness-queues-abandoned-requests)).
#[derive(Debug, Clone)]
pub struct RateLimitByRouteService<S, M = Wait> {
    pub(super) inner: S,
    pub(super) mode: M,
}

impl<S, M> RateLimitByRouteService<S, M> {
    pub(crate) fn new(inner: S, mode: M) -> Self {
        Self { inner, mode }
    }

    inner_service_accessors!();
}
