//! Sliding window: at most `count` units (requests, or what each request costs) in any
//! window of length `period`.

use std::collections::VecDeque;

use super::{NotYet, Pending};
use crate::clock::Nanos;
use crate::quota::Rate;

/// The answered requests that still hold places, oldest first: when each was answered, and
/// how many units it holds. A request answered at `r` holds its places until
/// `r + margin + period`; requests in flight hold theirs too, and are counted by the caller.
///
/// Each entry keeps the units answered up to and including it (`through`), so the time at
/// which a given number of units have freed up is a binary search, whatever each request
/// cost.
///
/// A window filled at once (a change of algorithm that lost the history) keeps its units as
/// one run, `filled` units all answered at `filled_at`, ahead of the log: memory that does
/// not grow with the quota's count.
#[derive(Debug, Default)]
pub(super) struct Window {
    answered: VecDeque<Entry>,
    /// Units answered since the log was last empty (the newest entry's `through`).
    pushed: u64,
    /// Units of the entries dropped from the front since then.
    gone: u64,
    filled: u64,
    filled_at: Nanos,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Nanos,
    through: u64,
}

fn held_until(rate: &Rate, answered_at: Nanos) -> Nanos {
    answered_at
        .saturating_add(rate.margin)
        .saturating_add(rate.period)
}

impl Window {
    /// A window whose `units` were all taken by requests answered at `now`.
    pub(super) fn filled(units: u64, now: Nanos) -> Self {
        Self {
            filled: units,
            filled_at: now,
            ..Self::default()
        }
    }

    /// Units held by answered requests.
    fn held(&self) -> u64 {
        self.filled + (self.pushed - self.gone)
    }

    /// When the answered request whose places free the `n`-th unit (from 1, oldest first)
    /// was answered.
    fn answered_at(&self, n: u64) -> Option<Nanos> {
        let Some(n) = n.checked_sub(self.filled).filter(|&n| n > 0) else {
            return Some(self.filled_at);
        };
        let gone = self.gone;
        let i = self.answered.partition_point(|e| e.through - gone < n);
        self.answered.get(i).map(|e| e.at)
    }

    fn expire(&mut self, rate: &Rate, now: Nanos) {
        if self.filled > 0 && held_until(rate, self.filled_at) <= now {
            self.filled = 0;
        }
        while let Some(&Entry { at, through }) = self.answered.front() {
            if held_until(rate, at) > now {
                break;
            }
            self.answered.pop_front();
            self.gone = through;
        }
        if self.answered.is_empty() {
            (self.pushed, self.gone) = (0, 0);
        }
    }

    pub(super) fn check(
        &mut self,
        rate: &Rate,
        now: Nanos,
        pending: &Pending<'_>,
        units: u32,
    ) -> Result<(), NotYet> {
        self.expire(rate, now);
        let holding = pending.count() + self.held();
        let count = u64::from(rate.count);
        if holding + u64::from(units) <= count {
            return Ok(());
        }
        // Our places come free once `needed` units have: the answered requests free theirs
        // first, then the pending ones at their answers.
        let needed = holding + u64::from(units) - count;
        if let Some(at) = self.answered_at(needed) {
            return Err(NotYet::Until(held_until(rate, at)));
        }
        match pending.answer(needed - 1 - self.held()) {
            Some(at) => Err(NotYet::Until(held_until(rate, at))),
            None => Err(NotYet::Response),
        }
    }

    /// A lower bound on when a place held by a request in flight frees up.
    pub(super) fn after_response(&self, rate: &Rate, now: Nanos) -> Nanos {
        held_until(rate, now)
    }

    /// A request answered at `at` holds `units` places.
    pub(super) fn release(&mut self, at: Nanos, units: u32) {
        if units == 0 {
            return;
        }
        // Responses are recorded in order; a thread that read the clock a moment before
        // another but took the lock after it is counted at the later time, which is safe.
        let last = self.answered.back().map_or(self.filled_at, |e| e.at);
        self.pushed += u64::from(units);
        self.answered.push_back(Entry {
            at: at.max(last),
            through: self.pushed,
        });
    }

    /// Units that could be taken at `now`.
    pub(super) fn remaining(&mut self, rate: &Rate, now: Nanos, in_flight: u64) -> u32 {
        self.expire(rate, now);
        let holding = in_flight + self.held();
        u64::from(rate.count).saturating_sub(holding) as u32
    }

    #[cfg(test)]
    pub(super) fn is_idle(&mut self, rate: &Rate, now: Nanos) -> bool {
        self.expire(rate, now);
        self.held() == 0
    }

    /// Units held by answered requests at `now`.
    pub(super) fn len(&mut self, rate: &Rate, now: Nanos) -> u64 {
        self.expire(rate, now);
        self.held()
    }
}
