//! GCRA: requests paced one emission interval apart, with bursts of up to `burst`. A request
//! that costs `n` units counts as `n` requests.

use super::{NotYet, Pending};
use crate::clock::Nanos;
use crate::quota::Rate;

/// The theoretical arrival time: where the schedule of answered requests has got to. Each
/// answered request pushes it one emission interval past `max(TAT, response + margin)`.
#[derive(Debug, Default)]
pub(super) struct Gcra {
    tat: Nanos,
}

/// `base + n × interval`, where `n` may be negative; saturates at both ends.
fn offset(base: Nanos, n: i64, interval: Nanos) -> Nanos {
    let step = interval.saturating_mul(n.unsigned_abs());
    if n >= 0 {
        base.saturating_add(step)
    } else {
        base.saturating_sub(step)
    }
}

impl Gcra {
    pub(super) fn starting_at(tat: Nanos) -> Self {
        Self { tat }
    }

    /// Moves the schedule to a new emission interval, keeping how many requests it runs
    /// ahead of `now`: a lowered rate paces the very next request at its own interval.
    pub(super) fn rescale(&mut self, now: Nanos, old_interval: Nanos, new_interval: Nanos) {
        if self.tat > now {
            let ahead = u128::from(self.tat - now) * u128::from(new_interval)
                / u128::from(old_interval.max(1));
            self.tat = now.saturating_add(u64::try_from(ahead).unwrap_or(u64::MAX));
        }
    }

    pub(super) fn check(
        &mut self,
        rate: &Rate,
        now: Nanos,
        pending: &Pending<'_>,
        units: u32,
    ) -> Result<(), NotYet> {
        let held = i64::try_from(pending.count()).unwrap_or(i64::MAX);
        let slack = (i64::from(rate.burst) - i64::from(units)).saturating_sub(held);
        // Admit when max(TAT, now) + (pending + units - 1) × interval
        // <= now + (burst - 1) × interval.
        let admit_at = offset(self.tat, -slack, rate.interval);
        if slack >= 0 && admit_at <= now {
            return Ok(());
        }
        if slack < 0 {
            // More units are held than the burst allows: only `-slack` answered can help.
            return match pending.answer(slack.unsigned_abs() - 1) {
                Some(at) => Err(NotYet::Until(at)),
                None => Err(NotYet::Response),
            };
        }
        Err(NotYet::Until(admit_at))
    }

    /// A lower bound on when a request could go once the requests in flight are answered.
    pub(super) fn after_response(
        &self,
        rate: &Rate,
        now: Nanos,
        pending: u64,
        units: u32,
    ) -> Nanos {
        let base = self.tat.max(now.saturating_add(rate.margin));
        let pending = i64::try_from(pending).unwrap_or(i64::MAX);
        let n = pending.saturating_add(i64::from(units) - i64::from(rate.burst));
        offset(base, n, rate.interval).max(now)
    }

    /// A request answered at `at` pushes the schedule by `units` intervals.
    pub(super) fn release(&mut self, rate: &Rate, at: Nanos, units: u32) {
        if units == 0 {
            return;
        }
        self.tat = self
            .tat
            .max(at.saturating_add(rate.margin))
            .saturating_add(rate.interval.saturating_mul(u64::from(units)));
    }

    pub(super) fn remaining(&self, rate: &Rate, now: Nanos, in_flight: u64) -> u32 {
        // How many more units can be taken now.
        let tolerance = u128::from(rate.interval) * u128::from(rate.burst - 1);
        let used =
            u128::from(self.tat.max(now) - now) + u128::from(rate.interval) * u128::from(in_flight);
        if used > tolerance {
            return 0;
        }
        let more = (tolerance - used) / u128::from(rate.interval.max(1)) + 1;
        more.min(u128::from(rate.burst)) as u32
    }

    pub(super) fn is_idle(&self, now: Nanos) -> bool {
        self.tat <= now
    }
}
