//! Client mode's state: each route's limiter and queue, the tickets of the requests waiting
//! in it, and the permits of the requests holding a place.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::{Duration, SystemTime};

use http::{Response, StatusCode};

use crate::clock::{nanos, Clock, Nanos};
use crate::event::{Event, Figures, Learnt, Refusal};
use crate::headers;
use crate::limiter::{Limiter, NotYet};
use crate::queue::{Ticket, WaitQueue};
use crate::quota::Rate;
use crate::rate_limit::cost::{Corrections, Costs, ResponseHead, Weighing};
use crate::rate_limit::error::RateLimitError;
use crate::rate_limit::layer::LayerState;
use crate::rate_limit::RequestHead;

pub(crate) use crate::lock::lock;

/// How a client learns from the responses passing back through it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Learn {
    pub(crate) enabled: bool,
    /// How long a 429 without a usable `Retry-After` closes its route.
    pub(crate) backoff: Duration,
    /// The header dialects read.
    pub(crate) dialects: headers::Dialects,
}

impl Learn {
    /// The longest a server's word closes a route: a server may ask for long waits, but
    /// garbage must not close a route for years, so an hour or the route's period, whichever
    /// is longer.
    pub(crate) fn cap(rate: &Rate) -> Duration {
        Duration::from_secs(3600).max(rate.quota.period())
    }

    /// How long a refusal (a 429, or a 403 that says it is about a rate limit) closes its
    /// route (before the cap): its `Retry-After`, else the backoff.
    pub(crate) fn refusal_wait<B>(
        &self,
        route: &str,
        response: &Response<B>,
        wall: SystemTime,
    ) -> Duration {
        let wait = match headers::retry_after(response.headers(), wall) {
            Ok(Some(wait)) if !wait.is_zero() => wait,
            Ok(_) => self.backoff,
            Err(error) => {
                tracing::debug!(route, %error, "ignoring a malformed header on a 429");
                self.backoff
            }
        };
        tracing::debug!(route, ?wait, status = %response.status(), "the server refused for a rate limit: the route waits");
        wait
    }
}

/// One route in client mode: a limiter and the queue of requests waiting for it.
#[derive(Debug)]
pub(crate) struct ClientRoute {
    pub(crate) name: Arc<str>,
    pub(crate) learn: Learn,
    pub(crate) state: Mutex<ClientState>,
    /// Whether its quota is learnt (nobody configured one), so that it may count against a
    /// quota the server names, held by another learnt route's state.
    pub(crate) learnt: bool,
    /// The route whose state counts its requests: itself, unless it is learnt and the server
    /// named its quota, which another learnt route's state already held.
    holder: AtomicU16,
    /// How its requests are weighed, if a quota of it counts something other than requests.
    weighing: Option<Weighing>,
}

impl ClientRoute {
    /// A route with these quotas (a learnt one has one).
    pub(crate) fn new(
        index: u16,
        name: Arc<str>,
        learn: Learn,
        rates: Vec<Rate>,
        learnt: bool,
    ) -> Self {
        Self {
            name,
            learn,
            state: Mutex::new(ClientState::new(rates)),
            learnt,
            holder: AtomicU16::new(index),
            weighing: None,
        }
    }

    /// Weighs its requests so.
    pub(crate) fn weighed(mut self, weighing: Option<Weighing>) -> Self {
        self.weighing = weighing;
        self
    }

    /// Whether its requests are weighed (a request of another route costs one unit in each
    /// of its quotas).
    #[inline]
    pub(crate) fn is_weighed(&self) -> bool {
        self.weighing.is_some()
    }

    /// What a request of this route costs in each of its quotas. Out of line, so that the
    /// path of a request that is not weighed stays as it was.
    #[inline(never)]
    pub(crate) fn weigh<B>(&self, request: &http::Request<B>) -> Costs {
        match &self.weighing {
            None => Costs::one(),
            Some(weighing) => weighing.costs(&RequestHead::of(request)),
        }
    }

    /// Why a request of `costs` can never go, if it costs more than one of the route's
    /// quotas (in `state`, its own, locked) ever admits.
    #[cold]
    pub(crate) fn too_high(&self, state: &ClientState, costs: &Costs) -> Option<RateLimitError> {
        let (quota, cost) = costs.too_high(state.rates())?;
        Some(RateLimitError::CostTooHigh {
            route: self.name.clone(),
            unit: quota.unit(),
            cost,
            most: quota.burst().unwrap_or(quota.count()),
        })
    }

    /// What a request that took `taken` turned out to cost, if its response corrects it.
    #[cfg(feature = "redis")]
    pub(crate) fn corrected<B>(&self, taken: &Costs, response: &Response<B>) -> Option<Costs> {
        let weighing = self.weighing.as_ref()?;
        weighing.answered(taken, &ResponseHead::of(response))
    }

