//! The response future: sends, reads a refusal, waits, and sends again.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use http::response::Parts;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::body::BackoffBody;
use super::classify::LimitKind;
use super::decide::{next_wait, Waits};
use super::error::{is_own, BackoffError, Retried};
use super::layer::BackoffConfig;
use super::replay::ReplayBody;
use crate::headers;
use crate::BoxError;

pin_project! {
    /// The response future of [`Backoff429Service`](super::Backoff429Service).
    ///
    /// Like every response future of this crate, it panics if polled again after it returned
    /// `Poll::Ready`.
    pub struct ResponseFuture<S, B, ResBody>
    where
        S: Service<Request<B>>,
        ResBody: Body,
    {
        #[pin]
        state: State<S::Future, ResBody>,
        // What every attempt needs, whatever the state (as in tower's `Retry`); `None` only
        // for a future returned failed.
        retry: Option<Retry<S, B>>,
    }
}

pin_project! {
    /// A refusal being read.
    #[project = ReadingProj]
    struct Reading<ResBody: Body> {
        parts: Option<Parts>,
        body: Option<Pin<Box<ResBody>>>,
        // The frames read, handed on as they came.
        frames: VecDeque<Frame<ResBody::Data>>,
        // A copy of the start of their data, for the classifier.
        read: BytesMut,
        kind: Option<LimitKind>,
        // Ends the read at `max_read_time`.
        #[pin]
        timer: Sleep,
    }
}

/// What a request needs to be sent again.
struct Retry<S, B> {
    service: S,
    /// The request to send again; `None` for one whose body cannot be replayed, sent once.
    template: Option<Request<B>>,
    config: Arc<BackoffConfig>,
    /// Whether a request that may have been processed can be sent again (decided only when
    /// transient failures are retried: nothing else reads it).
    replayable: bool,
    retries: u32,
    deadline: Deadline,
    /// The waits so far; made at the first retry, so the path of every request stays small.
    waits: Option<Box<Waits>>,
    /// Its answer went back at once: the path of nearly every request marks it here, rather
    /// than move the whole state, inner future and all, to `Done`.
    answered: bool,
}

/// When a request's deadline falls, if one applies; its timer is made only once the request
/// has had to wait for something (an answer that comes at once never needs one).
enum Deadline {
    Never,
    At(Instant),
    Armed(Pin<Box<Sleep>>),
}

impl Deadline {
    /// `after` from now; a deadline too far to be an instant is none.
    #[inline]
    fn new(after: Option<Duration>) -> Self {
        match after.and_then(|after| Instant::now().checked_add(after)) {
            Some(at) => Self::At(at),
            None => Self::Never,
        }
    }

    fn at(&self) -> Option<Instant> {
        match self {
            Self::Never => None,
            Self::At(at) => Some(*at),
            Self::Armed(timer) => Some(timer.deadline()),
        }
    }

