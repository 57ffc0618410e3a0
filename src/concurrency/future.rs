//! The response future: waits for a slot, sends, and decides what the response means.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::body::{Job, PlanBody};
use super::error::ConcurrencyError;
use super::hold::{HoldGuard, StoreMember, Unsent};
use super::observe::{Observe, Observer};
use super::slots::ReleaseReason;
use super::state::{PlanState, SlotTicket};
use crate::clock::Nanos;
use crate::store::{Decision, FailMode, StoreError, StoreHandle, StorePoll};
use crate::BoxError;

/// What the request is to the plan, decided when it is called.
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
}

pin_project! {
    /// The response future of [`ConcurrencyLimitByPlanService`](super::ConcurrencyLimitByPlanService).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        role: Role,
        // Boxed: only a request that waits for a slot (here, or in a shared store) needs it.
        deferred: Option<Box<DeferredCreate<S, B>>>,
    }
}

/// What a create that is not sent at once keeps until it is.
#[allow(clippy::large_enum_variant)] // boxed as a whole, and made once per request
enum DeferredCreate<S, B> {
    /// Waiting for a slot here.
    Queued(QueuedCreate<S, B>),
    /// Holding a slot here, driving its own service ready.
    Readying(Readying<S, B>),
    /// Holding a slot here, asking the shared store for one.
    Store(StoreSlot<S, B>),
}

/// A create holding a slot here, asking the shared store for one across processes.
struct StoreSlot<S, B> {
    inner: S,
    request: Request<B>,
    store: StoreHandle,
    poll: StorePoll,
    deadline: Option<Nanos>,
    slot: Unsent,
}

impl<S, B> StoreSlot<S, B> {
    fn new(
        inner: S,
        request: Request<B>,
        shared: &Arc<PlanState>,
        store: StoreHandle,
        deadline: Option<Nanos>,
    ) -> Self {
        let member: StoreMember = Box::new(format!("c:{}", store.member()));
        let (limit, lease) = (shared.slots().limit(), shared.lease());
        let poll = StorePoll::new(&store, || store.slot_acquire(limit, lease, &member));
        Self {
            inner,
            request,
            store,
            poll,
            deadline,
            slot: Unsent {
                shared: Some(shared.clone()),
                member: Some(member),
            },
        }
    }

    /// Asks until the store gives a slot, the maximum wait runs out (`Ok(false)`), or the
    /// store fails.
    fn poll_slot(
        &mut self,
        shared: &PlanState,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, StoreError>> {
        loop {
            if let Some(answer) = ready!(self.poll.poll_answer(cx)) {
                let wait = match answer? {
                    Decision::Admitted | Decision::Counted { .. } => return Poll::Ready(Ok(true)),
                    Decision::Wait(wait) => wait,
                };
                let now = shared.clock.now();
                if self.deadline.is_some_and(|d| d <= now) {
                    return Poll::Ready(Ok(false));
                }
                let deadline = self.deadline.map(|at| shared.clock.instant(at));
                self.poll
                    .again_by(&self.store, shared.clock.instant(now), wait, deadline);
            }
            let Some(member) = &self.slot.member else {
                return Poll::Ready(Ok(false));
            };
            let store = &self.store;
            let limit = shared.slots().limit();
            let lease = shared.lease();
            ready!(self
                .poll
                .poll_again(store, cx, || store.slot_acquire(limit, lease, member)));
        }
    }
}

/// A request waiting for a slot, with the service that will send it.
struct QueuedCreate<S, B> {
    inner: S,
    request: Request<B>,
    ticket: SlotTicket,
    deadline: Option<Nanos>,
}

/// A create whose turn has come, with the clone of the inner service it drives ready before
/// it is sent.
struct Readying<S, B> {
    inner: S,
    request: Request<B>,
    slot: Unsent,
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Queued,
        Waiting { sleep: Pin<Box<Sleep>> },
        // Holding a slot here, asking the shared store for one.
        Store,
        // Holding a slot here, driving its own service ready.
        Readying,
        Called { #[pin] future: F },
        Failed { error: Option<ConcurrencyError> },
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
            deferred: None,
        }
    }

