//! Client mode over a shared store: a request takes its place in the store, waiting across
//! processes for its turn, and gives it back when its response arrives. [`StoreRequest`] is
//! the whole of that path; it hands a request back to this process's queue only when the
//! store fails open.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::future::Waiting;
use super::state::{admit, lock, show_figures, ClientHandle, Learn};
use crate::clock::{nanos, Nanos};
use crate::event::{Event, Learnt, Refusal};
use crate::quota::Rate;
use crate::rate_limit::cost::Costs;
use crate::rate_limit::error::RateLimitError;
use crate::store::{
    Decision, FailMode, StoreCall, StoreError, StoreHandle, StorePoll, StoreQuotas,
};
use crate::BoxError;

pin_project! {
    /// A request whose turn comes from the shared store: it asks for its place, readies its
    /// own service, sends, answers, and leaves its place to be given back in the background
    /// (awaited before it answers only when the store's queue is full or a 429 closes the
    /// route for the fleet). Boxed
    /// once per request, so that the in-memory future does not carry it.
    pub(crate) struct StoreRequest<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: StoreState<S, B, S::Future, Result<S::Response, BoxError>>,
    }
}

pin_project! {
    #[project = StoreProj]
    #[project_replace = StoreReplace]
    enum StoreState<S, B, F, A> {
        // Asking the store for its turn.
        Asking { turn: StoreTurn, inner: S, request: Request<B> },
        // Holding its place in the store while its service gets ready.
        Readying { place: StorePlace, inner: S, request: Request<B> },
        // Sent.
        Called { #[pin] future: F, place: StorePlace },
        // Answered; giving its place back in the store before answering.
        Releasing { release: StoreRelease, answer: A },
        // Answered, or handed back.
        Done,
    }
}

/// Where a store request ends.
pub(crate) enum StoreNext<S, B, R> {
    /// Its answer.
    Answer(Result<R, BoxError>),
    /// The store failed open: the request falls back to its route in this process (`Err`:
    /// refused there).
    Local(Result<Box<Waiting<S, B>>, RateLimitError>),
}

impl<S, B> StoreRequest<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(inner: S, request: Request<B>, turn: StoreTurn) -> Self {
        Self {
            state: StoreState::Asking {
                turn,
                inner,
                request,
            },
        }
    }

    pub(crate) fn poll<ResBody>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<StoreNext<S, B, Response<ResBody>>>
    where
        S: Service<Request<B>, Response = Response<ResBody>>,
        S::Error: Into<BoxError>,
    {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StoreProj::Asking { turn, .. } => {
                    let outcome = ready!(turn.poll_turn(cx));
                    let StoreReplace::Asking {
                        mut turn,
                        inner,
                        request,
                    } = state.as_mut().project_replace(StoreState::Done)
                    else {
                        unreachable!()
                    };
                    turn.report(&outcome);
                    match outcome {
                        Outcome::Admitted(place) => state.set(StoreState::Readying {
                            place,
                            inner,
                            request,
                        }),
                        Outcome::Refused(error) => {
                            return Poll::Ready(StoreNext::Answer(Err(error.into())));
                        }
                        Outcome::Failed(error) if turn.store.fail_mode() == FailMode::Closed => {
                            return Poll::Ready(StoreNext::Answer(Err(error.into())));
                        }
                        Outcome::Failed(error) => {
                            tracing::debug!(%error, "the shared quota store failed: this request counts against the local quota");
                            let costs = std::mem::replace(&mut turn.costs, Costs::one());
                            let admission = admit(&turn.handle, turn.route, false, costs);
                            let local = Waiting::local(inner, request, admission, turn.max_wait)
                                .map(Box::new);
                            return Poll::Ready(StoreNext::Local(local));
                        }
                    }
                }
                StoreProj::Readying { inner, .. } => {
                    if let Err(error) = ready!(inner.poll_ready(cx)) {
                        // Never sent: its place is given back entirely.
                        state.set(StoreState::Done);
                        return Poll::Ready(StoreNext::Answer(Err(error.into())));
                    }
                    let StoreReplace::Readying {
                        mut place,
                        mut inner,
                        request,
                    } = state.as_mut().project_replace(StoreState::Done)
                    else {
                        unreachable!()
                    };
                    place.sent();
                    let future = inner.call(request);
                    state.set(StoreState::Called { future, place });
                }
                StoreProj::Called { future, .. } => {
                    let answer = ready!(future.poll(cx));
                    let StoreReplace::Called { place, .. } =
                        state.as_mut().project_replace(StoreState::Done)
                    else {
                        unreachable!()
                    };
                    let answer = answer.map_err(Into::into);
                    if let Err(error) = &answer {
                        if crate::handoff::never_sent(error) {
                            // Given back entirely, as a place never sent.
                            place.never_sent();
                            return Poll::Ready(StoreNext::Answer(answer));
                        }
                    }
                    let release = place.release(answer.as_ref().ok());
                    // Given back off the request's path, after the changes made before it;
                    // on the path only when the background queue is full (Redis slower than
                    // the requests), so that no release is dropped for want of room.
                    match release.in_background() {
                        Ok(()) => return Poll::Ready(StoreNext::Answer(answer)),
                        Err(release) => state.set(StoreState::Releasing { release, answer }),
                    }
                }
                StoreProj::Releasing { release, .. } => {
                    if let Err(error) = ready!(Pin::new(release).poll(cx)) {
                        tracing::debug!(%error, "a place could not be given back: it expires with its lease");
                    }
                    let StoreReplace::Releasing { answer, .. } =
                        state.as_mut().project_replace(StoreState::Done)
                    else {
                        unreachable!()
                    };
                    return Poll::Ready(StoreNext::Answer(answer));
                }
                StoreProj::Done => panic!("client-mode `ResponseFuture` polled after completion"),
            }
        }
    }
}

