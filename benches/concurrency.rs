//! `ConcurrencyLimitByPlan` beside tower's `ConcurrencyLimit`.
//!
//! Plans are set far above what a bench holds at once, so a job request always finds a free
//! slot: the numbers are the layer's overhead per request, including reading the response
//! body (which this layer watches for the job's id). Beside the anchors, rows that only match
//! the route and map the response body into an `Either` (what every response through a layer
//! that may watch its body pays at the least, in this build).

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use futures::FutureExt;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use tower::limit::ConcurrencyLimit;
use tower::util::{MapRequest, MapResponse};
use tower::{service_fn, Layer, Service};
use tower_quota::{ConcurrencyLimitByPlan, Plan};

use crate::harness::{self, answered, drain, either, matchit_table, MakeSender, Row};

type Inner =
    tower::util::ServiceFn<fn(Request<()>) -> Ready<Result<Response<Full<Bytes>>, Infallible>>>;

/// The API: every response is a generation, as Sync's create answers.
fn inner() -> Inner {
    service_fn(|_| {
        ready(Ok(Response::new(Full::new(Bytes::from_static(
            br#"{"id":"6e6e1f0a-2d3b-4c5d-8e9f-0a1b2c3d4e5f","status":"PENDING","model":"lipsync-2"}"#,
        )))))
    })
}

const JOB_ID: &str = "6e6e1f0a-2d3b-4c5d-8e9f-0a1b2c3d4e5f";

thread_local! {
    static CREATE: Uri = Uri::from_static("http://api.test/v2/generate");
    static STATUS: Uri = Uri::from_static("http://api.test/v2/generate/0b6b8f2e-5a41");
    static OTHER: Uri = Uri::from_static("http://api.test/v2/assets");
}

fn request(method: Method, uri: &'static std::thread::LocalKey<Uri>) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri.with(Uri::clone);
    request
}

fn create() -> Request<()> {
    request(Method::POST, &CREATE)
}

fn plan(in_flight: bool) -> ConcurrencyLimitByPlan {
    let builder = ConcurrencyLimitByPlan::builder(Plan::Enterprise(1 << 30));
    if in_flight {
        builder.in_flight()
    } else {
        builder
    }
    .build()
    .unwrap()
}

fn other() -> Request<()> {
    request(Method::GET, &OTHER)
}

fn status() -> Request<()> {
    request(Method::GET, &STATUS)
}

/// A create that finds a free slot, its response body read to the end.
pub(crate) fn job_request_rows() -> Vec<Row> {
    let job_life = plan(false);
    let mut svc = job_life.layer(inner());
    let job_life_row = move || {
        let response = svc.call(black_box(create())).now_or_never().unwrap();
        drain(response.unwrap().into_body());
        job_life.complete(JOB_ID);
    };
    vec![
        answered("inner service alone", inner(), create),
        polled_ready(
            "tower ConcurrencyLimit",
            ConcurrencyLimit::new(inner(), 1 << 30),
        ),
        polled_ready(
            "tower ConcurrencyLimit + matchit lookup, body mapped into an Either",
            MapResponse::new(looked_up(ConcurrencyLimit::new(inner(), 1 << 30)), either),
        ),
        answered(
            "ConcurrencyLimitByPlan in-flight mode",
            plan(true).layer(inner()),
            create,
        ),
        (
            "ConcurrencyLimitByPlan job life (id read, then complete)",
            Box::new(job_life_row),
        ),
    ]
}

/// A row that sends a create through `svc`, driven ready first as tower's limiter needs, and
/// reads the body.
fn polled_ready<S, B>(name: &'static str, mut svc: S) -> Row
where
    S: Service<Request<()>, Response = Response<B>> + 'static,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Unpin,
{
    let waker = futures::task::noop_waker();
    let send = move || {
        let mut cx = std::task::Context::from_waker(&waker);
        let _ = svc.poll_ready(&mut cx);
        let response = svc.call(black_box(create())).now_or_never().unwrap();
        drain(response.unwrap().into_body())
    };
    (name, Box::new(send))
}

/// A request on a route that holds no slot, its response body read to the end.
pub(crate) fn other_request_rows() -> Vec<Row> {
    let router = matchit_table();
    let mut svc = inner();
    let matchit_row = move || {
        let request = black_box(other());
        black_box(router.at(request.uri().path()).ok());
        let response = svc.call(request);
        drain(response.now_or_never().unwrap().unwrap().into_body())
    };
    vec![
        answered("inner service alone", inner(), other),
        ("inner + matchit lookup", Box::new(matchit_row)),
        answered(
            "matchit lookup, body mapped into an Either",
            MapResponse::new(looked_up(inner()), either),
            other,
        ),
        answered(
            "ConcurrencyLimitByPlan, unmatched route",
            plan(false).layer(inner()),
            other,
        ),
        answered(
            "ConcurrencyLimitByPlan, status of a job not held",
            plan(false).layer(inner()),
            status,
        ),
    ]
}

/// `svc`, after a matchit lookup of each request's path.
fn looked_up<S>(svc: S) -> MapRequest<S, impl FnMut(Request<()>) -> Request<()>> {
    let router = matchit_table();
    MapRequest::new(svc, move |request: Request<()>| {
        black_box(router.at(request.uri().path()).ok());
        request
    })
}

/// 64 tasks on a 2-worker runtime, all creating jobs through one shared plan.
pub(crate) fn contended(c: &mut Criterion) {
    let runtime = harness::runtime();
    let mut group = harness::group(c, "concurrency_contended_64_tasks_2_workers");
    let run = |make: MakeSender, iters: u64| harness::contended(&runtime, make, iters);

    let limit = ConcurrencyLimit::new(inner(), 1 << 30);
    group.bench_function(
        BenchmarkId::new("tower ConcurrencyLimit", harness::TASKS),
        |b| {
            let limit = limit.clone();
            let make: MakeSender = Arc::new(move || {
                let mut svc = limit.clone();
                let waker = futures::task::noop_waker();
                Box::new(move || {
                    let mut cx = std::task::Context::from_waker(&waker);
                    let _ = svc.poll_ready(&mut cx);
                    let response = svc.call(create()).now_or_never().unwrap();
                    drain(response.unwrap().into_body());
                })
            });
            b.iter_custom(|iters| run(make.clone(), iters))
        },
    );
    let in_flight = plan(true);
    group.bench_function(
        BenchmarkId::new("ConcurrencyLimitByPlan in-flight mode", harness::TASKS),
        |b| {
            let plan = in_flight.clone();
            let make: MakeSender = Arc::new(move || {
                let mut svc = plan.layer(inner());
                Box::new(move || {
                    let response = svc.call(create()).now_or_never().unwrap();
                    drain(response.unwrap().into_body());
                })
            });
            b.iter_custom(|iters| run(make.clone(), iters))
        },
    );
    group.finish();
}
