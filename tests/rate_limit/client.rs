//! Client mode of `RateLimitByRoute`, on tokio's paused clock.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use http::{Method, Request, Response, StatusCode};
use tokio::time::{advance, sleep, Instant};
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::rate_limit::{NextAdmission, RateLimitError};
use tower_quota::{BoxError, ConfigError, Quota, RateLimitByRoute};

type Log = Arc<Mutex<Vec<(Duration, String)>>>;
type Answer = Result<Response<()>, Infallible>;

/// A fake API: records when each request reaches it (since `start`) and answers after
/// `latency` with what `answer` makes of the request.
fn fake_api(
    start: Instant,
    latency: Duration,
    answer: fn(&Request<()>) -> Response<()>,
) -> (
    impl Service<
            Request<()>,
            Response = Response<()>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Answer> + Send + 'static,
        > + Clone
        + Send
        + 'static,
    Log,
) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let svc = service_fn(move |req: Request<()>| {
        let log = seen.clone();
        async move {
            let id = req
                .headers()
                .get("x-id")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_else(|| req.uri().path().to_owned());
            log.lock().unwrap().push((start.elapsed(), id));
            let response = answer(&req);
            sleep(latency).await;
            Ok::<_, Infallible>(response)
        }
    });
    (svc, log)
}

fn ok(_: &Request<()>) -> Response<()> {
    Response::new(())
}

fn req(method: Method, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://api.test{path}"))
        .body(())
        .unwrap()
}

fn generate(id: usize) -> Request<()> {
    let mut r = req(Method::POST, "/v2/generate");
    r.headers_mut().insert("x-id", id.into());
    r
}

fn times(log: &Log) -> Vec<Duration> {
    log.lock().unwrap().iter().map(|(t, _)| *t).collect()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn run_all<S>(svc: S, requests: Vec<Request<()>>) -> Vec<Result<Response<()>, BoxError>>
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
{
    let futures: FuturesUnordered<_> = requests
        .into_iter()
        .map(|r| svc.clone().oneshot(r))
        .collect();
    futures.collect().await
}

#[tokio::test(start_paused = true)]
async fn sliding_window_burst_send_times() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::from_millis(100), ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(3))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let results = run_all(svc, (0..7).map(generate).collect()).await;
    assert!(results.iter().all(Result::is_ok));
    // Three at once; each place frees one period after its response (100 ms later).
    assert_eq!(
        times(&log),
        [0.0, 0.0, 0.0, 1.1, 1.1, 1.1, 2.2].map(secs).to_vec()
    );
}

#[tokio::test(start_paused = true)]
async fn gcra_burst_send_times() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(10).with_burst(2))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    run_all(limits.layer(api), (0..6).map(generate).collect()).await;
    assert_eq!(
        times(&log),
        [0.0, 0.0, 0.1, 0.2, 0.3, 0.4].map(secs).to_vec()
    );

    // Burst 1 is even pacing.
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(4).with_burst(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    run_all(limits.layer(api), (0..4).map(generate).collect()).await;
    assert_eq!(times(&log), [0.0, 0.25, 0.5, 0.75].map(secs).to_vec());
}

#[tokio::test(start_paused = true)]
async fn an_hour_of_generate_calls_at_60_per_minute() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::from_millis(200), ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
        .build()
        .unwrap();
    let results = run_all(limits.layer(api), (0..3600).map(generate).collect()).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3600);

    let sent = times(&log);
    let margin = secs(0.05); // the default: 1% of the window, at most 50 ms
                             // Within an hour plus the safety margin...
    assert!(
        start.elapsed() <= Duration::from_secs(3600) + margin,
        "{:?}",
        start.elapsed()
    );
    // ...with no window of a minute over quota...
    let mut sorted = sent.clone();
    sorted.sort();
    for pair in sorted.windows(61) {
        assert!(pair[60] - pair[0] >= Duration::from_secs(60));
    }
    // ...and the whole quota used: each batch of 60 goes the moment the last one's places
    // free up (one round trip and the margin after a minute).
    let last = *sorted.last().unwrap();
    assert_eq!(last, (secs(60.2) + margin) * 59);
}

