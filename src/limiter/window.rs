//! Sliding window: at most `count` requests in any window of length `period`.

use std::collections::VecDeque;

use super::{NotYet, Pending};
use crate::clock::Nanos;
use crate::quota::Rate;

/// The response times of answered requests that still hold a place, oldest first. A request
/// answered at `r` holds its place until `r + margin + period`; requests in flight hold theirs
/// too, and are counted by the caller.
///
/// A window filled at once (a change of algorithm that lost the history) keeps its places as
/// one run, `filled` places all answered at `filled_at`, ahead of the log: memory that does
/// not grow with the quota's count.
#[derive(Debug, Default)]
pub(super) struct Window {
    answered: VecDeque<Nanos>,
    filled: u32,
    filled_at: Nanos,
}

fn held_until(rate: &Rate, answered_at: Nanos) -> Nanos {
    answered_at
        .saturating_add(rate.margin)
        .saturating_add(rate.period)
}

impl Window {
    /// A window whose `count` places were all taken by requests answered at `now`.
    pub(super) fn filled(count: u32, now: Nanos) -> Self {
        Self {
            answered: VecDeque::new(),
            filled: count,
            filled_at: now,
        }
    }

    /// Places held by answered requests.
    fn held(&self) -> u64 {
        u64::from(self.filled) + self.answered.len() as u64
    }

    /// When the `index`-th answered request, oldest first, was answered.
    fn answered_at(&self, index: u64) -> Option<Nanos> {
        match index.checked_sub(u64::from(self.filled)) {
            None => Some(self.filled_at),
            Some(index) => usize::try_from(index)
                .ok()
                .and_then(|i| self.answered.get(i).copied()),
        }
    }

    fn expire(&mut self, rate: &Rate, now: Nanos) {
        if self.filled > 0 && held_until(rate, self.filled_at) <= now {
            self.filled = 0;
        }
        while let Some(&at) = self.answered.front() {
            if held_until(rate, at) > now {
                break;
            }
            self.answered.pop_front();
        }
    }

    pub(super) fn check(
        &mut self,
        rate: &Rate,
        now: Nanos,
        pending: &Pending<'_>,
    ) -> Result<(), NotYet> {
        self.expire(rate, now);
        let holding = pending.count() + self.held();
        if holding < u64::from(rate.count) {
            return Ok(());
        }
        // The `needed`-th place to free up is ours: the answered requests free theirs first,
        // then the pending ones at their answers.
        let needed = holding + 1 - u64::from(rate.count);
        if let Some(at) = self.answered_at(needed - 1) {
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

    pub(super) fn release(&mut self, at: Nanos) {
        // Responses are recorded in order; a thread that read the clock a moment before
        // another but took the lock after it is counted at the later time, which is safe.
        let last = self.answered.back().copied();
        let at = at.max(last.unwrap_or(self.filled_at));
        self.answered.push_back(at);
    }

    pub(super) fn remaining(&mut self, rate: &Rate, now: Nanos, in_flight: u32) -> u32 {
        self.expire(rate, now);
        let holding = u64::from(in_flight) + self.held();
        u64::from(rate.count).saturating_sub(holding) as u32
    }

    #[cfg(test)]
    pub(super) fn is_idle(&mut self, rate: &Rate, now: Nanos) -> bool {
        self.expire(rate, now);
        self.held() == 0
    }

    /// Answered requests still holding a place at `now`.
    pub(super) fn len(&mut self, rate: &Rate, now: Nanos) -> u64 {
        self.expire(rate, now);
        self.held()
    }
}
