//! A reqwest client through the layers, by way of `http::Request`.
//!
//! reqwest's `Client` is not a tower `Service` of `http::Request`s, but reqwest converts both
//! ways: `reqwest::Request::try_from(http::Request<T>)` and
//! `http::Response::<reqwest::Body>::from(reqwest::Response)`. A `service_fn` joins the two, and
//! the layers go on top as on any client. Against the local Sync API, time scaled down 20 times.
//!
//! ```sh
//! cargo run --example reqwest_client
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use sync_mock::{Config, MockServer};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_quota::presets::sync;
use tower_quota::{BoxError, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

/// reqwest as a tower `Service<http::Request<Bytes>>`.
fn reqwest_service(
    client: reqwest::Client,
) -> impl tower::Service<
    http::Request<Bytes>,
    Response = http::Response<reqwest::Body>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    service_fn(move |request: http::Request<Bytes>| {
        let client = client.clone();
        async move {
            let request = reqwest::Request::try_from(request)?;
            let response = client.execute(request).await?;
            Ok::<_, BoxError>(http::Response::from(response))
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    const SCALE: u32 = 20;
    let minute = Duration::from_secs(60) / SCALE;
    let api = MockServer::start(Config::default().time_scale(SCALE)).await?;

    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::new(60, minute))
        .default_quota(Quota::new(600, minute))
        .build()?;
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let svc = ServiceBuilder::new()
        .layer(
            sync::backoff()
                .base_delay(Duration::from_secs(1) / SCALE)
                .build()?,
        )
        .layer(plan.clone())
        .layer(limits)
        .service(reqwest_service(reqwest::Client::new()));

    let start = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let request = http::Request::post(api.url("/v2/generate"))
            .header("x-api-key", sync_mock::DEFAULT_KEY)
            .header("content-type", "application/json")
            .body(Bytes::from_static(
                br#"{"model":"lipsync-2","input":[{"type":"video","url":"v"}]}"#,
            ))?;
        // The fourth create waits for a slot: nothing tells the plan the first jobs ended
        // until their status is polled below, so it waits behind them.
        let sender = svc.clone();
        let created = tokio::spawn(async move {
            let response = sender.oneshot(request).await?;
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(serde_json::from_slice::<serde_json::Value>(&body)?)
        });
        if ids.len() < 3 {
            let job = created.await??;
            println!(
                "{:>5.2}s  created {}",
                start.elapsed().as_secs_f64(),
                job["id"]
            );
            ids.push(job["id"].as_str().unwrap_or_default().to_owned());
        } else {
            // Poll the first job until it ends; the status response frees its slot.
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let poll = http::Request::get(api.url(&format!("/v2/generate/{}", ids[0])))
                    .header("x-api-key", sync_mock::DEFAULT_KEY)
                    .body(Bytes::new())?;
                let response = svc.clone().oneshot(poll).await?;
                let body = response.into_body().collect().await?.to_bytes();
                let job: serde_json::Value = serde_json::from_slice(&body)?;
                println!(
                    "{:>5.2}s  {} is {}",
                    start.elapsed().as_secs_f64(),
                    ids[0],
                    job["status"]
                );
                if job["status"] == "COMPLETED" {
                    break;
                }
            }
            let job = created.await??;
            println!(
                "{:>5.2}s  created {} once a slot was free ({} held)",
                start.elapsed().as_secs_f64(),
                job["id"],
                plan.in_use()
            );
        }
    }
    println!("429s from the API: {}", api.stats().too_many_requests());
    Ok(())
}
