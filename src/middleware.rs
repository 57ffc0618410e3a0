//! The three layers as [`reqwest_middleware::Middleware`]s, for reqwest 0.12 with
//! reqwest-middleware 0.4 (feature `reqwest-middleware`).
//!
//! Each middleware is made from a layer ([`RateLimitMiddleware::new`], or `From`) and drives
//! the layer's own handle ([`RateLimitByRoute::acquire`], [`ConcurrencyLimitByPlan::acquire`],
//! [`Backoff429::retries`]): a request through the middleware waits in the same queues and
//! counts against the same quotas, slots and retry budget as one through the layer or any of
//! its clones, so a program may use both ways at once with one set of counters.
//!
//! ```no_run
//! use reqwest_middleware::ClientBuilder;
//! use tower_quota::middleware::{BackoffMiddleware, PlanMiddleware, RateLimitMiddleware};
//! use tower_quota::presets::sync;
//! use tower_quota::Plan;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let limits = sync::rate_limits().build()?;
//! let plan = sync::plan(Plan::Creator).build()?;
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     // The order of a tower stack, outermost first: a retry waits for its turn again.
//!     .with(BackoffMiddleware::new(sync::backoff()))
//!     .with(PlanMiddleware::new(plan.clone()))
//!     .with(RateLimitMiddleware::new(limits.clone()))
//!     .build();
//! let response = client
//!     .post("https://api.sync.so/v2/generate")
//!     .header("x-api-key", "...")
//!     .body(r#"{"model":"lipsync-2"}"#)
//!     .send()
//!     .await?;
//! let created = response.text().await?; // read the create's body: its job id binds the slot
//! # drop(created);
//! # Ok(())
//! # }
//! ```
//!
//! What each does with a response, and what it leaves to the caller:
//!
//! - [`RateLimitMiddleware`] gives the request's place back when the response head arrives,
//!   learning from it; a request that fails in transport is held as abandoned.
//! - [`PlanMiddleware`] wraps the response body as the layer does, reading the job's id from
//!   a create's body as the caller reads it (the response carries a
//!   [`Job`](crate::concurrency::Job) in its extensions): read the create's body to its end,
//!   or the slot stays held until a reconcile or its lease.
//! - [`BackoffMiddleware`] retries what the layer retries; a request whose body cannot be
//!   cloned (`reqwest::Request::try_clone` is `None`, a streaming body) is sent once, its
//!   answer handed back, with a `debug` event. A refusal handed back keeps its whole body.
//!   Errors of the middlewares below it (a full queue, a failed store) are never retried.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use http::Extensions;
use http_body_util::BodyExt;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::backoff::{BackoffBody, Decision};
use crate::rate_limit::Wait;
use crate::{Backoff429, BoxError, ConcurrencyLimitByPlan, RateLimitByRoute};

type Result<T> = reqwest_middleware::Result<T>;
type Handled<'a> = Pin<Box<dyn Future<Output = Result<Response>> + Send + 'a>>;

/// [`RateLimitByRoute`] (client mode) as a reqwest middleware.
#[derive(Debug, Clone)]
pub struct RateLimitMiddleware(RateLimitByRoute<Wait>);

/// [`ConcurrencyLimitByPlan`] as a reqwest middleware.
#[derive(Debug, Clone)]
pub struct PlanMiddleware(ConcurrencyLimitByPlan);

/// [`Backoff429`] as a reqwest middleware.
#[derive(Debug, Clone)]
pub struct BackoffMiddleware<M = crate::backoff::ReplayBodies>(Backoff429<M>);

impl RateLimitMiddleware {
    /// The middleware of `limits` (a clone of the layer shares its counters).
    pub fn new(limits: RateLimitByRoute<Wait>) -> Self {
        Self(limits)
    }
}

impl PlanMiddleware {
    /// The middleware of `plan` (a clone of the layer shares its slots).
    pub fn new(plan: ConcurrencyLimitByPlan) -> Self {
        Self(plan)
    }
}

impl<M> BackoffMiddleware<M> {
    /// The middleware of `backoff` (a clone of the layer shares its retry budget). How the
    /// layer replays bodies does not apply: reqwest's own `try_clone` decides.
    pub fn new(backoff: Backoff429<M>) -> Self {
        Self(backoff)
    }
}

