//! Job slots freed by webhooks: `ConcurrencyLimitByPlan` with `complete(id)` called from an
//! axum webhook endpoint.
//!
//! The local Sync API (`sync-mock`) runs on 127.0.0.1 with Sync's limits, its job times scaled
//! down 10 times (a job is `PENDING` 0.2 s, then `PROCESSING` 1 s). A client on the Creator
//! plan (3 jobs at once) submits 12 jobs at once, each with a `webhookUrl`. The webhook
//! endpoint checks the `Sync-Signature` and calls `plan.complete(id)`, which lets the next
//! queued create go. The API counts no 429 and never more than 3 jobs at once.
//!
//! ```sh
//! cargo run --example webhook_complete
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_mock::{Config, MockServer};
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::concurrency::Job;
use tower_quota::presets::sync::{verify_webhook, SIGNATURE_HEADER};
use tower_quota::{BoxError, ConcurrencyLimitByPlan, Plan};

const SECRET: &str = "whsec_example";

/// The webhook endpoint: a finished generation, signed. Verify, then give its slot back.
async fn on_webhook(
    State(plan): State<ConcurrencyLimitByPlan>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if verify_webhook(SECRET, signature, &body, now, Duration::from_secs(300)).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(generation) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    if let Some(id) = generation["id"].as_str() {
        let freed = plan.complete(id);
        println!(
            "  webhook: {id} is {}{}",
            generation["status"].as_str().unwrap_or("?"),
            if freed { ", slot freed" } else { "" }
        );
    }
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let api = MockServer::start(
        Config::default()
            .webhook_secret(SECRET)
            .time_scale(10)
            .job_durations(Duration::from_millis(200), Duration::from_secs(1)),
    )
    .await?;

    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/webhooks/sync", hooks.local_addr()?);
    let app = Router::new()
        .route("/webhooks/sync", post(on_webhook))
        .with_state(plan.clone());
    tokio::spawn(async move { axum::serve(hooks, app).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new().layer(plan.clone()).service(client);

    println!("12 jobs on a Creator plan (3 at once), slots freed by webhooks:");
    let start = Instant::now();
    let mut jobs = FuturesUnordered::new();
    for _ in 0..12 {
        let body = serde_json::json!({
            "model": "lipsync-2",
            "input": [{"type": "video", "url": "https://example.com/v.mp4"},
                      {"type": "audio", "url": "https://example.com/a.wav"}],
            "webhookUrl": hook_url,
        });
        let request = http::Request::post(api.url("/v2/generate"))
            .header("x-api-key", sync_mock::DEFAULT_KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let svc = svc.clone();
        jobs.push(async move {
            let response = svc.oneshot(request).await?;
            let status = response.status();
            let job = response.extensions().get::<Job>().cloned();
            response.into_body().collect().await?;
            let id = job.and_then(|j| j.id().map(str::to_owned));
            Ok::<_, BoxError>((status, id))
        });
    }
    while let Some(created) = jobs.next().await {
        let (status, id) = created?;
        println!(
            "  {:>5.2}s  create answered {status}: {}",
            start.elapsed().as_secs_f64(),
            id.as_deref().unwrap_or("-")
        );
    }
    while plan.in_use() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stats = api.stats();
    println!(
        "done in {:.2}s: {} created, {} completed, {} 429s, at most {} jobs at once, {} webhooks delivered",
        start.elapsed().as_secs_f64(),
        stats.created,
        stats.completed,
        stats.too_many_requests(),
        stats.max_active,
        stats.webhooks_delivered,
    );
    api.stop().await?;
    Ok(())
}
