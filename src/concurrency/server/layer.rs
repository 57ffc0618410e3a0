//! [`KeyedPlans`]: server mode's layer, and the handle to every client's slots.

use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tower_layer::Layer;

use super::builder::{PlanFn, ServerRoute};
use super::service::KeyedPlansService;
use super::state::KeyedSlots;
use crate::clock::Clock;
use crate::concurrency::Plan;
use crate::error::ConfigError;
use crate::event::{Event, Events, Freed, SlotCounters};
use crate::lock::lock;
use crate::rate_limit::server::key::{ClientKey, KeyHashing};
use crate::rate_limit::{EmptyBody, MissingKey};
use crate::route::RouteTable;

/// What every clone of the layer shares.
pub(crate) struct KeyedPlanState<F> {
    pub(crate) table: RouteTable,
    pub(crate) kinds: Box<[ServerRoute]>,
    pub(crate) key: ClientKey,
    pub(crate) hasher: KeyHashing,
    pub(crate) on_missing: Option<MissingKey>,
    pub(crate) plan_by: Option<Arc<PlanFn>>,
    pub(crate) default_plan: Mutex<Plan>,
    pub(crate) id_param: Box<str>,
    pub(crate) id_field: Box<str>,
    pub(crate) status_field: Box<str>,
    pub(crate) active: Box<[Box<str>]>,
    pub(crate) max_prefix: usize,
    pub(crate) slots: KeyedSlots,
    /// Clients forgotten at a full table to make room for a newcomer.
    pub(crate) forgotten: AtomicU64,
    pub(crate) warned_no_peer: AtomicBool,
    pub(crate) clock: Clock,
    pub(crate) events: Events,
    pub(crate) body: F,
    /// The store the fleet's servers share the clients' slots through, if any.
    #[cfg(feature = "redis")]
    pub(crate) store: Option<crate::store::StoreHandle>,
}

impl<F> KeyedPlanState<F> {
    /// The maximum job life: the lease of a hold.
    #[cfg(feature = "redis")]
    pub(crate) fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.slots.lease())
    }

    /// Whether a job in `status` no longer holds a slot.
    pub(crate) fn is_terminal(&self, status: &str) -> bool {
        !self.active.iter().any(|a| **a == *status)
    }

    pub(crate) fn freed(&self, by: Freed) {
        self.events
            .emit(0, |layer, _| Event::SlotFreed { layer, by });
    }
}

/// Job slots per client key, enforced by a server: [`ConcurrencyLimitByPlan`]'s server mode,
/// made by [`Builder::reject`](crate::concurrency::Builder::reject). A [`Layer`] and the
/// handle to every client's slots.
///
/// A create over its client's plan is answered at once (429, with the body of
/// [`RejectBuilder::reject_with`](super::RejectBuilder::reject_with)); one under it takes a
/// slot, held from its send until the application's answer shows how it ended: a job (its id
/// read from the answer's JSON) holds the slot until [`complete`](Self::complete) or a
/// terminal status passing back through a status route. See the
/// [module docs](crate::concurrency#server-mode).
///
/// Cloning is cheap (one `Arc`) and never creates a new limit.
///
/// [`ConcurrencyLimitByPlan`]: crate::ConcurrencyLimitByPlan
pub struct KeyedPlans<F = EmptyBody> {
    pub(crate) shared: Arc<KeyedPlanState<F>>,
}

impl<F> Clone for KeyedPlans<F> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<F> fmt::Debug for KeyedPlans<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPlans")
            .field("default_plan", &*lock(&self.shared.default_plan))
            .field("key", &self.shared.key)
            .finish()
    }
}

/// Server mode's slots at one moment, from [`KeyedPlans::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyedPlansSnapshot {
    /// The plan of clients [`plan_by`](super::RejectBuilder::plan_by) names none for.
    pub default_plan: Plan,
    /// Client keys holding slots now.
    pub tracked_keys: usize,
    /// Clients forgotten at a full table to make room for a newcomer, since the layer was
    /// built.
    pub keys_forgotten: u64,
    /// What the slots have done since the layer was built (`refused.plan_full`: creates
    /// refused over a plan).
    pub counters: SlotCounters,
}

