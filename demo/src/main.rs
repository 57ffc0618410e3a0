//! The demo: one workload against one strict server, done twice.
//!
//! The local Sync API (`sync-mock`) starts on 127.0.0.1 with Sync's limits (60 creates and
//! 600 of each other request a minute, the plan's jobs at once, 429 past either), its clock
//! scaled down so that minutes pass in seconds. A workload of generations (create one, poll
//! its status until it ends) runs twice:
//!
//! - **naive**, as the vendor's docs suggest: retry each 429 with exponential backoff
//!   (1, 2, 4, 8, 16 s, scaled), nothing else;
//! - **layered**: `Backoff429` over `ConcurrencyLimitByPlan` over `RateLimitByRoute`.
//!
//! Then a table: jobs completed, 429s the server sent, wall time, and how much of the create
//! quota and of the plan's slot-time each run used.
//!
//! ```sh
//! cargo run -p demo
//! cargo run -p demo -- --help
//! cargo run -p demo -- --plan growth --jobs 60 --scale 30 --algorithm leaky
//! cargo run -p demo -- --dialect openai   # the API states its limits in OpenAI's fields
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sync_mock::{Algorithm, Config, Endpoint, MockServer, Stats};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::backoff::Schedule;
use tower_quota::headers::Dialect;
use tower_quota::presets::sync;
use tower_quota::{BoxError, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

struct Args {
    plan: Plan,
    jobs: usize,
    scale: u32,
    algorithm: Algorithm,
    /// The dialect the local API states its limits in, if any (Sync states none).
    dialect: Option<Dialect>,
}

const USAGE: &str = "usage: demo [--plan hobbyist|creator|growth|scale|enterprise:N] [--jobs N] [--scale N] [--algorithm fixed|sliding|leaky[:burst]] [--dialect ietf|ietf-triple|x-ratelimit|openai|anthropic|github]";

const HELP: &str = "\
The same workload of generations (create one, poll its status until it ends) against a
strict local Sync API, twice: naive (retry each 429 with exponential backoff, as the vendor's
docs suggest) and layered (Backoff429 over ConcurrencyLimitByPlan over RateLimitByRoute).

  --plan P        hobbyist, creator (default), growth, scale or enterprise:N jobs at once
  --jobs N        generations to run (default 36)
  --scale N       the server's clock runs N times fast, 1 to 1000 (default 20)
  --algorithm A   how the server counts: fixed, sliding (default), leaky[:burst]
  --dialect D     the server states its limits in these fields, and the layered client
                  learns from them: ietf, ietf-triple, x-ratelimit, openai, anthropic, github
  -h, --help      this";

fn args() -> Result<Args, String> {
    let mut args = Args {
        plan: Plan::Creator,
        jobs: 36,
        scale: 20,
        algorithm: Algorithm::SlidingWindow,
        dialect: None,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        if flag == "-h" || flag == "--help" {
            println!("{HELP}");
            std::process::exit(0);
        }
        let value = words
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--plan" => args.plan = value.parse().map_err(|e| format!("{e}"))?,
            "--jobs" => {
                args.jobs = value
                    .parse()
                    .map_err(|_| format!("--jobs {value}: not a count"))?
            }
            "--scale" => {
                args.scale = value
                    .parse()
                    .ok()
                    .filter(|&s| (1..=1000).contains(&s))
                    .ok_or_else(|| {
                        // Backoff429 waits at least a millisecond: 1 s scaled by 1,000 at most.
                        format!("--scale {value}: not a whole number from 1 to 1000")
                    })?;
            }
            "--algorithm" => {
                args.algorithm = match value.split_once(':') {
                    None if value == "fixed" => Algorithm::FixedWindow,
                    None if value == "sliding" => Algorithm::SlidingWindow,
                    None if value == "leaky" => Algorithm::LeakyBucket { burst: 1 },
                    Some(("leaky", burst)) => Algorithm::LeakyBucket {
                        burst: burst
                            .parse()
                            .ok()
                            .filter(|&b| b > 0)
                            .ok_or("a burst is at least 1")?,
                    },
                    _ => {
                        return Err(format!(
                            "--algorithm {value}: fixed, sliding or leaky[:burst]"
                        ))
                    }
                }
            }
            "--dialect" => {
                args.dialect = Some(match value.as_str() {
                    "ietf" => Dialect::Ietf,
                    "ietf-triple" => Dialect::IetfTriple,
                    "x-ratelimit" => Dialect::XRateLimit,
                    "openai" => Dialect::OpenAi,
                    "anthropic" => Dialect::Anthropic,
                    "github" => Dialect::GitHub,
                    _ => return Err(format!("--dialect {value}: not a dialect\n{USAGE}")),
                });
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// One run's outcome.
struct Outcome {
    completed: usize,
    failed: usize,
    wall: Duration,
    stats: Stats,
}

const BODY: &str = r#"{"model":"lipsync-2","input":[{"type":"video","url":"https://example.com/v.mp4"},{"type":"audio","url":"https://example.com/a.wav"}]}"#;

fn request(method: http::Method, url: String, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", sync_mock::DEFAULT_KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid request")
}

/// Sends one request; the status and the JSON body.
async fn send<S, B>(
    svc: &S,
    request: http::Request<Full<Bytes>>,
) -> Result<(u16, serde_json::Value), BoxError>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let response = svc.clone().oneshot(request).await.map_err(Into::into)?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// The vendor's advice, by hand: on a 429, wait 1, 2, 4, 8, 16 s (scaled) and try again.
async fn naive_send<S, B>(
    svc: &S,
    make: impl Fn() -> http::Request<Full<Bytes>>,
    scale: u32,
) -> Result<(u16, serde_json::Value), BoxError>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let mut answer = send(svc, make()).await?;
    for retry in 0..5 {
        if answer.0 != 429 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1 << retry) / scale).await;
        answer = send(svc, make()).await?;
    }
    Ok(answer)
}