#[tokio::test(start_paused = true)]
async fn first_come_first_served_per_route() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(2))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    let mut pending = Vec::new();
    for id in 0..20 {
        // The place in the queue is taken by `call`, in call order.
        pending.push(tokio::spawn(svc.call(generate(id))));
        advance(Duration::from_millis(7)).await;
    }
    for task in pending {
        task.await.unwrap().unwrap();
    }
    let order: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(order, (0..20).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn routes_have_their_own_quotas_and_unmatched_requests_pass() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .route("GET /v2/generate/{id}", Quota::per_minute(2))
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let mut requests = vec![
        req(Method::POST, "/v2/generate"),
        req(Method::GET, "/v2/generate/a"),
        req(Method::GET, "/v2/generate/b"),
    ];
    // No default quota: everything else is unlimited.
    requests.extend((0..100).map(|_| req(Method::GET, "/v2/generations")));
    run_all(svc, requests).await;
    assert!(times(&log).iter().all(|t| t.is_zero()));
    assert_eq!(limits.snapshot()[0].remaining, 0);
    assert_eq!(limits.snapshot()[1].remaining, 0);
}

#[tokio::test(start_paused = true)]
async fn max_wait_gives_the_request_back_saying_how_long() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .max_wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    let error = svc.call(generate(1)).await.unwrap_err();
    match error.downcast_ref::<RateLimitError>() {
        Some(RateLimitError::WaitTooLong {
            route,
            wait,
            max_wait,
        }) => {
            assert_eq!(&**route, "POST /v2/generate");
            assert_eq!(*wait, secs(60.05));
            assert_eq!(*max_wait, Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("60.05s"), "{error}");
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO, "refused at once");
}

#[tokio::test(start_paused = true)]
async fn max_wait_runs_out_while_the_server_is_slow() {
    let start = Instant::now();
    let (api, _log) = fake_api(start, Duration::from_secs(30), ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(1))
        .max_wait(Duration::from_secs(5))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    let first = tokio::spawn(svc.call(generate(0)));
    // The estimate (a response at the earliest now, then a second) is within the maximum...
    let error = svc.call(generate(1)).await.unwrap_err();
    // ...but the response takes 30 s, so the maximum runs out first.
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    match error.downcast_ref::<RateLimitError>() {
        Some(RateLimitError::WaitTooLong { wait, .. }) => assert!(*wait >= secs(6.0), "{wait:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(limits.snapshot()[0].waiters, 0);
    first.await.unwrap().unwrap();
}

/// A small deterministic generator for "random" points.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_waiters_leave_no_trace() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(10))
        .safety_margin(Duration::ZERO)
        .max_wait(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    for id in 0..10 {
        svc.call(generate(id)).await.unwrap();
    }
    let mut rng = Lcg(7);
    let mut waiting = Vec::new();
    for id in 0..3000 {
        let mut fut = tokio_test::task::spawn(svc.call(generate(1000 + id)));
        // Some are never polled, some once, some many times.
        for _ in 0..rng.next(3) {
            assert_pending!(fut.poll());
        }
        waiting.push(fut);
        if rng.next(100) == 0 {
            advance(Duration::from_millis(rng.next(500))).await;
        }
        if rng.next(4) == 0 && !waiting.is_empty() {
            let i = rng.next(waiting.len() as u64) as usize;
            drop(waiting.swap_remove(i));
        }
    }
    assert!(start.elapsed() < Duration::from_secs(60));
    // Drop the rest, in random order, head included.
    while !waiting.is_empty() {
        let i = rng.next(waiting.len() as u64) as usize;
        drop(waiting.swap_remove(i));
    }
    let snapshot = &limits.snapshot()[0];
    assert_eq!(
        (snapshot.waiters, snapshot.in_flight, snapshot.remaining),
        (0, 0, 0)
    );
    assert_eq!(
        snapshot.next,
        NextAdmission::In(Duration::from_secs(60) - start.elapsed())
    );
    // As if they had never come: the next request goes the moment the window allows.
    svc.call(generate(9999)).await.unwrap();
    assert_eq!(times(&log).last(), Some(&Duration::from_secs(60)));
    assert_eq!(log.lock().unwrap().len(), 11);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_head_of_the_queue_wakes_the_next() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    let mut head = tokio_test::task::spawn(svc.call(generate(1)));
    let mut next = tokio_test::task::spawn(svc.call(generate(2)));
    assert_pending!(head.poll());
    assert_pending!(next.poll());
    advance(Duration::from_millis(500)).await;
    drop(head);
    assert!(next.is_woken());
    assert_pending!(next.poll());
    advance(Duration::from_millis(500)).await;
    assert!(next.is_woken());
    assert_ready!(next.poll()).unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(1.0)]);
}

