//! What the layers do, as it happens: [`Event`]s for a listener of your own, and the
//! cumulative counters every snapshot carries.
//!
//! Each builder takes a name ([`rate_limit::Builder::name`](crate::rate_limit::Builder::name),
//! [`concurrency::Builder::name`](crate::concurrency::Builder::name),
//! [`Backoff429::name`](crate::Backoff429::name)), which every event and every metric of the
//! layer carries, and a listener (`on_event`), called with each event as it happens:
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use tower_quota::event::{Event, Refusal};
//! use tower_quota::{Quota, RateLimitByRoute};
//!
//! # fn main() -> Result<(), tower_quota::ConfigError> {
//! let queue_full = Arc::new(AtomicU64::new(0));
//! let seen = queue_full.clone();
//! let limits = RateLimitByRoute::builder()
//!     .name("sync")
//!     .route("POST /v2/generate", Quota::per_minute(60))
//!     .max_queue(100)
//!     .on_event(move |event: &Event<'_>| {
//!         if let Event::Refused { reason: Refusal::QueueFull, .. } = event {
//!             seen.fetch_add(1, Ordering::Relaxed);
//!         }
//!     })
//!     .build()?;
//! # drop(limits);
//! # Ok(())
//! # }
//! ```
//!
//! A listener runs on the task that caused the event, after the layer has let go of its
//! locks, and should be quick: it is called on every request's path. It may call its own
//! layer (a snapshot, `set_quota`, `complete`): give it a clone through a slot filled after
//! `build` (a `OnceLock`), and know that a layer whose listener holds the layer is never
//! freed, which suits a layer that lives as long as the process. A listener that panics does
//! no harm to the layer: the panic is caught (and logged through `tracing`, at `error` the
//! first time), since many events are reported while a request gives back what it held; the
//! panic hook still runs, and a build with `panic = "abort"` aborts as it would anywhere.
//!
//! The counters of [`RouteCounters`], [`SlotCounters`] and [`BackoffCounters`] are kept
//! whether or not anybody listens: with no listener, an event costs its count (a relaxed
//! atomic add to counters every clone of the layer shares) and one branch. With the `metrics`
//! feature every layer also records them through the [`metrics`](https://docs.rs/metrics)
//! facade (see the crate's README for the names); without it, nothing of that is compiled.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::LimitKind;

