//! `Backoff429` over real sockets on 127.0.0.1, on tokio's paused clock: against an axum server
//! that refuses its first calls, and as the top of the full stack against the local Sync API.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_mock::{Config, MockServer};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::backoff::{Jitter, Retried, Schedule};
use tower_quota::presets::sync;
use tower_quota::{Backoff429, BoxError, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

/// An axum server whose first `refusals` calls get a 429, with `Retry-After: 2` if asked.
async fn refusing_server(refusals: u32, retry_after: bool) -> String {
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new().route(
        "/v2/generate/{id}",
        get(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n >= refusals {
                    return (StatusCode::OK, "ok").into_response();
                }
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    r#"{"errorCode":"rate_limit_exceeded"}"#,
                )
                    .into_response();
                if retry_after {
                    response
                        .headers_mut()
                        .insert("retry-after", "2".parse().unwrap());
                }
                response
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v2/generate/abc", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(start_paused = true)]
async fn a_hyper_client_rides_out_a_servers_refusals() {
    // With `Retry-After: 2`: waits of 2, 2 and 4 s (the schedule's third is longer than what
    // the server asks); without: the schedule's 1, 2 and 4 s.
    for (retry_after, expected) in [(true, 8.0), (false, 7.0)] {
        let url = refusing_server(3, retry_after).await;
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let svc = ServiceBuilder::new()
            .layer(Backoff429::new().jitter(Jitter::None))
            .service(client);
        let start = Instant::now();
        let request = http::Request::get(&url).body(Full::default()).unwrap();
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let retried = *response.extensions().get::<Retried>().unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(retried.attempts, 4);
        assert_eq!(
            retried.waited.as_secs_f64(),
            expected,
            "retry-after: {retry_after}"
        );
        assert!(start.elapsed() >= retried.waited);
    }
}

const BODY: &str =
    r#"{"model":"lipsync-2","input":[{"type":"video","url":"v"},{"type":"audio","url":"a"}]}"#;

/// Sends `jobs` creates at once through `svc`; the statuses the callers got.
async fn submit<S>(svc: S, url: String, jobs: usize) -> Vec<u16>
where
    S: tower::Service<http::Request<Full<Bytes>>> + Clone,
    S::Response: Into<http::Response<BoxBody>>,
    S::Error: Into<BoxError>,
{
    let mut calls = FuturesUnordered::new();
    for _ in 0..jobs {
        let request = http::Request::post(&url)
            .header("x-api-key", sync_mock::DEFAULT_KEY)
            .body(Full::new(Bytes::from(BODY)))
            .unwrap();
        let svc = svc.clone();
        calls.push(async move {
            match svc.oneshot(request).await {
                Ok(response) => {
                    let response: http::Response<BoxBody> = response.into();
                    let status = response.status().as_u16();
                    let _ = response.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            }
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = calls.next().await {
        statuses.push(status);
    }
    statuses
}

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn boxed<B>(response: http::Response<B>) -> http::Response<BoxBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// The client believes it is on the Creator plan (3 jobs at once) but its key is on Hobbyist
/// (1): the API refuses its extra jobs with concurrency 429s. Backoff429 on top retries them
/// on a schedule of their own, each retry queueing again through the plan and the rate limit.
/// Without it, the callers get 429s.
#[tokio::test(start_paused = true)]
async fn the_full_stack_against_the_local_api_with_a_wrong_plan() {
    let config = Config::default()
        .no_keys()
        .api_key(sync_mock::DEFAULT_KEY, 1) // Hobbyist
        .job_durations(Duration::from_secs(2), Duration::from_secs(10));

    // Naive: the plan layer alone lets 3 go at once; the API refuses 2 of them.
    let server = MockServer::start(config.clone()).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let naive = ServiceBuilder::new()
        .map_response(boxed)
        .layer(plan.clone())
        .service(client.clone());
    let statuses = submit(naive, server.url("/v2/generate"), 6).await;
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert!(refused >= 2, "{statuses:?}");

    // The full stack: every job created, no caller sees a 429.
    let server = MockServer::start(config).await.unwrap();
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
        .build()
        .unwrap();
    let key: http::HeaderValue = sync_mock::DEFAULT_KEY.parse().unwrap();
    let below = ServiceBuilder::new()
        .layer(limits)
        .map_request(move |mut r: http::Request<Full<Bytes>>| {
            r.headers_mut().insert("x-api-key", key.clone());
            r
        })
        .service(client);
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let watch = tokio::spawn(
        plan.watch(below.clone(), server.url(""))
            .long_poll(Duration::from_secs(10))
            .run(),
    );
    let backoff = sync::backoff().concurrency_schedule(
        Schedule::new()
            .base_delay(Duration::from_secs(2))
            .factor(1.5)
            .max_delay(Duration::from_secs(30))
            .max_retries(30),
    );
    let full = ServiceBuilder::new()
        .map_response(boxed)
        .layer(backoff)
        .layer(plan.clone())
        .service(below);
    let start = Instant::now();
    let statuses = submit(full, server.url("/v2/generate"), 6).await;
    let elapsed = start.elapsed();
    watch.abort();
    assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");
    let stats = server.stats();
    assert_eq!((stats.created, stats.max_active), (6, 1));
    assert_eq!(stats.rate_limited_total(), 0);
    assert!(
        stats.concurrency_limited > 0,
        "the wrong plan did meet refusals"
    );
    // Six jobs of 12 s, one at a time, the last answered when it is created: at least 60 s;
    // the retries' waits (2 s, 3 s, ...) add some.
    assert!(elapsed >= Duration::from_secs(60), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(150), "{elapsed:?}");
    eprintln!(
        "6 jobs on a Hobbyist key believed Creator: {elapsed:?}, {} concurrency 429s retried",
        stats.concurrency_limited
    );
}
