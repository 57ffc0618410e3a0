//! A hyper-util client with all three layers, against the local Sync API.
//!
//! `Backoff429` on top, then `ConcurrencyLimitByPlan` (with a watch that long-polls held
//! jobs through the rate-limited service below it), then `RateLimitByRoute`, then the client.
//! Twelve jobs on a Creator plan, Sync's limits with time scaled down 20 times.
//!
//! ```sh
//! cargo run --example hyper_client
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_mock::{Config, MockServer};
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::concurrency::Job;
use tower_quota::presets::sync;
use tower_quota::{BoxError, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    const SCALE: u32 = 20;
    let minute = Duration::from_secs(60) / SCALE;
    let api = MockServer::start(Config::default().time_scale(SCALE)).await?;

    // The API key goes on every request, the watch's polls included.
    let key = http::HeaderValue::from_static(sync_mock::DEFAULT_KEY);
    let client = ServiceBuilder::new()
        .map_request(move |mut request: http::Request<Full<Bytes>>| {
            request.headers_mut().insert("x-api-key", key.clone());
            request
        })
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::new(60, minute))
        .default_quota(Quota::new(600, minute))
        .build()?;
    let below = ServiceBuilder::new().layer(limits).service(client);

    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let watch = tokio::spawn(
        plan.watch(below.clone(), api.url(""))
            .long_poll(Duration::from_secs(10))
            .run(),
    );
    let backoff = sync::backoff()
        .base_delay(Duration::from_secs(1) / SCALE)
        .build()?;
    let svc = ServiceBuilder::new()
        .layer(backoff)
        .layer(plan.clone())
        .service(below);

    let start = Instant::now();
    let mut jobs = FuturesUnordered::new();
    for _ in 0..12 {
        let body = r#"{"model":"lipsync-2","input":[{"type":"video","url":"v"},{"type":"audio","url":"a"}]}"#;
        let request = http::Request::post(api.url("/v2/generate"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))?;
        let svc = svc.clone();
        jobs.push(async move {
            let response = svc.oneshot(request).await?;
            let status = response.status();
            let job = response.extensions().get::<Job>().cloned();
            response.into_body().collect().await?;
            Ok::<_, BoxError>((status, job.and_then(|j| j.id().map(str::to_owned))))
        });
    }
    while let Some(job) = jobs.next().await {
        let (status, id) = job?;
        println!(
            "{:>6.2}s  {status}  {}  ({} slots held)",
            start.elapsed().as_secs_f64(),
            id.as_deref().unwrap_or("-"),
            plan.in_use()
        );
    }
    while plan.in_use() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watch.abort();
    let stats = api.stats();
    println!(
        "12 jobs in {:.2}s: {} 429s, at most {} at once",
        start.elapsed().as_secs_f64(),
        stats.too_many_requests(),
        stats.max_active
    );
    Ok(())
}
