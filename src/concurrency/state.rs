//! A plan's state, shared by every clone of the layer: the route kinds, the settings, the
//! slots, and the lock over them that tells a shared store what changed when it is let go.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::plan::Plan;
#[cfg(feature = "redis")]
use super::slots::Effect;
use super::slots::{ReleaseReason, Slots};
use crate::clock::{nanos, Clock};
use crate::lock::lock;
use crate::route::RouteTable;
#[cfg(feature = "redis")]
use crate::store::StoreHandle;

/// What a route's requests mean to the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    /// Creates a job: needs a slot.
    Create,
    /// Shows one job, whose id is the pattern's parameter named by [`PlanConfig::id_param`].
    Status,
    /// Shows a list of jobs.
    List,
}

#[derive(Debug)]
pub(crate) struct PlanConfig {
    /// The status routes' parameter that holds the job's id.
    pub(crate) id_param: Box<str>,
    pub(crate) id_field: Box<str>,
    pub(crate) status_field: Box<str>,
    pub(crate) active: Box<[Box<str>]>,
    pub(crate) max_prefix: usize,
    pub(crate) max_queue: Option<usize>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) in_flight: bool,
    /// The most a held job's slot lives (a lease in the shared store).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) max_job_life: Duration,
}

impl PlanConfig {
    /// Whether a job in `status` no longer holds a slot.
    pub(crate) fn is_terminal(&self, status: &str) -> bool {
        !self.active.iter().any(|a| **a == *status)
    }
}

/// What every clone of the layer shares.
#[derive(Debug)]
pub(crate) struct PlanState {
    pub(crate) table: RouteTable,
    pub(crate) kinds: Box<[RouteKind]>,
    /// The path of the first status route whose only parameter is the job id, split around
    /// it, for the watch (`/v2/generate/` and ``); or why there is none.
    pub(crate) watch_path: Result<(Box<str>, Box<str>), String>,
    pub(crate) config: PlanConfig,
    pub(crate) clock: Clock,
    pub(crate) slots: Mutex<Slots>,
    pub(crate) plan: Mutex<Plan>,
    /// Notified when a job takes or gives back a slot, while a watch runs.
    pub(crate) changed: Notify,
    pub(crate) watches: AtomicUsize,
    /// Whether a create answered without a job id has been logged at `warn` (once: its id
    /// field is likely misnamed; each one after is logged at `debug`).
    pub(crate) warned_no_id: std::sync::atomic::AtomicBool,
    /// The store the slots are shared through with other processes, if any.
    #[cfg(feature = "redis")]
    pub(crate) store: Option<StoreHandle>,
}

/// The slots, locked. Changes of the held jobs go to the shared store, if any, when it is
/// let go.
pub(crate) struct SlotsGuard<'a> {
    slots: MutexGuard<'a, Slots>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    shared: &'a PlanState,
}

impl Deref for SlotsGuard<'_> {
    type Target = Slots;

    #[inline]
    fn deref(&self) -> &Slots {
        &self.slots
    }
}

impl DerefMut for SlotsGuard<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Slots {
        &mut self.slots
    }
}

impl Drop for SlotsGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.slots.effects.is_empty() {
            self.send_effects();
        }
    }
}

impl SlotsGuard<'_> {
    #[cold]
    #[inline(never)]
    fn send_effects(&mut self) {
        let effects = std::mem::take(&mut self.slots.effects);
        #[cfg(feature = "redis")]
        if let Some(store) = &self.shared.store {
            let job_lease = self.shared.job_lease();
            for effect in effects {
                match effect {
                    Effect::Finished(id) => store.job_done(&id, job_lease),
                    Effect::Active(id) => store.job_active(&id, job_lease),
                }
            }
        }
        #[cfg(not(feature = "redis"))]
        debug_assert!(effects.is_empty(), "no store to mirror the slots to");
    }
}

impl PlanState {
    /// The slots, locked.
    #[inline]
    pub(crate) fn slots(&self) -> SlotsGuard<'_> {
        SlotsGuard {
            slots: lock(&self.slots),
            shared: self,
        }
    }

    /// The slots, locked, for a change of the creates in flight only (a release, an unknown
    /// outcome), which the shared store never needs to hear of from here.
    #[inline]
    pub(crate) fn counts(&self) -> MutexGuard<'_, Slots> {
        lock(&self.slots)
    }

    pub(crate) fn end_job(&self, id: &str, why: ReleaseReason) -> bool {
        let finished = self.slots().end_job(id, why);
        if finished {
            self.notify();
        }
        finished
    }

    /// When a create that starts waiting now gives up (its maximum wait), if ever.
    pub(crate) fn wait_deadline(&self) -> Option<crate::clock::Nanos> {
        let max_wait = self.config.max_wait?;
        Some(self.clock.now().saturating_add(nanos(max_wait)))
    }

    /// The most a held job's slot lives: its lease in the shared store.
    #[cfg(feature = "redis")]
    pub(crate) fn job_lease(&self) -> Duration {
        self.config.max_job_life
    }

    /// Tells running watches that the held jobs changed.
    pub(crate) fn notify(&self) {
        if self.watches.load(Ordering::Relaxed) > 0 {
            self.changed.notify_waiters();
        }
    }
}

/// A place in the queue; dropping it while queued leaves the queue.
pub(crate) struct SlotTicket {
    pub(crate) shared: Arc<PlanState>,
    pub(crate) id: u64,
    pub(crate) queued: bool,
}

impl Drop for SlotTicket {
    fn drop(&mut self) {
        if self.queued {
            self.shared.slots().leave(self.id);
        }
    }
}
