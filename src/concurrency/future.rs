//! The response future: waits for a slot, sends, and decides what the response means. A
//! create that asks a shared store for its slot does so in the store's own type
//! ([`StoreSlot`](super::store)).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::body::{Job, PlanBody};
use super::error::ConcurrencyError;
use super::hold::{HoldGuard, Unsent};
use super::observe::{Observe, Observer};
use super::slots::{ReleaseReason, Turn};
use super::state::{PlanState, SlotTicket};
use crate::clock::Nanos;
use crate::event::{Event, Refusal};
use crate::BoxError;

/// What the request is to the plan, decided when it is called. Once answered it is marked so
/// here, rather than by moving the whole state to `Done`: that would copy the state, inner
/// future and all, on the path of every request.
#[derive(Debug)]
pub(crate) enum Role {
    /// Nothing: passes through.
    Other,
    /// Creates a job, holding a slot (once it has one).
    Create(Option<HoldGuard>),
    /// Shows job `id`, which holds a slot.
    Status(Arc<PlanState>, Box<str>),
    /// Lists jobs.
    List(Arc<PlanState>),
    /// Its answer has been returned.
    Answered,
}

/// The store path of a create, when the crate has one.
#[cfg(feature = "redis")]
type StorePath<S, B> = Box<super::store::StoreSlot<S, B>>;
#[cfg(not(feature = "redis"))]
type StorePath<S, B> = crate::store::NoStore<(S, B)>;

pin_project! {
    /// The response future of [`ConcurrencyLimitByPlanService`](super::ConcurrencyLimitByPlanService).
    ///
    /// Like every response future of this crate, it panics if polled again after it returned
    /// `Poll::Ready`.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, Box<WaitingCreate<S, B>>, StorePath<S, B>>,
        // What the request is to the plan, for its whole life: decided when it is called (a
        // create holds its slot from its send), `Answered` once answered. Beside the state
        // rather than in its `Called` variant, where it made every request's future bigger to
        // move (measured: 37 instructions a request).
        role: Role,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateReplace]
    enum State<F, W, P> {
        // Sent; what it is to the plan decides what its response means.
        Called { #[pin] future: F },
        // A create waiting for a slot here, or readying its service once it holds one
        // (boxed: only a create that waits needs it).
        Waiting { waiting: W },
        // A create holding a slot here, asking the shared store for one.
        Store { store: P },
        // Returned unsent.
        Failed { error: ConcurrencyError },
        // Answered.
        Done,
    }
}

/// A create that is not sent at once, with its own clone of the inner service, driven ready
/// only once it holds a slot.
pub(crate) struct WaitingCreate<S, B> {
    inner: S,
    request: Request<B>,
    step: CreateStep,
    /// The span of its wait (`plan_wait`, at `debug`), entered while it is polled.
    span: tracing::Span,
}

enum CreateStep {
    /// In the plan's queue.
    Queued(QueuedCreate),
    /// Holding a slot (and its place in the shared store, if any) while its service gets
    /// ready.
    Held(Unsent),
}

/// A create in the plan's queue.
struct QueuedCreate {
    ticket: SlotTicket,
    /// How many slots it waits for, all at once: one per job it starts.
    jobs: u32,
    /// When the maximum wait runs out, if there is one.
    deadline: Option<Nanos>,
    /// A timer for the next lease to expire or the maximum wait: made once the create must
    /// sleep, then reset in place.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl QueuedCreate {
    /// Ready once the queue gives this create a slot here, or its maximum wait runs out.
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConcurrencyError>> {
        loop {
            let shared = &self.ticket.shared;
            let now = shared.clock.now();
            // The slots are let go before the event is reported.
            let taken =
                shared
                    .slots()
                    .poll_take_jobs(self.ticket.id, self.jobs as usize, now, cx.waker());
            let next_expiry = match taken {
                Turn::Taken => {
                    self.ticket.queued = false;
                    let waited = Duration::from_nanos(now.saturating_sub(self.ticket.since));
                    shared.report(|layer| Event::SlotTaken { layer, waited });
                    return Poll::Ready(Ok(()));
                }
                Turn::Wait(next_expiry) => next_expiry,
                Turn::Never => return Poll::Ready(Err(self.refuse())),
            };
            if self.deadline.is_some_and(|d| d <= now) {
                let error = ConcurrencyError::wait_too_long(shared);
                self.ticket.time_out();
                return Poll::Ready(Err(error));
            }
            let Some(at) = [next_expiry, self.deadline].into_iter().flatten().min() else {
                // Woken by the queue when a slot frees.
                return Poll::Pending;
            };
            // Woken by the queue or the timer: look again either way.
            ready!(crate::queue::poll_timer(
                &mut self.sleep,
                shared.clock.instant(at),
                cx
            ));
        }
    }
}

