//! GCRA: requests paced one emission interval apart, with bursts of up to `burst`.

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
    ) -> Result<(), NotYet> {
        let slack = i64::from(rate.burst) - 1 - pending.count() as i64;
        // Admit when max(TAT, now) + pending × interval <= now + (burst - 1) × interval.
        let admit_at = offset(self.tat, -slack, rate.interval);
        if slack >= 0 && admit_at <= now {
            return Ok(());
        }
        if slack < 0 {
            // More requests hold a place than the burst allows: only `-slack` answers can help.
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
        in_flight: u32,
        ahead: u32,
    ) -> Nanos {
        let base = self.tat.max(now.saturating_add(rate.margin));
        let n = i64::from(in_flight) + i64::from(ahead) + 1 - i64::from(rate.burst);
        offset(base, n, rate.interval).max(now)
    }

    pub(super) fn release(&mut self, rate: &Rate, at: Nanos) {
        self.tat = self
            .tat
            .max(at.saturating_add(rate.margin))
            .saturating_add(rate.interval);
    }

    pub(super) fn remaining(&self, rate: &Rate, now: Nanos, in_flight: u32) -> u32 {
        // How many more can be admitted now, one after another.
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
