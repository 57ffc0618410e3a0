//! [`RateLimitByRouteService`] in client mode: where a request is admitted at once, refused
//! at once, queued for its turn, or sent to ask a shared store for it.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use super::state::{lock, Permit, TurnTicket};
use super::store::StoreTurn;
use crate::rate_limit::error::RateLimitError;
use crate::rate_limit::layer::Wait;
use crate::rate_limit::service::RateLimitByRouteService;
use crate::readiness::{unready, waiting_clone};
use crate::store::StoreHandle;
use crate::BoxError;

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
        ResponseFuture::queued(waiting_clone(&mut self.inner), request, ticket, max_wait)
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
        let inner = waiting_clone(&mut self.inner);
        let turn = StoreTurn::new(handle, route, store, rate, learn, max_wait);
        ResponseFuture::from_store(inner, request, turn)
    }
}
