//! The fair FIFO queue both layers keep of the requests waiting for their turn (a route's
//! quota, a plan's slot): tickets in the order taken, each with the waker of the task that
//! holds it. No HTTP and no locking in here: each layer keeps one under its own lock.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// Polls a waiting request's timer for `at`: made the first time the request must sleep,
/// then moved in place. Ready once `at` has passed.
pub(crate) fn poll_timer(
    timer: &mut Option<Pin<Box<Sleep>>>,
    at: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = match timer {
        Some(sleep) => {
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            sleep
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(at))),
    };
    sleep.as_mut().poll(cx)
}

/// A request's place in a [`WaitQueue`]: where its entry is kept, and the number it drew
/// when it joined (which orders tickets first come first, and tells a reused entry from its
/// own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Ticket {
    seq: u64,
    entry: u32,
}

/// Requests waiting, first come first served: a list linked through a slab of entries, so
/// that joining, taking a turn, and leaving from anywhere in the queue (a caller that gives
/// up) each take constant time, however many wait. The slab grows to the most that have
/// waited at once and is emptied whenever the queue is.
#[derive(Debug, Default)]
pub(crate) struct WaitQueue {
    entries: Vec<Entry>,
    /// The first entry free for reuse, linked through `next`.
    free: Option<u32>,
    head: Option<u32>,
    tail: Option<u32>,
    len: usize,
    /// The number the next request to join draws.
    next_seq: u64,
}

#[derive(Debug)]
struct Entry {
    /// The number its request drew; `FREE` once the entry is free.
    seq: u64,
    /// The entries before and after it in the queue (`NONE` at either end); a free entry's
    /// `next` is the next free one.
    prev: u32,
    next: u32,
    waker: Option<Waker>,
}

const FREE: u64 = u64::MAX;
/// No entry (`u32`, rather than an `Option`, keeps an entry at 32 bytes).
const NONE: u32 = u32::MAX;

/// `at` as an `Option`.
fn some(at: u32) -> Option<u32> {
    (at != NONE).then_some(at)
}