    /// What a response says its request cost, where it says, if the route corrects costs.
    fn read_costs<B>(&self, response: &Response<B>) -> Option<Corrections> {
        self.weighing.as_ref()?.read(&ResponseHead::of(response))
    }

    /// The route whose state counts this route's requests now.
    #[inline]
    pub(crate) fn holder(&self) -> usize {
        // Relaxed: the holder is only ever read to choose a lock, under which the state is
        // read; a request that reads the previous holder counts against it, as it would have
        // a moment earlier.
        usize::from(self.holder.load(Ordering::Relaxed))
    }
}

/// The quotas the server named for learnt routes, each held by the state of the first learnt
/// route whose response named it. At most one name per route, so never more entries than
/// routes, whatever the server sends.
#[derive(Debug, Default)]
pub(crate) struct QuotaNames(Mutex<Vec<(Box<str>, u16)>>);

impl Clone for QuotaNames {
    fn clone(&self) -> Self {
        Self(Mutex::new(lock(&self.0).clone()))
    }
}

impl QuotaNames {
    /// Where the statement of learnt route `route`, whose response names its quota `name`,
    /// is learnt: the state that holds that name, or `None` if it cannot be placed.
    ///
    /// A route is placed once, by the first name its responses give: it then counts in the
    /// state holding that name (its own, which then holds it, if no route named it before).
    /// It keeps that place: a later statement is placed only if it names the same quota. A
    /// server that renames a route's quota (or names one of several policies alone) cannot
    /// move its requests from one count to another, where requests still in flight would
    /// count in neither.
    fn resolve(&self, routes: &[ClientRoute], route: usize, name: &str) -> Option<usize> {
        let mut names = lock(&self.0);
        let named = names
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|&(_, holder)| usize::from(holder));
        let current = routes[route].holder();
        let placed = current != route || names.iter().any(|&(_, h)| usize::from(h) == route);
        if placed {
            return named.filter(|&holder| holder == current);
        }
        let holder = named.unwrap_or(route);
        if named.is_none() {
            names.push((name.into(), route as u16));
        }
        // `compile` refused more routes than a `u16` counts.
        routes[route].holder.store(holder as u16, Ordering::Relaxed);
        Some(holder)
    }

    /// Whether learnt route `route` was placed under a name (its own state holds one, or it
    /// counts in another's).
    fn placed(&self, routes: &[ClientRoute], route: usize) -> bool {
        routes[route].holder() != route
            || lock(&self.0).iter().any(|&(_, h)| usize::from(h) == route)
    }
}

#[derive(Debug)]
pub(crate) struct ClientState {
    /// The route's first quota, the one learnt from responses and shown in its snapshot.
    pub(crate) rate: Rate,
    pub(crate) limiter: Limiter,
    /// Its other quotas, if it has several: a request takes its place in all of them at
    /// once, or in none.
    more: Vec<(Rate, Limiter)>,
    /// The costs of the weighed requests holding places here.
    weighed: Weighed,
    /// Requests waiting for their turn, first come first served.
    pub(crate) waiters: WaitQueue,
    /// Requests of this process waiting for their turn in a shared store.
    pub(crate) store_waiters: usize,
    /// The latest time recorded under this lock. Time only moves forward, and admission only
    /// gets easier as it does, so a request that the limiter admits at this time may go
    /// without reading the clock again.
    last_seen: Nanos,
}

impl ClientState {
    pub(crate) fn new(rates: Vec<Rate>) -> Self {
        let mut rates = rates.into_iter();
        let rate = rates.next().expect("a route has at least one quota");
        Self {
            limiter: Limiter::new(&rate),
            rate,
            more: rates.map(|rate| (rate, Limiter::new(&rate))).collect(),
            weighed: Weighed::default(),
            waiters: WaitQueue::default(),
            store_waiters: 0,
            last_seen: 0,
        }
    }

    /// The limiter of its first quota that counts requests, if any does.
    fn requests(&mut self) -> Option<&mut Limiter> {
        if self.rate.quota.unit().is_none() {
            return Some(&mut self.limiter);
        }
        let mut more = self.more.iter_mut();
        more.find(|(rate, _)| rate.quota.unit().is_none())
            .map(|(_, limiter)| limiter)
    }

    /// Its quotas, in order.
    pub(crate) fn rates(&self) -> impl Iterator<Item = &Rate> {
        std::iter::once(&self.rate).chain(self.more.iter().map(|(rate, _)| rate))
    }

