//! Response bodies that pass through unchanged while a bounded prefix of them is read for a
//! job's id and status.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::slots::{Bound, ReleaseReason};
use super::state::PlanState;
use crate::json::{self, Fields};

/// The job a create made, in the create response's extensions.
///
/// The id is read from the response body as the caller reads it, so it is known once the
/// body (or its first [`max_prefix`](super::Builder::max_prefix) bytes) has been read.
///
/// ```
/// # fn demo(response: http::Response<()>) {
/// use tower_quota::concurrency::Job;
/// if let Some(job) = response.extensions().get::<Job>() {
///     // ... read the body ...
///     println!("created {:?}", job.id());
/// }
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Job {
    id: Arc<OnceLock<Box<str>>>,
}

impl Job {
    /// The job's id, once the body has shown it.
    pub fn id(&self) -> Option<&str> {
        self.id.get().map(|id| &**id)
    }
}

/// A slot taken for a job-creating request that has been sent. Dropped without an outcome,
/// the slot stays held as an unknown outcome (the server may have created the job); in
/// in-flight mode it is given back, since the request is over.
#[derive(Debug)]
pub(crate) struct HoldGuard {
    shared: Option<Arc<PlanState>>,
    /// The slot's name in the shared store, once the store gave one.
    token: Option<StoreMember>,
}

/// A slot's name in the shared store. Boxed twice to be one word: holds live on the path
/// of every create, store or not.
pub(crate) type StoreMember = Box<String>;

impl HoldGuard {
    /// Owns a slot the caller has just taken.
    #[inline]
    pub(crate) fn new(shared: Arc<PlanState>) -> Self {
        Self {
            shared: Some(shared),
            token: None,
        }
    }

    /// The slot is held in the shared store too, as `token`.
    pub(crate) fn set_token(&mut self, token: StoreMember) {
        self.token = Some(token);
    }

    #[inline]
    pub(crate) fn release(mut self, why: ReleaseReason) {
        if let Some(shared) = self.shared.take() {
            shared.counts().release(why);
            if self.token.is_some() {
                release_token(&shared, self.token.take());
            }
        }
    }

    pub(crate) fn in_flight_mode(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.config.in_flight)
    }

    /// Hands the slot on to the response body, which gives it back when it ends or is
    /// dropped (in-flight mode).
    #[inline]
    pub(crate) fn answered(mut self) -> Option<InFlightSlot> {
        let token = self.token.take();
        self.shared.take().map(|shared| InFlightSlot(shared, token))
    }

    /// Hands the slot on (to an [`Observer`], which settles it).
    #[inline]
    fn into_parts(mut self) -> Option<(Arc<PlanState>, Option<StoreMember>)> {
        let token = self.token.take();
        self.shared.take().map(|shared| (shared, token))
    }
}

/// Gives back the slot a create held in the shared store, if any.
#[cold]
#[inline(never)]
fn release_token(shared: &PlanState, token: Option<StoreMember>) {
    if let (Some(store), Some(token)) = (&shared.store, token) {
        store.slot_release(&token);
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            if shared.config.in_flight {
                // The slot is only for the request, which is over whatever the server did.
                shared.counts().release(ReleaseReason::Abandoned);
                if self.token.is_some() {
                    release_token(&shared, self.token.take());
                }
                return;
            }
            if self.token.is_some() {
                unknown_token(&shared, self.token.take());
                return;
            }
            let now = shared.clock.now();
            shared.counts().unknown(now);
        }
    }
}

/// The outcome of a create that held a slot in the shared store, as `token`, will never be
/// read. The store holds it for the whole fleet, until a reconcile in any process accounts for
/// it or its lease runs out; this process lets its own count of it go, since no reconcile
/// elsewhere could ever give that back.
#[cold]
#[inline(never)]
fn unknown_token(shared: &PlanState, token: Option<StoreMember>) {
    if let (Some(store), Some(token)) = (&shared.store, token) {
        shared.counts().release(ReleaseReason::Store);
        store.slot_unknown(&token, shared.lease());
    }
}

/// In-flight mode: a slot given back when the response body ends or is dropped.
#[derive(Debug)]
pub(crate) struct InFlightSlot(Arc<PlanState>, Option<StoreMember>);

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.counts().release(ReleaseReason::Answered);
        if self.1.is_some() {
            release_token(&self.0, self.1.take());
        }
    }
}

/// What a response body is read for.
#[derive(Debug)]
pub(crate) enum Observe {
    /// A successful create, which holds a slot: the job's id (and status).
    Create { job: Job },
    /// One job's status.
    Status { id: Box<str> },
    /// A list of jobs.
    List,
}

/// Reads a response body's prefix for what it shows, once: when the body ends, when the
/// prefix is full, or when the body is dropped.
#[derive(Debug)]
pub(crate) struct Observer {
    shared: Arc<PlanState>,
    what: Option<Observe>,
    prefix: Vec<u8>,
    /// The name in the shared store of the slot this create holds, if any.
    token: Option<StoreMember>,
}

impl Observer {
    pub(crate) fn new(shared: Arc<PlanState>, what: Observe) -> Self {
        Self {
            shared,
            what: Some(what),
            prefix: Vec::new(),
            token: None,
        }
    }

