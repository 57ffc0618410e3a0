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
//! quota (its next request would pass); else of a client known to be below its quota: the
//! last full scan keeps the `capacity / 16` clients that drop below soonest as candidates,
//! newcomers join them, and a new scan runs only once a client outside them may have dropped
//! below (so a flood costs a few clients looked at per fresh key, never a scan per key); else
//! (every client is at its quota) of the sampled client whose count clears first.
//!
//! A forgotten client goes to a fixed-size shadow table, as many slots as the table holds
//! clients (rounded up to a power of two), under a 32-bit fingerprint of its key in any slot
//! of two buckets of four: its requests counted, when one of them stops counting and when the
//! last does. It is restored from there, rounded up, if it comes back while the count still
//! matters, and a client told to come back at a time is admitted then, forgotten meanwhile or
//! not; it keeps its slot while that count matters, so that forgotten again it finds it
//! there. When all eight slots hold counts that still matter, the shadow keeps the heavier: a
//! count is dropped only for one of more requests, never for an equal one. So:
//!
//! - a newcomer is always admitted, whatever the flood sends per key, and it starts with
//!   nothing counted unless the shadow remembers it: it never inherits another client's count;
//! - while any tracked client is below its quota, no client at its quota is forgotten, and a
//!   forgotten client's count is never dropped for a lighter or equal one, so no flood of
//!   fresh keys that leaves a client below its quota can let a client at its quota through;
//! - a forgotten client that comes back is restored unless it found all eight of its slots
//!   taken by heavier counts, or by at least as heavy ones when it was forgotten. Only then
//!   does it start afresh, and it can exceed its quota in that window by what it had counted
//!   (at most its quota, and usually far less: the least-used client goes first). For a
//!   client at its quota, that takes a flood that sends each fresh key its whole quota (quota-1
//!   limits make that one request a key) and fills the shadow, about as many such keys as the
//!   table holds, with counts still live, before the flood sampled the client to forget it.
//!   Refusing newcomers instead would hand such a flood every new client.

