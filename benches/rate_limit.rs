//! `RateLimitByRoute` beside tower's `RateLimit` and governor's keyed limiter.
//!
//! Quotas are set far above what a bench can send, so that every request takes the fast path
//! (a token is available): the numbers are the limiter's overhead per request. Beside governor,
//! governor followed by the least that holding each place until its response adds: the time
//! read after the response and recorded where every clone sees it.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{self, matchit_table, MakeSender, Row};

use criterion::{BenchmarkId, Criterion};
use futures::FutureExt;
use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota, RateLimiter};
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use tower::limit::RateLimit;
use tower::{service_fn, Layer, Service};
use tower_quota::{Quota, RateLimitByRoute};

type Inner = tower::util::ServiceFn<fn(Request<()>) -> Ready<Result<Response<()>, Infallible>>>;

fn inner() -> Inner {
    service_fn(|_| ready(Ok(Response::new(()))))
}

const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

thread_local! {
    static URI: Uri = Uri::from_static("http://api.test/v2/generate/0b6b8f2e-5a41");
}

/// A status request. Cheap to make (the URI is parsed once), so that the numbers show the
/// limiters rather than request building.
fn request() -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = URI.with(Uri::clone);
    request
}

/// The same, with an API key for server mode.
fn keyed_request() -> Request<()> {
    let mut request = request();
    request.headers_mut().insert(
        API_KEY,
        HeaderValue::from_static("sk-live-0123456789abcdef"),
    );
    request
}

const TOKENS: HeaderName = HeaderName::from_static("x-max-tokens");

/// The same status request, saying how many tokens it may spend.
fn weighted_request() -> Request<()> {
    let mut request = request();
    request
        .headers_mut()
        .insert(TOKENS, HeaderValue::from_static("700"));
    request
}

/// The tokens a request may spend.
fn tokens(head: &tower_quota::rate_limit::RequestHead<'_>) -> u32 {
    header_tokens(head.headers())
}