/// Something a layer did. Each carries the name of the layer (`layer`, from the builder's
/// `name`) and, for [`RateLimitByRoute`](crate::RateLimitByRoute), the route's pattern as
/// written to the builder (or `"default"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// `RateLimitByRoute`: a request took its place. In client mode it is sent now, after
    /// `waited` in its route's queue (zero when it did not wait); in server mode it is let
    /// through.
    #[non_exhaustive]
    Admitted {
        /// The layer's name.
        layer: &'a str,
        /// The route's pattern.
        route: &'a str,
        /// How long it waited for its turn.
        waited: Duration,
    },
    /// `RateLimitByRoute`, client mode: a request joined its route's queue.
    #[non_exhaustive]
    Queued {
        /// The layer's name.
        layer: &'a str,
        /// The route's pattern.
        route: &'a str,
    },
    /// `RateLimitByRoute`: a request was refused, unsent (client mode: returned with an
    /// error; server mode: answered by the layer).
    #[non_exhaustive]
    Refused {
        /// The layer's name.
        layer: &'a str,
        /// The route's pattern.
        route: &'a str,
        /// Why.
        reason: Refusal,
    },
    /// `RateLimitByRoute`, client mode: a waiting request was dropped by its caller (a
    /// timeout above the layer, a client gone) before its turn came.
    #[non_exhaustive]
    GaveUp {
        /// The layer's name.
        layer: &'a str,
        /// The route's pattern.
        route: &'a str,
        /// How long it had waited.
        waited: Duration,
    },
    /// `RateLimitByRoute`, client mode: a request was given up on after it was sent (its
    /// future dropped, or a transport error); its place stays held for the abandoned hold.
    #[non_exhaustive]
    Abandoned {
        /// The layer's name.
        layer: &'a str,
        /// The route's pattern.
        route: &'a str,
    },
    /// `RateLimitByRoute`, client mode: a response taught the route's limit something.
    #[non_exhaustive]
    Learnt {
        /// The layer's name.
        layer: &'a str,
        /// The route's pattern.
        route: &'a str,
        /// From what.
        from: Learnt,
    },
    /// `RateLimitByRoute`, server mode: the route's table of client keys was full, and a
    /// client was forgotten to make room for a new one (its count kept in the shadow table
    /// while it still matters). The table never refuses a newcomer; see [Floods] in the
    /// module docs.
    ///
    /// [Floods]: crate::rate_limit#deploying-server-mode
    #[non_exhaustive]
    KeyForgotten {
        /// The layer's name.
        layer: &'a str,
        /// The route's pattern.
        route: &'a str,
    },
    /// `ConcurrencyLimitByPlan`: a job-creating request took a slot, after `waited` in the
    /// queue (zero when one was free).
    #[non_exhaustive]
    SlotTaken {
        /// The layer's name.
        layer: &'a str,
        /// How long it waited for the slot.
        waited: Duration,
    },
    /// `ConcurrencyLimitByPlan`: a job-creating request joined the queue for a slot.
    #[non_exhaustive]
    SlotQueued {
        /// The layer's name.
        layer: &'a str,
    },
    /// `ConcurrencyLimitByPlan`: a job-creating request was returned unsent.
    #[non_exhaustive]
    SlotRefused {
        /// The layer's name.
        layer: &'a str,
        /// Why.
        reason: Refusal,
    },
    /// `ConcurrencyLimitByPlan`: a create waiting for a slot was dropped by its caller.
    #[non_exhaustive]
    SlotGaveUp {
        /// The layer's name.
        layer: &'a str,
        /// How long it had waited.
        waited: Duration,
    },
    /// `ConcurrencyLimitByPlan`: a create's response showed its job, which now holds the
    /// create's slot.
    #[non_exhaustive]
    JobBound {
        /// The layer's name.
        layer: &'a str,
        /// The job's id.
        id: &'a str,
    },
    /// `ConcurrencyLimitByPlan`: a slot was given back.
    #[non_exhaustive]
    SlotFreed {
        /// The layer's name.
        layer: &'a str,
        /// What freed it.
        by: Freed,
    },
    /// `Backoff429`: a refused (or failed) request will be sent again after `wait`.
    #[non_exhaustive]
    Retry {
        /// The layer's name.
        layer: &'a str,
        /// The attempt that follows the wait (2 for the first retry).
        attempt: u32,
        /// What refused it.
        kind: LimitKind,
        /// The wait before it is sent again.
        wait: Duration,
    },
    /// `Backoff429`: a refused (or failed) request that could have been retried was not.
    #[non_exhaustive]
    NoRetry {
        /// The layer's name.
        layer: &'a str,
        /// What refused it.
        kind: LimitKind,
        /// Why it was not retried.
        why: NoRetry,
    },
}

/// Why a request was refused, unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// Server mode: the client's quota is used up (answered 429).
    Quota,
    /// The queue was full.
    QueueFull,
    /// Its turn would come, or came, past the maximum wait.
    WaitTooLong,
    /// The shared store could not be reached and the fail mode refuses.
    StoreUnavailable,
    /// Server mode: the request carried no client key and the layer answers 400.
    MissingKey,
    /// Server mode, keyed by address: the server gave the layer no peer address (answered 500).
    NoPeerAddress,
    /// The plan allows no job.
    NoSlots,
    /// The request costs more units than one of its route's quotas ever admits at once
    /// (client mode: returned unsent; server mode: answered 413).
    CostTooHigh,
    /// A create starts more jobs than the plan has slots, or none
    /// ([`ConcurrencyError::JobCount`](crate::concurrency::ConcurrencyError::JobCount)).
    JobCount,
    /// Server mode: the request's tier is unknown and the layer refuses such requests
    /// (answered 403).
    UnknownTier,
    /// Server mode of a plan: the client's plan has no free slot (answered 429).
    PlanFull,
}

impl Refusal {
    pub(crate) const ALL: [Self; 11] = [
        Self::Quota,
        Self::QueueFull,
        Self::WaitTooLong,
        Self::StoreUnavailable,
        Self::MissingKey,
        Self::NoPeerAddress,
        Self::NoSlots,
        Self::CostTooHigh,
        Self::JobCount,
        Self::UnknownTier,
        Self::PlanFull,
    ];

