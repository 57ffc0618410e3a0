use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::error::RateLimitError;
use super::remote::{Outcome, SharedTurn};
use super::state::{lock, Permit, Ticket, Turn};
use crate::clock::{nanos, Nanos};
use crate::store::{FailMode, Op};
use crate::BoxError;

pin_project! {
    /// The response future of client mode: waits for the request's turn, sends it, and gives
    /// its place back (learning from the response) when the answer arrives.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, Result<S::Response, S::Error>>,
        // Boxed: only a request that waits (or asks a shared store) needs it, and it keeps the
        // future small.
        aside: Option<Box<Aside<S, B>>>,
        permit: Option<Permit>,
    }
}

/// What a request that is not sent at once keeps aside.
#[allow(clippy::large_enum_variant)] // boxed as a whole, and made once per request
enum Aside<S, B> {
    /// Waiting in the route's queue.
    Queued(Queued<S, B>),
    /// Asking the shared store for its turn, then holding its place there.
    Shared(SharedTurn<S, B>),
}

fn queued<S, B>(aside: &mut Option<Box<Aside<S, B>>>) -> Option<&mut Queued<S, B>> {
    match aside.as_deref_mut() {
        Some(Aside::Queued(queued)) => Some(queued),
        _ => None,
    }
}

fn shared<S, B>(aside: &mut Option<Box<Aside<S, B>>>) -> Option<&mut SharedTurn<S, B>> {
    match aside.as_deref_mut() {
        Some(Aside::Shared(turn)) => Some(turn),
        _ => None,
    }
}

fn take_queued<S, B>(aside: &mut Option<Box<Aside<S, B>>>) -> Option<Queued<S, B>> {
    match aside.take().map(|aside| *aside) {
        Some(Aside::Queued(queued)) => Some(queued),
        _ => None,
    }
}

/// A request waiting for its turn, with the service that will send it.
struct Queued<S, B> {
    inner: S,
    request: Request<B>,
    ticket: Ticket,
    max_wait: Option<Duration>,
    /// When the maximum wait runs out, if there is one.
    deadline: Option<Nanos>,
}

