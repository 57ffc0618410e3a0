//! An attacker's and an unusual stack's attempts to break each layer, from the outside: floods,
//! nesting and path variants, forged headers, hostile retry hints and job ids, drops at random
//! moments, readiness under `Buffer` and `ConcurrencyLimit`.

#![cfg(all(feature = "axum", feature = "redis"))]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::advance;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

use crate::common::redis::{shared_redis, unique_prefix};
use crate::common::{raw, serve_with_peer as serve};

// ===== helpers =====

fn counting_handler(
    hits: &Arc<AtomicUsize>,
) -> impl Fn() -> std::future::Ready<&'static str> + Clone {
    let hits = hits.clone();
    move || {
        hits.fetch_add(1, Ordering::SeqCst);
        std::future::ready("handled")
    }
}

fn ok_service() -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> + Clone
{
    service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new("ok".to_owned())) })
}

fn keyed(path: &str, key: &str) -> Request<()> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("x-api-key", key)
        .body(())
        .unwrap()
}

async fn send<S>(svc: &mut S, request: Request<()>) -> Response<String>
where
    S: Service<Request<()>, Response = Response<String>, Error = Infallible>,
{
    svc.ready().await.unwrap().call(request).await.unwrap()
}

fn retry_after(response: &Response<String>) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

// ===== server mode over real sockets =====

/// A limiter put inside routers nested with `Router::nest` (full patterns, as the README
/// says) sees every spelling of a path that reaches a handler (`//`, trailing `/`, `./`,
/// case, `%2F`, a nested `/` route).
#[tokio::test]
async fn path_variants_through_nested_routers_are_counted() {
    let hits = Arc::new(AtomicUsize::new(0));
    let limits = RateLimitByRoute::builder()
        .route("POST /api/v2/generate", Quota::per_hour(1))
        .route("POST /svc/v2/generate", Quota::per_hour(1))
        .route("POST /root", Quota::per_hour(1))
        .route("GET /svc/v2/items/{id}", Quota::per_hour(1))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let api = Router::new()
        .route("/v2/generate", post(counting_handler(&hits)))
        .layer(limits.clone());
    let svc = Router::new()
        .route("/v2/generate", post(counting_handler(&hits)))
        .route("/v2/items/{id}", get(counting_handler(&hits)))
        .layer(limits.clone());
    let root = Router::new()
        .route("/", post(counting_handler(&hits)))
        .layer(limits.clone());
    let app = Router::new()
        .nest("/api", api)
        .nest_service("/svc", svc)
        .nest("/root", root);
    let addr = serve(app).await;
    let targets: &[(&str, &[&str])] = &[
        (
            "POST",
            &[
                "/api/v2/generate",
                "/api//v2/generate",
                "/api/v2/generate/",
                "//api/v2/generate",
                "/api/v2//generate",
                "/api/./v2/generate",
                "/API/v2/generate",
                "/api%2Fv2/generate",
                "/api/v2/generate?x=1",
            ],
        ),
        ("POST", &["/root", "/root/", "/root//", "//root"]),
    ];
    let mut escaped = Vec::new();
    for (group, (method, paths)) in targets.iter().enumerate() {
        let key = format!("attacker-{group}");
        let before = hits.load(Ordering::SeqCst);
        let mut reached = Vec::new();
        for path in *paths {
            let now = hits.load(Ordering::SeqCst);
            let answer = raw(addr, method, path, &[("x-api-key", &key)]).await;
            if hits.load(Ordering::SeqCst) > now {
                reached.push(format!("{path} -> {}", answer.status));
            }
        }
        let handled = hits.load(Ordering::SeqCst) - before;
        if handled > 1 {
            escaped.push(format!(
                "{method}: {handled} handled on a quota of 1: {reached:?}"
            ));
        }
    }
    assert!(escaped.is_empty(), "bypasses: {escaped:#?}");
}

/// A key flood that sends each fresh key its whole quota keeps every tracked client at its
/// quota: a legitimate newcomer is still admitted (before, it was refused with a `Retry-After`
/// of about an hour). Here 5 requests per fresh key on a `per_hour(5)` route, scaled down to
/// `max_keys(1024)`.
#[tokio::test(start_paused = true)]
async fn a_flood_that_sends_each_key_its_whole_quota_locks_no_newcomer_out() {
    let limits = RateLimitByRoute::builder()
        .route("POST /login", Quota::per_hour(5))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .max_keys(1024)
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    for key in 0..1100 {
        for _ in 0..5 {
            send(&mut svc, keyed("/login", &format!("flood-{key}"))).await;
        }
    }
    advance(Duration::from_secs(1)).await;
    let mut locked_out = 0;
    let mut worst = 0;
    for newcomer in 0..20 {
        let response = send(&mut svc, keyed("/login", &format!("legit-{newcomer}"))).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            locked_out += 1;
            worst = worst.max(retry_after(&response));
        }
    }
    assert_eq!(
        locked_out, 0,
        "{locked_out} of 20 newcomers locked out, told to come back in up to {worst} s"
    );
}