    pub(crate) fn failed(error: ConcurrencyError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            role: Role::Other,
            deferred: None,
        }
    }

    /// A create holding a slot here, to ask the shared `store` for one before it is sent
    /// through `inner`, a clone of its own that it drives ready then.
    pub(crate) fn store_slot(
        inner: S,
        request: Request<B>,
        shared: &Arc<PlanState>,
        store: StoreHandle,
    ) -> Self {
        let deadline = shared.wait_deadline();
        Self {
            state: State::Store,
            role: Role::Create(None),
            deferred: Some(Box::new(DeferredCreate::Store(StoreSlot::new(
                inner, request, shared, store, deadline,
            )))),
        }
    }

    pub(crate) fn queued(
        inner: S,
        request: Request<B>,
        shared: Arc<PlanState>,
        ticket: u64,
    ) -> Self {
        let deadline = shared.wait_deadline();
        Self {
            state: State::Queued,
            deferred: Some(Box::new(DeferredCreate::Queued(QueuedCreate {
                inner,
                request,
                ticket: SlotTicket {
                    shared,
                    id: ticket,
                    queued: true,
                },
                deadline,
            }))),
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
            let result = ready!(future.poll(cx));
            return Poll::Ready(respond(this.role, result));
        }
        self.poll_queued(cx)
    }
}

