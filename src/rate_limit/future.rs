use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::error::RateLimitError;
use super::layer::{RejectConfig, RejectResponse, Rejection};
use super::state::{Permit, Ticket, Turn};
use crate::clock::{nanos, Nanos};
use crate::headers;
use crate::quota::Quota;
use crate::BoxError;

pin_project! {
    /// The response future of client mode: waits for the request's turn, sends it, and gives
    /// its place back (learning from the response) when the answer arrives.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        // Boxed: only a request that waits needs it, and it keeps the future small.
        queued: Option<Box<Queued<S, B>>>,
        permit: Option<Permit>,
    }
}

/// A request waiting for its turn, with the service that will send it.
struct Queued<S, B> {
    inner: S,
    request: Request<B>,
    ticket: Ticket,
    max_wait: Option<Duration>,
    /// When the maximum wait runs out, if there is one.
    deadline: Option<Nanos>,
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // In the route's queue; the timer is not made yet.
        Queued,
        // In the route's queue, with a timer for a known turn or the maximum wait (boxed,
        // made once per waiting request and reset in place).
        Waiting { sleep: Pin<Box<Sleep>> },
        // Sent.
        Called { #[pin] future: F },
        // Given back unsent.
        Failed { error: Option<RateLimitError> },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, permit: Option<Permit>) -> Self {
        Self {
            state: State::Called { future },
            queued: None,
            permit,
        }
    }

    pub(crate) fn queued(
        inner: S,
        request: Request<B>,
        ticket: Ticket,
        max_wait: Option<Duration>,
    ) -> Self {
        Self {
            state: State::Queued,
            queued: Some(Box::new(Queued {
                inner,
                request,
                deadline: max_wait.map(|max| ticket.since.saturating_add(nanos(max))),
                ticket,
                max_wait,
            })),
            permit: None,
        }
    }

    pub(crate) fn too_long(route: Arc<str>, wait: Duration, max_wait: Duration) -> Self {
        Self {
            state: State::Failed {
                error: Some(RateLimitError::WaitTooLong {
                    route,
                    wait,
                    max_wait,
                }),
            },
            queued: None,
            permit: None,
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx));
                    if let Some(permit) = this.permit.take() {
                        match &result {
                            Ok(response) => permit.finish(response),
                            // The server may have counted it: the drop gives the place back
                            // from now, like a response.
                            Err(_) => drop(permit),
                        }
                    }
                    return Poll::Ready(result.map_err(Into::into));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(error) => error.into(),
                        None => "rate limit future polled after completion".into(),
                    }));
                }
                StateProj::Queued => {
                    let Some(queued) = this.queued.as_ref() else {
                        return Poll::Ready(Err("rate limit future in an invalid state".into()));
                    };
                    let deadline = queued
                        .ticket
                        .clock()
                        .instant(queued.deadline.unwrap_or(u64::MAX));
                    this.state.set(State::Waiting {
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    });
                }
                StateProj::Waiting { sleep } => {
                    let Some(queued) = this.queued.as_mut() else {
                        return Poll::Ready(Err("rate limit future in an invalid state".into()));
                    };
                    match queued.ticket.poll_turn(cx) {
                        Turn::Admitted(permit) => {
                            if let Some(queued) = this.queued.take() {
                                let Queued {
                                    mut inner, request, ..
                                } = *queued;
                                *this.permit = Some(permit);
                                this.state.set(State::Called {
                                    future: inner.call(request),
                                });
                            }
                        }
                        Turn::Wait(turn) => {
                            let clock = *queued.ticket.clock();
                            let now = clock.now();
                            let deadline = queued.deadline;
                            if let (Some(deadline), Some(max_wait)) = (deadline, queued.max_wait) {
                                if now >= deadline {
                                    let wait =
                                        queued.ticket.estimate().max(now) - queued.ticket.since;
                                    let route = queued.ticket.route_name().clone();
                                    // Leave the queue before answering.
                                    *this.queued = None;
                                    this.state.set(State::Failed { error: None });
                                    return Poll::Ready(Err(RateLimitError::WaitTooLong {
                                        route,
                                        wait: Duration::from_nanos(wait),
                                        max_wait,
                                    }
                                    .into()));
                                }
                            }
                            let wake = match (turn, deadline) {
                                (Some(turn), Some(deadline)) => Some(turn.min(deadline)),
                                (turn, deadline) => turn.or(deadline),
                            };
                            let Some(wake) = wake else {
                                // Woken by the queue when it moves.
                                return Poll::Pending;
                            };
                            let wake = clock.instant(wake);
                            if sleep.deadline() != wake {
                                sleep.as_mut().reset(wake);
                            }
                            if sleep.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("queued", &self.queued.is_some())
            .field("sent", &self.permit.is_some())
            .finish()
    }
}

pin_project! {
    /// The response future of server mode: the inner service's, or a ready 429.
    pub struct RejectFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner { #[pin] future: F },
        Rejected { response: Option<Response<B>> },
    }
}

impl<F, B> RejectFuture<F, B> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for RejectFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx),
            KindProj::Rejected { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
        }
    }
}

impl<F, B> std::fmt::Debug for RejectFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectFuture").finish_non_exhaustive()
    }
}

/// The 429 for a refused request: the configured response, with status and header fields.
pub(crate) fn rejection<B, F: RejectResponse<B>>(
    config: &RejectConfig<F>,
    route: &Arc<str>,
    quota: Quota,
    wait: Duration,
) -> Response<B> {
    let rejection = Rejection {
        route: route.clone(),
        quota,
        retry_after: wait,
    };
    let mut response = config.body.response(&rejection);
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let fields = response.headers_mut();
    fields.insert(header::RETRY_AFTER, headers::retry_after_value(wait));
    if config.headers {
        fields.insert(
            headers::RATELIMIT_POLICY,
            headers::policy_value(route, quota.count(), quota.period()),
        );
        fields.insert(headers::RATELIMIT, headers::ratelimit_value(route, 0, wait));
    }
    response
}
