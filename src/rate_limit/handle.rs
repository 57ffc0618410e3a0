//! The layer as a handle: snapshots of each route's state, and quotas changed at run time.

use std::sync::Arc;
use std::time::Duration;

use super::client::state::lock;
use crate::error::ConfigError;
use crate::event::RouteCounters;
use crate::limiter::NotYet;
use crate::quota::{Quota, Rate};

use super::builder::check_quota;
use super::layer::{RateLimitByRoute, Reject, Wait};

/// When a client-mode route can next admit a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NextAdmission {
    /// Now.
    Now,
    /// After this long (at the earliest).
    In(Duration),
    /// Once a request in flight is answered (the wait then starts from the response).
    AfterResponse,
}

/// A client-mode route's state at one moment.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouteSnapshot {
    /// The route's pattern, or `"default"`.
    pub route: Arc<str>,
    /// Its quota; for a route of several quotas, the first, which the figures below are of.
    pub quota: Quota,
    /// Requests that could be sent now without waiting (units, for a quota counting them).
    pub remaining: u32,
    /// When the next request could go.
    pub next: NextAdmission,
    /// Requests holding a place with no answer yet: sent (or admitted and readying their
    /// service), and the abandoned ones still held.
    pub in_flight: u32,
    /// Requests given up on after they were sent, held as in flight until their hold ends
    /// (see [`Builder::abandoned_hold`](super::Builder::abandoned_hold)).
    pub abandoned: u32,
    /// Requests of this process waiting for their turn (in the route's queue, or in a shared
    /// store).
    pub waiters: usize,
    /// For a learnt route that shares a quota the server named with another learnt route
    /// ([`Builder::learn_route`](super::Builder::learn_route)): the route whose state counts
    /// its requests (the figures above are then its own, no longer used).
    pub counted_in: Option<Arc<str>>,
    /// What the route has done since the layer was built.
    pub counters: RouteCounters,
}

/// A server-mode route's state at one moment.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KeyedRouteSnapshot {
    /// The route's pattern, or `"default"`.
    pub route: Arc<str>,
    /// Its quota, per client key (for a route of several quotas, the first).
    pub quota: Quota,
    /// Client keys tracked now.
    pub tracked_keys: usize,
    /// What the route has done since the layer was built: requests admitted, refused by
    /// reason, clients forgotten at a full table.
    pub counters: RouteCounters,
}

fn find<R>(
    routes: &[R],
    name: impl Fn(&R) -> &str,
    pattern: &str,
    quota: &Quota,
) -> Result<usize, ConfigError> {
    check_quota(pattern, quota)?;
    routes
        .iter()
        .position(|r| name(r) == pattern)
        .ok_or_else(|| ConfigError::UnknownRoute {
            pattern: pattern.to_owned(),
        })
}

/// A quota that replaces `old` counts the same unit: the route's costs were set for it.
fn same_unit(old: &Quota, new: &Quota) -> Result<(), ConfigError> {
    if old.unit() == new.unit() {
        return Ok(());
    }
    Err(ConfigError::InvalidSetting {
        name: "set_quota",
        reason: "the new quota counts another unit than the route's first quota: its costs \
                 were set for that unit when the layer was built",
    })
}

impl RateLimitByRoute<Wait> {
    /// Each route's state now, in the order the routes were given, the default last.
    pub fn snapshot(&self) -> Vec<RouteSnapshot> {
        let shared = &self.mode.0;
        shared
            .routes
            .iter()
            .enumerate()
            .map(|(index, route)| {
                let mut guard = lock(&route.state);
                let state = &mut *guard;
                let now = state.now(&shared.clock);
                let rate = state.rate;
                let next = match state.limiter.probe(&rate, now, 1) {
                    Ok(()) => NextAdmission::Now,
                    Err(NotYet::Until(at)) => NextAdmission::In(Duration::from_nanos(at - now)),
                    Err(NotYet::Response) => NextAdmission::AfterResponse,
                };
                let holder = route.holder();
                let counted_in = (!std::ptr::eq(&shared.routes[holder], route))
                    .then(|| shared.routes[holder].name.clone());
                RouteSnapshot {
                    counted_in,
                    route: route.name.clone(),
                    quota: rate.quota,
                    remaining: state.limiter.remaining(&rate, now),
                    next,
                    in_flight: u32::try_from(state.limiter.in_flight()).unwrap_or(u32::MAX),
                    abandoned: state.limiter.abandoned(),
                    waiters: state.waiting(),
                    counters: shared.events.scope(index).route_counters(),
                }
            })
            .collect()
    }