#[tokio::test(start_paused = true)]
async fn a_request_abandoned_in_flight_holds_its_place_for_the_abandoned_hold() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::from_secs(10), ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    let mut sent = tokio_test::task::spawn(svc.call(generate(0)));
    assert_pending!(sent.poll());
    advance(Duration::from_secs(5)).await;
    // The server may count it late: it holds its place as in flight for the default hold of
    // 60 s, then as answered then, for the quota's period.
    drop(sent);
    assert_eq!(limits.snapshot()[0].in_flight, 1);
    assert_eq!(
        limits.snapshot()[0].next,
        NextAdmission::In(Duration::from_secs(120))
    );
    svc.call(generate(1)).await.unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(125.0)]);
    assert_eq!(limits.snapshot()[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_429_closes_the_route_for_every_caller() {
    fn too_many(req: &Request<()>) -> Response<()> {
        let first = req.headers().get("x-id").is_some_and(|v| v == "0");
        let mut response = Response::new(());
        if first {
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response
                .headers_mut()
                .insert("retry-after", "7".parse().unwrap());
        }
        response
    }
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, too_many);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(100))
        .build()
        .unwrap();
    let mut a = limits.layer(api.clone());
    let mut b = limits.clone().layer(api);
    assert_eq!(
        a.call(generate(0)).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(limits.snapshot()[0].next, NextAdmission::In(secs(7.0)));
    b.call(generate(1)).await.unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(7.0)]);
}

#[tokio::test(start_paused = true)]
async fn a_429_without_a_usable_retry_after_backs_off_briefly() {
    fn too_many(req: &Request<()>) -> Response<()> {
        let mut response = Response::new(());
        match req.headers().get("x-id").unwrap().to_str().unwrap() {
            "0" => *response.status_mut() = StatusCode::TOO_MANY_REQUESTS,
            "1" => {
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                response
                    .headers_mut()
                    .insert("retry-after", "soon".parse().unwrap());
            }
            _ => {}
        }
        response
    }
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, too_many);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(100))
        .learn_backoff(Duration::from_millis(1500))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    for id in 0..3 {
        svc.call(generate(id)).await.unwrap();
    }
    assert_eq!(times(&log), [secs(0.0), secs(1.5), secs(3.0)]);
}

#[tokio::test(start_paused = true)]
async fn server_rate_limit_fields_only_tighten() {
    fn fields(req: &Request<()>) -> Response<()> {
        let mut response = Response::new(());
        let h = response.headers_mut();
        match req.headers().get("x-id").unwrap().to_str().unwrap() {
            // Looser than ours: no effect.
            "0" => {
                h.insert("x-ratelimit-remaining", "1000".parse().unwrap());
                h.insert("x-ratelimit-reset", "60".parse().unwrap());
            }
            // Tighter: one more until 20 s from now.
            "1" => {
                h.insert("ratelimit", "\"generate\";r=1;t=20".parse().unwrap());
            }
            _ => {
                h.insert("x-ratelimit-remaining", "garbage".parse().unwrap());
                h.insert("x-ratelimit-reset", "60".parse().unwrap());
            }
        }
        response
    }
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, fields);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(100))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    for id in 0..4 {
        svc.call(generate(id)).await.unwrap();
    }
    assert_eq!(times(&log), [secs(0.0), secs(0.0), secs(0.0), secs(20.0)]);
}

#[tokio::test(start_paused = true)]
async fn every_clone_and_service_shares_one_limit() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(5))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let clones: Vec<_> = (0..5).map(|_| limits.clone()).collect();
    for (i, layer) in clones.iter().enumerate() {
        // A fresh service per "connection", from a fresh clone of the layer.
        let mut svc = layer.layer(api.clone());
        svc.call(req(Method::GET, &format!("/{i}"))).await.unwrap();
    }
    let mut sixth = clones[0].layer(api).clone();
    sixth.call(req(Method::GET, "/6")).await.unwrap();
    assert_eq!(times(&log)[5], Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn quotas_change_at_run_time() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .default_quota(Quota::per_minute(600))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    let mut waiting = tokio_test::task::spawn(svc.call(generate(1)));
    assert_pending!(waiting.poll());
    let snapshot = &limits.snapshot()[0];
    assert_eq!(&*snapshot.route, "POST /v2/generate");
    assert_eq!(snapshot.quota, Quota::per_minute(1));
    assert_eq!(snapshot.waiters, 1);
    assert_eq!(&*limits.snapshot()[1].route, "default");

    limits
        .set_quota("POST /v2/generate", Quota::per_minute(2))
        .unwrap();
    assert!(waiting.is_woken());
    assert_ready!(waiting.poll()).unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(0.0)]);

    assert_eq!(
        limits.set_quota("GET /nope", Quota::per_minute(1)),
        Err(ConfigError::UnknownRoute {
            pattern: "GET /nope".into()
        })
    );
    assert!(matches!(
        limits.set_quota("default", Quota::per_minute(0)),
        Err(ConfigError::InvalidQuota { .. })
    ));
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let build = |pattern: &str, quota: Quota| {
        RateLimitByRoute::builder()
            .route("GET /ok", Quota::per_second(1))
            .route(pattern, quota)
            .build()
            .map(drop)
    };
    assert!(matches!(
        build("POST /a", Quota::per_minute(0)),
        Err(ConfigError::InvalidQuota { route, .. }) if route == "POST /a"
    ));
    assert!(matches!(
        build("POST /a", Quota::new(5, Duration::ZERO)),
        Err(ConfigError::InvalidQuota { .. })
    ));
    assert!(matches!(
        build("POST /a", Quota::per_second(5).with_burst(0)),
        Err(ConfigError::InvalidQuota { .. })
    ));
    assert!(matches!(
        build("GET /ok", Quota::per_second(5)),
        Err(ConfigError::DuplicateRoute { pattern, .. }) if pattern == "GET /ok"
    ));
    assert!(matches!(
        build("GET no-slash", Quota::per_second(5)),
        Err(ConfigError::InvalidRoute { pattern, .. }) if pattern == "GET no-slash"
    ));
    let error = RateLimitByRoute::builder()
        .default_quota(Quota::per_hour(0))
        .build()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid quota for route `default`: a quota's count must be at least 1"
    );
}

