//! The plan's slots: who holds them, and who waits for one. No HTTP in here.
//!
//! A slot is held by a *hold*, which lives in one of three states:
//!
//! - **in flight**: the job-creating request was sent and its answer is not in yet;
//! - **unknown**: the request was sent but its outcome will never be read (a transport error,
//!   a dropped future, a body without an id). The server may have created a job, so the slot
//!   stays held until a reconcile accounts for it or its lease runs out;
//! - **job**: the server created a job with a known id; held until the job is seen in a
//!   terminal state, completed, reconciled away or its lease runs out.
//!
//! Jobs this process did not create (seen active in a list) hold slots too. Every hold is
//! released exactly once; the tests and the property test in `tests.rs` check it.

use std::collections::{HashMap, VecDeque};
use std::task::Waker;

use crate::clock::Nanos;

/// Names an anonymous hold (in flight or unknown).
pub(crate) type HoldId = u64;

/// Why a slot was given back, for tracing and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The create failed: nothing was created.
    Failed,
    /// The job was seen in a terminal state, or completed by the caller.
    Finished,
    /// A reconcile showed the job (or the unknown outcome) is not active.
    Reconciled,
    /// The hold outlived the maximum job life.
    Expired,
    /// The job was already held under its id (a replay, or a job seen in a list first).
    Duplicate,
    /// In-flight mode: the response is over.
    Answered,
}

#[derive(Debug, Clone, Copy)]
struct Anonymous {
    since: Nanos,
    unknown: bool,
}

/// A held job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub(crate) since: Nanos,
    /// Whether this process created it (false: seen active in a list).
    pub(crate) ours: bool,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    waker: Option<Waker>,
}

/// How many finished job ids are remembered, so that a stale list showing one as active does
/// not take a slot for it again.
const REMEMBERED: usize = 4096;

#[derive(Debug)]
pub(crate) struct Slots {
    limit: usize,
    /// The maximum life of a hold that nobody will release (a job, or an unknown outcome).
    lease: Nanos,
    anonymous: HashMap<HoldId, Anonymous>,
    jobs: HashMap<Box<str>, Job>,
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
    next_hold: HoldId,
    finished: HashMap<Box<str>, u64>,
    finished_order: VecDeque<(Box<str>, u64)>,
    finished_count: u64,
    /// Every release, in order, when recording (tests).
    #[cfg(test)]
    pub(crate) log: Vec<(Option<HoldId>, Option<Box<str>>, Release)>,
}

