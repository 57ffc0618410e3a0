//! The plan's slots: who holds them, and who waits for one. No HTTP in here.
//!
//! A slot is held by a *hold*, which lives in one of three states:
//!
//! - **in flight**: taken for a job-creating request, sent or about to be, whose answer is
//!   not in yet;
//! - **unknown**: the request was sent but its outcome will never be read (a 5xx, a transport
//!   error, a dropped future, a body without an id). The server may have created a job, so the slot
//!   stays held until a reconcile accounts for it or its lease runs out;
//! - **job**: the server created a job with a known id; held until the job is seen in a
//!   terminal state, completed, reconciled away or its lease runs out.
//!
//! Jobs this process did not create (seen active in a list) hold slots too. Creates in flight
//! are only counted, and each is owned by one guard at a time, which gives it back exactly
//! once: `Unsent` while the service is readied or the store asked, `HoldGuard` once sent,
//! then the response body's `InFlightSlot` (in-flight mode) or `Observer` (job life). The
//! tests and the property test in `tests.rs` check the counts.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::task::Waker;

use crate::clock::Nanos;
use crate::queue::{Ticket, WaitQueue};

/// Why a slot was given back, for tracing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReleaseReason {
    /// The create failed: nothing was created.
    Failed,
    /// The job was seen in a terminal state.
    Finished,
    /// The caller completed the job (a webhook).
    Completed,
    /// A reconcile showed the job (or the unknown outcome) is not active.
    Reconciled,
    /// The hold outlived the maximum job life.
    Expired,
    /// The job was already held under its id (a replay, or a job seen in a list first).
    Duplicate,
    /// In-flight mode: the response is over.
    Answered,
    /// In-flight mode: the request was given up on (a transport error, a dropped future).
    Abandoned,
    /// Never sent: its service failed to get ready, or its future was dropped first.
    Unsent,
    /// Another process sharing the store gave the job back (a webhook, a status it saw).
    Elsewhere,
    /// A create whose outcome is unknown, held for the whole fleet by the shared store (which
    /// a reconcile in any process can account for) rather than by this process.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Store,
}

/// A change of the slots to report as an event.
#[derive(Debug)]
pub(crate) enum Pending {
    Freed(ReleaseReason),
    /// A job bound, with its id when a listener will read it.
    Bound(Option<Box<str>>),
}

impl ReleaseReason {
    /// What the event of this release says freed the slot.
    pub(crate) fn freed(self) -> crate::event::Freed {
        use crate::event::Freed;
        match self {
            Self::Failed => Freed::CreateFailed,
            Self::Finished => Freed::Status,
            Self::Completed => Freed::Completed,
            Self::Reconciled => Freed::Reconciled,
            Self::Expired => Freed::LeaseExpired,
            Self::Duplicate => Freed::Duplicate,
            Self::Answered => Freed::Answered,
            Self::Abandoned => Freed::Abandoned,
            Self::Unsent => Freed::NotSent,
            Self::Elsewhere => Freed::OtherProcess,
            Self::Store => Freed::HandedToStore,
        }
    }
}

/// A change of the held jobs that a shared store must hear of (recorded only when one mirrors
/// the slots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// The job is over.
    Finished(Box<str>),
    /// The job was seen active, and holds a slot.
    Active(Box<str>),
}

/// A held job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobHold {
    pub(crate) since: Nanos,
    /// Whether this process created it (false: seen active in a list).
    pub(crate) ours: bool,
}

/// How many finished job ids are remembered, so that a stale list showing one as active does
/// not take a slot for it again.
const REMEMBERED: usize = 4096;

/// How many ids completed before a create's response showed them are remembered (each for
/// at most the lease): the oldest is forgotten past this.
pub(crate) const EARLY_COMPLETES: usize = 4096;

/// What a create in the queue heard when it looked for its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// It holds them now.
    Taken,
    /// Not yet; the next lease runs out at this time (which frees a slot with nobody to wake
    /// the queue), if any.
    Wait(Option<Nanos>),
    /// Never: it needs more slots than the plan has.
    Never,
}

/// What became of a create's slot once its response showed the job's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// The job holds the slot.
    Held,
    /// The job was already held under its id: the slot was given back.
    Duplicate,
    /// The job was completed before its id was known: the slot was given back.
    Completed,
}

