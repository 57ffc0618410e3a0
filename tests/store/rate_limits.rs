//! Limits shared across processes through Redis (feature `redis`).
//!
//! Every test starts its own `redis-server` (from the OS packages: `apt-get install
//! redis-server`) on a free port of 127.0.0.1, or uses the one `TOWER_QUOTA_REDIS_URL` names
//! where a test needs no restart. Redis keeps time with its own clock, which tokio's paused
//! clock cannot move, so these tests run in real time: quotas of a second or two, and no
//! sleeps used to order events (the limiters do the waiting).

#![cfg(feature = "redis")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_quota::rate_limit::RateLimitError;
use tower_quota::store::{FailMode, RedisStore, StoreError};
use tower_quota::{Quota, RateLimitByRoute};

use crate::common::redis::{shared_redis, unique_prefix, RedisServer};
use crate::common::{redis_query, serve};

// ===== an API that logs when requests arrive =====

#[derive(Clone, Default)]
pub(crate) struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Arrivals {
    pub(crate) fn sorted(&self) -> Vec<Instant> {
        let mut arrivals = self.0.lock().unwrap().clone();
        arrivals.sort();
        arrivals
    }
}

pub(crate) async fn logging_api(arrivals: Arrivals) -> SocketAddr {
    let app = Router::new().route(
        "/work",
        get(move || {
            let arrivals = arrivals.clone();
            async move {
                arrivals.0.lock().unwrap().push(Instant::now());
                "done"
            }
        }),
    );
    serve(app).await
}

/// The most arrivals in any window of length `window`.
pub(crate) fn max_in_window(arrivals: &[Instant], window: Duration) -> usize {
    let mut most = 0;
    let mut start = 0;
    for end in 0..arrivals.len() {
        while arrivals[end].duration_since(arrivals[start]) >= window {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

pub(crate) type HttpClient =
    Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

pub(crate) fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub(crate) fn get_request(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

/// One process of a fleet: its own runtime, its own Redis connections, its own layer.
fn client_process(
    url: String,
    prefix: String,
    quota: Quota,
    api: SocketAddr,
    requests: usize,
) -> std::thread::JoinHandle<Vec<StatusCode>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let store = RedisStore::builder(url)
                .prefix(prefix)
                .fail_mode(FailMode::Closed)
                .build()
                .unwrap();
            let limits = RateLimitByRoute::builder()
                .route("GET /work", quota)
                .store(store.clone())
                .build()
                .unwrap();
            let service = ServiceBuilder::new().layer(limits).service(http_client());
            let mut calls: FuturesUnordered<_> = (0..requests)
                .map(|_| service.clone().oneshot(get_request(api, "/work")))
                .collect();
            let mut statuses = Vec::new();
            while let Some(response) = calls.next().await {
                statuses.push(response.expect("every request is sent").status());
            }
            // As a process does before it exits: the places given back last reach Redis.
            store.flush().await;
            statuses
        })
    })
}