fn header_tokens(headers: &http::HeaderMap) -> u32 {
    let value = headers.get(TOKENS).and_then(|v| v.to_str().ok());
    value.and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// The client layer with each route weighed in tokens: one quota of tokens, or (`both`) one
/// of requests and one of tokens, corrected from the response (whose `x-usage-tokens` the
/// bench's inner service does not send, so the cost taken stands).
fn weighted_layer(paced: bool, both: bool) -> RateLimitByRoute {
    let quotas = |paced| match both {
        false => vec![huge(paced).counting("tokens")],
        true => vec![huge(paced), huge(paced).counting("tokens")],
    };
    let mut builder = RateLimitByRoute::builder()
        .route("POST /v2/generate", quotas(paced))
        .route("GET /v2/generate/{id}", quotas(paced))
        .route("GET /v2/generations", quotas(paced))
        .cost("tokens", tokens);
    if both {
        builder = builder.cost_after("tokens", |head| {
            let value = head.headers().get("x-usage-tokens")?;
            value.to_str().ok()?.parse().ok()
        });
    }
    builder.build().unwrap()
}

/// A quota no bench can exhaust, as a sliding window or paced.
fn huge(paced: bool) -> Quota {
    let quota = Quota::new(u32::MAX, Duration::from_millis(1));
    if paced {
        quota.with_burst(u32::MAX)
    } else {
        quota
    }
}

fn client_builder(paced: bool) -> tower_quota::rate_limit::Builder {
    RateLimitByRoute::builder()
        .route("POST /v2/generate", huge(paced))
        .route("GET /v2/generate/{id}", huge(paced))
        .route("GET /v2/generations", huge(paced))
        .default_quota(huge(paced))
}

fn client_layer(paced: bool) -> RateLimitByRoute {
    client_builder(paced).build().unwrap()
}

fn governor_keyed<K: std::hash::Hash + Eq + Clone>() -> DefaultKeyedRateLimiter<K> {
    RateLimiter::keyed(GovernorQuota::per_second(NonZeroU32::MAX))
}

/// A row that sends `request()` through `svc`, which answers at once.
fn sent<S>(name: &'static str, mut svc: S, request: fn() -> Request<()>) -> Row
where
    S: Service<Request<()>> + 'static,
{
    let send = move || {
        black_box(svc.call(black_box(request())).now_or_never());
    };
    (name, Box::new(send))
}

/// A status request's fast path in client mode.
pub(crate) fn client_rows() -> Vec<Row> {
    let mut rows = vec![
        sent("inner service alone", inner(), request),
        sent(
            "RateLimitByRoute (sliding window)",
            client_layer(false).layer(inner()),
            request,
        ),
        sent(
            "RateLimitByRoute (GCRA)",
            client_layer(true).layer(inner()),
            request,
        ),
        sent(
            "RateLimitByRoute (sliding window), weighted: tokens from a header",
            weighted_layer(false, false).layer(inner()),
            weighted_request,
        ),
        sent(
            "RateLimitByRoute (GCRA), weighted: tokens from a header",
            weighted_layer(true, false).layer(inner()),
            weighted_request,
        ),
        sent(
            "RateLimitByRoute (sliding window), requests and tokens, corrected",
            weighted_layer(false, true).layer(inner()),
            weighted_request,
        ),
        sent(
            "RateLimitByRoute (sliding window), an event listener",
            client_builder(false)
                .on_event(|event| {
                    black_box(event);
                })
                .build()
                .unwrap()
                .layer(inner()),
            request,
        ),
    ];
    #[cfg(feature = "metrics")]
    rows.extend(metrics_rows());
    let mut svc = RateLimit::new(
        inner(),
        tower::limit::rate::Rate::new(u64::MAX, Duration::from_secs(1)),
    );
    let waker = futures::task::noop_waker();
    rows.push((
        "tower RateLimit",
        Box::new(move || {
            let mut cx = std::task::Context::from_waker(&waker);
            let _ = svc.poll_ready(&mut cx);
            black_box(svc.call(black_box(request())).now_or_never());
        }),
    ));
    let router = matchit_table();
    let limiter = governor_keyed::<usize>();
    let mut svc = inner();
    rows.push((
        "governor keyed + matchit",
        Box::new(move || governor_sent(&router, &limiter, &mut svc)),
    ));
    let router = matchit_table();
    let limiter = governor_keyed::<usize>();
    let mut svc = inner();
    rows.push((
        "governor keyed + matchit, weighted: check_key_n with tokens from a header",
        Box::new(move || {
            let request = black_box(weighted_request());
            let route = router
                .at(request.uri().path())
                .map(|m| *m.value)
                .unwrap_or(3);
            let n = NonZeroU32::new(header_tokens(request.headers()));
            let _ = limiter.check_key_n(&route, n.unwrap_or(NonZeroU32::MIN));
            black_box(svc.call(request).now_or_never());
        }),
    ));
    let router = matchit_table();
    let limiter = governor_keyed::<usize>();
    let mut svc = inner();
    let answered = Answered::new();
    rows.push((
        "governor keyed + matchit, then the response time recorded",
        Box::new(move || {
            governor_sent(&router, &limiter, &mut svc);
            answered.record();
        }),
    ));
    rows
}

/// governor's keyed check of a request's route, then the request sent.
/// With feature `metrics` (built in, so the plain row records into the process's recorder:
/// none here, each record a no-op): the same layer recording no metrics, and recording into
/// a Prometheus recorder (its handles registered at the first request).
#[cfg(feature = "metrics")]
fn metrics_rows() -> Vec<Row> {
    let off = client_builder(false).metrics(false).build().unwrap();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let mut svc = client_layer(false).layer(inner());
    metrics::with_local_recorder(&recorder, || {
        black_box(svc.call(request()).now_or_never());
    });
    let send = move || {
        let _recorder = &recorder;
        black_box(svc.call(black_box(request())).now_or_never());
    };
    vec![
        sent(
            "RateLimitByRoute (sliding window), metrics off",
            off.layer(inner()),
            request,
        ),
        (
            "RateLimitByRoute (sliding window), metrics into Prometheus",
            Box::new(send),
        ),
    ]
}

fn governor_sent(
    router: &matchit::Router<usize>,
    limiter: &DefaultKeyedRateLimiter<usize>,
    svc: &mut Inner,
) {
    let request = black_box(request());
    let route = router
        .at(request.uri().path())
        .map(|m| *m.value)
        .unwrap_or(3);
    limiter.check_key(&route).unwrap();
    black_box(svc.call(request).now_or_never());
}

/// What a limiter that holds each place until its response (as this crate's design requires)
/// must add to governor's check at the least: the time read after the response, from tokio's
/// clock so that a paused test clock drives it, and recorded where every clone sees it.
struct Answered {
    epoch: tokio::time::Instant,
    latest: AtomicU64,
}

impl Answered {
    fn new() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            latest: AtomicU64::new(0),
        }
    }

    fn record(&self) {
        let at = tokio::time::Instant::now().saturating_duration_since(self.epoch);
        let at = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.latest.fetch_max(at, Ordering::Relaxed);
    }
}