/// every 429 of server mode carries a Retry-After at which the same
/// client is admitted, across quota shapes (sliding window, GCRA, bursts, odd periods) and
/// request timings.
#[tokio::test(start_paused = true)]
async fn every_429_retry_after_is_truthful() {
    let quotas = [
        Quota::per_second(1),
        Quota::per_second(3),
        Quota::per_minute(7),
        Quota::per_minute(60),
        Quota::per_hour(10),
        Quota::per_second(10).with_burst(1),
        Quota::per_second(10).with_burst(3),
        Quota::per_minute(1).with_burst(2),
        Quota::new(3, Duration::from_millis(1700)),
        Quota::new(1, Duration::from_millis(1)),
    ];
    let mut seed = 0x1234_5678_9abc_def1_u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut lies = Vec::new();
    for quota in quotas {
        let limits = RateLimitByRoute::builder()
            .route("POST /x", quota)
            .reject()
            .key_header(HeaderName::from_static("x-api-key"))
            .build()
            .unwrap();
        let mut svc = limits.layer(ok_service());
        for _ in 0..60 {
            // A burst of a few requests, then a random pause.
            for _ in 0..(rand() % 5) {
                let response = send(&mut svc, keyed("/x", "k")).await;
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    let wait = retry_after(&response);
                    assert!(wait >= 1);
                    advance(Duration::from_secs(wait)).await;
                    let again = send(&mut svc, keyed("/x", "k")).await;
                    if again.status() != StatusCode::OK {
                        lies.push(format!("{quota:?}: told {wait} s, refused again"));
                    }
                }
            }
            advance(Duration::from_millis(rand() % 3000)).await;
        }
    }
    assert!(lies.is_empty(), "{lies:#?}");
}

/// `nest_service` strips its prefix segment by segment, so `/svc//v2/generate` reaches the
/// nested `/v2/generate` handler: it counts as `/svc/v2/generate` (before, it passed
/// uncounted every time), for a `POST` route, a `GET` route with a parameter and `HEAD`.
#[tokio::test]
async fn a_doubled_slash_under_nest_service_is_counted() {
    let hits = Arc::new(AtomicUsize::new(0));
    let limits = RateLimitByRoute::builder()
        .route("POST /svc/v2/generate", Quota::per_hour(1))
        .route("GET /svc/v2/items/{id}", Quota::per_hour(1))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let inner = Router::new()
        .route("/v2/generate", post(counting_handler(&hits)))
        .route("/v2/items/{id}", get(counting_handler(&hits)))
        .layer(limits);
    let addr = serve(Router::new().nest_service("/svc", inner)).await;
    let key = [("x-api-key", "attacker")];
    assert_eq!(
        raw(addr, "POST", "/svc/v2/generate", &key).await.status,
        200
    );
    assert_eq!(
        raw(addr, "POST", "/svc/v2/generate", &key).await.status,
        429
    );
    let before = hits.load(Ordering::SeqCst);
    for path in [
        "/svc//v2/generate",
        "/svc///v2/generate",
        "/svc//v2/generate",
    ] {
        let _ = raw(addr, "POST", path, &key).await;
    }
    for path in ["/svc//v2/items/a", "/svc//v2/items/a", "/svc///v2/items/b"] {
        let _ = raw(addr, "GET", path, &key).await;
    }
    let uncounted = hits.load(Ordering::SeqCst) - before;
    assert_eq!(
        uncounted, 1,
        "{uncounted} requests reached handlers over a quota of 1 each"
    );
}

// ===== Backoff429 =====

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(text: &'static str) -> TestBody {
    Full::new(Bytes::from_static(text.as_bytes())).boxed()
}

fn post_request() -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::GET)
        .uri("http://api.test/v2/generate/1")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// the deadline bounds a retry that waits for readiness. The first attempt is refused
/// with `Retry-After: 1`; while it sleeps another caller takes the only permit of a
/// `ConcurrencyLimit` below and never gives it back. The retry cannot get ready; the deadline
/// must still end the call.
#[tokio::test(start_paused = true)]
async fn the_backoff_deadline_bounds_a_retry_that_cannot_get_ready() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let api = service_fn(move |_: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(429)
                        .header("retry-after", "1")
                        .body(full(""))
                        .unwrap(),
                )
            } else {
                std::future::pending().await
            }
        }
    });
    let below = tower::limit::ConcurrencyLimit::new(api, 1);
    let svc = Backoff429::new()
        .deadline(Duration::from_secs(5))
        .layer(below.clone());
    let start = tokio::time::Instant::now();
    let call = tokio::spawn(svc.oneshot(post_request()));
    tokio::task::yield_now().await;
    advance(Duration::from_millis(100)).await;
    // Another caller takes the permit and hangs.
    let hog = tokio::spawn(below.oneshot(post_request()));
    let result = tokio::time::timeout(Duration::from_secs(60), call).await;
    let elapsed = start.elapsed();
    hog.abort();
    let result = result
        .expect("the call outlived its deadline by a minute")
        .unwrap();
    let error = result.expect_err("nothing could answer");
    assert!(
        elapsed <= Duration::from_millis(5_100),
        "{elapsed:?}: {error}"
    );
}