/// A place held in the shared store. Dropped after its request was sent (an abandoned
/// request), it is held as in flight for the abandoned hold, then as answered, as after a
/// transport error; dropped before (the request was dropped, or its service failed to get
/// ready), it is given back entirely.
#[derive(Debug)]
pub(crate) struct StorePlace {
    store: StoreHandle,
    /// The layer's state and the request's route, for what is logged and reported.
    handle: ClientHandle,
    route: usize,
    /// The route's key in the store.
    key: String,
    member: String,
    /// The route's quotas, and what the request took in each.
    rates: Box<[Rate]>,
    taken: Costs,
    learn: Learn,
    /// How long it is held as in flight once abandoned.
    hold: Duration,
    sent: bool,
    released: bool,
}

impl StorePlace {
    /// The request is being sent.
    pub(crate) fn sent(&mut self) {
        self.sent = true;
    }

    /// The request never left after all: dropped, the place is given back as never taken.
    pub(crate) fn never_sent(mut self) {
        self.sent = false;
    }

    /// The answer is in (a response, or `None` for a transport error, which abandons the
    /// request): give the place back, learning what the server says. The request hands the
    /// returned operation to the store's background queue and answers its caller at once
    /// (one round trip on its path, the place's); a release runs later than the response,
    /// so the place counts from a later time, never an earlier one, and the quota holds. A
    /// release still queued when the runtime stops is lost: its place stays taken for the
    /// fleet until its in-flight lease runs out. A release that closes the route for the
    /// fleet (a 429) is awaited on the path, so the route is closed before the 429 is
    /// answered.
    pub(crate) fn release<B>(mut self, response: Option<&Response<B>>) -> StoreRelease {
        // Marked released only once its call is made: should a correction (the caller's code)
        // panic, the place dropped is held as abandoned, rather than lost.
        let (call, closes_route) = match response {
            Some(response) => self.release_call(response),
            None => {
                self.abandoned();
                let quotas = StoreQuotas::new(&self.rates, &self.taken, &self.taken);
                let call = self
                    .store
                    .abandon_call(&self.key, &self.member, quotas, self.hold);
                (call, false)
            }
        };
        self.released = true;
        StoreRelease {
            call: Some(call),
            store: self.store.clone(),
            closes_route,
        }
    }

    /// The release's call, and whether it closes the route for the fleet.
    fn release_call<B>(&self, response: &Response<B>) -> (StoreCall, bool) {
        let mut block = Duration::ZERO;
        if self.learn.enabled
            && crate::headers::refused_in(
                response.status(),
                response.headers(),
                self.learn.dialects,
            )
        {
            let name = &self.handle.routes[self.route].name;
            let wait = self
                .learn
                .refusal_wait(name, response, std::time::SystemTime::now());
            // Closes the route for every process sharing the store.
            block = wait.min(Learn::cap(&self.rates[0]));
            self.handle
                .events
                .emit(self.route, |layer, route| Event::Learnt {
                    layer,
                    route,
                    from: Learnt::TooManyRequests,
                });
        }
        let route = &self.handle.routes[self.route];
        let cost = route.corrected(&self.taken, response);
        let cost = cost.as_ref().unwrap_or(&self.taken);
        let quotas = StoreQuotas::new(&self.rates, &self.taken, cost);
        let call = self
            .store
            .release_call(&self.key, &self.member, quotas, block);
        (call, !block.is_zero())
    }
}