    /// Takes a request's `costs` from every quota at `now`, all at once or none.
    #[inline]
    pub(crate) fn try_take(&mut self, now: Nanos, costs: &Costs) -> Result<(), NotYet> {
        if self.more.is_empty() {
            return self.limiter.try_take(&self.rate, now, costs.get(0));
        }
        self.try_take_all(now, costs)
    }

    #[inline(never)]
    fn try_take_all(&mut self, now: Nanos, costs: &Costs) -> Result<(), NotYet> {
        self.check(now, 0, costs)?;
        self.limiter.take(costs.get(0));
        for (i, (_, limiter)) in self.more.iter_mut().enumerate() {
            limiter.take(costs.get(i + 1));
        }
        Ok(())
    }

    /// Whether a request of `costs`, behind requests of `ahead` units, fits in every quota
    /// now; if not, a lower bound of when (the latest any quota names, or a response).
    fn check(&mut self, now: Nanos, ahead: u64, costs: &Costs) -> Result<(), NotYet> {
        let mut verdict = self.limiter.check(&self.rate, now, ahead, costs.get(0));
        for (i, (rate, limiter)) in self.more.iter_mut().enumerate() {
            let next = limiter.check(rate, now, ahead, costs.get(i + 1));
            verdict = match (verdict, next) {
                (Ok(()), next) => next,
                (verdict, Ok(())) => verdict,
                (Err(NotYet::Until(a)), Err(NotYet::Until(b))) => Err(NotYet::Until(a.max(b))),
                (Err(NotYet::Until(at)), _) | (_, Err(NotYet::Until(at))) => Err(NotYet::Until(at)),
                (Err(NotYet::Response), Err(NotYet::Response)) => Err(NotYet::Response),
            };
        }
        verdict
    }

    /// A lower bound on when a request of `costs` behind `ahead` others could go.
    pub(crate) fn estimate(&mut self, now: Nanos, ahead: u32, costs: &Costs) -> Nanos {
        let ahead = u64::from(ahead);
        let mut turn = self.limiter.estimate(&self.rate, now, ahead, costs.get(0));
        for (i, (rate, limiter)) in self.more.iter_mut().enumerate() {
            turn = turn.max(limiter.estimate(rate, now, ahead, costs.get(i + 1)));
        }
        turn
    }

    /// The request that took `taken` was answered at `at`, and cost `cost`.
    #[inline]
    pub(crate) fn answer(&mut self, at: Nanos, taken: &Costs, cost: Option<&Costs>) {
        if self.more.is_empty() && cost.is_none() && taken.is_one() {
            return self.limiter.answer(&self.rate, at, 1, 1);
        }
        self.answer_all(at, taken, cost);
    }

    /// The weighed request whose costs are kept under `key` was answered at `at`, and its
    /// response said what it cost where `said` does.
    #[inline(never)]
    fn answer_weighed(&mut self, at: Nanos, key: u32, said: Option<Corrections>) {
        let taken = self.weighed.take(key);
        let cost = said.map(|said| taken.corrected(&said));
        self.answer_all(at, &taken, cost.as_ref());
    }

    #[inline(never)]
    fn answer_all(&mut self, at: Nanos, taken: &Costs, cost: Option<&Costs>) {
        let cost = cost.unwrap_or(taken);
        self.limiter
            .answer(&self.rate, at, taken.get(0), cost.get(0));
        for (i, (rate, limiter)) in self.more.iter_mut().enumerate() {
            limiter.answer(rate, at, taken.get(i + 1), cost.get(i + 1));
        }
    }

    /// The request that took `costs` was given up on at `at` after its send, held `hold`.
    fn abandon(&mut self, at: Nanos, hold: Nanos, costs: &Costs) {
        self.limiter.abandon(&self.rate, at, hold, costs.get(0));
        for (i, (rate, limiter)) in self.more.iter_mut().enumerate() {
            limiter.abandon(rate, at, hold, costs.get(i + 1));
        }
    }

    /// The request that took `costs` was never sent.
    fn give_back(&mut self, costs: &Costs) {
        self.limiter.give_back(costs.get(0));
        for (i, (_, limiter)) in self.more.iter_mut().enumerate() {
            limiter.give_back(costs.get(i + 1));
        }
    }

    /// Reads the clock (under the route's lock, so times recorded here never go backwards).
    pub(crate) fn now(&mut self, clock: &Clock) -> Nanos {
        self.seen(clock.now())
    }

    /// Records a time read from the clock before the route's lock was taken, and returns the
    /// latest time seen. A response's time read before the lock is still after the response
    /// came, so it is as safe to record as one read under the lock, and the lock is held for
    /// less.
    pub(crate) fn seen(&mut self, now: Nanos) -> Nanos {
        self.last_seen = self.last_seen.max(now);
        self.last_seen
    }

