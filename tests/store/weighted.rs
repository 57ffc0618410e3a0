//! Weighted requests and several quotas per route, shared through Redis: what each request
//! costs is taken from every quota at once, in one script, and corrected from the response.

#![cfg(feature = "redis")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderName, Request, Response};
use tower::{Layer, Service, ServiceExt};
use tower_quota::rate_limit::{RateLimitError, RequestHead, ResponseHead};
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{Quota, RateLimitByRoute};

use crate::common::redis::{shared_redis, unique_prefix};
use crate::common::redis_query;

/// When each request arrived, and the tokens it spent.
type Seen = Arc<Mutex<Vec<(Instant, u32)>>>;

/// Answers at once with the tokens the request spent (`x-spends`) in `x-usage-tokens`.
fn api(
    seen: Seen,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, std::convert::Infallible>> + Send,
> + Clone
       + Send {
    tower::service_fn(move |request: Request<()>| {
        let spent = header(request.headers().get("x-spends")).unwrap_or(1);
        seen.lock().unwrap().push((Instant::now(), spent));
        async move {
            let response = Response::builder()
                .header("x-usage-tokens", spent)
                .body(())
                .unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    })
}

fn header(value: Option<&http::HeaderValue>) -> Option<u32> {
    value?.to_str().ok()?.parse().ok()
}

fn max_tokens(head: &RequestHead<'_>) -> u32 {
    header(head.headers().get("x-max-tokens")).unwrap_or(1)
}

fn used_tokens(head: &ResponseHead<'_>) -> Option<u32> {
    header(head.headers().get("x-usage-tokens"))
}

fn chat(max: u32, spends: u32) -> Request<()> {
    Request::post("http://api.test/v1/chat")
        .header("x-api-key", "alice")
        .header("x-max-tokens", max)
        .header("x-spends", spends)
        .body(())
        .unwrap()
}

fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(5))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap()
}

