//! Requests and tokens per minute: an LLM-style API and a client living inside both limits.
//!
//! An axum server on 127.0.0.1 limits `POST /v1/chat` per API key to a number of requests
//! and a number of tokens per window, as LLM APIs do, with `RateLimitByRoute` in server mode:
//! each request is charged the `x-max-tokens` it asks for, and corrected to what it spent once
//! the handler answers with its usage (`x-usage-tokens`, and the body's `usage`). The excess
//! gets a 429.
//!
//! A hyper-util client then sends the same 48 completions twice: bare, and through
//! `RateLimitByRoute` in client mode with the same two quotas, weighing each request by the
//! tokens it may spend and correcting it from the usage the server reports. The bare client
//! collects 429s; the limited one none, and it keeps the token quota busy: a request held at
//! its most while in flight gives back what it did not spend as soon as it is answered.
//!
//! The quotas are OpenAI's tier-1 limits for a small model scaled down 20 times (500 requests
//! and 200,000 tokens a minute become 25 requests and 10,000 tokens per 3 seconds), so the
//! run takes a few seconds.
//!
//! ```sh
//! cargo run --example llm_tokens
//! ```

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::rate_limit::{RequestHead, ResponseHead};
use tower_quota::{BoxError, Quota, RateLimitByRoute, ServiceBuilderExt};

const WINDOW: Duration = Duration::from_secs(3);
const REQUESTS: Quota = Quota::new(25, WINDOW);
const TOKENS: Quota = Quota::new(10_000, WINDOW).counting("tokens");

/// The tokens a request may spend, as its caller declares them.
fn max_tokens(head: &RequestHead<'_>) -> u32 {
    number(head.headers().get("x-max-tokens")).unwrap_or(4_096)
}

/// The tokens a request spent, as the server reports them.
fn used_tokens(head: &ResponseHead<'_>) -> Option<u32> {
    number(head.headers().get("x-usage-tokens"))
}

fn number(value: Option<&http::HeaderValue>) -> Option<u32> {
    value?.to_str().ok()?.parse().ok()
}

/// The completion: spends between a quarter and all of the tokens it may, and says so.
async fn chat(headers: HeaderMap) -> impl IntoResponse {
    let max = number(headers.get("x-max-tokens")).unwrap_or(4_096);
    let seed = number(headers.get("x-seed")).unwrap_or(0);
    let used = max / 4 + (seed.wrapping_mul(2_654_435_761) % (max - max / 4 + 1));
    tokio::time::sleep(Duration::from_millis(40)).await;
    (
        [("x-usage-tokens", used.to_string())],
        format!(r#"{{"choices":[],"usage":{{"total_tokens":{used}}}}}"#),
    )
}

async fn start_server() -> Result<String, BoxError> {
    let limits = RateLimitByRoute::builder()
        .route("POST /v1/chat", [REQUESTS, TOKENS])
        .cost("tokens", max_tokens)
        .cost_after("tokens", used_tokens)
        .reject()
        .key_header(HeaderName::from_static("authorization"))
        .build()?;
    let app = Router::new().route("/v1/chat", post(chat)).layer(limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

/// What one run did.
struct Run {
    answered: usize,
    refused: usize,
    tokens: u64,
    time: Duration,
}

/// Sends 48 completions of up to 1,000 tokens, 12 at a time.
async fn run<S>(svc: S, base: &str) -> Run
where
    S: Service<
            http::Request<Empty<bytes::Bytes>>,
            Response = http::Response<hyper::body::Incoming>,
        > + Clone,
    S::Error: Into<BoxError>,
{
    let start = Instant::now();
    let mut calls = FuturesUnordered::new();
    let (mut answered, mut refused, mut tokens) = (0, 0, 0);
    for i in 0..48u32 {
        let request = http::Request::post(format!("{base}/v1/chat"))
            .header("authorization", "Bearer sk-demo")
            .header("x-max-tokens", 1_000)
            .header("x-seed", i)
            .body(Empty::new())
            .expect("valid request");
        calls.push(svc.clone().oneshot(request));
        if calls.len() < 12 {
            continue;
        }
        let Some(result) = calls.next().await else {
            break;
        };
        count(
            result.map_err(Into::into),
            &mut answered,
            &mut refused,
            &mut tokens,
        );
    }
    while let Some(result) = calls.next().await {
        count(
            result.map_err(Into::into),
            &mut answered,
            &mut refused,
            &mut tokens,
        );
    }
    Run {
        answered,
        refused,
        tokens,
        time: start.elapsed(),
    }
}

fn count(
    result: Result<http::Response<hyper::body::Incoming>, BoxError>,
    answered: &mut usize,
    refused: &mut usize,
    tokens: &mut u64,
) {
    match result {
        Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => *refused += 1,
        Ok(response) => {
            *answered += 1;
            *tokens += u64::from(number(response.headers().get("x-usage-tokens")).unwrap_or(0));
        }
        Err(error) => eprintln!("    request failed: {error}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let base = start_server().await?;
    println!("server on {base}: POST /v1/chat {REQUESTS} and {TOKENS}, per API key\n");
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();

    println!("bare hyper-util client ...");
    let bare = run(client.clone(), &base).await;
    // Let the server's windows empty before the next run (its count lasts up to a sixteenth
    // of a window longer than the window).
    tokio::time::sleep(WINDOW + WINDOW / 16 + Duration::from_millis(100)).await;

    println!("through RateLimitByRoute (client mode), weighed by tokens ...");
    let limits = RateLimitByRoute::builder()
        .route("POST /v1/chat", [REQUESTS, TOKENS])
        .cost("tokens", max_tokens)
        .cost_after("tokens", used_tokens)
        // This server (the crate's server mode) counts in sixteenths of its window, so a
        // request may count up to a sixteenth of a window longer than the window: a client
        // at the full rate holds its places that much longer.
        .safety_margin(WINDOW / 16)
        .build()?;
    let limited = ServiceBuilder::new()
        .rate_limit_by_route(limits.clone())
        .service(client);
    let with_layer = run(limited, &base).await;

    println!("\n| client            | answered | 429s | tokens spent | wall time |");
    println!("|-------------------|----------|------|--------------|-----------|");
    for (name, run) in [("bare", bare), ("RateLimitByRoute", with_layer)] {
        println!(
            "| {name:<17} | {:>8} | {:>4} | {:>12} | {:>8.2}s |",
            run.answered,
            run.refused,
            run.tokens,
            run.time.as_secs_f64(),
        );
    }
    println!(
        "\nThe token quota allows {} per window; each request may spend 1,000 and spends \
         250 to 1,000.",
        TOKENS.count()
    );
    Ok(())
}
