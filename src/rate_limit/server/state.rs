//! Server mode's state: each route's clients in [`KeyTable`]s of bounded size (16 shards, so
//! that different clients rarely contend for one lock; see [`crate::limiter::keyed`] for what
//! a flood of fresh keys can and cannot do), and what a refusal says.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderValue, Response};

use crate::clock::Nanos;
use crate::event::{Event, Events};
use crate::headers;
use crate::limiter::keyed::{KeyTable, Verdict};
use crate::lock::lock;
use crate::quota::{Quota, Rate};
use crate::rate_limit::cost::{Costs, Weighing};
use crate::rate_limit::reject::RejectReason;

/// Shards of a keyed route: requests of different clients rarely contend for one lock.
pub(crate) const SHARDS: usize = 16;

/// One route in server mode: a limit per client key.
#[derive(Debug)]
pub(crate) struct KeyedRoute {
    pub(crate) name: Arc<str>,
    /// The start of its `RateLimit` field, made once, if its name needs no escaping.
    ratelimit_prefix: Option<Box<[u8]>>,
    shards: Box<[Mutex<Shard>]>,
    /// Clients tracked in all the shards (the tables only grow, up to their size).
    tracked: AtomicUsize,
    /// How its requests are weighed, if a quota of it counts something other than requests.
    pub(crate) weighing: Option<Weighing>,
}

#[derive(Debug)]
struct Shard {
    /// The route's first quota, the one its fields and snapshot show.
    rate: Rate,
    /// The route's `RateLimit-Policy` field, made once.
    policy: HeaderValue,
    clients: KeyTable,
    /// Its other quotas, if it has several, each with its own table of the same clients: a
    /// request counts in all of them or in none.
    more: Vec<(Rate, KeyTable)>,
    /// Per tier ([`Builder::tier`](crate::rate_limit::Builder::tier)): the quotas and tables
    /// of a tier that names this route, `None` for one that keeps the route's own. Empty
    /// without tiers.
    tiers: Box<[Option<TierTables>]>,
}

/// A tier's quotas on a route, and its clients' counts: a table per quota, bounded as the
/// route's own are.
#[derive(Debug)]
struct TierTables {
    rate: Rate,
    policy: HeaderValue,
    clients: KeyTable,
    more: Vec<(Rate, KeyTable)>,
}

/// The rate-limit fields a passing response gets.
#[derive(Debug)]
pub(crate) struct RateLimitFields {
    policy: HeaderValue,
    ratelimit: HeaderValue,
}

impl RateLimitFields {
    pub(super) fn apply<B>(self, response: &mut Response<B>) {
        let fields = response.headers_mut();
        // Appended: a layer below may state its own policy, and both hold.
        fields.append(headers::RATELIMIT_POLICY, self.policy);
        fields.append(headers::RATELIMIT, self.ratelimit);
    }
}

/// A refusal of server mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused {
    pub(crate) wait: Duration,
    pub(crate) quota: Quota,
    pub(crate) reason: RejectReason,
}

/// Counts a request of `units` in one quota's table. A request that costs more than the
/// quota ever admits is refused for a whole period: no client can spend it.
#[inline]
fn hit(clients: &mut KeyTable, key: u64, rate: &Rate, now: Nanos, units: u32) -> Verdict {
    // One unit always fits: a quota counts at least one.
    if units > 1 && !rate.fits(units) {
        let until = now.saturating_add(rate.period);
        return Verdict::Refuse { until };
    }
    clients.hit(key, rate, now, units)
}

