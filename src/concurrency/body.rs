//! Response bodies that pass through unchanged while a bounded prefix of them is read for a
//! job's id and status.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::json::{self, Fields};
use super::layer::Shared;
use super::slots::{HoldId, Release};
use crate::sync::lock;

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
/// the slot stays held as an unknown outcome (the server may have created the job).
#[derive(Debug)]
pub(crate) struct HoldGuard {
    shared: Arc<Shared>,
    hold: Option<HoldId>,
}

impl HoldGuard {
    pub(crate) fn new(shared: Arc<Shared>, hold: HoldId) -> Self {
        Self {
            shared,
            hold: Some(hold),
        }
    }

    pub(crate) fn release(mut self, why: Release) {
        if let Some(hold) = self.hold.take() {
            lock(&self.shared.slots).release(hold, why);
        }
    }

    fn bind(mut self, id: &str) {
        if let Some(hold) = self.hold.take() {
            let now = self.shared.clock.now();
            lock(&self.shared.slots).bind(hold, id, now);
            self.shared.changed.notify_waiters();
        }
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            lock(&self.shared.slots).unknown(hold);
        }
    }
}

/// What a response body is read for.
#[derive(Debug)]
pub(crate) enum Observe {
    /// A successful create: the job's id (and status).
    Create { hold: HoldGuard, job: Job },
    /// One job's status.
    Status { id: Box<str> },
    /// A list of jobs.
    List,
    /// In-flight mode: the slot is given back when the body ends or is dropped.
    InFlight { hold: HoldGuard },
}

#[derive(Debug)]
pub(crate) struct Observer {
    shared: Arc<Shared>,
    what: Option<Observe>,
    prefix: Vec<u8>,
}

impl Observer {
    pub(crate) fn new(shared: Arc<Shared>, what: Observe) -> Self {
        Self {
            shared,
            what: Some(what),
            prefix: Vec::new(),
        }
    }

    /// Keeps what fits of `chunk` in the prefix; reads it once full.
    fn feed(&mut self, chunk: &[u8]) {
        if matches!(self.what, None | Some(Observe::InFlight { .. })) {
            return;
        }
        let room = self.shared.config.max_prefix - self.prefix.len();
        self.prefix
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        if self.prefix.len() == self.shared.config.max_prefix {
            self.finish();
        }
    }

    /// Reads the prefix (the whole body, or as much as was kept or received).
    fn finish(&mut self) {
        let Some(what) = self.what.take() else {
            return;
        };
        let shared = &self.shared;
        let config = &shared.config;
        let fields = Fields {
            id: &config.id_field,
            status: &config.status_field,
        };
        match what {
            Observe::Create { hold, job } => {
                let seen = json::object(&self.prefix, fields);
                let Some(id) = seen.id else {
                    tracing::warn!(
                        field = &*config.id_field,
                        "no job id in a successful create's response: its slot stays held until a reconcile or the maximum job life"
                    );
                    return;
                };
                let _ = job.id.set(id.as_str().into());
                hold.bind(&id);
                if seen.status.is_some_and(|s| config.is_terminal(&s)) {
                    shared.finish(&id, Release::Finished);
                }
            }
            Observe::Status { id } => {
                let seen = json::object(&self.prefix, fields);
                if seen.status.is_some_and(|s| config.is_terminal(&s)) {
                    shared.finish(&id, Release::Finished);
                }
            }
            Observe::List => {
                let now = shared.clock.now();
                let mut slots = lock(&shared.slots);
                let mut changed = false;
                for seen in json::array(&self.prefix, fields) {
                    let (Some(id), Some(status)) = (seen.id, seen.status) else {
                        continue;
                    };
                    if config.is_terminal(&status) {
                        changed |= slots.finish(&id, Release::Finished);
                    } else {
                        slots.seen_active(&id, now);
                    }
                }
                drop(slots);
                if changed {
                    shared.changed.notify_waiters();
                }
            }
            Observe::InFlight { hold } => hold.release(Release::Answered),
        }
        self.prefix = Vec::new();
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        // A body dropped before its end: read what came.
        self.finish();
    }
}

pin_project! {
    /// The response body of [`ConcurrencyLimitByPlanService`](super::ConcurrencyLimitByPlanService):
    /// the inner body, byte for byte and without delay.
    #[derive(Debug)]
    pub struct PlanBody<B> {
        #[pin]
        inner: B,
        observer: Option<Box<Observer>>,
    }
}

impl<B> PlanBody<B> {
    pub(crate) fn new(inner: B, observer: Option<Observer>) -> Self {
        Self {
            inner,
            observer: observer.map(Box::new),
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

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(observer) = this.observer {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        // Bytes and most bodies' data are one contiguous chunk.
                        observer.feed(data.chunk());
                    }
                }
                Some(Err(_)) | None => observer.finish(),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
