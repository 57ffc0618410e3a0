//! The response future of server mode: the inner service's answer, its body read for the
//! job it shows, or a ready refusal. A create whose slot a shared store gives waits for it in
//! the store's own type ([`StoreTake`](super::store)) first.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{CreateSlot, KeyedPlanBody, StatusRead};

/// The store path of a create, when the crate has one.
#[cfg(feature = "redis")]
type StorePath<S, B, F> = Box<super::store::StoreTake<S, B, F>>;
#[cfg(not(feature = "redis"))]
type StorePath<S, B, F> = crate::store::NoStore<(S, B, F)>;

pin_project! {
    /// The response future of [`KeyedPlansService`](super::KeyedPlansService).
    ///
    /// Dropped before the answer is in (the caller gave up), a create's slot is held as an
    /// unknown outcome: the application may have made the job.
    pub struct KeyedPlanFuture<S, B, F>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, S::Response, StorePath<S, B, F>, F>,
    }
}

pin_project! {
    #[project = StateProj]
    pub(super) enum State<Fut, R, W, F> {
        // Not about jobs.
        Pass { #[pin] future: Fut },
        // A create holding a slot.
        Create { #[pin] future: Fut, slot: Option<CreateSlot<F>> },
        // A status of a job its client holds.
        Status { #[pin] future: Fut, read: Option<StatusRead<F>> },
        // Refused.
        Rejected { response: Option<R> },
        // Waiting for a shared store's slot.
        Store { take: W },
    }
}

impl<S, B, F> KeyedPlanFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    pub(super) fn pass(future: S::Future) -> Self {
        Self {
            state: State::Pass { future },
        }
    }

    pub(super) fn create(future: S::Future, slot: CreateSlot<F>) -> Self {
        Self {
            state: State::Create {
                future,
                slot: Some(slot),
            },
        }
    }

    pub(super) fn status(future: S::Future, read: StatusRead<F>) -> Self {
        Self {
            state: State::Status {
                future,
                read: Some(read),
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
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    #[cfg(feature = "redis")]
    pub(super) fn store(take: super::store::StoreTake<S, B, F>) -> Self {
        Self {
            state: State::Store {
                take: Box::new(take),
            },
        }
    }
}

impl<S, B, F, ResBody> Future for KeyedPlanFuture<S, B, F>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    F: super::RejectPlan<ResBody> + Send + Sync + 'static,
{
    type Output = Result<Response<KeyedPlanBody<ResBody>>, S::Error>;

    // Without a store, nothing loops: each state answers.
    #[cfg_attr(not(feature = "redis"), allow(clippy::never_loop))]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Pass { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(KeyedPlanBody::plain)));
                }
                StateProj::Create { future, slot } => {
                    // An error drops the slot unsettled: an unknown outcome.
                    let response = ready!(future.poll(cx))?;
                    let slot = slot.take().expect("polled after completion");
                    return Poll::Ready(Ok(match slot.answered(response.status()) {
                        Some(slot) => {
                            response.map(|body| KeyedPlanBody::read(body, Box::new(slot)))
                        }
                        None => response.map(KeyedPlanBody::plain),
                    }));
                }
                StateProj::Status { future, read } => {
                    let response = ready!(future.poll(cx))?;
                    let read = read.take().expect("polled after completion");
                    if response.status() == StatusCode::NOT_FOUND {
                        read.ended();
                    }
                    if !response.status().is_success() {
                        return Poll::Ready(Ok(response.map(KeyedPlanBody::plain)));
                    }
                    return Poll::Ready(Ok(
                        response.map(|body| KeyedPlanBody::read(body, Box::new(read)))
                    ));
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response.map(KeyedPlanBody::plain)));
                }
                StateProj::Store { take } => {
                    #[cfg(feature = "redis")]
                    match ready!(take.poll_take(cx)) {
                        Ok(next) => state.set(next),
                        Err(error) => return Poll::Ready(Err(error)),
                    }
                    #[cfg(not(feature = "redis"))]
                    take.never()
                }
            }
        }
    }
}

impl<S, B, F> std::fmt::Debug for KeyedPlanFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Pass { .. } => "pass",
            State::Create { .. } => "create",
            State::Status { .. } => "status",
            State::Rejected { .. } => "rejected",
            State::Store { .. } => "store",
        };
        f.debug_struct("KeyedPlanFuture")
            .field("state", &state)
            .finish()
    }
}