    /// Requests of this process waiting for their turn, here or in a shared store.
    /// The gauges it shows.
    pub(crate) fn figures(&self) -> Figures {
        Figures {
            held: Some(self.limiter.in_flight() as usize),
            waiting: Some(self.waiting()),
            ..Figures::default()
        }
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiters.len() + self.store_waiters
    }

    /// The route's queue is full: `max_queue` when that many already wait.
    pub(crate) fn queue_full(&self, max_queue: Option<usize>) -> Option<usize> {
        max_queue.filter(|&max| self.waiting() >= max)
    }

    /// Wakes the request at the head of the queue, whose turn may have come.
    pub(crate) fn wake_head(&mut self) {
        self.waiters.wake_head();
    }
}

pub(crate) type ClientShared = LayerState<ClientRoute, crate::rate_limit::builder::WaitConfig>;

/// What a client-mode service and its requests hold: one `Arc` per service around the shared
/// state, so that requests of different services (different connections, different tasks)
/// count references on different cache lines instead of all contending for one.
pub(crate) type ClientHandle = Arc<Arc<ClientShared>>;

/// A place in a route's queue. Dropping it while still queued leaves the queue.
#[derive(Debug)]
pub(crate) struct TurnTicket {
    shared: ClientHandle,
    /// The request's route.
    route: usize,
    /// The route whose queue it waits in (its route's holder when it joined).
    at: usize,
    id: Ticket,
    queued: bool,
    /// When the request was made, for the wait it reports.
    pub(crate) since: Nanos,
    /// What it costs in each quota of its route.
    costs: Costs,
}

/// What a waiting request learns when it looks at the queue.
#[derive(Debug)]
pub(crate) enum Turn {
    /// Its turn: the request holds a place and may be sent.
    Admitted(Permit),
    /// Not yet; it will be woken, or should look again at this time.
    Wait(Option<Nanos>),
    /// Never: it costs more than its route's quota now admits at once (lowered by
    /// `set_quota` while it waited). It has left the queue.
    Never(RateLimitError),
}

impl TurnTicket {
    /// Joins the back of the queue of `at`, route `route`'s holder (whose lock the caller
    /// holds).
    pub(crate) fn join(
        shared: &ClientHandle,
        state: &mut ClientState,
        route: usize,
        at: usize,
        now: Nanos,
        costs: Costs,
    ) -> Self {
        let id = state.waiters.join();
        Self {
            shared: shared.clone(),
            route,
            at,
            id,
            queued: true,
            since: now,
            costs,
        }
    }

    pub(crate) fn route_name(&self) -> &Arc<str> {
        &self.shared.routes[self.route].name
    }

    pub(crate) fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Takes a place if this ticket is at the head of the queue and the quota allows;
    /// otherwise registers the task to be woken when the queue moves.
    pub(crate) fn poll_turn(&mut self, cx: &mut Context<'_>) -> Turn {
        debug_assert!(self.queued, "ticket polled after its turn");
        let mut guard = loop {
            let holder = self.shared.routes[self.route].holder();
            if holder != self.at {
                self.move_to(holder);
            }
            let guard = lock(&self.shared.routes[self.at].state);
            // Read again under the lock: a move made since is either seen here, or woken
            // after this poll registers (the mover wakes this queue under its lock).
            if self.shared.routes[self.route].holder() == self.at {
                break guard;
            }
        };
        let state = &mut *guard;
        let now = state.now(&self.shared.clock);
        let mut wait = None;
        if state.waiters.is_head(self.id) {
            if !self.costs.is_one() {
                let route = &self.shared.routes[self.route];
                if let Some(error) = route.too_high(state, &self.costs) {
                    // Its quota was lowered under it: it leaves, and the next may go.
                    state.waiters.pop_head();
                    state.wake_head();
                    drop(guard);
                    self.queued = false;
                    self.left(|layer, route, _| Event::Refused {
                        layer,
                        route,
                        reason: Refusal::CostTooHigh,
                    });
                    return Turn::Never(error);
                }
            }
            match state.try_take(now, &self.costs) {
                Ok(()) => {
                    state.waiters.pop_head();
                    state.wake_head();
                    let events = &self.shared.events;
                    events.gauges(self.at, || state.figures());
                    let costs = std::mem::replace(&mut self.costs, Costs::one());
                    let extra = Permit::extra(&self.shared, state, self.route, self.at, costs);
                    drop(guard);
                    self.queued = false;
                    let waited = Duration::from_nanos(now.saturating_sub(self.since));
                    events.emit(self.route, |layer, route| Event::Admitted {
                        layer,
                        route,
                        waited,
                    });
                    return Turn::Admitted(Permit {
                        shared: self.shared.clone(),
                        route: self.route as u16,
                        stage: Stage::Unsent,
                        extra,
                    });
                }
                Err(NotYet::Until(at)) => wait = Some(at),
                Err(NotYet::Response) => {}
            }
        }
        state.waiters.register(self.id, cx.waker());
        Turn::Wait(wait)
    }

