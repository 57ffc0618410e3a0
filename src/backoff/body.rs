//! Response bodies: passed through, or (for a response whose body was read to classify it)
//! the frames read followed by the rest.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`Backoff429Service`](super::Backoff429Service): the whole body
    /// of the answer the caller gets, whether or not this layer read part of it. Its frames
    /// are the inner body's, as the inner body gave them (same data type, trailers included).
    pub struct BackoffBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        // Passed through, untouched.
        Inner { #[pin] body: B },
        // A body this layer began to read: the frames it read, as they came, then the rest.
        // Boxed: only a refusal handed back comes here, and it keeps the body small.
        Read { read: Box<Read<B>> },
    }
}

/// The frames this layer read from a body, and the rest of it.
struct Read<B: Body> {
    frames: VecDeque<Frame<B::Data>>,
    rest: Option<Pin<Box<B>>>,
}

impl<B: Body + fmt::Debug> fmt::Debug for BackoffBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("BackoffBody");
        match &self.kind {
            Kind::Inner { body } => out.field("inner", body),
            Kind::Read { read } => out
                .field("frames_read", &read.frames.len())
                .field("rest", &read.rest),
        }
        .finish()
    }
}

impl<B: Body> BackoffBody<B> {
    #[inline]
    pub(crate) fn new(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// The frames already `read` from the start of the body, then what is left of `rest`.
    pub(crate) fn read(read: VecDeque<Frame<B::Data>>, rest: Option<Pin<Box<B>>>) -> Self {
        Self {
            kind: Kind::Read {
                read: Box::new(Read { frames: read, rest }),
            },
        }
    }
}

impl<B> Body for BackoffBody<B>
where
    B: Body,
{
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Read { read } => {
                let Read { frames: read, rest } = &mut **read;
                if let Some(frame) = read.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                match rest.as_mut() {
                    Some(rest) => rest.as_mut().poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Read { read } => {
                let Read { frames: read, rest } = &**read;
                read.is_empty() && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let (read, rest) = match &self.kind {
            Kind::Inner { body } => return body.size_hint(),
            Kind::Read { read } => (&read.frames, &read.rest),
        };
        let read: u64 = read
            .iter()
            .filter_map(|frame| frame.data_ref())
            .map(|data| data.remaining() as u64)
            .sum();
        let mut hint = rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
        // Upper first: a lower bound above the upper one would panic.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + read);
        }
        hint.set_lower(hint.lower() + read);
        hint
    }
}