/// a refusal whose body sends one frame and then stalls forever ends with the deadline,
/// not with `max_read_time` (10 s) or never.
#[tokio::test(start_paused = true)]
async fn a_stalled_refusal_body_ends_with_the_backoff_deadline() {
    let api = service_fn(|_: Request<Full<Bytes>>| async {
        let stream = futures::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
            Bytes::from_static(b"{\"errorCode\":"),
        ))])
        .chain(futures::stream::pending());
        Ok::<_, Infallible>(
            Response::builder()
                .status(429)
                .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
                .unwrap(),
        )
    });
    use futures::StreamExt;
    let svc = Backoff429::new()
        .deadline(Duration::from_secs(3))
        .layer(api);
    let start = tokio::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(600), svc.oneshot(post_request()))
        .await
        .expect("never ended");
    let elapsed = start.elapsed();
    assert!(elapsed <= Duration::from_millis(3_100), "{elapsed:?}");
    // Either the deadline error or the refusal handed back; reading that refusal's body must
    // not hang the caller past the deadline either.
    if let Ok(response) = result {
        let read =
            tokio::time::timeout(Duration::from_secs(60), response.into_body().collect()).await;
        assert!(read.is_ok() || tokio::time::Instant::now() - start <= Duration::from_secs(61));
    }
}

/// hostile `Retry-After` / `retry-after-ms` / `X-RateLimit-Reset` / `RateLimit` values:
/// no panic, and no call waits past its deadline.
#[tokio::test(start_paused = true)]
async fn hostile_retry_hints_neither_panic_nor_overrun() {
    let long = "9".repeat(5000);
    let values: Vec<(&str, String)> = vec![
        ("retry-after", "-1".into()),
        ("retry-after", "0".into()),
        ("retry-after", "1e9".into()),
        ("retry-after", "18446744073709551616".into()),
        ("retry-after", long.clone()),
        ("retry-after", ".".into()),
        ("retry-after", "0.0000000001".into()),
        ("retry-after", "1.5.2".into()),
        ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".into()),
        ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT".into()),
        ("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT".into()),
        ("retry-after", "NaN".into()),
        ("retry-after", "inf".into()),
        ("retry-after-ms", long.clone()),
        ("retry-after-ms", "0.5".into()),
        ("retry-after-ms", "99999999999999999999".into()),
        ("x-ratelimit-reset", "99999999999999".into()),
        ("ratelimit", "\"a\";r=0;t=999999999999".into()),
        ("ratelimit", "\"a\";r=0;t=".into()),
        ("ratelimit", "remaining=0, reset=1e400".into()),
        ("ratelimit", "\"\\\"".into()),
    ];
    for (name, value) in values {
        let name = HeaderName::from_static(name);
        let header = http::HeaderValue::from_str(&value).unwrap();
        let (n2, h2) = (name.clone(), header.clone());
        let api = service_fn(move |_: Request<Full<Bytes>>| {
            let (name, header) = (n2.clone(), h2.clone());
            async move {
                let mut response = Response::builder()
                    .status(429)
                    .header("x-ratelimit-remaining", "0")
                    .body(full(""))
                    .unwrap();
                response.headers_mut().insert(name, header);
                Ok::<_, Infallible>(response)
            }
        });
        let svc = Backoff429::new()
            .max_retries(3)
            .deadline(Duration::from_secs(100))
            .layer(api);
        let start = tokio::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(1000), svc.oneshot(post_request()))
            .await
            .unwrap_or_else(|_| panic!("{name}: {value:.40} hung"));
        assert!(
            start.elapsed() <= Duration::from_secs(100),
            "{name}: {value:.40} waited {:?}",
            start.elapsed()
        );
        if let Ok(response) = result {
            assert_eq!(response.status(), 429);
        }
    }
}

// ===== ConcurrencyLimitByPlan =====

/// A job API below the plan layer: creates answer the given ids in turn (PENDING), every
/// status poll answers COMPLETED; the URIs polled are recorded.
fn job_api(
    ids: Vec<&'static str>,
    polled: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    let next = Arc::new(AtomicUsize::new(0));
    service_fn(move |request: Request<Full<Bytes>>| {
        let body = if request.method() == Method::POST {
            let id = ids[next.fetch_add(1, Ordering::SeqCst) % ids.len()];
            serde_json::json!({ "id": id, "status": "PENDING" }).to_string()
        } else {
            polled.lock().unwrap().push(request.uri().to_string());
            let id = request
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_owned();
            serde_json::json!({ "id": id, "status": "COMPLETED" }).to_string()
        };
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
    })
}