impl Slots {
    pub(crate) fn new(limit: usize, lease: Nanos) -> Self {
        Self {
            limit,
            lease,
            anonymous: HashMap::new(),
            jobs: HashMap::new(),
            waiters: VecDeque::new(),
            next_ticket: 0,
            next_hold: 0,
            finished: HashMap::new(),
            finished_order: VecDeque::new(),
            finished_count: 0,
            #[cfg(test)]
            log: Vec::new(),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn in_use(&self) -> usize {
        self.anonymous.len() + self.jobs.len()
    }

    pub(crate) fn queue_len(&self) -> usize {
        self.waiters.len()
    }

    pub(crate) fn jobs(&self) -> impl Iterator<Item = (&str, &Job)> {
        self.jobs.iter().map(|(id, job)| (&**id, job))
    }

    /// Anonymous holds: (in flight, unknown outcome).
    pub(crate) fn anonymous(&self) -> (usize, usize) {
        let unknown = self.anonymous.values().filter(|a| a.unknown).count();
        (self.anonymous.len() - unknown, unknown)
    }

    pub(crate) fn is_held(&self, id: &str) -> bool {
        self.jobs.contains_key(id)
    }

    fn free(&self) -> bool {
        self.in_use() < self.limit
    }

    /// Takes a slot at once if one is free and nobody waits for it.
    pub(crate) fn try_take(&mut self, now: Nanos) -> Option<HoldId> {
        if !self.waiters.is_empty() {
            return None;
        }
        self.expire(now);
        self.free().then(|| self.hold(now))
    }

    fn hold(&mut self, now: Nanos) -> HoldId {
        let id = self.next_hold;
        self.next_hold += 1;
        self.anonymous.insert(
            id,
            Anonymous {
                since: now,
                unknown: false,
            },
        );
        id
    }

    /// Joins the back of the queue.
    pub(crate) fn join(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiters.push_back(Waiter {
            ticket,
            waker: None,
        });
        ticket
    }

    /// Takes a slot for `ticket` if it is at the head of the queue and a slot is free;
    /// otherwise keeps `waker` to be woken when that may have changed, and says when the next
    /// lease runs out (which frees a slot with nobody to wake the queue).
    pub(crate) fn poll_take(
        &mut self,
        ticket: u64,
        now: Nanos,
        waker: &Waker,
    ) -> Result<HoldId, Option<Nanos>> {
        let next_expiry = self.expire(now);
        if self.waiters.front().is_some_and(|w| w.ticket == ticket) && self.free() {
            self.waiters.pop_front();
            let hold = self.hold(now);
            self.wake_head();
            return Ok(hold);
        }
        if let Ok(i) = self.waiters.binary_search_by_key(&ticket, |w| w.ticket) {
            let slot = &mut self.waiters[i].waker;
            match slot {
                Some(w) if w.will_wake(waker) => {}
                _ => *slot = Some(waker.clone()),
            }
        }
        Err(next_expiry)
    }

    /// Leaves the queue without a slot (a dropped or timed-out request).
    pub(crate) fn leave(&mut self, ticket: u64) {
        if let Ok(i) = self.waiters.binary_search_by_key(&ticket, |w| w.ticket) {
            self.waiters.remove(i);
            if i == 0 {
                self.wake_head();
            }
        }
    }

    /// Wakes the head of the queue if a slot is free for it.
    fn wake_head(&mut self) {
        if !self.free() {
            return;
        }
        if let Some(waker) = self.waiters.front_mut().and_then(|w| w.waker.take()) {
            waker.wake();
        }
    }

    fn record(&mut self, _hold: Option<HoldId>, _id: Option<&str>, why: Release) {
        tracing::trace!(?why, "job slot released");
        #[cfg(test)]
        self.log.push((_hold, _id.map(Box::from), why));
    }

    /// Gives back an anonymous hold: the create failed, or (in-flight mode) was answered.
    pub(crate) fn release(&mut self, hold: HoldId, why: Release) {
        if self.anonymous.remove(&hold).is_some() {
            self.record(Some(hold), None, why);
            self.wake_head();
        }
    }

    /// The outcome of an in-flight hold will never be read: it stays held until a reconcile
    /// or its lease.
    pub(crate) fn unknown(&mut self, hold: HoldId) {
        if let Some(a) = self.anonymous.get_mut(&hold) {
            a.unknown = true;
        }
    }

    /// The create held by `hold` made job `id`.
    pub(crate) fn bind(&mut self, hold: HoldId, id: &str, now: Nanos) {
        if self.anonymous.remove(&hold).is_none() {
            return;
        }
        if self.jobs.contains_key(id) || self.finished.contains_key(id) {
            self.record(Some(hold), Some(id), Release::Duplicate);
            self.wake_head();
            return;
        }
        self.jobs.insert(
            id.into(),
            Job {
                since: now,
                ours: true,
            },
        );
    }

    /// Job `id` is over. False when it held no slot.
    pub(crate) fn finish(&mut self, id: &str, why: Release) -> bool {
        let Some((id, _)) = self.jobs.remove_entry(id) else {
            return false;
        };
        self.record(None, Some(&id), why);
        self.remember(id);
        self.wake_head();
        true
    }

    fn remember(&mut self, id: Box<str>) {
        self.finished_count += 1;
        self.finished.insert(id.clone(), self.finished_count);
        self.finished_order.push_back((id, self.finished_count));
        while self.finished_order.len() > REMEMBERED {
            if let Some((old, n)) = self.finished_order.pop_front() {
                if self.finished.get(&old) == Some(&n) {
                    self.finished.remove(&old);
                }
            }
        }
    }

    /// Job `id` was seen active: if nobody holds a slot for it (another process created it),
    /// it takes one. Jobs known to be finished are not taken back by a stale report.
    pub(crate) fn seen_active(&mut self, id: &str, now: Nanos) {
        if self.jobs.contains_key(id) || self.finished.contains_key(id) {
            return;
        }
        self.jobs.insert(
            id.into(),
            Job {
                since: now,
                ours: false,
            },
        );
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
        let active: std::collections::HashSet<&str> = active.into_iter().collect();
        let gone: Vec<Box<str>> = self
            .jobs
            .iter()
            .filter(|(id, job)| job.since < as_of && !active.contains(&***id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.finish(&id, Release::Reconciled);
        }
        let unknown: Vec<HoldId> = self
            .anonymous
            .iter()
            .filter(|(_, a)| a.unknown && a.since < as_of)
            .map(|(&h, _)| h)
            .collect();
        for hold in unknown {
            self.release(hold, Release::Reconciled);
        }
        for id in active {
            self.seen_active(id, now);
        }
        self.wake_head();
    }

    /// Releases holds older than the lease; returns when the next one expires.
    pub(crate) fn expire(&mut self, now: Nanos) -> Option<Nanos> {
        let lease = self.lease;
        let expired = |since: Nanos| since.saturating_add(lease) <= now;
        if self.jobs.values().any(|j| expired(j.since)) {
            let old: Vec<Box<str>> = self
                .jobs
                .iter()
                .filter(|(_, j)| expired(j.since))
                .map(|(id, _)| id.clone())
                .collect();
            for id in old {
                tracing::warn!(job = %id, "job slot lease expired: no terminal status seen within the maximum job life");
                self.finish(&id, Release::Expired);
            }
        }
        if self
            .anonymous
            .values()
            .any(|a| a.unknown && expired(a.since))
        {
            let old: Vec<HoldId> = self
                .anonymous
                .iter()
                .filter(|(_, a)| a.unknown && expired(a.since))
                .map(|(&h, _)| h)
                .collect();
            for hold in old {
                tracing::warn!("job slot of a create with an unknown outcome expired");
                self.release(hold, Release::Expired);
            }
        }
        let jobs = self.jobs.values().map(|j| j.since);
        let unknown = self
            .anonymous
            .values()
            .filter(|a| a.unknown)
            .map(|a| a.since);
        jobs.chain(unknown)
            .min()
            .map(|since| since.saturating_add(lease))
    }

    /// A new plan: more slots wake waiters at once; fewer take effect as holds are given back.
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        self.wake_head();
    }
}

#[cfg(test)]
mod tests;