impl From<RateLimitByRoute<Wait>> for RateLimitMiddleware {
    fn from(limits: RateLimitByRoute<Wait>) -> Self {
        Self::new(limits)
    }
}

impl From<ConcurrencyLimitByPlan> for PlanMiddleware {
    fn from(plan: ConcurrencyLimitByPlan) -> Self {
        Self::new(plan)
    }
}

impl<M> From<Backoff429<M>> for BackoffMiddleware<M> {
    fn from(backoff: Backoff429<M>) -> Self {
        Self::new(backoff)
    }
}

/// Whether a request certainly never left: reqwest could not connect. (A timeout, or an
/// error while the request was being written or read, leaves it in doubt.)
fn never_left(error: &reqwest_middleware::Error) -> bool {
    matches!(error, reqwest_middleware::Error::Reqwest(error) if error.is_connect())
}

/// A copy of a response's head, for the handles.
fn head(response: &Response) -> http::Response<()> {
    let mut head = http::Response::new(());
    *head.status_mut() = response.status();
    *head.version_mut() = response.version();
    *head.headers_mut() = response.headers().clone();
    head
}

/// An error of this crate as reqwest-middleware's, keeping its type for a `downcast_ref` on
/// the `anyhow::Error` inside.
fn middleware_error(error: BoxError) -> reqwest_middleware::Error {
    macro_rules! as_own {
        ($error:expr, $($ty:ty),*) => {{
            let error = $error;
            $(
                let error = match error.downcast::<$ty>() {
                    Ok(own) => return reqwest_middleware::Error::middleware(*own),
                    Err(error) => error,
                };
            )*
            error
        }};
    }
    let error = as_own!(
        error,
        crate::rate_limit::RateLimitError,
        crate::concurrency::ConcurrencyError,
        crate::backoff::BackoffError,
        crate::store::StoreError,
        crate::ConfigError
    );
    reqwest_middleware::Error::middleware(Failed(error))
}

/// Any other error of a handle (a path that is not a request target).
#[derive(Debug)]
struct Failed(BoxError);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A response rebuilt around a new body, keeping its URL.
fn rebuild<B>(url: reqwest::Url, response: http::Response<B>) -> Response
where
    B: http_body::Body + Send + Sync + 'static,
    B::Data: Into<bytes::Bytes>,
    B::Error: Into<BoxError>,
{
    use reqwest::ResponseBuilderExt;
    let (mut parts, body) = response.into_parts();
    if let Ok(with_url) = http::Response::builder().url(url).body(()) {
        parts.extensions.extend(with_url.into_parts().0.extensions);
    }
    Response::from(http::Response::from_parts(parts, reqwest::Body::wrap(body)))
}

impl Middleware for RateLimitMiddleware {
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        request: Request,
        extensions: &'b mut Extensions,
        next: Next<'c>,
    ) -> Handled<'d>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        Box::pin(async move {
            let (method, path) = (request.method(), request.url().path());
            let permit = match self.0.weighs() {
                // A route weighs its requests by their fields or extensions: they go along.
                true => {
                    self.0
                        .acquire_with_head(method, path, request.headers(), extensions)
                        .await
                }
                false => self.0.acquire(method, path).await,
            }
            .map_err(middleware_error)?;
            match next.run(request, extensions).await {
                Ok(response) => {
                    permit.finish_head(head(&response)).await;
                    Ok(response)
                }
                Err(error) => {
                    if never_left(&error) {
                        permit.not_sent().await;
                    }
                    // Any other error drops the permit: the request is held as abandoned.
                    Err(error)
                }
            }
        })
    }
}

impl Middleware for PlanMiddleware {
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        request: Request,
        extensions: &'b mut Extensions,
        next: Next<'c>,
    ) -> Handled<'d>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        Box::pin(async move {
            let permit = self
                .0
                .acquire_with_headers::<reqwest::Body>(
                    request.method(),
                    request.url().path(),
                    request.headers(),
                )
                .await
                .map_err(middleware_error)?;
            let response = match next.run(request, extensions).await {
                Ok(response) => response,
                Err(error) => {
                    if never_left(&error) {
                        permit.not_sent().await;
                    }
                    // Any other error drops the permit: a create's outcome is unknown.
                    return Err(error);
                }
            };
            let url = response.url().clone();
            let response = permit
                .finish(http::Response::from(response))
                .await
                .map_err(middleware_error)?;
            Ok(rebuild(url, response))
        })
    }
}