/// A status request's fast path in server mode, keyed on `x-api-key`.
pub(crate) fn server_rows() -> Vec<Row> {
    let mut rows = vec![sent("inner service alone", inner(), keyed_request)];
    let limits = |fields: bool| {
        RateLimitByRoute::builder()
            .route("POST /v2/generate", huge(false))
            .route("GET /v2/generate/{id}", huge(false))
            .route("GET /v2/generations", huge(false))
            .default_quota(huge(false))
            .reject()
            .key_header(API_KEY)
            .rate_limit_headers(fields)
            .build()
            .unwrap()
    };
    rows.push(sent(
        "RateLimitByRoute reject, per x-api-key",
        limits(true).layer(inner()),
        keyed_request,
    ));
    rows.push(sent(
        "RateLimitByRoute reject, per x-api-key, no rate-limit fields",
        limits(false).layer(inner()),
        keyed_request,
    ));
    let router = matchit_table();
    let limiter = governor_keyed::<(usize, HeaderValue)>();
    let mut svc = inner();
    rows.push((
        "governor keyed (route, x-api-key) + matchit",
        Box::new(move || {
            let request = black_box(keyed_request());
            let route = router
                .at(request.uri().path())
                .map(|m| *m.value)
                .unwrap_or(3);
            let key = request.headers().get(API_KEY).cloned().unwrap();
            limiter.check_key(&(route, key)).unwrap();
            black_box(svc.call(request).now_or_never());
        }),
    ));
    rows
}

/// 64 tasks on a 2-worker runtime, all sending through one shared limit.
pub(crate) fn contended(c: &mut Criterion) {
    let runtime = harness::runtime();
    let mut group = harness::group(c, "contended_64_tasks_2_workers");
    let run = |make: MakeSender, iters: u64| harness::contended(&runtime, make, iters);

    for (name, paced) in [
        ("RateLimitByRoute (sliding window)", false),
        ("RateLimitByRoute (GCRA)", true),
    ] {
        let limits = client_layer(paced);
        group.bench_function(BenchmarkId::new(name, harness::TASKS), |b| {
            let limits = limits.clone();
            let make: MakeSender = Arc::new(move || {
                let mut svc = limits.layer(inner());
                Box::new(move || {
                    black_box(svc.call(request()).now_or_never());
                })
            });
            b.iter_custom(|iters| run(make.clone(), iters))
        });
    }
    let limiter = Arc::new(governor_keyed::<usize>());
    let router = Arc::new(matchit_table());
    let answered = Arc::new(Answered::new());
    for (name, record) in [
        ("governor keyed + matchit", false),
        (
            "governor keyed + matchit, then the response time recorded",
            true,
        ),
    ] {
        let (limiter, router, answered) = (limiter.clone(), router.clone(), answered.clone());
        let make: MakeSender = Arc::new(move || {
            let (limiter, router, answered) = (limiter.clone(), router.clone(), answered.clone());
            let mut svc = inner();
            Box::new(move || {
                governor_sent(&router, &limiter, &mut svc);
                if record {
                    answered.record();
                }
            })
        });
        group.bench_function(BenchmarkId::new(name, harness::TASKS), |b| {
            b.iter_custom(|iters| run(make.clone(), iters))
        });
    }
    group.finish();
}
