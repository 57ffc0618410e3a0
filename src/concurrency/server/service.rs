//! [`KeyedPlansService`]: where a request is told what it is to its client's plan (a create,
//! a status of a job it holds, or neither), and sent or refused.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::body::{CreateSlot, KeyedPlanBody, StatusRead};
use super::builder::ServerRoute;
use super::future::KeyedPlanFuture;
use super::layer::KeyedPlanState;
use super::reject::{PlanRejectReason, PlanRejection, RejectPlan};
use super::state::Taken;
use crate::event::{Event, Refusal};
use crate::lock::lock;
use crate::rate_limit::server::key::{Extracted, ANONYMOUS};
use crate::rate_limit::{MissingKey, RequestHead};
use crate::route::request_path;

/// The service made by a [`KeyedPlans`](super::KeyedPlans) layer. `poll_ready` forwards to the
/// inner service; a create is refused or sent at once, never queued.
pub struct KeyedPlansService<S, F> {
    inner: S,
    shared: Arc<KeyedPlanState<F>>,
}

impl<S: Clone, F> Clone for KeyedPlansService<S, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug, F> std::fmt::Debug for KeyedPlansService<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedPlansService")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, F> KeyedPlansService<S, F> {
    pub(crate) fn new(inner: S, shared: Arc<KeyedPlanState<F>>) -> Self {
        Self { inner, shared }
    }

    inner_service_accessors!();
}

/// What a request's key is to server mode.
enum KeyOf {
    Key(u64),
    Pass,
    Refuse(PlanRejectReason),
}

impl<S, B, ResBody, F> Service<Request<B>> for KeyedPlansService<S, F>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    F: RejectPlan<ResBody> + Send + Sync + 'static,
{
    type Response = Response<KeyedPlanBody<ResBody>>;
    type Error = S::Error;
    type Future = KeyedPlanFuture<S, B, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let found =
            shared
                .table
                .lookup_param(request.method(), request_path(&request), &shared.id_param);
        let Some((index, param)) = found else {
            return KeyedPlanFuture::pass(self.inner.call(request));
        };
        let key = match key_of(shared, &request) {
            KeyOf::Key(key) => key,
            KeyOf::Pass => return KeyedPlanFuture::pass(self.inner.call(request)),
            KeyOf::Refuse(reason) => {
                if shared.kinds[index] != ServerRoute::Create {
                    return KeyedPlanFuture::pass(self.inner.call(request));
                }
                return KeyedPlanFuture::rejected(
                    &mut self.inner,
                    refuse(shared, &request, reason, 0),
                );
            }
        };
        match shared.kinds[index] {
            ServerRoute::Status => match param {
                Some(id) if shared.slots.holds(key, id) => {
                    let read = StatusRead {
                        shared: shared.clone(),
                        key,
                        id: id.into(),
                        prefix: Vec::new(),
                        #[cfg(feature = "redis")]
                        client: None,
                    };
                    KeyedPlanFuture::status(self.inner.call(request), read)
                }
                #[cfg(feature = "redis")]
                Some(id) if shared.store.is_some() => {
                    // Held anywhere in the fleet, perhaps: read, and ended there if over.
                    let read = StatusRead {
                        shared: shared.clone(),
                        key,
                        id: id.into(),
                        prefix: Vec::new(),
                        client: Some(stable_key(shared, &request)),
                    };
                    KeyedPlanFuture::status(self.inner.call(request), read)
                }
                _ => KeyedPlanFuture::pass(self.inner.call(request)),
            },
            ServerRoute::Create => {
                let head = RequestHead::of(&request);
                let plan = shared.plan_by.as_ref().and_then(|by| by(&head));
                let plan = plan.unwrap_or_else(|| *lock(&shared.default_plan));
                #[cfg(feature = "redis")]
                if shared.store.is_some() {
                    let client = stable_key(shared, &request);
                    let inner = crate::readiness::waiting_clone(&mut self.inner);
                    let take = super::store::StoreTake::new(
                        inner,
                        shared.clone(),
                        request,
                        key,
                        client,
                        plan,
                    );
                    return KeyedPlanFuture::store(take);
                }
                let now = shared.clock.now();
                match shared.slots.take(key, plan.limit(), now) {
                    Taken::Yes { forgot } => {
                        if forgot {
                            shared.forgotten.fetch_add(1, Ordering::Relaxed);
                        }
                        let waited = std::time::Duration::ZERO;
                        shared
                            .events
                            .emit(0, |layer, _| Event::SlotTaken { layer, waited });
                        let slot = CreateSlot::new(shared.clone(), key);
                        KeyedPlanFuture::create(self.inner.call(request), slot)
                    }
                    Taken::Full { held } => {
                        let reason = PlanRejectReason::PlanFull;
                        KeyedPlanFuture::rejected(
                            &mut self.inner,
                            refuse(shared, &request, reason, held),
                        )
                    }
                }
            }
        }
    }
}

fn key_of<F, B>(shared: &KeyedPlanState<F>, request: &Request<B>) -> KeyOf {
    match shared.key.extract(request, &shared.hasher, 64) {
        Extracted::Key(key) => KeyOf::Key(key),
        Extracted::Missing => match shared.on_missing.unwrap_or_default() {
            MissingKey::Shared => KeyOf::Key(ANONYMOUS),
            MissingKey::Pass => KeyOf::Pass,
            MissingKey::Refuse => KeyOf::Refuse(PlanRejectReason::MissingKey),
        },
        Extracted::NoPeer => match shared.on_missing {
            Some(MissingKey::Shared) => KeyOf::Key(ANONYMOUS),
            Some(MissingKey::Pass) => KeyOf::Pass,
            Some(MissingKey::Refuse) => KeyOf::Refuse(PlanRejectReason::MissingKey),
            None => {
                if !shared.warned_no_peer.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the plan's server mode keys clients by address, but the server \
                         supplies none: creates are answered 500"
                    );
                }
                KeyOf::Refuse(PlanRejectReason::NoPeerAddress)
            }
        },
    }
}

/// The client's key in the shared store: hashed the same way in every process.
#[cfg(feature = "redis")]
fn stable_key<F, B>(shared: &KeyedPlanState<F>, request: &Request<B>) -> u64 {
    let stable = crate::rate_limit::server::key::KeyHashing::Stable;
    match shared.key.extract(request, &stable, 64) {
        Extracted::Key(key) => key,
        Extracted::Missing | Extracted::NoPeer => ANONYMOUS,
    }
}

/// The response for a refused create.
#[cold]
pub(super) fn refuse<F, B, ResBody>(
    shared: &KeyedPlanState<F>,
    request: &Request<B>,
    reason: PlanRejectReason,
    in_use: usize,
) -> Response<ResBody>
where
    F: RejectPlan<ResBody>,
{
    let head = RequestHead::of(request);
    let plan = shared.plan_by.as_ref().and_then(|by| by(&head));
    let plan = plan.unwrap_or_else(|| *lock(&shared.default_plan));
    let rejection = PlanRejection {
        plan,
        in_use,
        reason,
        head,
    };
    let mut response = shared.body.response(&rejection);
    *response.status_mut() = reason.status();
    let refusal = match reason {
        PlanRejectReason::PlanFull => Refusal::PlanFull,
        PlanRejectReason::MissingKey => Refusal::MissingKey,
        PlanRejectReason::NoPeerAddress => Refusal::NoPeerAddress,
        PlanRejectReason::StoreUnavailable => Refusal::StoreUnavailable,
    };
    shared.events.emit(0, |layer, _| Event::SlotRefused {
        layer,
        reason: refusal,
    });
    response
}
