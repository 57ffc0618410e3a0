//! Request bodies that a retry can send again: [`ReplayBody`], every `Clone` body, and
//! [`Buffered`], the body of a layer that buffers them ([`Backoff429::buffer_bodies`]).
//!
//! [`Backoff429::buffer_bodies`]: super::Backoff429::buffer_bodies

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::BackoffBody;
use super::service::Backoff429Service;
use crate::readiness::waiting_clone;
use crate::BoxError;

/// A request body that [`Backoff429`](super::Backoff429) can send again.
///
/// Every `Clone` body is one (`Full<Bytes>`, `String`, `Bytes`, `()`...): each attempt sends
/// a clone. So is [`Buffered`], which a layer made with
/// [`buffer_bodies`](super::Backoff429::buffer_bodies) sends, for any body: buffered when its
/// size is known and small enough, else streamed once and never retried. A body type of your
/// own that can be replayed without being `Clone` can implement it.
pub trait ReplayBody: Sized {
    /// A copy to send again, or `None` if this body cannot be sent twice: the request is then
    /// sent once, and its answer handed back whatever it is.
    fn replay(&self) -> Option<Self>;

    /// A copy of a whole request with this body, if the body gives one: its head cloned, its
    /// body [`replay`](Self::replay)ed. Rarely worth overriding.
    fn replay_request(request: &Request<Self>) -> Option<Request<Self>> {
        let mut copy = Request::new(request.body().replay()?);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

impl<B: Clone> ReplayBody for B {
    #[inline]
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }

    #[inline]
    fn replay_request(request: &Request<Self>) -> Option<Request<Self>> {
        Some(request.clone())
    }
}

pin_project! {
    /// The request body a layer made with
    /// [`buffer_bodies`](super::Backoff429::buffer_bodies) sends: the caller's body read
    /// whole (replayed by each retry), or the caller's body as it streams (sent once).
    pub struct Buffered<B> {
        #[pin]
        inner: Inner<B>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        Whole { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Stream { #[pin] body: B },
    }
}

impl<B> Buffered<B> {
    fn whole(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            inner: Inner::Whole {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    fn stream(body: B) -> Self {
        Self {
            inner: Inner::Stream { body },
        }
    }

    /// Whether each retry can send it again: it was read whole.
    pub fn is_buffered(&self) -> bool {
        matches!(self.inner, Inner::Whole { .. })
    }
}

impl<B> std::fmt::Debug for Buffered<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Whole { data, .. } => f
                .debug_struct("Buffered")
                .field("bytes", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Inner::Stream { .. } => f.debug_struct("Buffered").field("stream", &true).finish(),
        }
    }
}

impl<B> ReplayBody for Buffered<B> {
    fn replay(&self) -> Option<Self> {
        match &self.inner {
            Inner::Whole { data, trailers } => Some(Self {
                inner: Inner::Whole {
                    data: data.clone(),
                    trailers: trailers.clone(),
                },
            }),
            Inner::Stream { .. } => None,
        }
    }
}

impl<B> Body for Buffered<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.project() {
            InnerProj::Whole { data, trailers } => match data.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
            InnerProj::Stream { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|frame| {
                    frame
                        .map(|frame| {
                            frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                        })
                        .map_err(Into::into)
                }))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Whole { data, trailers } => data.is_none() && trailers.is_none(),
            Inner::Stream { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Whole { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Inner::Stream { body } => body.size_hint(),
        }
    }
}

/// The default mode of a [`Backoff429`](super::Backoff429) layer: request bodies are sent
/// again as their [`ReplayBody`] says (a clone of each `Clone` body).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayBodies;

/// The mode of a [`Backoff429`](super::Backoff429) layer made with
/// [`buffer_bodies`](super::Backoff429::buffer_bodies): any request body, buffered up to a
/// size.
#[derive(Debug, Clone, Copy)]
pub struct BufferBodies {
    pub(crate) max_bytes: u64,
}

/// The service of a [`Backoff429`](super::Backoff429) layer made with
/// [`buffer_bodies`](super::Backoff429::buffer_bodies): takes a request with any body, and
/// sends the service below it as a [`Buffered`] body.
///
/// A body whose size is known (its `size_hint` has an upper bound, as a `Content-Length` or
/// an empty body gives) and at most the layer's `max_bytes` is read whole first, and each
/// attempt sends it again. Any other body is streamed to the service below as it comes, once:
/// its request is not retried, and its answer (a 429 included) is handed back as it is, with
/// a `debug` event saying why. While a body is read, the request holds no readiness of the
/// service below (as while it waits for a retry).
#[derive(Debug, Clone)]
pub struct BufferBodiesService<S> {
    pub(crate) inner: Backoff429Service<S>,
    pub(crate) max_bytes: u64,
}

impl<S> BufferBodiesService<S> {
    /// The service below.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The service below, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// The service below, taken out.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S, B, ResBody> Service<Request<B>> for BufferBodiesService<S>
where
    S: Service<Request<Buffered<B>>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<BackoffBody<ResBody>>;
    type Error = BoxError;
    type Future = BufferFuture<S, B, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let fits = request
            .body()
            .size_hint()
            .upper()
            .is_some_and(|size| size <= self.max_bytes);
        if !fits {
            tracing::debug!(
                max_bytes = self.max_bytes,
                "a request body of unknown or larger size: streamed once, never retried"
            );
            let future = self.inner.call(request.map(Buffered::stream));
            return BufferFuture {
                state: BufferState::Sending { future },
            };
        }
        let (parts, body) = request.into_parts();
        BufferFuture {
            state: BufferState::Reading {
                // A body that says it is small but streams more fails at the bound, rather
                // than grow the buffer past it.
                collect: Limited::new(body, self.max_bytes as usize).collect(),
                parts: Some(parts),
                service: Some(waiting_clone(&mut self.inner)),
            },
        }
    }
}

pin_project! {
    /// The response future of [`BufferBodiesService`]: reads the request's body whole if it
    /// buffers it, then as [`ResponseFuture`](super::ResponseFuture).
    ///
    /// Like every response future of this crate, it panics if polled again after it returned
    /// `Poll::Ready`.
    pub struct BufferFuture<S, B, ResBody>
    where
        S: Service<Request<Buffered<B>>>,
        B: Body,
        B::Error: Into<BoxError>,
        ResBody: Body,
    {
        #[pin]
        state: BufferState<S, B, ResBody>,
    }
}

pin_project! {
    #[project = BufferStateProj]
    enum BufferState<S, B, ResBody>
    where
        S: Service<Request<Buffered<B>>>,
        B: Body,
        B::Error: Into<BoxError>,
        ResBody: Body,
    {
        Reading {
            #[pin]
            collect: Collect<Limited<B>>,
            parts: Option<http::request::Parts>,
            service: Option<Backoff429Service<S>>,
        },
        Readying {
            request: Option<Request<Buffered<B>>>,
            service: Backoff429Service<S>,
        },
        Sending {
            #[pin]
            future: super::ResponseFuture<S, Buffered<B>, ResBody>,
        },
    }
}

impl<S, B, ResBody> Future for BufferFuture<S, B, ResBody>
where
    S: Service<Request<Buffered<B>>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<BackoffBody<ResBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                BufferStateProj::Reading {
                    collect,
                    parts,
                    service,
                } => {
                    // A body that fails to be read fails its request with its own error: it
                    // was not sent.
                    let collected = ready!(collect.poll(cx))?;
                    let (Some(parts), Some(service)) = (parts.take(), service.take()) else {
                        panic!("`Backoff429` `BufferFuture` polled after completion");
                    };
                    let trailers = collected.trailers().cloned();
                    let body = Buffered::whole(collected.to_bytes(), trailers);
                    BufferState::Readying {
                        request: Some(Request::from_parts(parts, body)),
                        service,
                    }
                }
                BufferStateProj::Readying { request, service } => {
                    ready!(service.poll_ready(cx))?;
                    let Some(request) = request.take() else {
                        panic!("`Backoff429` `BufferFuture` polled after completion");
                    };
                    BufferState::Sending {
                        future: service.call(request),
                    }
                }
                BufferStateProj::Sending { future } => return future.poll(cx),
            };
            state.set(next);
        }
    }
}

/// Whether a request that cannot be replayed met an answer a retry would have followed: said
/// once per answer, at `debug`.
pub(crate) fn not_replayed(status: http::StatusCode) {
    tracing::debug!(
        %status,
        "a refusal of a request whose body cannot be sent again: handed back, not retried"
    );
}
