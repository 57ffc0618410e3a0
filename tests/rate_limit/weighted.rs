//! Weighted requests and several quotas per route, in client and server mode, on tokio's
//! paused clock: costs from the request, corrected from the response, taken from every quota
//! at once or from none.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderName, Method, Request, Response, StatusCode};
use tokio::time::{advance, sleep, Instant};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::rate_limit::{Builder, Quotas, RateLimitError, RejectConfig, ResponseHead};
use tower_quota::{BoxError, ConfigError, Quota, RateLimitByRoute};

const MINUTE: Duration = Duration::from_secs(60);

/// A request of `tokens` (the most it may spend) that spends `used`.
fn chat(tokens: u32, used: u32) -> Request<()> {
    Request::builder()
        .method(Method::POST)
        .uri("/v1/chat")
        .header("x-max-tokens", tokens)
        .header("x-spends", used)
        .body(())
        .unwrap()
}

fn number(value: Option<&http::HeaderValue>) -> Option<u32> {
    value?.to_str().ok()?.parse().ok()
}

/// The tokens a request says it may spend.
fn max_tokens(head: &tower_quota::rate_limit::RequestHead<'_>) -> u32 {
    number(head.headers().get("x-max-tokens")).unwrap_or(1)
}

/// The tokens a response says the request spent.
fn used_tokens(head: &ResponseHead<'_>) -> Option<u32> {
    number(head.headers().get("x-usage-tokens"))
}

/// What a fake API saw: when each request arrived (since the start), and what it cost.
type Seen = Arc<Mutex<Vec<(Duration, u32)>>>;

/// Client mode on `POST /v1/chat`, each request weighed in tokens by its `x-max-tokens`.
fn chat_limits(quotas: impl Into<Quotas>) -> Builder {
    RateLimitByRoute::builder()
        .route("POST /v1/chat", quotas)
        .cost("tokens", max_tokens)
}

/// A fake API that answers after `latency`, with the tokens each request spent in
/// `x-usage-tokens`.
#[allow(clippy::type_complexity)]
fn api(
    start: Instant,
    latency: Duration,
) -> (
    impl Service<
            Request<()>,
            Response = Response<()>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<()>, Infallible>> + Send,
        > + Clone
        + Send
        + 'static,
    Seen,
) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let svc = service_fn(move |req: Request<()>| {
        let log = log.clone();
        async move {
            let used = number(req.headers().get("x-spends")).unwrap_or(1);
            log.lock().unwrap().push((start.elapsed(), used));
            sleep(latency).await;
            let response = Response::builder()
                .header("x-usage-tokens", used)
                .body(())
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    (svc, seen)
}

/// The most any window of length `window` holds, by the requests' arrivals: requests, and
/// the sum of `weight` over them.
fn busiest(seen: &[(Duration, u32)], window: Duration, weight: fn(u32) -> u64) -> u64 {
    let mut arrivals = seen.to_vec();
    arrivals.sort_by_key(|&(at, _)| at);
    let (mut in_window, mut sum, mut most) = (VecDeque::new(), 0u64, 0u64);
    for (at, cost) in arrivals {
        in_window.push_back((at, cost));
        sum += weight(cost);
        while let Some(&(first, c)) = in_window.front() {
            if at.saturating_sub(first) < window {
                break;
            }
            in_window.pop_front();
            sum -= weight(c);
        }
        most = most.max(sum);
    }
    most
}

/// A small deterministic generator, so that the costs are mixed but every run the same.
fn costs(seed: u64) -> impl FnMut(u32) -> u32 + Clone + Send + 'static {
    let mut state = seed;
    move |max| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        1 + ((state >> 33) % u64::from(max)) as u32
    }
}