    /// The request's route now counts against another route's state (the server named its
    /// quota, held there): it leaves its queue for the back of that one.
    #[cold]
    fn move_to(&mut self, holder: usize) {
        self.leave();
        let mut state = lock(&self.shared.routes[holder].state);
        self.id = state.waiters.join();
        self.at = holder;
        self.queued = true;
    }

    /// Leaves the queue it waits in.
    fn leave(&mut self) {
        let mut state = lock(&self.shared.routes[self.at].state);
        if state.waiters.leave(self.id) {
            // The head left: the next request may be able to go now.
            state.wake_head();
        }
        self.queued = false;
    }

    /// Leaves the queue, its maximum wait run out (the request is returned unsent).
    pub(crate) fn time_out(&mut self) {
        self.leave();
        self.left(|layer, route, _| Event::Refused {
            layer,
            route,
            reason: Refusal::WaitTooLong,
        });
    }

    /// Reports the ticket's leaving the queue.
    #[cold]
    fn left<'a>(&'a self, event: impl FnOnce(&'a str, &'a str, Duration) -> Event<'a>) {
        let waited = self.shared.clock.now().saturating_sub(self.since);
        let events = &self.shared.events;
        events.emit(self.route, |layer, route| {
            event(layer, route, Duration::from_nanos(waited))
        });
        show_figures(&self.shared, self.at);
    }

    /// A lower bound of when this ticket's turn comes.
    pub(crate) fn estimate(&self) -> Nanos {
        let route = &self.shared.routes[self.at];
        let mut guard = lock(&route.state);
        let state = &mut *guard;
        let now = state.now(&self.shared.clock);
        let ahead = state.waiters.ahead(self.id).unwrap_or(0) as u32;
        state.estimate(now, ahead, &self.costs)
    }
}

impl Drop for TurnTicket {
    fn drop(&mut self) {
        if self.queued {
            self.leave();
            self.left(|layer, route, waited| Event::GaveUp {
                layer,
                route,
                waited,
            });
        }
    }
}

/// The costs of the weighed requests holding places in a route, by key: a permit keeps only
/// the key, so that what a sent request holds stays as small as it was without weights
/// (16 bytes: a future a few bytes larger is moved with a call to `memcpy`).
#[derive(Debug, Default)]
struct Weighed {
    costs: Vec<Costs>,
    free: Vec<u32>,
}

impl Weighed {
    /// Keeps `costs`, returning their key; 0, and nothing kept, for one unit in every quota.
    #[inline]
    fn keep(&mut self, costs: Costs) -> u32 {
        if costs.is_one() {
            return 0;
        }
        self.keep_weighed(costs)
    }

    #[inline(never)]
    fn keep_weighed(&mut self, costs: Costs) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.costs[i as usize] = costs;
                i + 1
            }
            None => {
                self.costs.push(costs);
                // At most one entry per request holding a place, far fewer than 2^32.
                u32::try_from(self.costs.len()).unwrap_or(u32::MAX)
            }
        }
    }

    /// Takes back the costs kept under `key`.
    #[inline]
    fn take(&mut self, key: u32) -> Costs {
        match key.checked_sub(1) {
            None => Costs::one(),
            Some(i) => self.take_weighed(i),
        }
    }

    #[inline(never)]
    fn take_weighed(&mut self, i: u32) -> Costs {
        let costs = std::mem::replace(&mut self.costs[i as usize], Costs::one());
        self.free.push(i);
        if self.free.len() == self.costs.len() {
            // Nothing weighed holds a place: the memory goes.
            (self.costs, self.free) = (Vec::new(), Vec::new());
        }
        costs
    }
}

/// A place held by a request. Taken for a request about to be sent, or one whose turn came
/// and which is readying its own service; then held by the request sent.
///
/// Given back when the response arrives, as answered then; when the request is abandoned
/// after its send (the future dropped, or a transport error), as in flight for the layer's
/// abandoned hold and then answered, since the server may still count it; and entirely, as
/// if never taken, when the request is dropped or its service fails before it was sent.
#[derive(Debug)]
pub(crate) struct Permit {
    shared: ClientHandle,
    /// The request's route (`u16`, so that a sent request's state stays small enough to be
    /// moved without a call to `memcpy`; the builder refuses more routes).
    route: u16,
    stage: Stage,
    /// For a learnt route, the route whose state it holds its place in (its own, or the one
    /// counting the quota the server named); for any other, which holds its place in its own
    /// state, the key of what it took there if weighed ([`Weighed`]; 0: one unit in every
    /// quota).
    extra: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not sent yet: its service is being readied.
    Unsent,
    Sent,
    /// Given back.
    Settled,
}

