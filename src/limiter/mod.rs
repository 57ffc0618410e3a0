//! Limiter algorithms: when may the next request go? No HTTP in here.
//!
//! A client cannot know when the server counts a request: at some moment between its send and
//! its response. So a request holds its place from the moment it is admitted (sent) until its
//! response is back, plus the quota's window (sliding window) or emission interval (GCRA),
//! plus a small safety margin. Admission follows from that:
//!
//! - **Sliding window** ([`window`]): a request is admitted while fewer than `count` requests
//!   are *holding*: in flight, or answered less than `period + margin` ago. Any window of length
//!   `period`, as the server sees it, then holds at most `count` requests: of `count + 1`
//!   requests in it, the last sent was admitted while the other `count` were all holding.
//! - **GCRA** ([`gcra`]): the theoretical arrival time (TAT) advances by one emission interval
//!   per *answered* request, from its response time; a request in flight counts one interval
//!   ahead of it. A request is admitted when `max(TAT, now) + in_flight × interval` is at most
//!   `now + (burst - 1) × interval`. Any interval of length `L` then holds at most
//!   `burst + L / interval` requests as the server sees them, which is GCRA's own guarantee.
//!
//! Both cost one round trip per period (the price of not knowing the server's moment), and
//! both reduce to the textbook algorithm when responses are instant.
//!
//! Both count *units*: a request holds as many places as it costs (one, unless its route
//! weighs it), and is admitted when all of them fit at once. A request's cost may be
//! corrected when its response is in: it is counted as answered with its true cost, so the
//! difference is taken or given back from then on, and the requests after it see the true
//! budget.
//!
//! A request given up on after its send (*abandoned*) has no response time, and a stalled or
//! queueing server may still count it long after. It stays counted in flight until the end
//! of a hold, and is then counted as answered at that moment: to the algorithms it is a
//! request answered late, so a server that counts it by then sees the quota kept. The ends
//! of the holds wait in a queue of their own, soonest first, and are settled before anything
//! else happens at or after them, so answers are still recorded in time order.
//!
//! This is client mode's limiter. Server mode counts each client in constant memory instead,
//! in [`keyed`].

mod gcra;
pub(crate) mod keyed;
mod window;

use std::collections::VecDeque;

use crate::clock::Nanos;
use crate::quota::Rate;

/// Why a request cannot be admitted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotYet {
    /// Not before this time (a lower bound: a waiter re-checks then).
    Until(Nanos),
    /// Not before a request in flight is answered.
    Response,
}

/// The units held without an answer counted, as an algorithm sees them.
pub(crate) struct Pending<'a> {
    /// Units in flight, abandoned requests' included.
    in_flight: u64,
    /// Units of the requests ahead of the one asking, which will be admitted before it.
    ahead: u64,
    /// When the abandoned requests are counted as answered, soonest first, and their units.
    abandoned: &'a VecDeque<Abandoned>,
    /// Their units.
    abandoned_units: u64,
}

/// A request given up on after its send, held until `until`.
#[derive(Debug, Clone, Copy)]
struct Abandoned {
    until: Nanos,
    units: u32,
}

impl Pending<'_> {
    fn count(&self) -> u64 {
        self.in_flight + self.ahead
    }

    /// When the `n`-th unit to be answered (from 0) is answered at the earliest, if an
    /// abandoned request's hold decides it; `None` when a response may bring it at any
    /// moment. A response may come now, an abandoned request's hold ends later: responses
    /// come first.
    fn answer(&self, n: u64) -> Option<Nanos> {
        let answerable = self.count() - self.abandoned_units;
        let mut i = n.checked_sub(answerable)?;
        for abandoned in self.abandoned {
            match i.checked_sub(u64::from(abandoned.units)) {
                Some(rest) => i = rest,
                None => return Some(abandoned.until),
            }
        }
        None
    }
}

/// A limit the server told us about: at most `remaining` more sends until `reset_at`.
#[derive(Clone, Copy, Debug)]
struct ServerCap {
    remaining: u32,
    reset_at: Nanos,
    /// The limit, if the server stated it: each window that follows allows that many, until
    /// the server says more.
    limit: Option<u32>,
    /// The longest window seen (the time from a statement to its reset), at least a second.
    window: Nanos,
    /// Whether it may be carried past its reset once more: only once after the statement that
    /// set it, so that a server that stops stating (an error page, a proxy) never holds the
    /// route to an old limit for good.
    renewable: bool,
}