    /// Whether it has passed; if not, the task is woken when it does.
    fn passed(&mut self, cx: &mut Context<'_>) -> bool {
        if let Self::At(at) = *self {
            *self = Self::Armed(Box::pin(tokio::time::sleep_until(at)));
        }
        match self {
            Self::Armed(timer) => timer.as_mut().poll(cx).is_ready(),
            _ => false,
        }
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateReplace]
    enum State<F, ResBody: Body> {
        // An attempt in flight.
        Called { #[pin] future: F },
        // Reading a refusal's body to tell which limit it is about (boxed: only refusals
        // come here, and it keeps the future small).
        Reading { reading: Pin<Box<Reading<ResBody>>> },
        // Boxed: only a retry needs it, and it keeps the future small.
        Sleeping { sleep: Pin<Box<Sleep>> },
        // Readying the service for the next attempt.
        Readying,
        // Returned unsent.
        Failed { error: BoxError },
        // Answered.
        Done,
    }
}

impl<S, B, ResBody> ResponseFuture<S, B, ResBody>
where
    S: Service<Request<B>>,
    ResBody: Body,
{
    #[inline(always)]
    pub(crate) fn new(
        future: S::Future,
        template: Option<Request<B>>,
        service: &S,
        config: &Arc<BackoffConfig>,
        replayable: bool,
    ) -> Self
    where
        S: Clone,
    {
        Self {
            state: State::Called { future },
            retry: Some(Retry {
                template,
                service: service.clone(),
                config: config.clone(),
                replayable,
                retries: 0,
                deadline: Deadline::new(config.deadline),
                waits: None,
                answered: false,
            }),
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        Self {
            state: State::Failed { error },
            retry: None,
        }
    }
}

/// What the server asks: `Retry-After` (either form) or `retry-after-ms`; else a limit's
/// reset, in any dialect the layer reads, when the response says nothing of it is left, or,
/// for a rate-limit refusal, the reset of its tightest limit on requests. A reset on a
/// response that leaves requests (a 503 stating an hour-long window with room in it) says
/// nothing of when to come back. Garbage is ignored with an event.
pub(super) fn server_hint(parts: &Parts, dialects: headers::Dialects) -> Option<Duration> {
    let now = SystemTime::now();
    match headers::retry_after(&parts.headers, now) {
        Ok(Some(wait)) => return Some(wait),
        Ok(None) => {}
        Err(error) => tracing::debug!(%error, "ignoring it: the backoff schedule decides the wait"),
    }
    let stated = headers::read(&parts.headers, now, dialects);
    for error in &stated.malformed {
        tracing::debug!(%error, "ignoring it: the backoff schedule decides the wait");
    }
    if let Some(reset) = stated.exhausted().and_then(|s| s.reset_after(now)) {
        return Some(reset);
    }
    if headers::refused_in(parts.status, &parts.headers, dialects) {
        return stated.tightest_requests()?.reset_after(now);
    }
    None
}

impl<S, B> Retry<S, B> {
    /// How long to wait before retrying a refusal of `kind`, or `None` to give up.
    fn decide(&mut self, kind: LimitKind, hint: Option<Duration>) -> Option<Duration> {
        let deadline = self.deadline.at();
        let wait = next_wait(
            &self.config,
            kind,
            hint,
            &mut self.retries,
            &mut self.waits,
            deadline,
        )?;
        if let Some(waits) = self.waits.as_mut() {
            let attempt = self.retries.saturating_add(1);
            if waits.span.is_none() {
                waits.span = tracing::debug_span!("backoff_retry", attempt);
            } else {
                waits.span.record("attempt", attempt);
            }
        }
        Some(wait)
    }

    fn retried(&self) -> Option<Retried> {
        self.waits.as_ref().map(|waits| Retried {
            attempts: self.retries.saturating_add(1),
            waited: waits.total,
        })
    }
}

/// A 403 that says it is about a rate limit, as GitHub's do.
#[cold]
#[inline(never)]
fn forbidden_for_a_rate<T>(response: &Response<T>, dialects: headers::Dialects) -> bool {
    headers::refused_in(response.status(), response.headers(), dialects)
}

impl<S, B> Retry<S, B> {
    /// Whether `response` is one this layer may retry: a rate-limit refusal (a 429, or a 403
    /// that says so, as GitHub's do), or a transient failure when those are retried.
    #[inline]
    fn refused<T>(&self, response: &Response<T>) -> bool {
        self.maybe_refused(response.status())
            && (response.status() != StatusCode::FORBIDDEN
                || forbidden_for_a_rate(response, self.config.dialects))
    }

    /// Whether an answer with `status` may be one to retry (a 403 is, if it says so): on the
    /// path of every request, only its status is looked at.
    #[inline]
    fn maybe_refused(&self, status: StatusCode) -> bool {
        status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::FORBIDDEN
            || (self.config.transient && self.replayable && matches!(status.as_u16(), 502..=504))
    }

    /// The response the caller gets.
    #[inline]
    fn hand_back<ResBody: Body>(
        &self,
        response: Response<ResBody>,
    ) -> Response<BackoffBody<ResBody>> {
        let mut response = response.map(BackoffBody::new);
        self.record(&mut response);
        response
    }

    /// Notes the retries, if any, in the response's extensions.
    #[inline]
    fn record<T>(&self, response: &mut Response<T>) {
        if let Some(retried) = self.retried() {
            response.extensions_mut().insert(retried);
        }
    }
}

type Output<ResBody> = Result<Response<BackoffBody<ResBody>>, BoxError>;

impl<S, B, ResBody> Future for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Output = Output<ResBody>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The path of nearly every request, kept small: sent once, answered, not refused.
        if let (StateProj::Called { future }, Some(retry)) =
            (this.state.as_mut().project(), this.retry.as_mut())
        {
            if retry.answered {
                panic!("`Backoff429` `ResponseFuture` polled after completion");
            }
            match future.poll(cx) {
                Poll::Ready(Ok(response)) if !retry.maybe_refused(response.status()) => {
                    retry.answered = true;
                    return Poll::Ready(Ok(retry.hand_back(response)));
                }
                Poll::Ready(answer) => {
                    if let Some(done) = on_answer(this.state.as_mut(), retry, answer) {
                        this.state.set(State::Done);
                        return Poll::Ready(done);
                    }
                }
                Poll::Pending if matches!(retry.deadline, Deadline::Never) => {
                    return Poll::Pending;
                }
                Poll::Pending => return poll_deadline(this.state, retry, cx),
            }
        }
        let answer = poll_slow(this.state.as_mut(), this.retry, cx);
        if answer.is_ready() {
            this.state.set(State::Done);
        }
        answer
    }
}

