//! Server mode's state: what each client key holds (its creates in flight, its jobs, the
//! creates whose outcome is unknown), in tables of bounded size, sharded so that different
//! clients rarely contend for one lock. No HTTP in here.
//!
//! A key's entry lives only while it holds something: the last slot given back removes it,
//! so the tables hold the clients with work running, not every client ever seen. Per key, the
//! jobs and unknown outcomes are at most its plan (a create past it is refused before it
//! holds anything), and at most [`EARLY`] early completions are remembered.
//!
//! A new key at a full table takes the place of one of [`SAMPLES`] sampled entries, the one
//! that holds least (unknown outcomes weigh least, creates in flight most): newcomers are
//! never refused room. The price, with bounded memory against an unbounded supply of keys: a
//! forgotten client starts afresh, and may exceed its plan by what it held. Entries hold
//! something only for creates the application answered (or that were cut off mid-flight), so
//! a flood of fresh keys refused before the application (401s from an authentication layer
//! in front) never holds a place.

use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use indexmap::IndexMap;

use crate::clock::Nanos;
use crate::lock::lock;

/// Shards of the key tables.
pub(crate) const SHARDS: usize = 16;
/// Entries sampled to find one to forget at a full table.
const SAMPLES: usize = 16;
/// Early completions (ids completed before a create's body showed them) remembered per key.
pub(crate) const EARLY: usize = 8;
/// The longest job id kept; a longer one is read as no id (an unknown outcome).
pub(crate) const MAX_ID: usize = 256;

/// What one client key holds.
#[derive(Debug, Default)]
pub(crate) struct Holding {
    /// Creates sent to the application and not yet answered (or whose body is being read).
    pub(crate) in_flight: u32,
    /// Jobs, each with the time its lease ends.
    pub(crate) jobs: Vec<(Box<str>, Nanos)>,
    /// Creates whose outcome is unknown, each held until its lease ends.
    pub(crate) unknown: Vec<Nanos>,
    /// Ids completed while a create was in flight, before any body showed them.
    pub(crate) early: Vec<Box<str>>,
}

impl Holding {
    /// Slots held.
    pub(crate) fn held(&self) -> usize {
        self.in_flight as usize + self.jobs.len() + self.unknown.len()
    }

    fn is_empty(&self) -> bool {
        self.held() == 0 && self.early.is_empty()
    }

    /// Drops the holds whose lease ended by `now`; how many.
    fn expire(&mut self, now: Nanos) -> usize {
        let before = self.jobs.len() + self.unknown.len();
        self.jobs.retain(|(_, until)| *until > now);
        self.unknown.retain(|until| *until > now);
        before - self.jobs.len() - self.unknown.len()
    }

    /// What forgetting it would lose: creates in flight most, unknown outcomes least.
    fn weight(&self) -> usize {
        self.in_flight as usize * 1_000_000 + self.jobs.len() * 1_000 + self.unknown.len()
    }
}

/// How a create's slot ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing was made (a 4xx): given back.
    Failed,
    /// Unknown (a 5xx, an error, a body without an id or cut off): held until its lease.
    Unknown,
}

/// What binding a job id to a create's slot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// The job holds the slot.
    Held,
    /// It was completed already (early, or terminal in the create's answer): given back.
    Ended,
    /// The key's entry was forgotten meanwhile: nothing held.
    Forgotten,
}

#[derive(Debug)]
struct Shard {
    keys: IndexMap<u64, Holding>,
    capacity: usize,
    random: u64,
}

/// Every client key's holdings.
#[derive(Debug)]
pub(crate) struct KeyedSlots {
    shards: Box<[Mutex<Shard>]>,
    lease: Nanos,
}

/// The verdict on a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// A slot was taken; `forgot` another key to make room.
    Yes { forgot: bool },
    /// The key holds `held` slots of `limit`.
    Full { held: usize },
}

