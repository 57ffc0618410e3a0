//! The layer's random numbers: for jitter and idempotency keys.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of random numbers: std's randomly keyed hasher over a counter. A clone starts
/// with fresh keys.
pub(crate) struct Random {
    keys: RandomState,
    counter: AtomicU64,
}

impl Random {
    pub(crate) fn new() -> Self {
        Self {
            keys: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }

    pub(crate) fn next(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.keys.hash_one(n)
    }
}

impl Clone for Random {
    fn clone(&self) -> Self {
        Self::new()
    }
}
