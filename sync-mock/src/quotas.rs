//! The route quotas on `tower-quota`'s server mode: a [`RateLimitByRoute`] that refuses
//! (`.reject()`), keyed by `x-api-key`, one route per endpoint. The mock asks it for each
//! request's verdict and answers a refusal in Sync's own body, with the wait it names.
//!
//! It counts the leaky bucket (the layer's GCRA with the bucket's burst: the same bucket,
//! the same admissions and waits) and the bucketed window (the layer's sliding window). The
//! fixed window and the exact sliding log stay counted by [`crate::limits`]: the layer has
//! no fixed window, and its sliding window, kept in 16 buckets per key so that a key's state
//! does not grow with its quota, holds a place up to a sixteenth of a period longer than an
//! exact log. Measured with the default (exact) window on the layer instead: a client of
//! the crate pacing to the documented 60 a minute met 120 429s in 180 creates, and a
//! 3-a-minute key was told `Retry-After: 64`, not 60.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, Request, Response};
use tower::{Layer, ServiceExt};
use tower_quota::rate_limit::{Reject, Rejection};
use tower_quota::{Quota, RateLimitByRoute};

use crate::config::{Algorithm, Config, Endpoint};

type Refuse = fn(&Rejection) -> Response<()>;

/// The wait a refusal names, passed from the layer's 429 to the mock's own answer.
#[derive(Clone, Copy)]
struct Wait(Duration);

fn refused(rejection: &Rejection) -> Response<()> {
    let mut response = Response::new(());
    response
        .extensions_mut()
        .insert(Wait(rejection.retry_after));
    response
}

/// What the layer said about one request.
pub(crate) enum Verdict {
    /// Admitted: `left` more could go now, all counted gone after `reset` (whole seconds, as
    /// the layer's `RateLimit` field states it).
    Pass { left: u32, reset: Duration },
    /// Refused: admitted after `wait`.
    Refuse { wait: Duration },
}

/// The endpoints' quotas, per API key.
#[derive(Debug)]
pub(crate) struct RouteQuotas {
    layer: RateLimitByRoute<Reject<Refuse>>,
}

fn quota(algorithm: Algorithm, limit: crate::config::Limit) -> Quota {
    let quota = Quota::new(limit.count, limit.period);
    match algorithm {
        Algorithm::LeakyBucket { burst } => quota.with_burst(burst.max(1)),
        _ => quota,
    }
}

impl RouteQuotas {
    /// The layer for `config`'s limits; `None` for the algorithms the mock counts itself.
    pub(crate) fn new(config: &Config) -> Option<Self> {
        if matches!(
            config.algorithm,
            Algorithm::FixedWindow | Algorithm::SlidingWindow
        ) {
            return None;
        }
        let mut builder = RateLimitByRoute::builder();
        for endpoint in Endpoint::ALL {
            builder = builder.route(
                endpoint.route(),
                quota(config.algorithm, config.limit_of(endpoint)),
            );
        }
        let layer = builder
            .reject()
            .key_header(HeaderName::from_static("x-api-key"))
            .max_keys(1024)
            .reject_with(refused as Refuse)
            .build()
            .expect("the mock's routes and limits are valid");
        Some(Self { layer })
    }

    /// Counts a request of `key` to `endpoint`.
    pub(crate) async fn hit(&self, endpoint: Endpoint, key: &str) -> Verdict {
        let (method, path) = match endpoint {
            Endpoint::Create => (Method::POST, "/v2/generate"),
            Endpoint::Get => (Method::GET, "/v2/generate/id"),
            Endpoint::List => (Method::GET, "/v2/generations"),
            Endpoint::Count => (Method::GET, "/v2/generations/count"),
        };
        let mut request = Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = axum::http::Uri::from_static(path);
        if let Ok(value) = HeaderValue::from_str(key) {
            request.headers_mut().insert("x-api-key", value);
        }
        let passed =
            tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
        let Ok(response) = self.layer.layer(passed).oneshot(request).await;
        if let Some(Wait(wait)) = response.extensions().get::<Wait>() {
            return Verdict::Refuse { wait: *wait };
        }
        let (left, reset) = response
            .headers()
            .get("ratelimit")
            .and_then(|v| v.to_str().ok())
            .and_then(ratelimit)
            .unwrap_or((0, Duration::ZERO));
        Verdict::Pass { left, reset }
    }
}

/// `r` and `t` of a `RateLimit` field: `"<name>";r=<left>;t=<seconds>`.
fn ratelimit(value: &str) -> Option<(u32, Duration)> {
    let param = |name: &str| {
        let start = value.rfind(name)? + name.len();
        let rest = &value[start..];
        let end = rest.find(';').unwrap_or(rest.len());
        rest[..end].trim().parse::<u64>().ok()
    };
    let left = u32::try_from(param(";r=")?).ok()?;
    Some((left, Duration::from_secs(param(";t=")?)))
}