    /// The name used as a metric's `reason` label: `quota`, `queue_full`, `wait_too_long`,
    /// `store_unavailable`, `missing_key`, `no_peer_address`, `no_slots`, `cost_too_high`,
    /// `job_count`, `unknown_tier` or `plan_full`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Quota => "quota",
            Self::QueueFull => "queue_full",
            Self::WaitTooLong => "wait_too_long",
            Self::StoreUnavailable => "store_unavailable",
            Self::MissingKey => "missing_key",
            Self::NoPeerAddress => "no_peer_address",
            Self::NoSlots => "no_slots",
            Self::CostTooHigh => "cost_too_high",
            Self::JobCount => "job_count",
            Self::UnknownTier => "unknown_tier",
            Self::PlanFull => "plan_full",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a response taught a client-mode route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Learnt {
    /// A 429: the server counts more than the route's quota allowed for.
    TooManyRequests,
    /// Rate-limit header fields stating what is left (any dialect).
    Headers,
}

impl Learnt {
    /// The metric label: `429` or `headers`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::TooManyRequests => "429",
            Self::Headers => "headers",
        }
    }
}

/// What gave a plan's slot back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Freed {
    /// A response through the layer (a status, a list) or its watch showed the job ended.
    Status,
    /// [`complete`](crate::ConcurrencyLimitByPlan::complete) (a webhook, say).
    Completed,
    /// A reconcile showed the job (or a create's unknown outcome) is not active.
    Reconciled,
    /// The hold outlived the maximum job life: a leak, logged at `warn`.
    LeaseExpired,
    /// The create failed: no job was made.
    CreateFailed,
    /// The job already held a slot under its id (a replayed create, or a job a list
    /// showed first).
    Duplicate,
    /// In-flight mode: the response is over.
    Answered,
    /// In-flight mode: the request was given up on.
    Abandoned,
    /// The request never left (its service failed to get ready, or it was dropped first).
    NotSent,
    /// Another process sharing the store gave the job back.
    OtherProcess,
    /// A create whose outcome is unknown, handed to the shared store to hold for the fleet.
    HandedToStore,
}

impl Freed {
    pub(crate) const ALL: [Self; 11] = [
        Self::Status,
        Self::Completed,
        Self::Reconciled,
        Self::LeaseExpired,
        Self::CreateFailed,
        Self::Duplicate,
        Self::Answered,
        Self::Abandoned,
        Self::NotSent,
        Self::OtherProcess,
        Self::HandedToStore,
    ];

    /// The metric label: `status`, `completed`, `reconciled`, `lease_expired`,
    /// `create_failed`, `duplicate`, `answered`, `abandoned`, `not_sent`, `other_process` or
    /// `handed_to_store`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Completed => "completed",
            Self::Reconciled => "reconciled",
            Self::LeaseExpired => "lease_expired",
            Self::CreateFailed => "create_failed",
            Self::Duplicate => "duplicate",
            Self::Answered => "answered",
            Self::Abandoned => "abandoned",
            Self::NotSent => "not_sent",
            Self::OtherProcess => "other_process",
            Self::HandedToStore => "handed_to_store",
        }
    }
}

/// Why `Backoff429` did not retry a request it could have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NoRetry {
    /// Its retries were used up.
    NoRetriesLeft,
    /// The server asked for a longer wait than the schedule's maximum delay.
    ServerAsksTooLong,
    /// The wait would have ended past the deadline.
    PastDeadline,
    /// The retry budget was spent.
    BudgetSpent,
}

impl NoRetry {
    pub(crate) const ALL: [Self; 4] = [
        Self::NoRetriesLeft,
        Self::ServerAsksTooLong,
        Self::PastDeadline,
        Self::BudgetSpent,
    ];

    /// The metric label: `no_retries_left`, `server_asks_too_long`, `past_deadline` or
    /// `budget_spent`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NoRetriesLeft => "no_retries_left",
            Self::ServerAsksTooLong => "server_asks_too_long",
            Self::PastDeadline => "past_deadline",
            Self::BudgetSpent => "budget_spent",
        }
    }
}