/// Counts a request in every quota of its route, or in none: the first quota's verdict, or
/// the refusal of the quota that refuses it (the latest if several do) and its index.
#[inline(never)]
fn hit_all(
    clients: &mut KeyTable,
    more: &mut [(Rate, KeyTable)],
    key: u64,
    rate: &Rate,
    now: Nanos,
    costs: &Costs,
) -> (Verdict, usize) {
    let first = hit(clients, key, rate, now, costs.get(0));
    let mut refused = match first {
        Verdict::Refuse { until } => Some((until, 0)),
        Verdict::Pass { .. } => None,
    };
    let mut counted = 0;
    for (i, (rate, table)) in more.iter_mut().enumerate() {
        match hit(table, key, rate, now, costs.get(i + 1)) {
            Verdict::Pass { .. } if refused.is_none() => counted = i + 1,
            Verdict::Pass { .. } => table.unhit(key, rate, costs.get(i + 1)),
            Verdict::Refuse { until } => {
                if refused.is_none_or(|(at, _)| until > at) {
                    refused = Some((until, i + 1));
                }
            }
        }
    }
    let Some((until, index)) = refused else {
        return (first, 0);
    };
    // Refused by one: what the others counted is taken back.
    if matches!(first, Verdict::Pass { .. }) {
        clients.unhit(key, rate, costs.get(0));
    }
    for (i, (rate, table)) in more[..counted].iter_mut().enumerate() {
        table.unhit(key, rate, costs.get(i + 1));
    }
    (Verdict::Refuse { until }, index)
}

fn policy(name: &str, quota: Quota) -> HeaderValue {
    // Cloned once so that later clones share the bytes instead of copying them.
    let value = headers::policy_value(name, quota.count(), quota.period());
    value.clone()
}