impl ServerCap {
    /// At `now`, past `reset_at`: the window the server's limit now counts in, if it stated a
    /// limit. Requests still in flight may count in it. The next statement replaces it. A
    /// stated limit of zero is not carried on: nothing would be sent, so nothing would ever
    /// say more.
    fn renewed(self, now: Nanos, in_flight: u32) -> Option<Self> {
        if !self.renewable {
            return None;
        }
        let limit = self.limit.filter(|&limit| limit > 0)?;
        let passed = (now - self.reset_at) / self.window + 1;
        Some(Self {
            remaining: limit.saturating_sub(in_flight),
            reset_at: self
                .reset_at
                .saturating_add(passed.saturating_mul(self.window)),
            renewable: false,
            ..self
        })
    }
}

#[derive(Debug)]
enum Algorithm {
    Window(window::Window),
    Gcra(gcra::Gcra),
}

/// The state of one limit (one route, or one route and key).
#[derive(Debug)]
pub(crate) struct Limiter {
    algorithm: Algorithm,
    /// Units held with no answer counted yet: admitted and not answered, or abandoned and
    /// still held.
    in_flight: u64,
    /// When each abandoned request still held is counted as answered, soonest first; as long
    /// as the places they hold, at most.
    abandoned: VecDeque<Abandoned>,
    /// Their units.
    abandoned_units: u64,
    /// Nothing is admitted before this time (learnt from a server's 429).
    blocked_until: Nanos,
    cap: Option<ServerCap>,
}

impl Limiter {
    pub(crate) fn new(rate: &Rate) -> Self {
        let algorithm = if rate.is_gcra() {
            Algorithm::Gcra(gcra::Gcra::default())
        } else {
            Algorithm::Window(window::Window::default())
        };
        Self {
            algorithm,
            in_flight: 0,
            abandoned: VecDeque::new(),
            abandoned_units: 0,
            blocked_until: 0,
            cap: None,
        }
    }

    /// Admits one request of one unit now, or says how long it must wait (tests).
    #[cfg(test)]
    pub(crate) fn try_acquire(&mut self, rate: &Rate, now: Nanos) -> Result<(), NotYet> {
        self.try_take(rate, now, 1)
    }

    /// Admits a request of `units` now, or says how long it must wait. On success its units
    /// are in flight until [`Limiter::answer`]. `units` must [fit](Rate::fits): a request
    /// that never fits waits for ever.
    pub(crate) fn try_take(&mut self, rate: &Rate, now: Nanos, units: u32) -> Result<(), NotYet> {
        self.check(rate, now, 0, units)?;
        self.take(units);
        Ok(())
    }

    /// Takes `units` that [`Limiter::check`] admitted at the same time.
    pub(crate) fn take(&mut self, units: u32) {
        self.in_flight += u64::from(units);
        if let Some(cap) = &mut self.cap {
            cap.remaining = cap.remaining.saturating_sub(units);
        }
    }

    /// Whether a request of `units` could be admitted now, without admitting it.
    pub(crate) fn probe(&mut self, rate: &Rate, now: Nanos, units: u32) -> Result<(), NotYet> {
        self.check(rate, now, 0, units)
    }

    /// Whether a request of `units`, behind requests of `ahead` units that will be admitted
    /// first, could go now; if not, a lower bound of when.
    pub(crate) fn check(
        &mut self,
        rate: &Rate,
        now: Nanos,
        ahead: u64,
        units: u32,
    ) -> Result<(), NotYet> {
        self.settle(rate, now);
        if let Some(cap) = self.cap {
            if now >= cap.reset_at {
                self.cap = cap.renewed(now, self.in_flight_u32());
            }
        }
        let mut earliest = self.blocked_until;
        if let Some(cap) = self.cap {
            if u64::from(cap.remaining) < ahead + u64::from(units.max(1)) {
                earliest = earliest.max(cap.reset_at);
            }
        }
        let pending = Pending {
            in_flight: self.in_flight,
            ahead,
            abandoned: &self.abandoned,
            abandoned_units: self.abandoned_units,
        };
        // What costs nothing takes nothing, but waits as a request of one unit would: a quota
        // already full (a cost corrected upwards) holds it back.
        let need = units.max(1);
        let algorithm = match &mut self.algorithm {
            Algorithm::Window(w) => w.check(rate, now, &pending, need),
            Algorithm::Gcra(g) => g.check(rate, now, &pending, need),
        };
        match algorithm {
            Ok(()) if earliest <= now => Ok(()),
            Ok(()) => Err(NotYet::Until(earliest)),
            Err(NotYet::Until(at)) => Err(NotYet::Until(at.max(earliest))),
            Err(NotYet::Response) => Err(NotYet::Response),
        }
    }

    /// A lower bound on when a request of `units` behind requests of `ahead` units could be
    /// admitted.
    pub(crate) fn estimate(&mut self, rate: &Rate, now: Nanos, ahead: u64, units: u32) -> Nanos {
        match self.check(rate, now, ahead, units) {
            Ok(()) => now,
            Err(NotYet::Until(at)) => at,
            Err(NotYet::Response) => {
                let pending = self.in_flight + ahead;
                let after_response = match &self.algorithm {
                    Algorithm::Window(w) => w.after_response(rate, now),
                    Algorithm::Gcra(g) => g.after_response(rate, now, pending, units),
                };
                after_response.max(self.blocked_until)
            }
        }
    }

