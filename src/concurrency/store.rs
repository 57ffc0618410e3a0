//! A plan's slots shared through a store: a create that holds a slot here asks the store for
//! one across processes ([`StoreSlot`]), and each process lets go of the jobs another process
//! gave back ([`listen`]).

use crate::event::{Event, Refusal};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Request;

use super::error::ConcurrencyError;
use super::future::WaitingCreate;
use super::hold::{More, Unsent};
use super::slots::ReleaseReason;
use super::state::PlanState;
use crate::clock::Nanos;
use crate::error::ConfigError;
use crate::store::{Decision, FailMode, StoreError, StoreHandle, StorePoll};
use crate::BoxError;

/// A create holding a slot here, asking the shared store for one across processes.
pub(crate) struct StoreSlot<S, B> {
    inner: S,
    request: Request<B>,
    store: StoreHandle,
    poll: StorePoll,
    deadline: Option<Nanos>,
    slot: Unsent,
    /// The span of its wait (`plan_wait`, at `debug`, `store` set), entered while it asks.
    span: tracing::Span,
}

impl<S, B> StoreSlot<S, B> {
    pub(super) fn new(
        inner: S,
        request: Request<B>,
        shared: &Arc<PlanState>,
        store: StoreHandle,
        deadline: Option<Nanos>,
        jobs: u32,
    ) -> Self {
        let member = format!("c:{}", store.member());
        let (limit, job_lease) = (shared.slots().limit(), shared.job_lease());
        let poll = StorePoll::new(&store, || {
            store.slot_acquire(limit, job_lease, &member, jobs)
        });
        let plan = || *shared.plan.lock().unwrap_or_else(|e| e.into_inner());
        Self {
            span: tracing::debug_span!("plan_wait", plan = %plan(), store = true),
            inner,
            request,
            store,
            poll,
            deadline,
            slot: Unsent {
                shared: Some(shared.clone()),
                more: Some(Box::new(More {
                    member: Some(member),
                    jobs,
                })),
            },
        }
    }

    /// Ready once the create may be sent: the store gave it a slot, or failed open (the create
    /// then counts against this process's plan only). An error returns it unsent: its maximum
    /// wait ran out, or the store failed closed.
    pub(super) fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let span = self.span.clone();
        let _span = span.enter();
        let Some(shared) = self.slot.shared.clone() else {
            unreachable!("an unsent slot always has its plan");
        };
        match ready!(self.poll_store(&shared, cx)) {
            Ok(Asked::Taken) => Poll::Ready(Ok(())),
            Ok(Asked::Never { limit }) => {
                shared.report(|layer| Event::SlotRefused {
                    layer,
                    reason: Refusal::JobCount,
                });
                let jobs = self.slot.jobs();
                Poll::Ready(Err(ConcurrencyError::JobCount { jobs, limit }.into()))
            }
            Ok(Asked::WaitTooLong) => {
                shared.report(|layer| Event::SlotRefused {
                    layer,
                    reason: Refusal::WaitTooLong,
                });
                Poll::Ready(Err(ConcurrencyError::wait_too_long(&shared).into()))
            }
            Err(error) if self.store.fail_mode() == FailMode::Open => {
                tracing::debug!(%error, "the shared slot store failed: this create counts against this process's plan only");
                self.slot.without_store();
                Poll::Ready(Ok(()))
            }
            Err(error) => {
                shared.report(|layer| Event::SlotRefused {
                    layer,
                    reason: Refusal::StoreUnavailable,
                });
                Poll::Ready(Err(error.into()))
            }
        }
    }

    /// The create, holding its slot, to be sent once its service is ready.
    pub(super) fn into_waiting(self) -> WaitingCreate<S, B> {
        let Self {
            inner,
            request,
            slot,
            ..
        } = self;
        WaitingCreate::holding(inner, request, slot)
    }

    /// Asks until the store gives the slots, the maximum wait runs out, the plan is lowered
    /// below the create's count, or the store fails.
    fn poll_store(
        &mut self,
        shared: &PlanState,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Asked, StoreError>> {
        loop {
            if let Some(answer) = ready!(self.poll.poll_answer(cx)) {
                let wait = match answer? {
                    Decision::Admitted | Decision::Counted { .. } => {
                        return Poll::Ready(Ok(Asked::Taken))
                    }
                    Decision::Wait(wait) => wait,
                };
                let now = shared.clock.now();
                if self.deadline.is_some_and(|d| d <= now) {
                    return Poll::Ready(Ok(Asked::WaitTooLong));
                }
                let deadline = self.deadline.map(|at| shared.clock.instant(at));
                self.poll
                    .again_by(&self.store, shared.clock.instant(now), wait, deadline);
            }
            let Some(member) = self.slot.more.as_ref().and_then(|m| m.member.as_deref()) else {
                return Poll::Ready(Ok(Asked::WaitTooLong));
            };
            let store = &self.store;
            let limit = shared.slots().limit();
            let job_lease = shared.job_lease();
            let jobs = self.slot.jobs();
            if jobs as usize > limit {
                // The plan was lowered below this batch while it waited in the store.
                return Poll::Ready(Ok(Asked::Never { limit }));
            }
            ready!(self.poll.poll_again(store, cx, || {
                store.slot_acquire(limit, job_lease, member, jobs)
            }));
        }
    }
}

/// What asking the store came to.
enum Asked {
    /// The slots are held.
    Taken,
    /// The maximum wait ran out.
    WaitTooLong,
    /// The create needs more slots than the plan's `limit` (lowered while it waited).
    Never { limit: usize },
}

/// Lets go, in this process, of the jobs another process gave back.
pub(super) fn listen(
    shared: &Arc<PlanState>,
    store: &crate::store::RedisStore,
) -> Result<(), ConfigError> {
    use tokio::sync::broadcast::error::RecvError;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Err(ConfigError::InvalidSetting {
            name: "store",
            reason: "a layer with a store must be built inside a Tokio runtime",
        });
    };
    let mut done = store.done_jobs();
    let shared = Arc::downgrade(shared);
    runtime.spawn(async move {
        loop {
            match done.recv().await {
                Ok(id) => {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    shared.end_job(&id, ReleaseReason::Elsewhere);
                }
                Err(RecvError::Lagged(missed)) => tracing::warn!(
                    missed,
                    "missed jobs given back elsewhere: their slots come back with a reconcile or their lease"
                ),
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(())
}