#[test]
fn services_and_futures_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<()>, Infallible>;
    assert_send_sync::<RateLimitByRoute>();
    assert_send_sync::<tower_quota::rate_limit::RateLimitByRouteService<Inner>>();
    assert_send::<tower_quota::rate_limit::ResponseFuture<Inner, ()>>();
    assert_send_sync::<RateLimitError>();
}

#[tokio::test(start_paused = true)]
async fn poll_ready_forwards_to_the_inner_service() {
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_second(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let (mut service, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, Response<()>, _>(limits.clone());
    handle.allow(0);
    assert_pending!(service.poll_ready());
    handle.allow(2);
    assert!(service.poll_ready().is_ready());
    let first = service.call(req(Method::GET, "/a"));
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request.uri().path(), "/a");
    // The second waits for the quota, not for readiness: the inner service is ready.
    assert!(service.poll_ready().is_ready());
    let mut second = tokio_test::task::spawn(service.call(req(Method::GET, "/b")));
    assert_pending!(second.poll());
    assert_eq!(limits.snapshot()[0].next, NextAdmission::AfterResponse);
    send.send_response(Response::new(()));
    first.await.unwrap();
    assert!(second.is_woken());
    assert_pending!(second.poll());
    advance(Duration::from_secs(1)).await;
    assert_pending!(second.poll()); // sent now, answered below
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request.uri().path(), "/b");
    send.send_response(Response::new(()));
    assert_ready!(second.poll()).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lowered_paced_quota_paces_the_next_request_at_the_new_interval() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(10).with_burst(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    limits
        .set_quota("POST /v2/generate", Quota::per_second(1).with_burst(1))
        .unwrap();
    assert_eq!(limits.snapshot()[0].next, NextAdmission::In(secs(1.0)));
    svc.call(generate(1)).await.unwrap();
    svc.call(generate(2)).await.unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(1.0), secs(2.0)]);
}

// ===== readiness: a waiting request holds no service that was driven ready =====

fn two_routes() -> RateLimitByRoute {
    RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .route("GET /v2/generate/{id}", Quota::per_minute(100))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap()
}

