//! [`RateLimitByRouteService`] in server mode: each request's route (matched the way axum
//! routes it: `HEAD` under the `GET` route, and, inside a nested router, by the path the
//! client sent, `OriginalUri` with feature `axum`) and client key, then its client's verdict,
//! from this process's table or from the shared store.

use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower_service::Service;

use super::future::{Correction, RejectFuture};
use super::key::{Extracted, MissingKey, RequestHead, ANONYMOUS};
use super::state::{KeyedRoute, Refused};
use super::tier::Tier;
use crate::rate_limit::builder::RejectConfig;
use crate::rate_limit::cost::Costs;
use crate::rate_limit::layer::{LayerState, Reject};
use crate::rate_limit::reject::{rejection, RejectReason, RejectResponse};
use crate::rate_limit::service::RateLimitByRouteService;
use crate::route::request_path;

impl<S, B, ResBody, F> Service<Request<B>> for RateLimitByRouteService<S, Reject<F>>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    F: RejectResponse<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RejectFuture<S, B, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = &self.mode.0;
        let Some(index) = shared
            .table
            .lookup(request.method(), request_path(&request))
        else {
            return RejectFuture::inner(self.inner.call(request), None);
        };
        let config = &shared.config;
        let route = &shared.routes[index];
        let key = match config
            .key
            .extract(&request, &config.hasher, config.ipv6_prefix)
        {
            Extracted::Key(key) => key,
            Extracted::Missing => match config.on_missing.unwrap_or_default() {
                MissingKey::Shared => ANONYMOUS,
                MissingKey::Pass => return RejectFuture::inner(self.inner.call(request), None),
                MissingKey::Refuse => {
                    return RejectFuture::rejected(
                        &mut self.inner,
                        refusal(shared, index, RejectReason::MissingKey),
                    )
                }
            },
            Extracted::NoPeer => match config.on_missing {
                Some(MissingKey::Shared) => ANONYMOUS,
                Some(MissingKey::Pass) => {
                    return RejectFuture::inner(self.inner.call(request), None)
                }
                Some(MissingKey::Refuse) => {
                    return RejectFuture::rejected(
                        &mut self.inner,
                        refusal(shared, index, RejectReason::MissingKey),
                    )
                }
                None => {
                    no_peer(config);
                    return RejectFuture::rejected(
                        &mut self.inner,
                        refusal(shared, index, RejectReason::NoPeerAddress),
                    );
                }
            },
        };
        if config.tiers.is_some() {
            return self.call_tiered(request, index, key);
        }
        #[cfg(feature = "redis")]
        if config.store.is_some() {
            let costs = match &route.weighing {
                None => Costs::one(),
                Some(weighing) => weighing.costs(&RequestHead::of(&request)),
            };
            return self.call_store(request, index, key, costs, None);
        }
        let Some(weighing) = &route.weighing else {
            let now = shared.clock.now();
            return match route.hit(
                key,
                now,
                config.headers,
                &shared.events,
                index,
                &Costs::one(),
            ) {
                Ok(fields) => RejectFuture::inner(self.inner.call(request), fields),
                Err(refused) => {
                    RejectFuture::rejected(&mut self.inner, rejection(config, &route.name, refused))
                }
            };
        };
        let costs = weighing.costs(&RequestHead::of(&request));
        self.call_counted(request, index, key, costs, None)
    }
}

impl<S, F> RateLimitByRouteService<S, Reject<F>> {
    /// A request of a layer with tiers: counted under its tier's quotas (or refused, its
    /// tier unknown).
    #[inline(never)]
    fn call_tiered<B, ResBody>(
        &mut self,
        request: Request<B>,
        index: usize,
        key: u64,
    ) -> RejectFuture<S, B, F>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
        F: RejectResponse<ResBody>,
    {
        let shared = &self.mode.0;
        let (config, route) = (&shared.config, &shared.routes[index]);
        let Some(tiers) = &config.tiers else {
            unreachable!("called with tiers");
        };
        let head = RequestHead::of(&request);
        let tier = match tiers.of(&head) {
            Tier::Of(tier) => Some(tier),
            Tier::RouteQuotas => None,
            Tier::Refused => {
                let response = refusal(shared, index, RejectReason::UnknownTier);
                return RejectFuture::rejected(&mut self.inner, response);
            }
        };
        let costs = match &route.weighing {
            None => Costs::one(),
            Some(weighing) => weighing.costs(&head),
        };
        #[cfg(feature = "redis")]
        if config.store.is_some() {
            return self.call_store(request, index, key, costs, tier);
        }
        self.call_counted(request, index, key, costs, tier)
    }

