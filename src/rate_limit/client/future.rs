//! The response future of client mode: a request sent at once, or one waiting for its turn in
//! its route's queue and then readying its own service. A request whose turn comes from a
//! shared store is driven by the store's own type ([`StoreRequest`](super::store)), which
//! hands it back here only if the store fails open.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::state::{Permit, Turn, TurnTicket};
use crate::clock::{nanos, Nanos};
use crate::rate_limit::error::RateLimitError;
use crate::BoxError;

/// The store path of a request, when the crate has one.
#[cfg(feature = "redis")]
type StorePath<S, B> = Pin<Box<super::store::StoreRequest<S, B>>>;
#[cfg(not(feature = "redis"))]
type StorePath<S, B> = crate::store::NoStore<(S, B)>;

pin_project! {
    /// The response future of client mode: waits for the request's turn, sends it, and gives
    /// its place back (learning from the response) when the answer arrives.
    ///
    /// Like every response future of this crate, it panics if polled again after it returned
    /// `Poll::Ready`.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, Box<Waiting<S, B>>, StorePath<S, B>>,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateReplace]
    enum State<F, W, P> {
        // Sent, with what it holds.
        Called { hold: Hold, #[pin] future: F },
        // Waiting for its turn in the route's queue, or readying its service once it came
        // (boxed: only a request that waits needs it).
        Waiting { waiting: W },
        // Its turn, its send and the return of its place go through the shared store.
        Store { store: P },
        // Returned unsent.
        Refused { error: RateLimitError },
        // Answered, or returned unsent.
        Done,
    }
}

/// What a sent request holds until its answer. Once answered it is marked so here, rather
/// than by moving the whole state to `Done`: that would copy the state, inner future and all,
/// on the path of every request.
enum Hold {
    /// Nothing: its route has no quota.
    Nothing,
    /// Its place in the route's quota.
    Place(Permit),
    /// Its answer has been returned.
    Answered,
}

/// A request that is not sent at once, with its own clone of the inner service, driven ready
/// only once its turn has come.
pub(crate) struct Waiting<S, B> {
    inner: S,
    request: Request<B>,
    turn: LocalTurn,
    /// The span of its wait (`rate_limit_wait`, at `debug`), entered while it is polled.
    span: tracing::Span,
}

/// Where a waiting request stands in this process.
enum LocalTurn {
    /// In the route's queue.
    Queued(QueuedTurn),
    /// Its turn came: it holds its place while its service gets ready.
    Held(Permit),
}

/// A request waiting in its route's queue.
struct QueuedTurn {
    ticket: TurnTicket,
    max_wait: Option<Duration>,
    /// When the maximum wait runs out, if there is one.
    deadline: Option<Nanos>,
    /// A timer for a known turn or the maximum wait: made once the request must sleep, then
    /// reset in place.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl QueuedTurn {
    fn new(ticket: TurnTicket, max_wait: Option<Duration>) -> Self {
        Self {
            deadline: max_wait.map(|max| ticket.since.saturating_add(nanos(max))),
            ticket,
            max_wait,
            sleep: None,
        }
    }

    /// Ready with a place once this request's turn comes, or with an error once its maximum
    /// wait runs out first.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Result<Permit, RateLimitError>> {
        loop {
            let turn = match self.ticket.poll_turn(cx) {
                Turn::Admitted(permit) => return Poll::Ready(Ok(permit)),
                Turn::Wait(turn) => turn,
                Turn::Never(error) => return Poll::Ready(Err(error)),
            };
            let clock = *self.ticket.clock();
            let now = clock.now();
            if let (Some(deadline), Some(max_wait)) = (self.deadline, self.max_wait) {
                if now >= deadline {
                    let error = RateLimitError::wait_too_long(
                        self.ticket.route_name().clone(),
                        self.ticket.since,
                        self.ticket.estimate().max(now),
                        max_wait,
                    );
                    self.ticket.time_out();
                    return Poll::Ready(Err(error));
                }
            }
            let wake = match (turn, self.deadline) {
                (Some(turn), Some(deadline)) => Some(turn.min(deadline)),
                (turn, deadline) => turn.or(deadline),
            };
            let Some(wake) = wake else {
                // Woken by the queue when it moves.
                return Poll::Pending;
            };
            ready!(crate::queue::poll_timer(
                &mut self.sleep,
                clock.instant(wake),
                cx
            ));
        }
    }
}

impl<S, B> Waiting<S, B> {
    /// A request that falls back to its route in this process, from a store that failed
    /// open (`Err`: returned unsent, refused by the route).
    #[cfg(feature = "redis")]
    pub(crate) fn local(
        inner: S,
        request: Request<B>,
        admission: super::state::Admission,
        max_wait: Option<Duration>,
    ) -> Result<Self, RateLimitError> {
        let turn = match admission {
            super::state::Admission::Now(permit) => LocalTurn::Held(permit.unsent()),
            super::state::Admission::Queued(ticket) => {
                LocalTurn::Queued(QueuedTurn::new(ticket, max_wait))
            }
            super::state::Admission::Refused(error) => return Err(error),
        };
        Ok(Self {
            inner,
            request,
            turn,
            span: tracing::Span::none(),
        })
    }