impl KeyedSlots {
    /// Tables of at most `max_keys` keys in all; holds live at most `lease`.
    pub(crate) fn new(max_keys: usize, lease: Nanos) -> Self {
        let capacity = max_keys.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|i| {
                Mutex::new(Shard {
                    keys: IndexMap::new(),
                    capacity,
                    random: RandomState::new().hash_one(i) | 1,
                })
            })
            .collect();
        Self { shards, lease }
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key as usize) % SHARDS]
    }

    /// Takes a slot for a create of `key`, whose plan allows `limit`, at `now`.
    pub(crate) fn take(&self, key: u64, limit: usize, now: Nanos) -> Taken {
        let mut shard = lock(self.shard(key));
        if let Some(holding) = shard.keys.get_mut(&key) {
            holding.expire(now);
            if holding.held() >= limit {
                return Taken::Full {
                    held: holding.held(),
                };
            }
            holding.in_flight += 1;
            return Taken::Yes { forgot: false };
        }
        if limit == 0 {
            return Taken::Full { held: 0 };
        }
        let forgot = shard.keys.len() >= shard.capacity;
        if forgot {
            shard.forget_one(now);
        }
        let holding = Holding {
            in_flight: 1,
            ..Holding::default()
        };
        shard.keys.insert(key, holding);
        Taken::Yes { forgot }
    }

    /// A create of `key` in flight ended without a job id: given back or held as unknown.
    pub(crate) fn settle(&self, key: u64, outcome: Outcome, now: Nanos) {
        let lease = now.saturating_add(self.lease);
        self.update(key, |holding| {
            holding.in_flight = holding.in_flight.saturating_sub(1);
            if outcome == Outcome::Unknown {
                holding.unknown.push(lease);
            }
        });
    }

    /// A create of `key` in flight made job `id`, `ended` if its answer showed it terminal.
    pub(crate) fn bind(&self, key: u64, id: &str, ended: bool, now: Nanos) -> Bound {
        let lease = now.saturating_add(self.lease);
        let mut bound = Bound::Forgotten;
        self.update(key, |holding| {
            holding.in_flight = holding.in_flight.saturating_sub(1);
            if let Some(at) = holding.early.iter().position(|e| **e == *id) {
                holding.early.remove(at);
                bound = Bound::Ended;
            } else if ended {
                bound = Bound::Ended;
            } else if let Some(job) = holding.jobs.iter_mut().find(|(j, _)| **j == *id) {
                // The same job again (a replayed create): one slot, its lease renewed.
                job.1 = lease;
                bound = Bound::Ended;
            } else {
                holding.jobs.push((id.into(), lease));
                bound = Bound::Held;
            }
        });
        bound
    }

    /// Job `id` of `key` ended. True when it held a slot; else, while the key has a create
    /// in flight, the id is remembered (the last [`EARLY`]) in case its body shows it later.
    pub(crate) fn end(&self, key: u64, id: &str, remember: bool) -> bool {
        let mut ended = false;
        self.update(key, |holding| {
            if let Some(at) = holding.jobs.iter().position(|(j, _)| **j == *id) {
                holding.jobs.swap_remove(at);
                ended = true;
            } else if remember && holding.in_flight > 0 && id.len() <= MAX_ID {
                if holding.early.iter().any(|e| **e == *id) {
                    return;
                }
                if holding.early.len() >= EARLY {
                    holding.early.remove(0);
                }
                holding.early.push(id.into());
            }
        });
        ended
    }

    /// `key`'s jobs not in `active` are given back, and so are its unknown outcomes: the
    /// application's own list, requested at `listed`, says what runs. What was taken after
    /// `listed` is left alone (the list may not show it yet), and so are its creates in
    /// flight. How many were given back.
    pub(crate) fn reconcile(&self, key: u64, active: &[&str], listed: Nanos) -> usize {
        let mut freed = 0;
        // A hold's lease began when it was taken (or renewed, later: kept the more).
        let lease = self.lease;
        let newer = move |until: Nanos| until.saturating_sub(lease) > listed;
        self.update(key, |holding| {
            let before = holding.jobs.len() + holding.unknown.len();
            holding
                .jobs
                .retain(|(id, until)| active.contains(&&**id) || newer(*until));
            holding.unknown.retain(|until| newer(*until));
            freed = before - holding.jobs.len() - holding.unknown.len();
        });
        freed
    }

    /// How long a hold lives at most.
    #[cfg(feature = "redis")]
    pub(crate) fn lease(&self) -> Nanos {
        self.lease
    }

    /// Slots `key` holds at `now`.
    pub(crate) fn held(&self, key: u64, now: Nanos) -> usize {
        let mut shard = lock(self.shard(key));
        let Some(holding) = shard.keys.get_mut(&key) else {
            return 0;
        };
        holding.expire(now);
        holding.held()
    }

    /// Whether `key` holds job `id`.
    pub(crate) fn holds(&self, key: u64, id: &str) -> bool {
        let shard = lock(self.shard(key));
        shard
            .keys
            .get(&key)
            .is_some_and(|h| h.jobs.iter().any(|(j, _)| **j == *id))
    }

    /// Keys holding something now.
    pub(crate) fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).keys.len()).sum()
    }

    /// Changes `key`'s entry, if it has one, and removes it once it holds nothing.
    fn update(&self, key: u64, change: impl FnOnce(&mut Holding)) {
        let mut shard = lock(self.shard(key));
        let Some(holding) = shard.keys.get_mut(&key) else {
            return;
        };
        change(holding);
        if holding.is_empty() {
            shard.keys.swap_remove(&key);
        }
    }
}

