//! The shadow table: what a server-mode key table remembers of the clients it forgot, so
//! that one coming back is restored (see the [module docs](super)).

use super::count::{KeyState, Summary};
use super::KeyTable;
use crate::clock::Nanos;
use crate::quota::Rate;

/// A key's fingerprint in the shadow table: bits its cells are not chosen by.
fn fingerprint(key: u64) -> u32 {
    (key >> 32) as u32
}

/// Cells per shadow bucket: a forgotten client goes to any cell of its two buckets.
const CELLS: usize = 4;

/// What the shadow table remembers of one forgotten client: its fingerprint and its
/// [`Summary`], laid out flat so that a cell is 24 bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Shadow {
    /// The client's key, in 32 bits.
    pub(super) fingerprint: u32,
    pub(super) used: u32,
    pub(super) sooner: Nanos,
    /// The cell is free from then on.
    pub(super) until: Nanos,
    #[cfg(test)]
    pub(super) key: u64,
}

impl Shadow {
    pub(super) fn was(&self) -> Summary {
        Summary {
            used: self.used,
            sooner: self.sooner,
            until: self.until,
        }
    }

    pub(super) fn remember(&mut self, was: Summary) {
        self.used = was.used;
        self.sooner = was.sooner;
        self.until = was.until;
    }
}

impl KeyTable {
    pub(super) fn forget(&mut self, index: usize, used: u32, rate: &Rate, now: Nanos) {
        let Some((key, mut state)) = self.keys.swap_remove_index(index) else {
            return;
        };
        self.forgotten += 1;
        if used == 0 {
            return;
        }
        let was = state.summary(rate, now);
        if self.shadow.is_empty() {
            let cells = self.capacity.next_power_of_two().max(64);
            self.shadow = vec![Shadow::default(); cells].into_boxed_slice();
        }
        let mut ghost = Shadow {
            fingerprint: fingerprint(key),
            #[cfg(test)]
            key,
            ..Shadow::default()
        };
        ghost.remember(was);
        // Its own cell, else a free one, else the lightest if it counted fewer requests: a
        // count is never dropped for one that is not heavier.
        let mut own = None;
        let mut free = None;
        let mut lightest: Option<usize> = None;
        for index in self.cells(key) {
            let cell = &self.shadow[index];
            if cell.until <= now {
                free = free.or(Some(index));
            } else if cell.fingerprint == ghost.fingerprint {
                own = Some(index);
                break;
            } else if lightest.is_none_or(|l| {
                (cell.used, cell.until) < (self.shadow[l].used, self.shadow[l].until)
            }) {
                lightest = Some(index);
            }
        }
        let chosen = own
            .or(free)
            .or(lightest.filter(|&l| self.shadow[l].used < ghost.used));
        #[cfg(test)]
        match chosen {
            Some(s) if s != own.unwrap_or(usize::MAX) && self.shadow[s].until > now => {
                self.lost.push((self.shadow[s].key, self.shadow[s].used))
            }
            None => self.lost.push((key, ghost.used)),
            _ => {}
        }
        if let Some(index) = chosen {
            self.shadow[index] = ghost;
        }
    }

    /// A new client's state: fresh, or what the shadow remembers of it (rounded up).
    pub(super) fn restore(&mut self, key: u64, rate: &Rate, now: Nanos) -> KeyState {
        if !self.shadow.is_empty() {
            let fingerprint = fingerprint(key);
            for index in self.cells(key) {
                let ghost = self.shadow[index];
                if ghost.until > now && ghost.fingerprint == fingerprint {
                    // The cell stays its own while its count matters: forgotten again, it
                    // finds it there, whatever filled the shadow meanwhile.
                    return KeyState::restored(rate, ghost.was(), now);
                }
            }
        }
        KeyState::new(rate, now)
    }

    /// A key's two buckets, from bits of it that choose neither its shard (the lowest four)
    /// nor its fingerprint (the highest 32, for shadows of up to 65,536 buckets).
    pub(super) fn buckets(&self, key: u64) -> [usize; 2] {
        let mask = (self.shadow.len() / CELLS) as u64 - 1;
        [((key >> 4) & mask) as usize, ((key >> 20) & mask) as usize]
    }

    /// The cells of a key's two buckets.
    fn cells(&self, key: u64) -> [usize; 2 * CELLS] {
        let [a, b] = self.buckets(key);
        std::array::from_fn(|i| {
            if i < CELLS {
                a * CELLS + i
            } else {
                b * CELLS + i - CELLS
            }
        })
    }
}
