//! Server mode's state: one small limit per client key, in a table of bounded size that a
//! flood of fresh keys can neither grow nor use to lock newcomers out. No HTTP in here.
//!
//! # One client's limit, in constant memory
//!
//! Client mode keeps one response time per place held (an exact sliding-window log), which
//! costs memory in proportion to the quota. A server tracks thousands of clients, so each
//! one's state here is a fixed 88 bytes whatever the quota:
//!
//! - **Sliding window** ([`Buckets`]): the period is cut into 16 buckets of `width =
//!   ⌈period / 16⌉`, and a request counts for the bucket it came in and the 16 after it. A
//!   request is admitted while fewer than `count` requests are counted. Any window of length
//!   `period` then holds at most `count` admitted requests: those before the last one in it
//!   are all within `period` of it, so all were counted when it was admitted. A request is
//!   counted for up to one bucket (`period / 16`) longer than an exact log would, so a client
//!   pacing itself evenly at 90 % of its quota is never refused (it has at most
//!   `0.9 × count × 17/16 < count` requests counted), and a client that used its whole quota
//!   at once comes back at most `period / 16` later than with an exact log.
//! - **GCRA** ([`KeyState::Gcra`]): a theoretical arrival time, as in client mode, with
//!   GCRA's own guarantee (at most `burst + L / interval` requests in any interval of
//!   length `L`).
//!
//! A refusal says exactly when the client will be admitted if it sends nothing else
//! meanwhile: the time its oldest counted buckets (or its TAT) free enough room.
//!
//! # A table of bounded size
//!
//! Each [`KeyTable`] holds at most `capacity` clients. A new client arriving at a full table
//! takes the place of the least-used of 16 clients sampled at random if that one is below its
//! quota (its next request would pass); else of the least-used of all, found by a full scan
//! at most once per time a client can have dropped below its quota; else (every client is at
//! its quota) of the sampled client whose count clears first. A forgotten client's count goes
//! to a fixed-size shadow table, under a 32-bit fingerprint of its key in one of two cells,
//! and is restored from there, rounded up, if it comes back while the count still matters.
//! When both cells are taken, the shadow keeps the heavier of the two counts (more requests,
//! then later to clear) and loses the lighter. So:
//!
//! - a newcomer is always admitted, whatever the flood sends per key, and it starts with
//!   nothing counted unless the shadow remembers it: it never inherits another client's count;
//! - while any tracked client is below its quota, no client at its quota is forgotten, and its
//!   count is never lost from the shadow for a lighter one, so no flood of fresh keys that
//!   leaves a client below its quota can let a client at its quota through;
//! - a forgotten client that comes back is restored unless both its shadow cells were taken
//!   meanwhile by clients forgotten with at least as many requests counted. Only then does it
//!   start afresh, and it can exceed its quota in that window by what it had counted when it
//!   was forgotten (at most its quota, and usually far less: the least-used client goes
//!   first). A flood that fills the table and the shadow with clients that each sent `u`
//!   requests makes this happen to the clients that had counted at most `u`; one that sends a
//!   request per key, to clients that had counted at most one; only a flood that sends every
//!   fresh key its whole quota (quota-1 limits make that one request a key) reaches clients
//!   at their quota. Refusing newcomers instead would hand such a flood every new client.

use indexmap::IndexMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use crate::clock::Nanos;
use crate::quota::Rate;