/// With `svc` over something that reserves capacity when driven ready, requests waiting on an
/// exhausted route must not stop a route that has quota.
async fn a_waiting_route_stops_no_other<S>(svc: S, start: Instant, log: &Log)
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    svc.clone().oneshot(generate(0)).await.unwrap();
    let mut waiting = Vec::new();
    for id in 1..4 {
        let mut call = Box::pin(svc.clone().oneshot(generate(id)));
        // Driven ready and called: it waits for its turn.
        assert!(futures::poll!(&mut call).is_pending());
        waiting.push(tokio::spawn(call));
    }
    let response = svc
        .clone()
        .oneshot(req(Method::GET, "/v2/generate/abc"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), secs(0.02), "served at once");
    for task in waiting {
        task.await.unwrap().unwrap();
    }
    let log = log.lock().unwrap().clone();
    let sent: Vec<_> = log
        .iter()
        .map(|(t, id)| (t.as_secs_f64(), id.as_str()))
        .collect();
    assert_eq!(
        sent,
        [
            (0.0, "0"),
            (0.01, "/v2/generate/abc"),
            (60.01, "1"),
            (120.02, "2"),
            (180.03, "3")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiting_route_stops_no_other_over_a_concurrency_limit() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::from_millis(10), ok);
    let inner = tower::limit::ConcurrencyLimit::new(api.map_err(BoxError::from), 1);
    a_waiting_route_stops_no_other(two_routes().layer(inner), start, &log).await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_route_stops_no_other_over_a_buffer() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::from_millis(10), ok);
    let inner = tower::buffer::Buffer::new(api, 1);
    a_waiting_route_stops_no_other(two_routes().layer(inner), start, &log).await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_leaves_its_service_ready_for_nothing() {
    // The caller keeps its service after a call that waits: the reservation it made with
    // `poll_ready` is given back, or the waiting request could never ready its own clone.
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::from_millis(10), ok);
    let mut svc = two_routes().layer(tower::limit::ConcurrencyLimit::new(api, 1));
    svc.ready().await.unwrap();
    svc.call(generate(0)).await.unwrap();
    svc.ready().await.unwrap();
    let waiting = tokio::spawn(svc.call(generate(1)));
    tokio::time::timeout(Duration::from_secs(120), waiting)
        .await
        .expect("the waiting request readies its own service")
        .unwrap()
        .unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(60.01)]);
    svc.ready().await.unwrap();
    svc.call(generate(2)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_request_returned_at_once_leaves_its_service_ready_for_nothing() {
    let start = Instant::now();
    let (api, _log) = fake_api(start, Duration::ZERO, ok);
    let quota = Quota::per_minute(1);
    let full_queue = RateLimitByRoute::builder()
        .default_quota(quota)
        .max_queue(0);
    let wait_too_long = RateLimitByRoute::builder()
        .default_quota(quota)
        .max_wait(Duration::from_secs(1));
    for builder in [full_queue, wait_too_long] {
        let below = tower::limit::ConcurrencyLimit::new(api.clone(), 1);
        let mut svc = builder.build().unwrap().layer(below.clone());
        svc.ready().await.unwrap();
        svc.call(req(Method::GET, "/a")).await.unwrap();
        // Refused at once: the caller keeps its service, and what its `poll_ready` reserved
        // below is free again.
        svc.ready().await.unwrap();
        let error = svc.call(req(Method::GET, "/b")).await.unwrap_err();
        assert!(error.downcast_ref::<RateLimitError>().is_some(), "{error}");
        let mut other = below.clone();
        tokio::time::timeout(Duration::from_secs(1), other.ready())
            .await
            .expect("the refused request's readiness is given back")
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_readying_gives_its_place_back() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let below = tower::limit::ConcurrencyLimit::new(api, 1);
    let mut svc = limits.layer(below.clone());
    svc.ready().await.unwrap();
    svc.call(generate(0)).await.unwrap();
    svc.ready().await.unwrap();
    let mut waiting = tokio_test::task::spawn(svc.call(generate(1)));
    assert_pending!(waiting.poll());
    // Something else takes the only capacity below the layer while the request waits.
    let mut other = below.clone();
    let mut other_ready = tokio_test::task::spawn(std::future::poll_fn(|cx| other.poll_ready(cx)));
    assert_ready!(other_ready.poll()).unwrap();
    drop(other_ready);
    advance(Duration::from_secs(1)).await;
    // Its turn: it holds its place while it readies its own service...
    assert!(waiting.is_woken());
    assert_pending!(waiting.poll());
    let snapshot = &limits.snapshot()[0];
    assert_eq!((snapshot.in_flight, snapshot.remaining), (1, 0));
    // ...and, dropped before it was sent, gives the place back entirely.
    drop(waiting);
    let snapshot = &limits.snapshot()[0];
    assert_eq!(
        (snapshot.in_flight, snapshot.remaining, snapshot.next),
        (0, 1, NextAdmission::Now)
    );
    drop(other);
    svc.ready().await.unwrap();
    svc.call(generate(2)).await.unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(1.0)]);
}