impl<M: Send + Sync + 'static> Middleware for BackoffMiddleware<M> {
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        mut request: Request,
        extensions: &'b mut Extensions,
        next: Next<'c>,
    ) -> Handled<'d>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        Box::pin(async move {
            let method = request.method().clone();
            let mut retries = self
                .0
                .retries(&method, request.headers_mut())
                .map_err(|error| middleware_error(error.into()))?;
            loop {
                let Some(copy) = request.try_clone() else {
                    tracing::debug!(
                        "a request whose body cannot be cloned is sent once, never retried"
                    );
                    return next.run(request, extensions).await;
                };
                let sent = next.clone().run(copy, extensions);
                let answer = match retries.deadline() {
                    Some(at) => match tokio::time::timeout_at(at, sent).await {
                        Ok(answer) => answer,
                        Err(_) => {
                            return Err(middleware_error(retries.deadline_exceeded().into()));
                        }
                    },
                    None => sent.await,
                };
                let response = match answer {
                    // Only reqwest's own errors may be transient: a middleware's below (a
                    // full queue, a failed store) is never retried.
                    Err(reqwest_middleware::Error::Reqwest(error)) => {
                        match retries.decide_error() {
                            Decision::Retry(wait) => {
                                tracing::debug!(%error, "retrying after a transport error");
                                tokio::time::sleep(wait).await;
                                continue;
                            }
                            _ => return Err(error.into()),
                        }
                    }
                    Err(error) => return Err(error),
                    Ok(response) => response,
                };
                // Only these may be retried: every other answer goes back without a copy of
                // its head.
                if !matches!(response.status().as_u16(), 403 | 429 | 502..=504) {
                    return Ok(record(response, &retries));
                }
                let head = head(&response).into_parts().0;
                if !retries.may_retry(&head) {
                    return Ok(record(response, &retries));
                }
                let url = response.url().clone();
                let (parts, body) = http::Response::from(response).into_parts();
                let bounds = (retries.max_body(), retries.max_read_frames());
                let reading = read_start(body, bounds, retries.max_read_time());
                let read = match retries.deadline() {
                    Some(at) => tokio::time::timeout_at(at, reading)
                        .await
                        .map_err(|_| middleware_error(retries.deadline_exceeded().into()))?,
                    None => reading.await,
                };
                let (read, frames, rest) = read.map_err(middleware_error)?;
                match retries.decide(&head, &read) {
                    Decision::Retry(wait) => tokio::time::sleep(wait).await,
                    Decision::Fail(error) => return Err(middleware_error(error.into())),
                    _ => {
                        let body = BackoffBody::read(frames, rest);
                        let response = rebuild(url, http::Response::from_parts(parts, body));
                        return Ok(record(response, &retries));
                    }
                }
            }
        })
    }
}

/// The response, with the retries so far in its extensions, as the layer records them.
fn record(mut response: Response, retries: &crate::backoff::Retries) -> Response {
    if let Some(retried) = retries.retried() {
        response.extensions_mut().insert(retried);
    }
    response
}

type Frames = VecDeque<http_body::Frame<bytes::Bytes>>;

/// Reads the start of a refusal's body for the classifier: up to `max` bytes in at most
/// `max_frames` frames, or as much as came within `max_time`. Returns the bytes read, the frames they came in, and the rest of
/// the body (`None` once it ended), so that a refusal handed back keeps its whole body.
async fn read_start(
    body: reqwest::Body,
    (max, max_frames): (usize, usize),
    max_time: std::time::Duration,
) -> std::result::Result<(Vec<u8>, Frames, Option<Pin<Box<reqwest::Body>>>), BoxError> {
    let mut body = Box::pin(body);
    let mut read = Vec::new();
    let mut frames = VecDeque::new();
    let stop = tokio::time::sleep(max_time);
    tokio::pin!(stop);
    while read.len() < max && frames.len() < max_frames {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = &mut stop => {
                tracing::debug!(?max_time, "a refusal's body stalled: deciding on what was read");
                break;
            }
        };
        match frame {
            None => return Ok((read, frames, None)),
            Some(frame) => {
                let frame = frame?;
                if let Some(data) = frame.data_ref() {
                    let room = max - read.len();
                    read.extend_from_slice(&data[..data.len().min(room)]);
                }
                frames.push_back(frame);
            }
        }
    }
    Ok((read, frames, Some(body)))
}