/// For a request with a deadline that is waiting for something: ends it with
/// [`BackoffError::DeadlineExceeded`] once the deadline has passed, dropping what it waited
/// on (an attempt in flight, a refusal's body, a retry's readiness).
#[inline(never)]
fn poll_deadline<S, B, ResBody>(
    mut state: Pin<&mut State<S::Future, ResBody>>,
    retry: &mut Retry<S, B>,
    cx: &mut Context<'_>,
) -> Poll<Output<ResBody>>
where
    S: Service<Request<B>>,
    ResBody: Body,
{
    if !retry.deadline.passed(cx) {
        return Poll::Pending;
    }
    let in_flight = matches!(
        state.as_mut().project(),
        StateProj::Called { .. } | StateProj::Reading { .. }
    );
    let attempts = retry.retries.saturating_add(u32::from(in_flight));
    tracing::debug!(attempts, deadline = ?retry.config.deadline, "deadline passed: giving up");
    state.set(State::Done);
    Poll::Ready(Err(BackoffError::DeadlineExceeded {
        deadline: retry.config.deadline.unwrap_or_default(),
        attempts,
    }
    .into()))
}

/// What to do with an answer that is a refusal or an error: read it (`None`: the state moved
/// on), or hand it back.
#[inline(never)]
fn on_answer<S, B, ResBody>(
    mut state: Pin<&mut State<S::Future, ResBody>>,
    retry: &mut Retry<S, B>,
    answer: Result<Response<ResBody>, S::Error>,
) -> Option<Output<ResBody>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body,
{
    match answer {
        Ok(response) => {
            if !retry.refused(&response) {
                return Some(Ok(retry.hand_back(response)));
            }
            if retry.template.is_none() {
                super::replay::not_replayed(response.status());
                return Some(Ok(retry.hand_back(response)));
            }
            let rate =
                headers::refused_in(response.status(), response.headers(), retry.config.dialects);
            let kind = (!rate).then_some(LimitKind::Transient);
            let (parts, body) = response.into_parts();
            state.set(State::Reading {
                reading: Box::pin(Reading {
                    parts: Some(parts),
                    body: Some(Box::pin(body)),
                    frames: VecDeque::new(),
                    read: BytesMut::new(),
                    kind,
                    timer: tokio::time::sleep(retry.config.max_read_time),
                }),
            });
            None
        }
        Err(error) => {
            let error = error.into();
            let wait = (retry.config.transient
                && retry.replayable
                && retry.template.is_some()
                && !is_own(&*error))
            .then(|| retry.decide(LimitKind::Transient, None))
            .flatten();
            match wait {
                Some(wait) => {
                    state.set(State::Sleeping {
                        sleep: Box::pin(tokio::time::sleep(wait)),
                    });
                    None
                }
                None => Some(Err(error)),
            }
        }
    }
}

/// Copies `data` to the end of `read`, up to `max` bytes in all, leaving it whole to be
/// handed on as it came.
fn copy_data(data: &impl Buf, read: &mut BytesMut, max: usize) {
    let mut slices = [IoSlice::new(&[]); 16];
    let n = data.chunks_vectored(&mut slices);
    let mut copied = 0;
    for slice in &slices[..n] {
        let room = max.saturating_sub(read.len());
        let slice = &slice[..slice.len().min(room)];
        read.extend_from_slice(slice);
        copied += slice.len();
    }
    if copied < data.remaining() && read.len() < max {
        tracing::debug!(
            copied,
            remaining = data.remaining(),
            "a refusal's frame in more pieces than read at once: the classifier sees its start"
        );
    }
}