#[tokio::test(start_paused = true)]
async fn a_readiness_error_returns_the_request_and_its_place() {
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_second(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let (mut service, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, Response<()>, _>(limits.clone());
    assert!(service.poll_ready().is_ready());
    let first = service.call(req(Method::GET, "/a"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(()));
    first.await.unwrap();
    assert!(service.poll_ready().is_ready());
    let mut waiting = tokio_test::task::spawn(service.call(req(Method::GET, "/b")));
    assert_pending!(waiting.poll());
    handle.send_error("the connection pool is closed");
    advance(Duration::from_secs(1)).await;
    let error = assert_ready!(waiting.poll()).unwrap_err();
    assert_eq!(error.to_string(), "the connection pool is closed");
    let snapshot = &limits.snapshot()[0];
    assert_eq!((snapshot.in_flight, snapshot.remaining), (0, 1));
}

// ===== abandoned requests: a server that counts them late never sees more than the quota =====

const HOLD: Duration = Duration::from_secs(5);

/// The most count times in any window of `period` (sorted times).
fn most_in_a_window(times: &[Duration], period: Duration) -> usize {
    let mut most = 0;
    let mut first = 0;
    for last in 0..times.len() {
        while times[last] - times[first] >= period {
            first += 1;
        }
        most = most.max(last - first + 1);
    }
    most
}

#[tokio::test(start_paused = true)]
async fn a_server_counting_abandoned_requests_late_never_sees_more_than_the_quota() {
    let start = Instant::now();
    let counted: Arc<Mutex<Vec<Duration>>> = Arc::default();
    // A server that counts most requests as they arrive, and stalls on those marked
    // `x-stall`: the client gives up on them a second after sending (it drops the future, or
    // the connection fails), and the server counts them at the end of the client's hold.
    let counts = counted.clone();
    let api = service_fn(move |req: Request<()>| {
        let counts = counts.clone();
        async move {
            let stall = req.headers().get("x-stall").cloned();
            let Some(stall) = stall else {
                counts.lock().unwrap().push(start.elapsed());
                return Ok(Response::new(()));
            };
            tokio::spawn(async move {
                sleep(Duration::from_secs(1) + HOLD).await;
                counts.lock().unwrap().push(start.elapsed());
            });
            sleep(Duration::from_secs(1)).await;
            if stall == "error" {
                return Err(BoxError::from("connection reset"));
            }
            std::future::pending().await
        }
    });
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(2))
        .safety_margin(Duration::ZERO)
        .abandoned_hold(HOLD)
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let stalled = |how: &'static str| {
        let mut r = generate(0);
        r.headers_mut().insert("x-stall", how.parse().unwrap());
        r
    };
    let mut dropped = tokio_test::task::spawn(svc.clone().oneshot(stalled("drop")));
    assert_pending!(dropped.poll());
    let failed = tokio::spawn(svc.clone().oneshot(stalled("error")));
    sleep(Duration::from_secs(1)).await;
    drop(dropped);
    assert!(failed.await.unwrap().is_err());
    let snapshot = &limits.snapshot()[0];
    assert_eq!(
        (snapshot.in_flight, snapshot.abandoned, snapshot.remaining),
        (2, 2, 0)
    );

    // Then as many requests as the client allows.
    let results = run_all(svc, (1..=20).map(generate).collect()).await;
    assert!(results.iter().all(Result::is_ok));
    let mut counted = counted.lock().unwrap().clone();
    counted.sort();
    assert_eq!(counted.len(), 22);
    assert_eq!(
        most_in_a_window(&counted, Duration::from_secs(1)),
        2,
        "counted at {counted:?}"
    );
    // Held no longer than that: the first goes when the abandoned requests, counted as
    // answered at the end of their hold, free their places.
    assert_eq!(counted[..4], [secs(6.0), secs(6.0), secs(7.0), secs(7.0)]);
}

// ===== bounded queues =====

fn queue_full(result: Result<Response<()>, BoxError>) -> (String, usize) {
    let error = result.unwrap_err();
    match error.downcast_ref::<RateLimitError>() {
        Some(RateLimitError::QueueFull { route, max_queue }) => (route.to_string(), *max_queue),
        _ => panic!("expected QueueFull, got {error}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_returns_the_request_at_once() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .default_quota(Quota::per_minute(100))
        .safety_margin(Duration::ZERO)
        .max_queue(2)
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    let mut first = tokio_test::task::spawn(svc.call(generate(1)));
    let mut second = tokio_test::task::spawn(svc.call(generate(2)));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_eq!(limits.snapshot()[0].waiters, 2);

    let at_once = Duration::from_secs(1);
    let error = tokio::time::timeout(at_once, svc.call(generate(3)))
        .await
        .expect("returned at once")
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "rate limit of route `POST /v2/generate`: 2 requests already wait for their turn, \
         as many as its queue holds"
    );
    assert_eq!(queue_full(Err(error)), ("POST /v2/generate".to_owned(), 2));
    assert_eq!(start.elapsed(), Duration::ZERO, "returned at once");
    // Every route has its own queue; a request that need not wait is sent.
    svc.call(req(Method::GET, "/v2/generations")).await.unwrap();

    // A place in the queue that frees up can be taken again.
    drop(second);
    let mut third = tokio_test::task::spawn(svc.call(generate(3)));
    assert_pending!(third.poll());
    let refused = tokio::time::timeout(at_once, svc.call(generate(4))).await;
    assert_eq!(
        queue_full(refused.expect("returned at once")),
        ("POST /v2/generate".to_owned(), 2)
    );
    advance(Duration::from_secs(60)).await;
    assert_ready!(first.poll()).unwrap();
    advance(Duration::from_secs(60)).await;
    assert_ready!(third.poll()).unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(0.0), secs(60.0), secs(120.0)]);
}