    /// A request of a route that weighs its requests, or of a tier (`tier`): counted in this
    /// process for its cost, which its response may correct.
    #[inline(never)]
    fn call_counted<B, ResBody>(
        &mut self,
        request: Request<B>,
        index: usize,
        key: u64,
        costs: Costs,
        tier: Option<usize>,
    ) -> RejectFuture<S, B, F>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
        F: RejectResponse<ResBody>,
    {
        let shared = &self.mode.0;
        let (config, route) = (&shared.config, &shared.routes[index]);
        let now = shared.clock.now();
        let (headers, events) = (config.headers, &shared.events);
        let verdict = match tier {
            Some(tier) => route.hit_tier(key, tier, now, headers, events, index, &costs),
            None => route.hit(key, now, headers, events, index, &costs),
        };
        let fields = match verdict {
            Ok(fields) => fields,
            Err(refused) => {
                return RejectFuture::rejected(
                    &mut self.inner,
                    rejection(config, &route.name, refused),
                );
            }
        };
        let future = self.inner.call(request);
        if !route.weighing.as_ref().is_some_and(|w| w.corrects()) {
            return RejectFuture::inner(future, fields);
        }
        let correction = Correction {
            layer: Reject(shared.clone()),
            route: index,
            key,
            tier,
            at: now,
            taken: costs,
            #[cfg(feature = "redis")]
            store: None,
        };
        RejectFuture::corrected(future, fields, correction)
    }
}

#[cfg(feature = "redis")]
impl<S: Clone, F> RateLimitByRouteService<S, Reject<F>> {
    /// A request whose verdict a shared store gives, counted in `tier`'s quotas if it has
    /// one. It waits for the store with a clone of the inner service, readied once the
    /// verdict is in.
    ///
    /// A client's count lies under one key whatever its tier, so a change of tier carries
    /// its count over to the new tier's quotas.
    #[inline(never)]
    fn call_store<B, ResBody>(
        &mut self,
        request: Request<B>,
        index: usize,
        key: u64,
        costs: Costs,
        tier: Option<usize>,
    ) -> RejectFuture<S, B, F>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
        F: RejectResponse<ResBody>,
    {
        let shared = &self.mode.0;
        let config = &shared.config;
        let Some(store) = &config.store else {
            unreachable!("called with a store");
        };
        let route = &shared.routes[index];
        let rates = route.rates_of(tier);
        if let Some((quota, _)) = costs.too_high(rates.iter()) {
            let refused = route.too_high(quota, &shared.events, index);
            return RejectFuture::rejected(
                &mut self.inner,
                rejection(config, &route.name, refused),
            );
        }
        let inner = crate::readiness::waiting_clone(&mut self.inner);
        let stable = match config.key.extract(
            &request,
            &super::key::KeyHashing::Stable,
            config.ipv6_prefix,
        ) {
            Extracted::Key(key) => key,
            Extracted::Missing | Extracted::NoPeer => ANONYMOUS,
        };
        let name = store.key(&format!("rate:{}:{stable:016x}", route.name));
        let call = store.acquire(&name, &store.member(), &rates, &costs, true);
        let layer = Reject(shared.clone());
        let hit = super::store::StoreHit::new(inner, request, call, layer, index, key)
            .costing(costs, name, rates)
            .in_tier(tier);
        RejectFuture::store(hit)
    }
}

/// Warns, once per layer, that the server gives no peer address to a layer keyed by it.
#[cold]
fn no_peer<F>(config: &RejectConfig<F>) {
    if !config.warned_no_peer.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "RateLimitByRoute keys clients by address, but the server supplies none: requests \
             are answered 500. Serve axum with `into_make_service_with_connect_info::<SocketAddr>()` \
             (feature `axum`), insert a `SocketAddr` extension, or set `on_missing_key`"
        );
    } else {
        tracing::debug!("no peer address for a layer keyed by address: answered 500");
    }
}

/// The response for a request refused for another reason than its quota (no key, no peer
/// address).
fn refusal<B, F: RejectResponse<B>>(
    shared: &LayerState<KeyedRoute, RejectConfig<F>>,
    index: usize,
    reason: RejectReason,
) -> Response<B> {
    let route = &shared.routes[index];
    let refused = Refused {
        wait: Duration::ZERO,
        quota: route.quota(),
        reason,
    };
    let verdict: Result<(), Refused> = Err(refused);
    route.report(&verdict, &shared.events, index);
    rejection(&shared.config, &route.name, refused)
}