impl StorePlace {
    /// Reports the request given up on after its send.
    #[cold]
    fn abandoned(&self) {
        let events = &self.handle.events;
        events.emit(self.route, |layer, route| Event::Abandoned { layer, route });
    }
}

/// A place being given back in the shared store. Dropped before it is done (the caller gave
/// up on the answer meanwhile), it finishes in the background rather than be lost.
pub(crate) struct StoreRelease {
    call: Option<StoreCall>,
    store: StoreHandle,
    /// It closes the route for the fleet (a 429 learnt).
    closes_route: bool,
}

impl StoreRelease {
    /// Hands the release to the store's background queue, or back if it is full.
    fn in_background(mut self) -> Result<(), Self> {
        let Some(call) = self.call.take() else {
            return Ok(());
        };
        if self.closes_route {
            // Awaited on the path: the route is closed for the fleet before the 429 that
            // closes it reaches its caller, who may send again at once.
            self.call = Some(call);
            return Err(self);
        }
        self.store.try_give_back(call).map_err(|call| {
            self.call = Some(call);
            self
        })
    }
}

impl Future for StoreRelease {
    type Output = Result<Decision, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(call) = self.call.as_mut() else {
            // Done already: nothing is left to give back.
            return Poll::Ready(Ok(Decision::Admitted));
        };
        let done = ready!(Pin::new(call).poll(cx));
        self.call = None;
        Poll::Ready(done)
    }
}

impl Drop for StoreRelease {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            self.store.give_back(call);
        }
    }
}

impl Drop for StorePlace {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let quotas = StoreQuotas::new(&self.rates, &self.taken, &self.taken);
        if self.sent {
            self.abandoned();
            self.store
                .abandon(&self.key, &self.member, quotas, self.hold);
        } else {
            self.store.cancel(&self.key, &self.member, quotas);
        }
    }
}

/// A request asking the shared store for its turn.
pub(crate) struct StoreTurn {
    handle: ClientHandle,
    route: usize,
    max_wait: Option<Duration>,
    store: StoreHandle,
    key: String,
    member: String,
    /// The route's quotas, and what the request costs in each.
    rates: Box<[Rate]>,
    costs: Costs,
    learn: Learn,
    since: Nanos,
    poll: StorePoll,
    /// Counted among the route's waiters (once the store has said it must wait).
    queued: bool,
    /// Whether the store ever said it must wait (a place given at the first ask did not
    /// wait for its turn, whatever the round trip took).
    waited: bool,
    /// The span of its wait (`rate_limit_wait`, at `debug`, `store` set), entered while it
    /// asks.
    span: tracing::Span,
}

/// How a turn in the shared store ended.
enum Outcome {
    Admitted(StorePlace),
    /// Returned unsent: it would wait too long, or too many already wait.
    Refused(RateLimitError),
    Failed(StoreError),
}

impl StoreTurn {
    pub(crate) fn new(
        handle: ClientHandle,
        route: usize,
        store: StoreHandle,
        rates: Box<[Rate]>,
        costs: Costs,
        learn: Learn,
        max_wait: Option<Duration>,
    ) -> Self {
        let key = store.key(&format!("rate:{}", handle.routes[route].name));
        let member = store.member();
        let poll = StorePoll::new(&store, || {
            store.acquire(&key, &member, &rates, &costs, false)
        });
        let since = handle.clock.now();
        let span = tracing::debug_span!("rate_limit_wait", route = %handle.routes[route].name, store = true);
        Self {
            span,
            handle,
            route,
            max_wait,
            store,
            key,
            member,
            rates,
            costs,
            learn,
            since,
            poll,
            queued: false,
            waited: false,
        }
    }

    /// Joins the route's waiters, unless they are as many as its queue holds.
    fn join_queue(&mut self) -> Result<(), RateLimitError> {
        if self.queued {
            return Ok(());
        }
        let route = &self.handle.routes[self.route];
        let mut state = lock(&route.state);
        if let Some(max_queue) = state.queue_full(self.handle.config.max_queue) {
            let route = route.name.clone();
            return Err(RateLimitError::QueueFull { route, max_queue });
        }
        state.store_waiters += 1;
        drop(state);
        self.queued = true;
        self.waited = true;
        let events = &self.handle.events;
        events.emit(self.route, |layer, route| Event::Queued { layer, route });
        show_figures(&self.handle, self.route);
        Ok(())
    }