/// What a request gets from its route in this process.
pub(crate) enum Admission {
    /// A place now: the request is sent at once.
    Now(Permit),
    /// A place in the route's queue.
    Queued(TurnTicket),
    /// Returned at once, unsent: the queue is full, or its turn is known to come too late.
    Refused(RateLimitError),
}

/// Admits a request of `costs` to route `route` at once if nobody waits and the quota
/// allows, else queues it, else refuses it: its queue is full, or (with `estimate_wait`) its
/// turn is known to come past the maximum wait. The one decision of a new request and of one
/// that falls back to this process's limit from a failed store.
#[inline]
pub(crate) fn admit(
    handle: &ClientHandle,
    route: usize,
    estimate_wait: bool,
    mut costs: Costs,
) -> Admission {
    let asked = &handle.routes[route];
    let (holder, at) = if asked.learnt {
        let holder = asked.holder();
        (holder, &handle.routes[holder])
    } else {
        (route, asked)
    };
    let mut state = lock(&at.state);
    let admission = 'decide: {
        if !costs.is_one() {
            // Only a weighed route's requests cost other than one, and a weighed route is
            // never learnt: `state` is its own.
            if let Some(error) = asked.too_high(&state, &costs) {
                break 'decide Admission::Refused(error);
            }
        }
        if let Some(permit) = Permit::try_acquire(handle, &mut state, route, holder, &mut costs) {
            break 'decide Admission::Now(permit);
        }
        let name = || handle.routes[route].name.clone();
        if let Some(max_queue) = state.queue_full(handle.config.max_queue) {
            break 'decide Admission::Refused(RateLimitError::QueueFull {
                route: name(),
                max_queue,
            });
        }
        let now = state.now(&handle.clock);
        if let (true, Some(max_wait)) = (estimate_wait, handle.config.max_wait) {
            let ahead = state.waiters.len() as u32;
            let turn = state.estimate(now, ahead, &costs);
            if turn.saturating_sub(now) > nanos(max_wait) {
                let error = RateLimitError::wait_too_long(name(), now, turn, max_wait);
                break 'decide Admission::Refused(error);
            }
        }
        Admission::Queued(TurnTicket::join(
            handle, &mut state, route, holder, now, costs,
        ))
    };
    let events = &handle.events;
    events.gauges(holder, || state.figures());
    drop(state);
    match &admission {
        Admission::Now(_) => events.emit(route, |layer, route| Event::Admitted {
            layer,
            route,
            waited: Duration::ZERO,
        }),
        Admission::Queued(_) => events.emit(route, |layer, route| Event::Queued { layer, route }),
        Admission::Refused(error) => events.emit(route, |layer, route| Event::Refused {
            layer,
            route,
            reason: error.refusal(),
        }),
    }
    admission
}

/// Sets the gauges of the state of route `holder` (a learnt route counted in another
/// route's state shows its figures under that route), for a caller that holds no lock.
pub(crate) fn show_figures(handle: &ClientShared, holder: usize) {
    let state = || lock(&handle.routes[holder].state);
    handle.events.gauges_locking(holder, state, |s| s.figures());
}

impl Permit {
    /// Admits a request of route `route` at once, to be sent at once, if nobody is queued
    /// in the state of its holder (`state`, locked) and the quota allows.
    pub(crate) fn try_acquire(
        shared: &ClientHandle,
        state: &mut ClientState,
        route: usize,
        holder: usize,
        costs: &mut Costs,
    ) -> Option<Self> {
        if !state.waiters.is_empty() {
            return None;
        }
        if state.try_take(state.last_seen, costs).is_err() {
            let now = state.now(&shared.clock);
            state.try_take(now, costs).ok()?;
        }
        let costs = std::mem::replace(costs, Costs::one());
        Some(Self {
            shared: shared.clone(),
            route: route as u16,
            stage: Stage::Sent,
            extra: Self::extra(shared, state, route, holder, costs),
        })
    }

    /// What a permit of route `route` keeps in `extra`, once its `costs` are taken in the
    /// state of `holder` (locked).
    #[inline]
    fn extra(
        shared: &ClientShared,
        state: &mut ClientState,
        route: usize,
        holder: usize,
        costs: Costs,
    ) -> u32 {
        if route != holder || shared.routes[route].learnt {
            // `compile` refused more routes than a `u16` counts.
            holder as u32
        } else {
            state.weighed.keep(costs)
        }
    }

