//! [`Backoff429Service`]: where each request's retries are set up.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::BackoffBody;
use super::error::BackoffError;
use super::future::ResponseFuture;
use super::layer::BackoffConfig;
use super::replay::ReplayBody;
use crate::error::ConfigError;
use crate::BoxError;

/// The service made by a [`Backoff429`](super::Backoff429) layer.
///
/// A retry sends a copy of the request, so the body must be one that can be sent again
/// ([`ReplayBody`]: every `Clone` body, such as `Full<Bytes>`, `String` or `Bytes`): a
/// streaming body (hyper's `Incoming`, axum's `Body`) does not compile here rather than
/// silently never being retried. A layer made with
/// [`buffer_bodies`](super::Backoff429::buffer_bodies) takes any body
/// ([`BufferBodiesService`](super::BufferBodiesService)).
///
/// `poll_ready` forwards to the inner service and means what its readiness means: the
/// request's first attempt is sent with the service the caller drove ready. A retry never
/// uses that readiness: the response future keeps a clone of the inner service that is not
/// driven ready while the request reads a refusal or sleeps in backoff, so it holds no slot
/// of tower's `Buffer` and no permit of its `ConcurrencyLimit` meanwhile. When the wait ends
/// it drives its clone ready and calls it at once (see [the module docs](super#readiness)).
#[derive(Debug, Clone)]
pub struct Backoff429Service<S> {
    inner: S,
    config: Arc<BackoffConfig>,
    invalid: Option<ConfigError>,
}

impl<S> Backoff429Service<S> {
    pub(crate) fn new(inner: S, config: Arc<BackoffConfig>) -> Self {
        let invalid = config.validate().err();
        if let Some(error) = &invalid {
            tracing::error!(%error, "Backoff429 has an invalid setting: its requests will fail");
        }
        Self {
            inner,
            config,
            invalid,
        }
    }

    inner_service_accessors!();
}

impl<S, B, ResBody> Service<Request<B>> for Backoff429Service<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<BackoffBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline(always)]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let replayable = if self.invalid.is_some() || self.config.transient {
            match self.prepare(&mut request) {
                Ok(replayable) => replayable,
                Err(error) => return ResponseFuture::failed(error),
            }
        } else {
            // Read only when transient failures are retried.
            false
        };
        self.config.budget.deposit();
        // The copy is sent and the original kept: the request is not moved twice. A request
        // whose body gives no copy is sent itself, once.
        let (future, template) = match B::replay_request(&request) {
            Some(copy) => (self.inner.call(copy), Some(request)),
            None => (self.inner.call(request), None),
        };
        ResponseFuture::new(future, template, &self.inner, &self.config, replayable)
    }
}

impl<S> Backoff429Service<S> {
    /// For a layer with an invalid setting, or one that retries transient failures (which may
    /// add an idempotency key): whether the request may be sent again after a failure that
    /// may have been processed.
    #[inline(never)]
    fn prepare<B>(&self, request: &mut Request<B>) -> Result<bool, BoxError> {
        if let Some(error) = &self.invalid {
            return Err(BackoffError::Config(error.clone()).into());
        }
        let method = request.method().clone();
        Ok(super::decide::prepare(
            &self.config,
            &method,
            request.headers_mut(),
        ))
    }
}