    /// An observer that settles the slot `hold` owns.
    pub(crate) fn holding(hold: HoldGuard, what: Observe) -> Option<Self> {
        hold.into_parts().map(|(shared, token)| {
            let mut observer = Self::new(shared, what);
            observer.token = token;
            observer
        })
    }

    /// Keeps what fits of `chunk` in the prefix; reads the prefix once the body is over
    /// (`last`) or the prefix is full.
    fn feed(&mut self, chunk: &[u8], last: bool) {
        if self.what.is_none() {
            return;
        }
        let max = self.shared.config.max_prefix;
        if last && self.prefix.is_empty() {
            // The whole body in one chunk, the common case: read it where it lies.
            let what = self.what.take();
            self.settle(what, &chunk[..chunk.len().min(max)]);
            return;
        }
        let room = max - self.prefix.len();
        self.prefix
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        if last || self.prefix.len() == max {
            self.read_prefix();
        }
    }

    /// Reads the prefix (the whole body, or as much as was kept or received).
    fn read_prefix(&mut self) {
        let what = self.what.take();
        let prefix = std::mem::take(&mut self.prefix);
        self.settle(what, &prefix);
    }

    fn settle(&mut self, what: Option<Observe>, body: &[u8]) {
        let Some(what) = what else {
            return;
        };
        let shared = &self.shared;
        let config = &shared.config;
        let fields = Fields {
            id: &config.id_field,
            status: &config.status_field,
        };
        match what {
            Observe::Create { job } => {
                let seen = json::object(body, fields);
                let now = shared.clock.now();
                let Some(id) = seen.id else {
                    tracing::warn!(
                        field = &*config.id_field,
                        "no job id in a successful create's response: its slot stays held until a reconcile or the maximum job life"
                    );
                    if self.token.is_some() {
                        unknown_token(shared, self.token.take());
                    } else {
                        shared.counts().unknown(now);
                    }
                    return;
                };
                let terminal = seen.status.is_some_and(|s| config.is_terminal(&s));
                let completed = {
                    let mut slots = shared.slots();
                    let bound = slots.bind(&id, now);
                    if terminal {
                        slots.end_job(&id, ReleaseReason::Finished);
                    }
                    bound == Bound::Completed
                };
                if let (Some(store), Some(token)) = (&shared.store, self.token.take()) {
                    if terminal || completed {
                        store.slot_release(&token);
                    } else {
                        store.slot_bind(&token, &id, shared.lease());
                    }
                }
                let _ = job.id.set(id.into());
                shared.notify();
            }
            Observe::Status { id } => {
                let seen = json::object(body, fields);
                if seen.status.is_some_and(|s| config.is_terminal(&s)) {
                    shared.end_job(&id, ReleaseReason::Finished);
                }
            }
            Observe::List => {
                let now = shared.clock.now();
                let mut slots = shared.slots();
                for seen in json::array(body, fields) {
                    let (Some(id), Some(status)) = (seen.id, seen.status) else {
                        continue;
                    };
                    if config.is_terminal(&status) {
                        slots.end_job(&id, ReleaseReason::Finished);
                    } else {
                        slots.seen_active(&id, now);
                    }
                }
                drop(slots);
                shared.notify();
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        // A body dropped before its end: read what came.
        self.read_prefix();
    }
}

pin_project! {
    /// The response body of [`ConcurrencyLimitByPlanService`](super::ConcurrencyLimitByPlanService):
    /// the inner body, byte for byte and without delay.
    #[derive(Debug)]
    pub struct PlanBody<B> {
        #[pin]
        inner: B,
        watch: BodyDuty,
    }
}

/// What a response body does besides passing through: one word, so that a body nobody
/// watches costs its inner body's size and a pointer.
#[derive(Debug)]
enum BodyDuty {
    /// Nothing.
    None,
    /// Reads the body for what it shows.
    Observer(Box<Observer>),
    /// Gives a slot back when the body ends or is dropped (in-flight mode).
    Answered { _slot: InFlightSlot },
}

impl<B> PlanBody<B> {
    #[inline]
    pub(crate) fn plain(inner: B) -> Self {
        Self {
            inner,
            watch: BodyDuty::None,
        }
    }

    pub(crate) fn new(inner: B, observer: Option<Observer>) -> Self {
        Self {
            inner,
            watch: match observer {
                Some(observer) => BodyDuty::Observer(Box::new(observer)),
                None => BodyDuty::None,
            },
        }
    }

    pub(crate) fn in_flight(inner: B, answered: Option<InFlightSlot>) -> Self {
        Self {
            inner,
            watch: match answered {
                Some(answered) => BodyDuty::Answered { _slot: answered },
                None => BodyDuty::None,
            },
        }
    }

    /// The inner body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for PlanBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let BodyDuty::None = this.watch {
            return this.inner.poll_frame(cx);
        }
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match this.watch {
            BodyDuty::None => {}
            BodyDuty::Observer(observer) => match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        // Bytes and most bodies' data are one contiguous chunk.
                        observer.feed(data.chunk(), this.inner.is_end_stream());
                    }
                }
                Some(Err(_)) | None => observer.read_prefix(),
            },
            BodyDuty::Answered { .. } => {
                if frame.is_none() || this.inner.is_end_stream() {
                    *this.watch = BodyDuty::None;
                }
            }
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
