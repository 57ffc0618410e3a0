//! [`RateLimitByRouteService`] in client mode: where a request is admitted at once, refused
//! at once, queued for its turn, or sent to ask a shared store for it.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use super::state::{admit, Admission};
use crate::rate_limit::cost::Costs;
use crate::rate_limit::layer::Wait;
use crate::rate_limit::service::RateLimitByRouteService;
use crate::readiness::{unready, waiting_clone};
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
            return ResponseFuture::passed(self.inner.call(request));
        };
        let costs = match shared.routes[route].is_weighed() {
            false => Costs::one(),
            true => shared.routes[route].weigh(&request),
        };
        #[cfg(feature = "redis")]
        if let Some(store) = &shared.config.store {
            let store = store.clone();
            return self.call_store(route, store, request, costs);
        }
        match admit(shared, route, true, costs) {
            Admission::Now(permit) => ResponseFuture::called(self.inner.call(request), permit),
            Admission::Queued(ticket) => {
                let max_wait = shared.config.max_wait;
                ResponseFuture::queued(waiting_clone(&mut self.inner), request, ticket, max_wait)
            }
            Admission::Refused(error) => {
                unready(&mut self.inner);
                ResponseFuture::refused(error)
            }
        }
    }
}

#[cfg(feature = "redis")]
impl<S: Clone> RateLimitByRouteService<S, Wait> {
    /// A request under a quota kept in a shared store: it asks the store for its turn.
    /// Out of line, so that the in-memory path stays as small as it was.
    #[inline(never)]
    fn call_store<B>(
        &mut self,
        route: usize,
        store: crate::store::StoreHandle,
        request: Request<B>,
        costs: Costs,
    ) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        let handle = self.mode.0.clone();
        let asked = &handle.routes[route];
        let state = crate::lock::lock(&asked.state);
        if let Some(error) = asked.too_high(&state, &costs) {
            drop(state);
            unready(&mut self.inner);
            let events = &handle.events;
            events.emit(route, |layer, route| crate::event::Event::Refused {
                layer,
                route,
                reason: error.refusal(),
            });
            return ResponseFuture::refused(error);
        }
        let rates = state.rates().copied().collect();
        drop(state);
        let (learn, max_wait) = (handle.routes[route].learn, handle.config.max_wait);
        let inner = waiting_clone(&mut self.inner);
        let turn =
            super::store::StoreTurn::new(handle, route, store, rates, costs, learn, max_wait);
        ResponseFuture::from_store(super::store::StoreRequest::new(inner, request, turn))
    }
}
