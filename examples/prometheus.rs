//! The three layers inside an axum service that exposes Prometheus `/metrics`.
//!
//! `POST /generate` is a proxy: each call creates one lip-sync job at the local Sync API
//! through `Backoff429`, `ConcurrencyLimitByPlan` and `RateLimitByRoute` (Sync's limits, time
//! scaled down 20 times), and answers with Sync's response. `GET /metrics` is what a
//! Prometheus server scrapes: every layer records through the `metrics` facade (feature
//! `metrics`) into the recorder of `metrics-exporter-prometheus` installed at the start.
//! The example sends twelve jobs through its own proxy and prints the crate's lines of
//! `/metrics`.
//!
//! ```sh
//! cargo run --example prometheus --features metrics
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::presets::sync;
use tower_quota::{BoxError, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

/// Sync's limits run this many times faster than the real API's.
pub const SCALE: u32 = 20;

/// The client stack every proxied request goes through.
pub type Stack = BoxCloneSyncService<http::Request<Full<Bytes>>, http::Response<Body>, BoxError>;

/// The proxy's state: the client stack, the Sync API's address and the Prometheus handle.
#[derive(Clone)]
pub struct App {
    /// The three layers over a hyper client.
    pub stack: Stack,
    /// The Sync API's origin.
    pub api: String,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

/// The recorder every layer records into: installed once per process, before the layers'
/// first requests. The waits are histograms with buckets (Prometheus summaries otherwise).
pub fn install_recorder() -> PrometheusHandle {
    let buckets = [0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .expect("buckets are given")
        .install_recorder()
        .expect("the first recorder of this process")
}

/// The three layers over a hyper client, named as their metrics' `layer` label, with the
/// plan's watch running.
pub fn client_stack(api: &str, api_key: &'static str) -> Result<Stack, BoxError> {
    let minute = Duration::from_secs(60) / SCALE;
    let key = http::HeaderValue::from_static(api_key);
    let client = ServiceBuilder::new()
        .map_request(move |mut request: http::Request<Full<Bytes>>| {
            request.headers_mut().insert("x-api-key", key.clone());
            request
        })
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let limits = RateLimitByRoute::builder()
        .name("sync")
        .route("POST /v2/generate", Quota::new(60, minute))
        .default_quota(Quota::new(600, minute))
        .build()?;
    let below = ServiceBuilder::new().layer(limits).service(client);
    let plan = ConcurrencyLimitByPlan::builder(Plan::Creator)
        .name("sync")
        .build()?;
    tokio::spawn(
        plan.watch(below.clone(), api)
            .long_poll(Duration::from_secs(10))
            .run(),
    );
    let backoff = sync::backoff()
        .name("sync")
        .base_delay(Duration::from_secs(1) / SCALE)
        .build()?;
    let stack = ServiceBuilder::new()
        .layer(backoff)
        .layer(plan)
        .service(below)
        .map_response(|response| response.map(Body::new));
    Ok(BoxCloneSyncService::new(stack))
}

/// `POST /generate` (a proxy to the Sync API's `POST /v2/generate`) and `GET /metrics`.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/generate", post(generate))
        .route(
            "/metrics",
            get(|State(app): State<App>| async move { app.metrics.render() }),
        )
        .with_state(app)
}

async fn generate(State(app): State<App>, body: Bytes) -> Result<http::Response<Body>, String> {
    let request = http::Request::post(format!("{}/v2/generate", app.api))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    app.stack.oneshot(request).await.map_err(|e| e.to_string())
}

/// Serves the proxy on a free port of 127.0.0.1.
pub async fn serve(app: App) -> Result<SocketAddr, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router(app)).await });
    Ok(addr)
}

#[allow(dead_code)] // also compiled into a test, which has its own `main`
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let metrics = install_recorder();
    let api = sync_mock::MockServer::start(sync_mock::Config::default().time_scale(SCALE)).await?;
    let stack = client_stack(&api.url(""), sync_mock::DEFAULT_KEY)?;
    let proxy = serve(App {
        stack,
        api: api.url(""),
        metrics,
    })
    .await?;
    println!("proxy on http://{proxy}: POST /generate, GET /metrics");

    // Twelve jobs through the proxy, at once: the plan lets three run at a time.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body =
        r#"{"model":"lipsync-2","input":[{"type":"video","url":"v"},{"type":"audio","url":"a"}]}"#;
    let mut jobs = Vec::new();
    for _ in 0..12 {
        let request = http::Request::post(format!("http://{proxy}/generate"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))?;
        let client = client.clone();
        jobs.push(tokio::spawn(async move {
            let response = client.request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, BoxError>(status)
        }));
    }
    for job in jobs {
        let status = job.await??;
        assert!(status.is_success(), "{status}");
    }

    let request = http::Request::get(format!("http://{proxy}/metrics")).body(Full::default())?;
    let scraped = client.request(request).await?.into_body().collect().await?;
    let text = String::from_utf8_lossy(&scraped.to_bytes()).into_owned();
    println!("\nGET /metrics (the crate's counters and gauges):\n");
    for line in text.lines().filter(|line| {
        line.starts_with("tower_quota_") && !line.contains("_bucket") && !line.ends_with(" 0")
    }) {
        println!("{line}");
    }
    Ok(())
}
