//! Waiting at scale: one job slot, and a queue of 10 or 100,000 creates waiting for it. Each
//! iteration is one turn of the queue: the holder's response comes (its slot is freed), the
//! head of the queue takes the slot and is sent, and one more create joins the back; in the
//! rows "one leaves from the middle", a create picked at random in the middle half of the
//! queue also gives up (its future dropped) and another joins in its stead (four tries at
//! most, where the pick is one that left already: with 10 waiting, a few turns have none
//! leave). A queue whose every step takes constant
//! time costs the same per iteration at either length. tower's `ConcurrencyLimit` (its
//! waiters in tokio's semaphore, a linked list) runs the same turns beside it.
//!
//! `ConcurrencyLimitByPlan` and `RateLimitByRoute` keep their waiters in the same queue
//! (`src/queue.rs`). What a waiting request costs in memory is counted by
//! `tests/alloc.rs` (`a_waiting_request_costs_a_few_bytes_beyond_the_request_itself`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use tower::limit::ConcurrencyLimit;
use tower::{service_fn, Layer, Service};
use tower_quota::{ConcurrencyLimitByPlan, Plan};

use crate::harness::{drain, Row};

/// The API's answer: pending when first polled (the request is on the wire), then the
/// response.
struct OnTheWire(bool);

impl Future for OnTheWire {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if std::mem::replace(&mut self.0, true) {
            Poll::Ready(Ok(Response::new(Full::new(Bytes::from_static(
                br#"{"id":"6e6e1f0a-2d3b-4c5d-8e9f-0a1b2c3d4e5f","status":"PENDING"}"#,
            )))))
        } else {
            Poll::Pending
        }
    }
}

type Api = tower::util::ServiceFn<fn(Request<()>) -> OnTheWire>;

thread_local! {
    /// Requests the API has been sent, which tells a create on the wire from one waiting.
    static SENT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn api() -> Api {
    service_fn(|_| {
        SENT.set(SENT.get() + 1);
        OnTheWire(false)
    })
}

fn create() -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = http::Uri::from_static("http://api.test/v2/generate");
    request
}

/// Something waiting its turn that can be polled again: a create's future (this crate waits
/// inside the response future) or a service clone waiting to be ready (tower waits in
/// `poll_ready`).
trait Waiter {
    /// Polls once more: true once it has been sent.
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> bool;
    /// Polls the sent request's answer: true once it came and was read.
    fn poll_answered(&mut self, cx: &mut Context<'_>) -> bool;
}

/// A create through `ConcurrencyLimitByPlan`: one future from the queue to the answer.
struct Create<F> {
    answer: Pin<Box<F>>,
    /// Sent by the layer's `call` itself, the slot free.
    sent_at_call: bool,
}

impl<F, B, E> Waiter for Create<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body + Unpin,
    E: std::fmt::Debug,
{
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> bool {
        // The future is pending both while it waits and once it is on the wire: whether the
        // API was called tells them apart.
        let before = SENT.get();
        assert!(self.answer.as_mut().poll(cx).is_pending());
        std::mem::take(&mut self.sent_at_call) || SENT.get() > before
    }

    fn poll_answered(&mut self, cx: &mut Context<'_>) -> bool {
        match self.answer.as_mut().poll(cx) {
            Poll::Ready(answer) => {
                drain(answer.unwrap().into_body());
                true
            }
            Poll::Pending => false,
        }
    }
}

/// A clone of tower's `ConcurrencyLimit` waiting in `poll_ready`, then its sent request.
struct Readied<S: Service<Request<()>>> {
    svc: S,
    sent: Option<Pin<Box<S::Future>>>,
}

impl<S> Waiter for Readied<S>
where
    S: Service<Request<()>, Response = Response<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> bool {
        if self.svc.poll_ready(cx).is_pending() {
            return false;
        }
        let mut sent = Box::pin(self.svc.call(create()));
        assert!(sent.as_mut().poll(cx).is_pending());
        self.sent = Some(sent);
        true
    }

    fn poll_answered(&mut self, cx: &mut Context<'_>) -> bool {
        match self.sent.as_mut().map(|sent| sent.as_mut().poll(cx)) {
            Some(Poll::Ready(answer)) => {
                drain(answer.unwrap().into_body());
                // tower's permit is let go with the future.
                self.sent = None;
                true
            }
            _ => false,
        }
    }
}

