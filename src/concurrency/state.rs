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
use super::slots::{Pending, ReleaseReason, Slots};
use crate::clock::{nanos, Clock};
use crate::event::{Event, Events, Figures};
use crate::lock::lock;
use crate::route::RouteTable;
#[cfg(feature = "redis")]
use crate::store::StoreHandle;

/// What a route's requests mean to the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    /// Creates a job: needs a slot.
    Create,
    /// Creates as many jobs as [`PlanConfig::jobs_per_create`] counts: needs that many slots.
    CreateCounted,
    /// Shows one job, whose id is the pattern's parameter named by [`PlanConfig::id_param`].
    Status,
    /// Shows a list of jobs.
    List,
}

/// How many jobs a create starts, read from its head ([`Builder::jobs_per_create`]).
///
/// [`Builder::jobs_per_create`]: super::Builder::jobs_per_create
#[derive(Clone)]
pub(crate) struct JobsPerCreate(
    pub(crate) Arc<dyn Fn(&crate::RequestHead<'_>) -> u32 + Send + Sync>,
);

impl std::fmt::Debug for JobsPerCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobsPerCreate(..)")
    }
}

#[derive(Debug)]
pub(crate) struct PlanConfig {
    /// The status routes' parameter that holds the job's id.
    pub(crate) id_param: Box<str>,
    pub(crate) id_field: Box<str>,
    /// Where a create's response shows the ids of the jobs it started (a top-level array's
    /// by default), and whether it was set: if not, a create of one job reads only the
    /// object's `id_field`.
    pub(crate) id_path: crate::json::IdPath,
    pub(crate) id_path_set: bool,
    /// How many jobs a create starts; one each without it.
    pub(crate) jobs_per_create: Option<JobsPerCreate>,
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
    /// The layer's name, listener and counters (one scope).
    pub(crate) events: Events,
}

/// The slots, locked. When it is let go, the changes of the held jobs go to the shared
/// store, if any, and the releases and bindings made under it are reported as events.
pub(crate) struct SlotsGuard<'a> {
    /// Always `Some` until dropped.
    slots: Option<MutexGuard<'a, Slots>>,
    shared: &'a PlanState,
}

impl Deref for SlotsGuard<'_> {
    type Target = Slots;

    #[inline]
    fn deref(&self) -> &Slots {
        self.slots.as_deref().expect("held until dropped")
    }
}

impl DerefMut for SlotsGuard<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Slots {
        self.slots.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for SlotsGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(slots) = &self.slots {
            if !slots.effects.is_empty() || !slots.pending.is_empty() {
                self.report();
            }
        }
    }
}

impl SlotsGuard<'_> {
    /// Sends the changes to the store and reports the events, once the lock is let go.
    #[cold]
    #[inline(never)]
    fn report(&mut self) {
        let Some(mut slots) = self.slots.take() else {
            return;
        };
        let effects = std::mem::take(&mut slots.effects);
        // The usual single change is moved out on its own, so that the buffer keeps its room
        // and the next change allocates nothing.
        let (one, many) = match slots.pending.len() {
            1 => (slots.pending.pop(), Vec::new()),
            _ => (None, std::mem::take(&mut slots.pending)),
        };
        self.shared.events.gauges(0, || plan_figures(&slots));
        drop(slots);
        let events = &self.shared.events;
        for change in one.iter().chain(&many) {
            match change {
                Pending::Freed(why) => events.emit(0, |layer, _| Event::SlotFreed {
                    layer,
                    by: why.freed(),
                }),
                Pending::Bound(id) => events.emit(0, |layer, _| Event::JobBound {
                    layer,
                    id: id.as_deref().unwrap_or_default(),
                }),
            }
        }
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

/// The gauges of a plan's slots.
pub(crate) fn plan_figures(slots: &Slots) -> Figures {
    Figures {
        held: Some(slots.in_use()),
        waiting: Some(slots.queue_len()),
        limit: Some(slots.limit()),
    }
}

impl PlanState {
    /// The slots, locked.
    #[inline]
    pub(crate) fn slots(&self) -> SlotsGuard<'_> {
        SlotsGuard {
            slots: Some(lock(&self.slots)),
            shared: self,
        }
    }

    /// Reports an event of the plan, and its gauges.
    #[inline]
    pub(crate) fn report<'s>(&'s self, make: impl FnOnce(&'s str) -> Event<'s>) {
        self.events.emit(0, |layer, _| make(layer));
        self.show_figures();
    }

    /// Sets the plan's gauges, for a caller that holds no lock.
    pub(crate) fn show_figures(&self) {
        let slots = || lock(&self.slots);
        self.events.gauges_locking(0, slots, |s| plan_figures(s));
    }

    /// A create in flight is over without a job (it failed, or in-flight mode answered it):
    /// its slot is given back and reported, with no queued change on the path of every
    /// in-flight request.
    #[inline]
    pub(crate) fn release(&self, why: ReleaseReason) {
        {
            let mut slots = self.slots();
            slots.release(why);
            self.events.gauges(0, || plan_figures(&slots));
        }
        let by = why.freed();
        self.events
            .emit(0, |layer, _| Event::SlotFreed { layer, by });
    }

    /// [`release`](Self::release) of a create's `jobs` slots (one per job it starts).
    #[inline]
    pub(crate) fn release_many(&self, jobs: u32, why: ReleaseReason) {
        if jobs == 1 {
            self.release(why);
        } else {
            self.release_batch(jobs, why);
        }
    }

    #[cold]
    #[inline(never)]
    fn release_batch(&self, jobs: u32, why: ReleaseReason) {
        if jobs == 0 {
            return;
        }
        {
            let mut slots = self.slots();
            slots.release_many(jobs as usize, why);
            self.events.gauges(0, || plan_figures(&slots));
        }
        let by = why.freed();
        for _ in 0..jobs {
            self.events
                .emit(0, |layer, _| Event::SlotFreed { layer, by });
        }
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
    pub(crate) id: crate::queue::Ticket,
    pub(crate) queued: bool,
    /// When it joined the queue.
    pub(crate) since: crate::clock::Nanos,
}

impl SlotTicket {
    /// Leaves the queue, its maximum wait run out (the create is returned unsent).
    pub(crate) fn time_out(&mut self) {
        self.refuse(crate::event::Refusal::WaitTooLong);
    }

    /// Leaves the queue, refused for `reason` (the create is returned unsent).
    pub(crate) fn refuse(&mut self, reason: crate::event::Refusal) {
        self.shared.slots().leave(self.id);
        self.queued = false;
        self.shared
            .report(|layer| Event::SlotRefused { layer, reason });
    }
}

impl Drop for SlotTicket {
    fn drop(&mut self) {
        if self.queued {
            self.shared.slots().leave(self.id);
            let waited = self.shared.clock.now().saturating_sub(self.since);
            self.shared.report(|layer| Event::SlotGaveUp {
                layer,
                waited: std::time::Duration::from_nanos(waited),
            });
        }
    }
}