pub(crate) const KINDS: [LimitKind; 3] = [
    LimitKind::Rate,
    LimitKind::Concurrency,
    LimitKind::Transient,
];

/// Refusals counted by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refusals {
    /// [`Refusal::Quota`].
    pub quota: u64,
    /// [`Refusal::QueueFull`].
    pub queue_full: u64,
    /// [`Refusal::WaitTooLong`].
    pub wait_too_long: u64,
    /// [`Refusal::StoreUnavailable`].
    pub store_unavailable: u64,
    /// [`Refusal::MissingKey`].
    pub missing_key: u64,
    /// [`Refusal::NoPeerAddress`].
    pub no_peer_address: u64,
    /// [`Refusal::NoSlots`].
    pub no_slots: u64,
    /// [`Refusal::CostTooHigh`].
    pub cost_too_high: u64,
    /// [`Refusal::JobCount`].
    pub job_count: u64,
    /// [`Refusal::UnknownTier`].
    pub unknown_tier: u64,
    /// [`Refusal::PlanFull`].
    pub plan_full: u64,
}

impl Refusals {
    /// Every refusal, whatever its reason.
    pub fn total(&self) -> u64 {
        [
            self.quota,
            self.queue_full,
            self.wait_too_long,
            self.store_unavailable,
            self.missing_key,
            self.no_peer_address,
            self.no_slots,
            self.cost_too_high,
            self.job_count,
            self.unknown_tier,
            self.plan_full,
        ]
        .iter()
        .sum()
    }
}

/// A route's counts since the layer was built ([`RouteSnapshot::counters`],
/// [`KeyedRouteSnapshot::counters`]).
///
/// [`RouteSnapshot::counters`]: crate::rate_limit::RouteSnapshot::counters
/// [`KeyedRouteSnapshot::counters`]: crate::rate_limit::KeyedRouteSnapshot::counters
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteCounters {
    /// Requests that took their place (sent; in server mode, let through).
    pub admitted: u64,
    /// Of those, requests that waited for their turn first.
    pub waited: u64,
    /// The time they waited, in all.
    pub wait_time: Duration,
    /// Requests that joined the queue.
    pub queued: u64,
    /// Requests refused, by reason.
    pub refused: Refusals,
    /// Waiting requests dropped by their caller.
    pub gave_up: u64,
    /// Requests given up on after their send.
    pub abandoned: u64,
    /// 429s the route learnt from.
    pub learnt_429: u64,
    /// Responses whose rate-limit header fields the route learnt from.
    pub learnt_headers: u64,
    /// Server mode: clients forgotten at a full key table.
    pub keys_forgotten: u64,
}

/// A plan's counts since the layer was built ([`PlanSnapshot::counters`]).
///
/// [`PlanSnapshot::counters`]: crate::concurrency::PlanSnapshot::counters
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotCounters {
    /// Slots taken by job-creating requests.
    pub taken: u64,
    /// Of those, the creates that waited for their slot.
    pub waited: u64,
    /// The time they waited, in all.
    pub wait_time: Duration,
    /// Creates that joined the queue.
    pub queued: u64,
    /// Creates returned unsent, by reason.
    pub refused: Refusals,
    /// Waiting creates dropped by their caller.
    pub gave_up: u64,
    /// Jobs bound to their create's slot.
    pub jobs_bound: u64,
    /// Slots given back, by what gave them back.
    pub freed: Freeings,
}

/// Slots given back, by [`Freed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Freeings {
    /// [`Freed::Status`].
    pub status: u64,
    /// [`Freed::Completed`].
    pub completed: u64,
    /// [`Freed::Reconciled`].
    pub reconciled: u64,
    /// [`Freed::LeaseExpired`].
    pub lease_expired: u64,
    /// [`Freed::CreateFailed`].
    pub create_failed: u64,
    /// [`Freed::Duplicate`].
    pub duplicate: u64,
    /// [`Freed::Answered`].
    pub answered: u64,
    /// [`Freed::Abandoned`].
    pub abandoned: u64,
    /// [`Freed::NotSent`].
    pub not_sent: u64,
    /// [`Freed::OtherProcess`].
    pub other_process: u64,
    /// [`Freed::HandedToStore`].
    pub handed_to_store: u64,
}

