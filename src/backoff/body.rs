//! Response bodies: passed through, or (for a response whose body was read to classify it)
//! the bytes read followed by the rest.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`Backoff429Service`](super::Backoff429Service): the whole body
    /// of the answer the caller gets, whether or not this layer read part of it.
    #[derive(Debug)]
    pub struct BackoffBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        // Passed through, untouched.
        Inner { #[pin] body: B },
        // A body this layer began to read: what it read, then the rest.
        Read { read: Option<Bytes>, rest: Option<Pin<Box<B>>> },
    }
}

impl<B> BackoffBody<B> {
    #[inline]
    pub(crate) fn new(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// `read` (the start of the body, already read), then what is left of `rest`.
    pub(crate) fn read(read: Bytes, rest: Option<Pin<Box<B>>>) -> Self {
        Self {
            kind: Kind::Read {
                read: (!read.is_empty()).then_some(read),
                rest,
            },
        }
    }
}

#[inline]
fn to_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

impl<B> Body for BackoffBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => {
                let frame = std::task::ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map(to_bytes)))
            }
            KindProj::Read { read, rest } => {
                if let Some(read) = read.take() {
                    return Poll::Ready(Some(Ok(Frame::data(read))));
                }
                let Some(rest) = rest.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = std::task::ready!(rest.as_mut().poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map(to_bytes)))
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Read { read, rest } => {
                read.is_none() && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let (read, rest) = match &self.kind {
            Kind::Inner { body } => return body.size_hint(),
            Kind::Read { read, rest } => (read, rest),
        };
        let read = read.as_ref().map_or(0, |b| b.len() as u64);
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