fn create_request() -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("http://api.test/v2/generate")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// One job id that cannot stand in a URI (a server answering `"id": "a b"`) is skipped with a
/// warning, and the watch goes on polling the other held jobs.
#[tokio::test(start_paused = true)]
async fn one_invalid_job_id_does_not_stop_the_watch() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let polled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let below = job_api(vec!["bad id", "job-2", "job-3"], polled.clone());
    let svc = plan.layer(below.clone());
    for _ in 0..3 {
        let response = svc.clone().oneshot(create_request()).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(plan.in_use(), 3);
    let watch = tokio::spawn(
        plan.watch(below, "http://api.test")
            .interval(Duration::from_secs(1))
            .run(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let stopped = watch.is_finished();
    watch.abort();
    assert!(
        !stopped,
        "the watch stopped; polled: {:?}",
        polled.lock().unwrap()
    );
    assert_eq!(
        plan.in_use(),
        1,
        "only the job with the bad id should still be held; the watch stopped: {stopped}, polled: {:?}",
        polled.lock().unwrap()
    );
}

/// A job id with `/`, `?` or `..` is never polled: pasted into the status route it would send
/// requests with the plan's credentials to a path or query of the server's choosing.
#[tokio::test(start_paused = true)]
async fn a_job_id_with_slashes_is_never_polled_outside_the_status_route() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let polled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let below = job_api(vec!["../../v2/admin/x", "x?y=1", "good"], polled.clone());
    let svc = plan.layer(below.clone());
    for _ in 0..3 {
        let response = svc.clone().oneshot(create_request()).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    let watch = tokio::spawn(
        plan.watch(below, "http://api.test")
            .interval(Duration::from_secs(1))
            .run(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    watch.abort();
    let polled = polled.lock().unwrap().clone();
    let outside: Vec<_> = polled
        .iter()
        .filter(|uri| {
            let path = uri.strip_prefix("http://api.test").unwrap_or(uri);
            let Some(id) = path.strip_prefix("/v2/generate/") else {
                return true;
            };
            id.contains('/') || id.contains('?') || id.contains("..")
        })
        .cloned()
        .collect();
    assert!(
        outside.is_empty(),
        "polled outside the status route: {outside:?}"
    );
}

// ===== shared Redis store =====

// ===== tower semantics =====

fn ok_full() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

fn get_request(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::GET)
        .uri(format!("http://api.test{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// client mode's `max_queue` counts only live waiters: a waiter dropped (a caller's
/// timeout) gives its place in the queue back, and the queue is never over its bound.
#[tokio::test(start_paused = true)]
async fn client_max_queue_forgets_dropped_waiters() {
    let limits = RateLimitByRoute::builder()
        .route("GET /x", Quota::per_minute(1))
        .max_queue(1)
        .build()
        .unwrap();
    let svc = limits.layer(ok_full());
    svc.clone().oneshot(get_request("/x")).await.unwrap();
    for round in 0..50 {
        let waiter = tokio::spawn(svc.clone().oneshot(get_request("/x")));
        tokio::task::yield_now().await;
        advance(Duration::from_millis(1)).await;
        let full = svc.clone().oneshot(get_request("/x")).await;
        let error = full.expect_err("a second waiter over max_queue(1)");
        assert!(
            error.to_string().to_lowercase().contains("queue"),
            "round {round}: {error}"
        );
        waiter.abort();
        let _ = waiter.await;
    }
    // After 50 dropped waiters, one may wait again, and it gets through.
    let last = tokio::time::timeout(
        Duration::from_secs(120),
        svc.clone().oneshot(get_request("/x")),
    )
    .await
    .expect("the last waiter was never let through");
    assert!(last.is_ok(), "{:?}", last.err());
}

/// a request waiting for its route's turn holds no permit of a `ConcurrencyLimit(1)`
/// below, nor a slot of a `Buffer(1)`: a request on another route goes through meanwhile,
/// and 200 waiters dropped at random leave the other route working.
#[tokio::test(start_paused = true)]
async fn client_waiters_hold_no_readiness_below() {
    let limits = RateLimitByRoute::builder()
        .route("GET /slow", Quota::per_minute(1))
        .route("GET /fast", Quota::per_second(1000))
        .build()
        .unwrap();
    let below = tower::ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(ok_full());
    let svc = limits.layer(below);
    svc.clone().oneshot(get_request("/slow")).await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..200 {
        waiters.push(tokio::spawn(svc.clone().oneshot(get_request("/slow"))));
    }
    tokio::task::yield_now().await;
    for (i, w) in waiters.iter().enumerate() {
        if i % 3 == 0 {
            w.abort();
        }
    }
    let fast = tokio::time::timeout(
        Duration::from_secs(1),
        svc.clone().oneshot(get_request("/fast")),
    )
    .await
    .expect("the fast route was stopped by waiters on the slow one");
    assert!(fast.is_ok());
    for w in waiters {
        w.abort();
    }
}

/// `ConcurrencyLimitByPlan`: a create answered 502 is an unknown outcome and keeps its
/// slot; a reconcile that does not list it frees it. With `.in_flight()`, a dropped create
/// and a failing service give their slots back at once.
#[tokio::test(start_paused = true)]
async fn plan_unknown_outcomes_and_in_flight_drops() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let gateway = service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(502)
                .body(Full::new(Bytes::from_static(b"bad gateway")))
                .unwrap(),
        )
    });
    let svc = plan.layer(gateway);
    let response = svc.clone().oneshot(create_request()).await.unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 1, "a 502 create may have made a job");
    advance(Duration::from_secs(1)).await;
    plan.reconcile(Vec::<String>::new());
    assert_eq!(plan.in_use(), 0, "a later list without it frees it");

    let flight = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .in_flight()
        .build()
        .unwrap();
    let hang = service_fn(|_: Request<Full<Bytes>>| async {
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
    });
    let svc = flight.layer(hang);
    for _ in 0..20 {
        let call = tokio::spawn(svc.clone().oneshot(create_request()));
        tokio::task::yield_now().await;
        call.abort();
        let _ = call.await;
        assert_eq!(
            flight.in_use(),
            0,
            "a dropped in-flight create keeps its slot"
        );
    }
}

/// `complete(id)` from a webhook that beats the create's body is remembered and frees
/// the slot when the body shows the id; ids completed but never created do not pile up
/// past the bound (4,096) in a way that frees a later job early.
#[tokio::test(start_paused = true)]
async fn plan_complete_before_the_body_and_bogus_completes() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let polled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let below = job_api(vec!["job-1", "job-2"], polled);
    let svc = plan.layer(below);
    let response = svc.clone().oneshot(create_request()).await.unwrap();
    plan.complete("job-1");
    response.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 0, "the early webhook was lost");
    // A flood of bogus completes (a forged webhook stream) must not make room for itself
    // beyond the bound nor pre-complete a job created later than the bound allows.
    for n in 0..10_000 {
        plan.complete(&format!("bogus-{n}"));
    }
    let response = svc.clone().oneshot(create_request()).await.unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 1, "job-2 was never completed");
}

