//! [`PlanBody`]: a response body that passes through unchanged while it carries what the plan
//! needs of it (an in-flight slot to give back at its end, or an observer reading its prefix),
//! and [`Job`], the created job's id as the body shows it.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::hold::InFlightSlot;
use super::observe::Observer;

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
///
/// A create that starts several jobs (see [`Builder::jobs_per_create`]) shows each job's id:
/// [`Job::ids`] lists them, and [`Job::id`] is the first.
///
/// [`Builder::jobs_per_create`]: super::Builder::jobs_per_create
#[derive(Debug, Clone, Default)]
pub struct Job {
    pub(super) id: Arc<OnceLock<JobIds>>,
}

/// The ids a create's body showed: one (a single create's, kept as it was read) or several.
#[derive(Debug)]
pub(super) enum JobIds {
    One(Box<str>),
    Many(Box<[Box<str>]>),
}

impl Job {
    /// The job's id (the first, for a create that started several), once the body has shown
    /// it.
    pub fn id(&self) -> Option<&str> {
        self.ids().next()
    }

    /// The ids of the jobs the create started, in the order the body showed them, once it has
    /// (none before, or when it showed none).
    pub fn ids(&self) -> impl Iterator<Item = &str> + '_ {
        let ids: &[Box<str>] = match self.id.get() {
            None => &[],
            Some(JobIds::One(id)) => std::slice::from_ref(id),
            Some(JobIds::Many(ids)) => ids,
        };
        ids.iter().map(|id| &**id)
    }
}

pin_project! {
    /// The response body of [`ConcurrencyLimitByPlanService`](super::ConcurrencyLimitByPlanService):
    /// the inner body, byte for byte and without delay.
    #[derive(Debug)]
    pub struct PlanBody<B> {
        #[pin]
        inner: B,
        duty: BodyDuty,
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
    InFlight { _slot: InFlightSlot },
}

impl<B> PlanBody<B> {
    #[inline]
    pub(crate) fn plain(inner: B) -> Self {
        Self {
            inner,
            duty: BodyDuty::None,
        }
    }

    pub(crate) fn new(inner: B, observer: Option<Observer>) -> Self {
        Self {
            inner,
            duty: match observer {
                Some(observer) => BodyDuty::Observer(Box::new(observer)),
                None => BodyDuty::None,
            },
        }
    }

    pub(crate) fn in_flight(inner: B, answered: Option<InFlightSlot>) -> Self {
        Self {
            inner,
            duty: match answered {
                Some(answered) => BodyDuty::InFlight { _slot: answered },
                None => BodyDuty::None,
            },
        }
    }

    /// The inner body, no longer read for what it shows: on a create whose body has not yet
    /// shown the job's id, the slot then stays held until a reconcile accounts for it or its
    /// lease runs out, as when the body is dropped. Read a create's body through this type.
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
        if let BodyDuty::None = this.duty {
            return this.inner.poll_frame(cx);
        }
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match this.duty {
            BodyDuty::None => {}
            BodyDuty::Observer(observer) => match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        // Bytes and most bodies' data are one contiguous chunk.
                        observer.feed(data.chunk(), this.inner.is_end_stream());
                    }
                }
                // The body ended (nothing was cut, or it was read already), or failed.
                None => observer.read_prefix(true),
                Some(Err(_)) => observer.read_prefix(false),
            },
            BodyDuty::InFlight { .. } => {
                if frame.is_none() || this.inner.is_end_stream() {
                    *this.duty = BodyDuty::None;
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
