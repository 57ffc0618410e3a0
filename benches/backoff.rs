//! `Backoff429` beside tower's `Retry`, on the path every request takes: no refusal, no retry.
//!
//! Both keep a clone of the request for a retry that does not come (tower's policy through
//! `clone_request`), so the numbers compare like with like.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;

use bytes::Bytes;
use criterion::Criterion;
use futures::FutureExt;
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use tower::retry::{Policy, Retry};
use tower::{service_fn, Layer, Service};
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

fn drain<B: http_body::Body + Unpin>(mut body: B) {
    while let Some(Some(frame)) = body.frame().now_or_never() {
        black_box(frame.ok());
    }
}

pub(crate) fn no_retry(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("backoff_no_retry");
    group.bench_function("inner service alone", |b| {
        let mut svc = inner();
        b.iter(|| {
            let response = svc.call(black_box(request())).now_or_never().unwrap();
            drain(response.unwrap().into_body())
        })
    });
    group.bench_function("tower Retry (no-op policy, request cloned)", |b| {
        let mut svc = Retry::new(NoRetry, inner());
        b.iter(|| {
            let response = svc.call(black_box(request())).now_or_never().unwrap();
            drain(response.unwrap().into_body())
        })
    });
    group.bench_function("Backoff429", |b| {
        let mut svc = Backoff429::new().layer(inner());
        b.iter(|| {
            let response = svc.call(black_box(request())).now_or_never().unwrap();
            drain(response.unwrap().into_body())
        })
    });
    group.bench_function("Backoff429 without a retry budget", |b| {
        let mut svc = Backoff429::new().budget(NoBudget).layer(inner());
        b.iter(|| {
            let response = svc.call(black_box(request())).now_or_never().unwrap();
            drain(response.unwrap().into_body())
        })
    });
    group.finish();
}

/// A budget that always allows, to show what tower's `TpsBudget` costs.
struct NoBudget;

impl tower::retry::budget::Budget for NoBudget {
    fn deposit(&self) {}

    fn withdraw(&self) -> bool {
        true
    }
}