#[tokio::test(start_paused = true)]
async fn a_queue_of_zero_never_waits() {
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_second(2))
        .max_queue(0)
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let results = run_all(
        svc,
        (0..4).map(|i| req(Method::GET, &format!("/{i}"))).collect(),
    )
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    for result in results.into_iter().filter(Result::is_err) {
        assert_eq!(queue_full(result), ("default".to_owned(), 0));
    }
    assert_eq!(times(&log), [secs(0.0), secs(0.0)]);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_doubled_slash_is_counted_under_the_route_a_server_may_take_it_for() {
    // Before: `/v2//generate` matched no route and went at once, uncounted.
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, ok);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_second(1))
        .safety_margin(Duration::ZERO)
        .build()
        .unwrap();
    let requests = vec![
        req(Method::POST, "/v2/generate"),
        req(Method::POST, "/v2//generate"),
        req(Method::POST, "//v2/generate"),
    ];
    run_all(limits.layer(api), requests).await;
    assert_eq!(times(&log), [0.0, 1.0, 2.0].map(secs).to_vec());
}

#[test]
fn a_pattern_with_an_empty_segment_is_a_config_error() {
    let built = RateLimitByRoute::builder()
        .route("POST /v2//generate", Quota::per_second(1))
        .build();
    assert!(matches!(built, Err(ConfigError::InvalidRoute { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_github_403_refusal_closes_the_route_as_a_429_does() {
    fn forbidden(req: &Request<()>) -> Response<()> {
        let mut response = Response::new(());
        if req.headers().get("x-id").is_some_and(|v| v == "0") {
            *response.status_mut() = StatusCode::FORBIDDEN;
            response
                .headers_mut()
                .insert("retry-after", "9".parse().unwrap());
        }
        response
    }
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, forbidden);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(100))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    svc.call(generate(1)).await.unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(9.0)]);
}

#[tokio::test(start_paused = true)]
async fn a_spent_token_limit_closes_the_route_until_it_resets() {
    // OpenAI's dialect: requests are left, tokens are not, for 6 s.
    fn spent(req: &Request<()>) -> Response<()> {
        let mut response = Response::new(());
        if req.headers().get("x-id").is_some_and(|v| v == "0") {
            for (name, value) in [
                ("x-ratelimit-remaining-requests", "59"),
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "6s"),
            ] {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
        }
        response
    }
    let start = Instant::now();
    let (api, log) = fake_api(start, Duration::ZERO, spent);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(100))
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    svc.call(generate(1)).await.unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(6.0)]);
    // With OpenAI's dialect off, the same response says nothing.
    let (api, log) = fake_api(Instant::now(), Duration::ZERO, spent);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(100))
        .dialects(
            tower_quota::headers::Dialects::all().without(tower_quota::headers::Dialect::OpenAi),
        )
        .build()
        .unwrap();
    let mut svc = limits.layer(api);
    svc.call(generate(0)).await.unwrap();
    svc.call(generate(1)).await.unwrap();
    assert_eq!(times(&log), [secs(0.0), secs(0.0)]);
}

#[test]
fn learning_a_quota_needs_a_dialect_and_client_mode() {
    use tower_quota::headers::Dialects;
    let error = RateLimitByRoute::builder()
        .learn_quota()
        .dialects(Dialects::none())
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("learn_quota"), "{error}");
    let error = RateLimitByRoute::builder()
        .learn_quota()
        .reject()
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("learn_quota"), "{error}");
}

