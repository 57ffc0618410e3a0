//! `Backoff429` beside tower's `Retry`, on the path every request takes: no refusal, no retry.
//!
//! Both keep a clone of the request for a retry that does not come (tower's policy through
//! `clone_request`), so the numbers compare like with like. A third anchor maps tower's
//! response body into an `Either`, as a layer that may hand back a body it has read must change
//! the body type: the cost of that wrapping alone, in this build.

use std::convert::Infallible;
use std::future::{ready, Ready};

use crate::harness::{answered, either, Row};
use bytes::Bytes;
use http::{Method, Request, Response, Uri};

use http_body_util::Full;
use tower::retry::{Policy, Retry};
use tower::util::MapResponse;
use tower::{service_fn, Layer};
use tower_quota::Backoff429;

type Inner = tower::util::ServiceFn<
    fn(Request<Full<Bytes>>) -> Ready<Result<Response<Full<Bytes>>, Infallible>>,
>;

fn inner() -> Inner {
    service_fn(|_| {
        ready(Ok(Response::new(Full::new(Bytes::from_static(
            br#"{"id":"6e6e1f0a","status":"PENDING"}"#,
        )))))
    })
}

thread_local! {
    static URI: Uri = Uri::from_static("http://api.test/v2/generate");
}

fn request() -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(Bytes::from_static(br#"{"model":"lipsync-2"}"#)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = URI.with(Uri::clone);
    request
}

/// Never retries, but keeps a clone of each request as a retrying policy must.
#[derive(Clone)]
struct NoRetry;

impl<E> Policy<Request<Full<Bytes>>, Response<Full<Bytes>>, E> for NoRetry {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        _: &mut Result<Response<Full<Bytes>>, E>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(request.clone())
    }
}

/// A request answered at once, not refused, its response body read to the end.
pub(crate) fn no_retry_rows() -> Vec<Row> {
    vec![
        answered("inner service alone", inner(), request),
        answered(
            "tower Retry (no-op policy, request cloned)",
            Retry::new(NoRetry, inner()),
            request,
        ),
        answered(
            "tower Retry, body mapped into an Either",
            MapResponse::new(Retry::new(NoRetry, inner()), either),
            request,
        ),
        answered("Backoff429", Backoff429::new().layer(inner()), request),
        answered(
            "Backoff429 without a retry budget",
            Backoff429::new().budget(NoBudget).layer(inner()),
            request,
        ),
    ]
}

/// A budget that always allows, to show what tower's `TpsBudget` costs.
struct NoBudget;

impl tower::retry::budget::Budget for NoBudget {
    fn deposit(&self) {}

    fn withdraw(&self) -> bool {
        true
    }
}