pin_project! {
    #[project = StateProj]
    enum State<F, A> {
        // In the route's queue; the timer is not made yet.
        Queued,
        // In the route's queue, with a timer for a known turn or the maximum wait (boxed,
        // made once per waiting request and reset in place).
        Waiting { sleep: Pin<Box<Sleep>> },
        // Asking the shared store for its turn.
        Shared,
        // Sent.
        Called { #[pin] future: F },
        // Answered; giving its place in the shared store back before answering (boxed: only
        // a layer with a shared store comes here).
        Releasing { op: Op, answer: Option<Box<A>> },
        // Given back unsent.
        Failed { error: Option<RateLimitError> },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, permit: Option<Permit>) -> Self {
        Self {
            state: State::Called { future },
            aside: None,
            permit,
        }
    }

    pub(crate) fn shared(turn: SharedTurn<S, B>) -> Self {
        Self {
            state: State::Shared,
            aside: Some(Box::new(Aside::Shared(turn))),
            permit: None,
        }
    }

    pub(crate) fn queued(
        inner: S,
        request: Request<B>,
        ticket: Ticket,
        max_wait: Option<Duration>,
    ) -> Self {
        Self {
            state: State::Queued,
            aside: Some(Box::new(Aside::Queued(Queued {
                inner,
                request,
                deadline: max_wait.map(|max| ticket.since.saturating_add(nanos(max))),
                ticket,
                max_wait,
            }))),
            permit: None,
        }
    }

    pub(crate) fn too_long(route: Arc<str>, wait: Duration, max_wait: Duration) -> Self {
        Self {
            state: State::Failed {
                error: Some(RateLimitError::WaitTooLong {
                    route,
                    wait,
                    max_wait,
                }),
            },
            aside: None,
            permit: None,
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The path of nearly every request, kept small: sent at once, answered.
        let this = self.as_mut().project();
        if let (StateProj::Called { future }, Some(_)) = (this.state.project(), &this.permit) {
            let result = ready!(future.poll(cx));
            if let Some(permit) = this.permit.take() {
                settle(permit, &result);
            }
            return Poll::Ready(result.map_err(Into::into));
        }
        self.poll_slow(cx)
    }
}

/// Gives a place back once its request is answered, learning from the response.
#[inline]
fn settle<ResBody, E>(permit: Permit, result: &Result<Response<ResBody>, E>) {
    match result {
        Ok(response) => permit.finish(response),
        // The server may have counted it: the drop gives the place back from now, like a
        // response.
        Err(_) => drop(permit),
    }
}

impl<S, B, ResBody> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    /// Everything else: waiting for a turn, asking a shared store, giving a place back there.
    #[inline(never)]
    fn poll_slow(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResBody>, BoxError>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx));
                    if let Some(permit) = this.permit.take() {
                        settle(permit, &result);
                    } else if let Some(place) = shared(this.aside).and_then(|t| t.place.take()) {
                        let op = place.finish(result.as_ref().ok());
                        this.state.set(State::Releasing {
                            op,
                            answer: Some(Box::new(result)),
                        });
                        continue;
                    }
                    return Poll::Ready(result.map_err(Into::into));
                }
                StateProj::Releasing { op, answer } => {
                    if let Err(error) = ready!(Pin::new(op).poll(cx)) {
                        tracing::debug!(%error, "a place could not be given back: it expires with its lease");
                    }
                    return Poll::Ready(match answer.take() {
                        Some(answer) => (*answer).map_err(Into::into),
                        None => Err("rate limit future polled after completion".into()),
                    });
                }
                StateProj::Shared => {
                    let Some(turn) = shared(this.aside) else {
                        return Poll::Ready(Err("rate limit future in an invalid state".into()));
                    };
                    let outcome = ready!(turn.poll_turn(cx));
                    if let Outcome::Admitted(place) = outcome {
                        turn.place = Some(place);
                        let Some((mut inner, request)) = turn.call.take() else {
                            return Poll::Ready(
                                Err("rate limit future in an invalid state".into()),
                            );
                        };
                        this.state.set(State::Called {
                            future: inner.call(request),
                        });
                        continue;
                    }
                    let Some(Aside::Shared(mut turn)) = this.aside.take().map(|a| *a) else {
                        return Poll::Ready(Err("rate limit future in an invalid state".into()));
                    };
                    match outcome {
                        Outcome::Admitted(_) => {}
                        Outcome::TooLong(error) => {
                            this.state.set(State::Failed { error: None });
                            return Poll::Ready(Err(error.into()));
                        }
                        Outcome::Failed(error) => {
                            if turn.store().fail_mode() == FailMode::Closed {
                                this.state.set(State::Failed { error: None });
                                return Poll::Ready(Err(error.into()));
                            }
                            tracing::warn!(%error, "the shared quota store failed: this request counts against the local quota");
                            let Some((mut inner, request)) = turn.call.take() else {
                                return Poll::Ready(Err(
                                    "rate limit future in an invalid state".into()
                                ));
                            };
                            let SharedTurn {
                                handle,
                                route,
                                max_wait,
                                ..
                            } = turn;
                            let mut state = lock(&handle.routes[route].state);
                            if let Some(permit) = Permit::try_acquire(&handle, &mut state, route) {
                                drop(state);
                                *this.permit = Some(permit);
                                this.state.set(State::Called {
                                    future: inner.call(request),
                                });
                            } else {
                                let now = state.now(&handle.clock);
                                let ticket = Ticket::join(&handle, &mut state, route, now);
                                drop(state);
                                *this.aside = Some(Box::new(Aside::Queued(Queued {
                                    inner,
                                    request,
                                    deadline: max_wait
                                        .map(|max| ticket.since.saturating_add(nanos(max))),
                                    ticket,
                                    max_wait,
                                })));
                                this.state.set(State::Queued);
                            }
                        }
                    }
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(error) => error.into(),
                        None => "rate limit future polled after completion".into(),
                    }));
                }
                StateProj::Queued => {
                    let Some(queued) = queued(this.aside) else {
                        return Poll::Ready(Err("rate limit future in an invalid state".into()));
                    };
                    let deadline = queued
                        .ticket
                        .clock()
                        .instant(queued.deadline.unwrap_or(u64::MAX));
                    this.state.set(State::Waiting {
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    });
                }
                StateProj::Waiting { sleep } => {
                    let Some(queued) = queued(this.aside) else {
                        return Poll::Ready(Err("rate limit future in an invalid state".into()));
                    };
                    match queued.ticket.poll_turn(cx) {
                        Turn::Admitted(permit) => {
                            if let Some(queued) = take_queued(this.aside) {
                                let Queued {
                                    mut inner, request, ..
                                } = queued;
                                *this.permit = Some(permit);
                                this.state.set(State::Called {
                                    future: inner.call(request),
                                });
                            }
                        }
                        Turn::Wait(turn) => {
                            let clock = *queued.ticket.clock();
                            let now = clock.now();
                            let deadline = queued.deadline;
                            if let (Some(deadline), Some(max_wait)) = (deadline, queued.max_wait) {
                                if now >= deadline {
                                    let wait =
                                        queued.ticket.estimate().max(now) - queued.ticket.since;
                                    let route = queued.ticket.route_name().clone();
                                    // Leave the queue before answering.
                                    *this.aside = None;
                                    this.state.set(State::Failed { error: None });
                                    return Poll::Ready(Err(RateLimitError::WaitTooLong {
                                        route,
                                        wait: Duration::from_nanos(wait),
                                        max_wait,
                                    }
                                    .into()));
                                }
                            }
                            let wake = match (turn, deadline) {
                                (Some(turn), Some(deadline)) => Some(turn.min(deadline)),
                                (turn, deadline) => turn.or(deadline),
                            };
                            let Some(wake) = wake else {
                                // Woken by the queue when it moves.
                                return Poll::Pending;
                            };
                            let wake = clock.instant(wake);
                            if sleep.deadline() != wake {
                                sleep.as_mut().reset(wake);
                            }
                            if sleep.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("aside", &self.aside.is_some())
            .field("sent", &self.permit.is_some())
            .finish()
    }
}
