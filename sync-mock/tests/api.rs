//! The mock over real sockets on 127.0.0.1, on tokio's paused clock.

mod common;

use std::time::Duration;

use common::{create_body, Api, KEY};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sync_mock::{Algorithm, Config, Endpoint, Limit, MockServer};
use tokio::time::{sleep, Instant};

const HOUR: Duration = Duration::from_secs(3600);

/// Jobs that never end during a test, so only the route limits are in play.
fn rate_only(algorithm: Algorithm, create: Limit) -> Config {
    Config::default()
        .api_key(KEY, 1000)
        .api_key("sk-second", 1000)
        .algorithm(algorithm)
        .limit(Endpoint::Create, create)
        .job_durations(HOUR, HOUR)
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_429_has_the_documented_body_and_a_retry_after() {
    let server = MockServer::start(rate_only(Algorithm::SlidingWindow, Limit::per_minute(3)))
        .await
        .unwrap();
    let api = Api::new(&server);
    for _ in 0..3 {
        let created = api.create().await;
        assert_eq!(created.status, StatusCode::CREATED);
        assert_eq!(created.json["status"], "PENDING");
        assert_eq!(created.json["model"], "lipsync-2");
    }
    let refused = api.create().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.json,
        json!({
            "statusCode": 429,
            "errorCode": "rate_limit_exceeded",
            "message": "Rate limit exceeded. Please slow down your requests.",
            "error": "Too Many Requests"
        })
    );
    assert_eq!(refused.header("retry-after"), Some("60"));
    // Other routes have their own quota, and other keys their own counts.
    assert_eq!(api.get("/v2/generations").await.status, StatusCode::OK);
    let other = api.clone().with_key(Some("sk-second"));
    assert_eq!(other.create().await.status, StatusCode::CREATED);

    sleep(Duration::from_secs(60)).await;
    assert_eq!(api.create().await.status, StatusCode::CREATED);

    let stats = server.stats();
    assert_eq!(stats.requests_to(Endpoint::Create), 6);
    assert_eq!(stats.rate_limited["POST /v2/generate"], 1);
    assert_eq!(stats.created, 5);
    let limited: Vec<bool> = stats.arrivals.iter().map(|a| a.limited).collect();
    assert_eq!(limited, [false, false, false, true, false, false, false]);
}

#[tokio::test(start_paused = true)]
async fn the_older_api_sends_no_error_code_and_retry_after_can_be_off() {
    let config = rate_only(Algorithm::SlidingWindow, Limit::per_minute(1))
        .error_codes(false)
        .retry_after(false);
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    api.create().await;
    let refused = api.create().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.json.get("errorCode").is_none(), "{}", refused.json);
    assert_eq!(refused.json["statusCode"], 429);
    assert_eq!(refused.header("retry-after"), None);
}

/// Sends a create at each offset (ms from the start) and returns the answers' status codes
/// and `Retry-After` values.
async fn creates_at(config: Config, offsets_ms: &[u64]) -> Vec<(u16, Option<String>)> {
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    let start = Instant::now();
    let mut answers = Vec::new();
    for &ms in offsets_ms {
        tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
        let answer = api.create().await;
        answers.push((
            answer.status.as_u16(),
            answer.header("retry-after").map(str::to_owned),
        ));
    }
    answers
}

fn ok() -> (u16, Option<String>) {
    (201, None)
}

fn refused(secs: &str) -> (u16, Option<String>) {
    (429, Some(secs.to_owned()))
}