    /// The route whose state holds its place.
    #[inline]
    fn holder(&self) -> usize {
        let route = usize::from(self.route);
        match self.shared.routes[route].learnt {
            true => self.extra as usize,
            false => route,
        }
    }

    /// What it took in its state (locked), taken back from it.
    #[inline]
    fn taken(&self, state: &mut ClientState) -> Costs {
        match self.shared.routes[usize::from(self.route)].learnt {
            true => Costs::one(),
            false => state.weighed.take(self.extra),
        }
    }

    /// The same place, for a request that still has its service to ready.
    #[cfg(feature = "redis")]
    pub(crate) fn unsent(mut self) -> Self {
        self.stage = Stage::Unsent;
        self
    }

    /// The request never left after all: its place is given back entirely.
    pub(crate) fn never_sent(mut self) {
        self.stage = Stage::Unsent;
    }

    /// The request is being sent.
    pub(crate) fn sent(&mut self) {
        self.stage = Stage::Sent;
    }

    /// The response is back: give the place back and learn what the server says.
    pub(crate) fn answered<B>(mut self, response: &Response<B>) {
        let route = &self.shared.routes[usize::from(self.route)];
        let answered = self.shared.clock.now();
        // A correction is read before the lock (it runs the caller's code), and before the
        // place counts as given back: should the caller's code panic, the permit dropped
        // holds the place as abandoned, rather than lose it.
        let said = match route.is_weighed() {
            true => route.read_costs(response),
            false => None,
        };
        self.stage = Stage::Settled;
        if route.learnt {
            return self.answered_learnt(response, answered);
        }
        // Not learnt: it holds its place in its own route's state, and `extra` is the key of
        // its costs there.
        let mut guard = lock(&route.state);
        let state = &mut *guard;
        let now = state.seen(answered);
        match route.is_weighed() {
            false => state.answer(now, &Costs::one(), None),
            true => state.answer_weighed(now, self.extra, said),
        }
        let mut learnt = None;
        if route.learn.enabled && teaches(response) {
            learnt = learn(&route.name, route.learn, state, response, now);
        }
        state.wake_head();
        let holder = usize::from(self.route);
        self.shared.events.gauges(holder, || state.figures());
        drop(guard);
        self.report(learnt);
    }

    /// Reports what the answer taught the route.
    #[inline]
    fn report(&self, learnt: Option<Learnt>) {
        if let Some(from) = learnt {
            let (route, events) = (usize::from(self.route), &self.shared.events);
            events.emit(route, |layer, route| Event::Learnt { layer, route, from });
        }
    }

    /// The answer of a request on a learnt route: its place is given back where it was taken,
    /// and what the response states is learnt by the state that counts the quota it names.
    #[inline(never)]
    fn answered_learnt<B>(&self, response: &Response<B>, answered: Nanos) {
        let (index, holder) = (usize::from(self.route), self.holder());
        let shared = &*self.shared;
        let route = &shared.routes[index];
        {
            let mut state = lock(&shared.routes[holder].state);
            let now = state.seen(answered);
            state.answer(now, &Costs::one(), None);
            state.wake_head();
            shared.events.gauges(holder, || state.figures());
        }
        if !teaches(response) {
            return;
        }
        let wall = SystemTime::now();
        let stated = headers::read(response.headers(), wall, route.learn.dialects);
        let names = &shared.config.quota_names;
        let before = route.holder();
        let placed = stated
            .quota_name()
            .and_then(|name| names.resolve(&shared.routes, index, &name));
        let target = placed.unwrap_or(before);
        // A statement about a quota it cannot place only tightens the state that counts the
        // route now; so does any statement once other routes count there too.
        let shared_state = placed.is_none() && names.placed(&shared.routes, index);
        // Requests of routes that now count here, still in flight where they counted before:
        // the server counts them in this quota too.
        let elsewhere = shared
            .routes
            .iter()
            .enumerate()
            .filter(|&(i, r)| i != target && r.learnt && r.holder() == target)
            .map(|(_, r)| lock(&r.state).limiter.in_flight())
            .fold(0u64, u64::saturating_add);
        let elsewhere = u32::try_from(elsewhere).unwrap_or(u32::MAX);
        let mut guard = lock(&shared.routes[target].state);
        let state = &mut *guard;
        let now = state.seen(answered);
        let how = Statement {
            elsewhere,
            tighten_only: shared_state,
        };
        let learnt = learn_stated(
            &route.name,
            route.learn,
            state,
            response,
            &stated,
            how,
            wall,
            now,
        );
        state.wake_head();
        shared.events.gauges(target, || state.figures());
        drop(guard);
        self.report(learnt);
        if target != before {
            // Every request still queued where the route counted before: those of this route
            // move over, the others look again and stay.
            lock(&shared.routes[before].state).waiters.wake_all();
        }
    }