#[derive(Debug)]
pub(crate) struct Slots {
    limit: usize,
    /// The maximum life of a hold that nobody will release (a job, or an unknown outcome).
    job_lease: Nanos,
    /// Creates taken, sent or about to be, and not answered (their guards hold them).
    in_flight: usize,
    /// When each create with an unknown outcome was found to be one, oldest first, with its
    /// `Idempotency-Key` if it had one (a retry with the same key takes its slot over).
    unknown: VecDeque<(Nanos, Option<Box<str>>)>,
    jobs: HashMap<Box<str>, JobHold>,
    waiters: WaitQueue,
    /// Hashes of recently finished ids, oldest first, and the same as a set.
    finished: VecDeque<u64>,
    finished_set: HashSet<u64>,
    /// Hashes of ids completed while no slot held them but a create was in flight, with when;
    /// and the same in order, oldest first (entries given up on stay there until popped).
    early: HashMap<u64, Nanos>,
    early_order: VecDeque<(u64, Nanos)>,
    hasher: RandomState,
    /// Whether changes of the held jobs are recorded in `effects`, for a shared store.
    mirror: bool,
    pub(crate) effects: Vec<Effect>,
    /// No hold runs out before this (`Nanos::MAX`: none held); it may be earlier than the
    /// earliest, once that hold is given back.
    next_lease: Nanos,
    /// Whether a bound job's event carries its id (a listener reads it; the counters and
    /// metrics do not).
    pub(crate) report_ids: bool,
    /// Releases and bindings not yet reported as events (they are once the lock is let go).
    pub(crate) pending: Vec<Pending>,
    /// Every release, in order (tests).
    #[cfg(test)]
    pub(crate) log: Vec<ReleaseReason>,
}

