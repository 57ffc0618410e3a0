//! The layers against the local Sync API (`sync-mock`), whose limits are counted by its own
//! code: `RateLimitByRoute` under each of its server algorithms, and `ConcurrencyLimitByPlan`
//! over a long run of jobs. On tokio's paused clock.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_mock::{Algorithm, Config, Endpoint, Limit, MockServer};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::{Quota, RateLimitByRoute};

const BODY: &str =
    r#"{"model":"lipsync-2","input":[{"type":"video","url":"v"},{"type":"audio","url":"a"}]}"#;

/// 120 creates and 240 status reads at once, through the layer, against the mock. `quota`
/// makes the client's quota of `n` a minute, to match the server's algorithm; `margin`, the
/// client's safety margin, if not its default.
async fn run(algorithm: Algorithm, quota: fn(u32) -> Quota, margin: Option<Duration>) {
    // A paced quota with a burst of `b` allows `b - 1` more in a minute than its rate.
    let burst_extra = match algorithm {
        Algorithm::LeakyBucket { burst } => burst as usize - 1,
        _ => 0,
    };
    let hour = Duration::from_secs(3600);
    let config = Config::default()
        .api_key(sync_mock::DEFAULT_KEY, 1_000) // only the route limits in play
        .algorithm(algorithm)
        .limit(Endpoint::Create, Limit::per_minute(60))
        .other_limits(Limit::per_minute(600))
        .job_durations(hour, hour);
    let server = MockServer::start(config).await.unwrap();

    let mut limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", quota(60))
        .route("GET /v2/generate/{id}", quota(600));
    if let Some(margin) = margin {
        limits = limits.safety_margin(margin);
    }
    let limits = limits.build().unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new().layer(limits).service(client);

    let mut calls = FuturesUnordered::new();
    for i in 0..360 {
        let request = if i % 3 == 0 {
            http::Request::post(server.url("/v2/generate")).body(Full::new(Bytes::from(BODY)))
        } else {
            http::Request::get(server.url(&format!("/v2/generate/id-{i}"))).body(Full::default())
        };
        let request = request
            .map(|mut r| {
                r.headers_mut()
                    .insert("x-api-key", sync_mock::DEFAULT_KEY.parse().unwrap());
                r
            })
            .unwrap();
        let mut svc = svc.clone();
        calls.push(async move {
            let response = svc.ready().await?.call(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<_, tower_quota::BoxError>(status)
        });
    }
    while let Some(status) = calls.next().await {
        assert!(matches!(status.unwrap(), 201 | 404));
    }
    let stats = server.stats();
    assert_eq!(
        stats.too_many_requests(),
        0,
        "{algorithm:?}: {:?}",
        stats.rate_limited
    );
    assert_eq!(stats.created, 120);
    let minute = Duration::from_secs(60);
    assert!(stats.max_in_window(Endpoint::Create, minute) <= 60 + burst_extra);
    assert!(stats.max_in_window(Endpoint::Get, minute) <= 600 + burst_extra);
}

#[tokio::test(start_paused = true)]
async fn no_429_from_a_fixed_window_server() {
    run(Algorithm::FixedWindow, Quota::per_minute, None).await;
}

#[tokio::test(start_paused = true)]
async fn no_429_from_a_sliding_window_server() {
    run(Algorithm::SlidingWindow, Quota::per_minute, None).await;
}

/// The crate's own server mode on both sides: its sliding window holds a place for up to a
/// sixteenth of a period longer than an exact log (3.75 s of a minute), so the client holds
/// each place that much longer. With its default margin (50 ms) this run met 429s (measured
/// when the mock's exact window ran on the layer).
#[tokio::test(start_paused = true)]
async fn no_429_from_the_crates_own_bucketed_window() {
    let sixteenth = Duration::from_secs(60) / 16;
    run(
        Algorithm::BucketedWindow,
        Quota::per_minute,
        Some(sixteenth),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_429_from_a_leaky_bucket_server_with_no_burst() {
    run(
        Algorithm::LeakyBucket { burst: 1 },
        |n| Quota::per_minute(n).with_burst(1),
        None,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_429_from_a_leaky_bucket_server_with_a_burst() {
    run(
        Algorithm::LeakyBucket { burst: 5 },
        |n| Quota::per_minute(n).with_burst(5),
        None,
    )
    .await;
}

/// A client on the Creator plan submits 300 jobs at once, through `ConcurrencyLimitByPlan`
/// over `RateLimitByRoute`, with a long-polling watch through the rate-limited service below
/// the plan. The mock holds each job 12 s (2 s `PENDING`, 10 s `PROCESSING`).
#[tokio::test(start_paused = true)]
async fn three_hundred_jobs_on_a_creator_plan_without_a_429() {
    use tower_quota::{ConcurrencyLimitByPlan, Plan};

    let server = MockServer::start(Config::default()).await.unwrap(); // Sync's defaults
    let key: http::HeaderValue = sync_mock::DEFAULT_KEY.parse().unwrap();
    let client = ServiceBuilder::new()
        .map_request(move |mut request: http::Request<Full<Bytes>>| {
            request.headers_mut().insert("x-api-key", key.clone());
            request
        })
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
        .build()
        .unwrap();
    let below = ServiceBuilder::new().layer(limits).service(client);
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let watch = tokio::spawn(
        plan.watch(below.clone(), server.url(""))
            .interval(Duration::from_secs(1))
            .long_poll(Duration::from_secs(10))
            .run(),
    );
    let svc = ServiceBuilder::new().layer(plan.clone()).service(below);

    let start = tokio::time::Instant::now();
    let mut calls = FuturesUnordered::new();
    for _ in 0..300 {
        let request = http::Request::post(server.url("/v2/generate"))
            .body(Full::new(Bytes::from(BODY)))
            .unwrap();
        let svc = svc.clone();
        calls.push(async move {
            let response = svc.oneshot(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<_, tower_quota::BoxError>(status)
        });
    }
    while let Some(status) = calls.next().await {
        assert_eq!(status.unwrap(), 201);
    }
    // The last three jobs run their 12 s after their creates were answered.
    while plan.in_use() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = start.elapsed();
    watch.abort();

    let stats = server.stats();
    assert_eq!(stats.too_many_requests(), 0, "{:?}", stats.rate_limited);
    assert_eq!((stats.created, stats.completed), (300, 300));
    assert_eq!(stats.max_active, 3);
    // Ideal: ceil(300 / 3) rounds of 12 s = 1,200 s.
    let ideal = Duration::from_secs(1_200);
    assert!(elapsed >= ideal, "{elapsed:?}");
    assert!(
        elapsed <= ideal.mul_f64(1.02),
        "{elapsed:?} is more than 2% over the ideal {ideal:?}"
    );
    eprintln!("300 jobs on a Creator plan: {elapsed:?} (ideal {ideal:?})");
}
