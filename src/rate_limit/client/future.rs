//! The response future of client mode: a request sent at once, or one waiting for its turn
//! (in the route's queue or in a shared store) and then readying its own service.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::state::{admit, Admission, Permit, Turn, TurnTicket};
use super::store::{Outcome, StorePlace, StoreRelease, StoreTurn};
use crate::clock::{nanos, Nanos};
use crate::rate_limit::error::RateLimitError;
use crate::store::FailMode;
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
        deferred: Option<Box<DeferredRequest<S, B>>>,
        permit: Option<Permit>,
    }
}

/// What a request that is not sent at once keeps until it is: its call, and where its turn
/// comes from.
struct DeferredRequest<S, B> {
    /// Its own clone of the inner service, driven ready only once its turn has come, and the
    /// request; until it is sent.
    call: Option<(S, Request<B>)>,
    turn: TurnSource,
}

/// Where a request that is not sent at once gets its turn.
#[allow(clippy::large_enum_variant)] // boxed with the rest of `DeferredRequest`, once per request
enum TurnSource {
    /// The route's queue in this process.
    Queue(QueuedTurn),
    /// The shared store, where it then holds its place.
    Store(StoreTurn),
    /// Its place is taken in this process: the future's permit holds it.
    Taken,
}

/// A request waiting in its route's queue.
struct QueuedTurn {
    ticket: TurnTicket,
    max_wait: Option<Duration>,
    /// When the maximum wait runs out, if there is one.
    deadline: Option<Nanos>,
}

impl QueuedTurn {
    fn new(ticket: TurnTicket, max_wait: Option<Duration>) -> Self {
        Self {
            deadline: max_wait.map(|max| ticket.since.saturating_add(nanos(max))),
            ticket,
            max_wait,
        }
    }
}

fn queued<S, B>(deferred: &mut Option<Box<DeferredRequest<S, B>>>) -> Option<&mut QueuedTurn> {
    match deferred.as_deref_mut() {
        Some(DeferredRequest {
            turn: TurnSource::Queue(queued),
            ..
        }) => Some(queued),
        _ => None,
    }
}

/// The place a sent request holds in the shared store, taken to be given back.
fn store_place<S, B>(deferred: &mut Option<Box<DeferredRequest<S, B>>>) -> Option<StorePlace> {
    match deferred.as_deref_mut() {
        Some(DeferredRequest {
            turn: TurnSource::Store(turn),
            ..
        }) => turn.place.take(),
        _ => None,
    }
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
        Store,
        // Its turn has come: holding its place while it drives its own service ready.
        Readying,
        // Sent.
        Called { #[pin] future: F },
        // Answered; giving its place in the shared store back before answering (boxed: only
        // a layer with a shared store comes here).
        Releasing { release: StoreRelease, answer: Option<Box<A>> },
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
            deferred: None,
            permit,
        }
    }

    pub(crate) fn from_store(inner: S, request: Request<B>, turn: StoreTurn) -> Self {
        Self {
            state: State::Store,
            deferred: Some(Box::new(DeferredRequest {
                call: Some((inner, request)),
                turn: TurnSource::Store(turn),
            })),
            permit: None,
        }
    }

    pub(crate) fn queued(
        inner: S,
        request: Request<B>,
        ticket: TurnTicket,
        max_wait: Option<Duration>,
    ) -> Self {
        Self {
            state: State::Queued,
            deferred: Some(Box::new(DeferredRequest {
                call: Some((inner, request)),
                turn: TurnSource::Queue(QueuedTurn::new(ticket, max_wait)),
            })),
            permit: None,
        }
    }

    /// Returned at once, unsent.
    pub(crate) fn refused(error: RateLimitError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            deferred: None,
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
        Ok(response) => permit.answered(response),
        // The server may have counted it: the drop gives the place back as abandoned.
        Err(_) => drop(permit),
    }
}

fn invalid<T>() -> Poll<Result<T, BoxError>> {
    Poll::Ready(Err("rate limit future in an invalid state".into()))
}