/// A `Backoff429`'s counts since it was built ([`Backoff429::counters`]).
///
/// [`Backoff429::counters`]: crate::Backoff429::counters
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackoffCounters {
    /// Retries after a rate-limit refusal.
    pub retries_rate: u64,
    /// Retries after a concurrency refusal.
    pub retries_concurrency: u64,
    /// Retries after a transient failure.
    pub retries_transient: u64,
    /// The waits before those retries, in all.
    pub backoff_time: Duration,
    /// Refusals not retried: retries used up.
    pub no_retries_left: u64,
    /// Refusals not retried: the server asked for too long a wait.
    pub server_asks_too_long: u64,
    /// Refusals not retried: the deadline would have passed.
    pub past_deadline: u64,
    /// Refusals not retried: the retry budget was spent.
    pub budget_spent: u64,
}

/// What kind of layer a scope belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerKind {
    /// A route of a client-mode `RateLimitByRoute`.
    Client,
    /// A route of a server-mode `RateLimitByRoute`.
    Server,
    Plan,
    Backoff,
}

/// A listener of a layer's events.
pub(crate) type Listener = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// A layer's name and listener, as its builder holds them.
#[derive(Clone)]
pub(crate) struct EventConfig {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) listener: Option<Listener>,
    /// Whether the layer records metrics (feature `metrics`).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) metrics: bool,
}

impl Default for EventConfig {
    fn default() -> Self {
        Self {
            name: None,
            listener: None,
            metrics: true,
        }
    }
}

impl fmt::Debug for EventConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventConfig")
            .field("name", &self.name)
            .field("listener", &self.listener.is_some())
            .finish()
    }
}

impl EventConfig {
    pub(crate) fn listener<F>(&mut self, listener: F)
    where
        F: Fn(&Event<'_>) + Send + Sync + 'static,
    {
        self.listener = Some(Arc::new(listener));
    }

    /// The layer's events, named after its kind (`rate_limit`, `plan`, `backoff`) unless a
    /// name was given, with a scope for each of `scopes` (a rate limiter's routes; the one
    /// plan or retrier).
    pub(crate) fn build<I>(&self, kind: LayerKind, scopes: I) -> Events
    where
        I: IntoIterator<Item = Arc<str>>,
    {
        let name = self.name.clone().unwrap_or_else(|| {
            match kind {
                LayerKind::Client | LayerKind::Server => "rate_limit",
                LayerKind::Plan => "plan",
                LayerKind::Backoff => "backoff",
            }
            .into()
        });
        Events {
            scopes: scopes
                .into_iter()
                .map(|label| Scope::new(&name, label, kind, self.metrics))
                .collect(),
            name,
            listener: self.listener.clone(),
        }
    }
}

/// The counter slots of a scope.
#[allow(non_snake_case, non_upper_case_globals)]
mod Slot {
    use super::{Refusal, KINDS};

