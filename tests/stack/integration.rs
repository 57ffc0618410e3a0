//! Over real sockets on 127.0.0.1: a hyper-util client with the layer against axum servers.
//!
//! Client and server share one runtime on tokio's paused clock, so minutes of quota pass in
//! milliseconds and the server's clock is the client's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::{Quota, RateLimitByRoute, ServiceBuilderExt};

/// A strict server-side count, written independently of the crate: a log of arrival times per
/// route, refusing a request when `count` arrived within the last `period`.
#[derive(Clone, Default)]
struct Strict {
    logs: Arc<Mutex<HashMap<&'static str, VecDeque<Instant>>>>,
    refused: Arc<Mutex<u32>>,
}

fn route_of(method: &axum::http::Method, path: &str) -> (&'static str, usize, Duration) {
    if method == axum::http::Method::POST && path == "/v2/generate" {
        ("generate", 60, Duration::from_secs(60))
    } else {
        ("other", 600, Duration::from_secs(60))
    }
}

async fn strict_limit(State(strict): State<Strict>, request: Request, next: Next) -> Response {
    let (route, count, period) = route_of(request.method(), request.uri().path());
    let now = Instant::now();
    {
        let mut logs = strict.logs.lock().unwrap();
        let log = logs.entry(route).or_default();
        while log
            .front()
            .is_some_and(|&t| now.duration_since(t) >= period)
        {
            log.pop_front();
        }
        if log.len() >= count {
            *strict.refused.lock().unwrap() += 1;
            return (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
        }
        log.push_back(now);
    }
    next.run(request).await
}

async fn serve(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn sync_like_app(strict: Strict) -> Router {
    Router::new()
        .route(
            "/v2/generate",
            post(|| async { (StatusCode::CREATED, "{\"id\":\"gen\"}") }),
        )
        .route(
            "/v2/generate/{id}",
            get(|| async { "{\"status\":\"PENDING\"}" }),
        )
        .route("/v2/generations", get(|| async { "[]" }))
        .layer(middleware::from_fn_with_state(strict, strict_limit))
}

#[tokio::test(start_paused = true)]
async fn a_hyper_client_with_the_layer_gets_no_429_from_a_strict_server() {
    let strict = Strict::default();
    let base = serve(sync_like_app(strict.clone())).await;

    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let svc = ServiceBuilder::new()
        .rate_limit_by_route(limits.clone())
        .service(client);

    let start = Instant::now();
    let mut calls = FuturesUnordered::new();
    for i in 0..1_500 {
        let (method, path) = match i % 10 {
            0..=1 => ("POST", "/v2/generate".to_owned()),
            2..=7 => ("GET", format!("/v2/generate/{i}")),
            _ => ("GET", "/v2/generations".to_owned()),
        };
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .body(Empty::new())
            .unwrap();
        let mut svc = svc.clone();
        calls.push(async move {
            let response = svc.ready().await?.call(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, tower_quota::BoxError>(status)
        });
    }
    let mut statuses = HashMap::new();
    while let Some(status) = calls.next().await {
        *statuses.entry(status.unwrap().as_u16()).or_insert(0) += 1;
    }
    assert_eq!(*strict.refused.lock().unwrap(), 0, "{statuses:?}");
    assert_eq!(statuses.get(&429), None);
    assert_eq!(statuses[&201], 300);
    // 300 creates at 60 a minute: five windows, so done a little after four minutes.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(240), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(245), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn without_the_layer_the_same_client_is_refused() {
    let strict = Strict::default();
    let base = serve(sync_like_app(strict.clone())).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let mut calls = FuturesUnordered::new();
    for _ in 0..100 {
        let request = http::Request::post(format!("{base}/v2/generate"))
            .body(Empty::new())
            .unwrap();
        calls.push(client.request(request));
    }
    let mut refused = 0;
    while let Some(response) = calls.next().await {
        if response.unwrap().status() == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 40);
}

#[tokio::test(start_paused = true)]
async fn server_mode_holds_one_limit_across_many_axum_connections() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(10))
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    // No HandleErrorLayer: server mode keeps the inner error type.
    let app = Router::new()
        .route("/v2/generate", post(|| async { StatusCode::CREATED }))
        .layer(limits.clone());
    let base = serve(app).await;

    // Forty clients, each on its own connection, all with one API key.
    let mut calls = FuturesUnordered::new();
    for _ in 0..40 {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http::<Body>();
        let request = http::Request::post(format!("{base}/v2/generate"))
            .header("x-api-key", "sk-shared")
            .body(Body::empty())
            .unwrap();
        calls.push(async move { client.request(request).await });
    }
    let mut statuses = HashMap::new();
    let mut retry_after = Vec::new();
    while let Some(response) = calls.next().await {
        let response = response.unwrap();
        if let Some(value) = response.headers().get("retry-after") {
            retry_after.push(value.to_str().unwrap().to_owned());
        }
        *statuses.entry(response.status().as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&201), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&30), "{statuses:?}");
    // The ten went in the first of the window's 16 buckets (3.75 s each), which stops
    // counting 17 buckets later: 63.75 s, rounded up.
    assert!(retry_after.iter().all(|v| v == "64"), "{retry_after:?}");
}