impl<S, B, ResBody> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    /// Everything else: waiting for a turn, asking a shared store, readying the service,
    /// giving a place back there.
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
                    } else if let Some(place) = store_place(this.deferred) {
                        let release = place.release(result.as_ref().ok());
                        *this.deferred = None;
                        this.state.set(State::Releasing {
                            release,
                            answer: Some(Box::new(result)),
                        });
                        continue;
                    }
                    return Poll::Ready(result.map_err(Into::into));
                }
                StateProj::Releasing { release, answer } => {
                    if let Err(error) = ready!(Pin::new(release).poll(cx)) {
                        tracing::debug!(%error, "a place could not be given back: it expires with its lease");
                    }
                    return Poll::Ready(match answer.take() {
                        Some(answer) => (*answer).map_err(Into::into),
                        None => Err("rate limit future polled after completion".into()),
                    });
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(error) => error.into(),
                        None => "rate limit future polled after completion".into(),
                    }));
                }
                StateProj::Readying => {
                    let Some(deferred) = this.deferred.as_deref_mut() else {
                        return invalid();
                    };
                    let Some((inner, _)) = deferred.call.as_mut() else {
                        return invalid();
                    };
                    if let Err(error) = ready!(inner.poll_ready(cx)) {
                        // Never sent: its place is given back entirely.
                        *this.permit = None;
                        *this.deferred = None;
                        this.state.set(State::Failed { error: None });
                        return Poll::Ready(Err(error.into()));
                    }
                    let Some((mut inner, request)) = deferred.call.take() else {
                        return invalid();
                    };
                    if let TurnSource::Store(turn) = &mut deferred.turn {
                        if let Some(place) = turn.place.as_mut() {
                            place.sent();
                        }
                    } else if let Some(permit) = this.permit.as_mut() {
                        permit.sent();
                    }
                    let future = inner.call(request);
                    if !matches!(deferred.turn, TurnSource::Store(_)) {
                        *this.deferred = None;
                    }
                    this.state.set(State::Called { future });
                }
                StateProj::Store => {
                    let Some(deferred) = this.deferred.as_deref_mut() else {
                        return invalid();
                    };
                    let TurnSource::Store(turn) = &mut deferred.turn else {
                        return invalid();
                    };
                    match ready!(turn.poll_turn(cx)) {
                        Outcome::Admitted(place) => {
                            turn.place = Some(place);
                            this.state.set(State::Readying);
                        }
                        Outcome::Refused(error) => {
                            *this.deferred = None;
                            this.state.set(State::Failed { error: None });
                            return Poll::Ready(Err(error.into()));
                        }
                        Outcome::Failed(error) => {
                            if turn.store().fail_mode() == FailMode::Closed {
                                *this.deferred = None;
                                this.state.set(State::Failed { error: None });
                                return Poll::Ready(Err(error.into()));
                            }
                            tracing::warn!(%error, "the shared quota store failed: this request counts against the local quota");
                            let max_wait = turn.max_wait;
                            match admit(&turn.handle.clone(), turn.route, false) {
                                Admission::Now(permit) => {
                                    *this.permit = Some(permit.unsent());
                                    deferred.turn = TurnSource::Taken;
                                    this.state.set(State::Readying);
                                }
                                Admission::Queued(ticket) => {
                                    deferred.turn =
                                        TurnSource::Queue(QueuedTurn::new(ticket, max_wait));
                                    this.state.set(State::Queued);
                                }
                                Admission::Refused(error) => {
                                    *this.deferred = None;
                                    this.state.set(State::Failed { error: None });
                                    return Poll::Ready(Err(error.into()));
                                }
                            }
                        }
                    }
                }
                StateProj::Queued => {
                    let Some(queued) = queued(this.deferred) else {
                        return invalid();
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
                    let Some(queued) = queued(this.deferred) else {
                        return invalid();
                    };
                    match queued.ticket.poll_turn(cx) {
                        Turn::Admitted(permit) => {
                            *this.permit = Some(permit);
                            if let Some(deferred) = this.deferred.as_deref_mut() {
                                // Out of the queue: the ticket has nothing left to do.
                                deferred.turn = TurnSource::Taken;
                            }
                            this.state.set(State::Readying);
                        }
                        Turn::Wait(turn) => {
                            let clock = *queued.ticket.clock();
                            let now = clock.now();
                            let deadline = queued.deadline;
                            if let (Some(deadline), Some(max_wait)) = (deadline, queued.max_wait) {
                                if now >= deadline {
                                    let error = RateLimitError::wait_too_long(
                                        queued.ticket.route_name().clone(),
                                        queued.ticket.since,
                                        queued.ticket.estimate().max(now),
                                        max_wait,
                                    );
                                    // Leave the queue before answering.
                                    *this.deferred = None;
                                    this.state.set(State::Failed { error: None });
                                    return Poll::Ready(Err(error.into()));
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
            .field("deferred", &self.deferred.is_some())
            .field("permit", &self.permit.is_some())
            .finish()
    }
}