#[tokio::test(start_paused = true)]
async fn fixed_window_counts_per_aligned_window() {
    let config = rate_only(
        Algorithm::FixedWindow,
        Limit::new(3, Duration::from_secs(10)),
    );
    let got = creates_at(config, &[0, 1, 2, 9_500, 10_000, 10_001, 10_002, 12_000]).await;
    assert_eq!(
        got,
        [
            ok(),
            ok(),
            ok(),
            refused("1"),
            ok(),
            ok(),
            ok(),
            refused("8")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn sliding_window_frees_each_place_one_period_after_it_was_taken() {
    let config = rate_only(
        Algorithm::SlidingWindow,
        Limit::new(3, Duration::from_secs(10)),
    );
    let got = creates_at(config, &[0, 2_000, 4_000, 9_999, 10_000, 10_001, 12_000]).await;
    assert_eq!(
        got,
        [ok(), ok(), ok(), refused("1"), ok(), refused("2"), ok()]
    );
}

/// The same creates as above against `tower-quota`'s own server-mode window: buckets of
/// 625 ms, each request counted for its bucket and the 16 after it, so the first place (taken
/// at 0) frees at 10.625 s instead of 10 s. The 10 s and 10.001 s creates that the exact log
/// admits are refused here (measured), and no window of 10 s ever holds more than 3.
#[tokio::test(start_paused = true)]
async fn bucketed_window_holds_a_place_up_to_a_sixteenth_of_a_period_longer() {
    let config = rate_only(
        Algorithm::BucketedWindow,
        Limit::new(3, Duration::from_secs(10)),
    );
    let got = creates_at(config, &[0, 2_000, 4_000, 9_999, 10_000, 10_001, 12_000]).await;
    assert_eq!(
        got,
        [
            ok(),
            ok(),
            ok(),
            refused("1"),
            refused("1"),
            refused("1"),
            ok()
        ]
    );
}

/// A key that used its quota at once is told to come back when its bucket clears: 63.75 s
/// for a minute's window (whole seconds: 64), where the exact log says 60 (measured). Then
/// it is admitted, and not a moment before.
#[tokio::test(start_paused = true)]
async fn bucketed_window_retry_after_names_when_the_bucket_clears() {
    let server = MockServer::start(rate_only(Algorithm::BucketedWindow, Limit::per_minute(3)))
        .await
        .unwrap();
    let api = Api::new(&server);
    for _ in 0..3 {
        assert_eq!(api.create().await.status, StatusCode::CREATED);
    }
    let refused = api.create().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json["errorCode"], "rate_limit_exceeded");
    assert_eq!(refused.header("retry-after"), Some("64"));
    sleep(Duration::from_millis(63_749)).await;
    assert_eq!(
        api.create().await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "not before the bucket clears"
    );
    sleep(Duration::from_millis(1)).await;
    assert_eq!(api.create().await.status, StatusCode::CREATED);
    let stats = server.stats();
    assert_eq!(stats.rate_limited["POST /v2/generate"], 2);
    let limited: Vec<bool> = stats.arrivals.iter().map(|a| a.limited).collect();
    assert_eq!(limited, [false, false, false, true, true, false]);
}

#[tokio::test(start_paused = true)]
async fn leaky_bucket_allows_its_burst_then_refills_at_the_rate() {
    // 6 per minute is one per 10 s; a burst of 2 lets two go at once.
    let config = rate_only(Algorithm::LeakyBucket { burst: 2 }, Limit::per_minute(6));
    let got = creates_at(
        config,
        &[0, 0, 0, 5_000, 10_000, 10_001, 30_000, 30_000, 30_000],
    )
    .await;
    assert_eq!(
        got,
        [
            ok(),
            ok(),
            refused("10"),
            refused("5"),
            ok(),
            refused("10"),
            ok(),
            ok(),
            refused("10")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_refuses_the_plan_plus_one_th_job_and_admits_one_when_a_job_ends() {
    let config = Config::default()
        .api_key(KEY, 2)
        .job_durations(Duration::from_secs(1), Duration::from_secs(4));
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    let start = Instant::now();
    let first = api.create().await;
    api.create().await;
    let refused = api.create().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json["errorCode"], "concurrency_limit_reached");
    assert_eq!(refused.json["statusCode"], 429);
    assert_eq!(refused.header("retry-after"), Some("5"));

    // The first job: PENDING, then PROCESSING after 1 s, COMPLETED after 5 s.
    let id = first.json["id"].as_str().unwrap().to_owned();
    let path = format!("/v2/generate/{id}");
    tokio::time::sleep_until(start + Duration::from_millis(1_500)).await;
    assert_eq!(api.get(&path).await.json["status"], "PROCESSING");
    assert_eq!(
        api.create().await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "still full while processing"
    );
    tokio::time::sleep_until(start + Duration::from_millis(5_001)).await;
    let done = api.get(&path).await.json;
    assert_eq!(done["status"], "COMPLETED");
    assert!(done["outputUrl"].as_str().unwrap().contains(&id));
    assert_eq!(api.create().await.status, StatusCode::CREATED);

    let stats = server.stats();
    assert_eq!(stats.max_active, 2);
    assert_eq!(stats.max_active_by_key[KEY], 2);
    assert_eq!(stats.concurrency_limited, 2);
    assert_eq!(stats.completed, 2);
    assert_eq!(stats.active, 1);
}

#[tokio::test(start_paused = true)]
async fn jobs_fail_at_the_configured_rate() {
    let config = Config::default()
        .api_key(KEY, 100)
        .failure_rate(1.0)
        .job_durations(Duration::from_secs(1), Duration::from_secs(1));
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    let id = api.create().await.json["id"].as_str().unwrap().to_owned();
    sleep(Duration::from_secs(3)).await;
    let failed = api.get(&format!("/v2/generate/{id}")).await.json;
    assert_eq!(failed["status"], "FAILED");
    assert_eq!(failed["error_code"], "generation_failed");
    assert_eq!(server.stats().failed, 1);

    // Half the jobs fail, repeatably for a seed.
    let config = Config::default()
        .api_key(KEY, 1000)
        .failure_rate(0.5)
        .limit(Endpoint::Create, Limit::per_minute(1000))
        .job_durations(Duration::from_secs(1), Duration::from_secs(1));
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    for _ in 0..200 {
        api.create().await;
    }
    sleep(Duration::from_secs(3)).await;
    let stats = server.stats();
    assert_eq!(stats.completed + stats.failed, 200);
    assert!(
        (70..=130).contains(&stats.failed),
        "{} failed",
        stats.failed
    );
}

#[tokio::test(start_paused = true)]
async fn long_polls_return_at_the_end_or_at_the_timeout() {
    let config = Config::default().job_durations(Duration::from_secs(2), Duration::from_secs(1));
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    let id = api.create().await.json["id"].as_str().unwrap().to_owned();

    let start = Instant::now();
    let early = api
        .get(&format!("/v2/generate/{id}?wait=true&timeout=1"))
        .await;
    assert_eq!(early.json["status"], "PENDING");
    assert_eq!(start.elapsed(), Duration::from_secs(1));

    let done = api
        .get(&format!("/v2/generate/{id}?wait=true&timeout=10"))
        .await;
    assert_eq!(done.json["status"], "COMPLETED");
    assert_eq!(start.elapsed(), Duration::from_secs(3));

    for bad in ["timeout=0", "timeout=11", "wait=maybe"] {
        let answer = api.get(&format!("/v2/generate/{id}?wait=true&{bad}")).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test(start_paused = true)]
async fn list_and_count_filter_by_status_and_page_by_cursor() {
    let config = Config::default()
        .api_key(KEY, 10)
        .job_durations(Duration::from_secs(1), Duration::from_secs(1));
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(api.create().await.json["id"].as_str().unwrap().to_owned());
    }
    sleep(Duration::from_secs(3)).await;
    for _ in 0..2 {
        ids.push(api.create().await.json["id"].as_str().unwrap().to_owned());
    }

    let ids_of = |answer: &Value| -> Vec<String> {
        answer
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(ids_of(&api.get("/v2/generations").await.json), newest_first);
    let active = api.get("/v2/generations?status=PENDING,PROCESSING").await;
    assert_eq!(ids_of(&active.json), newest_first[..2]);
    let done = api.get("/v2/generations?status=COMPLETED").await;
    assert_eq!(ids_of(&done.json), newest_first[2..]);

    let page1 = ids_of(&api.get("/v2/generations?limit=2").await.json);
    let page2 = ids_of(
        &api.get(&format!("/v2/generations?limit=2&cursor={}", page1[1]))
            .await
            .json,
    );
    let page3 = ids_of(
        &api.get(&format!("/v2/generations?limit=2&cursor={}", page2[1]))
            .await
            .json,
    );
    assert_eq!([page1, page2, page3].concat(), newest_first);

    let count = api.get("/v2/generations/count?status=PENDING").await;
    assert_eq!(count.json, json!({"count": 2}));
    let count = api.get("/v2/generations/count").await;
    assert_eq!(count.json, json!({"count": 5}));

    for bad in [
        "/v2/generations?status=DONE",
        "/v2/generations?limit=0",
        "/v2/generations?limit=101",
        "/v2/generations?cursor=nope",
        "/v2/generations/count?status=pending",
    ] {
        let answer = api.get(bad).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(answer.json["statusCode"], 400, "{bad}");
    }
}

#[tokio::test(start_paused = true)]
async fn keys_ids_and_bodies_are_checked() {
    let server = MockServer::start(Config::default().api_key("sk-other", 1))
        .await
        .unwrap();
    let api = Api::new(&server);
    for key in [None, Some("sk-wrong")] {
        let answer = api.clone().with_key(key).create().await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.json["statusCode"], 401);
        assert_eq!(answer.json["error"], "Unauthorized");
    }
    assert_eq!(server.stats().unauthorized, 2);

    assert_eq!(
        api.get("/v2/generate/no-such-id").await.status,
        StatusCode::NOT_FOUND
    );
    // Another key's generation is not found either.
    let id = api.create().await.json["id"].as_str().unwrap().to_owned();
    let other = api.clone().with_key(Some("sk-other"));
    assert_eq!(
        other.get(&format!("/v2/generate/{id}")).await.status,
        StatusCode::NOT_FOUND
    );

    for body in [
        json!("not an object"),
        json!({"input": [{"type": "video", "url": "u"}]}),
        json!({"model": "lipsync-2", "input": []}),
        json!({"model": "lipsync-2", "input": [{"type": "hologram"}]}),
        json!({"model": "", "input": [{"type": "video"}]}),
    ] {
        let answer = api.create_with(&[], body.clone()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.json["error"], "Bad Request");
    }
    let garbage = api
        .send(Method::POST, "/v2/generate", &[], "{not json")
        .await;
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.stats().created, 1);
}

#[tokio::test(start_paused = true)]
async fn an_idempotent_replay_returns_the_same_generation_and_starts_nothing() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let api = Api::new(&server);
    let key = [("idempotency-key", "order-42_a.b~c")];
    let first = api.create_with(&key, create_body(None)).await;
    let replay = api.create_with(&key, create_body(None)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.json["id"], first.json["id"]);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let other = api
        .create_with(&[("idempotency-key", "order-43")], create_body(None))
        .await;
    assert_ne!(other.json["id"], first.json["id"]);

    let stats = server.stats();
    assert_eq!((stats.created, stats.replays, stats.active), (2, 1, 2));

    let too_long = "k".repeat(129);
    for bad in ["", "has space", "slash/no", too_long.as_str(), "tab\there"] {
        let answer = api
            .send(
                Method::POST,
                "/v2/generate",
                &[("idempotency-key", bad)],
                create_body(None).to_string(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad:?}");
    }
    assert_eq!(server.stats().created, 2);
}

#[tokio::test(start_paused = true)]
async fn the_admin_endpoint_shows_the_counters() {
    let server = MockServer::start(rate_only(Algorithm::SlidingWindow, Limit::per_minute(1)))
        .await
        .unwrap();
    let api = Api::new(&server);
    api.create().await;
    api.create().await;
    let stats = api.clone().with_key(None).get("/_mock/stats").await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.json["requests"]["POST /v2/generate"], 2);
    assert_eq!(stats.json["rate_limited"]["POST /v2/generate"], 1);
    assert_eq!(stats.json["created"], 1);
    assert_eq!(stats.json["arrivals"][1]["limited"], true);
    assert_eq!(stats.json["arrivals"][1]["endpoint"], "POST /v2/generate");
    // The admin endpoint is outside the API: not counted.
    assert_eq!(server.stats().requests.values().sum::<u64>(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_plain_client_bursting_gets_429s_of_both_kinds() {
    // Sync as documented: 60 creates a minute, 3 jobs at once on the Creator plan.
    let server = MockServer::start(Config::default()).await.unwrap();
    let api = Api::new(&server);
    let burst: Vec<_> = (0..70)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.create().await })
        })
        .collect();
    let mut created = 0;
    let mut codes = Vec::new();
    for answer in burst {
        let answer = answer.await.unwrap();
        match answer.status {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                codes.push(answer.json["errorCode"].as_str().unwrap().to_owned())
            }
            other => panic!("unexpected {other}"),
        }
    }
    let rate = codes.iter().filter(|c| *c == "rate_limit_exceeded").count();
    let concurrency = codes
        .iter()
        .filter(|c| *c == "concurrency_limit_reached")
        .count();
    assert_eq!((created, rate, concurrency), (3, 10, 57));

    let stats = server.stats();
    assert_eq!(stats.too_many_requests(), 67);
    assert_eq!(
        stats.max_in_window(Endpoint::Create, Duration::from_secs(60)),
        70,
        "the plain client sent 70 creates within one minute, over the quota of 60"
    );
    assert_eq!(stats.max_active, 3);
}

