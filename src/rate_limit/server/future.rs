//! The response future of server mode: the inner service's answer with the rate-limit fields
//! added, or a ready refusal. A request whose verdict comes from a shared store waits for it
//! in the store's own type ([`StoreHit`](super::store)) first.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::state::RateLimitFields;
use crate::clock::Nanos;
use crate::rate_limit::cost::{Costs, ResponseHead};
use crate::rate_limit::layer::Reject;
use crate::rate_limit::reject::RejectResponse;

/// The store path of a request, when the crate has one.
#[cfg(feature = "redis")]
type StorePath<S, B, F> = Box<super::store::StoreHit<S, B, F>>;
#[cfg(not(feature = "redis"))]
type StorePath<S, B, F> = crate::store::NoStore<(S, B, F)>;

pin_project! {
    /// The response future of server mode: the inner service's (with the rate-limit fields
    /// added), or a ready refusal, or, with a shared store, the store's verdict first.
    ///
    /// Like every response future of this crate, it panics if polled again after it returned
    /// `Poll::Ready`.
    pub struct RejectFuture<S, B, F>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, S::Response, StorePath<S, B, F>, Box<Correction<F>>>,
    }
}

/// What a request whose cost is corrected from its response needs to correct it: its
/// client, when it was counted, and what it was counted for.
pub(crate) struct Correction<F> {
    pub(crate) layer: Reject<F>,
    pub(crate) route: usize,
    pub(crate) key: u64,
    /// The client's tier, if the layer has tiers.
    pub(crate) tier: Option<usize>,
    pub(crate) at: Nanos,
    pub(crate) taken: Costs,
    #[cfg(feature = "redis")]
    /// With a shared store: the client's limit there, its quotas, and when the store
    /// counted the request (microseconds, on its clock).
    pub(crate) store: Option<(String, Box<[crate::quota::Rate]>, u64)>,
}

impl<F> Correction<F> {
    /// Counts the request's true cost, read from its response.
    fn correct<B>(self, response: &Response<B>) {
        let shared = &self.layer.0;
        let route = &shared.routes[self.route];
        let Some(weighing) = &route.weighing else {
            return;
        };
        let Some(cost) = weighing.answered(&self.taken, &ResponseHead::of(response)) else {
            return;
        };
        let now = shared.clock.now();
        #[cfg(feature = "redis")]
        if let (Some((name, rates, at)), Some(store)) = (&self.store, &shared.config.store) {
            let quotas = crate::store::StoreQuotas::new(rates, &self.taken, &cost);
            return store.correct(name, quotas, *at);
        }
        route.correct(self.key, self.tier, now, self.at, &self.taken, &cost);
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateReplace]
    pub(super) enum State<Fut, R, H, C> {
        // Sent; its response gets the rate-limit fields, if any.
        Inner { #[pin] future: Fut, fields: Option<RateLimitFields> },
        // Sent, its cost to be corrected from its response.
        Corrected { #[pin] future: Fut, fields: Option<RateLimitFields>, correction: Option<C> },
        // Refused, with the response to give.
        Rejected { response: R },
        // Waiting for a shared store's verdict.
        Store { hit: H },
        // Answered.
        Done,
    }
}

impl<S, B, F> RejectFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    pub(super) fn inner(future: S::Future, fields: Option<RateLimitFields>) -> Self {
        Self {
            state: State::Inner { future, fields },
        }
    }

    pub(super) fn corrected(
        future: S::Future,
        fields: Option<RateLimitFields>,
        correction: Correction<F>,
    ) -> Self {
        Self {
            state: State::Corrected {
                future,
                fields,
                correction: Some(Box::new(correction)),
            },
        }
    }

    /// A refusal, answered without a call to `inner`: the readiness its caller reserved
    /// below (a `Buffer` slot, a `ConcurrencyLimit` permit) is given back, not kept by an
    /// idle service instance.
    pub(super) fn rejected(inner: &mut S, response: S::Response) -> Self
    where
        S: Clone,
    {
        crate::readiness::unready(inner);
        Self {
            state: State::Rejected { response },
        }
    }

    #[cfg(feature = "redis")]
    pub(super) fn store(hit: super::store::StoreHit<S, B, F>) -> Self {
        Self {
            state: State::Store { hit: Box::new(hit) },
        }
    }
}

impl<S, B, F, ResBody> Future for RejectFuture<S, B, F>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    F: RejectResponse<ResBody>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    // Without a store, nothing loops: each state answers.
    #[cfg_attr(not(feature = "redis"), allow(clippy::never_loop))]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Inner { future, fields } => {
                    let result = ready!(future.poll(cx));
                    let fields = fields.take();
                    state.set(State::Done);
                    let mut response = result?;
                    if let Some(fields) = fields {
                        fields.apply(&mut response);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Corrected {
                    future,
                    fields,
                    correction,
                } => {
                    let result = ready!(future.poll(cx));
                    let (fields, correction) = (fields.take(), correction.take());
                    state.set(State::Done);
                    let mut response = result?;
                    if let Some(correction) = correction {
                        correction.correct(&response);
                    }
                    if let Some(fields) = fields {
                        fields.apply(&mut response);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Rejected { .. } => {
                    let StateReplace::Rejected { response } = state.project_replace(State::Done)
                    else {
                        unreachable!()
                    };
                    return Poll::Ready(Ok(response));
                }
                StateProj::Store { hit } => {
                    #[cfg(feature = "redis")]
                    match ready!(hit.poll_verdict(cx)) {
                        Ok(next) => state.set(next),
                        Err(error) => {
                            state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    }
                    #[cfg(not(feature = "redis"))]
                    hit.never()
                }
                StateProj::Done => panic!("`RejectFuture` polled after completion"),
            }
        }
    }
}

impl<S, B, F> std::fmt::Debug for RejectFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Inner { .. } => "inner",
            State::Corrected { .. } => "corrected",
            State::Rejected { .. } => "rejected",
            State::Store { .. } => "store",
            State::Done => "done",
        };
        f.debug_struct("RejectFuture")
            .field("state", &state)
            .finish()
    }
}