/// Answers `/a` and `/b` after `x-delay` seconds (default 1) with the statement its `x-say`
/// field asks for: `q<r>` states `r` left of the policy named `q`, `anon` that nothing is
/// left of an unnamed limit for 30 s.
fn stating_api(
    start: Instant,
) -> (
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
    Log,
) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let svc = service_fn(move |req: Request<()>| {
        let log = seen.clone();
        async move {
            let field = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let id = field("x-id").unwrap();
            log.lock().unwrap().push((start.elapsed(), id));
            let delay: f64 = field("x-delay").map_or(1.0, |d| d.parse().unwrap());
            let mut response = Response::new(());
            let say = field("x-say").unwrap();
            let headers = response.headers_mut();
            if let Some(left) = say.strip_prefix('q') {
                headers.insert("ratelimit-policy", r#""q";q=3;w=60"#.parse().unwrap());
                let value = format!(r#""q";r={left};t=60"#);
                headers.insert("ratelimit", value.parse().unwrap());
            } else {
                headers.insert("x-ratelimit-limit", "5".parse().unwrap());
                headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
                headers.insert("x-ratelimit-reset", "30".parse().unwrap());
            }
            sleep(secs(delay)).await;
            Ok::<_, Infallible>(response)
        }
    });
    (svc, log)
}

fn stated(path: &str, id: &str, say: &str, delay: f64) -> Request<()> {
    let mut r = req(Method::GET, path);
    r.headers_mut().insert("x-id", id.parse().unwrap());
    r.headers_mut().insert("x-say", say.parse().unwrap());
    r.headers_mut()
        .insert("x-delay", delay.to_string().parse().unwrap());
    r
}

#[tokio::test(start_paused = true)]
async fn learnt_routes_that_the_server_says_share_a_quota_count_against_one() {
    let start = Instant::now();
    let (api, log) = stating_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .learn_route("GET /c")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let send = |request| {
        let svc = svc.clone();
        tokio::spawn(async move { svc.oneshot(request).await.unwrap() })
    };
    // `/a` names the quota `q` first: its state holds it, 2 left.
    send(stated("/a", "a1", "q2", 1.0)).await.unwrap();
    // `/c` names it too: from its answer on, `/c` counts against `/a`'s state.
    send(stated("/c", "c1", "q1", 1.0)).await.unwrap();
    let snapshot = limits.snapshot();
    assert_eq!(snapshot[2].counted_in.as_deref(), Some("GET /a"));
    assert_eq!(snapshot[0].counted_in, None);
    // One left of `q` (counted in `/a`'s state): one of `/a` and `/c` goes, the other waits
    // for the reset 60 s on.
    let sent = start.elapsed();
    let waiting = [
        send(stated("/c", "c2", "q0", 1.0)),
        send(stated("/a", "a2", "q0", 1.0)),
    ];
    for call in waiting {
        call.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let at = |id: &str| log.iter().find(|(_, i)| i == id).unwrap().0;
    assert_eq!(at("c2"), sent, "the first goes at once");
    assert!(
        at("a2") >= secs(60.0),
        "shared: the second waits ({:?})",
        at("a2")
    );
}

#[tokio::test(start_paused = true)]
async fn requests_queued_on_a_route_move_when_the_server_names_its_quota() {
    let start = Instant::now();
    let (api, log) = stating_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let send = |request| {
        let svc = svc.clone();
        tokio::spawn(async move { svc.oneshot(request).await.unwrap() })
    };
    // `/a` holds the quota `q`, 2 left of it.
    send(stated("/a", "a1", "q2", 1.0)).await.unwrap();
    // `/b` learns first of a limit with no name and nothing left for 30 s; its next request
    // waits in `/b`'s queue; then `/b`'s slower request is answered naming `q`.
    let b1 = send(stated("/b", "b1", "anon", 1.0));
    let b2 = send(stated("/b", "b2", "q1", 3.0));
    b1.await.unwrap();
    let b3 = send(stated("/b", "b3", "q0", 1.0));
    tokio::task::yield_now().await;
    assert_eq!(limits.snapshot()[1].waiters, 1, "b3 waits in /b's queue");
    b2.await.unwrap();
    let moved = start.elapsed();
    b3.await.unwrap();
    let log = log.lock().unwrap().clone();
    let b3_at = log.iter().find(|(_, i)| i == "b3").unwrap().0;
    // It moved to the queue of `q` (one left there) at once, not after `/b`'s 30 s.
    assert_eq!(b3_at, moved);
    assert_eq!(limits.snapshot()[1].counted_in.as_deref(), Some("GET /a"));
}

#[test]
fn a_learnt_route_needs_client_mode_and_a_dialect() {
    use tower_quota::headers::Dialects;
    let error = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .dialects(Dialects::none())
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("learn_route"), "{error}");
    let error = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .reject()
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("learn_route"), "{error}");
}

/// A learnt quota is this process's alone: a store would share a count its learning cannot.
/// Building the store connects to nothing, so no Redis is needed here.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_learnt_quota_is_refused_with_a_store() {
    let store = || {
        tower_quota::store::RedisStore::builder("redis://127.0.0.1:1/")
            .build()
            .unwrap()
    };
    for (builder, setting) in [
        (RateLimitByRoute::builder().learn_quota(), "learn_quota"),
        (
            RateLimitByRoute::builder().learn_route("GET /a"),
            "learn_route",
        ),
    ] {
        let error = builder.store(store()).build().unwrap_err();
        assert!(
            matches!(error, ConfigError::InvalidSetting { name, .. } if name == setting),
            "{error}"
        );
        assert!(error.to_string().contains("store"), "{error}");
    }
}
