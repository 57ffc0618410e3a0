//! Server mode over a shared store: a request's verdict comes from the store, counted for its
//! client across the fleet, and only an admitted request readies the inner service.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower_service::Service;

use super::future::{Correction, State};
use super::state::{RateLimitFields, Refused};
use crate::quota::Rate;
use crate::rate_limit::cost::Costs;
use crate::rate_limit::layer::Reject;
use crate::rate_limit::reject::{rejection, RejectReason, RejectResponse};
use crate::store::{Decision, FailMode, StoreCall, StoreError};

/// A request whose verdict the shared store is deciding, with a clone of the inner service
/// that is readied once the request may go.
pub(crate) struct StoreHit<S, B, F> {
    inner: S,
    layer: Reject<F>,
    route: usize,
    /// The client's key in this process's own limiter, for [`FailMode::Open`].
    local_key: u64,
    step: Step<B>,
    /// What the request costs in each quota.
    costs: Costs,
    /// The client's limit in the store and its quotas, for a cost corrected afterwards.
    name: String,
    rates: Box<[Rate]>,
    /// The client's tier, if the layer has tiers and it is counted in one.
    tier: Option<usize>,
    /// When the store counted it (microseconds, on the store's clock).
    counted_at: u64,
}

enum Step<B> {
    /// The store is deciding.
    Deciding {
        call: StoreCall,
        request: Request<B>,
    },
    /// Admitted, with the fields of its response, while the inner service gets ready.
    Readying {
        request: Request<B>,
        fields: Option<RateLimitFields>,
    },
    /// Sent, or refused.
    Decided,
}

/// What a request whose verdict the store gave becomes.
type NextState<S, B, F> = State<
    <S as Service<Request<B>>>::Future,
    <S as Service<Request<B>>>::Response,
    Box<StoreHit<S, B, F>>,
    Box<super::future::Correction<F>>,
>;

impl<S, B, F> StoreHit<S, B, F> {
    pub(super) fn new(
        inner: S,
        request: Request<B>,
        call: StoreCall,
        layer: Reject<F>,
        route: usize,
        local_key: u64,
    ) -> Self {
        Self {
            inner,
            layer,
            route,
            local_key,
            step: Step::Deciding { call, request },
            costs: Costs::one(),
            name: String::new(),
            rates: Box::default(),
            tier: None,
            counted_at: 0,
        }
    }

    /// The client is counted in `tier`'s quotas.
    pub(super) fn in_tier(mut self, tier: Option<usize>) -> Self {
        self.tier = tier;
        self
    }

    /// The request costs `costs` in the quotas `rates` of the client's limit `name`.
    pub(super) fn costing(mut self, costs: Costs, name: String, rates: Box<[Rate]>) -> Self {
        (self.costs, self.name, self.rates) = (costs, name, rates);
        self
    }
}

impl<S, B, F, ResBody> StoreHit<S, B, F>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    F: RejectResponse<ResBody>,
{
    /// Waits for the store's verdict; once admitted, readies the inner service and sends.
    pub(super) fn poll_verdict(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<NextState<S, B, F>, S::Error>> {
        loop {
            match &mut self.step {
                Step::Deciding { call, .. } => {
                    let decision = ready!(Pin::new(call).poll(cx));
                    if let Ok(Decision::Counted { at, .. }) = decision {
                        self.counted_at = at;
                    }
                    let Step::Deciding { request, .. } =
                        std::mem::replace(&mut self.step, Step::Decided)
                    else {
                        unreachable!()
                    };
                    match self.verdict(decision) {
                        Ok(fields) => self.step = Step::Readying { request, fields },
                        Err(refused) => {
                            let shared = &self.layer.0;
                            let name = &shared.routes[self.route].name;
                            let response = rejection(&shared.config, name, refused);
                            return Poll::Ready(Ok(State::Rejected { response }));
                        }
                    }
                }
                Step::Readying { .. } => {
                    // Admitted: only now is the inner service driven ready.
                    let ready = ready!(self.inner.poll_ready(cx));
                    let Step::Readying { request, fields } =
                        std::mem::replace(&mut self.step, Step::Decided)
                    else {
                        unreachable!()
                    };
                    ready?;
                    let future = self.inner.call(request);
                    let shared = &self.layer.0;
                    let weighing = shared.routes[self.route].weighing.as_ref();
                    if !weighing.is_some_and(|w| w.corrects()) {
                        return Poll::Ready(Ok(State::Inner { future, fields }));
                    }
                    let correction = Correction {
                        layer: self.layer.clone(),
                        route: self.route,
                        key: self.local_key,
                        tier: self.tier,
                        at: shared.clock.now(),
                        taken: std::mem::replace(&mut self.costs, Costs::one()),
                        store: Some((
                            std::mem::take(&mut self.name),
                            std::mem::take(&mut self.rates),
                            self.counted_at,
                        )),
                    };
                    let correction = Some(Box::new(correction));
                    return Poll::Ready(Ok(State::Corrected {
                        future,
                        fields,
                        correction,
                    }));
                }
                Step::Decided => unreachable!("a store verdict polled after it was given"),
            }
        }
    }

    /// What the store's answer means for this request: the fields of its response, or why
    /// it is refused.
    fn verdict(
        &self,
        decision: Result<Decision, StoreError>,
    ) -> Result<Option<RateLimitFields>, Refused> {
        let shared = &self.layer.0;
        let route = &shared.routes[self.route];
        let config = &shared.config;
        let quota = route.quota_of(self.tier);
        let refused = |wait: Duration, reason| Refused {
            wait,
            quota,
            reason,
        };
        let verdict = match decision {
            Ok(Decision::Counted {
                remaining, reset, ..
            }) if config.headers => Ok(Some(route.fields_of(self.tier, remaining, reset))),
            Ok(Decision::Admitted | Decision::Counted { .. }) => Ok(None),
            // Nothing is in flight in server mode; should it ever be, a period is safe.
            Ok(Decision::Wait(wait)) => {
                Err(refused(wait.unwrap_or(quota.period()), RejectReason::Quota))
            }
            Err(error) => match config.store.as_ref().map(|s| s.fail_mode()) {
                Some(FailMode::Closed) => {
                    tracing::debug!(%error, "the shared quota store failed: refusing");
                    Err(refused(
                        Duration::from_secs(1),
                        RejectReason::StoreUnavailable,
                    ))
                }
                _ => {
                    tracing::debug!(%error, "the shared quota store failed: counting against this server's own quota");
                    let now = shared.clock.now();
                    let events = &shared.events;
                    // Reports its own verdict.
                    let (key, index, costs) = (self.local_key, self.route, &self.costs);
                    return match self.tier {
                        Some(tier) => {
                            route.hit_tier(key, tier, now, config.headers, events, index, costs)
                        }
                        None => route.hit(key, now, config.headers, events, index, costs),
                    };
                }
            },
        };
        route.report(&verdict, &shared.events, self.route);
        verdict
    }
}
