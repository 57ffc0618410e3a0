//! [`KeyedPlanBody`]: a response body that passes through unchanged while server mode reads
//! what it needs of it (a create's job id, a status route's job status).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::layer::KeyedPlanState;
use super::state::{Bound, Outcome, MAX_ID};
use crate::event::{Event, Freed};
use crate::json::{self, Fields};

/// What reads a body as it passes.
pub(crate) trait Reader: Send + Sync {
    /// The body's next bytes.
    fn feed(&mut self, data: &[u8]);
    /// The body ended whole.
    fn end(&mut self);
}

pin_project! {
    /// The response body of [`KeyedPlansService`](super::KeyedPlansService): the inner body,
    /// byte for byte and without delay.
    pub struct KeyedPlanBody<B> {
        #[pin]
        inner: B,
        reader: Option<Box<dyn Reader>>,
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for KeyedPlanBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedPlanBody")
            .field("inner", &self.inner)
            .field("reading", &self.reader.is_some())
            .finish()
    }
}

impl<B> KeyedPlanBody<B> {
    pub(crate) fn plain(inner: B) -> Self {
        Self {
            inner,
            reader: None,
        }
    }

    pub(crate) fn read(inner: B, reader: Box<dyn Reader>) -> Self {
        Self {
            inner,
            reader: Some(reader),
        }
    }

    /// The inner body. On a create's answer not yet read to its end, the create's slot is
    /// then held as an unknown outcome (until its lease, or
    /// [`KeyedPlans::reconcile`](super::KeyedPlans::reconcile)).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for KeyedPlanBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(reader) = this.reader.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        reader.feed(data.chunk());
                    }
                    if this.inner.is_end_stream() {
                        reader.end();
                        *this.reader = None;
                    }
                }
                None => {
                    reader.end();
                    *this.reader = None;
                }
                // Dropped as it is: a create's then reads what came before the error.
                Some(Err(_)) => *this.reader = None,
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

/// A create's slot, from its send until its answer shows how it ended. Dropped unsettled (the
/// caller gave up, the service failed, the body was dropped), it reads what came of the body:
/// a job id holds the slot as that job; else the outcome is unknown and the slot held until
/// its lease.
pub(crate) struct CreateSlot<F> {
    pub(crate) shared: Arc<KeyedPlanState<F>>,
    pub(crate) key: u64,
    /// With a shared store: the client's key there and this create's member.
    #[cfg(feature = "redis")]
    in_store: Option<(u64, String)>,
    /// Whether the answer was a success, whose body shows the job.
    success: bool,
    /// The body's first bytes.
    prefix: Vec<u8>,
    settled: bool,
}

impl<F> CreateSlot<F> {
    pub(crate) fn new(shared: Arc<KeyedPlanState<F>>, key: u64) -> Self {
        Self {
            shared,
            key,
            #[cfg(feature = "redis")]
            in_store: None,
            success: false,
            prefix: Vec::new(),
            settled: false,
        }
    }

    /// The slot is held in the shared store, for client `client` there, as `member`.
    #[cfg(feature = "redis")]
    pub(crate) fn in_store(mut self, client: u64, member: String) -> Self {
        self.in_store = Some((client, member));
        self
    }

    /// Settles the slot in the shared store, if it is held there: `op` with `args` after the
    /// member. False when it is held in this server's table.
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    fn in_store_do(&self, op: &str, args: &[String]) -> bool {
        #[cfg(feature = "redis")]
        if let (Some((client, member)), Some(store)) = (&self.in_store, &self.shared.store) {
            let mut all = vec![member.clone()];
            all.extend_from_slice(args);
            store.keyed_change(*client, op, all);
            return true;
        }
        false
    }

    /// The lease of a hold, as the store takes it.
    fn lease_arg(&self) -> String {
        #[cfg(feature = "redis")]
        return super::layer::micros(self.shared.lease());
        #[cfg(not(feature = "redis"))]
        String::new()
    }

