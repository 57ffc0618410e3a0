//! Server mode over a shared store: a create's slot is taken in the store, for its client
//! across the fleet, and only a create that got one readies the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::body::CreateSlot;
use super::future::State;
use super::layer::KeyedPlanState;
use super::reject::{PlanRejectReason, RejectPlan};
use super::service::refuse;
use super::state::{Outcome, Taken};
use crate::concurrency::Plan;
use crate::event::Event;
use crate::store::{FailMode, KeyedCall};

/// A create asking the shared store for a slot, with a clone of the inner service that is
/// readied once it has one.
pub(crate) struct StoreTake<S, B, F> {
    inner: S,
    shared: Arc<KeyedPlanState<F>>,
    /// The client's key in this server's own table, for [`FailMode::Open`].
    local_key: u64,
    /// The client's key in the store, and this create's member there.
    client: u64,
    member: String,
    plan: Plan,
    step: Step<B>,
}

enum Step<B> {
    /// The store is deciding.
    Taking {
        call: KeyedCall,
        request: Request<B>,
    },
    /// A slot is held (in the store, or in this server's table with `local`), while the inner
    /// service gets ready.
    Readying { request: Request<B>, local: bool },
    /// Sent, or refused.
    Done,
}

type Next<S, B, F> = State<
    <S as Service<Request<B>>>::Future,
    <S as Service<Request<B>>>::Response,
    Box<StoreTake<S, B, F>>,
    F,
>;

impl<S, B, F> StoreTake<S, B, F> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        inner: S,
        shared: Arc<KeyedPlanState<F>>,
        request: Request<B>,
        local_key: u64,
        client: u64,
        plan: Plan,
    ) -> Self {
        let Some(store) = &shared.store else {
            unreachable!("made with a store");
        };
        let member = store.member();
        let call = store.keyed_take(client, plan.limit(), shared.lease(), &member);
        Self {
            inner,
            shared,
            local_key,
            client,
            member,
            plan,
            step: Step::Taking { call, request },
        }
    }
}

impl<S, B, F, ResBody> StoreTake<S, B, F>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    F: RejectPlan<ResBody> + Send + Sync + 'static,
{
    /// Waits for the store's slot; once it has one, readies the inner service and sends.
    pub(super) fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Next<S, B, F>, S::Error>> {
        loop {
            match &mut self.step {
                Step::Taking { call, request } => {
                    let answer = ready!(Pin::new(call).poll(cx));
                    let shared = &self.shared;
                    let refused = |reason, held: i64| {
                        let held = usize::try_from(held).unwrap_or(0);
                        refuse(shared, request, reason, held)
                    };
                    let local = match answer {
                        Ok([1, _]) => false,
                        Ok([_, held]) => {
                            let response = refused(PlanRejectReason::PlanFull, held);
                            self.step = Step::Done;
                            return Poll::Ready(Ok(rejected(response)));
                        }
                        Err(error) => {
                            // The take may still run once Redis answers (a timeout): whatever
                            // it took is given back after it.
                            if let Some(store) = &shared.store {
                                store.keyed_change(
                                    self.client,
                                    "failed",
                                    vec![std::mem::take(&mut self.member)],
                                );
                            }
                            let fail_mode = shared.store.as_ref().map(|s| s.fail_mode());
                            if fail_mode == Some(FailMode::Closed) {
                                tracing::debug!(%error, "the shared store failed: refusing the create");
                                let response = refused(PlanRejectReason::StoreUnavailable, 0);
                                self.step = Step::Done;
                                return Poll::Ready(Ok(rejected(response)));
                            }
                            tracing::debug!(%error, "the shared store failed: counting the create in this server's own table");
                            let now = shared.clock.now();
                            match shared.slots.take(self.local_key, self.plan.limit(), now) {
                                Taken::Yes { forgot } => {
                                    if forgot {
                                        shared.forgotten.fetch_add(1, Ordering::Relaxed);
                                    }
                                    true
                                }
                                Taken::Full { held } => {
                                    let response = refused(PlanRejectReason::PlanFull, held as i64);
                                    self.step = Step::Done;
                                    return Poll::Ready(Ok(rejected(response)));
                                }
                            }
                        }
                    };
                    let waited = std::time::Duration::ZERO;
                    shared
                        .events
                        .emit(0, |layer, _| Event::SlotTaken { layer, waited });
                    let Step::Taking { request, .. } =
                        std::mem::replace(&mut self.step, Step::Done)
                    else {
                        unreachable!()
                    };
                    self.step = Step::Readying { request, local };
                }
                Step::Readying { .. } => {
                    // The slot is held: only now is the inner service driven ready. A failure
                    // drops this with the slot given back (nothing was sent).
                    ready!(self.inner.poll_ready(cx))?;
                    let Step::Readying { request, local } =
                        std::mem::replace(&mut self.step, Step::Done)
                    else {
                        unreachable!()
                    };
                    let future = self.inner.call(request);
                    let slot = CreateSlot::new(self.shared.clone(), self.local_key);
                    let slot = match local {
                        true => slot,
                        false => slot.in_store(self.client, std::mem::take(&mut self.member)),
                    };
                    return Poll::Ready(Ok(State::Create {
                        future,
                        slot: Some(slot),
                    }));
                }
                Step::Done => unreachable!("a store's slot polled after it was given"),
            }
        }
    }
}

fn rejected<Fut, R, W, F>(response: R) -> State<Fut, R, W, F> {
    State::Rejected {
        response: Some(response),
    }
}

impl<S, B, F> Drop for StoreTake<S, B, F> {
    fn drop(&mut self) {
        let store = self.shared.store.as_ref();
        match std::mem::replace(&mut self.step, Step::Done) {
            // Perhaps taken by now: given back (nothing if not).
            Step::Taking { .. } | Step::Readying { local: false, .. } => {
                if let Some(store) = store {
                    store.keyed_change(self.client, "failed", vec![self.member.clone()]);
                }
            }
            Step::Readying { local: true, .. } => {
                let now = self.shared.clock.now();
                self.shared
                    .slots
                    .settle(self.local_key, Outcome::Failed, now);
            }
            Step::Done => {}
        }
    }
}