/// An own error inside a `std::io::Error` (a stack that unifies its errors with
/// `map_err(io::Error::other)`) is not retried, though `io::Error::source()` skips the error it
/// wraps.
#[tokio::test(start_paused = true)]
async fn an_own_error_inside_an_io_error_is_not_retried() {
    let offered = Arc::new(AtomicUsize::new(0));
    let limits = RateLimitByRoute::builder()
        .route("GET /x", Quota::per_minute(1))
        .max_queue(0)
        .build()
        .unwrap();
    let counter = offered.clone();
    let stack = tower::ServiceBuilder::new()
        .layer(
            Backoff429::new()
                .retry_transient()
                .max_retries(3)
                .deadline(Duration::from_secs(60)),
        )
        .map_err(|e: tower_quota::BoxError| std::io::Error::other(e))
        .map_request(move |r: Request<Full<Bytes>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            r
        })
        .layer(limits)
        .service(ok_full());
    stack.clone().oneshot(get_request("/x")).await.unwrap();
    offered.store(0, Ordering::SeqCst);
    let error = stack
        .clone()
        .oneshot(get_request("/x"))
        .await
        .expect_err("queue full");
    assert_eq!(
        offered.load(Ordering::SeqCst),
        1,
        "QueueFull inside an io::Error was retried: {error}"
    );
}

/// Leaves the shared Redis as found: removes the test's keys, and says how many there were.
async fn remove_keys(url: &str, prefix: &str) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in &keys {
        let _: () = redis::cmd("UNLINK")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    keys.len()
}

fn store(url: &str, prefix: &str) -> tower_quota::store::RedisStore {
    tower_quota::store::RedisStore::builder(url)
        .prefix(prefix)
        .poll_interval(Duration::from_millis(100))
        .fail_mode(tower_quota::store::FailMode::Closed)
        .build()
        .unwrap()
}