use indexmap::IndexMap;
use std::collections::{BinaryHeap, VecDeque};
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
    fn summary(&mut self, rate: &Rate, now: Nanos) -> Summary {
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
    fn restored(rate: &Rate, was: Summary, now: Nanos) -> Self {
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
struct Summary {
    used: u32,
    sooner: Nanos,
    until: Nanos,
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

/// Slots per shadow bucket: a forgotten client goes to any slot of its two buckets.
const SLOTS: usize = 4;

/// What the shadow table remembers of one forgotten client: its fingerprint and its
/// [`Summary`], laid out flat so that a cell is 24 bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Shadow {
    /// The client's key, in 32 bits.
    fingerprint: u32,
    used: u32,
    sooner: Nanos,
    /// The slot is free from then on.
    until: Nanos,
    #[cfg(test)]
    key: u64,
}

/// The clients of one route (or one shard of it): a table of at most `capacity` limits.
#[derive(Debug)]
pub(crate) struct KeyTable {
    keys: IndexMap<u64, KeyState, BuildHasherDefault<KeyHasher>>,
    capacity: usize,
    /// Forgotten clients, in buckets of [`SLOTS`]; made when the table first forgets one.
    shadow: Box<[Shadow]>,
    /// Clients that may be below their quota from the time beside them, the soonest at the
    /// back: those the last full scan found soonest, then the newcomers since.
    candidates: VecDeque<(Nanos, u64)>,
    /// No tracked client but the candidates drops below its quota before this time.
    forgettable_at: Nanos,
    random: u64,
    /// Keys whose forgotten count was dropped from the shadow, and that count, in order
    /// (tests).
    #[cfg(test)]
    lost: Vec<(u64, u32)>,
    /// Clients looked at by full scans (tests).
    #[cfg(test)]
    scanned: usize,
}

impl Shadow {
    fn was(&self) -> Summary {
        Summary {
            used: self.used,
            sooner: self.sooner,
            until: self.until,
        }
    }

    fn remember(&mut self, was: Summary) {
        self.used = was.used;
        self.sooner = was.sooner;
        self.until = was.until;
    }
}

impl KeyTable {
    pub(crate) fn new(capacity: usize) -> Self {
        let seed = RandomState::new().hash_one(capacity);
        Self {
            keys: IndexMap::default(),
            capacity: capacity.max(1),
            shadow: Box::default(),
            candidates: VecDeque::new(),
            forgettable_at: 0,
            random: seed | 1,
            #[cfg(test)]
            lost: Vec::new(),
            #[cfg(test)]
            scanned: 0,
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
        // A new client may drop below its quota before any tracked one.
        let at = state.time_to(rate, forgettable_below(rate), now);
        self.note(at, key, now);
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
        // The forgotten ones too, so that each comes back as it would have been.
        for ghost in self.shadow.iter_mut().filter(|ghost| ghost.until > now) {
            let mut state = KeyState::restored(old, ghost.was(), now);
            state.change_rate(old, new, now);
            ghost.remember(state.summary(new, now));
        }
        self.candidates.clear();
        self.forgettable_at = 0;
    }

    /// Notes that client `key` is below its quota from `at` on.
    fn note(&mut self, at: Nanos, key: u64, now: Nanos) {
        if at >= self.forgettable_at {
            return;
        }
        if at > now {
            self.forgettable_at = at;
            return;
        }
        self.reserve_candidates();
        if self.candidates.len() >= self.candidate_room() {
            // The candidate of the latest time goes, and the bound with it.
            if let Some((at, _)) = self.candidates.pop_front() {
                self.forgettable_at = self.forgettable_at.min(at);
            }
        }
        self.candidates.push_back((now, key));
    }

    /// Makes room for all the candidates at once, so that the table's memory does not move
    /// once it is full.
    fn reserve_candidates(&mut self) {
        if self.candidates.capacity() == 0 {
            self.candidates.reserve_exact(self.candidate_room());
        }
    }

    /// How many candidates a scan keeps: enough that a scan's cost, spread over the newcomers
    /// that use them, is a few clients looked at per newcomer.
    fn candidate_room(&self) -> usize {
        (self.capacity / SAMPLES).max(SAMPLES).min(self.capacity)
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
    /// random if it is below its quota; failing that, a candidate below its quota (from the
    /// last full scan, or a newcomer since), scanning again if a client outside them may have
    /// dropped below; failing that (every client is at its quota), the sampled client whose
    /// count clears first.
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
        if self.forget_candidate(below, rate, now) {
            return;
        }
        if now >= self.forgettable_at {
            self.scan(below, rate, now);
            if self.forget_candidate(below, rate, now) {
                return;
            }
            tracing::debug!(
                tracked = self.keys.len(),
                "key table full of clients at their quota: the one that clears first is shadowed"
            );
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

    /// Forgets the soonest candidate that is below its quota now, if any.
    fn forget_candidate(&mut self, below: u32, rate: &Rate, now: Nanos) -> bool {
        while let Some(&(at, key)) = self.candidates.back() {
            if at > now {
                // The candidates are in order of time, but for newcomers, noted at `now`.
                return false;
            }
            self.candidates.pop_back();
            let Some((index, _, state)) = self.keys.get_full_mut(&key) else {
                continue;
            };
            let used = state.used(rate, now);
            if used <= below {
                self.forget(index, used, rate, now);
                return true;
            }
            // It has counted more since it was noted.
            let at = state.time_to(rate, below, now);
            self.forgettable_at = self.forgettable_at.min(at);
        }
        false
    }

    /// Looks at every client and keeps as candidates those that drop below their quota
    /// soonest (the least-used first among those already below); the others do so no sooner
    /// than `forgettable_at`. Runs only when a client outside the candidates may have dropped
    /// below its quota, so its cost is spread over the candidates it finds.
    #[cold]
    fn scan(&mut self, below: u32, rate: &Rate, now: Nanos) {
        let room = self.candidate_room();
        let mut soonest = BinaryHeap::with_capacity(room + 1);
        let mut next = Nanos::MAX;
        for (&key, state) in self.keys.iter_mut() {
            let used = state.used(rate, now);
            soonest.push((state.time_to(rate, below, now), used, key));
            if soonest.len() > room {
                if let Some((at, _, _)) = soonest.pop() {
                    next = next.min(at);
                }
            }
        }
        #[cfg(test)]
        {
            self.scanned += self.keys.len();
        }
        self.forgettable_at = next;
        self.reserve_candidates();
        self.candidates.clear();
        let sorted = soonest.into_sorted_vec();
        self.candidates
            .extend(sorted.into_iter().rev().map(|(at, _, key)| (at, key)));
    }

    fn forget(&mut self, index: usize, used: u32, rate: &Rate, now: Nanos) {
        let Some((key, mut state)) = self.keys.swap_remove_index(index) else {
            return;
        };
        if used == 0 {
            return;
        }
        let was = state.summary(rate, now);
        if self.shadow.is_empty() {
            let slots = self.capacity.next_power_of_two().max(64);
            self.shadow = vec![Shadow::default(); slots].into_boxed_slice();
        }
        let mut ghost = Shadow {
            fingerprint: fingerprint(key),
            #[cfg(test)]
            key,
            ..Shadow::default()
        };
        ghost.remember(was);
        // Its own slot, else a free one, else the lightest if it counted fewer requests: a
        // count is never dropped for one that is not heavier.
        let mut own = None;
        let mut free = None;
        let mut lightest: Option<usize> = None;
        for slot in self.slots(key) {
            let cell = &self.shadow[slot];
            if cell.until <= now {
                free = free.or(Some(slot));
            } else if cell.fingerprint == ghost.fingerprint {
                own = Some(slot);
                break;
            } else if lightest.is_none_or(|l| {
                (cell.used, cell.until) < (self.shadow[l].used, self.shadow[l].until)
            }) {
                lightest = Some(slot);
            }
        }
        let slot = own
            .or(free)
            .or(lightest.filter(|&l| self.shadow[l].used < ghost.used));
        #[cfg(test)]
        match slot {
            Some(s) if s != own.unwrap_or(usize::MAX) && self.shadow[s].until > now => {
                self.lost.push((self.shadow[s].key, self.shadow[s].used))
            }
            None => self.lost.push((key, ghost.used)),
            _ => {}
        }
        if let Some(slot) = slot {
            self.shadow[slot] = ghost;
        }
    }

    /// A new client's state: fresh, or what the shadow remembers of it (rounded up).
    fn restore(&mut self, key: u64, rate: &Rate, now: Nanos) -> KeyState {
        if !self.shadow.is_empty() {
            let fingerprint = fingerprint(key);
            for slot in self.slots(key) {
                let ghost = self.shadow[slot];
                if ghost.until > now && ghost.fingerprint == fingerprint {
                    // The slot stays its own while its count matters: forgotten again, it
                    // finds it there, whatever filled the shadow meanwhile.
                    return KeyState::restored(rate, ghost.was(), now);
                }
            }
        }
        KeyState::new(rate, now)
    }

    /// A key's two buckets, from bits of it that choose neither its shard (the lowest four)
    /// nor its fingerprint (the highest 32, for shadows of up to 65,536 buckets).
    fn buckets(&self, key: u64) -> [usize; 2] {
        let mask = (self.shadow.len() / SLOTS) as u64 - 1;
        [((key >> 4) & mask) as usize, ((key >> 20) & mask) as usize]
    }

    /// The slots of a key's two buckets.
    fn slots(&self, key: u64) -> [usize; 2 * SLOTS] {
        let [a, b] = self.buckets(key);
        std::array::from_fn(|i| {
            if i < SLOTS {
                a * SLOTS + i
            } else {
                b * SLOTS + i - SLOTS
            }
        })
    }
}

#[cfg(test)]
mod tests;