impl WaitQueue {
    /// Joins the back of the queue: the new request's ticket.
    pub(crate) fn join(&mut self) -> Ticket {
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Entry {
            seq,
            prev: self.tail.unwrap_or(NONE),
            next: NONE,
            waker: None,
        };
        let at = match self.free {
            Some(at) => {
                let slot = &mut self.entries[at as usize];
                self.free = some(slot.next);
                *slot = entry;
                at
            }
            None => {
                // As many entries as requests waiting at once: no memory holds the
                // `u32::MAX` that would reach `NONE`.
                let at = u32::try_from(self.entries.len()).unwrap_or(NONE - 1);
                self.entries.push(entry);
                at
            }
        };
        match self.tail {
            Some(tail) => self.entries[tail as usize].next = at,
            None => self.head = Some(at),
        }
        self.tail = Some(at);
        self.len += 1;
        Ticket { seq, entry: at }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry of `ticket`, while it waits.
    fn entry(&self, ticket: Ticket) -> Option<&Entry> {
        self.entries
            .get(ticket.entry as usize)
            .filter(|e| e.seq == ticket.seq)
    }

    /// Whether `ticket` is at the head of the queue, its turn next.
    pub(crate) fn is_head(&self, ticket: Ticket) -> bool {
        self.head == Some(ticket.entry) && self.entry(ticket).is_some()
    }

    /// At least how many wait ahead of `ticket` (exact unless some behind the head have
    /// left from the middle of the queue; never more than the truth), or `None` if it does
    /// not wait.
    pub(crate) fn ahead(&self, ticket: Ticket) -> Option<usize> {
        self.entry(ticket)?;
        let first = self.entries[self.head? as usize].seq;
        let last = self.entries[self.tail? as usize].seq;
        // Of the numbers drawn from the head's to the last, `len` still wait: those that
        // left can have been ahead of `ticket`, at most all of them.
        let drawn_ahead = ticket.seq - first;
        let left = (last - first + 1) - self.len as u64;
        Some(usize::try_from(drawn_ahead.saturating_sub(left)).unwrap_or(usize::MAX))
    }

    /// The head's turn came: it leaves the queue (the caller then wakes the next, if it can
    /// go).
    pub(crate) fn pop_head(&mut self) {
        if let Some(head) = self.head {
            self.unlink(head);
        }
    }

    /// Keeps `waker` to wake `ticket`'s task when the queue moves.
    pub(crate) fn register(&mut self, ticket: Ticket, waker: &Waker) {
        if self.entry(ticket).is_some() {
            let slot = &mut self.entries[ticket.entry as usize].waker;
            match slot {
                Some(kept) if kept.will_wake(waker) => {}
                _ => *slot = Some(waker.clone()),
            }
        }
    }

    /// Leaves the queue without a turn (a dropped or timed-out request). True if it was the
    /// head, so that the next may be able to go now.
    pub(crate) fn leave(&mut self, ticket: Ticket) -> bool {
        if self.entry(ticket).is_none() {
            return false;
        }
        let was_head = self.head == Some(ticket.entry);
        self.unlink(ticket.entry);
        was_head
    }

    /// Takes entry `at` out of the list and frees it.
    fn unlink(&mut self, at: u32) {
        let entry = &mut self.entries[at as usize];
        let (prev, next) = (some(entry.prev), some(entry.next));
        entry.seq = FREE;
        entry.prev = NONE;
        entry.waker = None;
        entry.next = self.free.unwrap_or(NONE);
        self.free = Some(at);
        match prev {
            Some(prev) => self.entries[prev as usize].next = next.unwrap_or(NONE),
            None => self.head = next,
        }
        match next {
            Some(next) => self.entries[next as usize].prev = prev.unwrap_or(NONE),
            None => self.tail = prev,
        }
        self.len -= 1;
        if self.len == 0 {
            // Nobody waits: the free list starts again from an empty slab (its memory kept).
            self.entries.clear();
            self.free = None;
        }
    }

    /// Wakes every request waiting (each looks again, and those that cannot go register
    /// again).
    pub(crate) fn wake_all(&mut self) {
        let mut at = self.head;
        while let Some(i) = at {
            let entry = &mut self.entries[i as usize];
            at = some(entry.next);
            if let Some(waker) = entry.waker.take() {
                waker.wake();
            }
        }
    }

    /// Wakes the request at the head of the queue, whose turn may have come.
    pub(crate) fn wake_head(&mut self) {
        if let Some(head) = self.head {
            if let Some(waker) = self.entries[head as usize].waker.take() {
                waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use proptest::prelude::*;

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn first_come_first_served_and_a_leaving_head_lets_the_next_know() {
        let mut queue = WaitQueue::default();
        let (a, b, c) = (queue.join(), queue.join(), queue.join());
        assert!(queue.is_head(a) && !queue.is_head(b));
        assert_eq!(queue.ahead(c), Some(2));
        let woken = Arc::new(Count::default());
        queue.register(b, &Waker::from(woken.clone()));
        // One in the middle leaves: nobody's turn changed.
        assert!(!queue.leave(c));
        // The head leaves: the caller wakes the next.
        assert!(queue.leave(a));
        queue.wake_head();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(queue.is_head(b));
        queue.pop_head();
        assert!(queue.is_empty() && queue.ahead(b).is_none());
        assert!(!queue.leave(b));
    }
    #[derive(Debug, Clone)]
    enum Op {
        Join,
        PopHead,
        Leave(usize),
        /// A ticket that has left tries to leave again.
        LeaveStale(usize),
    }

    proptest! {
        /// The queue against a model (a `VecDeque` of tickets): the same order, the same head,
        /// `ahead` never more than the true count, and a ticket that left (whose entry may
        /// now serve another) is not mistaken for the one there now.
        #[test]
        fn the_queue_keeps_the_order_of_a_plain_list(ops in prop::collection::vec(
            prop_oneof![
                3 => Just(Op::Join),
                1 => Just(Op::PopHead),
                2 => (0..64usize).prop_map(Op::Leave),
                1 => (0..64usize).prop_map(Op::LeaveStale),
            ],
            0..200,
        )) {
            let mut queue = WaitQueue::default();
            let mut model: std::collections::VecDeque<Ticket> = Default::default();
            let mut gone: Vec<Ticket> = Vec::new();
            for op in ops {
                match op {
                    Op::Join => model.push_back(queue.join()),
                    Op::PopHead => {
                        if let Some(head) = model.pop_front() {
                            prop_assert!(queue.is_head(head));
                            queue.pop_head();
                            gone.push(head);
                        }
                    }
                    Op::Leave(i) if !model.is_empty() => {
                        let ticket = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(queue.leave(ticket), i % (model.len() + 1) == 0);
                        gone.push(ticket);
                    }
                    Op::LeaveStale(i) if !gone.is_empty() => {
                        let ticket = gone[i % gone.len()];
                        prop_assert!(!queue.leave(ticket) && !queue.is_head(ticket));
                        prop_assert!(queue.ahead(ticket).is_none());
                    }
                    _ => {}
                }
                prop_assert_eq!(queue.len(), model.len());
                for (i, &ticket) in model.iter().enumerate() {
                    prop_assert_eq!(queue.is_head(ticket), i == 0);
                    prop_assert!(queue.ahead(ticket).is_some_and(|ahead| ahead <= i));
                }
            }
        }
    }

    #[test]
    fn ahead_is_exact_while_nobody_leaves_from_the_middle() {
        let mut queue = WaitQueue::default();
        let tickets: Vec<Ticket> = (0..10).map(|_| queue.join()).collect();
        queue.pop_head();
        queue.pop_head();
        for (i, &ticket) in tickets[2..].iter().enumerate() {
            assert_eq!(queue.ahead(ticket), Some(i));
        }
    }
}
