//! End to end over real sockets on 127.0.0.1, on tokio's paused clock: the full stack
//! (`Backoff429` over `ConcurrencyLimitByPlan` over `RateLimitByRoute` over a hyper-util
//! client) against the local Sync API with strict limits, beside a naive client doing the
//! same work.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_mock::{Algorithm, Config, Endpoint, Limit, MockServer};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::{Backoff429, BoxError, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

const BODY: &str =
    r#"{"model":"lipsync-2","input":[{"type":"video","url":"v"},{"type":"audio","url":"a"}]}"#;
const MINUTE: Duration = Duration::from_secs(60);

fn create(server: &MockServer) -> http::Request<Full<Bytes>> {
    http::Request::post(server.url("/v2/generate"))
        .header("x-api-key", sync_mock::DEFAULT_KEY)
        .body(Full::new(Bytes::from(BODY)))
        .unwrap()
}

fn get(server: &MockServer, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(server.url(path))
        .header("x-api-key", sync_mock::DEFAULT_KEY)
        .body(Full::default())
        .unwrap()
}

/// Sends and reads the whole answer; the status and JSON body (0 on a transport error).
async fn send<S, B>(svc: S, request: http::Request<Full<Bytes>>) -> (u16, serde_json::Value)
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
{
    let Ok(response) = svc.oneshot(request).await else {
        return (0, serde_json::Value::Null);
    };
    let status = response.status().as_u16();
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// The client's quota of `n` a minute, to match the server's algorithm.
fn quota(algorithm: Algorithm, n: u32) -> Quota {
    match algorithm {
        Algorithm::LeakyBucket { burst } => Quota::per_minute(n).with_burst(burst),
        _ => Quota::per_minute(n),
    }
}

/// The full stack for `plan`, over `client`.
fn stack(
    algorithm: Algorithm,
    plan: &ConcurrencyLimitByPlan,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<impl http_body::Body>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send {
    let mut limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", quota(algorithm, 60))
        .route("GET /v2/generate/{id}", quota(algorithm, 600))
        .route("GET /v2/generations", quota(algorithm, 600));
    if algorithm == Algorithm::BucketedWindow {
        // The crate's own server window holds a place up to a sixteenth of a period longer
        // than an exact log: the client holds each place that much longer.
        limits = limits.safety_margin(MINUTE / 16);
    }
    let limits = limits.build().unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    ServiceBuilder::new()
        .layer(Backoff429::new())
        .layer(plan.clone())
        .layer(limits)
        .service(client)
}

/// A plain client that retries each 429 with exponential backoff, as the vendor's docs say.
async fn naive_send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    make: impl Fn() -> http::Request<Full<Bytes>>,
) -> u16 {
    let mut status = send(client.clone(), make()).await.0;
    for retry in 0..5 {
        if status != 429 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1 << retry)).await;
        status = send(client.clone(), make()).await.0;
    }
    status
}

/// 180 creates at once, with Sync's create quota of 60 a minute binding (the plan does not):
/// every algorithm, zero 429s and at least 98% of the ideal throughput. The naive client,
/// same work, same server: 429s.
#[tokio::test(start_paused = true)]
async fn the_full_stack_uses_the_quota_without_a_429_under_each_algorithm() {
    const JOBS: usize = 180;
    for algorithm in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::LeakyBucket { burst: 1 },
        Algorithm::LeakyBucket { burst: 10 },
        Algorithm::BucketedWindow,
    ] {
        let config = Config::default()
            .api_key(sync_mock::DEFAULT_KEY, 1_000)
            .algorithm(algorithm)
            .job_durations(Duration::from_secs(3600), Duration::from_secs(3600));
        let server = MockServer::start(config.clone()).await.unwrap();
        let plan = ConcurrencyLimitByPlan::new(Plan::Enterprise(1_000));
        let svc = stack(algorithm, &plan);
        let start = Instant::now();
        let mut calls: FuturesUnordered<_> = (0..JOBS)
            .map(|_| send(svc.clone(), create(&server)))
            .collect();
        while let Some((status, _)) = calls.next().await {
            assert_eq!(status, 201, "{algorithm:?}");
        }
        let elapsed = start.elapsed().as_secs_f64();
        let stats = server.stats();
        assert_eq!(stats.too_many_requests(), 0, "{algorithm:?}");
        // The ideal: the server's own limit, met exactly. Windows: 60 at once, then 60 a
        // minute later, and so on. Leaky bucket: `burst` at once, then one a second.
        // The crate's bucketed window (measured): 60 at once, then 60 when their bucket
        // clears, 63.75 s later, and so on.
        let ideal = match algorithm {
            Algorithm::LeakyBucket { burst } => (JOBS - burst as usize) as f64,
            Algorithm::BucketedWindow => ((JOBS / 60) - 1) as f64 * 63.75,
            _ => ((JOBS / 60) - 1) as f64 * 60.0,
        };
        assert!(
            ideal / elapsed >= 0.98,
            "{algorithm:?}: {elapsed:.2} s against an ideal of {ideal} s"
        );

        // The naive client, same work, same kind of server.
        let server = MockServer::start(config).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut calls: FuturesUnordered<_> = (0..JOBS)
            .map(|_| naive_send(&client, || create(&server)))
            .collect();
        while calls.next().await.is_some() {}
        let naive = server.stats().too_many_requests();
        assert!(naive > 0, "{algorithm:?}");
        eprintln!(
            "{algorithm:?}: layered {elapsed:.1} s (ideal {ideal} s), 0 429s; naive {naive} 429s"
        );
    }
}