impl Slots {
    pub(crate) fn new(limit: usize, job_lease: Nanos) -> Self {
        Self {
            limit,
            job_lease,
            in_flight: 0,
            unknown: VecDeque::new(),
            jobs: HashMap::new(),
            waiters: WaitQueue::default(),
            finished: VecDeque::new(),
            finished_set: HashSet::new(),
            early: HashMap::new(),
            early_order: VecDeque::new(),
            hasher: RandomState::new(),
            mirror: false,
            effects: Vec::new(),
            next_lease: Nanos::MAX,
            report_ids: false,
            pending: Vec::new(),
            #[cfg(test)]
            log: Vec::new(),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Records changes of the held jobs for a shared store from now on.
    #[cfg(feature = "redis")]
    pub(crate) fn mirror(&mut self) {
        self.mirror = true;
    }

    pub(crate) fn in_use(&self) -> usize {
        self.in_flight + self.unknown.len() + self.jobs.len()
    }

    pub(crate) fn queue_len(&self) -> usize {
        self.waiters.len()
    }

    pub(crate) fn jobs(&self) -> impl Iterator<Item = (&str, &JobHold)> {
        self.jobs.iter().map(|(id, job)| (&**id, job))
    }

    /// Creates (in flight, with an unknown outcome).
    pub(crate) fn creates(&self) -> (usize, usize) {
        (self.in_flight, self.unknown.len())
    }

    pub(crate) fn is_held(&self, id: &str) -> bool {
        !self.jobs.is_empty() && self.jobs.contains_key(id)
    }

    fn free(&self) -> bool {
        self.in_use() < self.limit
    }

    /// Whether `jobs` slots are free at once.
    #[inline]
    fn free_for(&self, jobs: usize) -> bool {
        // Written so that for one job it is `free()`, once compiled.
        jobs <= self.limit.saturating_sub(self.in_use())
    }

    /// Takes `jobs` slots (one per job the create starts) for a create about to be sent, if
    /// they are free and nobody waits. Leases are looked at when one may have run out (so that
    /// a leak is reported when it happens, not only once the plan is full), or when the slots
    /// are not free; a plan holding no job (in-flight mode) reads no clock for it.
    pub(crate) fn try_take(&mut self, jobs: usize, now: impl FnOnce() -> Nanos) -> bool {
        if !self.waiters.is_empty() {
            return false;
        }
        if self.next_lease != Nanos::MAX && self.jobs.is_empty() && self.unknown.is_empty() {
            // Nothing held runs out.
            self.next_lease = Nanos::MAX;
        }
        if self.next_lease != Nanos::MAX || !self.free_for(jobs) {
            let now = now();
            if now >= self.next_lease || !self.free_for(jobs) {
                self.expire(now);
            }
            if !self.free_for(jobs) {
                return false;
            }
        }
        self.in_flight += jobs;
        true
    }

    /// A hold taken at `since` runs out at most a lease later.
    fn leased(&mut self, since: Nanos) {
        self.next_lease = self.next_lease.min(since.saturating_add(self.job_lease));
    }

    /// Joins the back of the queue.
    pub(crate) fn join(&mut self) -> Ticket {
        self.waiters.join()
    }

    /// [`poll_take_jobs`](Self::poll_take_jobs) for one job (tests).
    #[cfg(test)]
    pub(crate) fn poll_take(
        &mut self,
        ticket: Ticket,
        now: Nanos,
        waker: &Waker,
    ) -> Result<(), Option<Nanos>> {
        match self.poll_take_jobs(ticket, 1, now, waker) {
            Turn::Taken => Ok(()),
            Turn::Wait(next) => Err(next),
            Turn::Never => unreachable!("a plan of no slot queues nobody"),
        }
    }

    /// Takes `jobs` slots for `ticket`, all in one step, if it is at the head of the queue
    /// and that many are free: a batch never holds part of its slots while it waits, and
    /// those behind it wait behind it (first come, first served, a big batch included).
    /// Otherwise keeps `waker` to be woken when that may have changed. A create needing more
    /// slots than the plan has (it was lowered while it waited) will never be sent: it is
    /// told so, and leaves the queue (`leave`).
    #[inline]
    pub(crate) fn poll_take_jobs(
        &mut self,
        ticket: Ticket,
        jobs: usize,
        now: Nanos,
        waker: &Waker,
    ) -> Turn {
        if jobs > self.limit {
            return Turn::Never;
        }
        let next_expiry = self.expire(now);
        if self.waiters.is_head(ticket) && self.free_for(jobs) {
            self.waiters.pop_head();
            self.in_flight += jobs;
            self.wake_head();
            return Turn::Taken;
        }
        self.waiters.register(ticket, waker);
        Turn::Wait(next_expiry)
    }

    /// Leaves the queue without a slot (a dropped or timed-out request).
    pub(crate) fn leave(&mut self, ticket: Ticket) {
        if self.waiters.leave(ticket) {
            self.wake_head();
        }
    }

    /// Wakes the head of the queue if a slot is free for it.
    fn wake_head(&mut self) {
        if !self.free() {
            return;
        }
        self.waiters.wake_head();
    }

    /// A slot was given back, to be reported once the slots are let go.
    fn released(&mut self, why: ReleaseReason) {
        self.pending.push(Pending::Freed(why));
        self.released_unreported(why);
    }

    /// A slot was given back, which the caller reports itself.
    fn released_unreported(&mut self, why: ReleaseReason) {
        tracing::trace!(?why, "job slot released");
        #[cfg(test)]
        self.log.push(why);
        self.wake_head();
    }

    /// A create in flight is over without a job: it failed, or (in-flight mode) was answered.
    /// Reported by the caller ([`PlanState::release`](super::state::PlanState::release)).
    pub(crate) fn release(&mut self, why: ReleaseReason) {
        debug_assert!(self.in_flight > 0, "release without take");
        self.in_flight = self.in_flight.saturating_sub(1);
        self.released_unreported(why);
    }

    /// [`release`](Self::release) of `jobs` creates' slots in flight at once (a batch's),
    /// reported by the caller.
    pub(crate) fn release_many(&mut self, jobs: usize, why: ReleaseReason) {
        debug_assert!(self.in_flight >= jobs, "release without take");
        self.in_flight = self.in_flight.saturating_sub(jobs);
        #[cfg(test)]
        self.log.extend(std::iter::repeat_n(why, jobs));
        tracing::trace!(?why, jobs, "job slots released");
        self.wake_head();
    }

    /// The outcome of a create in flight will never be read: its slot stays held until a
    /// reconcile or its lease, both counted from `now`.
    pub(crate) fn unknown(&mut self, now: Nanos, key: Option<Box<str>>) {
        debug_assert!(self.in_flight > 0, "unknown without take");
        self.in_flight = self.in_flight.saturating_sub(1);
        let at = self.unknown.back().map_or(now, |(last, _)| now.max(*last));
        self.unknown.push_back((at, key));
        self.leased(at);
    }

    /// A create carrying the `Idempotency-Key` of a create whose outcome is unknown is that
    /// create sent again (the server makes at most one job of a key): it takes over the
    /// slot the first one left held, as in flight, ahead of the queue, whose requests the slot
    /// was never free for. False when no unknown outcome has that key.
    ///
    /// A batch (`jobs` above one) left one unknown outcome per slot: it takes over `jobs` of
    /// them, or none when fewer are left (some ran out): it then queues as any create, and
    /// the rest stay held until a reconcile or their lease.
    pub(crate) fn take_over(&mut self, key: &str, jobs: usize) -> bool {
        let same = |(_, k): &(Nanos, Option<Box<str>>)| k.as_deref() == Some(key);
        if jobs == 1 {
            let Some(at) = self.unknown.iter().position(same) else {
                return false;
            };
            self.unknown.remove(at);
        } else {
            if self.unknown.iter().filter(|u| same(u)).count() < jobs {
                return false;
            }
            let mut left = jobs;
            self.unknown.retain(|u| {
                let take = left > 0 && same(u);
                left -= usize::from(take);
                !take
            });
        }
        self.in_flight += jobs;
        true
    }

    /// A create in flight made job `id`. (Inlined into both its callers, the single create's
    /// and the batch's: called from two places, it was no longer inlined into the path of
    /// every create, measured 30 instructions a create.)
    #[inline(always)]
    pub(crate) fn bind(&mut self, id: &str, now: Nanos) -> Bound {
        debug_assert!(self.in_flight > 0, "bind without take");
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.jobs.contains_key(id) || self.was_finished(id) {
            self.released(ReleaseReason::Duplicate);
            return Bound::Duplicate;
        }
        if !self.early.is_empty() && self.completed_early(id, now) {
            self.remember_finished(self.hasher.hash_one(id));
            self.released(ReleaseReason::Completed);
            return Bound::Completed;
        }
        self.jobs.insert(
            id.into(),
            JobHold {
                since: now,
                ours: true,
            },
        );
        self.leased(now);
        let id = self.report_ids.then(|| id.into());
        self.pending.push(Pending::Bound(id));
        Bound::Held
    }

    /// Job `id`, which holds no slot, was completed (a webhook came before the create's
    /// response showed the id). While a create is in flight its id may be `id`: remembered
    /// for the lease (and among the last [`EARLY_COMPLETES`] such ids), so that the slot is
    /// given back once it shows up. False when nothing was remembered.
    pub(crate) fn complete_early(&mut self, id: &str, now: Nanos) -> bool {
        if self.in_flight == 0 {
            return false;
        }
        self.forget_early(now);
        let hash = self.hasher.hash_one(id);
        self.early.insert(hash, now);
        self.early_order.push_back((hash, now));
        while self.early_order.len() > EARLY_COMPLETES {
            self.pop_early();
        }
        true
    }

    /// Whether `id` was completed early, within the lease; forgets it either way.
    fn completed_early(&mut self, id: &str, now: Nanos) -> bool {
        let job_lease = self.job_lease;
        let at = self.early.remove(&self.hasher.hash_one(id));
        self.forget_early(now);
        at.is_some_and(|at| at.saturating_add(job_lease) > now)
    }

    /// Forgets early completes older than the lease.
    fn forget_early(&mut self, now: Nanos) {
        let job_lease = self.job_lease;
        while self
            .early_order
            .front()
            .is_some_and(|&(_, at)| at.saturating_add(job_lease) <= now)
        {
            self.pop_early();
        }
    }

    fn pop_early(&mut self) {
        if let Some((hash, at)) = self.early_order.pop_front() {
            if self.early.get(&hash) == Some(&at) {
                self.early.remove(&hash);
            }
        }
    }

    /// Ids completed early and still remembered (tests).
    #[cfg(test)]
    pub(crate) fn early_len(&self) -> usize {
        self.early.len()
    }

    fn was_finished(&self, id: &str) -> bool {
        !self.finished_set.is_empty() && self.finished_set.contains(&self.hasher.hash_one(id))
    }

    /// Job `id` is over. False when it held no slot.
    pub(crate) fn end_job(&mut self, id: &str, why: ReleaseReason) -> bool {
        if self.jobs.remove(id).is_none() {
            return false;
        }
        if self.mirror && why != ReleaseReason::Elsewhere {
            self.effects.push(Effect::Finished(id.into()));
        }
        self.remember_finished(self.hasher.hash_one(id));
        self.released(why);
        true
    }

    fn remember_finished(&mut self, hash: u64) {
        if self.finished_set.insert(hash) {
            self.finished.push_back(hash);
            if self.finished.len() > REMEMBERED {
                if let Some(old) = self.finished.pop_front() {
                    self.finished_set.remove(&old);
                }
            }
        }
    }

    /// Job `id` was seen active: if nobody holds a slot for it (another process created it),
    /// it takes one. Jobs known to be finished are not taken back by a stale report.
    pub(crate) fn seen_active(&mut self, id: &str, now: Nanos) {
        if self.jobs.contains_key(id) || self.was_finished(id) {
            return;
        }
        self.jobs.insert(
            id.into(),
            JobHold {
                since: now,
                ours: false,
            },
        );
        self.leased(now);
        if self.mirror {
            self.effects.push(Effect::Active(id.into()));
        }
    }

    /// `active` is every job the server counts now, as listed at `as_of`: held jobs not in
    /// it are over, unknown outcomes are accounted for by it, and jobs in it that nobody
    /// holds take slots. Holds taken at or after `as_of` are left alone, since the list may
    /// not show them yet.
    pub(crate) fn reconcile<'a>(
        &mut self,
        active: impl IntoIterator<Item = &'a str>,
        as_of: Nanos,
        now: Nanos,
    ) {
        let active: HashSet<&str> = active.into_iter().collect();
        let gone: Vec<Box<str>> = self
            .jobs
            .iter()
            .filter(|(id, job)| job.since < as_of && !active.contains(&***id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.end_job(&id, ReleaseReason::Reconciled);
        }
        while self
            .unknown
            .front()
            .is_some_and(|&(since, _)| since < as_of)
        {
            self.unknown.pop_front();
            self.released(ReleaseReason::Reconciled);
        }
        for id in active {
            self.seen_active(id, now);
        }
    }

    /// Releases holds older than the lease; returns when the next one expires.
    pub(crate) fn expire(&mut self, now: Nanos) -> Option<Nanos> {
        let job_lease = self.job_lease;
        let expired = |since: Nanos| since.saturating_add(job_lease) <= now;
        if self.jobs.values().any(|j| expired(j.since)) {
            let old: Vec<Box<str>> = self
                .jobs
                .iter()
                .filter(|(_, j)| expired(j.since))
                .map(|(id, _)| id.clone())
                .collect();
            for id in old {
                tracing::warn!(job = %id, "job slot lease expired: no terminal status seen within the maximum job life");
                self.end_job(&id, ReleaseReason::Expired);
            }
        }
        while self
            .unknown
            .front()
            .is_some_and(|&(since, _)| expired(since))
        {
            tracing::warn!("job slot of a create with an unknown outcome expired");
            self.unknown.pop_front();
            self.released(ReleaseReason::Expired);
        }
        let oldest_job = self.jobs.values().map(|j| j.since).min();
        let next = [oldest_job, self.unknown.front().map(|&(since, _)| since)]
            .into_iter()
            .flatten()
            .min()
            .map(|since| since.saturating_add(job_lease));
        self.next_lease = next.unwrap_or(Nanos::MAX);
        next
    }

    /// A new plan: more slots wake waiters at once; fewer take effect as holds are given back.
    /// Fewer wake every waiter too: a batch needing more slots than the plan now has will
    /// never be sent, and is told so at once rather than wait forever.
    pub(crate) fn set_limit(&mut self, limit: usize) {
        let lowered = limit < self.limit;
        self.limit = limit;
        if lowered {
            self.waiters.wake_all();
        } else {
            self.wake_head();
        }
    }
}

#[cfg(test)]
mod batches;
#[cfg(test)]
mod tests;