impl QueuedCreate {
    /// The plan was lowered below this batch while it waited: it leaves the queue, refused.
    #[cold]
    #[inline(never)]
    fn refuse(&mut self) -> ConcurrencyError {
        let limit = self.ticket.shared.slots().limit();
        self.ticket.refuse(Refusal::JobCount);
        let jobs = self.jobs;
        ConcurrencyError::JobCount { jobs, limit }
    }
}

/// What a waiting create is ready for.
enum Readied {
    /// To be sent.
    Send,
    /// To ask the shared store for a slot, holding its slot here, within `deadline`.
    #[cfg(feature = "redis")]
    AskStore(crate::store::StoreHandle, Option<Nanos>),
}

impl<S, B> WaitingCreate<S, B> {
    /// A create holding `slot`, to be sent once its service is ready.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn holding(inner: S, request: Request<B>, slot: Unsent) -> Self {
        Self {
            inner,
            request,
            step: CreateStep::Held(slot),
            span: tracing::Span::none(),
        }
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<Readied, BoxError>>
    where
        S: Service<Request<B>>,
        S::Error: Into<BoxError>,
    {
        let _span = self.span.enter();
        loop {
            match &mut self.step {
                CreateStep::Queued(queued) => {
                    ready!(queued.poll_slot(cx))?;
                    let shared = queued.ticket.shared.clone();
                    #[cfg(feature = "redis")]
                    if let Some(store) = shared.store.clone() {
                        return Poll::Ready(Ok(Readied::AskStore(store, queued.deadline)));
                    }
                    self.step = CreateStep::Held(Unsent::local(shared, queued.jobs));
                }
                CreateStep::Held(_) => {
                    ready!(self.inner.poll_ready(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(Readied::Send));
                }
            }
        }
    }

    /// Sends the create, once [`poll_ready`](Self::poll_ready) said so.
    fn send(self) -> (S::Future, Role)
    where
        S: Service<Request<B>>,
    {
        let Self {
            mut inner,
            request,
            step,
            ..
        } = self;
        let CreateStep::Held(slot) = step else {
            unreachable!("a create sent before it held a slot");
        };
        let key = super::hold::idempotency_key(&request);
        let hold = slot.sent().map(|hold| hold.with_key(key));
        (inner.call(request), Role::Create(hold))
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, role: Role) -> Self {
        Self {
            state: State::Called { future },
            role,
        }
    }

    pub(crate) fn failed(error: ConcurrencyError) -> Self {
        Self {
            state: State::Failed { error },
            role: Role::Other,
        }
    }

    /// A create holding a slot here, to ask the shared `store` for one before it is sent
    /// through `inner`, a clone of its own that it drives ready then.
    #[cfg(feature = "redis")]
    pub(crate) fn store_slot(
        inner: S,
        request: Request<B>,
        shared: &Arc<PlanState>,
        store: crate::store::StoreHandle,
        jobs: u32,
    ) -> Self {
        let deadline = shared.wait_deadline();
        let slot = super::store::StoreSlot::new(inner, request, shared, store, deadline, jobs);
        Self {
            state: State::Store {
                store: Box::new(slot),
            },
            role: Role::Create(None),
        }
    }

    // Inlined into both kinds of create (one job, a count): called from two places, it was no
    // longer inlined into the waiting create's path (measured: 28 instructions a wait).
    #[inline(always)]
    pub(crate) fn queued(
        inner: S,
        request: Request<B>,
        shared: Arc<PlanState>,
        ticket: crate::queue::Ticket,
        jobs: u32,
    ) -> Self {
        let deadline = shared.wait_deadline();
        let span = tracing::debug_span!("plan_wait", plan = %*shared.plan.lock().unwrap_or_else(|e| e.into_inner()));
        let waiting = Box::new(WaitingCreate {
            span,
            inner,
            request,
            step: CreateStep::Queued(QueuedCreate {
                ticket: SlotTicket {
                    since: shared.clock.now(),
                    shared,
                    id: ticket,
                    queued: true,
                },
                jobs,
                deadline,
                sleep: None,
            }),
        });
        Self {
            state: State::Waiting { waiting },
            role: Role::Create(None),
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<PlanBody<ResBody>>, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The path of nearly every request, kept small: sent at once, answered.
        let this = self.as_mut().project();
        if let StateProj::Called { future } = this.state.project() {
            return poll_answer(future, this.role, cx);
        }
        self.poll_slow(cx)
    }
}

/// The answer of a sent request, and what it means to the plan.
#[inline(always)]
fn poll_answer<F, ResBody, E>(
    future: Pin<&mut F>,
    role: &mut Role,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<PlanBody<ResBody>>, BoxError>>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
{
    if let Role::Answered = role {
        panic!("plan `ResponseFuture` polled after completion");
    }
    let result = ready!(future.poll(cx));
    Poll::Ready(respond(role, result))
}

impl<S, B, ResBody> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    /// Waiting for a slot (here, then in the shared store), then sending.
    #[inline(never)]
    fn poll_slow(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<PlanBody<ResBody>>, BoxError>> {
        let this = self.project();
        let (mut state, role) = (this.state, this.role);
        loop {
            match state.as_mut().project() {
                StateProj::Called { future } => return poll_answer(future, role, cx),
                StateProj::Waiting { waiting } => {
                    let readied = match ready!(waiting.poll_ready(cx)) {
                        Ok(readied) => readied,
                        Err(error) => {
                            // Never sent: leaves the queue, or gives its slot back, before it
                            // answers.
                            state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    };
                    let StateReplace::Waiting { waiting } =
                        state.as_mut().project_replace(State::Done)
                    else {
                        unreachable!()
                    };
                    match readied {
                        Readied::Send => {
                            let (future, sent) = waiting.send();
                            *role = sent;
                            state.set(State::Called { future });
                        }
                        #[cfg(feature = "redis")]
                        Readied::AskStore(store, deadline) => {
                            let WaitingCreate {
                                inner,
                                request,
                                step: CreateStep::Queued(queued),
                                ..
                            } = *waiting
                            else {
                                unreachable!("only a queued create asks the store")
                            };
                            let shared = &queued.ticket.shared;
                            let slot = super::store::StoreSlot::new(
                                inner,
                                request,
                                shared,
                                store,
                                deadline,
                                queued.jobs,
                            );
                            state.set(State::Store {
                                store: Box::new(slot),
                            });
                        }
                    }
                }
                StateProj::Store { store } => {
                    #[cfg(feature = "redis")]
                    {
                        let asked = ready!(store.poll_slot(cx));
                        let StateReplace::Store { store } =
                            state.as_mut().project_replace(State::Done)
                        else {
                            unreachable!()
                        };
                        if let Err(error) = asked {
                            // Nothing was sent: the slot taken here, and any member in the
                            // store, go back before it answers.
                            drop(store);
                            return Poll::Ready(Err(error));
                        }
                        state.set(State::Waiting {
                            waiting: Box::new((*store).into_waiting()),
                        });
                    }
                    #[cfg(not(feature = "redis"))]
                    store.never()
                }
                StateProj::Failed { .. } => {
                    let StateReplace::Failed { error } = state.project_replace(State::Done) else {
                        unreachable!()
                    };
                    return Poll::Ready(Err(error.into()));
                }
                StateProj::Done => {
                    panic!("plan `ResponseFuture` polled after completion")
                }
            }
        }
    }
}

/// What a response means to the plan; wraps its body to read what it shows.
#[inline]
fn respond<ResBody, E: Into<BoxError>>(
    role: &mut Role,
    result: Result<Response<ResBody>, E>,
) -> Result<Response<PlanBody<ResBody>>, BoxError> {
    if let Role::Other = role {
        // Nearly every request: nothing to watch. (`Other` owns nothing: forgetting it spares
        // a call to its drop glue on this path.)
        std::mem::forget(std::mem::replace(role, Role::Answered));
        return match result {
            Ok(response) => Ok(response.map(PlanBody::plain)),
            Err(error) => Err(error.into()),
        };
    }
    respond_watched(role, result)
}

/// [`respond`] for a request the plan watches.
#[inline]
fn respond_watched<ResBody, E: Into<BoxError>>(
    role: &mut Role,
    result: Result<Response<ResBody>, E>,
) -> Result<Response<PlanBody<ResBody>>, BoxError> {
    let role = std::mem::replace(role, Role::Answered);
    // On an error the request was sent and its outcome is unknown: the hold, dropped with the
    // role, stays held as such (in in-flight mode it is given back); unless it never left.
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            let error = error.into();
            if let (Role::Create(Some(hold)), true) = (role, crate::handoff::never_sent(&error)) {
                hold.release(ReleaseReason::Failed);
            }
            return Err(error);
        }
    };
    let status = response.status();
    let observer = match role {
        Role::Other | Role::Create(None) | Role::Answered => None,
        Role::Create(Some(hold)) => {
            if hold.in_flight_mode() {
                return Ok(
                    response.map(|body| PlanBody::in_flight(body, hold.into_in_flight_slot()))
                );
            } else if status.is_success() {
                let job = Job::default();
                response.extensions_mut().insert(job.clone());
                Observer::holding(hold, Observe::Create { job })
            } else if status.is_client_error() {
                // A definite failure (4xx, 429 included): nothing was created.
                hold.release(ReleaseReason::Failed);
                None
            } else {
                // A gateway or server that failed, or a redirect (a 303 to the job made), may
                // have created the job: dropped, the hold stays held as an unknown outcome.
                drop(hold);
                None
            }
        }
        Role::Status(shared, id) if status == StatusCode::NOT_FOUND => {
            shared.end_job(&id, ReleaseReason::Finished);
            None
        }
        Role::Status(shared, id) if status.is_success() => {
            Some(Observer::new(shared, Observe::Status { id }))
        }
        Role::List(shared) if status.is_success() => Some(Observer::new(shared, Observe::List)),
        Role::Status(..) | Role::List(_) => None,
    };
    Ok(response.map(|body| PlanBody::new(body, observer)))
}
