//! A client's count in a server-mode key table: a sliding window's buckets or a paced
//! client's theoretical arrival time, and the three numbers it is remembered by.

use crate::clock::Nanos;
use crate::quota::Rate;

/// Buckets a sliding window's period is cut into.
const BUCKETS: u64 = 16;
/// Buckets a request is counted in: its own and the 16 after it.
const RING: usize = BUCKETS as usize + 1;
/// What the limiter said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Admitted: `remaining` more could go now, and everything counted is gone at `reset`.
    Pass { remaining: u32, reset: Nanos },
    /// Refused: the client is admitted if it comes back at `until` (and sends nothing
    /// meanwhile).
    Refuse { until: Nanos },
}

/// A sliding window of 16 buckets (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buckets {
    /// The index (`time / width`) of the newest bucket.
    newest: u64,
    /// Requests counted per bucket, the newest at `newest % RING`.
    counts: [u32; RING],
    /// Their sum.
    total: u32,
}

/// One client's limit.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyState {
    Window(Buckets),
    /// GCRA's theoretical arrival time.
    Gcra {
        tat: Nanos,
    },
}

fn width(rate: &Rate) -> Nanos {
    rate.period.div_ceil(BUCKETS).max(1)
}

/// `a × b / c`, rounded up, saturating.
fn scale(a: Nanos, b: Nanos, c: Nanos) -> Nanos {
    let scaled = (u128::from(a) * u128::from(b)).div_ceil(u128::from(c.max(1)));
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

impl Buckets {
    pub(super) fn new(now_index: u64) -> Self {
        Self {
            newest: now_index,
            counts: [0; RING],
            total: 0,
        }
    }

    /// Moves the newest bucket up to `index`, dropping the buckets no longer counted.
    pub(super) fn advance(&mut self, index: u64) {
        if index <= self.newest {
            return;
        }
        let gap = index - self.newest;
        if gap >= RING as u64 || self.total == 0 {
            self.counts = [0; RING];
            self.total = 0;
        } else {
            for step in 1..=gap {
                let slot = ((self.newest + step) % RING as u64) as usize;
                self.total -= self.counts[slot];
                self.counts[slot] = 0;
            }
        }
        self.newest = index;
    }

    /// The count of bucket `index` (one of the 17 counted).
    pub(super) fn count(&self, index: u64) -> u32 {
        self.counts[(index % RING as u64) as usize]
    }

    /// The earliest time at which at most `keep` requests are counted.
    pub(super) fn time_to(&self, keep: u32, width: Nanos) -> Nanos {
        let mut left = self.total;
        if left <= keep {
            return 0;
        }
        let oldest = self.newest.saturating_sub(BUCKETS);
        for index in oldest..=self.newest {
            left -= self.count(index);
            if left <= keep {
                return index.saturating_add(RING as u64).saturating_mul(width);
            }
        }
        self.newest
            .saturating_add(RING as u64)
            .saturating_mul(width)
    }
}

impl KeyState {
    pub(super) fn new(rate: &Rate, now: Nanos) -> Self {
        if rate.is_gcra() {
            Self::Gcra { tat: 0 }
        } else {
            Self::Window(Buckets::new(now / width(rate)))
        }
    }

    /// What the client has counted now: requests (sliding window), or the bucket's level in
    /// requests, rounded up (GCRA).
    pub(super) fn used(&mut self, rate: &Rate, now: Nanos) -> u32 {
        match self {
            Self::Window(b) => {
                b.advance(now / width(rate));
                b.total
            }
            Self::Gcra { tat } => {
                let level = tat.saturating_sub(now).div_ceil(rate.interval.max(1));
                u32::try_from(level).unwrap_or(u32::MAX)
            }
        }
    }

    /// When everything counted now is gone.
    pub(super) fn clear_at(&self, rate: &Rate, now: Nanos) -> Nanos {
        match self {
            Self::Window(b) => {
                if b.total == 0 {
                    return now;
                }
                let w = width(rate);
                let oldest = b.newest.saturating_sub(BUCKETS);
                let newest_used = (oldest..=b.newest)
                    .rev()
                    .find(|&i| b.count(i) > 0)
                    .unwrap_or(b.newest);
                newest_used
                    .saturating_add(RING as u64)
                    .saturating_mul(w)
                    .max(now)
            }
            Self::Gcra { tat } => (*tat).max(now),
        }
    }

    /// When at most `keep` requests are counted (the state must be advanced to now).
    pub(super) fn time_to(&self, rate: &Rate, keep: u32, now: Nanos) -> Nanos {
        match self {
            Self::Window(b) => b.time_to(keep, width(rate)).max(now),
            Self::Gcra { tat } => tat
                .saturating_sub(rate.interval.saturating_mul(u64::from(keep)))
                .max(now),
        }
    }

    /// Admits a request of `units` (at most the quota's [capacity](Rate::capacity)) at
    /// `now`, or says when it could go.
    pub(super) fn hit(&mut self, rate: &Rate, now: Nanos, units: u32) -> Verdict {
        match self {
            Self::Window(b) => {
                let w = width(rate);
                b.advance(now / w);
                // What costs nothing takes nothing, but is held back by a full quota (a cost
                // corrected upwards) as a request of one unit would be.
                let need = units.max(1);
                if u64::from(b.total) + u64::from(need) <= u64::from(rate.count) {
                    let slot = (b.newest % RING as u64) as usize;
                    b.counts[slot] += units;
                    b.total += units;
                    Verdict::Pass {
                        remaining: rate.count.saturating_sub(b.total),
                        reset: b.newest.saturating_add(RING as u64).saturating_mul(w),
                    }
                } else {
                    let keep = rate.count.saturating_sub(need);
                    Verdict::Refuse {
                        until: b.time_to(keep, w).max(now),
                    }
                }
            }
            Self::Gcra { tat } => {
                let interval = rate.interval;
                let tolerance = interval.saturating_mul(u64::from(rate.burst - 1));
                let base = (*tat).max(now);
                // The last of its units must fit in the burst's tolerance.
                let last = interval.saturating_mul(u64::from(units.max(1) - 1));
                let admit_at = base.saturating_add(last).saturating_sub(tolerance);
                if admit_at > now {
                    return Verdict::Refuse { until: admit_at };
                }
                *tat = base.saturating_add(interval.saturating_mul(u64::from(units)));
                let room = now.saturating_add(tolerance).saturating_sub(*tat);
                let remaining = if *tat > now.saturating_add(tolerance) {
                    0
                } else {
                    (room / interval.max(1)).saturating_add(1)
                };
                Verdict::Pass {
                    remaining: u32::try_from(remaining).unwrap_or(u32::MAX).min(rate.burst),
                    reset: *tat,
                }
            }
        }
    }

    /// Takes back `units` that [`KeyState::hit`] counted at the same `now` (another quota of
    /// the route refused the request).
    pub(super) fn unhit(&mut self, rate: &Rate, units: u32) {
        match self {
            Self::Window(b) => {
                let slot = (b.newest % RING as u64) as usize;
                let units = units.min(b.counts[slot]);
                b.counts[slot] -= units;
                b.total -= units;
            }
            Self::Gcra { tat } => {
                *tat = tat.saturating_sub(rate.interval.saturating_mul(u64::from(units)));
            }
        }
    }

    /// A request counted at `at` for `taken` units turned out to cost `cost`: the difference
    /// is counted from `now` on (more), or given back where it was counted, if it still
    /// counts there (less).
    /// A cost counts as at most the quota's capacity (a garbage figure closes the quota for a
    /// period at most).
    pub(super) fn correct(&mut self, rate: &Rate, now: Nanos, at: Nanos, taken: u32, cost: u32) {
        let cost = cost.min(rate.capacity());
        match self {
            Self::Window(b) => {
                let w = width(rate);
                b.advance(now / w);
                let index = if cost > taken { b.newest } else { at / w };
                if index + BUCKETS < b.newest || index > b.newest {
                    return;
                }
                let slot = (index % RING as u64) as usize;
                if let Some(more) = cost.checked_sub(taken) {
                    b.counts[slot] = b.counts[slot].saturating_add(more);
                    b.total = b.total.saturating_add(more);
                } else {
                    let less = (taken - cost).min(b.counts[slot]);
                    b.counts[slot] -= less;
                    b.total -= less;
                }
            }
            Self::Gcra { tat } => {
                let step = |n: u32| rate.interval.saturating_mul(u64::from(n));
                *tat = match cost.checked_sub(taken) {
                    Some(more) => (*tat).max(now).saturating_add(step(more)),
                    None => tat.saturating_sub(step(taken - cost)),
                };
            }
        }
    }

    /// Adapts the state to a new rate, keeping what it has counted (in requests).
    pub(super) fn change_rate(&mut self, old: &Rate, new: &Rate, now: Nanos) {
        let was = self.summary(old, now);
        match (&mut *self, new.is_gcra()) {
            (Self::Window(b), false) if width(old) == width(new) => {
                // Same buckets: the new count applies to them as they are.
                let _ = b;
            }
            (Self::Gcra { tat }, true) if *tat > now => {
                // The bucket's level, in requests, drains at the new interval.
                *tat = now.saturating_add(scale(*tat - now, new.interval, old.interval));
            }
            (Self::Gcra { .. }, true) => {}
            // What was used becomes the bucket's level, draining at the new interval.
            (Self::Window(_), true) => {
                let level = new.interval.saturating_mul(u64::from(was.used));
                *self = Self::Gcra {
                    tat: now.saturating_add(level),
                };
            }
            _ => *self = Self::restored(new, was, now),
        }
    }

    /// What the client has counted now, when one of them stops counting (the time a refusal
    /// names) and when all of them have: all a forgotten client is remembered by.
    pub(super) fn summary(&mut self, rate: &Rate, now: Nanos) -> Summary {
        let used = self.used(rate, now);
        Summary {
            used,
            sooner: self.time_to(rate, used.saturating_sub(1), now),
            until: self.clear_at(rate, now),
        }
    }

    /// A client known to have counted what `was` says, counted no less and no shorter: one
    /// request until `was.sooner`, the others until `was.until`. A client told to come back at
    /// `sooner` is admitted then, whether it was forgotten meanwhile or not.
    pub(super) fn restored(rate: &Rate, was: Summary, now: Nanos) -> Self {
        if rate.is_gcra() {
            // A TAT is all GCRA keeps: the bucket drains as if it had never been forgotten.
            return Self::Gcra { tat: was.until };
        }
        let w = width(rate);
        let now_index = now / w;
        let mut buckets = Buckets::new(now_index);
        // The bucket whose count lasts until `at` or just after, and not in the future.
        let bucket = |at: Nanos| {
            let index = at
                .div_ceil(w)
                .saturating_sub(RING as u64)
                .clamp(now_index.saturating_sub(BUCKETS), now_index);
            (index % RING as u64) as usize
        };
        if was.used > 0 && was.until > now {
            buckets.counts[bucket(was.until)] = was.used - 1;
            buckets.total = was.used - 1;
            if was.sooner > now {
                buckets.counts[bucket(was.sooner.min(was.until))] += 1;
                buckets.total += 1;
            }
        }
        Self::Window(buckets)
    }
}

/// A client's count, in three numbers (see [`KeyState::summary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Summary {
    pub(super) used: u32,
    pub(super) sooner: Nanos,
    pub(super) until: Nanos,
}

/// The requests a client may have counted and still be forgotten: fewer than its quota.
pub(super) fn forgettable_below(rate: &Rate) -> u32 {
    let limit = if rate.is_gcra() {
        rate.burst
    } else {
        rate.count
    };
    limit.saturating_sub(1)
}
