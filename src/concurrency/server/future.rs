//! The response future of server mode: the inner service's answer, its body read for the
//! job it shows, or a ready refusal.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Response, StatusCode};
use pin_project_lite::pin_project;

use super::body::{CreateSlot, KeyedPlanBody, StatusRead};

pin_project! {
    /// The response future of [`KeyedPlansService`](super::KeyedPlansService).
    ///
    /// Dropped before the answer is in (the caller gave up), a create's slot is held as an
    /// unknown outcome: the application may have made the job.
    pub struct KeyedPlanFuture<Fut, B, F> {
        #[pin]
        state: State<Fut, B, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Fut, B, F> {
        // Not about jobs.
        Pass { #[pin] future: Fut },
        // A create holding a slot.
        Create { #[pin] future: Fut, slot: Option<CreateSlot<F>> },
        // A status of a job its client holds.
        Status { #[pin] future: Fut, read: Option<StatusRead<F>> },
        // Refused.
        Rejected { response: Option<Response<B>> },
    }
}

impl<Fut, B, F> KeyedPlanFuture<Fut, B, F> {
    pub(super) fn pass(future: Fut) -> Self {
        Self {
            state: State::Pass { future },
        }
    }

    pub(super) fn create(future: Fut, slot: CreateSlot<F>) -> Self {
        Self {
            state: State::Create {
                future,
                slot: Some(slot),
            },
        }
    }

    pub(super) fn status(future: Fut, read: StatusRead<F>) -> Self {
        Self {
            state: State::Status {
                future,
                read: Some(read),
            },
        }
    }

    pub(super) fn rejected(response: Response<B>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<Fut, B, F, E> Future for KeyedPlanFuture<Fut, B, F>
where
    Fut: Future<Output = Result<Response<B>, E>>,
    F: Send + Sync + 'static,
{
    type Output = Result<Response<KeyedPlanBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Pass { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(KeyedPlanBody::plain)))
            }
            StateProj::Create { future, slot } => {
                // An error drops the slot unsettled: an unknown outcome.
                let response = ready!(future.poll(cx))?;
                let slot = slot.take().expect("polled after completion");
                Poll::Ready(Ok(match slot.answered(response.status()) {
                    Some(slot) => response.map(|body| KeyedPlanBody::read(body, Box::new(slot))),
                    None => response.map(KeyedPlanBody::plain),
                }))
            }
            StateProj::Status { future, read } => {
                let response = ready!(future.poll(cx))?;
                let read = read.take().expect("polled after completion");
                if response.status() == StatusCode::NOT_FOUND {
                    read.ended();
                    return Poll::Ready(Ok(response.map(KeyedPlanBody::plain)));
                }
                if !response.status().is_success() {
                    return Poll::Ready(Ok(response.map(KeyedPlanBody::plain)));
                }
                Poll::Ready(Ok(
                    response.map(|body| KeyedPlanBody::read(body, Box::new(read)))
                ))
            }
            StateProj::Rejected { response } => {
                let response = response.take().expect("polled after completion");
                Poll::Ready(Ok(response.map(KeyedPlanBody::plain)))
            }
        }
    }
}

impl<Fut, B, F> std::fmt::Debug for KeyedPlanFuture<Fut, B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Pass { .. } => "pass",
            State::Create { .. } => "create",
            State::Status { .. } => "status",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("KeyedPlanFuture")
            .field("state", &state)
            .finish()
    }
}