// ===== client mode: a fleet sharing one quota =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_sliding_window() {
    const N: usize = 30;
    const PERIOD: Duration = Duration::from_secs(1);
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("window");
    let arrivals = Arrivals::default();
    let api = logging_api(arrivals.clone()).await;

    let fleet: Vec<_> = (0..3)
        .map(|_| {
            client_process(
                url.clone(),
                prefix.clone(),
                Quota::new(N as u32, PERIOD),
                api,
                N,
            )
        })
        .collect();
    for process in fleet {
        let statuses = tokio::task::spawn_blocking(move || process.join().unwrap())
            .await
            .unwrap();
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    }

    let arrivals = arrivals.sorted();
    assert_eq!(arrivals.len(), 3 * N);
    assert!(
        max_in_window(&arrivals, PERIOD) <= N,
        "over quota: {} in one window",
        max_in_window(&arrivals, PERIOD)
    );
    // Over the span of the run the quota allowed N per period, counting the first window.
    let span = arrivals[arrivals.len() - 1].duration_since(arrivals[0]) + PERIOD;
    let used = (3 * N) as f64 / (N as f64 * span.as_secs_f64() / PERIOD.as_secs_f64());
    println!("the fleet used {:.1}% of the quota", used * 100.0);
    assert!(
        used >= 0.95,
        "the fleet used {:.1}% of the quota",
        used * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_paced_quota() {
    const RATE: u32 = 5; // a request every 200 ms
    const EACH: usize = 4;
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("gcra");
    let arrivals = Arrivals::default();
    let api = logging_api(arrivals.clone()).await;

    let quota = Quota::per_second(RATE).with_burst(1);
    let fleet: Vec<_> = (0..3)
        .map(|_| client_process(url.clone(), prefix.clone(), quota, api, EACH))
        .collect();
    for process in fleet {
        tokio::task::spawn_blocking(move || process.join().unwrap())
            .await
            .unwrap();
    }

    let arrivals = arrivals.sorted();
    assert_eq!(arrivals.len(), 3 * EACH);
    let interval = Duration::from_secs(1) / RATE;
    for pair in arrivals.windows(2) {
        // Redis's clock and this process's may differ by a hair.
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap + Duration::from_millis(2) >= interval,
            "paced too fast: {gap:?}"
        );
    }
    let span = arrivals[arrivals.len() - 1].duration_since(arrivals[0]);
    let used = (interval * (3 * EACH as u32 - 1)).as_secs_f64() / span.as_secs_f64();
    println!("the fleet used {:.1}% of the pace", used * 100.0);
    assert!(
        used >= 0.95,
        "the fleet used {:.1}% of the pace",
        used * 100.0
    );
}

// ===== client mode: a request waiting for the store holds no readied service =====

async fn two_path_api(arrivals: Arrivals) -> SocketAddr {
    let log = |arrivals: Arrivals| {
        move || {
            let arrivals = arrivals.clone();
            async move {
                arrivals.0.lock().unwrap().push(Instant::now());
                "done"
            }
        }
    };
    let app = Router::new()
        .route("/work", get(log(arrivals.clone())))
        .route("/slow", get(log(arrivals)));
    serve(app).await
}

fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .poll_interval(Duration::from_millis(100))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_waiting_for_the_store_stops_no_other() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("readiness");
    let api = two_path_api(Arrivals::default()).await;
    let limits = RateLimitByRoute::builder()
        .route("GET /slow", Quota::new(1, Duration::from_secs(2)))
        .route("GET /work", Quota::new(100, Duration::from_secs(1)))
        .store(store(&url, &prefix))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(limits)
        .concurrency_limit(1)
        .service(http_client());

    service
        .clone()
        .oneshot(get_request(api, "/slow"))
        .await
        .unwrap();
    let mut waiting = Box::pin(service.clone().oneshot(get_request(api, "/slow")));
    // Driven ready and called: it asks the store, and waits about 2 s for its turn.
    assert!(futures::poll!(&mut waiting).is_pending());
    let waiting = tokio::spawn(waiting);

    let started = Instant::now();
    let response = service.clone().oneshot(get_request(api, "/work")).await;
    assert_eq!(response.unwrap().status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "another route waited {:?}",
        started.elapsed()
    );
    assert_eq!(waiting.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_taken_in_the_store_but_never_sent_is_given_back() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("cancel");
    let arrivals = Arrivals::default();
    let api = logging_api(arrivals.clone()).await;
    let quota = Quota::new(1, Duration::from_secs(30));
    let limits = |max_wait| {
        RateLimitByRoute::builder()
            .route("GET /work", quota)
            .max_wait(max_wait)
            .store(store(&url, &prefix))
            .build()
            .unwrap()
    };
    let below = tower::limit::ConcurrencyLimit::new(http_client(), 1);
    let mut service = limits(Duration::from_secs(60)).layer(below.clone());
    service.ready().await.unwrap();
    let request = tokio::spawn(service.call(get_request(api, "/work")));

    // Something else takes the only capacity below the layer, so the request, admitted by
    // the store, waits to ready its own service.
    let mut other = below.clone();
    tokio::time::timeout(Duration::from_secs(1), other.ready())
        .await
        .expect("the waiting request holds no capacity below the layer")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let elsewhere = limits(Duration::from_millis(100)).layer(http_client());
    let error = send(&elsewhere, api).await.unwrap_err();
    assert!(is_wait_too_long(&error), "the place is held: {error}");

    // Dropped before it was sent: its place comes back at once, for the whole fleet.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    drop(other);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(send(&elsewhere, api).await.unwrap(), StatusCode::OK);
    assert_eq!(arrivals.sorted().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_of_requests_waiting_for_the_store_returns_the_request_at_once() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let api = logging_api(Arrivals::default()).await;
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::new(1, Duration::from_secs(2)))
        .max_queue(1)
        .store(store(&url, &unique_prefix("queue")))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(limits.clone())
        .service(http_client());
    assert_eq!(send(&service, api).await.unwrap(), StatusCode::OK);
    let waiting = tokio::spawn({
        let service = service.clone();
        async move { send(&service, api).await }
    });
    let started = Instant::now();
    while limits.snapshot()[0].waiters == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the request the store told to wait counts among the route's waiters"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let asked = Instant::now();
    let error = send(&service, api).await.unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<RateLimitError>(),
            Some(RateLimitError::QueueFull { max_queue: 1, .. })
        ),
        "{error}"
    );
    assert!(asked.elapsed() < Duration::from_millis(500));
    assert_eq!(waiting.await.unwrap().unwrap(), StatusCode::OK);
    assert_eq!(limits.snapshot()[0].waiters, 0);
    // Counted as through the local queue.
    let counters = limits.snapshot()[0].counters;
    assert_eq!(
        (counters.admitted, counters.waited, counters.queued),
        (2, 1, 1),
        "{counters:?}"
    );
    assert_eq!(counters.refused.queue_full, 1);
}

/// A store with a long in-flight lease, so that a place given back only by its lease would
/// show, and a layer giving one place of `GET /work` a second through it.
fn one_a_second(url: &str, prefix: &str) -> (RedisStore, RateLimitByRoute) {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .in_flight_lease(Duration::from_secs(20))
        // A loaded machine must not turn the calls below into store timeouts.
        .timeout(Duration::from_secs(5))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::new(1, Duration::from_secs(1)))
        .max_wait(Duration::from_secs(3))
        .store(store.clone())
        .build()
        .unwrap();
    (store, limits)
}

/// Another process of the fleet asks for the place of `GET /work` and gets it a period
/// later at most, not after the 20-second lease: the place was given back.
async fn the_place_comes_within_a_period(url: &str, prefix: &str) {
    let (_, limits) = one_a_second(url, prefix);
    let started = Instant::now();
    limits.layer(at_once()).call(work()).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Answers at once.
pub(crate) fn at_once() -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, std::convert::Infallible>> + Send,
> + Clone
       + Send {
    tower::service_fn(|_: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(()))
    })
}

pub(crate) fn work() -> Request<()> {
    Request::get("http://api.test/work").body(()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_is_given_back_off_the_path_and_frees_a_period_after_its_response() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let (_, limits) = one_a_second(&url, &unique_prefix("release"));
    let mut service = limits.layer(at_once());
    service.call(work()).await.unwrap();
    // The first was answered once its place was taken (one round trip); its release ran in
    // the background, and the place frees a period after the response, not with its lease.
    let started = Instant::now();
    service.call(work()).await.unwrap();
    let waited = started.elapsed();
    assert!(
        Duration::from_millis(800) < waited && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_given_back_last_reach_redis_after_the_layer_is_dropped() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("dropped");
    {
        // A layer's last request: answered, then the layer and its store dropped at once.
        let (_, limits) = one_a_second(&url, &prefix);
        limits.layer(at_once()).call(work()).await.unwrap();
    }
    // Another process sharing the limit gets the place a period later, not after the
    // 20-second lease: the dropped store's worker finished its queue.
    the_place_comes_within_a_period(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_flushes_its_store_before_exiting_leaves_no_place_taken() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("flush");
    let (exiting_url, exiting_prefix) = (url.clone(), prefix.clone());
    // A process's last request, then its runtime stops: what is still queued then is lost,
    // unless the process flushed its store first.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (store, limits) = one_a_second(&exiting_url, &exiting_prefix);
            limits.layer(at_once()).call(work()).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), store.flush())
                .await
                .expect("flush resolves");
        });
        drop(runtime);
    })
    .join()
    .unwrap();
    the_place_comes_within_a_period(&url, &prefix).await;
}