    /// Ready once the request holds its place and its service is ready to send it.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<Request<B>>,
        S::Error: Into<BoxError>,
    {
        let _span = self.span.enter();
        loop {
            match &mut self.turn {
                LocalTurn::Queued(queued) => {
                    let permit = ready!(queued.poll_turn(cx))?;
                    self.turn = LocalTurn::Held(permit);
                }
                LocalTurn::Held(_) => return self.inner.poll_ready(cx).map_err(Into::into),
            }
        }
    }

    /// Sends the request, once [`poll_ready`](Self::poll_ready) said so.
    fn send(self) -> (S::Future, Permit)
    where
        S: Service<Request<B>>,
    {
        let Self {
            mut inner,
            request,
            turn,
            ..
        } = self;
        let LocalTurn::Held(mut permit) = turn else {
            unreachable!("a request sent before its turn");
        };
        permit.sent();
        (inner.call(request), permit)
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    /// Sent at once, holding `permit`.
    #[inline]
    pub(crate) fn called(future: S::Future, permit: Permit) -> Self {
        Self {
            state: State::Called {
                future,
                hold: Hold::Place(permit),
            },
        }
    }

    /// Sent at once, on a route without a quota.
    #[inline]
    pub(crate) fn passed(future: S::Future) -> Self {
        Self {
            state: State::Called {
                future,
                hold: Hold::Nothing,
            },
        }
    }

    pub(crate) fn queued(
        inner: S,
        request: Request<B>,
        ticket: TurnTicket,
        max_wait: Option<Duration>,
    ) -> Self {
        let span = tracing::debug_span!("rate_limit_wait", route = %ticket.route_name());
        let waiting = Box::new(Waiting {
            inner,
            request,
            turn: LocalTurn::Queued(QueuedTurn::new(ticket, max_wait)),
            span,
        });
        Self {
            state: State::Waiting { waiting },
        }
    }

    /// Returned at once, unsent.
    pub(crate) fn refused(error: RateLimitError) -> Self {
        Self {
            state: State::Refused { error },
        }
    }

    #[cfg(feature = "redis")]
    pub(crate) fn from_store(store: super::store::StoreRequest<S, B>) -> Self {
        Self {
            state: State::Store {
                store: Box::pin(store),
            },
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
        if let StateProj::Called { future, hold } = self.as_mut().project().state.project() {
            return poll_answer(future, hold, cx);
        }
        self.poll_slow(cx)
    }
}

/// The answer of a sent request; what it held is given back (learning from the response).
#[inline(always)]
fn poll_answer<F, ResBody, E>(
    future: Pin<&mut F>,
    hold: &mut Hold,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<ResBody>, BoxError>>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
{
    if let Hold::Answered = hold {
        panic!("client-mode `ResponseFuture` polled after completion");
    }
    let result = ready!(future.poll(cx));
    match (std::mem::replace(hold, Hold::Answered), result) {
        (Hold::Place(permit), Ok(response)) => {
            permit.answered(&response);
            Poll::Ready(Ok(response))
        }
        (hold, result) => Poll::Ready(result.map_err(|error| failed(hold, error.into()))),
    }
}

/// A sent request that failed: the server may have counted it, so the drop of its place gives
/// it back as abandoned; unless it never left, when it is given back entirely.
#[cold]
fn failed(hold: Hold, error: BoxError) -> BoxError {
    match hold {
        Hold::Place(permit) if crate::handoff::never_sent(&error) => permit.never_sent(),
        hold => drop(hold),
    }
    error
}

impl<S, B, ResBody> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    /// Everything but the answer of a request sent at once.
    #[inline(never)]
    fn poll_slow(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResBody>, BoxError>> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Called { future, hold } => return poll_answer(future, hold, cx),
                StateProj::Waiting { waiting } => {
                    if let Err(error) = ready!(waiting.poll_ready(cx)) {
                        // Never sent: leaves the queue, or gives its place back entirely,
                        // before it answers.
                        state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    let StateReplace::Waiting { waiting } =
                        state.as_mut().project_replace(State::Done)
                    else {
                        unreachable!()
                    };
                    let (future, permit) = waiting.send();
                    state.set(State::Called {
                        future,
                        hold: Hold::Place(permit),
                    });
                }
                StateProj::Store { store } => {
                    #[cfg(feature = "redis")]
                    match ready!(store.as_mut().poll(cx)) {
                        super::store::StoreNext::Answer(answer) => {
                            state.set(State::Done);
                            return Poll::Ready(answer);
                        }
                        super::store::StoreNext::Local(Ok(waiting)) => {
                            state.set(State::Waiting { waiting });
                        }
                        super::store::StoreNext::Local(Err(error)) => {
                            state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    }
                    #[cfg(not(feature = "redis"))]
                    store.never()
                }
                StateProj::Refused { .. } => {
                    let StateReplace::Refused { error } = state.project_replace(State::Done) else {
                        unreachable!()
                    };
                    return Poll::Ready(Err(error.into()));
                }
                StateProj::Done => panic!("client-mode `ResponseFuture` polled after completion"),
            }
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Store { .. } => "store",
            State::Refused { .. } => "refused",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