    pub(super) const Admitted: usize = 0;
    pub(super) const Waited: usize = 1;
    pub(super) const WaitNanos: usize = 2;
    pub(super) const Queued: usize = 3;
    pub(super) const GaveUp: usize = 4;
    pub(super) const Abandoned: usize = 5;
    pub(super) const Learnt429: usize = 6;
    pub(super) const LearntHeaders: usize = 7;
    pub(super) const KeysForgotten: usize = 8;
    pub(super) const JobsBound: usize = 9;
    pub(super) const BackoffNanos: usize = 10;
    /// One per refusal.
    pub(super) const Refused: usize = 11;
    /// One per freeing.
    pub(super) const Freed: usize = Refused + Refusal::ALL.len();
    /// One per kind.
    pub(super) const Retry: usize = Freed + super::Freed::ALL.len();
    /// One per reason.
    pub(super) const NoRetry: usize = Retry + KINDS.len();
    pub(super) const End: usize = NoRetry + super::NoRetry::ALL.len();
}

const SLOTS: usize = Slot::End;

fn position<T: PartialEq>(all: &[T], one: &T) -> usize {
    all.iter().position(|x| x == one).unwrap_or(0)
}

/// One route's (or plan's, or retrier's) counters, and its metrics.
pub(crate) struct Scope {
    label: Arc<str>,
    counts: [AtomicU64; SLOTS],
    #[cfg(feature = "metrics")]
    metrics: Option<crate::metrics::Metrics>,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Scope {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(layer: &Arc<str>, label: Arc<str>, kind: LayerKind, metrics: bool) -> Self {
        Self {
            #[cfg(feature = "metrics")]
            metrics: metrics
                .then(|| crate::metrics::Metrics::new(layer.clone(), label.clone(), kind)),
            label,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    #[inline]
    fn add(&self, slot: usize, n: u64) {
        self.counts[slot].fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    fn count(&self, event: &Event<'_>) {
        let slot = match *event {
            Event::Admitted { waited, .. } | Event::SlotTaken { waited, .. } => {
                if !waited.is_zero() {
                    self.add(Slot::Waited, 1);
                    self.add(Slot::WaitNanos, crate::clock::nanos(waited));
                }
                Slot::Admitted
            }
            Event::Queued { .. } | Event::SlotQueued { .. } => Slot::Queued,
            Event::Refused { reason, .. } | Event::SlotRefused { reason, .. } => {
                Slot::Refused + position(&Refusal::ALL, &reason)
            }
            Event::GaveUp { .. } | Event::SlotGaveUp { .. } => Slot::GaveUp,
            Event::Abandoned { .. } => Slot::Abandoned,
            Event::Learnt { from, .. } => match from {
                Learnt::TooManyRequests => Slot::Learnt429,
                Learnt::Headers => Slot::LearntHeaders,
            },
            Event::KeyForgotten { .. } => Slot::KeysForgotten,
            Event::JobBound { .. } => Slot::JobsBound,
            Event::SlotFreed { by, .. } => Slot::Freed + position(&Freed::ALL, &by),
            Event::Retry { kind, wait, .. } => {
                self.add(Slot::BackoffNanos, crate::clock::nanos(wait));
                Slot::Retry + position(&KINDS, &kind)
            }
            Event::NoRetry { why, .. } => Slot::NoRetry + position(&NoRetry::ALL, &why),
        };
        self.add(slot, 1);
    }

    fn get(&self, slot: usize) -> u64 {
        self.counts[slot].load(Ordering::Relaxed)
    }

    fn refusals(&self) -> Refusals {
        let r = |reason: Refusal| self.get(Slot::Refused + position(&Refusal::ALL, &reason));
        Refusals {
            quota: r(Refusal::Quota),
            queue_full: r(Refusal::QueueFull),
            wait_too_long: r(Refusal::WaitTooLong),
            store_unavailable: r(Refusal::StoreUnavailable),
            missing_key: r(Refusal::MissingKey),
            no_peer_address: r(Refusal::NoPeerAddress),
            no_slots: r(Refusal::NoSlots),
            cost_too_high: r(Refusal::CostTooHigh),
            job_count: r(Refusal::JobCount),
            unknown_tier: r(Refusal::UnknownTier),
            plan_full: r(Refusal::PlanFull),
        }
    }

    pub(crate) fn route_counters(&self) -> RouteCounters {
        RouteCounters {
            admitted: self.get(Slot::Admitted),
            waited: self.get(Slot::Waited),
            wait_time: Duration::from_nanos(self.get(Slot::WaitNanos)),
            queued: self.get(Slot::Queued),
            refused: self.refusals(),
            gave_up: self.get(Slot::GaveUp),
            abandoned: self.get(Slot::Abandoned),
            learnt_429: self.get(Slot::Learnt429),
            learnt_headers: self.get(Slot::LearntHeaders),
            keys_forgotten: self.get(Slot::KeysForgotten),
        }
    }

    pub(crate) fn slot_counters(&self) -> SlotCounters {
        let f = |by: Freed| self.get(Slot::Freed + position(&Freed::ALL, &by));
        SlotCounters {
            taken: self.get(Slot::Admitted),
            waited: self.get(Slot::Waited),
            wait_time: Duration::from_nanos(self.get(Slot::WaitNanos)),
            queued: self.get(Slot::Queued),
            refused: self.refusals(),
            gave_up: self.get(Slot::GaveUp),
            jobs_bound: self.get(Slot::JobsBound),
            freed: Freeings {
                status: f(Freed::Status),
                completed: f(Freed::Completed),
                reconciled: f(Freed::Reconciled),
                lease_expired: f(Freed::LeaseExpired),
                create_failed: f(Freed::CreateFailed),
                duplicate: f(Freed::Duplicate),
                answered: f(Freed::Answered),
                abandoned: f(Freed::Abandoned),
                not_sent: f(Freed::NotSent),
                other_process: f(Freed::OtherProcess),
                handed_to_store: f(Freed::HandedToStore),
            },
        }
    }

    pub(crate) fn backoff_counters(&self) -> BackoffCounters {
        let k = |kind: LimitKind| self.get(Slot::Retry + position(&KINDS, &kind));
        let n = |why: NoRetry| self.get(Slot::NoRetry + position(&NoRetry::ALL, &why));
        BackoffCounters {
            retries_rate: k(LimitKind::Rate),
            retries_concurrency: k(LimitKind::Concurrency),
            retries_transient: k(LimitKind::Transient),
            backoff_time: Duration::from_nanos(self.get(Slot::BackoffNanos)),
            no_retries_left: n(NoRetry::NoRetriesLeft),
            server_asks_too_long: n(NoRetry::ServerAsksTooLong),
            past_deadline: n(NoRetry::PastDeadline),
            budget_spent: n(NoRetry::BudgetSpent),
        }
    }
}

/// The figures a scope's gauges show, read after an event when metrics are recorded.
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Figures {
    /// Client mode: requests in flight; a plan: slots held.
    pub(crate) held: Option<usize>,
    /// Requests (or creates) waiting.
    pub(crate) waiting: Option<usize>,
    /// A plan: its limit.
    pub(crate) limit: Option<usize>,
}

/// Calls the listener. A listener that panics is the caller's bug, but many events are
/// reported from where a panic would lose what a request holds (a place given back in a
/// `Drop`, where a second panic aborts the process): it is caught and logged.
#[inline]
fn tell(listener: &Listener, event: &Event<'_>) {
    let told = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener(event)));
    if told.is_err() {
        listener_panicked(event);
    }
}

#[cold]
#[inline(never)]
fn listener_panicked(event: &Event<'_>) {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if LOGGED.swap(true, Ordering::Relaxed) {
        tracing::debug!(?event, "an event listener panicked again: caught");
    } else {
        tracing::error!(?event, "an event listener panicked: the panic was caught and the layer goes on (logged once; each later one at debug)");
    }
}

/// A layer's events: its name, its listener and each scope's counters (and metrics).
pub(crate) struct Events {
    name: Arc<str>,
    listener: Option<Listener>,
    scopes: Box<[Scope]>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("name", &self.name)
            .field("listener", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}

impl Events {
    pub(crate) fn scope(&self, scope: usize) -> &Scope {
        &self.scopes[scope]
    }

