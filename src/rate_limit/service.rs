//! [`RateLimitByRouteService`] in client mode: where a request is admitted at once, refused
//! at once, or queued for its turn.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::error::RateLimitError;
use super::future::ResponseFuture;
use super::layer::Wait;
use super::remote::StoreTurn;
use super::state::{lock, Permit, TurnTicket};
use crate::store::StoreHandle;
use crate::BoxError;

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

impl<S, B, ResBody> Service<Request<B>> for RateLimitByRouteService<S, Wait>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = &self.mode.0;
        let Some(route) = shared.table.lookup(request.method(), request.uri().path()) else {
            return ResponseFuture::called(self.inner.call(request), None);
        };
        if let Some(store) = &shared.config.store {
            let store = store.clone();
            return self.call_store(route, store, request);
        }
        let mut state = lock(&shared.routes[route].state);
        if let Some(permit) = Permit::try_acquire(shared, &mut state, route) {
            drop(state);
            return ResponseFuture::called(self.inner.call(request), Some(permit));
        }
        if let Some(max_queue) = state.queue_full(shared.config.max_queue) {
            drop(state);
            let route = shared.routes[route].name.clone();
            unready(&mut self.inner);
            return ResponseFuture::refused(RateLimitError::QueueFull { route, max_queue });
        }
        let now = state.now(&shared.clock);
        let max_wait = shared.config.max_wait;
        if let Some(max_wait) = max_wait {
            let ahead = state.waiters.len() as u32;
            let rate = state.rate;
            let turn = state.limiter.estimate(&rate, now, ahead);
            if turn.saturating_sub(now) > crate::clock::nanos(max_wait) {
                drop(state);
                unready(&mut self.inner);
                let route = shared.routes[route].name.clone();
                return ResponseFuture::refused(RateLimitError::wait_too_long(
                    route, now, turn, max_wait,
                ));
            }
        }
        let ticket = TurnTicket::join(shared, &mut state, route, now);
        drop(state);
        ResponseFuture::queued(self.waiting_inner(), request, ticket, max_wait)
    }
}

impl<S: Clone> RateLimitByRouteService<S, Wait> {
    /// A request under a quota kept in a shared store: it asks the store for its turn.
    /// Out of line, so that the in-memory path stays as small as it was.
    #[inline(never)]
    fn call_store<B>(
        &mut self,
        route: usize,
        store: StoreHandle,
        request: Request<B>,
    ) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        let handle = self.mode.0.clone();
        let rate = lock(&handle.routes[route].state).rate;
        let (learn, max_wait) = (handle.routes[route].learn, handle.config.max_wait);
        let inner = self.waiting_inner();
        let turn = StoreTurn::new(handle, route, store, rate, learn, max_wait);
        ResponseFuture::from_store(inner, request, turn)
    }
}

/// Gives back what the caller's `poll_ready` reserved, for a call that sends nothing now:
/// swaps the service for a clone, which has not been driven ready.
fn unready<S: Clone>(inner: &mut S) {
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