/// Creates one generation and polls it until it ends. True if it completed.
async fn generation<S, B>(svc: S, base: String, scale: u32, naive: bool) -> Result<bool, BoxError>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let create = || request(http::Method::POST, format!("{base}/v2/generate"), BODY);
    let (status, job) = if naive {
        naive_send(&svc, create, scale).await?
    } else {
        send(&svc, create()).await?
    };
    if status != 201 {
        return Ok(false);
    }
    let Some(id) = job["id"].as_str().map(str::to_owned) else {
        return Ok(false);
    };
    let poll = || request(http::Method::GET, format!("{base}/v2/generate/{id}"), "");
    loop {
        tokio::time::sleep(Duration::from_secs(2) / scale).await;
        let (status, job) = if naive {
            naive_send(&svc, poll, scale).await?
        } else {
            send(&svc, poll()).await?
        };
        match (status, job["status"].as_str()) {
            (200, Some("PENDING" | "PROCESSING")) => continue,
            (200, Some("COMPLETED")) => return Ok(true),
            (200, _) => return Ok(false),
            _ => continue,
        }
    }
}

async fn run(args: &Args, naive: bool, bar: ProgressBar) -> Result<Outcome, BoxError> {
    let mut config = Config::default()
        .no_keys()
        .api_key(sync_mock::DEFAULT_KEY, args.plan.limit())
        .algorithm(args.algorithm)
        .time_scale(args.scale);
    if let Some(dialect) = args.dialect {
        config = config.state_limits(dialect);
    }
    let server = MockServer::start(config).await?;
    let base = server.url("");
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let scale = args.scale;
    let minute = Duration::from_secs(60) / scale;
    let start = Instant::now();
    let mut jobs = FuturesUnordered::new();
    if naive {
        for _ in 0..args.jobs {
            jobs.push(tokio::spawn(generation(
                client.clone(),
                base.clone(),
                scale,
                true,
            )));
        }
    } else {
        let quota = |n| match args.algorithm {
            Algorithm::LeakyBucket { burst } => Quota::new(n, minute).with_burst(burst),
            _ => Quota::new(n, minute),
        };
        let limits = RateLimitByRoute::builder()
            .route("POST /v2/generate", quota(60))
            .route("GET /v2/generate/{id}", quota(600))
            .default_quota(quota(600))
            .build()?;
        let plan = ConcurrencyLimitByPlan::new(args.plan);
        // Sync's preset: its `errorCode` tells the concurrency 429s their own schedule.
        let backoff = sync::backoff()
            .base_delay(Duration::from_secs(1) / scale)
            .max_delay(minute)
            .concurrency_schedule(
                Schedule::new()
                    .base_delay(Duration::from_secs(5) / scale)
                    .max_delay(minute),
            )
            .build()?;
        let svc = ServiceBuilder::new()
            .layer(backoff)
            .layer(plan)
            .layer(limits)
            .service(client);
        for _ in 0..args.jobs {
            jobs.push(tokio::spawn(generation(
                svc.clone(),
                base.clone(),
                scale,
                false,
            )));
        }
    }
    let ticker = {
        let (bar, stats_of) = (bar.clone(), server.url("/_mock/stats"));
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        tokio::spawn(async move {
            loop {
                let request = http::Request::get(&stats_of)
                    .body(Full::default())
                    .expect("a valid request");
                if let Ok((_, stats)) = send(&client, request).await {
                    let refused: u64 = stats["rate_limited"]
                        .as_object()
                        .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
                    let concurrency = stats["concurrency_limited"].as_u64().unwrap_or(0);
                    bar.set_message(format!("429s: {}", refused + concurrency));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (mut completed, mut failed) = (0, 0);
    while let Some(job) = jobs.next().await {
        match job {
            Ok(Ok(true)) => completed += 1,
            _ => failed += 1,
        }
        bar.inc(1);
    }
    let wall = start.elapsed();
    ticker.abort();
    let stats = server.stats();
    bar.finish_with_message(format!("429s: {}", stats.too_many_requests()));
    server.stop().await?;
    Ok(Outcome {
        completed,
        failed,
        wall,
        stats,
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = match args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    println!(
        "{} generations on the {} plan ({} at once), server {:?}, time scaled {}x",
        args.jobs,
        args.plan,
        args.plan.limit(),
        args.algorithm,
        args.scale
    );
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} {elapsed}")
        .expect("a valid template")
        .progress_chars("=> ");
    let bar = |name: &str| {
        let bar = bars.add(ProgressBar::new(args.jobs as u64));
        bar.set_style(style.clone());
        bar.set_prefix(name.to_owned());
        bar
    };
    let naive = run(&args, true, bar("naive")).await?;
    let layered = run(&args, false, bar("layered")).await?;

    let period = Duration::from_secs(60) / args.scale;
    let row = |name: &str, o: &Outcome| {
        // Creates the server counted against the quota, over what the quota allowed in the
        // run's wall time; job time over the plan's slots × wall time.
        let accepted = o.stats.requests_to(Endpoint::Create)
            - o.stats
                .rate_limited
                .get(Endpoint::Create.route())
                .copied()
                .unwrap_or(0);
        let allowed = 60.0 * (o.wall.as_secs_f64() / period.as_secs_f64()).max(1.0);
        let slot_time =
            o.stats.job_time.as_secs_f64() / (args.plan.limit() as f64 * o.wall.as_secs_f64());
        format!(
            "| {name:<8} | {:>5}/{:<4} | {:>5} | {:>8.2}s | {:>16.0}% | {:>18.0}% |",
            o.completed,
            o.completed + o.failed,
            o.stats.too_many_requests(),
            o.wall.as_secs_f64(),
            100.0 * accepted as f64 / allowed,
            100.0 * slot_time,
        )
    };
    println!();
    println!(
        "| run      |  completed | 429s  | wall time | create quota used | plan slot-time used |"
    );
    println!(
        "|----------|------------|-------|-----------|-------------------|---------------------|"
    );
    println!("{}", row("naive", &naive));
    println!("{}", row("layered", &layered));
    println!();
    println!(
        "What to look at: the layered run completes every job with no 429 (the server never \
         sees more than its limits), and keeps the plan's slots busy (a job starts as soon as \
         the last one's end is seen); the naive run spends its retries on 429s and gives up on \
         jobs. \"create quota used\" is the creates the server counted against its 60 a \
         minute (those it then refused for concurrency included) over what 60 a minute \
         allowed in the run's time; \"plan slot-time used\" is the jobs' time over the \
         plan's slots times the run's time."
    );
    Ok(())
}