    /// The request of one unit admitted earlier has been answered at `at` (tests).
    #[cfg(test)]
    pub(crate) fn release(&mut self, rate: &Rate, at: Nanos) {
        self.answer(rate, at, 1, 1);
    }

    /// The request that took `taken` units earlier has been answered at `at`, and turned out
    /// to cost `cost`: it holds that many places from now on.
    ///
    /// A cost is counted as at most the quota's capacity (its count, or a paced quota's
    /// burst): a usage figure out of all proportion (a garbage header) closes the quota for
    /// one period at most, not for years.
    pub(crate) fn answer(&mut self, rate: &Rate, at: Nanos, taken: u32, cost: u32) {
        let cost = cost.min(rate.capacity());
        self.settle(rate, at);
        self.answered(rate, at, taken, cost);
        if cost > taken {
            if let Some(cap) = &mut self.cap {
                cap.remaining = cap.remaining.saturating_sub(cost - taken);
            }
        }
    }

    fn answered(&mut self, rate: &Rate, at: Nanos, taken: u32, cost: u32) {
        debug_assert!(
            self.in_flight >= u64::from(taken),
            "release without acquire"
        );
        self.in_flight = self.in_flight.saturating_sub(u64::from(taken));
        match &mut self.algorithm {
            Algorithm::Window(w) => w.release(at, cost),
            Algorithm::Gcra(g) => g.release(rate, at, cost),
        }
    }

    /// The request that took `units` was given up on at `at`, after its send: the server may
    /// still count it, so it stays in flight for `hold`, and then counts as answered then.
    pub(crate) fn abandon(&mut self, rate: &Rate, at: Nanos, hold: Nanos, units: u32) {
        self.settle(rate, at);
        let until = at.saturating_add(hold);
        if until == at || units == 0 {
            return self.answered(rate, at, units, units);
        }
        let i = self.abandoned.partition_point(|a| a.until <= until);
        self.abandoned.insert(i, Abandoned { until, units });
        self.abandoned_units += u64::from(units);
    }

    /// Counts the abandoned requests whose hold is over by `now` as answered.
    #[inline]
    fn settle(&mut self, rate: &Rate, now: Nanos) {
        if self.abandoned.front().is_some_and(|a| a.until <= now) {
            self.settle_abandoned(rate, now);
        }
    }

    #[cold]
    #[inline(never)]
    fn settle_abandoned(&mut self, rate: &Rate, now: Nanos) {
        while let Some(&Abandoned { until, units }) = self.abandoned.front() {
            if until > now {
                break;
            }
            self.abandoned.pop_front();
            self.abandoned_units -= u64::from(units);
            self.answered(rate, until, units, units);
        }
    }

    /// The request of one unit admitted earlier was never sent (tests).
    #[cfg(test)]
    pub(crate) fn cancel(&mut self) {
        self.give_back(1);
    }

    /// The request that took `units` was never sent: its places are given back as if they
    /// had never been taken (no answer is counted, the schedule does not move).
    pub(crate) fn give_back(&mut self, units: u32) {
        debug_assert!(
            self.in_flight >= self.abandoned_units + u64::from(units),
            "cancel without acquire"
        );
        self.in_flight = self.in_flight.saturating_sub(u64::from(units));
        if let Some(cap) = &mut self.cap {
            cap.remaining = cap.remaining.saturating_add(units);
        }
    }

    /// Admits and answers one request at `now` in one step, as a server does (tests).
    #[cfg(test)]
    pub(crate) fn try_hit(&mut self, rate: &Rate, now: Nanos) -> Result<(), NotYet> {
        self.try_acquire(rate, now)?;
        self.release(rate, now);
        Ok(())
    }

    /// Units that could be taken at `now` if they came at once.
    pub(crate) fn remaining(&mut self, rate: &Rate, now: Nanos) -> u32 {
        if self.check(rate, now, 0, 1).is_err() {
            return 0;
        }
        let algorithm = match &mut self.algorithm {
            Algorithm::Window(w) => w.remaining(rate, now, self.in_flight),
            Algorithm::Gcra(g) => g.remaining(rate, now, self.in_flight),
        };
        match self.cap {
            Some(cap) => algorithm.min(cap.remaining),
            None => algorithm,
        }
    }