    /// Replaces the quota of the route given by `pattern` (as written to the builder, or
    /// `"default"`), keeping what it has counted so far. Waiting requests re-check at once.
    /// A route of several quotas has its first replaced, which must count the same unit.
    ///
    /// On a learnt route whose state holds a quota the server named, the quota bounds every
    /// route that shares it; a learnt route that counts in another's state
    /// ([`RouteSnapshot::counted_in`]) is a [`ConfigError`]: set the other's.
    pub fn set_quota(&self, pattern: &str, quota: Quota) -> Result<(), ConfigError> {
        let shared = &self.mode.0;
        let index = find(&shared.routes, |r| &r.name, pattern, &quota)?;
        let route = &shared.routes[index];
        if route.holder() != index {
            return Err(ConfigError::InvalidSetting {
                name: "set_quota",
                reason: "this learnt route counts against a quota the server named, held by \
                         another route (see `RouteSnapshot::counted_in`): set that route's",
            });
        }
        let mut guard = lock(&route.state);
        let state = &mut *guard;
        same_unit(&state.rate.quota, &quota)?;
        let now = state.now(&shared.clock);
        let margin = Some(Duration::from_nanos(state.rate.margin));
        let rate = Rate::new(quota, margin);
        state.limiter.change_rate(&state.rate, &rate, now);
        state.rate = rate;
        state.wake_head();
        Ok(())
    }
}

impl<F> RateLimitByRoute<Reject<F>> {
    /// Each route's state now, in the order the routes were given, the default last.
    pub fn snapshot(&self) -> Vec<KeyedRouteSnapshot> {
        let shared = &self.mode.0;
        shared
            .routes
            .iter()
            .enumerate()
            .map(|(index, route)| KeyedRouteSnapshot {
                route: route.name.clone(),
                quota: route.quota(),
                tracked_keys: route.tracked_keys(),
                counters: shared.events.scope(index).route_counters(),
            })
            .collect()
    }

    /// Replaces the quota of the route given by `pattern` (as written to the builder, or
    /// `"default"`), keeping what each client has used so far. A route of several quotas has
    /// its first replaced, which must count the same unit.
    pub fn set_quota(&self, pattern: &str, quota: Quota) -> Result<(), ConfigError> {
        let shared = &self.mode.0;
        let index = find(&shared.routes, |r| &r.name, pattern, &quota)?;
        same_unit(&shared.routes[index].quota(), &quota)?;
        let rate = Rate::new(quota, Some(Duration::ZERO));
        let own = Rate::new(shared.routes[index].quota(), Some(Duration::ZERO));
        same_shape_in_store(&shared.config, &own, &rate)?;
        shared.routes[index].set_rate(rate, shared.clock.now());
        Ok(())
    }

    /// Replaces tier `tier`'s quota on the route given by `pattern` (as written to the
    /// builder, or `"default"`), keeping what each client has counted in it, as
    /// [`set_quota`](Self::set_quota) does for the route's own. The tier must have named the
    /// route when the layer was built ([`Builder::tier`](super::Builder::tier)); a route of
    /// several quotas has its first replaced, which must count the same unit. Moving a
    /// client to another tier needs no call: the layer's `tier_by` closure names its tier
    /// on each request.
    pub fn set_tier_quota(
        &self,
        tier: &str,
        pattern: &str,
        quota: Quota,
    ) -> Result<(), ConfigError> {
        let shared = &self.mode.0;
        let index = find(&shared.routes, |r| &r.name, pattern, &quota)?;
        let Some(position) = shared.config.tiers.as_ref().and_then(|t| t.position(tier)) else {
            return Err(ConfigError::InvalidValue {
                name: "set_tier_quota",
                value: tier.to_owned(),
                reason: "no tier of that name was given to `tier`",
            });
        };
        let route = &shared.routes[index];
        let Some(rates) = route.tier_rates(position) else {
            return Err(ConfigError::InvalidSetting {
                name: "set_tier_quota",
                reason: "this tier keeps the route's own quotas: name the route in `tier` when \
                         building, or use `set_quota`",
            });
        };
        same_unit(&rates[0].quota, &quota)?;
        let rate = Rate::new(quota, Some(Duration::from_nanos(rates[0].margin)));
        same_shape_in_store(&shared.config, &rates[0], &rate)?;
        route.set_tier_rate(position, rate, shared.clock.now());
        Ok(())
    }
}

/// In a store, a quota replaced at run time keeps its period and algorithm: the counts kept
/// there are in buckets of a sixteenth of the period (or a GCRA time).
fn same_shape_in_store<F>(
    config: &super::builder::RejectConfig<F>,
    old: &Rate,
    new: &Rate,
) -> Result<(), ConfigError> {
    if config.has_store() && !super::builder::same_shape(old, new) {
        return Err(ConfigError::InvalidSetting {
            name: "set_quota",
            reason: "with a store, a quota keeps its period and algorithm: only its count changes",
        });
    }
    Ok(())
}
