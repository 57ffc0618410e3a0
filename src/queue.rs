//! The fair FIFO queue both layers keep of the requests waiting for their turn (a route's
//! quota, a plan's slot): tickets in the order taken, each with the waker of the task that
//! holds it. No HTTP and no locking in here: each layer keeps one under its own lock.

use std::collections::VecDeque;
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

/// Requests waiting, first come first served. Tickets only grow, so the queue is sorted by
/// ticket and a ticket is found by binary search.
#[derive(Debug, Default)]
pub(crate) struct WaitQueue {
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    waker: Option<Waker>,
}

impl WaitQueue {
    /// Joins the back of the queue: the new request's ticket.
    pub(crate) fn join(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiters.push_back(Waiter {
            ticket,
            waker: None,
        });
        ticket
    }

    pub(crate) fn len(&self) -> usize {
        self.waiters.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Whether `ticket` is at the head of the queue, its turn next.
    pub(crate) fn is_head(&self, ticket: u64) -> bool {
        self.waiters.front().is_some_and(|w| w.ticket == ticket)
    }

    /// Where `ticket` stands: how many wait ahead of it.
    pub(crate) fn position(&self, ticket: u64) -> Option<usize> {
        self.waiters
            .binary_search_by_key(&ticket, |w| w.ticket)
            .ok()
    }

    /// The head's turn came: it leaves the queue (the caller then wakes the next, if it can
    /// go).
    pub(crate) fn pop_head(&mut self) {
        self.waiters.pop_front();
    }

    /// Keeps `waker` to wake `ticket`'s task when the queue moves.
    pub(crate) fn register(&mut self, ticket: u64, waker: &Waker) {
        if let Some(i) = self.position(ticket) {
            let slot = &mut self.waiters[i].waker;
            match slot {
                Some(kept) if kept.will_wake(waker) => {}
                _ => *slot = Some(waker.clone()),
            }
        }
    }

    /// Leaves the queue without a turn (a dropped or timed-out request). True if it was the
    /// head, so that the next may be able to go now.
    pub(crate) fn leave(&mut self, ticket: u64) -> bool {
        match self.position(ticket) {
            Some(i) => {
                self.waiters.remove(i);
                i == 0
            }
            None => false,
        }
    }

    /// Wakes every request waiting (each looks again, and those that cannot go register
    /// again).
    pub(crate) fn wake_all(&mut self) {
        for waker in self.waiters.iter_mut().filter_map(|w| w.waker.take()) {
            waker.wake();
        }
    }

    /// Wakes the request at the head of the queue, whose turn may have come.
    pub(crate) fn wake_head(&mut self) {
        if let Some(waker) = self.waiters.front_mut().and_then(|w| w.waker.take()) {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

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
        assert_eq!(queue.position(c), Some(2));
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
        assert!(queue.is_empty() && queue.position(b).is_none());
        assert!(!queue.leave(b));
    }
}
