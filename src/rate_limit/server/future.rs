//! The response future of server mode: the inner service's answer with the rate-limit fields
//! added, a ready refusal, or the shared store's verdict first.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::state::{Refused, Stamp};
use crate::rate_limit::layer::Reject;
use crate::rate_limit::reject::{rejection, RejectReason, RejectResponse};
use crate::store::{Decision, FailMode, StoreCall, StoreError};

pin_project! {
    /// The response future of server mode: the inner service's (with the rate-limit fields
    /// added), or a ready refusal, or, with a shared store, the store's verdict first.
    pub struct RejectFuture<S, B, F>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, S::Response, Box<StoreHit<S, B, F>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Fut, R, H> {
        // Sent; its response gets the rate-limit fields, if any.
        Inner { #[pin] future: Fut, stamp: Option<Stamp> },
        // Refused, with the response to give.
        Rejected { response: Option<R> },
        // Waiting for a shared store's verdict.
        Store { hit: H },
    }
}

/// What a request whose verdict the shared store gave becomes.
type NextState<S, B, F> = State<
    <S as Service<Request<B>>>::Future,
    <S as Service<Request<B>>>::Response,
    Box<StoreHit<S, B, F>>,
>;

/// A request whose verdict the shared store is deciding.
pub(crate) struct StoreHit<S, B, F> {
    /// A clone of the inner service, readied once the request may go.
    pub(super) inner: S,
    pub(super) request: Option<Request<B>>,
    pub(super) call: StoreCall,
    pub(super) layer: Reject<F>,
    pub(super) route: usize,
    /// The client's key in this process's own limiter, for [`FailMode::Open`].
    pub(super) local_key: u64,
    /// Once admitted: the fields of its response, while the inner service gets ready.
    pub(super) admitted: Option<Option<Stamp>>,
}

impl<S, B, F> RejectFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    pub(super) fn inner(future: S::Future, stamp: Option<Stamp>) -> Self {
        Self {
            state: State::Inner { future, stamp },
        }
    }

    pub(super) fn rejected(response: S::Response) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    pub(super) fn store(hit: StoreHit<S, B, F>) -> Self {
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { future, stamp } => {
                    let mut response = ready!(future.poll(cx))?;
                    if let Some(stamp) = stamp.take() {
                        stamp.apply(&mut response);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Rejected { response } => {
                    let response = response
                        .take()
                        .expect("a refusal's future polled after it answered");
                    return Poll::Ready(Ok(response));
                }
                StateProj::Store { hit } => {
                    let next = ready!(hit.poll_verdict(cx))?;
                    this.state.set(next);
                }
            }
        }
    }
}

impl<S, B, F, ResBody> StoreHit<S, B, F>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    F: RejectResponse<ResBody>,
{
    /// Waits for the store's verdict; once admitted, readies the inner service and sends.
    fn poll_verdict(&mut self, cx: &mut Context<'_>) -> Poll<Result<NextState<S, B, F>, S::Error>> {
        if self.admitted.is_none() {
            let decision = ready!(Pin::new(&mut self.call).poll(cx));
            match self.verdict(decision) {
                Ok(stamp) => self.admitted = Some(stamp),
                Err(refused) => {
                    let shared = &self.layer.0;
                    let name = &shared.routes[self.route].name;
                    return Poll::Ready(Ok(State::Rejected {
                        response: Some(rejection(&shared.config, name, refused)),
                    }));
                }
            }
        }
        // Admitted: only now is the inner service driven ready.
        if let Err(error) = ready!(self.inner.poll_ready(cx)) {
            self.request = None;
            return Poll::Ready(Err(error));
        }
        let Some(request) = self.request.take() else {
            unreachable!("a store verdict polled after it was given");
        };
        Poll::Ready(Ok(State::Inner {
            future: self.inner.call(request),
            stamp: self.admitted.take().flatten(),
        }))
    }

    /// What the store's answer means for this request: the fields of its response, or why
    /// it is refused.
    fn verdict(&self, decision: Result<Decision, StoreError>) -> Result<Option<Stamp>, Refused> {
        let shared = &self.layer.0;
        let route = &shared.routes[self.route];
        let config = &shared.config;
        let refused = |wait: Duration, reason| Refused {
            wait,
            quota: route.quota(),
            reason,
        };
        match decision {
            Ok(Decision::Counted { remaining, reset }) if config.headers => {
                Ok(Some(route.stamp(remaining, reset)))
            }
            Ok(Decision::Admitted | Decision::Counted { .. }) => Ok(None),
            // Nothing is in flight in server mode; should it ever be, a period is safe.
            Ok(Decision::Wait(wait)) => Err(refused(
                wait.unwrap_or(route.quota().period()),
                RejectReason::Quota,
            )),
            Err(error) => match config.store.as_ref().map(|s| s.fail_mode()) {
                Some(FailMode::Closed) => {
                    tracing::warn!(%error, "the shared quota store failed: refusing");
                    Err(refused(
                        Duration::from_secs(1),
                        RejectReason::StoreUnavailable,
                    ))
                }
                _ => {
                    tracing::warn!(%error, "the shared quota store failed: counting against this server's own quota");
                    route.hit(self.local_key, shared.clock.now(), config.headers)
                }
            },
        }
    }
}

impl<S, B, F> std::fmt::Debug for RejectFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectFuture").finish_non_exhaustive()
    }
}