/// Everything but the first answer: reading refusals, waiting, sending again, all within
/// the deadline.
#[inline(never)]
fn poll_slow<S, B, ResBody>(
    mut state: Pin<&mut State<S::Future, ResBody>>,
    retry: &mut Option<Retry<S, B>>,
    cx: &mut Context<'_>,
) -> Poll<Output<ResBody>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    // Within the span of its retries, once it has one.
    let span = retry
        .as_ref()
        .and_then(|retry| retry.waits.as_ref())
        .map(|waits| waits.span.clone());
    let _span = span.as_ref().map(tracing::Span::enter);
    match (poll_states(state.as_mut(), retry, cx), retry) {
        (Poll::Pending, Some(retry)) => poll_deadline(state, retry, cx),
        (poll, _) => poll,
    }
}

/// The states after the first answer.
fn poll_states<S, B, ResBody>(
    mut state: Pin<&mut State<S::Future, ResBody>>,
    retry: &mut Option<Retry<S, B>>,
    cx: &mut Context<'_>,
) -> Poll<Output<ResBody>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    loop {
        match state.as_mut().project() {
            StateProj::Failed { .. } => {
                let StateReplace::Failed { error } = state.project_replace(State::Done) else {
                    unreachable!()
                };
                return Poll::Ready(Err(error));
            }
            StateProj::Done => panic!("`Backoff429` `ResponseFuture` polled after completion"),
            _ => {}
        }
        let Some(retry) = retry.as_mut() else {
            unreachable!("only a future returned failed has no retry");
        };
        match state.as_mut().project() {
            StateProj::Called { future } => {
                let answer = ready!(future.poll(cx));
                if let Some(done) = on_answer(state.as_mut(), retry, answer) {
                    return Poll::Ready(done);
                }
            }
            StateProj::Reading { reading } => {
                let ReadingProj {
                    parts,
                    body,
                    frames,
                    read,
                    kind,
                    mut timer,
                } = reading.as_mut().project();
                let config = &retry.config;
                let mut ended = false;
                if let Some(stream) = body.as_mut() {
                    while read.len() < config.max_body && frames.len() < config.max_read_frames {
                        match stream.as_mut().poll_frame(cx) {
                            Poll::Ready(Some(Ok(frame))) => {
                                if let Some(data) = frame.data_ref() {
                                    copy_data(data, read, config.max_body);
                                }
                                frames.push_back(frame);
                            }
                            Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                            Poll::Ready(None) => {
                                ended = true;
                                break;
                            }
                            Poll::Pending => {
                                ready!(timer.as_mut().poll(cx));
                                tracing::debug!(
                                    max_read_time = ?config.max_read_time,
                                    "a refusal's body stalled: deciding on what was read"
                                );
                                break;
                            }
                        }
                    }
                }
                let Some(parts) = parts.take() else {
                    unreachable!("a refusal read after it was decided");
                };
                let kind = kind.unwrap_or_else(|| (retry.config.classifier)(&parts, read));
                let hint = server_hint(&parts, retry.config.dialects);
                if let Some(wait) = retry.decide(kind, hint) {
                    state.set(State::Sleeping {
                        sleep: Box::pin(tokio::time::sleep(wait)),
                    });
                    continue;
                }
                let status = parts.status;
                if retry.config.error_on_exhaustion {
                    return Poll::Ready(Err(BackoffError::Exhausted {
                        attempts: retry.retries.saturating_add(1),
                        waited: retry.waits.as_ref().map_or(Duration::ZERO, |w| w.total),
                        status,
                    }
                    .into()));
                }
                let rest = if ended { None } else { body.take() };
                let frames = std::mem::take(frames);
                let mut response = Response::from_parts(parts, BackoffBody::read(frames, rest));
                retry.record(&mut response);
                return Poll::Ready(Ok(response));
            }
            StateProj::Sleeping { sleep } => {
                ready!(sleep.as_mut().poll(cx));
                state.set(State::Readying);
            }
            StateProj::Readying => {
                if let Err(error) = ready!(retry.service.poll_ready(cx)) {
                    return Poll::Ready(Err(error.into()));
                }
                // A copy of the request; the request itself if its body will not give one
                // again (a `ReplayBody` of the caller's), which is then the last attempt.
                let request = match retry.template.as_ref().and_then(B::replay_request) {
                    Some(copy) => copy,
                    None => retry
                        .template
                        .take()
                        .expect("only a request that can be sent again is retried"),
                };
                let future = retry.service.call(request);
                state.set(State::Called { future });
            }
            StateProj::Failed { .. } | StateProj::Done => unreachable!("handled above"),
        }
    }
}