// ===== client mode: a request given up on after its send =====

/// Sends a request the server stalls on, gives up on it after 300 ms (by `give_up`), then
/// sends another; returns how long after the first the server received the second.
async fn next_after_abandoned<S>(service: S, api: SocketAddr, arrivals: &Arrivals) -> Duration
where
    S: Service<Request<Empty<Bytes>>, Response = Response<hyper::body::Incoming>, Error = BoxError>
        + Clone,
{
    let mut stalled = get_request(api, "/work");
    stalled
        .headers_mut()
        .insert("x-stall", http::HeaderValue::from_static("1"));
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), service.clone().oneshot(stalled)).await;
    // Given up on: by the layer below (a transport error), or by dropping the future.
    assert!(!matches!(abandoned, Ok(Ok(_))));
    assert_eq!(send(&service, api).await.unwrap(), StatusCode::OK);
    let arrivals = arrivals.sorted();
    assert_eq!(arrivals.len(), 2);
    arrivals[1].duration_since(arrivals[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_on_holds_its_place_in_the_store() {
    const HOLD: Duration = Duration::from_secs(1);
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let limits = |quota: Quota, prefix: &str| {
        RateLimitByRoute::builder()
            .route("GET /work", quota)
            .abandoned_hold(HOLD)
            .store(store(&url, &unique_prefix(prefix)))
            .build()
            .unwrap()
    };
    let stalling_api = |arrivals: Arrivals| {
        let app = Router::new().route(
            "/work",
            get(move |headers: HeaderMap| {
                let arrivals = arrivals.clone();
                async move {
                    arrivals.0.lock().unwrap().push(Instant::now());
                    if headers.contains_key("x-stall") {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    "done"
                }
            }),
        );
        serve(app)
    };

    // A sliding window, the request failing below the layer (a timeout, as a transport
    // error would), and a paced quota, the request dropped by its caller.
    let (window_arrivals, paced_arrivals) = (Arrivals::default(), Arrivals::default());
    let window_api = stalling_api(window_arrivals.clone()).await;
    let paced_api = stalling_api(paced_arrivals.clone()).await;
    let window = ServiceBuilder::new()
        .layer(limits(
            Quota::new(1, Duration::from_secs(1)),
            "abandon-window",
        ))
        .timeout(Duration::from_millis(300))
        .service(http_client());
    let paced = limits(Quota::per_second(1).with_burst(1), "abandon-gcra").layer(http_client());
    let (window_gap, paced_gap) = tokio::join!(
        next_after_abandoned(window, window_api, &window_arrivals),
        next_after_abandoned(paced, paced_api, &paced_arrivals),
    );
    // Given up on 300 ms after it was sent, held for HOLD, then as answered for a period (a
    // window) or an emission interval (paced): the server saw nothing sooner.
    for gap in [window_gap, paced_gap] {
        assert!(
            gap >= Duration::from_millis(300) + HOLD + Duration::from_secs(1),
            "the next request came {gap:?} after the abandoned one"
        );
        assert!(gap < Duration::from_secs(4), "held too long: {gap:?}");
    }
}

// ===== server mode: a fleet of axum servers enforcing one quota per client key =====

fn ratelimit_remaining(headers: &HeaderMap) -> u32 {
    let field = headers["ratelimit"].to_str().unwrap();
    let r = field.split(';').find_map(|p| p.strip_prefix("r=")).unwrap();
    r.parse().unwrap()
}

async fn limited_server(url: &str, prefix: &str, quota: Quota, fail_mode: FailMode) -> SocketAddr {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .timeout(Duration::from_millis(200))
        .fail_mode(fail_mode)
        .build()
        .unwrap();
    server_on(store, quota).await
}

/// An axum API limiting `GET /v2/generations` to `quota` per `x-api-key`, counted in `store`.
pub(crate) async fn server_on(store: RedisStore, quota: Quota) -> SocketAddr {
    let limits = RateLimitByRoute::builder()
        .route("GET /v2/generations", quota)
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .store(store)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v2/generations", get(|| async { "[]" }))
        .layer(limits);
    serve(app).await
}

pub(crate) async fn send_keyed(
    client: &HttpClient,
    addr: SocketAddr,
    key: &str,
) -> Response<hyper::body::Incoming> {
    let mut request = get_request(addr, "/v2/generations");
    request
        .headers_mut()
        .insert("x-api-key", http::HeaderValue::from_str(key).unwrap());
    client.request(request).await.unwrap()
}

pub(crate) fn retry_after(headers: &HeaderMap) -> u64 {
    headers["retry-after"].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_axum_servers_enforces_one_quota_per_key() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("servers");
    let quota = Quota::new(10, Duration::from_secs(30));
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(limited_server(&url, &prefix, quota, FailMode::Closed).await);
    }
    let client = http_client();

    for key in ["key-one", "key-two"] {
        let mut passed = 0;
        let mut refused = Vec::new();
        for i in 0..30 {
            let response = send_keyed(&client, fleet[i % 3], key).await;
            match response.status() {
                StatusCode::OK => {
                    passed += 1;
                    // The fleet's count, not one server's, on every response.
                    assert_eq!(ratelimit_remaining(response.headers()), 10 - passed);
                    assert!(response.headers().contains_key("ratelimit-policy"));
                }
                StatusCode::TOO_MANY_REQUESTS => refused.push(retry_after(response.headers())),
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(passed, 10, "{key}: one quota across the fleet");
        assert_eq!(refused.len(), 20);
        assert!(
            // A sliding window of 16 buckets frees up to a sixteenth of the period late.
            refused.iter().all(|&s| (1..=32).contains(&s)),
            "{refused:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_paced_by_the_store_states_what_remains() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("servers-paced");
    let quota = Quota::new(10, Duration::from_secs(60)).with_burst(3);
    let fleet = [
        limited_server(&url, &prefix, quota, FailMode::Closed).await,
        limited_server(&url, &prefix, quota, FailMode::Closed).await,
    ];
    let client = http_client();
    let mut remaining = Vec::new();
    for i in 0..4 {
        let response = send_keyed(&client, fleet[i % 2], "key-paced").await;
        if response.status() == StatusCode::OK {
            remaining.push(ratelimit_remaining(response.headers()));
        } else {
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        }
    }
    assert_eq!(remaining, [2, 1, 0], "a burst of 3 across the fleet");
}

/// A server-mode request waiting for the store's verdict holds a clone of its own: the
/// caller's service, driven ready through a `ConcurrencyLimit(1)`, gives its permit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_mode_waiting_for_the_store_holds_no_readied_service() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let layer = RateLimitByRoute::builder()
        .route("GET /limited", Quota::per_minute(10))
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .store(store(&url, &unique_prefix("server-ready")))
        .build()
        .unwrap();
    let inner = tower::service_fn(|_: Request<Empty<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(inner);
    for _ in 0..3 {
        let request = Request::get("http://api.test/limited")
            .header("x-api-key", "k")
            .body(Empty::<Bytes>::new())
            .unwrap();
        service.ready().await.unwrap();
        // The caller keeps its service while it awaits the response.
        let response = tokio::time::timeout(Duration::from_secs(5), service.call(request))
            .await
            .expect("the request waiting for the store is stuck behind the caller's permit")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// Admitted by the store while the service below is busy: the request waits for it to get
/// ready, and is sent then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_mode_admitted_by_the_store_waits_for_a_busy_service() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let layer = RateLimitByRoute::builder()
        .route("GET /limited", Quota::per_minute(10))
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .store(store(&url, &unique_prefix("server-busy")))
        .build()
        .unwrap();
    let slow = tower::service_fn(|_: Request<Empty<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let service = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(slow);
    let calls: FuturesUnordered<_> = (0..4)
        .map(|_| {
            let request = Request::get("http://api.test/limited")
                .header("x-api-key", "k")
                .body(Empty::<Bytes>::new())
                .unwrap();
            service.clone().oneshot(request)
        })
        .collect();
    let statuses: Vec<_> = tokio::time::timeout(Duration::from_secs(5), calls.collect::<Vec<_>>())
        .await
        .expect("requests admitted by the store never sent")
        .into_iter()
        .map(|response| response.unwrap().status())
        .collect();
    assert_eq!(statuses, [StatusCode::OK; 4]);
}

// ===== Redis stopped and started mid-test =====

/// Sends until a request gets through (Redis is back), for at most `limit`.
async fn until_ok<F, Fut>(mut send: F, limit: Duration) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while !send().await {
        assert!(started.elapsed() < limit, "the limits did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

fn client_layer(url: &str, prefix: &str, quota: Quota, fail_mode: FailMode) -> RateLimitByRoute {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .timeout(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(100))
        .fail_mode(fail_mode)
        .build()
        .unwrap();
    RateLimitByRoute::builder()
        .route("GET /work", quota)
        .max_wait(Duration::from_millis(300))
        .store(store)
        .build()
        .unwrap()
}

async fn send<S>(service: &S, api: SocketAddr) -> Result<StatusCode, BoxError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<hyper::body::Incoming>, Error = BoxError>
        + Clone,
{
    service
        .clone()
        .oneshot(get_request(api, "/work"))
        .await
        .map(|r| r.status())
}

fn is_wait_too_long(error: &BoxError) -> bool {
    matches!(
        error.downcast_ref::<RateLimitError>(),
        Some(RateLimitError::WaitTooLong { .. })
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back_failing_closed() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let arrivals = Arrivals::default();
    let api = logging_api(arrivals.clone()).await;
    let quota = Quota::new(5, Duration::from_secs(10));
    let limits = client_layer(&redis.url(), "closed", quota, FailMode::Closed);
    let service = ServiceBuilder::new()
        .layer(limits.clone())
        .service(http_client());

    assert_eq!(send(&service, api).await.unwrap(), StatusCode::OK);

    redis.stop();
    for _ in 0..3 {
        let error = send(&service, api).await.unwrap_err();
        assert!(
            error.downcast_ref::<StoreError>().is_some(),
            "a typed store error, got {error}"
        );
    }
    let counters = limits.snapshot()[0].counters;
    assert_eq!(counters.refused.store_unavailable, 3, "{counters:?}");
    assert_eq!(counters.admitted, 1);
    assert_eq!(
        arrivals.sorted().len(),
        1,
        "nothing is sent while the quota is unknown"
    );

    // Back, with its data lost: the quota starts afresh and holds again.
    redis.restart();
    until_ok(
        || async { send(&service, api).await.is_ok() },
        Duration::from_secs(10),
    )
    .await;
    let mut results = Vec::new();
    for _ in 0..5 {
        results.push(send(&service, api).await);
    }
    let passed = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        passed, 4,
        "5 a window, one of them already used: {results:?}"
    );
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(is_wait_too_long));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back_failing_open() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let arrivals = Arrivals::default();
    let api = logging_api(arrivals.clone()).await;
    let quota = Quota::new(5, Duration::from_secs(10));
    let limits = client_layer(&redis.url(), "open", quota, FailMode::Open);
    let service = ServiceBuilder::new().layer(limits).service(http_client());

    assert_eq!(send(&service, api).await.unwrap(), StatusCode::OK);

    // Down: the layer's own limit in this process takes over (this process has not used it
    // yet, since the store counted the first request).
    redis.stop();
    let mut results = Vec::new();
    for _ in 0..6 {
        results.push(send(&service, api).await);
    }
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        5,
        "{results:?}"
    );
    assert!(is_wait_too_long(results[5].as_ref().unwrap_err()));

    // Back: the shared count is used again (afresh, as Redis lost its data).
    redis.restart();
    until_ok(
        || async { send(&service, api).await.is_ok() },
        Duration::from_secs(10),
    )
    .await;
    let mut passed = 1;
    while send(&service, api).await.is_ok() {
        passed += 1;
        assert!(passed <= 5);
    }
    assert_eq!(passed, 5, "the shared quota holds again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refuses_or_counts_alone_while_redis_is_down() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let quota = Quota::new(3, Duration::from_secs(30));
    let closed = limited_server(&redis.url(), "server-closed", quota, FailMode::Closed).await;
    let open = limited_server(&redis.url(), "server-open", quota, FailMode::Open).await;
    let client = http_client();
    assert_eq!(
        send_keyed(&client, closed, "k").await.status(),
        StatusCode::OK
    );

    redis.stop();
    let refused = send_keyed(&client, closed, "k").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(refused.headers()) >= 1);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send_keyed(&client, open, "k").await.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "failing open, the server counts alone"
    );

    redis.restart();
    until_ok(
        || async { send_keyed(&client, closed, "k").await.status() == StatusCode::OK },
        Duration::from_secs(10),
    )
    .await;
    let mut passed = 1;
    while send_keyed(&client, closed, "k").await.status() == StatusCode::OK {
        passed += 1;
        assert!(passed <= 3);
    }
    assert_eq!(passed, 3, "the shared quota holds again");
}

#[tokio::test]
async fn bad_store_settings_are_typed_errors() {
    for builder in [
        RedisStore::builder("not a url"),
        RedisStore::builder("redis://127.0.0.1/").timeout(Duration::ZERO),
        RedisStore::builder("redis://127.0.0.1/").poll_interval(Duration::ZERO),
        RedisStore::builder("redis://127.0.0.1/").prefix(""),
        RedisStore::builder("redis://127.0.0.1/").prefix("a{b}"),
    ] {
        assert!(matches!(
            builder.build().unwrap_err(),
            tower_quota::ConfigError::InvalidSetting { .. }
        ));
    }
}

#[test]
fn a_store_needs_a_runtime() {
    let error = RedisStore::builder("redis://127.0.0.1/")
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("runtime"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_during_its_acquire_leaves_no_place_held() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("acquire-drops");
    let limits = RateLimitByRoute::builder()
        .route("GET /x", Quota::per_minute(2))
        .store(store(&url, &prefix))
        .build()
        .unwrap();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let below = tower::service_fn(move |_: Request<Empty<Bytes>>| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(Empty::<Bytes>::new())) }
    });
    let service = limits.layer(below);
    // Requests dropped at moments spread over the Redis round trip, by the caller's
    // timeout: most before their acquire is answered, a few after it (and then sent, and
    // given up on, which holds a place as it should).
    for n in 0..300u64 {
        let call = tokio::spawn(
            service.clone().oneshot(
                Request::get("http://api.test/x")
                    .body(Empty::new())
                    .unwrap(),
            ),
        );
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_micros(n % 150) {
            std::hint::spin_loop();
        }
        call.abort();
        let _ = call.await;
    }
    // Once the gives-back queued by the drops have run, only requests that were sent hold a
    // place in Redis.
    let redis = redis::Client::open(url.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let held_key = format!("{{{prefix}:rate:GET /x}}:held");
    let started = Instant::now();
    loop {
        let held: usize = redis::cmd("ZCARD")
            .arg(&held_key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
        if held <= sent {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{held} places held in Redis for {sent} requests sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_fleets_client_takes_a_few_bytes_of_redis_at_any_quota() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let redis = redis::Client::open(url.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let client = http_client();
    for (name, quota) in [
        ("minute", Quota::per_minute(600)),
        ("hour", Quota::per_hour(10_000)),
    ] {
        let prefix = unique_prefix(name);
        let api = limited_server(&url, &prefix, quota, FailMode::Closed).await;
        let mut passed = 0;
        for _ in 0..700 {
            passed += u32::from(send_keyed(&client, api, "heavy").await.status() == StatusCode::OK);
        }
        assert_eq!(passed, quota.count().min(700), "{name}");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        let mut bytes = 0;
        for key in &keys {
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .query_async(&mut connection)
                .await
                .unwrap();
            bytes += used.unwrap_or(0);
        }
        println!(
            "{name}: {passed} of 700 admitted, {} keys, {bytes} bytes in Redis",
            keys.len()
        );
        assert!(bytes <= 512, "{name}: {bytes} bytes in {keys:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_any_length_keeps_the_store_working() {
    // Before: a lease of 10^20 microseconds or more was written `1e+20` to PEXPIRE, and every
    // acquire failed (here, closed) after adding its place without an expiry.
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let arrivals = Arrivals::default();
    let api = logging_api(arrivals.clone()).await;
    let store = RedisStore::builder(url)
        .prefix(unique_prefix("lease-max"))
        .in_flight_lease(Duration::MAX)
        .timeout(Duration::from_secs(5))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::per_minute(5))
        .store(store)
        .build()
        .unwrap();
    let service = ServiceBuilder::new().layer(limits).service(http_client());
    for _ in 0..3 {
        assert_eq!(send(&service, api).await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_fleets_paced_client_expires_once_its_bucket_is_empty() {
    // Before: a server-mode GCRA key was kept for the in-flight lease (two minutes by
    // default) on top of its bucket, though a server holds nothing in flight.
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("gcra-ttl");
    let quota = Quota::per_second(10).with_burst(5);
    let api = limited_server(&url, &prefix, quota, FailMode::Closed).await;
    let client = http_client();
    assert_eq!(
        send_keyed(&client, api, "paced").await.status(),
        StatusCode::OK
    );
    let keys: Vec<String> = redis_query(&url, redis::cmd("KEYS").arg(format!("{{{prefix}*"))).await;
    assert!(!keys.is_empty());
    for key in keys {
        let ttl: i64 = redis_query(&url, redis::cmd("PTTL").arg(&key)).await;
        // An empty bucket a tenth of a second away, and a second of slack.
        assert!((0..=1_200).contains(&ttl), "{key} expires in {ttl} ms");
    }
}

// ===== the handle API over the store =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_and_requests_through_the_layer_share_the_stores_quota() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("permits");
    let arrivals = Arrivals::default();
    let api = logging_api(arrivals.clone()).await;
    let period = Duration::from_secs(2);
    let layer = |url: String| {
        let store = RedisStore::builder(url)
            .prefix(prefix.clone())
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap();
        RateLimitByRoute::builder()
            .route("GET /work", Quota::new(2, period))
            .store(store)
            .build()
            .unwrap()
    };
    // Two processes' worth of layers: one used through its handle, one as a tower layer.
    let (by_hand, as_layer) = (layer(url.clone()), layer(url));
    let client = http_client();
    let sent_by_hand = async {
        for _ in 0..3 {
            let permit = by_hand.acquire(&http::Method::GET, "/work").await.unwrap();
            let response = client
                .clone()
                .oneshot(get_request(api, "/work"))
                .await
                .unwrap();
            permit.finish(&response.into_parts().0).await;
        }
    };
    let service = ServiceBuilder::new().layer(as_layer).service(http_client());
    let through_layer = async {
        for _ in 0..3 {
            let response = service.clone().oneshot(get_request(api, "/work")).await;
            assert!(response.unwrap().status().is_success());
        }
    };
    tokio::join!(sent_by_hand, through_layer);
    let arrivals = arrivals.sorted();
    assert_eq!(arrivals.len(), 6);
    assert!(max_in_window(&arrivals, period) <= 2, "{arrivals:?}");
}