impl<F> KeyedPlans<F> {
    /// The key as a key header carries it (`x-api-key: sk-1` is `"sk-1"`), hashed as the
    /// layer hashes it.
    fn header_key(&self, key: &str) -> u64 {
        self.shared.hasher.hash_one(key.as_bytes()).max(1)
    }

    /// The key a [`key_fn`](super::RejectBuilder::key_fn) closure returns, hashed as the
    /// layer hashes it.
    fn fn_key<K: Hash + ?Sized>(&self, key: &K) -> u64 {
        self.shared.hasher.hash_one(key).max(1)
    }

    /// Job `id` of client `key` ended (a webhook of the application's own, its job runner):
    /// its slot is given back. `key` is as the key header carries it; for a layer keyed by a
    /// closure, use [`complete_key`](Self::complete_key). False when the client held no such
    /// job: an unknown id, one completed already, another client's job. While the client has
    /// a create in flight, an id it does not hold is remembered (its last 8) and frees that
    /// create's slot as soon as the create's answer shows it.
    ///
    /// With a shared store ([`RejectBuilder::store`](super::RejectBuilder::store)), the
    /// completion is sent to the store in the background, for the whole fleet, and the result
    /// only says whether this server's own table (its fail-open fallback) held the job; await
    /// [`complete_shared`](Self::complete_shared) to know, and to have the slot free before
    /// the next create.
    pub fn complete(&self, key: &str, id: &str) -> bool {
        #[cfg(feature = "redis")]
        if let Some(store) = &self.shared.store {
            let args = vec![id.to_owned(), micros(self.shared.lease()), "1".into()];
            store.keyed_change(stable(key.as_bytes()), "end", args);
        }
        self.end(self.header_key(key), id)
    }

    /// [`complete`](Self::complete) through the shared store, awaited: whether client `key`
    /// (as the key header carries it) held job `id` anywhere in the fleet.
    #[cfg(feature = "redis")]
    pub async fn complete_shared(
        &self,
        key: &str,
        id: &str,
    ) -> Result<bool, crate::store::StoreError> {
        let local = self.end(self.header_key(key), id);
        let Some(store) = &self.shared.store else {
            return Ok(local);
        };
        let args = vec![id.to_owned(), micros(self.shared.lease()), "1".into()];
        let [_, ended] = store
            .keyed_slots(stable(key.as_bytes()), "end", args)
            .await?;
        if ended == 1 && !local {
            self.shared.freed(Freed::Completed);
        }
        Ok(ended == 1 || local)
    }

    /// The slots client `key` (as the key header carries it) holds in the shared store, for
    /// the whole fleet.
    #[cfg(feature = "redis")]
    pub async fn in_use_shared(&self, key: &str) -> Result<usize, crate::store::StoreError> {
        let Some(store) = &self.shared.store else {
            return Ok(self.in_use(key));
        };
        let [_, held] = store
            .keyed_slots(stable(key.as_bytes()), "held", Vec::new())
            .await?;
        Ok(usize::try_from(held).unwrap_or(0))
    }

    /// [`complete`](Self::complete) for a layer keyed by a closure: `key` is the value it
    /// returns for the client (the same type, hashed the same way).
    pub fn complete_key<K: Hash + ?Sized>(&self, key: &K, id: &str) -> bool {
        #[cfg(feature = "redis")]
        if let Some(store) = &self.shared.store {
            let args = vec![id.to_owned(), micros(self.shared.lease()), "1".into()];
            store.keyed_change(stable(key), "end", args);
        }
        self.end(self.fn_key(key), id)
    }

    fn end(&self, key: u64, id: &str) -> bool {
        let ended = self.shared.slots.end(key, id, true);
        if ended {
            self.shared.freed(Freed::Completed);
        }
        ended
    }