impl KeyedRoute {
    /// A route with these quotas (at least one), tracking at most `max_keys` clients in each.
    pub(crate) fn new(
        name: Arc<str>,
        rates: Vec<Rate>,
        max_keys: usize,
        weighing: Option<Weighing>,
    ) -> Self {
        let capacity = max_keys.div_ceil(SHARDS).max(1);
        let rate = rates[0];
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    rate,
                    policy: policy(&name, rate.quota),
                    clients: KeyTable::new(capacity),
                    more: rates[1..]
                        .iter()
                        .map(|&rate| (rate, KeyTable::new(capacity)))
                        .collect(),
                    tiers: Box::default(),
                })
            })
            .collect();
        Self {
            ratelimit_prefix: headers::ratelimit_prefix(&name),
            name,
            shards,
            tracked: AtomicUsize::new(0),
            weighing,
        }
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key as usize) % SHARDS]
    }

    pub(crate) fn quota(&self) -> Quota {
        lock(&self.shards[0]).rate.quota
    }

    /// The quotas a client of `tier` has on this route, in order: the tier's own where it
    /// names this route, else the route's.
    #[cfg(feature = "redis")]
    pub(crate) fn rates_of(&self, tier: Option<usize>) -> Box<[Rate]> {
        let shard = lock(&self.shards[0]);
        match tier.and_then(|t| shard.tiers.get(t).and_then(Option::as_ref)) {
            Some(t) => {
                let more = t.more.iter().map(|(rate, _)| *rate);
                std::iter::once(t.rate).chain(more).collect()
            }
            None => {
                let more = shard.more.iter().map(|(rate, _)| *rate);
                std::iter::once(shard.rate).chain(more).collect()
            }
        }
    }

    /// The first quota a client of `tier` has on this route.
    #[cfg(feature = "redis")]
    pub(crate) fn quota_of(&self, tier: Option<usize>) -> Quota {
        let shard = lock(&self.shards[0]);
        match tier.and_then(|t| shard.tiers.get(t).and_then(Option::as_ref)) {
            Some(t) => t.rate.quota,
            None => shard.rate.quota,
        }
    }

    /// Counts a request of client `key` at `now`, costing `costs`; `with_fields`: also the
    /// rate-limit fields its response gets. Reports the verdict, and a client forgotten to
    /// make room, as events of route `index`.
    pub(crate) fn hit(
        &self,
        key: u64,
        now: Nanos,
        with_fields: bool,
        events: &Events,
        index: usize,
        costs: &Costs,
    ) -> Result<Option<RateLimitFields>, Refused> {
        self.hit_in(key, None, now, with_fields, events, index, costs)
    }

    /// [`hit`](Self::hit) for a client of tier `tier`: counted in the tier's own tables
    /// where the tier names this route, else in the route's.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hit_tier(
        &self,
        key: u64,
        tier: usize,
        now: Nanos,
        with_fields: bool,
        events: &Events,
        index: usize,
        costs: &Costs,
    ) -> Result<Option<RateLimitFields>, Refused> {
        self.hit_in(key, Some(tier), now, with_fields, events, index, costs)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn hit_in(
        &self,
        key: u64,
        tier: Option<usize>,
        now: Nanos,
        with_fields: bool,
        events: &Events,
        index: usize,
        costs: &Costs,
    ) -> Result<Option<RateLimitFields>, Refused> {
        let mut shard = lock(self.shard(key));
        let Shard {
            rate,
            policy,
            clients,
            more,
            tiers,
        } = &mut *shard;
        let (rate, policy, clients, more) =
            match tier.and_then(|t| tiers.get_mut(t).and_then(Option::as_mut)) {
                Some(t) => (&mut t.rate, &mut t.policy, &mut t.clients, &mut t.more),
                None => (rate, policy, clients, more),
            };
        if !costs.is_one() {
            let rates = std::iter::once(&*rate).chain(more.iter().map(|(rate, _)| rate));
            if let Some((quota, _)) = costs.too_high(rates) {
                drop(shard);
                return Err(self.too_high(quota, events, index));
            }
        }
        let (len, forgotten) = (clients.len(), clients.forgotten());
        let (verdict, refused_by) = match more.is_empty() {
            true => (hit(clients, key, rate, now, costs.get(0)), 0),
            false => hit_all(clients, more, key, rate, now, costs),
        };
        let (grew, forgot) = (clients.len() > len, clients.forgotten() != forgotten);
        let result = match verdict {
            Verdict::Pass { remaining, reset } if with_fields => {
                let reset = Duration::from_nanos(reset.saturating_sub(now));
                Ok(Some((policy.clone(), remaining, reset)))
            }
            Verdict::Pass { .. } => Ok(None),
            Verdict::Refuse { until } => Err(Refused {
                wait: Duration::from_nanos(until.saturating_sub(now)),
                quota: match refused_by.checked_sub(1) {
                    None => rate.quota,
                    Some(i) => more[i].0.quota,
                },
                reason: RejectReason::Quota,
            }),
        };
        drop(shard);
        if grew | forgot {
            self.changed(grew, forgot, events, index);
        }
        self.report(&result, events, index);
        match result {
            Ok(Some((policy, remaining, reset))) => Ok(Some(RateLimitFields {
                policy,
                ratelimit: self.ratelimit(remaining, reset),
            })),
            Ok(None) => Ok(None),
            Err(refused) => Err(refused),
        }
    }

    /// A request that costs more than `quota` ever admits at once: refused, whatever the
    /// client has counted.
    #[cold]
    pub(crate) fn too_high(&self, quota: Quota, events: &Events, index: usize) -> Refused {
        let refused = Refused {
            wait: Duration::ZERO,
            quota,
            reason: RejectReason::CostTooHigh,
        };
        self.report(&Err::<(), _>(refused), events, index);
        refused
    }

    /// Client `key`'s request counted at `at` for `taken` turned out to cost `cost`.
    /// `tier`: the client's tier, if the layer has tiers.
    pub(crate) fn correct(
        &self,
        key: u64,
        tier: Option<usize>,
        now: Nanos,
        at: Nanos,
        taken: &Costs,
        cost: &Costs,
    ) {
        let mut shard = lock(self.shard(key));
        let Shard {
            rate,
            clients,
            more,
            tiers,
            ..
        } = &mut *shard;
        let (rate, clients, more) =
            match tier.and_then(|t| tiers.get_mut(t).and_then(Option::as_mut)) {
                Some(t) => (&mut t.rate, &mut t.clients, &mut t.more),
                None => (rate, clients, more),
            };
        clients.correct(key, rate, now, at, taken.get(0), cost.get(0));
        for (i, (rate, clients)) in more.iter_mut().enumerate() {
            clients.correct(key, rate, now, at, taken.get(i + 1), cost.get(i + 1));
        }
    }

    /// Reports the verdict of a request of route `index`.
    #[inline]
    pub(crate) fn report<T>(&self, verdict: &Result<T, Refused>, events: &Events, index: usize) {
        match verdict {
            Ok(_) => events.emit(index, |layer, route| Event::Admitted {
                layer,
                route,
                waited: Duration::ZERO,
            }),
            Err(refused) => events.emit(index, |layer, route| Event::Refused {
                layer,
                route,
                reason: refused.reason.refusal(),
            }),
        }
    }

    /// The table tracks one more client, or forgot one for a newcomer.
    #[cold]
    fn changed(&self, grew: bool, forgot: bool, events: &Events, index: usize) {
        if grew {
            self.tracked.fetch_add(1, Ordering::Relaxed);
            // Counted up, not set: tables of different shards grow at once.
            events.tracked_one_more(index);
        }
        if forgot {
            events.emit(index, |layer, route| Event::KeyForgotten { layer, route });
        }
    }

    /// The fields of a response to a client of `tier` (its tier's policy) admitted with
    /// `remaining` left, all counted gone after `reset` (a shared store's count).
    #[cfg(feature = "redis")]
    pub(crate) fn fields_of(
        &self,
        tier: Option<usize>,
        remaining: u32,
        reset: Duration,
    ) -> RateLimitFields {
        let shard = lock(&self.shards[0]);
        let policy = match tier.and_then(|t| shard.tiers.get(t).and_then(Option::as_ref)) {
            Some(t) => t.policy.clone(),
            None => shard.policy.clone(),
        };
        drop(shard);
        RateLimitFields {
            policy,
            ratelimit: self.ratelimit(remaining, reset),
        }
    }

    /// The `RateLimit` field of a response admitted with `remaining` left.
    #[inline]
    fn ratelimit(&self, remaining: u32, reset: Duration) -> HeaderValue {
        match &self.ratelimit_prefix {
            Some(prefix) => headers::ratelimit_value_after(prefix, remaining, reset),
            None => headers::ratelimit_value(&self.name, remaining, reset),
        }
    }

    pub(crate) fn tracked_keys(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Replaces the quota, keeping what each client has counted.
    pub(crate) fn set_rate(&self, rate: Rate, now: Nanos) {
        let policy = policy(&self.name, rate.quota);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let old = shard.rate;
            shard.clients.change_rate(&old, &rate, now);
            shard.rate = rate;
            shard.policy = policy.clone();
        }
    }

    /// Gives tier `tier` (of `count` tiers) its own quotas on this route, `rates` (as many,
    /// counting the same units, as the route's own: checked by the builder).
    pub(crate) fn set_tier_rates(
        &self,
        tier: usize,
        count: usize,
        rates: &[Rate],
        max_keys: usize,
    ) {
        let capacity = max_keys.div_ceil(SHARDS).max(1);
        let policy = policy(&self.name, rates[0].quota);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            if shard.tiers.len() < count {
                let mut tiers = std::mem::take(&mut shard.tiers).into_vec();
                tiers.resize_with(count, || None);
                shard.tiers = tiers.into_boxed_slice();
            }
            shard.tiers[tier] = Some(TierTables {
                rate: rates[0],
                policy: policy.clone(),
                clients: KeyTable::new(capacity),
                more: rates[1..]
                    .iter()
                    .map(|&rate| (rate, KeyTable::new(capacity)))
                    .collect(),
            });
        }
    }

    /// Tier `tier`'s quotas on this route: its own, or `None` where it keeps the route's.
    pub(crate) fn tier_rates(&self, tier: usize) -> Option<Box<[Rate]>> {
        let shard = lock(&self.shards[0]);
        let tables = shard.tiers.get(tier)?.as_ref()?;
        let more = tables.more.iter().map(|(rate, _)| *rate);
        Some(std::iter::once(tables.rate).chain(more).collect())
    }

    /// Replaces the first quota tier `tier` has on this route, keeping what each client has
    /// counted in it; false when the tier keeps the route's quotas here.
    pub(crate) fn set_tier_rate(&self, tier: usize, rate: Rate, now: Nanos) -> bool {
        let policy = policy(&self.name, rate.quota);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let Some(Some(tables)) = shard.tiers.get_mut(tier) else {
                return false;
            };
            let old = tables.rate;
            tables.clients.change_rate(&old, &rate, now);
            tables.rate = rate;
            tables.policy = policy.clone();
        }
        true
    }
}
