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

/// Gives back what the caller's `poll_ready` reserved, for a call that sends nothing now:
/// swaps the service for a clone, which has not been driven ready.
pub(super) fn unready<S: Clone>(inner: &mut S) {
    *inner = inner.clone();
}

impl<S: Clone, M> RateLimitByRouteService<S, M> {
    /// The service a request that waits (for its turn, or the store's verdict) will call: a
    /// clone of its own, not driven ready, which it drives ready when its turn comes. The
    /// service the caller drove ready gives back what that readiness reserved (a `Buffer`
    /// slot, a `ConcurrencyLimit` permit) for the wait; the caller's next `poll_ready`
    /// reserves again.
    pub(super) fn waiting_inner(&mut self) -> S {
        let waiting = self.inner.clone();
        unready(&mut self.inner);
        waiting
    }
}