    /// The slots client `key` (as the key header carries it) holds now: its jobs, its creates
    /// in flight and those whose outcome is unknown.
    pub fn in_use(&self, key: &str) -> usize {
        let now = self.shared.clock.now();
        self.shared.slots.held(self.header_key(key), now)
    }

    /// [`in_use`](Self::in_use) for a layer keyed by a closure.
    pub fn in_use_key<K: Hash + ?Sized>(&self, key: &K) -> usize {
        let now = self.shared.clock.now();
        self.shared.slots.held(self.fn_key(key), now)
    }

    /// `active_ids` are every job client `key` (as the key header carries it) has running,
    /// as the application's own records say now: its held jobs not among them, and its
    /// creates whose outcome was unknown, are given back. Creates in flight are left alone.
    ///
    /// The list is taken as current: a job whose create was answered after the list was
    /// read is not in it, and would lose its slot. When that can happen, use
    /// [`reconcile_as_of`](Self::reconcile_as_of) with the time the list was read.
    pub fn reconcile<I>(&self, key: &str, active_ids: I)
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.reconcile_as_of(key, active_ids, tokio::time::Instant::now());
    }

    /// [`reconcile`](Self::reconcile) with a list read at `listed_at`: jobs and unknown
    /// outcomes that took their slot after it are left alone, since the list may not show
    /// them yet. In a store this is judged on Redis's clock with the store's timeout as
    /// margin (the change may run up to a timeout after the call): what was taken within a
    /// timeout before the list is left to a later reconcile, never freed early.
    pub fn reconcile_as_of<I>(&self, key: &str, active_ids: I, listed_at: tokio::time::Instant)
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let ids: Vec<I::Item> = active_ids.into_iter().collect();
        let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
        let clock = &self.shared.clock;
        let listed = crate::clock::nanos(listed_at.saturating_duration_since(clock.instant(0)));
        #[cfg(feature = "redis")]
        if let Some(store) = &self.shared.store {
            let age = std::time::Duration::from_nanos(clock.now().saturating_sub(listed));
            let mut args = vec![
                micros(age.saturating_add(store.timeout())),
                micros(self.shared.lease()),
            ];
            args.extend(ids.iter().map(|id| (*id).to_owned()));
            store.keyed_change(stable(key.as_bytes()), "reconcile", args);
        }
        let freed = self
            .shared
            .slots
            .reconcile(self.header_key(key), &ids, listed);
        for _ in 0..freed {
            self.shared.freed(Freed::Reconciled);
        }
    }

    /// Changes the plan of clients [`plan_by`](super::RejectBuilder::plan_by) names none
    /// for; it takes effect on their next create. A plan allowing no job is an error.
    pub fn set_default_plan(&self, plan: Plan) -> Result<(), ConfigError> {
        plan.checked_limit()?;
        *lock(&self.shared.default_plan) = plan;
        Ok(())
    }

    /// Everything at one moment.
    pub fn snapshot(&self) -> KeyedPlansSnapshot {
        KeyedPlansSnapshot {
            default_plan: *lock(&self.shared.default_plan),
            tracked_keys: self.shared.slots.tracked(),
            keys_forgotten: self.shared.forgotten.load(Ordering::Relaxed),
            counters: self.shared.events.scope(0).slot_counters(),
        }
    }
}

/// A key hashed the same way in every process, for the shared store.
#[cfg(feature = "redis")]
pub(crate) fn stable<K: Hash + ?Sized>(key: &K) -> u64 {
    KeyHashing::Stable.hash_one(key).max(1)
}

/// Whole microseconds, rounded up, as the store's scripts take them.
#[cfg(feature = "redis")]
pub(crate) fn micros(d: std::time::Duration) -> String {
    d.as_nanos().div_ceil(1_000).min(1 << 52).to_string()
}

impl<S, F> Layer<S> for KeyedPlans<F> {
    type Service = KeyedPlansService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedPlansService::new(inner, self.shared.clone())
    }
}
