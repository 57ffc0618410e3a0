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
//! A forgotten client goes to a fixed-size shadow table, as many cells as the table holds
//! clients (rounded up to a power of two), under a 32-bit fingerprint of its key in any cell
//! of two buckets of four: its requests counted, when one of them stops counting and when the
//! last does. It is restored from there, rounded up, if it comes back while the count still
//! matters, and a client told to come back at a time is admitted then, forgotten meanwhile or
//! not; it keeps its cell while that count matters, so that forgotten again it finds it
//! there. When all eight cells hold counts that still matter, the shadow keeps the heavier: a
//! count is dropped only for one of more requests, never for an equal one. So:
//!
//! - a newcomer is always admitted, whatever the flood sends per key, and it starts with
//!   nothing counted unless the shadow remembers it: it never inherits another client's count;
//! - while any tracked client is below its quota, no client at its quota is forgotten, and a
//!   forgotten client's count is never dropped for a lighter or equal one, so no flood of
//!   fresh keys that leaves a client below its quota can let a client at its quota through;
//! - a forgotten client that comes back is restored unless it found all eight of its cells
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

use self::count::forgettable_below;
pub(crate) use self::count::{KeyState, Verdict};
use self::shadow::Shadow;

/// Clients sampled to find one to forget.
const SAMPLES: usize = 16;

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

/// The clients of one route (or one shard of it): a table of at most `capacity` limits.
#[derive(Debug)]
pub(crate) struct KeyTable {
    keys: IndexMap<u64, KeyState, BuildHasherDefault<KeyHasher>>,
    capacity: usize,
    /// Forgotten clients, in buckets of [`CELLS`]; made when the table first forgets one.
    shadow: Box<[Shadow]>,
    /// Clients that may be below their quota from the time beside them, the soonest at the
    /// back: those the last full scan found soonest, then the newcomers since.
    candidates: VecDeque<(Nanos, u64)>,
    /// No tracked client but the candidates drops below its quota before this time.
    forgettable_at: Nanos,
    random: u64,
    /// Clients forgotten to make room, since the table was made.
    forgotten: u64,
    /// Keys whose forgotten count was dropped from the shadow, and that count, in order
    /// (tests).
    #[cfg(test)]
    lost: Vec<(u64, u32)>,
    /// Clients looked at by full scans (tests).
    #[cfg(test)]
    scanned: usize,
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
            forgotten: 0,
            #[cfg(test)]
            lost: Vec::new(),
            #[cfg(test)]
            scanned: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Clients forgotten to make room for newcomers, since the table was made.
    pub(crate) fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Counts a request of `units` of client `key` at `now`, or refuses it.
    pub(crate) fn hit(&mut self, key: u64, rate: &Rate, now: Nanos, units: u32) -> Verdict {
        if let Some(state) = self.keys.get_mut(&key) {
            return state.hit(rate, now, units);
        }
        if self.keys.len() >= self.capacity {
            self.make_room(rate, now);
        }
        let mut state = self.restore(key, rate, now);
        let verdict = state.hit(rate, now, units);
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

    /// Takes back the `units` counted for client `key` at the same time (another quota
    /// refused the request).
    pub(crate) fn unhit(&mut self, key: u64, rate: &Rate, units: u32) {
        if let Some(state) = self.keys.get_mut(&key) {
            state.unhit(rate, units);
        }
    }

    /// Client `key`'s request counted at `at` for `taken` units cost `cost`. A client
    /// forgotten since is tracked again (restored from the shadow, as a request would restore
    /// it) when the request cost more; what it cost less is not given back to a count that
    /// was rounded on the way (the shadow's), which is safe.
    pub(crate) fn correct(
        &mut self,
        key: u64,
        rate: &Rate,
        now: Nanos,
        at: Nanos,
        taken: u32,
        cost: u32,
    ) {
        if cost > taken && !self.keys.contains_key(&key) {
            // Tracked again, counting nothing more (whatever the verdict): then corrected.
            let _ = self.hit(key, rate, now, 0);
        }
        if let Some(state) = self.keys.get_mut(&key) {
            state.correct(rate, now, at, taken, cost);
        }
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
}

mod count;
mod shadow;
#[cfg(test)]
mod tests;