/// Buckets a sliding window's period is cut into.
const BUCKETS: u64 = 16;
/// Buckets a request is counted in: its own and the 16 after it.
const RING: usize = BUCKETS as usize + 1;
/// Clients sampled to find one to forget.
const SAMPLES: usize = 16;

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
    fn new(now_index: u64) -> Self {
        Self {
            newest: now_index,
            counts: [0; RING],
            total: 0,
        }
    }

    /// Moves the newest bucket up to `index`, dropping the buckets no longer counted.
    fn advance(&mut self, index: u64) {
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
    fn count(&self, index: u64) -> u32 {
        self.counts[(index % RING as u64) as usize]
    }

    /// The earliest time at which at most `keep` requests are counted.
    fn time_to(&self, keep: u32, width: Nanos) -> Nanos {
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
    fn new(rate: &Rate, now: Nanos) -> Self {
        if rate.is_gcra() {
            Self::Gcra { tat: 0 }
        } else {
            Self::Window(Buckets::new(now / width(rate)))
        }
    }

    /// What the client has counted now: requests (sliding window), or the bucket's level in
    /// requests, rounded up (GCRA).
    fn used(&mut self, rate: &Rate, now: Nanos) -> u32 {
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
    fn clear_at(&self, rate: &Rate, now: Nanos) -> Nanos {
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
    fn time_to(&self, rate: &Rate, keep: u32, now: Nanos) -> Nanos {
        match self {
            Self::Window(b) => b.time_to(keep, width(rate)).max(now),
            Self::Gcra { tat } => tat
                .saturating_sub(rate.interval.saturating_mul(u64::from(keep)))
                .max(now),
        }
    }

    /// Admits one request at `now`, or says when it could go.
    fn hit(&mut self, rate: &Rate, now: Nanos) -> Verdict {
        match self {
            Self::Window(b) => {
                let w = width(rate);
                b.advance(now / w);
                if b.total < rate.count {
                    let slot = (b.newest % RING as u64) as usize;
                    b.counts[slot] += 1;
                    b.total += 1;
                    Verdict::Pass {
                        remaining: rate.count - b.total,
                        reset: b.newest.saturating_add(RING as u64).saturating_mul(w),
                    }
                } else {
                    Verdict::Refuse {
                        until: b.time_to(rate.count - 1, w).max(now),
                    }
                }
            }
            Self::Gcra { tat } => {
                let interval = rate.interval;
                let tolerance = interval.saturating_mul(u64::from(rate.burst - 1));
                let base = (*tat).max(now);
                let admit_at = base.saturating_sub(tolerance);
                if admit_at > now {
                    return Verdict::Refuse { until: admit_at };
                }
                *tat = base.saturating_add(interval);
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

    /// Adapts the state to a new rate, keeping what it has counted (in requests).
    fn change_rate(&mut self, old: &Rate, new: &Rate, now: Nanos) {
        let used = self.used(old, now);
        let clear_at = self.clear_at(old, now);
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
            _ => *self = Self::restored(new, used, clear_at, now),
        }
    }

    /// A client known to have `used` requests counted until `until`, counted no less and no
    /// shorter.
    fn restored(rate: &Rate, used: u32, until: Nanos, now: Nanos) -> Self {
        if rate.is_gcra() {
            let level = now.saturating_add(rate.interval.saturating_mul(u64::from(used)));
            return Self::Gcra {
                tat: until.max(level),
            };
        }
        let w = width(rate);
        let now_index = now / w;
        let mut buckets = Buckets::new(now_index);
        if used > 0 && until > now {
            // The bucket whose count lasts until `until` or just after, and not in the future.
            let index = until
                .div_ceil(w)
                .saturating_sub(RING as u64)
                .clamp(now_index.saturating_sub(BUCKETS), now_index);
            buckets.counts[(index % RING as u64) as usize] = used;
            buckets.total = used;
        }
        Self::Window(buckets)
    }
}

/// The requests a client may have counted and still be forgotten: fewer than its quota.
fn forgettable_below(rate: &Rate) -> u32 {
    let limit = if rate.is_gcra() {
        rate.burst
    } else {
        rate.count
    };
    limit.saturating_sub(1)
}

/// A key's fingerprint in the shadow table: bits its cells are not chosen by.
fn fingerprint(key: u64) -> u32 {
    (key >> 32) as u32
}

/// Keys are already keyed hashes: hashing them again would be wasted work.
#[derive(Debug, Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What the shadow table remembers of one forgotten client.
#[derive(Debug, Clone, Copy, Default)]
struct Shadow {
    /// The client's key, in 32 bits.
    fingerprint: u32,
    /// Requests it had counted.
    used: u32,
    /// When they stop counting; the cell is empty from then on.
    until: Nanos,
    #[cfg(test)]
    key: u64,
}

/// The clients of one route (or one shard of it): a table of at most `capacity` limits.
#[derive(Debug)]
pub(crate) struct KeyTable {
    keys: IndexMap<u64, KeyState, BuildHasherDefault<KeyHasher>>,
    capacity: usize,
    /// Forgotten clients, in one of two cells per key; made when the table first forgets one.
    shadow: Box<[Shadow]>,
    /// No tracked client becomes forgettable before this time (from the last full scan).
    forgettable_at: Nanos,
    random: u64,
    /// Keys whose forgotten count was dropped from the shadow, and that count, in order
    /// (tests).
    #[cfg(test)]
    lost: Vec<(u64, u32)>,
}

impl KeyTable {
    pub(crate) fn new(capacity: usize) -> Self {
        let seed = RandomState::new().hash_one(capacity);
        Self {
            keys: IndexMap::default(),
            capacity: capacity.max(1),
            shadow: Box::default(),
            forgettable_at: 0,
            random: seed | 1,
            #[cfg(test)]
            lost: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Counts one request of client `key` at `now`, or refuses it.
    pub(crate) fn hit(&mut self, key: u64, rate: &Rate, now: Nanos) -> Verdict {
        if let Some(state) = self.keys.get_mut(&key) {
            return state.hit(rate, now);
        }
        if self.keys.len() >= self.capacity {
            self.make_room(rate, now);
        }
        let mut state = self.restore(key, rate, now);
        let verdict = state.hit(rate, now);
        // A new client may become forgettable before any tracked one.
        self.forgettable_at =
            self.forgettable_at
                .min(state.time_to(rate, forgettable_below(rate), now));
        let len = self.keys.len();
        if len == self.keys.capacity() {
            // Grown by hand, never past the table's size: the map's own growth would reserve
            // up to twice what it holds.
            let target = (len * 2).max(16).min(self.capacity).max(len + 1);
            self.keys.reserve_exact(target - len);
        }
        self.keys.insert(key, state);
        verdict
    }

    /// Adapts every client to a new rate.
    pub(crate) fn change_rate(&mut self, old: &Rate, new: &Rate, now: Nanos) {
        for state in self.keys.values_mut() {
            state.change_rate(old, new, now);
        }
        self.forgettable_at = 0;
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: cheap, and only picks which clients to look at.
        let mut x = self.random;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Forgets one client to make room for a new one: the least-used of a few sampled at
    /// random if it is below its quota; failing that, the least-used of them all (a full scan,
    /// at most once per time a client can have dropped below its quota); failing that (every
    /// client is at its quota), the sampled client whose count clears first.
    fn make_room(&mut self, rate: &Rate, now: Nanos) {
        let below = forgettable_below(rate);
        let len = self.keys.len() as u64;
        let mut least: Option<(usize, u32)> = None;
        let mut sampled = [0usize; SAMPLES];
        let samples = SAMPLES.min(self.keys.len());
        for slot in sampled.iter_mut().take(samples) {
            let index = (self.next_random() % len) as usize;
            *slot = index;
            let used = match self.keys.get_index_mut(index) {
                Some((_, state)) => state.used(rate, now),
                None => continue,
            };
            if least.is_none_or(|(_, fewest)| used < fewest) {
                least = Some((index, used));
                if used == 0 {
                    break;
                }
            }
        }
        if let Some((index, used)) = least.filter(|&(_, used)| used <= below) {
            self.forget(index, used, rate, now);
            return;
        }
        if now >= self.forgettable_at && self.scan(below, rate, now) {
            return;
        }
        // Every client is at its quota (quota-1 limits, or a flood that sends each fresh key
        // its whole quota): refusing the newcomer would lock every newcomer out until one
        // drops below, so the sampled client that clears first goes to the shadow, which
        // keeps its count for its return.
        let soonest = sampled[..samples]
            .iter()
            .filter_map(|&index| {
                let (_, state) = self.keys.get_index(index)?;
                Some((state.clear_at(rate, now), index))
            })
            .min();
        if let Some((_, index)) = soonest {
            let used = self
                .keys
                .get_index_mut(index)
                .map_or(0, |(_, state)| state.used(rate, now));
            self.forget(index, used, rate, now);
        }
    }

    /// Looks at every client: forgets the least-used if it is below its quota (true), and
    /// notes when the next one will be.
    #[cold]
    fn scan(&mut self, below: u32, rate: &Rate, now: Nanos) -> bool {
        let mut least: Option<(usize, u32)> = None;
        let mut first = Nanos::MAX;
        let mut second = Nanos::MAX;
        for (index, (_, state)) in self.keys.iter_mut().enumerate() {
            let used = state.used(rate, now);
            if used <= below && least.is_none_or(|(_, u)| used < u) {
                least = Some((index, used));
            }
            let at = state.time_to(rate, below, now);
            if at < first {
                second = first;
                first = at;
            } else if at < second {
                second = at;
            }
        }
        match least {
            Some((index, used)) => {
                // The next forgettable one is at `second` at the earliest (or now, if more
                // than one is forgettable: `second` is then `now` too).
                self.forgettable_at = second;
                self.forget(index, used, rate, now);
                true
            }
            None => {
                self.forgettable_at = first;
                tracing::debug!(
                    tracked = self.keys.len(),
                    "key table full of clients at their quota: the one that clears first is shadowed"
                );
                false
            }
        }
    }

    fn forget(&mut self, index: usize, used: u32, rate: &Rate, now: Nanos) {
        let Some((key, state)) = self.keys.swap_remove_index(index) else {
            return;
        };
        if used == 0 {
            return;
        }
        let until = state.clear_at(rate, now);
        if self.shadow.is_empty() {
            let cells = self.capacity.next_power_of_two().max(64);
            self.shadow = vec![Shadow::default(); cells].into_boxed_slice();
        }
        let ghost = Shadow {
            fingerprint: fingerprint(key),
            used,
            until,
            #[cfg(test)]
            key,
        };
        // Its own cell, else an empty one, else the lighter of the two if it is lighter still.
        let [a, b] = self.cells(key);
        let cell = [a, b]
            .into_iter()
            .find(|&c| {
                self.shadow[c].until > now && self.shadow[c].fingerprint == ghost.fingerprint
            })
            .or_else(|| [a, b].into_iter().find(|&c| self.shadow[c].until <= now))
            .or_else(|| {
                let lighter = |c: usize| (self.shadow[c].used, self.shadow[c].until);
                let c = if lighter(a) <= lighter(b) { a } else { b };
                (lighter(c) <= (used, until)).then_some(c)
            });
        #[cfg(test)]
        match cell {
            Some(c)
                if self.shadow[c].until > now
                    && self.shadow[c].fingerprint != ghost.fingerprint =>
            {
                self.lost.push((self.shadow[c].key, self.shadow[c].used))
            }
            None => self.lost.push((key, used)),
            _ => {}
        }
        if let Some(cell) = cell {
            self.shadow[cell] = ghost;
        }
    }

    /// A new client's state: fresh, or what the shadow remembers of it (rounded up).
    fn restore(&mut self, key: u64, rate: &Rate, now: Nanos) -> KeyState {
        if !self.shadow.is_empty() {
            let fingerprint = fingerprint(key);
            for cell in self.cells(key) {
                let ghost = self.shadow[cell];
                if ghost.until > now && ghost.fingerprint == fingerprint {
                    self.shadow[cell] = Shadow::default();
                    return KeyState::restored(rate, ghost.used, ghost.until, now);
                }
            }
        }
        KeyState::new(rate, now)
    }

    /// A key's two cells, from bits of it that choose neither its shard (the lowest four) nor
    /// its fingerprint (the highest 32, for tables of up to 65,536 cells).
    fn cells(&self, key: u64) -> [usize; 2] {
        let mask = self.shadow.len() as u64 - 1;
        [((key >> 4) & mask) as usize, ((key >> 20) & mask) as usize]
    }
}

#[cfg(test)]
mod tests;
