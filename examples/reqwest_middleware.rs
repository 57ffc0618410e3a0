//! A reqwest client with the three layers as reqwest-middleware middlewares, keeping
//! `RequestBuilder` and `reqwest::Response`, against the local Sync API with time scaled down
//! 20 times. Four creates on the Creator plan (3 jobs at once): the fourth waits for a slot,
//! which a status poll showing a job ended gives back.
//!
//! ```sh
//! cargo run --example reqwest_middleware --features reqwest-middleware
//! ```

use std::time::{Duration, Instant};

use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use sync_mock::{Config, MockServer};

use tower_quota::concurrency::Job;
use tower_quota::middleware::{BackoffMiddleware, PlanMiddleware, RateLimitMiddleware};
use tower_quota::presets::sync;
use tower_quota::{BoxError, Plan, Quota, RateLimitByRoute};

const SCALE: u32 = 20;
const CREATE: &str = r#"{"model":"lipsync-2","input":[{"type":"video","url":"v"}]}"#;

async fn create(client: &ClientWithMiddleware, url: &str) -> Result<String, BoxError> {
    let response = client
        .post(url)
        .header("x-api-key", sync_mock::DEFAULT_KEY)
        .header("content-type", "application/json")
        .body(CREATE)
        .send()
        .await?;
    let job = response.extensions().get::<Job>().cloned();
    // Read the create's body: the plan's slot is bound to the job once it shows the id.
    let body: serde_json::Value = serde_json::from_str(&response.text().await?)?;
    let id = job.and_then(|job| job.id().map(str::to_owned));
    Ok(id
        .or_else(|| body["id"].as_str().map(str::to_owned))
        .unwrap_or_default())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let minute = Duration::from_secs(60) / SCALE;
    let api = MockServer::start(Config::default().time_scale(SCALE)).await?;

    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::new(60, minute))
        .default_quota(Quota::new(600, minute))
        .build()?;
    let plan = sync::plan(Plan::Creator).build()?;
    let backoff = sync::backoff()
        .base_delay(Duration::from_secs(1) / SCALE)
        .build()?;
    // Outermost first, as a tower stack: a retry waits for its turn again.
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(BackoffMiddleware::new(backoff))
        .with(PlanMiddleware::new(plan.clone()))
        .with(RateLimitMiddleware::new(limits.clone()))
        .build();

    let start = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = create(&client, &api.url("/v2/generate")).await?;
        println!("{:>5.2}s  created {id}", start.elapsed().as_secs_f64());
        ids.push(id);
    }
    println!("slots held: {} of {}", plan.in_use(), plan.plan().limit());

    // The fourth create waits for a slot inside its `send()`.
    let fourth = tokio::spawn({
        let (client, url) = (client.clone(), api.url("/v2/generate"));
        async move { create(&client, &url).await }
    });
    // Poll the first job until it ends: the status response gives its slot back.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = client
            .get(api.url(&format!("/v2/generate/{}", ids[0])))
            .header("x-api-key", sync_mock::DEFAULT_KEY)
            .send()
            .await?
            .text()
            .await?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        println!(
            "{:>5.2}s  {} is {}",
            start.elapsed().as_secs_f64(),
            ids[0],
            status["status"]
        );
        if status["status"] == "COMPLETED" {
            break;
        }
    }
    let id = fourth.await??;
    println!(
        "{:>5.2}s  created {id} once a slot was free ({} held)",
        start.elapsed().as_secs_f64(),
        plan.in_use()
    );
    let generate = &limits.snapshot()[0];
    println!(
        "POST /v2/generate: {} of {} left this minute; 429s from the API: {}",
        generate.remaining,
        generate.quota.count(),
        api.stats().too_many_requests()
    );
    Ok(())
}