    /// Units held without an answer, abandoned requests' still held included.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight
    }

    fn in_flight_u32(&self) -> u32 {
        u32::try_from(self.in_flight).unwrap_or(u32::MAX)
    }

    /// Abandoned requests still held as in flight.
    pub(crate) fn abandoned(&self) -> u32 {
        self.abandoned.len() as u32
    }

    /// Whether this state is the same as a fresh one at `now` (tests).
    #[cfg(test)]
    pub(crate) fn is_idle(&mut self, rate: &Rate, now: Nanos) -> bool {
        self.settle(rate, now);
        self.in_flight == 0
            && self.blocked_until <= now
            && self.cap.is_none_or(|cap| cap.reset_at <= now)
            && match &mut self.algorithm {
                Algorithm::Window(w) => w.is_idle(rate, now),
                Algorithm::Gcra(g) => g.is_idle(now),
            }
    }

    /// Admits nothing before `until` (the server said so).
    pub(crate) fn block_until(&mut self, until: Nanos) {
        self.blocked_until = self.blocked_until.max(until);
    }

    /// The server says `remaining` more requests (of `limit`, if it says) may go until
    /// `reset_at`. This never loosens the local algorithm, only adds a bound beside it.
    /// Requests still in flight may not be in `remaining` yet, so they are taken off it. A
    /// report for the same reset as the bound in force (within a second) can only lower it,
    /// since responses may arrive out of order; one for another reset is a new window and
    /// replaces it. With a limit, the bound goes on past the reset: each window after it
    /// allows `limit` (as long as the longest window seen), until the server says more.
    pub(crate) fn cap(&mut self, remaining: u32, limit: Option<u32>, reset_at: Nanos, now: Nanos) {
        const SAME_RESET: Nanos = 1_000_000_000;
        if reset_at <= now {
            return;
        }
        let remaining = remaining.saturating_sub(self.in_flight_u32());
        let seen = self.cap.map_or(0, |cap| cap.window);
        let window = seen.max(reset_at - now).max(SAME_RESET);
        self.cap = Some(match self.cap {
            Some(cap) if cap.reset_at > now && cap.reset_at.abs_diff(reset_at) <= SAME_RESET => {
                ServerCap {
                    remaining: cap.remaining.min(remaining),
                    reset_at: cap.reset_at.max(reset_at),
                    limit: limit.or(cap.limit),
                    window,
                    renewable: true,
                }
            }
            _ => ServerCap {
                remaining,
                reset_at,
                limit,
                window,
                renewable: true,
            },
        });
    }

    /// A statement this state cannot place (about a quota other than the one it counts, as
    /// far as it knows): at most `remaining` more until `reset_at`, which only ever tightens
    /// the bound in force (fewer left, a later reset), never replaces it.
    pub(crate) fn tighten(&mut self, remaining: u32, reset_at: Nanos, now: Nanos) {
        if reset_at <= now {
            return;
        }
        if let Some(cap) = self.cap {
            if now >= cap.reset_at {
                self.cap = cap.renewed(now, self.in_flight_u32());
            }
        }
        let remaining = remaining.saturating_sub(self.in_flight_u32());
        self.cap = Some(match self.cap {
            Some(cap) => ServerCap {
                remaining: cap.remaining.min(remaining),
                reset_at: cap.reset_at.max(reset_at),
                ..cap
            },
            None => ServerCap {
                remaining,
                reset_at,
                limit: None,
                window: reset_at - now,
                renewable: false,
            },
        });
    }

    /// The server says its limit renews over windows of `window` (the draft's `w`): the bound
    /// carried past the reset in force covers at least that long, even where the statements
    /// seen so far came late in a window and so looked shorter.
    pub(crate) fn renews_over(&mut self, window: Nanos) {
        if let Some(cap) = &mut self.cap {
            cap.window = cap.window.max(window);
        }
    }

    /// Adapts the state to a new rate at once: a paced schedule keeps its level in requests;
    /// a change of algorithm errs on the safe side.
    pub(crate) fn change_rate(&mut self, old: &Rate, new: &Rate, now: Nanos) {
        self.settle(old, now);
        match (&mut self.algorithm, new.is_gcra()) {
            (Algorithm::Window(w), true) => {
                // As if every request still holding a place had just been answered.
                let tat = now.saturating_add(new.interval.saturating_mul(w.len(old, now)));
                self.algorithm = Algorithm::Gcra(gcra::Gcra::starting_at(tat));
            }
            (Algorithm::Gcra(g), false) => {
                // The history is gone: count the quota as just used up, unless it was idle.
                let used = if g.is_idle(now) {
                    0
                } else {
                    u64::from(new.count)
                };
                self.algorithm = Algorithm::Window(window::Window::filled(used, now));
            }
            (Algorithm::Gcra(g), true) => g.rescale(now, old.interval, new.interval),
            (Algorithm::Window(_), false) => {}
        }
    }
}

#[cfg(test)]
mod tests;
