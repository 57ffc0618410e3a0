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
}

#[derive(Debug)]
struct Shard {
    rate: Rate,
    /// The route's `RateLimit-Policy` field, made once.
    policy: HeaderValue,
    clients: KeyTable,
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

fn policy(name: &str, quota: Quota) -> HeaderValue {
    // Cloned once so that later clones share the bytes instead of copying them.
    let value = headers::policy_value(name, quota.count(), quota.period());
    value.clone()
}

impl KeyedRoute {
    pub(crate) fn new(name: Arc<str>, rate: Rate, max_keys: usize) -> Self {
        let capacity = max_keys.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    rate,
                    policy: policy(&name, rate.quota),
                    clients: KeyTable::new(capacity),
                })
            })
            .collect();
        Self {
            ratelimit_prefix: headers::ratelimit_prefix(&name),
            name,
            shards,
            tracked: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key as usize) % SHARDS]
    }

    pub(crate) fn quota(&self) -> Quota {
        lock(&self.shards[0]).rate.quota
    }

    #[cfg(feature = "redis")]
    pub(crate) fn rate(&self) -> Rate {
        lock(&self.shards[0]).rate
    }

    /// Counts a request of client `key` at `now`; `with_fields`: also the rate-limit fields its
    /// response gets. Reports the verdict, and a client forgotten to make room, as events of
    /// route `index`.
    pub(crate) fn hit(
        &self,
        key: u64,
        now: Nanos,
        with_fields: bool,
        events: &Events,
        index: usize,
    ) -> Result<Option<RateLimitFields>, Refused> {
        let mut shard = lock(self.shard(key));
        let Shard {
            rate,
            policy,
            clients,
        } = &mut *shard;
        let (len, forgotten) = (clients.len(), clients.forgotten());
        let verdict = clients.hit(key, rate, now);
        let (grew, forgot) = (clients.len() > len, clients.forgotten() != forgotten);
        let result = match verdict {
            Verdict::Pass { remaining, reset } if with_fields => {
                let reset = Duration::from_nanos(reset.saturating_sub(now));
                Ok(Some((policy.clone(), remaining, reset)))
            }
            Verdict::Pass { .. } => Ok(None),
            Verdict::Refuse { until } => Err(Refused {
                wait: Duration::from_nanos(until.saturating_sub(now)),
                quota: rate.quota,
                reason: RejectReason::Quota,
            }),
        };
        drop(shard);
        if grew | forgot {
            self.changed(grew, forgot, events, index);
        }
        self.report(&result, events, index);
        result.map(|fields| {
            fields.map(|(policy, remaining, reset)| RateLimitFields {
                policy,
                ratelimit: self.ratelimit(remaining, reset),
            })
        })
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

    /// The fields of a response admitted with `remaining` left, all counted gone after
    /// `reset` (a shared store's count).
    #[cfg(feature = "redis")]
    pub(crate) fn fields(&self, remaining: u32, reset: Duration) -> RateLimitFields {
        RateLimitFields {
            policy: lock(&self.shards[0]).policy.clone(),
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
}