/// `callers` concurrent callers, each sending requests made by `next` one after another until
/// `until` has passed; returns the errors.
async fn run<S, F>(svc: S, callers: usize, until: Duration, next: F) -> Vec<BoxError>
where
    S: Service<Request<()>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    F: FnMut() -> Request<()> + Send + Clone + 'static,
{
    let start = Instant::now();
    let mut tasks = FuturesUnordered::new();
    for _ in 0..callers {
        let (mut svc, mut next) = (svc.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while start.elapsed() < until {
                if let Err(error) = svc.ready().await.unwrap().call(next()).await {
                    errors.push(error);
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    while let Some(done) = tasks.next().await {
        errors.extend(done.unwrap());
    }
    errors
}

#[tokio::test(start_paused = true)]
async fn mixed_costs_never_exceed_any_quota_in_any_window() {
    for paced in [false, true] {
        let start = Instant::now();
        let (api, seen) = api(start, Duration::from_millis(120));
        let tokens = match paced {
            false => Quota::per_minute(1_000),
            true => Quota::per_minute(1_000).with_burst(200),
        };
        let layer = chat_limits([Quota::per_second(4), tokens.counting("tokens")])
            .build()
            .unwrap();
        let mut cost = costs(7);
        let next = move || {
            let tokens = cost(120);
            chat(tokens, tokens)
        };
        let errors = run(layer.layer(api), 12, 5 * MINUTE, next).await;
        assert!(errors.is_empty(), "{errors:?}");
        let seen = seen.lock().unwrap();
        let requests = busiest(&seen, Duration::from_secs(1), |_| 1);
        let tokens = busiest(&seen, MINUTE, u64::from);
        assert!(requests <= 4, "{requests} requests in a second");
        if paced {
            // GCRA's own bound: the burst, and one interval's worth (60 ms) per 60 ms.
            assert!(tokens <= 200 + 1_000, "{tokens} tokens in a minute");
        } else {
            assert!(tokens <= 1_000, "{tokens} tokens in a minute");
            // And the quota is used: over 5 minutes, at least 4 minutes' worth.
            let total: u64 = seen.iter().map(|&(_, c)| u64::from(c)).sum();
            assert!(total >= 4_000, "only {total} tokens in 5 minutes");
        }
        assert!(seen.len() > 50, "only {} requests", seen.len());
    }
}

#[tokio::test(start_paused = true)]
async fn a_day_at_500_a_minute_and_10000_a_day() {
    let start = Instant::now();
    let (api, seen) = api(start, Duration::from_millis(50));
    let layer = RateLimitByRoute::builder()
        .route(
            "POST /v1/chat",
            [Quota::per_minute(500), Quota::per_day(10_000)],
        )
        .build()
        .unwrap();
    let day = Duration::from_secs(24 * 3600);
    let errors = run(layer.layer(api), 16, day + 2 * MINUTE, || chat(1, 1)).await;
    assert!(errors.is_empty(), "{:?}", &errors[..1]);
    let seen = seen.lock().unwrap();
    assert!(busiest(&seen, MINUTE, |_| 1) <= 500);
    assert!(busiest(&seen, day, |_| 1) <= 10_000);
    // The first day's 10,000 go at 500 a minute: in the first 20 minutes and a little.
    let first_day = seen.iter().filter(|&&(at, _)| at < day).count();
    assert_eq!(first_day, 10_000);
    let last = seen.iter().filter(|&&(at, _)| at < day).map(|s| s.0).max();
    assert!(last.unwrap() < 21 * MINUTE, "{last:?}");
    // Then nothing until the first of them leaves the day's window, and then it goes again.
    let after: Vec<_> = seen.iter().filter(|&&(at, _)| at >= day).collect();
    assert!(!after.is_empty(), "nothing after the day");
    assert!(after.iter().all(|&&(at, _)| at >= day));
}

/// A server that counts the true cost of each request in a sliding window of
/// `tokens_per_minute` and refuses what would exceed it with a 429, answering the tokens spent.
fn token_server(
    tokens_per_minute: u64,
    accepted: Arc<Mutex<Vec<(Duration, u32)>>>,
    refused: Arc<Mutex<u32>>,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    let start = Instant::now();
    service_fn(move |req: Request<()>| {
        let (accepted, refused) = (accepted.clone(), refused.clone());
        async move {
            let used = number(req.headers().get("x-spends")).unwrap_or(1);
            let now = start.elapsed();
            let status = {
                let mut accepted = accepted.lock().unwrap();
                let window: u64 = accepted
                    .iter()
                    .filter(|&&(at, _)| now.saturating_sub(at) < MINUTE)
                    .map(|&(_, c)| u64::from(c))
                    .sum();
                if window + u64::from(used) > tokens_per_minute {
                    *refused.lock().unwrap() += 1;
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    accepted.push((now, used));
                    StatusCode::OK
                }
            };
            sleep(Duration::from_millis(200)).await;
            let response = Response::builder()
                .status(status)
                .header("x-usage-tokens", if status == 200 { used } else { 0 })
                .body(())
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    })
}

/// Ten minutes of 8 callers, each request allowed 1,000 tokens and spending 100 to 1,000,
/// against a server counting true costs in 20,000 a minute: the tokens it accepted, and
/// how many it refused.
async fn ten_minutes_against_a_true_cost_server(corrected: bool) -> (u64, u32) {
    let (accepted, refused) = (Arc::default(), Arc::default());
    let server = token_server(20_000, Arc::clone(&accepted), Arc::clone(&refused));
    let quotas = [
        Quota::per_minute(500),
        Quota::per_minute(20_000).counting("tokens"),
    ];
    // Each request is held at the most it may spend until answered.
    let builder = chat_limits(quotas);
    let builder = match corrected {
        true => builder.cost_after("tokens", used_tokens),
        false => builder,
    };
    let mut spent = costs(11);
    let next = move || chat(1_000, 100 + spent(900));
    let errors = run(builder.build().unwrap().layer(server), 8, 10 * MINUTE, next).await;
    assert!(errors.is_empty(), "{errors:?}");
    let accepted = accepted.lock().unwrap();
    let total = accepted.iter().map(|&(_, c)| u64::from(c)).sum();
    let refused = *refused.lock().unwrap();
    (total, refused)
}

#[tokio::test(start_paused = true)]
async fn costs_corrected_from_responses_use_the_true_budget_without_a_429() {
    let quota = 20_000 * 10;
    let (total, refused) = ten_minutes_against_a_true_cost_server(true).await;
    assert_eq!(refused, 0, "the server refused some");
    assert!(
        total * 100 >= quota * 95,
        "{total} of {quota} tokens: under 95 %"
    );
    // Without the correction, each request is held at its most, and far less is used.
    let (uncorrected, refused) = ten_minutes_against_a_true_cost_server(false).await;
    assert_eq!(refused, 0);
    assert!(uncorrected * 100 < quota * 70, "{uncorrected}");
}

#[tokio::test(start_paused = true)]
async fn a_cost_larger_than_a_quota_is_refused_at_once() {
    let (api, seen) = api(Instant::now(), Duration::ZERO);
    let layer = chat_limits([
        Quota::per_minute(10),
        Quota::per_minute(1_000).counting("tokens"),
    ])
    .route(
        "POST /v1/paced",
        Quota::per_second(100).with_burst(5).counting("tokens"),
    )
    .build()
    .unwrap();
    let mut svc = layer.layer(api);
    let error = svc
        .ready()
        .await
        .unwrap()
        .call(chat(1_001, 1))
        .await
        .unwrap_err();
    let error = error.downcast::<RateLimitError>().unwrap();
    assert_eq!(
        *error,
        RateLimitError::CostTooHigh {
            route: "POST /v1/chat".into(),
            unit: Some("tokens"),
            cost: 1_001,
            most: 1_000,
        }
    );
    assert!(error.to_string().contains("costs 1001 tokens"), "{error}");
    // A paced quota admits at most its burst at once.
    let mut paced = chat(6, 1);
    *paced.uri_mut() = "/v1/paced".parse().unwrap();
    let error = svc.ready().await.unwrap().call(paced).await.unwrap_err();
    assert!(matches!(
        *error.downcast::<RateLimitError>().unwrap(),
        RateLimitError::CostTooHigh { cost: 6, .. }
    ));
    // The quota's whole count goes, and nothing was taken by the refused ones.
    svc.ready()
        .await
        .unwrap()
        .call(chat(1_000, 1))
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
    let counters = &layer.snapshot()[0].counters;
    assert_eq!(counters.refused.cost_too_high, 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_holds_no_place_in_any_quota() {
    let (api, seen) = api(Instant::now(), Duration::ZERO);
    let layer = chat_limits([
        Quota::per_minute(3),
        Quota::per_minute(100).counting("tokens"),
    ])
    .build()
    .unwrap();
    let mut svc = layer.layer(api);
    svc.ready().await.unwrap().call(chat(90, 90)).await.unwrap();
    // 20 tokens do not fit: it waits, holding none of the 3 requests a minute.
    let mut waiting = tokio_test::task::spawn(svc.ready().await.unwrap().call(chat(20, 20)));
    assert!(waiting.poll().is_pending());
    let snapshot = &layer.snapshot()[0];
    assert_eq!((snapshot.remaining, snapshot.waiters), (2, 1));
    // Cancelled, it leaves nothing behind; a request that fits goes.
    drop(waiting);
    assert_eq!(layer.snapshot()[0].waiters, 0);
    svc.ready().await.unwrap().call(chat(10, 10)).await.unwrap();
    assert_eq!(layer.snapshot()[0].remaining, 1);
    // Its turn comes once the 90 leave the window, a minute (and the margin) after.
    let mut waiting = tokio_test::task::spawn(svc.ready().await.unwrap().call(chat(20, 20)));
    assert!(waiting.poll().is_pending());
    advance(MINUTE + Duration::from_millis(60)).await;
    assert!(waiting.poll().is_ready());
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_cost_can_come_from_an_extension_the_caller_sets() {
    #[derive(Clone, Copy)]
    struct Points(u32);
    let (api, seen) = api(Instant::now(), Duration::ZERO);
    let layer = RateLimitByRoute::builder()
        .route("POST /graphql", Quota::per_minute(10).counting("points"))
        .cost(
            "points",
            |head: &tower_quota::rate_limit::RequestHead<'_>| {
                head.extensions().get::<Points>().map_or(1, |p| p.0)
            },
        )
        .build()
        .unwrap();
    let mut svc = layer.layer(api);
    let query = |points| {
        let mut request = Request::post("/graphql").body(()).unwrap();
        request.extensions_mut().insert(Points(points));
        request
    };
    svc.ready().await.unwrap().call(query(7)).await.unwrap();
    assert_eq!(layer.snapshot()[0].remaining, 3);
    let mut waiting = tokio_test::task::spawn(svc.ready().await.unwrap().call(query(4)));
    assert!(waiting.poll().is_pending());
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_corrected_cost_is_taken_or_given_back() {
    let (api, _seen) = api(Instant::now(), Duration::ZERO);
    let layer = chat_limits(Quota::per_minute(100).counting("tokens"))
        .cost_after("tokens", used_tokens)
        .build()
        .unwrap();
    let mut svc = layer.layer(api);
    // Held at 50 while in flight, 10 once answered.
    svc.ready().await.unwrap().call(chat(50, 10)).await.unwrap();
    assert_eq!(layer.snapshot()[0].remaining, 90);
    // Spending more than said takes the rest.
    svc.ready().await.unwrap().call(chat(10, 60)).await.unwrap();
    assert_eq!(layer.snapshot()[0].remaining, 30);
}

#[test]
fn units_without_a_cost_and_costs_without_a_quota_are_errors() {
    let error = RateLimitByRoute::builder()
        .route("POST /v1/chat", Quota::per_minute(100).counting("tokens"))
        .build()
        .unwrap_err();
    assert!(matches!(
        error,
        ConfigError::InvalidSetting { name: "cost", .. }
    ));
    let error = RateLimitByRoute::builder()
        .route("POST /v1/chat", Quota::per_minute(100))
        .cost("tokens", |_: &tower_quota::rate_limit::RequestHead<'_>| 1)
        .build()
        .unwrap_err();
    assert!(matches!(
        error,
        ConfigError::InvalidSetting { name: "cost", .. }
    ));
    let error = RateLimitByRoute::builder()
        .route("POST /v1/chat", Vec::new())
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidQuota { .. }), "{error}");
}

// ===== server mode =====

/// Server mode on `POST /graphql` per `x-api-key`, charged `x-max-tokens` points, corrected
/// from the response's `x-usage-tokens` if `corrected`.
fn graphql(quotas: impl Into<Quotas>, corrected: bool) -> Builder<RejectConfig> {
    let builder = RateLimitByRoute::builder()
        .route("POST /graphql", quotas)
        .cost("points", max_tokens);
    let builder = match corrected {
        true => builder.cost_after("points", used_tokens),
        false => builder,
    };
    builder
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
}

fn server_request(points: u32, used: u32) -> Request<()> {
    Request::post("/graphql")
        .header("x-api-key", "alice")
        .header("x-max-tokens", points)
        .header("x-spends", used)
        .body(())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_server_charges_by_cost_in_every_quota_or_none() {
    let (api, seen) = api(Instant::now(), Duration::ZERO);
    let quotas = [
        Quota::per_minute(5),
        Quota::per_minute(100).counting("points"),
    ];
    let layer = graphql(quotas, false).build().unwrap();
    let mut svc = layer.layer(api);
    let mut send = async |request| svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(send(server_request(60, 60)).await.status(), 200);
    // 60 + 50 > 100: refused, and the request it would have counted is not counted.
    let refused = send(server_request(50, 50)).await;
    assert_eq!(refused.status(), 429);
    for _ in 0..4 {
        assert_eq!(send(server_request(10, 10)).await.status(), 200);
    }
    // 5 requests counted: the 6th is refused by the request quota.
    assert_eq!(send(server_request(1, 1)).await.status(), 429);
    // More than a quota ever admits is refused too, without a panic.
    assert_eq!(send(server_request(101, 1)).await.status(), 413);
    assert_eq!(seen.lock().unwrap().len(), 5);
    // A minute (and a bucket) later, everything is free again.
    advance(MINUTE + Duration::from_secs(4)).await;
    assert_eq!(send(server_request(100, 100)).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_server_corrects_a_cost_from_its_own_response() {
    let (api, seen) = api(Instant::now(), Duration::ZERO);
    for paced in [false, true] {
        let points = match paced {
            false => Quota::per_minute(100),
            true => Quota::per_minute(100).with_burst(100),
        };
        let layer = graphql(points.counting("points"), true).build().unwrap();
        let mut svc = layer.clone().layer(api.clone());
        let mut send = async |request| svc.ready().await.unwrap().call(request).await.unwrap();
        // Charged 80 up front, 20 once answered: 80 more fit.
        assert_eq!(send(server_request(80, 20)).await.status(), 200);
        assert_eq!(send(server_request(80, 80)).await.status(), 200, "{paced}");
        assert_eq!(send(server_request(1, 1)).await.status(), 429, "{paced}");
        let _ = &layer;
    }
    assert_eq!(seen.lock().unwrap().len(), 4);
}

#[test]
fn a_quota_reads_as_its_unit() {
    let quota = Quota::per_day(10_000).counting("tokens");
    assert_eq!(quota.unit(), Some("tokens"));
    assert_eq!(quota.to_string(), "10000 tokens per 86400s");
    assert_eq!(Quota::per_day(5).period(), Duration::from_secs(86_400));
}

// ===== what an outside review found =====

#[tokio::test(start_paused = true)]
async fn a_quota_lowered_under_a_waiting_cost_returns_it_and_lets_the_next_go() {
    let (api, seen) = api(Instant::now(), Duration::ZERO);
    let layer = chat_limits(Quota::per_minute(1_000).counting("tokens"))
        .build()
        .unwrap();
    let mut svc = layer.layer(api);
    svc.ready()
        .await
        .unwrap()
        .call(chat(500, 500))
        .await
        .unwrap();
    let mut big = tokio_test::task::spawn(svc.ready().await.unwrap().call(chat(800, 800)));
    assert!(big.poll().is_pending());
    let mut small = tokio_test::task::spawn(svc.ready().await.unwrap().call(chat(1, 1)));
    assert!(small.poll().is_pending());
    layer
        .set_quota("POST /v1/chat", Quota::per_minute(500).counting("tokens"))
        .unwrap();
    // 800 tokens never fit in 500 a minute: returned, not left to wait for ever.
    let error = match big.poll() {
        std::task::Poll::Ready(Err(error)) => error,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        *error.downcast::<RateLimitError>().unwrap(),
        RateLimitError::CostTooHigh {
            cost: 800,
            most: 500,
            ..
        }
    ));
    // The one behind it goes once the 500 leave the window.
    advance(MINUTE + Duration::from_millis(600)).await;
    assert!(small.poll().is_ready());
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(layer.snapshot()[0].counters.refused.cost_too_high, 1);
}

#[tokio::test(start_paused = true)]
async fn a_correction_that_panics_holds_the_place_as_abandoned_not_for_ever() {
    let (api, seen) = api(Instant::now(), Duration::ZERO);
    let layer = chat_limits(Quota::per_minute(10).counting("tokens"))
        .cost_after("tokens", |head: &ResponseHead<'_>| {
            // A usage header the caller counts on, missing from an error page.
            Some(number(head.headers().get("x-missing")).expect("usage header"))
        })
        .build()
        .unwrap();
    let svc = layer.clone().layer(api);
    let panicked = tokio::spawn(svc.clone().oneshot(chat(10, 10))).await;
    assert!(panicked.unwrap_err().is_panic());
    // Held as abandoned (60 s by default), then for the window: a request goes after that.
    let next = tokio::spawn(svc.oneshot(chat(1, 1)));
    let next = tokio::time::timeout(3 * MINUTE, next).await;
    assert!(next.is_ok(), "still waiting 3 minutes after the panic");
    assert_eq!(seen.lock().unwrap().len(), 2, "the next request was sent");
}

#[tokio::test(start_paused = true)]
async fn a_correction_out_of_all_proportion_counts_a_quota_s_capacity_at_most() {
    for paced in [false, true] {
        let (api, _seen) = api(Instant::now(), Duration::ZERO);
        let quota = match paced {
            false => Quota::per_minute(100),
            true => Quota::per_minute(100).with_burst(10),
        };
        let layer = chat_limits(quota.counting("tokens"))
            .cost_after("tokens", |_: &ResponseHead<'_>| Some(u32::MAX))
            .build()
            .unwrap();
        let svc = layer.clone().layer(api);
        svc.clone().oneshot(chat(1, 1)).await.unwrap();
        let started = Instant::now();
        svc.oneshot(chat(1, 1)).await.unwrap();
        // A window: a period (and its margin); paced: a burst's worth of intervals.
        assert!(
            started.elapsed() <= MINUTE + Duration::from_secs(1),
            "{paced}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn what_a_server_states_in_requests_bounds_the_quota_that_counts_requests() {
    async fn time_for_ten(tokens_first: bool) -> Duration {
        let api = service_fn(|_req: Request<()>| async {
            let response = Response::builder()
                .header("ratelimit-limit", "500")
                .header("ratelimit-remaining", "490")
                .header("ratelimit-reset", "60")
                .body(())
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let tokens = Quota::per_minute(10_000).counting("tokens");
        let requests = Quota::per_minute(500);
        let quotas = match tokens_first {
            true => [tokens, requests],
            false => [requests, tokens],
        };
        let layer = chat_limits(quotas).build().unwrap();
        let mut svc = layer.layer(api);
        let start = Instant::now();
        for _ in 0..10 {
            svc.ready()
                .await
                .unwrap()
                .call(chat(100, 100))
                .await
                .unwrap();
        }
        start.elapsed()
    }
    assert_eq!(time_for_ten(true).await, time_for_ten(false).await);
    assert_eq!(time_for_ten(true).await, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_declared_cost_of_zero_does_not_pass_a_spent_quota() {
    for declared in [1, 0] {
        let (api, seen) = api(Instant::now(), Duration::ZERO);
        let quotas = [
            Quota::per_minute(1_000),
            Quota::per_minute(100).counting("points"),
        ];
        let layer = graphql(quotas, true).build().unwrap();
        let mut svc = layer.layer(api);
        for _ in 0..50 {
            let request = server_request(declared, 100);
            svc.ready().await.unwrap().call(request).await.unwrap();
        }
        let spent: u32 = seen.lock().unwrap().iter().map(|s| s.1).sum();
        assert_eq!(
            spent, 100,
            "declared {declared}: {spent} points in a minute of 100"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_answers_413_with_no_retry_after_for_a_cost_that_never_fits() {
    let (api, _seen) = api(Instant::now(), Duration::ZERO);
    let points = Quota::per_minute(100).counting("points");
    let layer = graphql(points, false).build().unwrap();
    let mut svc = layer.clone().layer(api);
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(server_request(101, 1))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.headers().get("retry-after").is_none());
    assert_eq!(layer.snapshot()[0].counters.refused.cost_too_high, 1);
}

#[tokio::test(start_paused = true)]
async fn a_correction_reaches_a_client_forgotten_while_its_request_was_in_flight() {
    for max_keys in [65_536, 16] {
        let (api, seen) = api(Instant::now(), Duration::from_secs(1));
        let points = Quota::per_minute(100).counting("points");
        let layer = graphql(points, true).max_keys(max_keys).build().unwrap();
        let svc = layer.layer(api);
        let as_key = |key: String, declared: u32, used: u32| {
            let mut request = server_request(declared, used);
            request
                .headers_mut()
                .insert("x-api-key", key.parse().unwrap());
            request
        };
        // Alice declares 1 and spends 100; while it is in flight, 2,000 other clients pass.
        let alice = tokio::spawn(svc.clone().oneshot(as_key("alice".into(), 1, 100)));
        tokio::task::yield_now().await;
        for i in 0..2_000 {
            tokio::spawn(svc.clone().oneshot(as_key(format!("k{i}"), 1, 1)));
            if i % 100 == 0 {
                advance(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(alice.await.unwrap().unwrap().status(), 200);
        let again = svc.clone().oneshot(as_key("alice".into(), 1, 100)).await;
        assert_eq!(again.unwrap().status(), 429, "max_keys {max_keys}");
        let alice_spent: u32 = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.1 == 100)
            .map(|s| s.1)
            .sum();
        assert_eq!(alice_spent, 100, "max_keys {max_keys}");
    }
}

#[tokio::test(start_paused = true)]
async fn acquire_with_head_weighs_a_request_by_its_fields() {
    let layer = chat_limits(Quota::per_minute(10_000).counting("tokens"))
        .build()
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-max-tokens", "5000".parse().unwrap());
    let extensions = http::Extensions::new();
    let permit = layer
        .acquire_with_head(&Method::POST, "/v1/chat", &headers, &extensions)
        .await
        .unwrap();
    assert_eq!(layer.snapshot()[0].remaining, 5_000);
    permit.not_sent().await;
    assert_eq!(layer.snapshot()[0].remaining, 10_000);
}

/// Mixed costs, corrections down, abandons (dropped after send),
/// cancellations (dropped while waiting), timeouts (`max_wait`), a sliding window and two
/// token quotas (a window and a paced one): never more than a quota in any window as the
/// server sees it at arrival, and nothing leaked at the end.
#[tokio::test(start_paused = true)]
async fn a_storm_of_mixed_costs_abandons_and_cancellations_keeps_every_quota_and_leaks_nothing() {
    let start = Instant::now();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let api = service_fn(move |req: Request<()>| {
        let log = log.clone();
        async move {
            let used = number(req.headers().get("x-spends")).unwrap_or(1);
            let latency = number(req.headers().get("x-latency")).unwrap_or(0);
            log.lock().unwrap().push((start.elapsed(), used));
            sleep(Duration::from_millis(u64::from(latency))).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("x-usage-tokens", used)
                    .body(())
                    .unwrap(),
            )
        }
    });
    let layer = chat_limits([
        Quota::per_second(5),
        Quota::new(300, Duration::from_secs(10)).counting("tokens"),
        Quota::per_minute(1_200).with_burst(150).counting("tokens"),
    ])
    .cost_after("tokens", used_tokens)
    .max_wait(Duration::from_secs(20))
    .build()
    .unwrap();
    let svc = layer.clone().layer(api);
    let mut tasks = FuturesUnordered::new();
    for caller in 0..10u64 {
        let svc = svc.clone();
        let mut rng = costs(caller * 7919 + 1);
        tasks.push(tokio::spawn(async move {
            let mut outcomes = [0u32; 3];
            while start.elapsed() < 5 * MINUTE {
                let max = rng(100);
                let used = rng(max);
                let mut request = chat(max, used);
                request
                    .headers_mut()
                    .insert("x-latency", (rng(1_000) - 1).into());
                let give_up = Duration::from_millis(u64::from(rng(40_000)));
                match tokio::time::timeout(give_up, svc.clone().oneshot(request)).await {
                    Ok(Ok(_)) => outcomes[0] += 1,
                    Ok(Err(_)) => {
                        outcomes[1] += 1;
                        sleep(Duration::from_millis(100)).await;
                    }
                    Err(_) => outcomes[2] += 1,
                }
            }
            outcomes
        }));
    }
    let mut outcomes = [0u32; 3];
    while let Some(done) = tasks.next().await {
        for (total, n) in outcomes.iter_mut().zip(done.unwrap()) {
            *total += n;
        }
    }
    let seen = seen.lock().unwrap().clone();
    let requests = busiest(&seen, Duration::from_secs(1), |_| 1);
    let window = busiest(&seen, Duration::from_secs(10), u64::from);
    assert!(requests <= 5, "{requests} requests in a second");
    assert!(window <= 300, "{window} tokens in 10 s");
    // Answered, returned with an error (a wait too long), dropped (before or after the send).
    assert!(outcomes.iter().all(|&n| n > 10), "{outcomes:?}");
    // Nothing leaked: once every hold is over, the route is whole again.
    advance(10 * MINUTE).await;
    let snapshot = &layer.snapshot()[0];
    assert_eq!((snapshot.in_flight, snapshot.remaining), (0, 5));
    // And a request of the most tokens a quota admits at once still goes.
    let all = tokio::time::timeout(MINUTE, svc.clone().oneshot(chat(150, 150))).await;
    assert!(
        all.is_ok(),
        "a 150-token request waits a minute on an idle route"
    );
}