/// Creates, status polls and lists at once on a Creator plan: the stack stays inside the
/// create quota, the status quota and the plan at the same time, with no 429.
#[tokio::test(start_paused = true)]
async fn mixed_traffic_stays_inside_both_route_quotas_and_the_plan() {
    let config = Config::default()
        .limit(Endpoint::Get, Limit::per_minute(120))
        .limit(Endpoint::List, Limit::per_minute(30))
        .job_durations(Duration::from_secs(2), Duration::from_secs(10));
    let server = MockServer::start(config.clone()).await.unwrap();
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .route("GET /v2/generate/{id}", Quota::per_minute(120))
        .route("GET /v2/generations", Quota::per_minute(30))
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new()
        .layer(Backoff429::new())
        .layer(plan.clone())
        .layer(limits)
        .service(client);

    let mut work = FuturesUnordered::new();
    for _ in 0..30 {
        let (svc, server) = (svc.clone(), &server);
        work.push(Box::pin(async move {
            let (status, job) = send(svc.clone(), create(server)).await;
            assert_eq!(status, 201);
            let id = job["id"].as_str().unwrap().to_owned();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (status, job) =
                    send(svc.clone(), get(server, &format!("/v2/generate/{id}"))).await;
                assert_eq!(status, 200);
                if job["status"] == "COMPLETED" {
                    break;
                }
            }
        })
            as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>);
    }
    for _ in 0..40 {
        let (svc, server) = (svc.clone(), &server);
        work.push(Box::pin(async move {
            let (status, _) = send(
                svc,
                get(server, "/v2/generations?status=PENDING,PROCESSING"),
            )
            .await;
            assert_eq!(status, 200);
        }));
    }
    while work.next().await.is_some() {}

    let stats = server.stats();
    assert_eq!(stats.too_many_requests(), 0, "{:?}", stats.rate_limited);
    assert_eq!((stats.created, stats.max_active), (30, 3));
    assert!(stats.max_in_window(Endpoint::Create, MINUTE) <= 60);
    assert!(stats.max_in_window(Endpoint::Get, MINUTE) <= 120);
    assert!(stats.max_in_window(Endpoint::List, MINUTE) <= 30);
    assert!(
        stats.requests_to(Endpoint::Get) > 120,
        "the status quota was binding"
    );

    // The naive client, same work.
    let server = MockServer::start(config).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut work = FuturesUnordered::new();
    for _ in 0..30 {
        let (client, server) = (&client, &server);
        work.push(async move {
            if naive_send(client, || create(server)).await != 201 {
                return;
            }
            tokio::time::sleep(Duration::from_secs(13)).await;
        });
    }
    while work.next().await.is_some() {}
    assert!(server.stats().too_many_requests() > 0);
}

/// Three clients, each with its own connection pool and its own services, built from clones
/// of one layer handle: together they stay inside the quota and the plan.
#[tokio::test(start_paused = true)]
async fn several_clients_share_one_layer_handle() {
    let server = MockServer::start(
        Config::default().job_durations(Duration::from_secs(2), Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
        .build()
        .unwrap();
    let key = http::HeaderValue::from_static(sync_mock::DEFAULT_KEY);
    let below = ServiceBuilder::new()
        .layer(limits.clone())
        .map_request(move |mut r: http::Request<Full<Bytes>>| {
            r.headers_mut().insert("x-api-key", key.clone());
            r
        })
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let watch = tokio::spawn(
        plan.watch(below, server.url(""))
            .long_poll(Duration::from_secs(10))
            .run(),
    );
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let svc = ServiceBuilder::new()
            .layer(plan.clone())
            .layer(limits.clone())
            .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
        let requests: Vec<_> = (0..10).map(|_| create(&server)).collect();
        clients.push(tokio::spawn(async move {
            let mut calls: FuturesUnordered<_> =
                requests.into_iter().map(|r| send(svc.clone(), r)).collect();
            let mut created = 0;
            while let Some((status, _)) = calls.next().await {
                created += usize::from(status == 201);
            }
            created
        }));
    }
    let mut created = 0;
    for client in clients {
        created += client.await.unwrap();
    }
    while plan.in_use() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watch.abort();
    let stats = server.stats();
    assert_eq!((created, stats.too_many_requests()), (30, 0));
    assert_eq!(stats.max_active, 3);
    // 30 jobs, 3 at a time, 12 s each.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_secs(120) && elapsed <= Duration::from_secs(123),
        "{elapsed:?}"
    );

    // Three naive clients, same work: they take each other's slots and collect 429s.
    let server = MockServer::start(
        Config::default().job_durations(Duration::from_secs(2), Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let mut clients = FuturesUnordered::new();
    for _ in 0..3 {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let server = &server;
        clients.push(async move {
            let mut calls: FuturesUnordered<_> = (0..10)
                .map(|_| naive_send(&client, || create(server)))
                .collect();
            while calls.next().await.is_some() {}
        });
    }
    while clients.next().await.is_some() {}
    let naive = server.stats();
    assert!(naive.too_many_requests() > 0);
    assert!(naive.created < 30, "the naive clients gave up on some jobs");
}