/// job slots through Redis, two "processes" (separate store handles) on one Hobbyist
/// plan, jobs that end on the server 120 ms after they are made: creates dropped at random
/// moments (some while waiting for the Redis slot, some after they were sent: an unknown
/// outcome, held until a list says otherwise), a `complete` from either handle, reconciles
/// from either handle and a periodic one, while creates are in flight. The plan must never
/// be exceeded at the API, no create may hang, and no slot may stay held at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slots_with_drops_reconciles_and_completes_from_another_handle() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("slots");
    let a = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .store(store(&url, &prefix))
        .build()
        .unwrap();
    let b = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .store(store(&url, &prefix))
        .build()
        .unwrap();
    // The API: counts active jobs; creates take 100 ms to answer (a create in flight).
    let active = Arc::new(std::sync::Mutex::new(
        std::collections::HashSet::<String>::new(),
    ));
    let over = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let api = {
        let (active, over, next) = (active.clone(), over.clone(), next.clone());
        service_fn(move |_: Request<Full<Bytes>>| {
            let (active, over, next) = (active.clone(), over.clone(), next.clone());
            async move {
                let id = format!("job-{}", next.fetch_add(1, Ordering::SeqCst));
                {
                    let mut active = active.lock().unwrap();
                    active.insert(id.clone());
                    if active.len() > 1 {
                        over.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // The job ends on the server 120 ms after it was made, whoever waits for it.
                let (ending, done) = (active.clone(), id.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(120)).await;
                    ending.lock().unwrap().remove(&done);
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                let body = serde_json::json!({ "id": id, "status": "PENDING" }).to_string();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        })
    };
    let sa = a.layer(api.clone());
    let sb = b.layer(api.clone());
    // A third process's view: every 250 ms, the list endpoint, reconciled through b.
    let reconciler = {
        let (b, active) = (b.clone(), active.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let listed: Vec<String> = active.lock().unwrap().iter().cloned().collect();
                b.reconcile(listed);
            }
        })
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut finished = 0;
    let mut log: Vec<String> = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let on_a = rand() % 2 == 0;
        let creator = if on_a { sa.clone() } else { sb.clone() };
        log.push(format!("create on {}", if on_a { "a" } else { "b" }));
        let call = tokio::spawn(async move {
            let response = creator.oneshot(create_request()).await?;
            let body = response.into_body().collect().await?.to_bytes();
            let value: serde_json::Value = serde_json::from_slice(&body)?;
            Ok::<_, tower_quota::BoxError>(value["id"].as_str().unwrap_or("").to_owned())
        });
        // Sometimes a second create, dropped while it waits for the slot.
        if rand() % 2 == 0 {
            let w_a = rand() % 2 == 0;
            let waiter = if w_a { sa.clone() } else { sb.clone() };
            let dropped = tokio::spawn(waiter.oneshot(create_request()));
            let after = rand() % 30;
            tokio::time::sleep(Duration::from_millis(after)).await;
            dropped.abort();
            log.push(format!(
                "waiter on {} dropped after {after} ms",
                if w_a { "a" } else { "b" }
            ));
        }
        // A reconcile from the other handle while the create is in flight: the list it
        // got shows only the jobs already ended (none active).
        if rand() % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(rand() % 80)).await;
            let listed: Vec<String> = active.lock().unwrap().iter().cloned().collect();
            let r_a = rand() % 2 == 0;
            log.push(format!(
                "reconcile on {} with {listed:?}",
                if r_a { "a" } else { "b" }
            ));
            if r_a {
                a.reconcile(listed)
            } else {
                b.reconcile(listed)
            }
        }
        let id = match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(Ok(id))) => id,
            other => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{{{prefix}*"))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let mut dump = Vec::new();
                for key in keys {
                    let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    dump.push(format!("{key}: {members:?}"));
                }
                panic!(
                    "create {finished} hung or failed: {:?}; in use {} / {}, jobs a {:?} b {:?}\nredis: {dump:#?}\nlog: {log:#?}",
                    other.map(|r| r.map(|r| r.map_err(|e| e.to_string()))),
                    a.in_use(),
                    b.in_use(),
                    a.jobs(),
                    b.jobs(),
                )
            }
        };
        // The job ends (20 ms after its answer); the webhook arrives at either handle.
        tokio::time::sleep(Duration::from_millis(25)).await;
        let c_a = rand() % 2 == 0;
        log.push(format!(
            "{id} done, complete on {}",
            if c_a { "a" } else { "b" }
        ));
        if c_a {
            a.complete(&id)
        } else {
            b.complete(&id)
        };
        finished += 1;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    reconciler.abort();
    let over = over.load(Ordering::SeqCst);
    let keys = remove_keys(&url, &prefix).await;
    assert_eq!(
        over, 0,
        "the API saw more active jobs than the plan ({finished} jobs)"
    );
    assert_eq!(
        (a.in_use(), b.in_use()),
        (0, 0),
        "slots stuck after {finished} jobs; {keys} keys"
    );
}

/// The same with the layer on the outermost router, where a build without the `axum` feature
/// puts it.
#[tokio::test]
async fn a_doubled_slash_under_nest_service_is_counted_by_the_outermost_layer() {
    let hits = Arc::new(AtomicUsize::new(0));
    let limits = RateLimitByRoute::builder()
        .route("POST /svc/v2/generate", Quota::per_hour(1))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let inner = Router::new().route("/v2/generate", post(counting_handler(&hits)));
    let addr = serve(Router::new().nest_service("/svc", inner).layer(limits)).await;
    let key = [("x-api-key", "attacker")];
    assert_eq!(
        raw(addr, "POST", "/svc/v2/generate", &key).await.status,
        200
    );
    assert_eq!(
        raw(addr, "POST", "/svc/v2/generate", &key).await.status,
        429
    );
    for _ in 0..5 {
        let _ = raw(addr, "POST", "/svc//v2/generate", &key).await;
    }
    let handled = hits.load(Ordering::SeqCst);
    assert_eq!(handled, 1, "{handled} requests handled on a quota of 1");
}