    /// Gives the place back without an answer.
    #[cold]
    #[inline(never)]
    fn give_back(&mut self) {
        let dropped = self.shared.clock.now();
        let holder = self.holder();
        let mut guard = lock(&self.shared.routes[holder].state);
        let state = &mut *guard;
        let now = state.seen(dropped);
        let abandoned = match self.stage {
            Stage::Unsent => {
                let taken = self.taken(state);
                state.give_back(&taken);
                false
            }
            Stage::Sent => {
                let hold = nanos(self.shared.config.abandoned_hold);
                let taken = self.taken(state);
                state.abandon(now, hold, &taken);
                true
            }
            Stage::Settled => return,
        };
        state.wake_head();
        let route = usize::from(self.route);
        self.shared.events.gauges(holder, || state.figures());
        drop(guard);
        if abandoned {
            let events = &self.shared.events;
            events.emit(route, |layer, route| Event::Abandoned { layer, route });
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.stage != Stage::Settled {
            self.give_back();
        }
    }
}

/// Whether a response may say something about a limit: a 429, or any header field.
fn teaches<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::TOO_MANY_REQUESTS || !response.headers().is_empty()
}

/// Applies what a response says about the route's limit to its state. Out of line: the
/// answer of a response without fields stays small.
#[inline(never)]
fn learn<B>(
    route: &str,
    learn: Learn,
    state: &mut ClientState,
    response: &Response<B>,
    now: Nanos,
) -> Option<Learnt> {
    let wall = SystemTime::now();
    let stated = headers::read(response.headers(), wall, learn.dialects);
    learn_stated(
        route,
        learn,
        state,
        response,
        &stated,
        Statement::default(),
        wall,
        now,
    )
}

/// How a statement is learnt by the state that counts it.
#[derive(Debug, Default, Clone, Copy)]
struct Statement {
    /// Requests that count in the same quota, in flight but held in other states.
    elsewhere: u32,
    /// Whether it only tightens the bound in force (a statement that cannot be placed).
    tighten_only: bool,
}

/// Applies what a response states (`stated`, read at `wall`) to the state that counts it,
/// and says what it learnt from: a refusal, or header fields that bound the limit.
#[allow(clippy::too_many_arguments)]
fn learn_stated<B>(
    route: &str,
    learn: Learn,
    state: &mut ClientState,
    response: &Response<B>,
    stated: &headers::RateLimitHeaders,
    how: Statement,
    wall: SystemTime,
    now: Nanos,
) -> Option<Learnt> {
    let cap = Learn::cap(&state.rate);
    let until = |wait: Duration| now.saturating_add(nanos(wait.min(cap)));
    let mut learnt = None;
    if headers::refused_in(response.status(), response.headers(), learn.dialects) {
        let wait = learn.refusal_wait(route, response, wall);
        state.limiter.block_until(until(wait));
        learnt = Some(Learnt::TooManyRequests);
    }
    for error in &stated.malformed {
        tracing::debug!(route, %error, "ignoring a malformed rate-limit header");
    }
    // Nothing left of a limit of any unit (tokens too): no request goes until it resets.
    if let Some(reset) = stated.exhausted().and_then(|s| s.reset_after(wall)) {
        state.limiter.block_until(until(reset));
        learnt = learnt.or(Some(Learnt::Headers));
    }
    // What is stated in requests bounds the route's first quota that counts requests (none,
    // if every quota of it counts another unit).
    let requests = state.requests();
    if let (Some(tightest), Some(limiter)) = (stated.tightest_requests(), requests) {
        if let Some(reset) = tightest.reset_after(wall) {
            learnt = learnt.or(Some(Learnt::Headers));
            let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
            // The bound follows one limit: with several stated, it is not carried past its
            // reset, which another limit may outlast.
            let several = stated
                .statements
                .iter()
                .filter(|s| s.unit == headers::Unit::Requests)
                .count()
                > 1;
            let limit = tightest.limit.map(count).filter(|_| !several);
            let remaining = count(tightest.remaining).saturating_sub(how.elsewhere);
            if how.tighten_only {
                limiter.tighten(remaining, until(reset), now);
            } else {
                limiter.cap(remaining, limit, until(reset), now);
                if let (Some(_), Some(window)) = (limit, tightest.window) {
                    limiter.renews_over(nanos(window.min(cap)));
                }
            }
        }
    }
    learnt
}