/// A queue of `waiting` behind one holder, turned once per call. Built at its first call, so
/// that listing or counting other rows does not build 100,000 requests.
struct Turns<W> {
    holder: W,
    /// In the order they joined; `None` where one gave up.
    queue: VecDeque<Option<W>>,
    join: Box<dyn FnMut() -> W>,
    leave_middle: bool,
    waker: Waker,
    /// Picks who gives up (xorshift).
    seed: u64,
}

impl<W: Waiter> Turns<W> {
    fn new(mut join: Box<dyn FnMut() -> W>, waiting: usize, leave_middle: bool) -> Self {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut holder = join();
        assert!(holder.poll_sent(&mut cx), "the first create takes the slot");
        let queue = (0..waiting)
            .map(|_| {
                let mut waiter = join();
                assert!(!waiter.poll_sent(&mut cx), "the others wait");
                Some(waiter)
            })
            .collect();
        Self {
            holder,
            queue,
            join,
            leave_middle,
            waker,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn join_back(&mut self) {
        let mut cx = Context::from_waker(&self.waker);
        let mut waiter = (self.join)();
        assert!(!waiter.poll_sent(&mut cx));
        self.queue.push_back(Some(waiter));
    }

    fn turn(&mut self) {
        let mut cx = Context::from_waker(&self.waker);
        assert!(
            self.holder.poll_answered(&mut cx),
            "the holder's answer came"
        );
        let mut head = loop {
            if let Some(head) = self.queue.pop_front().flatten() {
                break head;
            }
        };
        assert!(head.poll_sent(&mut cx), "the head's turn came");
        self.holder = head;
        self.join_back();
        if self.leave_middle {
            // One waiting somewhere between the first quarter and the last gives up (a few
            // tries where one already did; the harness scans nothing).
            for _ in 0..4 {
                self.seed ^= self.seed << 13;
                self.seed ^= self.seed >> 7;
                self.seed ^= self.seed << 17;
                let len = self.queue.len();
                let at = len / 4 + (self.seed % (len as u64 / 2 + 1)) as usize;
                if let Some(gone) = self.queue.get_mut(at).filter(|w| w.is_some()) {
                    *gone = None;
                    self.join_back();
                    break;
                }
            }
        }
    }
}

fn row<W: Waiter + 'static>(
    name: &'static str,
    join: impl FnMut() -> W + 'static,
    waiting: usize,
    leave_middle: bool,
) -> Row {
    let mut join: Option<Box<dyn FnMut() -> W>> = Some(Box::new(join));
    let mut turns: Option<Turns<W>> = None;
    let send = move || {
        let turns =
            turns.get_or_insert_with(|| Turns::new(join.take().unwrap(), waiting, leave_middle));
        turns.turn();
    };
    (name, Box::new(send))
}

fn plan(name: &'static str, waiting: usize, leave_middle: bool) -> Row {
    let layer = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .in_flight()
        .max_queue(1 << 20)
        .build()
        .unwrap();
    let mut svc = layer.layer(api());
    let join = move || {
        let before = SENT.get();
        let answer = Box::pin(svc.call(create()));
        Create {
            answer,
            sent_at_call: SENT.get() > before,
        }
    };
    row(name, join, waiting, leave_middle)
}

fn tower(name: &'static str, waiting: usize, leave_middle: bool) -> Row {
    let svc = ConcurrencyLimit::new(api(), 1);
    let join = move || Readied {
        svc: svc.clone(),
        sent: None,
    };
    row(name, join, waiting, leave_middle)
}

/// The rows of group `waiting_at_scale`.
pub(crate) fn rows() -> Vec<Row> {
    vec![
        plan("ConcurrencyLimitByPlan, 10 waiting", 10, false),
        plan("ConcurrencyLimitByPlan, 100,000 waiting", 100_000, false),
        plan(
            "ConcurrencyLimitByPlan, 10 waiting, one leaves from the middle",
            10,
            true,
        ),
        plan(
            "ConcurrencyLimitByPlan, 100,000 waiting, one leaves from the middle",
            100_000,
            true,
        ),
        tower("tower ConcurrencyLimit, 10 waiting", 10, false),
        tower("tower ConcurrencyLimit, 100,000 waiting", 100_000, false),
        tower(
            "tower ConcurrencyLimit, 10 waiting, one leaves from the middle",
            10,
            true,
        ),
        tower(
            "tower ConcurrencyLimit, 100,000 waiting, one leaves from the middle",
            100_000,
            true,
        ),
    ]
}