    /// Reports how the turn ended (a fall back to this process's limit reports itself).
    fn report(&self, outcome: &Outcome) {
        let events = &self.handle.events;
        let waited = match self.waited {
            true => self.handle.clock.now().saturating_sub(self.since),
            false => 0,
        };
        let reason = match outcome {
            Outcome::Admitted(_) => {
                events.emit(self.route, |layer, route| Event::Admitted {
                    layer,
                    route,
                    waited: Duration::from_nanos(waited),
                });
                return show_figures(&self.handle, self.route);
            }
            Outcome::Refused(error) => error.refusal(),
            Outcome::Failed(_) if self.store.fail_mode() == FailMode::Closed => {
                Refusal::StoreUnavailable
            }
            Outcome::Failed(_) => return,
        };
        events.emit(self.route, |layer, route| Event::Refused {
            layer,
            route,
            reason,
        });
        // It left the queue.
        show_figures(&self.handle, self.route);
    }

    fn leave_queue(&mut self) {
        if self.queued {
            self.queued = false;
            let mut state = lock(&self.handle.routes[self.route].state);
            state.store_waiters -= 1;
        }
    }

    /// Asks the store, and between questions sleeps until the turn the store named, a
    /// release anywhere, or the poll interval, whichever comes first.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let span = self.span.clone();
        let _span = span.enter();
        loop {
            if let Some(answer) = ready!(self.poll.poll_answer(cx)) {
                let wait = match answer {
                    Err(error) => {
                        self.leave_queue();
                        return Poll::Ready(Outcome::Failed(error));
                    }
                    Ok(Decision::Admitted | Decision::Counted { .. }) => {
                        self.leave_queue();
                        return Poll::Ready(Outcome::Admitted(StorePlace {
                            store: self.store.clone(),
                            handle: self.handle.clone(),
                            route: self.route,
                            key: std::mem::take(&mut self.key),
                            member: std::mem::take(&mut self.member),
                            rates: std::mem::take(&mut self.rates),
                            taken: std::mem::replace(&mut self.costs, Costs::one()),
                            learn: self.learn,
                            hold: self.handle.config.abandoned_hold,
                            sent: false,
                            released: false,
                        }));
                    }
                    Ok(Decision::Wait(wait)) => wait,
                };
                if let Err(full) = self.join_queue() {
                    return Poll::Ready(Outcome::Refused(full));
                }
                let clock = self.handle.clock;
                let now = clock.now();
                let turn = wait.map(|wait| now.saturating_add(nanos(wait)));
                let deadline = self
                    .max_wait
                    .map(|max| self.since.saturating_add(nanos(max)));
                if let (Some(deadline), Some(max_wait)) = (deadline, self.max_wait) {
                    let known_late = turn.is_some_and(|turn| turn > deadline);
                    if known_late || now >= deadline {
                        let until = turn.unwrap_or(now).max(now);
                        self.leave_queue();
                        return Poll::Ready(Outcome::Refused(RateLimitError::wait_too_long(
                            self.handle.routes[self.route].name.clone(),
                            self.since,
                            until,
                            max_wait,
                        )));
                    }
                }
                let deadline = deadline.map(|at| clock.instant(at));
                self.poll
                    .again_by(&self.store, clock.instant(now), wait, deadline);
            }
            let (store, key, member) = (&self.store, &self.key, &self.member);
            let (rates, costs) = (&self.rates, &self.costs);
            ready!(self.poll.poll_again(store, cx, || store
                .acquire(key, member, rates, costs, false)));
        }
    }
}

impl Drop for StoreTurn {
    /// A turn that ends without a place (the request was dropped, refused, or the store
    /// failed) may still have one in the store: an acquire whose answer was never read, or
    /// came too late, took it. It is given back as never taken; nothing was sent.
    fn drop(&mut self) {
        if self.queued {
            // Dropped by its caller while it waited.
            self.leave_queue();
            let waited = self.handle.clock.now().saturating_sub(self.since);
            let events = &self.handle.events;
            events.emit(self.route, |layer, route| Event::GaveUp {
                layer,
                route,
                waited: Duration::from_nanos(waited),
            });
            show_figures(&self.handle, self.route);
        }
        if !self.member.is_empty() {
            let quotas = StoreQuotas::new(&self.rates, &self.costs, &self.costs);
            self.store.cancel(&self.key, &self.member, quotas);
        }
    }
}