impl<S, B, ResBody> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    /// Waiting for a slot, then sending.
    #[inline(never)]
    fn poll_queued(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<PlanBody<ResBody>>, BoxError>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx));
                    return Poll::Ready(respond(this.role, result));
                }
                StateProj::Failed { error } => {
                    let error = error.take().unwrap_or(ConcurrencyError::NoSlots);
                    return Poll::Ready(Err(error.into()));
                }
                StateProj::Waiting { sleep } => {
                    // Woken by the queue or the timer: look again either way.
                    let _ = sleep.as_mut().poll(cx);
                }
                StateProj::Store => {
                    let Some(DeferredCreate::Store(slot)) = this.deferred.as_deref_mut() else {
                        this.state.set(State::Failed { error: None });
                        continue;
                    };
                    let Some(shared) = slot.slot.shared.clone() else {
                        this.state.set(State::Failed { error: None });
                        continue;
                    };
                    let outcome = ready!(slot.poll_slot(&shared, cx));
                    let Some(DeferredCreate::Store(slot)) = this.deferred.take().map(|a| *a) else {
                        continue;
                    };
                    let StoreSlot {
                        inner,
                        request,
                        store,
                        mut slot,
                        ..
                    } = slot;
                    let refused: BoxError = match outcome {
                        Ok(true) => {
                            // Its own clone, not driven ready yet: readied now, holding the
                            // slot here and in the store.
                            let readying = Readying {
                                inner,
                                request,
                                slot,
                            };
                            *this.deferred = Some(Box::new(DeferredCreate::Readying(readying)));
                            this.state.set(State::Readying);
                            continue;
                        }
                        Err(error) if store.fail_mode() == FailMode::Open => {
                            tracing::warn!(%error, "the shared slot store failed: this create counts against this process's plan only");
                            slot.without_store();
                            let readying = Readying {
                                inner,
                                request,
                                slot,
                            };
                            *this.deferred = Some(Box::new(DeferredCreate::Readying(readying)));
                            this.state.set(State::Readying);
                            continue;
                        }
                        Ok(false) => ConcurrencyError::wait_too_long(&shared).into(),
                        Err(error) => error.into(),
                    };
                    // Nothing was sent: the slot taken here, and any member in the store, go
                    // back.
                    drop(slot);
                    this.state.set(State::Failed { error: None });
                    return Poll::Ready(Err(refused));
                }
                StateProj::Readying => {
                    let Some(DeferredCreate::Readying(readying)) = this.deferred.as_deref_mut()
                    else {
                        this.state.set(State::Failed { error: None });
                        continue;
                    };
                    if let Err(error) = ready!(readying.inner.poll_ready(cx)) {
                        // Never sent: the slot goes back.
                        *this.deferred = None;
                        this.state.set(State::Failed { error: None });
                        return Poll::Ready(Err(error.into()));
                    }
                    let Some(DeferredCreate::Readying(readying)) = this.deferred.take().map(|a| *a)
                    else {
                        continue;
                    };
                    let Readying {
                        mut inner,
                        request,
                        slot,
                    } = readying;
                    *this.role = Role::Create(slot.sent());
                    this.state.set(State::Called {
                        future: inner.call(request),
                    });
                    continue;
                }
                StateProj::Queued => {}
            }
            let Some(DeferredCreate::Queued(queued)) = this.deferred.as_deref_mut() else {
                // Not reachable: a waiting future always has its request.
                this.state.set(State::Failed { error: None });
                continue;
            };
            let shared = queued.ticket.shared.clone();
            let now = shared.clock.now();
            let turn = shared.slots().poll_take(queued.ticket.id, now, cx.waker());
            let queue_deadline = queued.deadline;
            let next_expiry = match turn {
                Ok(()) => {
                    queued.ticket.queued = false;
                    let Some(DeferredCreate::Queued(queued)) = this.deferred.take().map(|a| *a)
                    else {
                        continue;
                    };
                    let deadline = queued.deadline;
                    let QueuedCreate { inner, request, .. } = queued;
                    match shared.store.clone() {
                        Some(store) => {
                            let slot = StoreSlot::new(inner, request, &shared, store, deadline);
                            *this.deferred = Some(Box::new(DeferredCreate::Store(slot)));
                            this.state.set(State::Store);
                        }
                        None => {
                            // Its own clone, not driven ready yet: readied now, holding the slot.
                            let readying = Readying {
                                inner,
                                request,
                                slot: Unsent::local(shared),
                            };
                            *this.deferred = Some(Box::new(DeferredCreate::Readying(readying)));
                            this.state.set(State::Readying);
                        }
                    }
                    continue;
                }
                Err(next_expiry) => next_expiry,
            };
            if queue_deadline.is_some_and(|d| d <= now) {
                *this.deferred = None; // leaves the queue
                this.state.set(State::Failed {
                    error: Some(ConcurrencyError::wait_too_long(&shared)),
                });
                continue;
            }
            let wake_at = [next_expiry, queue_deadline].into_iter().flatten().min();
            let Some(at) = wake_at else {
                this.state.set(State::Queued);
                return Poll::Pending;
            };
            let deadline = shared.clock.instant(at);
            match this.state.as_mut().project() {
                StateProj::Waiting { sleep } => sleep.as_mut().reset(deadline),
                _ => this.state.set(State::Waiting {
                    sleep: Box::pin(tokio::time::sleep_until(deadline)),
                }),
            }
            if let StateProj::Waiting { sleep } = this.state.as_mut().project() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
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
        // Nearly every request: nothing to watch.
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
    // On an error the request was sent and its outcome is unknown: the hold, dropped with the
    // role, stays held as such (in in-flight mode it is given back).
    let mut response = result.map_err(Into::into)?;
    let status = response.status();
    let observer = match std::mem::replace(role, Role::Other) {
        Role::Other | Role::Create(None) => None,
        Role::Create(Some(hold)) => {
            if hold.in_flight_mode() {
                return Ok(
                    response.map(|body| PlanBody::in_flight(body, hold.into_in_flight_slot()))
                );
            } else if status.is_success() {
                let job = Job::default();
                response.extensions_mut().insert(job.clone());
                Observer::holding(hold, Observe::Create { job })
            } else if status.is_server_error() {
                // A gateway or server that failed may have created the job: dropped, the
                // hold stays held as an unknown outcome.
                drop(hold);
                None
            } else {
                // A definite failure (4xx, 429 included): nothing was created.
                hold.release(ReleaseReason::Failed);
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