    /// Records the event `make` builds (given the layer's name and the scope's label): its
    /// counter, its metrics, and the listener's call.
    #[inline]
    pub(crate) fn emit<'s>(
        &'s self,
        scope: usize,
        make: impl FnOnce(&'s str, &'s str) -> Event<'s>,
    ) {
        let at = &self.scopes[scope];
        let event = make(&self.name, &at.label);
        at.count(&event);
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &at.metrics {
            metrics.record(&event);
        }
        if let Some(listener) = &self.listener {
            tell(listener, &event);
        }
    }

    /// Sets the scope's gauges to the figures `read` gives, called only when metrics are
    /// recorded. Called under the lock that guards the figures, so that the last figures set
    /// are the latest, whichever thread sets them.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn gauges(&self, scope: usize, read: impl FnOnce() -> Figures) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.scopes[scope].metrics {
            metrics.gauges(read());
        }
    }

    /// [`gauges`](Self::gauges) for a caller that holds no lock: takes it with `lock`, and
    /// sets the figures `read` gives under it.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn gauges_locking<G>(
        &self,
        scope: usize,
        lock: impl FnOnce() -> G,
        read: impl FnOnce(&G) -> Figures,
    ) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.scopes[scope].metrics {
            let guard = lock();
            metrics.gauges(read(&guard));
        }
    }

    /// Server mode: the scope's table tracks one more client.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn tracked_one_more(&self, scope: usize) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.scopes[scope].metrics {
            metrics.tracked_one_more();
        }
    }
}