impl Shard {
    /// Forgets the entry that holds least among a few sampled (expired holds dropped first).
    fn forget_one(&mut self, now: Nanos) {
        let len = self.keys.len();
        if len == 0 {
            return;
        }
        let mut best: Option<(usize, usize)> = None;
        for _ in 0..SAMPLES.min(len) {
            // xorshift: cheap, and seeded per shard at random.
            self.random ^= self.random << 13;
            self.random ^= self.random >> 7;
            self.random ^= self.random << 17;
            let index = (self.random % len as u64) as usize;
            let Some((_, holding)) = self.keys.get_index_mut(index) else {
                continue;
            };
            holding.expire(now);
            let weight = if holding.is_empty() {
                0
            } else {
                holding.weight()
            };
            if best.is_none_or(|(w, _)| weight < w) {
                best = Some((weight, index));
            }
        }
        if let Some((_, index)) = best {
            self.keys.swap_remove_index(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Nanos = 3_600_000_000_000;

    #[test]
    fn a_key_holds_at_most_its_plan_and_gives_back_what_ends() {
        let slots = KeyedSlots::new(64, HOUR);
        for _ in 0..3 {
            assert_eq!(slots.take(7, 3, 0), Taken::Yes { forgot: false });
        }
        assert_eq!(slots.take(7, 3, 0), Taken::Full { held: 3 });
        assert_eq!(slots.bind(7, "a", false, 0), Bound::Held);
        slots.settle(7, Outcome::Failed, 0);
        slots.settle(7, Outcome::Unknown, 0);
        assert_eq!(slots.held(7, 0), 2);
        // Twice, an unknown id, another key's job: nothing more given back.
        assert!(slots.end(7, "a", true));
        assert!(!slots.end(7, "a", true));
        assert!(!slots.end(7, "zzz", true));
        assert!(!slots.end(8, "a", true));
        assert_eq!(slots.held(7, 0), 1);
        // The unknown outcome's lease runs out.
        assert_eq!(slots.held(7, HOUR), 0);
        assert_eq!(slots.tracked(), 1);
        assert_eq!(slots.take(7, 1, HOUR), Taken::Yes { forgot: false });
        slots.settle(7, Outcome::Failed, HOUR);
        assert_eq!(slots.tracked(), 0);
    }

    #[test]
    fn a_completion_before_the_body_is_remembered_while_a_create_is_in_flight() {
        let slots = KeyedSlots::new(64, HOUR);
        assert!(!slots.end(1, "early", true)); // nothing in flight: not remembered
        slots.take(1, 3, 0);
        assert!(!slots.end(1, "early", true));
        assert_eq!(slots.bind(1, "early", false, 0), Bound::Ended);
        assert_eq!(slots.held(1, 0), 0);
        slots.take(1, 3, 0);
        for i in 0..100 {
            slots.end(1, &format!("id-{i}"), true);
        }
        let shard = lock(slots.shard(1));
        assert_eq!(shard.keys[&1].early.len(), EARLY);
    }

    #[test]
    fn a_full_table_forgets_the_lightest_and_never_refuses_a_newcomer() {
        let slots = KeyedSlots::new(16, HOUR); // one entry a shard
        let key = |i: u64| i * SHARDS as u64; // all in shard 0
        slots.take(key(1), 3, 0);
        slots.bind(key(1), "job", false, 0);
        for i in 2..1_000 {
            assert!(matches!(slots.take(key(i), 3, 0), Taken::Yes { .. }));
            slots.settle(key(i), Outcome::Unknown, 0);
        }
        assert_eq!(slots.tracked(), 1);
    }
}