/// `set_quota` in server mode, lowered and raised while clients are mid-window, in
/// both algorithms: a 429's `Retry-After` stays truthful and a lowered quota holds at once.
#[tokio::test(start_paused = true)]
async fn set_quota_keeps_retry_after_truthful() {
    let pairs = [
        (Quota::per_minute(60), Quota::per_minute(10)),
        (Quota::per_minute(10), Quota::per_minute(60)),
        (
            Quota::per_second(10).with_burst(1),
            Quota::per_second(1).with_burst(1),
        ),
        (
            Quota::per_second(1).with_burst(5),
            Quota::per_second(10).with_burst(1),
        ),
        (Quota::per_minute(60), Quota::per_second(1).with_burst(1)),
        (Quota::per_second(2).with_burst(2), Quota::per_hour(3)),
    ];
    let mut lies = Vec::new();
    for (before, after) in pairs {
        let limits = RateLimitByRoute::builder()
            .route("POST /x", before)
            .reject()
            .key_header(HeaderName::from_static("x-api-key"))
            .build()
            .unwrap();
        let mut svc = limits.layer(ok_service());
        for _ in 0..7 {
            send(&mut svc, keyed("/x", "k")).await;
            advance(Duration::from_millis(130)).await;
        }
        limits.set_quota("POST /x", after).unwrap();
        // After the change: within any window of the new period, at most its count, counting
        // only requests admitted after the change.
        let mut admitted = Vec::new();
        for step in 0..200 {
            let response = send(&mut svc, keyed("/x", "k")).await;
            if response.status() == StatusCode::OK {
                admitted.push(tokio::time::Instant::now());
            } else {
                let wait = retry_after(&response);
                advance(Duration::from_secs(wait)).await;
                let again = send(&mut svc, keyed("/x", "k")).await;
                if again.status() != StatusCode::OK {
                    lies.push(format!(
                        "{before:?} -> {after:?}, step {step}: told {wait} s, refused"
                    ));
                } else {
                    admitted.push(tokio::time::Instant::now());
                }
            }
            advance(Duration::from_millis(50)).await;
        }
        let period = after.period();
        let count = after.burst().unwrap_or(after.count()) as usize;
        for (i, &t) in admitted.iter().enumerate() {
            let within = admitted[i..]
                .iter()
                .take_while(|&&u| u - t < period)
                .count();
            if after.burst().is_none() && within > count {
                lies.push(format!(
                    "{before:?} -> {after:?}: {within} admitted within one period"
                ));
                break;
            }
        }
    }
    assert!(lies.is_empty(), "{lies:#?}");
}

/// creates waiting for a plan slot hold no `Buffer(1)` slot nor `ConcurrencyLimit(1)`
/// permit below: status polls go through while 50 creates wait (a third of them dropped).
#[tokio::test(start_paused = true)]
async fn plan_waiting_creates_hold_no_readiness_below() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let polled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let below = tower::ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(job_api(vec!["job-1"], polled));
    let svc = plan.layer(below);
    let response = svc.clone().oneshot(create_request()).await.unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 1);
    let mut waiters = Vec::new();
    for i in 0..50 {
        let waiter = tokio::spawn(svc.clone().oneshot(create_request()));
        if i % 3 == 0 {
            tokio::task::yield_now().await;
            waiter.abort();
        } else {
            waiters.push(waiter);
        }
    }
    tokio::task::yield_now().await;
    for _ in 0..5 {
        let poll = tokio::time::timeout(
            Duration::from_secs(1),
            svc.clone().oneshot(get_request("/v2/generate/other")),
        )
        .await
        .expect("a status poll was stopped by creates waiting for a slot");
        assert!(poll.is_ok());
    }
    for w in waiters {
        w.abort();
    }
}

/// forwarded addresses from a peer that is not a trusted proxy are ignored over real
/// sockets (the test client is 127.0.0.1; the trusted proxies are 10.0.0.0/8), whatever the
/// header; from a trusted proxy (127.0.0.1), entries a client forges left of the proxy's own
/// give no fresh quota.
#[tokio::test]
async fn forged_forwarded_headers_give_no_fresh_quota() {
    use tower_quota::rate_limit::ForwardedHeader;
    let hits = Arc::new(AtomicUsize::new(0));
    for (trusted, header) in [
        ("10.0.0.0/8", ForwardedHeader::XForwardedFor),
        ("10.0.0.0/8", ForwardedHeader::Forwarded),
        ("10.0.0.0/8", ForwardedHeader::XRealIp),
        ("127.0.0.1", ForwardedHeader::XForwardedFor),
        ("127.0.0.1", ForwardedHeader::Forwarded),
    ] {
        let limits = RateLimitByRoute::builder()
            .route("GET /x", Quota::per_hour(1))
            .reject()
            .key_forwarded_ip(header, [trusted])
            .build()
            .unwrap();
        let app = Router::new()
            .route("/x", get(counting_handler(&hits)))
            .layer(limits);
        let addr = serve(app).await;
        let before = hits.load(Ordering::SeqCst);
        for n in 0..6 {
            let spoof = format!("198.51.100.{n}");
            let headers: Vec<(&str, String)> = if trusted == "127.0.0.1" {
                // What the proxy forwards: the client's forgery, then the address it saw.
                vec![
                    ("x-forwarded-for", format!("{spoof}, garbage, 203.0.113.9")),
                    (
                        "forwarded",
                        format!("for={spoof}, for=\"203.0.113.9:4711\""),
                    ),
                ]
            } else {
                vec![
                    ("x-forwarded-for", spoof.clone()),
                    ("forwarded", format!("for={spoof}")),
                    ("x-real-ip", spoof.clone()),
                ]
            };
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let answer = raw(addr, "GET", "/x", &headers).await;
            if answer.status == 429 {
                assert!(answer.header("retry-after").is_some());
            }
        }
        let handled = hits.load(Ordering::SeqCst) - before;
        assert_eq!(
            handled, 1,
            "{trusted} {header:?}: {handled} handled on a quota of 1"
        );
    }
}