/// The most any window of `window` holds, in requests and in tokens.
fn busiest(seen: &[(Instant, u32)], window: Duration) -> (usize, u64) {
    let mut seen = seen.to_vec();
    seen.sort_by_key(|&(at, _)| at);
    let (mut start, mut tokens, mut most) = (0, 0u64, (0, 0));
    for end in 0..seen.len() {
        tokens += u64::from(seen[end].1);
        while seen[end].0.duration_since(seen[start].0) >= window {
            tokens -= u64::from(seen[start].1);
            start += 1;
        }
        most = (most.0.max(end - start + 1), most.1.max(tokens));
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_quota_of_requests_and_one_of_tokens() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    for paced in [false, true] {
        let prefix = unique_prefix(if paced { "weighted-gcra" } else { "weighted" });
        let tokens = match paced {
            false => Quota::new(100, Duration::from_secs(1)),
            true => Quota::new(100, Duration::from_secs(1)).with_burst(50),
        };
        let seen = Seen::default();
        let mut calls = FuturesUnordered::new();
        let mut stores = Vec::new();
        for process in 0..2u32 {
            let store = store(&url, &prefix);
            stores.push(store.clone());
            let limits = RateLimitByRoute::builder()
                .route(
                    "POST /v1/chat",
                    [
                        Quota::new(6, Duration::from_secs(1)),
                        tokens.counting("tokens"),
                    ],
                )
                .cost("tokens", max_tokens)
                .store(store)
                .build()
                .unwrap();
            let service = limits.layer(api(seen.clone()));
            for i in 0..12u32 {
                // Mixed costs, 5 to 40 tokens.
                let cost = 5 + (i * 7 + process * 13) % 36;
                calls.push(service.clone().oneshot(chat(cost, cost)));
            }
        }
        let started = Instant::now();
        while let Some(answer) = calls.next().await {
            answer.expect("every request is sent");
        }
        for store in stores {
            store.flush().await;
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 24);
        let (requests, tokens) = busiest(&seen, Duration::from_secs(1));
        assert!(requests <= 6, "{requests} requests in a second");
        let most = if paced { 50 + 100 } else { 100 };
        assert!(
            tokens <= most,
            "{tokens} tokens in a second (paced: {paced})"
        );
        // 24 requests of 22 tokens on average: more than 5 seconds' worth of tokens, which
        // the quota stretched over at least 4 seconds.
        assert!(started.elapsed() > Duration::from_secs(3), "{paced}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_corrected_from_the_response_frees_its_tokens_for_the_fleet() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("corrected");
    let store = store(&url, &prefix);
    let limits = RateLimitByRoute::builder()
        .route(
            "POST /v1/chat",
            Quota::new(100, Duration::from_secs(3)).counting("tokens"),
        )
        .cost("tokens", max_tokens)
        .cost_after("tokens", used_tokens)
        .store(store.clone())
        .build()
        .unwrap();
    let seen = Seen::default();
    let mut service = limits.layer(api(seen.clone()));
    // Taken at 80, answered at 10.
    service
        .ready()
        .await
        .unwrap()
        .call(chat(80, 10))
        .await
        .unwrap();
    store.flush().await;
    let held: Vec<String> = redis_query(
        &url,
        redis::cmd("ZRANGE")
            .arg(format!("{{{prefix}:rate:POST /v1/chat}}:held"))
            .arg(0)
            .arg(-1),
    )
    .await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].ends_with("#10"), "{held:?}");
    // 80 more fit at once (10 + 80 <= 100); without the correction they would wait 3 s.
    let started = Instant::now();
    service
        .ready()
        .await
        .unwrap()
        .call(chat(80, 80))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // A cost no quota admits is returned at once.
    let error = service
        .ready()
        .await
        .unwrap()
        .call(chat(101, 1))
        .await
        .unwrap_err();
    assert!(matches!(
        *error.downcast::<RateLimitError>().unwrap(),
        RateLimitError::CostTooHigh { cost: 101, .. }
    ));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_servers_charges_costs_in_every_quota_and_corrects_them() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    for paced in [false, true] {
        let prefix = unique_prefix(if paced {
            "server-gcra"
        } else {
            "server-weighted"
        });
        let points = match paced {
            false => Quota::per_minute(100),
            true => Quota::per_minute(100).with_burst(100),
        };
        let seen = Seen::default();
        let servers: Vec<_> = (0..2)
            .map(|_| {
                let store = store(&url, &prefix);
                let limits = RateLimitByRoute::builder()
                    .route(
                        "POST /v1/chat",
                        [Quota::per_minute(4), points.counting("tokens")],
                    )
                    .cost("tokens", max_tokens)
                    .cost_after("tokens", used_tokens)
                    .reject()
                    .key_header(HeaderName::from_static("x-api-key"))
                    .store(store.clone())
                    .build()
                    .unwrap();
                (store, limits.layer(api(seen.clone())))
            })
            .collect();
        let send = async |server: usize, max: u32, spends: u32| {
            let (store, service) = &servers[server];
            let status = service
                .clone()
                .oneshot(chat(max, spends))
                .await
                .unwrap()
                .status();
            store.flush().await;
            status
        };
        // Charged 90 on one server, corrected to 20: 80 more fit, on the other.
        assert_eq!(send(0, 90, 20).await, 200, "{paced}");
        assert_eq!(send(1, 80, 80).await, 200, "{paced}");
        // 100 counted: a point more is refused by either, and counts nothing.
        assert_eq!(send(0, 1, 1).await, 429, "{paced}");
        assert_eq!(send(1, 1, 1).await, 429, "{paced}");
        // A request that costs nothing is held back by a full quota, as one of a unit would.
        assert_eq!(send(1, 0, 0).await, 429, "{paced}");
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_took_nothing_is_counted_at_its_corrected_cost_in_the_store() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let mut waited = Vec::new();
    for with_store in [false, true] {
        let store = store(&url, &unique_prefix("zero"));
        let mut builder = RateLimitByRoute::builder()
            .route(
                "POST /v1/chat",
                Quota::new(100, Duration::from_secs(10)).counting("tokens"),
            )
            .cost("tokens", max_tokens)
            .cost_after("tokens", used_tokens);
        if with_store {
            builder = builder.store(store.clone());
        }
        let service = builder.build().unwrap().layer(api(Seen::default()));
        // Declared at 0, spends the whole quota.
        service.clone().oneshot(chat(0, 100)).await.unwrap();
        store.flush().await;
        let next =
            tokio::time::timeout(Duration::from_secs(2), service.clone().oneshot(chat(1, 1))).await;
        waited.push(next.is_err());
    }
    assert_eq!(
        waited,
        [true, true],
        "(memory, store) still waiting after 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_s_correction_outlives_the_paced_schedule_it_corrects() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    // Answers a request of 10 3 s later: the client's schedule in Redis has expired by then.
    let slow = tower::service_fn(|request: Request<()>| async move {
        let spent = header(request.headers().get("x-spends")).unwrap_or(1);
        if spent == 10 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let response = Response::builder()
            .header("x-usage-tokens", spent)
            .body(())
            .unwrap();
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut statuses = Vec::new();
    for with_store in [false, true] {
        let store = store(&url, &unique_prefix("slow"));
        let builder = RateLimitByRoute::builder()
            .route(
                "POST /v1/chat",
                Quota::per_minute(100).with_burst(10).counting("tokens"),
            )
            .cost("tokens", max_tokens)
            .cost_after("tokens", used_tokens)
            .reject()
            .key_header(HeaderName::from_static("x-api-key"));
        let limits = match with_store {
            true => builder.store(store.clone()).build().unwrap(),
            false => builder.build().unwrap(),
        };
        let service = limits.layer(slow);
        // Declares 1, spends a burst's worth (10): from its response on, one more fits.
        let mut run = Vec::new();
        for spends in [10, 1, 1] {
            let response = service.clone().oneshot(chat(1, spends)).await.unwrap();
            store.flush().await;
            run.push(response.status().as_u16());
        }
        statuses.push(run);
    }
    assert_eq!(
        statuses,
        [[200, 200, 429], [200, 200, 429]],
        "(memory, store)"
    );
}