    /// The answer's status is in: a failure settles the slot now; a success reads its body.
    pub(crate) fn answered(mut self, status: http::StatusCode) -> Option<Self> {
        if status.is_success() {
            self.success = true;
            return Some(self);
        }
        // Only a 4xx says no job was made; a 5xx, or a redirect (a 303 to the job made), may
        // have made one.
        let (outcome, by) = if status.is_client_error() {
            (Outcome::Failed, Some(Freed::CreateFailed))
        } else {
            (Outcome::Unknown, None)
        };
        self.settled = true;
        let stored = match outcome {
            Outcome::Failed => self.in_store_do("failed", &[]),
            Outcome::Unknown => self.in_store_do("unknown", &[self.lease_arg()]),
        };
        if !stored {
            let now = self.shared.clock.now();
            self.shared.slots.settle(self.key, outcome, now);
        }
        if let Some(by) = by {
            self.shared.freed(by);
        }
        None
    }

    fn settle(&mut self) {
        self.settled = true;
        let shared = &self.shared;
        let now = shared.clock.now();
        if !self.success {
            if !self.in_store_do("unknown", &[self.lease_arg()]) {
                shared.slots.settle(self.key, Outcome::Unknown, now);
            }
            return;
        }
        let fields = Fields {
            id: &shared.id_field,
            status: &shared.status_field,
        };
        let seen = json::object(&self.prefix, fields);
        let Some(id) = seen.id.filter(|id| !id.is_empty() && id.len() <= MAX_ID) else {
            tracing::debug!("a create's answer showed no job id: its slot is held until its lease");
            if !self.in_store_do("unknown", &[self.lease_arg()]) {
                shared.slots.settle(self.key, Outcome::Unknown, now);
            }
            return;
        };
        let ended = seen.status.is_some_and(|s| shared.is_terminal(&s));
        let flag = if ended { "1" } else { "0" };
        if self.in_store_do("bind", &[id.clone(), self.lease_arg(), flag.into()]) {
            if ended {
                shared.freed(Freed::Status);
            } else {
                shared
                    .events
                    .emit(0, |layer, _| Event::JobBound { layer, id: &id });
            }
            return;
        }
        match shared.slots.bind(self.key, &id, ended, now) {
            Bound::Held => shared
                .events
                .emit(0, |layer, _| Event::JobBound { layer, id: &id }),
            Bound::Ended => shared.freed(Freed::Status),
            Bound::Forgotten => {}
        }
    }
}

impl<F> Drop for CreateSlot<F> {
    fn drop(&mut self) {
        if !self.settled {
            self.settle();
        }
    }
}

impl<F: Send + Sync> Reader for CreateSlot<F> {
    fn feed(&mut self, data: &[u8]) {
        let room = self.shared.max_prefix.saturating_sub(self.prefix.len());
        self.prefix.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn end(&mut self) {
        self.settle();
    }
}

/// A status route's answer about a job its client holds: a terminal status (or a 404) gives
/// the job's slot back, once the body has been read whole.
pub(crate) struct StatusRead<F> {
    pub(crate) shared: Arc<KeyedPlanState<F>>,
    pub(crate) key: u64,
    pub(crate) id: Box<str>,
    pub(crate) prefix: Vec<u8>,
    /// With a shared store: the client's key there.
    #[cfg(feature = "redis")]
    pub(crate) client: Option<u64>,
}

impl<F> StatusRead<F> {
    /// Gives the job's slot back: the application says it is over.
    pub(crate) fn ended(&self) {
        #[cfg(feature = "redis")]
        if let (Some(client), Some(store)) = (self.client, &self.shared.store) {
            let lease = super::layer::micros(self.shared.lease());
            store.keyed_change(client, "end", vec![self.id.to_string(), lease, "0".into()]);
        }
        if self.shared.slots.end(self.key, &self.id, false) {
            self.shared.freed(Freed::Status);
        }
    }
}

impl<F: Send + Sync> Reader for StatusRead<F> {
    fn feed(&mut self, data: &[u8]) {
        let room = self.shared.max_prefix.saturating_sub(self.prefix.len());
        self.prefix.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn end(&mut self) {
        let status = json::field(&self.prefix, &self.shared.status_field);
        if status.is_some_and(|s| self.shared.is_terminal(&s)) {
            self.ended();
        }
    }
}
