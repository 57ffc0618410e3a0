//! Both sides of the wire in one program.
//!
//! An axum server on 127.0.0.1 enforces Sync-style per-route quotas per API key with
//! `RateLimitByRoute` in server mode, answering the excess with a JSON 429. A hyper-util
//! client then sends the same burst twice: bare, and through `RateLimitByRoute` in client
//! mode with the same quotas. The bare client collects 429s; the limited one none.
//!
//! The quotas are Sync's scaled down 30 times (60 and 600 a minute become 2 and 20 per two
//! seconds), so the run takes a few seconds.
//!
//! ```sh
//! cargo run --example client_and_server
//! ```

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderName, Response, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::rate_limit::Rejection;
use tower_quota::{BoxError, Quota, RateLimitByRoute, ServiceBuilderExt};

const GENERATE: Quota = Quota::new(2, Duration::from_secs(2));
const OTHER: Quota = Quota::new(20, Duration::from_secs(2));

/// Sync's documented 429 body.
fn sync_429(rejection: &Rejection) -> Response<Body> {
    let body = format!(
        r#"{{"statusCode":429,"errorCode":"rate_limit_exceeded","message":"{} allows {} requests per {:?}","error":"Too Many Requests"}}"#,
        rejection.route,
        rejection.quota.count(),
        rejection.quota.period(),
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("static header")
}

async fn start_server() -> Result<String, BoxError> {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", GENERATE)
        .default_quota(OTHER)
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .reject_with(sync_429)
        .build()?;
    let app = Router::new()
        .route(
            "/v2/generate",
            post(|| async { (StatusCode::CREATED, r#"{"id":"gen_1","status":"PENDING"}"#) }),
        )
        .route(
            "/v2/generate/{id}",
            get(|| async { r#"{"id":"gen_1","status":"PROCESSING"}"# }),
        )
        .layer(limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

/// Sends 8 creates and 40 status reads at once; returns (successes, 429s, wall time).
async fn burst<S>(svc: S, base: &str) -> (usize, usize, Duration)
where
    S: Service<http::Request<Empty<bytes::Bytes>>, Response = Response<hyper::body::Incoming>>
        + Clone,
    S::Error: Into<BoxError>,
{
    let start = Instant::now();
    let mut calls = FuturesUnordered::new();
    for i in 0..48 {
        let (method, path) = if i % 6 == 0 {
            ("POST", "/v2/generate".to_owned())
        } else {
            ("GET", format!("/v2/generate/gen_{i}"))
        };
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("x-api-key", "sk-demo")
            .body(Empty::new())
            .expect("valid request");
        calls.push(svc.clone().oneshot(request));
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(result) = calls.next().await {
        match result.map_err(Into::into) {
            Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                if refused == 0 {
                    let retry_after = response.headers()["retry-after"].clone();
                    let body = response.into_body().collect().await.map(|b| b.to_bytes());
                    println!("    first 429: retry-after {retry_after:?}, body {body:?}");
                }
                refused += 1;
            }
            Ok(_) => ok += 1,
            Err(error) => eprintln!("    request failed: {error}"),
        }
    }
    (ok, refused, start.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let base = start_server().await?;
    println!(
        "server on {base}: POST /v2/generate {GENERATE}, everything else {OTHER}, per x-api-key\n"
    );
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();

    println!("bare hyper-util client:");
    let bare = burst(client.clone(), &base).await;
    // Let the server's windows empty before the second run: server mode counts in 16 buckets
    // a period, so a request is counted until up to a sixteenth of a period past its own.
    let counted_for = GENERATE.period() + GENERATE.period() / 16;
    tokio::time::sleep(counted_for + Duration::from_millis(100)).await;

    println!("hyper-util client through RateLimitByRoute (client mode):");
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", GENERATE)
        .default_quota(OTHER)
        .build()?;
    let limited = ServiceBuilder::new()
        .rate_limit_by_route(limits.clone())
        .service(client);
    let with_layer = burst(limited, &base).await;

    println!("\n| client            | answered | 429s | wall time |");
    println!("|-------------------|----------|------|-----------|");
    for (name, (ok, refused, time)) in [("bare", bare), ("RateLimitByRoute", with_layer)] {
        println!(
            "| {name:<17} | {ok:>8} | {refused:>4} | {:>8.2}s |",
            time.as_secs_f64()
        );
    }
    for route in limits.snapshot() {
        println!(
            "\n{}: {} left now, next {:?}",
            route.route, route.remaining, route.next
        );
    }
    Ok(())
}