#[tokio::test]
async fn bad_settings_are_typed_errors() {
    let bad = [
        Config::default().limit(Endpoint::Create, Limit::per_minute(0)),
        Config::default().other_limits(Limit::new(5, Duration::ZERO)),
        Config::default().algorithm(Algorithm::LeakyBucket { burst: 0 }),
        Config::default().failure_rate(1.5),
        Config::default().api_key("sk-empty", 0),
    ];
    for config in bad {
        let error = MockServer::start(config.clone()).await.unwrap_err();
        assert!(
            matches!(error, sync_mock::StartError::Config(_)),
            "{config:?}: {error}"
        );
    }
}

#[tokio::test]
async fn runs_in_real_time_too_on_a_given_listener_and_stops() {
    // Sync's numbers scaled down 1,000 times: jobs of 2 ms and 10 ms.
    let config = Config::default().time_scale(1_000);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = MockServer::serve(listener, config).unwrap();
    let api = Api::new(&server);
    let id = api.create().await.json["id"].as_str().unwrap().to_owned();
    let done = api
        .get(&format!("/v2/generate/{id}?wait=true&timeout=5"))
        .await;
    assert_eq!(done.json["status"], "COMPLETED");
    let addr = server.addr();
    server.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// The replay check runs before the plan's layer and the create after it, under two separate
/// locks: two creates with one `Idempotency-Key` sent at once may both miss the first check,
/// so the create checks again under its lock and replays (before: 3 of 300 pairs made two
/// generations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creates_with_one_idempotency_key_at_once_start_one_generation() {
    let server = MockServer::start(rate_only(
        Algorithm::SlidingWindow,
        Limit::per_second(100_000),
    ))
    .await
    .unwrap();
    let api = Api::new(&server);
    let pairs: u64 = 300;
    for i in 0..pairs {
        let key = format!("race-{i}");
        let (a, b) = (api.clone(), api.clone());
        let (ka, kb) = (key.clone(), key.clone());
        let first = tokio::spawn(async move {
            a.create_with(&[("idempotency-key", ka.as_str())], create_body(None))
                .await
                .status
        });
        let second = tokio::spawn(async move {
            b.create_with(&[("idempotency-key", kb.as_str())], create_body(None))
                .await
                .status
        });
        assert_eq!(first.await.unwrap(), StatusCode::CREATED);
        assert_eq!(second.await.unwrap(), StatusCode::CREATED);
    }
    let stats = server.stats();
    assert_eq!(
        (stats.created, stats.replays),
        (pairs, pairs),
        "one generation per Idempotency-Key"
    );
}