/// The cheapest form of the flood: a `per_hour(1)` route at the default `max_keys`, 70,000 fresh
/// keys with one request each. A newcomer is admitted (before, it was told to come back in
/// over an hour).
#[tokio::test(start_paused = true)]
async fn a_flood_of_one_request_per_key_locks_no_newcomer_out_of_a_quota_of_one() {
    let limits = RateLimitByRoute::builder()
        .route("POST /password-reset", Quota::per_hour(1))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    for key in 0..70_000 {
        send(&mut svc, keyed("/password-reset", &format!("flood-{key}"))).await;
    }
    advance(Duration::from_secs(1)).await;
    let mut locked_out = Vec::new();
    for newcomer in 0..10 {
        let response = send(
            &mut svc,
            keyed("/password-reset", &format!("legit-{newcomer}")),
        )
        .await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            locked_out.push(retry_after(&response));
        }
    }
    assert!(
        locked_out.is_empty(),
        "{} of 10 newcomers refused, Retry-After {locked_out:?} s",
        locked_out.len()
    );
}

/// job slots through Redis: creates dropped at random moments while their Redis slot
/// is being taken leave no slot held: "a create dropped while it waits for its Redis slot
/// leaves nothing behind, here or in Redis".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slot_creates_dropped_during_their_acquire_leave_nothing() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("slot-drops");
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .store(store(&url, &prefix))
        .build()
        .unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let polled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let svc = plan.layer(
        tower::ServiceBuilder::new()
            .map_request(move |r: Request<Full<Bytes>>| {
                counter.fetch_add(1, Ordering::SeqCst);
                r
            })
            .service(job_api(vec!["job-1"], polled)),
    );
    let mut n = 0u64;
    while sent.load(Ordering::SeqCst) == 0 && n < 400 {
        n += 1;
        let call = tokio::spawn(svc.clone().oneshot(create_request()));
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_micros(n % 200) {
            std::hint::spin_loop();
        }
        call.abort();
        let _ = call.await;
    }
    // The last drop may have come after its send: that one is an unknown outcome, held
    // as it should be. Every other drop must leave nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = sent.load(Ordering::SeqCst);
    let in_use = plan.in_use();
    eprintln!("{n} creates dropped, {sent} sent");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{{{prefix}:slots}}:held"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    remove_keys(&url, &prefix).await;
    assert!(
        members.len() <= sent && in_use <= sent,
        "{n} creates dropped, {sent} of them sent; held here: {in_use}, in Redis: {members:?}"
    );
}

/// odd request targets, methods and key bytes over a real socket: no panic (every
/// request gets an HTTP answer, and the server still answers afterwards).
#[tokio::test]
async fn hostile_request_lines_do_not_panic() {
    let hits = Arc::new(AtomicUsize::new(0));
    let limits = RateLimitByRoute::builder()
        .route("GET /x/{id}", Quota::per_minute(5))
        .route("* /y/{*rest}", Quota::per_minute(5))
        .default_quota(Quota::per_second(1000))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/x/{id}", get(counting_handler(&hits)))
        .route("/y/{*rest}", axum::routing::any(counting_handler(&hits)))
        .layer(limits);
    let addr = serve(app).await;
    let long = format!("/x/{}", "a".repeat(60_000));
    let targets = [
        "*",
        "/",
        "/%",
        "/%zz",
        "/x/%",
        "/x/%00",
        "/y/",
        "/y",
        "//",
        "/x/{id}",
        "/y/{*rest}",
        "/x/a?b=%zz",
        long.as_str(),
        "/y/%2e%2e/%2e%2e",
        "/x/\u{00e9}",
        "http://[::1]/x/a",
        "https://x:1/y/z",
    ];
    let methods = ["GET", "HEAD", "OPTIONS", "CONNECT", "FOO", "get", "PRI"];
    for target in targets {
        for method in methods {
            for key in ["k", "", "\u{00ff}\u{00fe}", "a\tb"] {
                let answer = raw(addr, method, target, &[("x-api-key", key)]).await;
                let _ = answer;
            }
        }
    }
    let alive = raw(addr, "GET", "/x/final", &[("x-api-key", "fresh")]).await;
    assert_eq!(alive.status, 200, "the server no longer answers: {alive:?}");
}
