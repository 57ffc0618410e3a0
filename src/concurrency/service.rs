//! [`ConcurrencyLimitByPlanService`]: where a request is told what it is to the plan (a
//! create, a status, a list, or none of these) and sent, queued or refused.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower_service::Service;

use super::body::PlanBody;
use super::error::ConcurrencyError;
use super::future::{ResponseFuture, Role};
use super::hold::{idempotency_key, HoldGuard, More};
use super::state::{plan_figures, PlanState, RouteKind};
use crate::event::{Event, Refusal};
use crate::readiness::{unready, waiting_clone};
use crate::BoxError;

/// The service made by a [`ConcurrencyLimitByPlan`](super::ConcurrencyLimitByPlan) layer.
///
/// `poll_ready` forwards to the inner service: whether a request needs a slot is only known
/// from the request, so waiting happens in the response future. A create that waits for a
/// slot does so with a clone of the inner service that it drives ready when its turn comes
/// (see [the module docs](super#readiness)).
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitByPlanService<S> {
    inner: S,
    shared: Arc<PlanState>,
}

impl<S> ConcurrencyLimitByPlanService<S> {
    pub(crate) fn new(inner: S, shared: Arc<PlanState>) -> Self {
        Self { inner, shared }
    }

    inner_service_accessors!();
}

impl<S, B, ResBody> Service<Request<B>> for ConcurrencyLimitByPlanService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<PlanBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let found = shared.table.lookup_param(
            request.method(),
            request.uri().path(),
            &shared.config.id_param,
        );
        let role = match found {
            None => Role::Other,
            Some((index, param)) => match shared.kinds[index] {
                RouteKind::Create => return self.create(request, One),
                RouteKind::CreateCounted => return self.create_counted(request),
                RouteKind::Status => match param {
                    Some(id) if shared.slots().is_held(id) => {
                        Role::Status(shared.clone(), id.into())
                    }
                    _ => Role::Other,
                },
                RouteKind::List => Role::List(shared.clone()),
            },
        };
        ResponseFuture::called(self.inner.call(request), role)
    }
}

impl<S> ConcurrencyLimitByPlanService<S> {
    /// A create that starts as many jobs as [`Builder::jobs_per_create`] counts: asked
    /// before the slots are locked (the caller's code runs under no lock of ours). Out of
    /// line, so that a create of one job (every create without it) sees a constant count.
    ///
    /// [`Builder::jobs_per_create`]: super::Builder::jobs_per_create
    #[inline(never)]
    fn create_counted<B>(&mut self, request: Request<B>) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        let jobs = match &self.shared.config.jobs_per_create {
            Some(count) => (count.0)(&crate::RequestHead::of(&request)),
            None => 1,
        };
        self.create(request, jobs)
    }

    /// A create that starts `jobs` jobs: takes that many slots at once, waits for them, or is
    /// refused.
    fn create<B>(&mut self, request: Request<B>, jobs: impl JobCount) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        let jobs = jobs.get();
        let shared = &self.shared;
        let key = idempotency_key(&request);
        let mut slots = shared.slots();
        if let Some(held) = key.as_deref().map(String::as_str) {
            // The create sent again, whose first send left its slots held as unknown
            // outcomes (kept in this process only: a store holds its own).
            if jobs > 0 && slots.take_over(held, jobs as usize) {
                drop(slots);
                let hold = HoldGuard::new(shared.clone(), More::of_jobs(jobs)).with_key(key);
                let future = self.inner.call(request);
                return ResponseFuture::called(future, Role::Create(Some(hold)));
            }
        }
        if slots.limit() == 0 {
            drop(slots);
            unready(&mut self.inner);
            refused(shared, Refusal::NoSlots);
            return ResponseFuture::failed(ConcurrencyError::NoSlots);
        }
        if jobs != 1 && (jobs == 0 || jobs as usize > slots.limit()) {
            let limit = slots.limit();
            drop(slots);
            unready(&mut self.inner);
            refused(shared, Refusal::JobCount);
            return ResponseFuture::failed(ConcurrencyError::JobCount { jobs, limit });
        }
        if slots.try_take(jobs as usize, || shared.clock.now()) {
            shared.events.gauges(0, || plan_figures(&slots));
            drop(slots);
            let waited = Duration::ZERO;
            shared
                .events
                .emit(0, |layer, _| Event::SlotTaken { layer, waited });
            #[cfg(feature = "redis")]
            if let Some(store) = &shared.store {
                let store = store.clone();
                return self.create_store(request, store, jobs);
            }
            let hold = HoldGuard::new(shared.clone(), More::of_jobs(jobs)).with_key(key);
            let future = self.inner.call(request);
            return ResponseFuture::called(future, Role::Create(Some(hold)));
        }
        if let Some(max_queue) = shared.config.max_queue {
            if slots.queue_len() >= max_queue {
                drop(slots);
                unready(&mut self.inner);
                refused(shared, Refusal::QueueFull);
                return ResponseFuture::failed(ConcurrencyError::QueueFull { max_queue });
            }
        }
        let ticket = slots.join();
        shared.events.gauges(0, || plan_figures(&slots));
        drop(slots);
        shared
            .events
            .emit(0, |layer, _| Event::SlotQueued { layer });
        let shared = shared.clone();
        let inner = waiting_clone(&mut self.inner);
        ResponseFuture::queued(inner, request, shared, ticket, jobs)
    }

    /// A create holding a slot here asks the shared store for one, and then drives a clone
    /// of its own ready (the caller's readiness is given back for the wait). Out of line, so
    /// that the in-memory path stays as small as it was.
    #[cfg(feature = "redis")]
    #[inline(never)]
    fn create_store<B>(
        &mut self,
        request: Request<B>,
        store: crate::store::StoreHandle,
        jobs: u32,
    ) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        let inner = waiting_clone(&mut self.inner);
        ResponseFuture::store_slot(inner, request, &self.shared, store, jobs)
    }
}

/// How many jobs a create starts: [`One`], known when compiled (the path of every create
/// without [`Builder::jobs_per_create`]), or a count read from the request.
///
/// [`Builder::jobs_per_create`]: super::Builder::jobs_per_create
trait JobCount: Copy {
    fn get(self) -> u32;
}

/// One job.
#[derive(Clone, Copy)]
struct One;

impl JobCount for One {
    #[inline(always)]
    fn get(self) -> u32 {
        1
    }
}

impl JobCount for u32 {
    #[inline(always)]
    fn get(self) -> u32 {
        self
    }
}

/// Reports a create returned unsent.
#[cold]
fn refused(shared: &PlanState, reason: Refusal) {
    shared.report(|layer| Event::SlotRefused { layer, reason });
}
