//! `Backoff429` on tokio's paused clock, against scripted servers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_quota::backoff::{BackoffError, Jitter, Retried, Schedule};
use tower_quota::presets::sync;
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, ConfigError, Plan, ServiceBuilderExt};

/// One scripted answer.
#[derive(Clone)]
enum Answer {
    Status(u16, Vec<(&'static str, String)>, String),
    ConnectionError,
}

fn refuse() -> Answer {
    Answer::Status(429, vec![], r#"{"errorCode":"rate_limit_exceeded"}"#.into())
}

fn refuse_with(header: &'static str, value: impl Into<String>) -> Answer {
    Answer::Status(429, vec![(header, value.into())], String::new())
}

fn ok() -> Answer {
    Answer::Status(200, vec![], "done".into())
}

/// What the server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

/// A server that answers from a script (then `ok()` forever... unless `always` is set).
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    always: Arc<Mutex<Option<Answer>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
        let script = Self::default();
        script.answers.lock().unwrap().extend(answers);
        script
    }

    fn always(answer: Answer) -> Self {
        let script = Self::default();
        *script.always.lock().unwrap() = Some(answer);
        script
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Seconds between the first request and each one.
    fn times(&self) -> Vec<f64> {
        let seen = self.seen();
        seen.iter()
            .map(|s| (s.at - seen[0].at).as_secs_f64())
            .collect()
    }

    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
    > + Clone
           + Send {
        let script = self.clone();
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            let script = script.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                script.seen.lock().unwrap().push(Seen {
                    at: Instant::now(),
                    headers: parts.headers,
                    body,
                });
                let next = script.answers.lock().unwrap().pop_front();
                let answer = next
                    .or_else(|| script.always.lock().unwrap().clone())
                    .unwrap_or_else(ok);
                match answer {
                    Answer::Status(code, headers, body) => {
                        let mut response = Response::builder().status(code);
                        for (name, value) in headers {
                            response = response.header(name, value);
                        }
                        Ok(response.body(Full::new(Bytes::from(body))).unwrap())
                    }
                    Answer::ConnectionError => Err::<_, BoxError>("connection reset".into()),
                }
            }
        })
    }
}

fn request(method: Method) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://api.test/v2/generate")
        .body(Full::new(Bytes::from_static(br#"{"model":"lipsync-2"}"#)))
        .unwrap()
}

/// Sends through `backoff` to `script`; the status, body and retry record.
async fn send(
    backoff: Backoff429,
    script: &Script,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes, Option<Retried>), BoxError> {
    let svc = ServiceBuilder::new()
        .backoff_429(backoff)
        .service(script.service());
    let response = svc.oneshot(request).await?;
    let status = response.status();
    let retried = response.extensions().get::<Retried>().copied();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body, retried))
}

/// Sync's preset (its refusals' `errorCode` tells a concurrency 429 apart), without jitter.
fn exact() -> Backoff429 {
    sync::backoff().jitter(Jitter::None)
}

#[tokio::test(start_paused = true)]
async fn the_schedule_without_jitter_is_1_2_4_8_16_seconds() {
    let script = Script::always(refuse());
    let start = Instant::now();
    let (status, body, retried) = send(exact(), &script, request(Method::POST)).await.unwrap();
    assert_eq!(script.times(), [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]);
    assert_eq!(start.elapsed(), Duration::from_secs(31));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        body, r#"{"errorCode":"rate_limit_exceeded"}"#,
        "the last 429's body, whole"
    );
    let retried = retried.unwrap();
    assert_eq!(
        (retried.attempts, retried.waited),
        (6, Duration::from_secs(31))
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_after_refusals_is_answered_with_its_record() {
    let script = Script::new([refuse(), refuse()]);
    let (status, body, retried) = send(exact(), &script, request(Method::POST)).await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"done"[..]));
    assert_eq!(retried.unwrap().attempts, 3);
    assert_eq!(script.times(), [0.0, 1.0, 3.0]);
    // No refusal: no record.
    let script = Script::default();
    let (_, _, retried) = send(exact(), &script, request(Method::POST)).await.unwrap();
    assert_eq!(retried, None);
}

#[tokio::test(start_paused = true)]
async fn jitter_stays_within_its_bounds_and_never_waits_zero() {
    for (jitter, low, high) in [(Jitter::Equal, 0.5, 1.0), (Jitter::Full, 0.0, 1.0)] {
        let script = Script::always(refuse());
        let backoff = Backoff429::new()
            .jitter(jitter)
            .max_retries(5)
            .budget(TpsBudget::new(Duration::from_secs(10), 1000, 1.0));
        send(backoff, &script, request(Method::GET)).await.unwrap();
        let times = script.times();
        for (n, pair) in times.windows(2).enumerate() {
            let wait = pair[1] - pair[0];
            let nominal = f64::from(1u32 << n);
            assert!(
                wait > 0.0 && wait >= nominal * low && wait <= nominal * high,
                "{jitter:?}: wait {n} = {wait} s, nominal {nominal} s"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn decorrelated_waits_in_a_run() {
    let script = Script::always(refuse());
    let backoff = Backoff429::new()
        .jitter(Jitter::Decorrelated)
        .max_retries(8)
        .max_delay(Duration::from_secs(20))
        .budget(TpsBudget::new(Duration::from_secs(10), 1000, 1.0));
    send(backoff, &script, request(Method::GET)).await.unwrap();
    let times = script.times();
    let mut last = 1.0f64;
    for pair in times.windows(2) {
        let wait = pair[1] - pair[0];
        assert!(
            wait >= 1.0 && wait <= (3.0 * last).min(20.0) + 1e-9,
            "{wait} after {last}"
        );
        last = wait;
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_in_every_form() {
    let in_5s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(5));
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    let next_year = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(365 * 86400));
    let cases: Vec<(Answer, Option<(f64, f64)>)> = vec![
        // (the refusal, the wait before the retry: None = handed back at once)
        (refuse_with("retry-after", "3"), Some((3.0, 3.0))),
        (refuse_with("retry-after", in_5s), Some((4.0, 5.0))),
        (refuse_with("retry-after", past), Some((1.0, 1.0))),
        (refuse_with("retry-after-ms", "1500"), Some((1.5, 1.5))),
        (refuse_with("retry-after-ms", "0"), Some((1.0, 1.0))),
        (refuse_with("retry-after", "-5"), Some((1.0, 1.0))),
        (refuse_with("retry-after", "soon"), Some((1.0, 1.0))),
        (refuse_with("retry-after", "0.5"), Some((1.0, 1.0))),
        // A reset with no count of what is left says nothing usable.
        (refuse_with("x-ratelimit-reset", "7"), Some((1.0, 1.0))),
        (refuse_with("retry-after", next_year), None),
        (refuse_with("retry-after", "99999999999999999999"), None),
    ];
    for (answer, expected) in cases {
        let label = match &answer {
            Answer::Status(_, headers, _) => format!("{headers:?}"),
            Answer::ConnectionError => unreachable!(),
        };
        let script = Script::new([answer]);
        let start = Instant::now();
        let (status, _, _) = send(exact(), &script, request(Method::GET)).await.unwrap();
        let times = script.times();
        match expected {
            Some((low, high)) => {
                assert_eq!(status, StatusCode::OK, "{label}");
                let wait = times[1];
                assert!(wait >= low && wait <= high, "{label}: waited {wait} s");
            }
            None => {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{label}");
                assert_eq!(times.len(), 1, "{label}");
                assert_eq!(
                    start.elapsed(),
                    Duration::ZERO,
                    "{label}: handed back at once"
                );
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_reset_of_ratelimit_fields_sets_the_wait() {
    for (name, value) in [
        ("x-ratelimit-reset", "7"),
        ("ratelimit", r#""default";r=0;t=7"#),
    ] {
        let script = Script::new([Answer::Status(
            429,
            vec![(name, value.into()), ("x-ratelimit-remaining", "0".into())],
            String::new(),
        )]);
        let backoff = exact().max_delay(Duration::from_secs(60));
        send(backoff, &script, request(Method::GET)).await.unwrap();
        assert_eq!(script.times(), [0.0, 7.0], "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_hands_the_429_back_at_once() {
    let script = Script::always(refuse());
    let start = Instant::now();
    let backoff = exact().deadline(Duration::from_secs(5));
    let (status, _, retried) = send(backoff, &script, request(Method::GET)).await.unwrap();
    // 1 s and 2 s fit in 5 s; the next 4 s would end at 7 s.
    assert_eq!(script.times(), [0.0, 1.0, 3.0]);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retried.unwrap().attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_storm() {
    let script = Script::always(refuse());
    // Retries: at most 10% of requests, with no reserve.
    let backoff = exact().budget(TpsBudget::new(Duration::from_secs(10), 1, 0.1));
    let mut calls = Vec::new();
    for _ in 0..100 {
        let (backoff, script) = (backoff.clone(), script.clone());
        calls.push(tokio::spawn(async move {
            send(backoff, &script, request(Method::GET)).await
        }));
    }
    let mut refused = 0;
    for call in calls {
        if call.await.unwrap().unwrap().0 == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    assert_eq!(refused, 100);
    let sends = script.seen().len();
    assert!(
        sends <= 100 + 25,
        "{sends} sends for 100 requests: the budget let a storm through"
    );
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_429_has_its_own_schedule() {
    let concurrency = Answer::Status(
        429,
        vec![],
        r#"{"statusCode":429,"errorCode":"concurrency_limit_reached"}"#.into(),
    );
    let script = Script::new([concurrency.clone(), concurrency, refuse()]);
    let backoff = exact().concurrency_schedule(
        Schedule::new()
            .base_delay(Duration::from_secs(10))
            .factor(1.0)
            .jitter(Jitter::None),
    );
    send(backoff, &script, request(Method::POST)).await.unwrap();
    // 10 s and 10 s for the concurrency 429s; then the rate 429 on the rate schedule (its
    // third retry: 4 s).
    assert_eq!(script.times(), [0.0, 10.0, 20.0, 24.0]);
}

#[tokio::test(start_paused = true)]
async fn a_custom_classifier_decides_the_kind() {
    let script = Script::new([Answer::Status(
        429,
        vec![("x-limit-kind", "jobs".into())],
        String::new(),
    )]);
    let backoff = exact()
        .classify(|parts, _body| match parts.headers.get("x-limit-kind") {
            Some(v) if v == "jobs" => tower_quota::backoff::LimitKind::Concurrency,
            _ => tower_quota::backoff::LimitKind::Rate,
        })
        .concurrency_schedule(
            Schedule::new()
                .base_delay(Duration::from_secs(30))
                .jitter(Jitter::None),
        );
    send(backoff, &script, request(Method::POST)).await.unwrap();
    assert_eq!(script.times(), [0.0, 30.0]);
}

#[tokio::test(start_paused = true)]
async fn replays_are_byte_identical_with_one_idempotency_key() {
    let script = Script::new([
        Answer::Status(503, vec![], String::new()),
        Answer::ConnectionError,
        refuse(),
    ]);
    let backoff = exact().retry_transient().idempotency_keys();
    let (status, _, retried) = send(backoff, &script, request(Method::POST)).await.unwrap();
    assert_eq!((status, retried.unwrap().attempts), (StatusCode::OK, 4));
    let seen = script.seen();
    let keys: Vec<_> = seen
        .iter()
        .map(|s| s.headers.get("idempotency-key").unwrap().clone())
        .collect();
    assert_eq!(keys[0].len(), 32);
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    assert!(seen
        .iter()
        .all(|s| s.body == br#"{"model":"lipsync-2"}"#[..]));

    // The caller's own key is kept.
    let script = Script::new([Answer::Status(502, vec![], String::new())]);
    let mut mine = request(Method::POST);
    mine.headers_mut()
        .insert("idempotency-key", "order-42".parse().unwrap());
    send(exact().retry_transient(), &script, mine)
        .await
        .unwrap();
    assert!(script
        .seen()
        .iter()
        .all(|s| s.headers["idempotency-key"] == "order-42"));
}

#[tokio::test(start_paused = true)]
async fn a_post_that_may_have_been_processed_is_not_replayed_without_a_key() {
    let script = Script::new([Answer::Status(503, vec![], String::new())]);
    let (status, _, _) = send(exact().retry_transient(), &script, request(Method::POST))
        .await
        .unwrap();
    assert_eq!(
        (status, script.seen().len()),
        (StatusCode::SERVICE_UNAVAILABLE, 1)
    );

    let script = Script::new([Answer::ConnectionError]);
    let error = send(exact().retry_transient(), &script, request(Method::POST))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("connection reset"));
    assert_eq!(script.seen().len(), 1);

    // A GET is idempotent: retried.
    let script = Script::new([
        Answer::ConnectionError,
        Answer::Status(504, vec![], String::new()),
    ]);
    let (status, _, _) = send(exact().retry_transient(), &script, request(Method::GET))
        .await
        .unwrap();
    assert_eq!((status, script.seen().len()), (StatusCode::OK, 3));

    // Transient failures are not retried unless asked.
    let script = Script::new([Answer::Status(503, vec![], String::new())]);
    let (status, _, _) = send(exact(), &script, request(Method::GET)).await.unwrap();
    assert_eq!(
        (status, script.seen().len()),
        (StatusCode::SERVICE_UNAVAILABLE, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn the_final_response_keeps_its_whole_body_even_past_what_was_read() {
    let big = "x".repeat(200_000);
    let script = Script::always(Answer::Status(429, vec![], big.clone()));
    let (status, body, _) = send(exact().max_retries(1), &script, request(Method::GET))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body.len(), big.len());
    assert_eq!(body, big.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn exhaustion_can_be_a_typed_error() {
    let script = Script::always(refuse());
    let error = send(
        exact().max_retries(2).error_on_exhaustion(),
        &script,
        request(Method::GET),
    )
    .await
    .unwrap_err();
    assert_eq!(
        error.downcast_ref::<BackoffError>(),
        Some(&BackoffError::Exhausted {
            attempts: 3,
            waited: Duration::from_secs(3),
            status: StatusCode::TOO_MANY_REQUESTS
        })
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_settings_are_typed_errors() {
    assert!(Backoff429::builder()
        .max_retries(3)
        .base_delay(Duration::from_millis(100))
        .build()
        .is_ok());
    for backoff in [
        Backoff429::new().base_delay(Duration::ZERO),
        Backoff429::new().factor(0.5),
        Backoff429::new().factor(f64::NAN),
        Backoff429::new().max_delay(Duration::from_millis(10)),
        Backoff429::new().deadline(Duration::ZERO),
        Backoff429::new().concurrency_schedule(Schedule::new().factor(-1.0)),
        Backoff429::new().max_body(64 << 20),
    ] {
        let expected = backoff.validate().unwrap_err();
        assert!(matches!(expected, ConfigError::InvalidSetting { .. }));
        // Built as every layer is built, the error comes at once.
        assert_eq!(backoff.clone().build().unwrap_err(), expected);
        let script = Script::default();
        let error = send(backoff, &script, request(Method::GET))
            .await
            .unwrap_err();
        assert_eq!(
            error.downcast_ref::<BackoffError>(),
            Some(&BackoffError::Config(expected))
        );
        assert!(script.seen().is_empty(), "nothing sent");
    }
}

#[tokio::test(start_paused = true)]
async fn every_retry_goes_back_through_the_layers_below() {
    let concurrency = Answer::Status(
        429,
        vec![],
        r#"{"errorCode":"concurrency_limit_reached"}"#.into(),
    );
    let script = Script::new([
        concurrency,
        Answer::Status(201, vec![], r#"{"id":"job-1","status":"PENDING"}"#.into()),
    ]);
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let svc = ServiceBuilder::new()
        .backoff_429(exact())
        .concurrency_limit_by_plan(plan.clone())
        .service(script.service());
    let call = tokio::spawn(svc.clone().oneshot(request(Method::POST)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        plan.in_use(),
        0,
        "the concurrency 429 gave its slot back while the retry waits"
    );
    let response = call.await.unwrap().unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(
        plan.jobs()[0].id,
        "job-1",
        "the retry took a slot through the plan"
    );

    // A second job waits in the plan's queue, retry or not.
    let second = tokio::spawn(svc.oneshot(request(Method::POST)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(script.seen().len(), 2, "queued below, not sent");
    plan.complete("job-1");
    second.await.unwrap().unwrap();
    assert_eq!(script.seen().len(), 3);
}

/// What a caller gets back from a 429 sent as `frames`, with no retry left: its data frames
/// and trailers as they come out of the layer, and what the classifier saw of it.
struct HandedBack {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    classified: Vec<Vec<u8>>,
}

async fn refusal_handed_back(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> HandedBack {
    let frames = Arc::new(Mutex::new(Some(frames)));
    let inner = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let frames = frames.lock().unwrap().take().unwrap_or_default();
        let mut response = Response::new(StreamBody::new(futures::stream::iter(frames)));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        async move { Ok::<_, BoxError>(response) }
    });
    let classified = Arc::new(Mutex::new(Vec::new()));
    let seen = classified.clone();
    let backoff = exact().max_retries(0).classify(move |_, body| {
        seen.lock().unwrap().push(body.to_vec());
        tower_quota::backoff::LimitKind::Rate
    });
    let response = ServiceBuilder::new()
        .layer(backoff)
        .service(inner)
        .oneshot(request(Method::GET))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let mut body = response.into_body();
    let (mut data, mut trailers) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        assert!(trailers.is_none(), "nothing comes after the trailers");
        match frame.unwrap().into_data() {
            Ok(chunk) => data.push(chunk),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let classified = classified.lock().unwrap().clone();
    HandedBack {
        data,
        trailers,
        classified,
    }
}

#[tokio::test(start_paused = true)]
async fn a_refusal_handed_back_keeps_its_frames_and_trailers_as_they_came() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let back = refusal_handed_back(vec![
        Ok(Frame::data(Bytes::from_static(br#"{"errorCode":"#))),
        Ok(Frame::data(Bytes::from_static(
            br#""concurrency_limit_reached"}"#,
        ))),
        Ok(Frame::trailers(trailers)),
    ])
    .await;
    assert_eq!(
        back.classified,
        [br#"{"errorCode":"concurrency_limit_reached"}"#.to_vec()]
    );
    assert_eq!(
        back.data,
        [
            Bytes::from_static(br#"{"errorCode":"#),
            Bytes::from_static(br#""concurrency_limit_reached"}"#)
        ],
        "the frames come as the server sent them"
    );
    assert_eq!(back.trailers.unwrap()["x-checksum"], "abc");
}

proptest::proptest! {
    /// Whatever frames a refusal comes in, the caller gets them back as they came, and the
    /// classifier sees all their data in order.
    #[test]
    fn any_refusal_comes_back_frame_for_frame(
        chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..6),
        with_trailers in proptest::bool::ANY,
    ) {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|chunk| Ok(Frame::data(Bytes::from(chunk.clone()))))
            .collect();
        if with_trailers {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-end", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(trailers)));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let back = runtime.block_on(refusal_handed_back(frames));
        let data: Vec<Vec<u8>> = back.data.iter().map(|chunk| chunk.to_vec()).collect();
        proptest::prop_assert_eq!(data, chunks.clone());
        proptest::prop_assert_eq!(back.trailers.is_some(), with_trailers);
        proptest::prop_assert_eq!(back.classified, vec![chunks.concat()]);
    }
}

/// A request sleeping in backoff holds nothing below: not the `ConcurrencyLimit(1)` permit nor
/// the `Buffer(1)` slot its first attempt was sent with. The caller keeps its service, and a
/// second request through it is answered while the first sleeps; the first's retry then
/// readies a clone of its own.
#[tokio::test(start_paused = true)]
async fn a_request_sleeping_in_backoff_holds_no_readiness_below() {
    async fn check<S>(below: &str, script: &Script, mut svc: S)
    where
        S: tower::Service<Request<Full<Bytes>>, Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
        S::Response: Send + 'static,
    {
        let start = Instant::now();
        let first = svc.ready().await.unwrap().call(request(Method::GET));
        let first = tokio::spawn(first);
        // The first is refused at once, then sleeps 1 s.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.seen().len(), 1, "{below}");
        let second = tokio::time::timeout(Duration::from_millis(500), async {
            svc.ready().await?.call(request(Method::GET)).await
        })
        .await;
        assert!(
            matches!(second, Ok(Ok(_))),
            "{below}: the second request waited on the first's sleep"
        );
        assert!(start.elapsed() < Duration::from_secs(1), "{below}");
        first.await.unwrap().unwrap();
        assert_eq!(
            script.times(),
            [0.0, 0.1, 1.0],
            "{below}: the first, the second, the first's retry"
        );
    }

    let script = Script::new([refuse()]);
    let svc = ServiceBuilder::new()
        .layer(exact())
        .concurrency_limit(1)
        .service(script.service());
    check("ConcurrencyLimit(1)", &script, svc).await;

    let script = Script::new([refuse()]);
    let svc = ServiceBuilder::new()
        .layer(exact())
        .buffer(1)
        .service(script.service());
    check("Buffer(1)", &script, svc).await;
}

/// The crate's own errors, as the layers below (or a `Backoff429` below) return them.
fn own_errors() -> Vec<BoxError> {
    use tower_quota::concurrency::ConcurrencyError;
    use tower_quota::rate_limit::RateLimitError;
    use tower_quota::store::StoreError;
    let invalid = ConfigError::InvalidSetting {
        name: "base_delay",
        reason: "must be above zero",
    };
    vec![
        RateLimitError::WaitTooLong {
            route: "default".into(),
            wait: Duration::from_secs(60),
            max_wait: Duration::from_secs(1),
        }
        .into(),
        RateLimitError::QueueFull {
            route: "POST /v2/generate".into(),
            max_queue: 1,
        }
        .into(),
        ConcurrencyError::QueueFull { max_queue: 1 }.into(),
        ConcurrencyError::WaitTooLong {
            max_wait: Duration::from_secs(1),
            in_use: 3,
        }
        .into(),
        ConcurrencyError::NoSlots.into(),
        StoreError::Timeout(Duration::from_millis(50)).into(),
        StoreError::Unavailable("connection refused".into()).into(),
        invalid.clone().into(),
        BackoffError::Config(invalid).into(),
        BackoffError::Exhausted {
            attempts: 6,
            waited: Duration::from_secs(31),
            status: StatusCode::TOO_MANY_REQUESTS,
        }
        .into(),
    ]
}

/// Another library's error around ours, with ours as its `source()`.
#[derive(Debug)]
struct Wrapped(BoxError);

impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "wrapped: {}", self.0)
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// An inner service that fails every call with the error `make` gives, counting its calls.
fn failing(
    calls: Arc<Mutex<u32>>,
    make: impl Fn() -> BoxError + Clone + Send + 'static,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
       + Send {
    tower::service_fn(move |_: Request<Full<Bytes>>| {
        *calls.lock().unwrap() += 1;
        let error = make();
        async move { Err::<Response<Full<Bytes>>, _>(error) }
    })
}

/// The crate's errors say a request was not sent, or was given up on on purpose: even with
/// `retry_transient` they go back to the caller at once, as they are, whether they come
/// directly, inside another error (found through `source()`), or through a `Buffer`.
#[tokio::test(start_paused = true)]
async fn the_crates_own_errors_are_never_retried() {
    let count = own_errors().len();
    for n in 0..count {
        let expected = own_errors().swap_remove(n).to_string();
        for how in ["directly", "wrapped", "through a Buffer"] {
            let calls = Arc::new(Mutex::new(0));
            let make = move || own_errors().swap_remove(n);
            let backoff = exact().retry_transient();
            let start = Instant::now();
            let error = match how {
                "directly" => ServiceBuilder::new()
                    .layer(backoff)
                    .service(failing(calls.clone(), make))
                    .oneshot(request(Method::GET))
                    .await
                    .unwrap_err(),
                "wrapped" => ServiceBuilder::new()
                    .layer(backoff)
                    .service(failing(calls.clone(), move || {
                        Box::new(Wrapped(make())) as BoxError
                    }))
                    .oneshot(request(Method::GET))
                    .await
                    .unwrap_err(),
                _ => ServiceBuilder::new()
                    .layer(backoff)
                    .buffer(4)
                    .service(failing(calls.clone(), make))
                    .oneshot(request(Method::GET))
                    .await
                    .unwrap_err(),
            };
            assert_eq!(*calls.lock().unwrap(), 1, "{expected} {how}: retried");
            assert_eq!(start.elapsed(), Duration::ZERO, "{expected} {how}: waited");
            assert!(error.to_string().ends_with(&expected), "{how}: {error}");
        }
    }

    // A transient failure of another kind is still retried.
    let calls = Arc::new(Mutex::new(0));
    let error = ServiceBuilder::new()
        .layer(exact().retry_transient().max_retries(2))
        .service(failing(calls.clone(), || "connection reset".into()))
        .oneshot(request(Method::GET))
        .await
        .unwrap_err();
    assert_eq!(
        (*calls.lock().unwrap(), error.to_string()),
        (3, "connection reset".into())
    );
}

/// A `Buffer` whose service failed to get ready fails its requests with tower's
/// `ServiceError`, the cause as its `source()`: one of ours there is not retried either.
#[tokio::test(start_paused = true)]
async fn an_own_error_inside_a_buffers_error_is_not_retried() {
    #[derive(Clone)]
    struct NeverReady;
    impl tower::Service<Request<Full<Bytes>>> for NeverReady {
        type Response = Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Err(tower_quota::store::StoreError::Timeout(
                Duration::from_millis(50),
            )
            .into()))
        }
        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            unreachable!("never ready")
        }
    }
    let start = Instant::now();
    let error = ServiceBuilder::new()
        .layer(exact().retry_transient())
        .buffer(4)
        .service(NeverReady)
        .oneshot(request(Method::GET))
        .await
        .unwrap_err();
    assert!(
        error.is::<tower::buffer::error::ServiceError>(),
        "{error:?}"
    );
    assert_eq!(start.elapsed(), Duration::ZERO, "retried after a wait");
}

/// A body that gives `frames`, then never ends.
type Stalling = StreamBody<
    futures::stream::Chain<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>,
        futures::stream::Pending<Result<Frame<Bytes>, BoxError>>,
    >,
>;

fn stalling(frames: Vec<&'static str>) -> Stalling {
    use futures::StreamExt as _;
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = frames
        .into_iter()
        .map(|data| Ok(Frame::data(Bytes::from_static(data.as_bytes()))))
        .collect();
    StreamBody::new(futures::stream::iter(frames).chain(futures::stream::pending()))
}

/// Runs `call` to its end, or fails the test after an hour of (paused-clock) time.
async fn within_an_hour<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), call)
        .await
        .expect("still running after an hour")
}

/// The deadline bounds the first attempt too: an answer that comes late, or never, ends the
/// call at the deadline with a typed error (no response to hand back).
#[tokio::test(start_paused = true)]
async fn a_slow_answer_is_cut_at_the_deadline() {
    for late in [Some(Duration::from_secs(10)), None] {
        let inner = tower::service_fn(move |_: Request<Full<Bytes>>| async move {
            match late {
                Some(late) => tokio::time::sleep(late).await,
                None => std::future::pending().await,
            }
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"late"))))
        });
        let svc = ServiceBuilder::new()
            .layer(exact().deadline(Duration::from_secs(2)))
            .service(inner);
        let start = Instant::now();
        let error = within_an_hour(svc.oneshot(request(Method::GET)))
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(2), "{late:?}");
        assert_eq!(
            error.downcast_ref::<BackoffError>(),
            Some(&BackoffError::DeadlineExceeded {
                deadline: Duration::from_secs(2),
                attempts: 1
            }),
            "{late:?}"
        );
    }
}

/// A refusal whose body never ends is not read past the deadline.
#[tokio::test(start_paused = true)]
async fn a_refusal_whose_body_never_ends_is_cut_at_the_deadline() {
    let inner = tower::service_fn(|_: Request<Full<Bytes>>| async {
        let mut response = Response::new(stalling(vec![r#"{"errorCode":"#]));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        Ok::<_, BoxError>(response)
    });
    let svc = ServiceBuilder::new()
        .layer(exact().deadline(Duration::from_secs(2)))
        .service(inner);
    let start = Instant::now();
    let error = within_an_hour(svc.oneshot(request(Method::GET)))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(
        error.downcast_ref::<BackoffError>(),
        Some(&BackoffError::DeadlineExceeded {
            deadline: Duration::from_secs(2),
            attempts: 1
        })
    );
}

/// A retry sent before the deadline is cut when the deadline passes with it in flight; so is
/// one still waiting for the service below to be ready.
#[tokio::test(start_paused = true)]
async fn a_retry_in_flight_past_the_deadline_is_cut() {
    let calls = Arc::new(Mutex::new(0u32));
    let counted = calls.clone();
    let inner = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let n = {
            let mut calls = counted.lock().unwrap();
            *calls += 1;
            *calls
        };
        async move {
            let status = if n == 1 {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                tokio::time::sleep(Duration::from_secs(10)).await;
                StatusCode::OK
            };
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            Ok::<_, BoxError>(response)
        }
    });
    let svc = ServiceBuilder::new()
        .layer(exact().deadline(Duration::from_secs(3)))
        .service(inner);
    let start = Instant::now();
    let error = within_an_hour(svc.oneshot(request(Method::GET)))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(*calls.lock().unwrap(), 2, "the retry was sent at 1 s");
    assert_eq!(
        error.downcast_ref::<BackoffError>(),
        Some(&BackoffError::DeadlineExceeded {
            deadline: Duration::from_secs(3),
            attempts: 2
        })
    );

    // Below a ConcurrencyLimit(1) that another request holds for 10 s: the retry is due at
    // 1 s but never gets the permit; it ends at the deadline, having sent one attempt.
    let script = Script::new([refuse()]);
    let svc = ServiceBuilder::new()
        .layer(exact().deadline(Duration::from_secs(3)))
        .concurrency_limit(1)
        .service(script.service());
    let start = Instant::now();
    let call = tokio::spawn(svc.clone().oneshot(request(Method::GET)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut holder = svc.clone();
    let holder = tokio::spawn(async move {
        let _permit = holder.ready().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let error = within_an_hour(call).await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(
        error.downcast_ref::<BackoffError>(),
        Some(&BackoffError::DeadlineExceeded {
            deadline: Duration::from_secs(3),
            attempts: 1
        })
    );
    holder.abort();
}

/// A refusal with `body` through `backoff` (with no retry left): the response handed back,
/// and what the classifier saw.
async fn refusal_read<B>(
    body: B,
    backoff: Backoff429,
) -> (Response<tower_quota::backoff::BackoffBody<B>>, Vec<Vec<u8>>)
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let body = Arc::new(Mutex::new(Some(body)));
    let inner = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let mut response = Response::new(body.lock().unwrap().take().unwrap());
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        async move { Ok::<_, BoxError>(response) }
    });
    let classified = Arc::new(Mutex::new(Vec::new()));
    let seen = classified.clone();
    let backoff = backoff.max_retries(0).classify(move |_, body| {
        seen.lock().unwrap().push(body.to_vec());
        tower_quota::backoff::LimitKind::Rate
    });
    let response = within_an_hour(
        ServiceBuilder::new()
            .layer(backoff)
            .service(inner)
            .oneshot(request(Method::GET)),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let classified = classified.lock().unwrap().clone();
    (response, classified)
}

/// A body of empty frames that ends only after 100,000 of them, counting those polled.
struct EmptyFrames(Arc<std::sync::atomic::AtomicUsize>);

impl http_body::Body for EmptyFrames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::task::Poll::Ready((n < 100_000).then(|| Ok(Frame::data(Bytes::new()))))
    }
}

/// A refusal's body of endless empty frames is read for at most `max_read_frames` frames
/// (1,024 by default) before the layer decides; the caller gets them and the rest.
#[tokio::test(start_paused = true)]
async fn a_refusal_of_endless_empty_frames_is_read_for_max_read_frames() {
    for (backoff, limit) in [(exact(), 1024), (exact().max_read_frames(10), 10)] {
        let polled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (response, classified) = refusal_read(EmptyFrames(polled.clone()), backoff).await;
        assert_eq!(
            polled.load(std::sync::atomic::Ordering::SeqCst),
            limit,
            "frames read before deciding"
        );
        assert_eq!(classified, [Vec::<u8>::new()]);
        let mut body = response.into_body();
        for _ in 0..limit + 5 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "");
        }
    }
}

/// A refusal's body that stalls is read for at most `max_read_time` (10 s by default); the
/// layer decides on what it read, and the caller gets that and the rest.
#[tokio::test(start_paused = true)]
async fn a_stalled_refusal_body_is_read_for_max_read_time() {
    for (backoff, limit) in [
        (exact(), Duration::from_secs(10)),
        (
            exact().max_read_time(Duration::from_secs(3)),
            Duration::from_secs(3),
        ),
    ] {
        let start = Instant::now();
        let (response, classified) =
            refusal_read(stalling(vec![r#"{"errorCode":"#, r#""x"}"#]), backoff).await;
        assert_eq!(start.elapsed(), limit);
        assert_eq!(classified, [br#"{"errorCode":"x"}"#.to_vec()]);
        let mut body = response.into_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            r#"{"errorCode":"#
        );
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            r#""x"}"#
        );
        let rest = tokio::time::timeout(Duration::from_secs(60), body.frame()).await;
        assert!(rest.is_err(), "the rest is the server's, stalled as it is");
    }

    // A concurrency refusal that stalls is known from what was read: retried on its own
    // schedule.
    let calls = Arc::new(Mutex::new(0u32));
    let counted = calls.clone();
    let inner = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let n = {
            let mut calls = counted.lock().unwrap();
            *calls += 1;
            *calls
        };
        async move {
            let mut response = Response::new(if n == 1 {
                stalling(vec![r#"{"errorCode":"concurrency_limit_reached"}"#])
            } else {
                stalling(vec![])
            });
            if n == 1 {
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            }
            Ok::<_, BoxError>(response)
        }
    });
    let backoff = exact()
        .max_read_time(Duration::from_secs(2))
        .concurrency_schedule(
            Schedule::new()
                .base_delay(Duration::from_secs(15))
                .jitter(Jitter::None),
        );
    let start = Instant::now();
    let response = within_an_hour(
        ServiceBuilder::new()
            .layer(backoff)
            .service(inner)
            .oneshot(request(Method::GET)),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(2 + 15));
}

/// The classifier sees at most `max_body` bytes of a refusal (64 KiB by default), however
/// the body is cut into frames; the caller gets the whole body.
#[tokio::test(start_paused = true)]
async fn the_classifier_sees_at_most_max_body_bytes() {
    let big = Bytes::from(vec![b'x'; 200_000]);
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(big.clone()))];
    let body = StreamBody::new(futures::stream::iter(frames));
    let (response, classified) = refusal_read(body, exact()).await;
    assert_eq!(classified.len(), 1);
    assert_eq!(classified[0].len(), 64 * 1024);
    let whole = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, big);

    let frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..5)
        .map(|n| Ok(Frame::data(Bytes::from(format!("frame {n}...")))))
        .collect();
    let body = StreamBody::new(futures::stream::iter(frames));
    let (response, classified) = refusal_read(body, exact().max_body(16)).await;
    assert_eq!(classified, [b"frame 0...frame ".to_vec()]);
    let whole = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, "frame 0...frame 1...frame 2...frame 3...frame 4...");
}

/// Durations for the property test below: small, large, huge, the edges.
fn any_duration() -> impl proptest::strategy::Strategy<Value = Duration> {
    use proptest::prelude::*;
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..10_000_000).prop_map(Duration::from_nanos),
        (0u64..100_000).prop_map(Duration::from_secs),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn any_jitter() -> impl proptest::strategy::Strategy<Value = Jitter> {
    use proptest::prelude::*;
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
    ]
}

const YEAR: Duration = Duration::from_secs(365 * 86400);

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Whatever a valid layer's settings and whatever the server asks, nothing panics, no
    /// wait exceeds `max_delay` (beyond the timer's millisecond) or undercuts what the
    /// server asked, and the call ends within its deadline. The paused clock sleeps any
    /// wait at once, but cannot reach the far future quickly: either the deadline or
    /// `max_delay` is at most a year here (each alone is tested up to `Duration::MAX`).
    #[test]
    fn no_valid_setting_panics_or_waits_past_its_bounds(
        base in any_duration(),
        extra in any_duration(),
        factor in proptest::prop_oneof![
            proptest::strategy::Just(1.0),
            1.0..4.0f64,
            1.0..f64::MAX,
            proptest::strategy::Just(f64::MAX)
        ],
        jitter in any_jitter(),
        retries in 0u32..6,
        deadline in proptest::option::of(any_duration()),
        bounded_deadline in proptest::bool::ANY,
        asked in proptest::option::of((proptest::bool::ANY, proptest::num::u64::ANY)),
    ) {
        // A base delay under a millisecond and a zero deadline are invalid: no case is spent
        // on those.
        let base = base.max(Duration::from_millis(1));
        let deadline = deadline.map(|deadline| deadline.max(Duration::from_nanos(1)));
        let (base, cap, deadline) = if bounded_deadline {
            (base, base.saturating_add(extra), Some(deadline.unwrap_or(YEAR).min(YEAR)))
        } else {
            let base = base.min(YEAR);
            (base, base.saturating_add(extra).min(YEAR), deadline)
        };
        let mut backoff = Backoff429::new()
            .base_delay(base)
            .max_delay(cap)
            .factor(factor)
            .jitter(jitter)
            .max_retries(retries)
            // Not tower's TpsBudget: after a wait of months its withdraw counts through
            // every second of them.
            .budget(
                tower_quota::backoff::RetryBudget::new(Duration::from_secs(10), 1000, 1.0)
                    .unwrap(),
            );
        if let Some(deadline) = deadline {
            backoff = backoff.deadline(deadline);
        }
        proptest::prop_assume!(backoff.validate().is_ok());
        let (answer, hint) = match asked {
            Some((true, secs)) => (
                refuse_with("retry-after", secs.to_string()),
                Some(Duration::from_secs(secs)),
            ),
            Some((false, ms)) => (
                refuse_with("retry-after-ms", ms.to_string()),
                Some(Duration::from_millis(ms)),
            ),
            None => (refuse(), None),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let script = Script::always(answer);
        let (result, elapsed) = runtime.block_on(async {
            let start = Instant::now();
            let result = send(backoff, &script, request(Method::GET)).await;
            (result, start.elapsed())
        });
        let (status, _, _) = result.unwrap();
        proptest::prop_assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let seen = script.seen();
        proptest::prop_assert!(seen.len() <= retries as usize + 1);
        // The timer rounds a wait up to its next millisecond.
        let at_most = cap.saturating_add(Duration::from_millis(1));
        for pair in seen.windows(2) {
            let wait = pair[1].at - pair[0].at;
            proptest::prop_assert!(wait <= at_most, "waited {wait:?}, max_delay {cap:?}");
            proptest::prop_assert!(wait >= Duration::from_millis(1), "waited {wait:?}");
            if let Some(hint) = hint {
                proptest::prop_assert!(wait >= hint, "waited {wait:?}, asked {hint:?}");
            }
        }
        if let Some(deadline) = deadline {
            proptest::prop_assert!(elapsed <= deadline, "{elapsed:?} past the deadline {deadline:?}");
        }
    }
}

/// tokio's timer fires on whole milliseconds, up to one late: a wait that ends within a
/// millisecond of the deadline could send its retry past it, so it is not slept.
#[tokio::test(start_paused = true)]
async fn no_retry_is_sent_past_the_deadline_by_a_late_timer() {
    let script = Script::always(refuse());
    let deadline = Duration::from_micros(4_300);
    let backoff = exact()
        .base_delay(Duration::from_micros(1_500))
        .factor(1.4)
        .deadline(deadline);
    let start = Instant::now();
    let (status, _, retried) = send(backoff, &script, request(Method::GET)).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // The first wait (1.5 ms) ends on the timer's tick at 2 ms; the second (2.1 ms) would end
    // at 4.1 ms, on the tick at 5 ms: past the deadline.
    let sent: Vec<Duration> = script.seen().iter().map(|s| s.at - start).collect();
    assert!(sent.iter().all(|&at| at < deadline), "{sent:?}");
    assert_eq!(retried.unwrap().attempts, 2);
    assert!(start.elapsed() <= deadline, "{:?}", start.elapsed());
}

/// Unix seconds `ahead` from the wall clock now, as GitHub writes `x-ratelimit-reset`.
fn epoch_in(ahead: u64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (now + ahead).to_string()
}

#[tokio::test(start_paused = true)]
async fn a_github_403_saying_nothing_is_left_is_retried_at_its_reset() {
    let refusal = Answer::Status(
        403,
        vec![
            ("x-ratelimit-limit", "60".into()),
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-used", "60".into()),
            ("x-ratelimit-reset", epoch_in(5)),
            ("x-ratelimit-resource", "core".into()),
        ],
        r#"{"message":"API rate limit exceeded"}"#.into(),
    );
    let script = Script::new([refusal, ok()]);
    let (status, _, _) = send(exact(), &script, request(Method::GET)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let times = script.times();
    assert_eq!(times.len(), 2);
    // Its reset, in whole seconds of the wall clock: 4 to 5 s away when it was sent.
    assert!((4.0..=5.0).contains(&times[1]), "{times:?}");
}

#[tokio::test(start_paused = true)]
async fn a_403_that_says_nothing_of_a_limit_is_handed_back() {
    let forbidden = Answer::Status(403, vec![], r#"{"message":"Forbidden"}"#.into());
    let script = Script::new([forbidden, ok()]);
    let (status, _, retried) = send(exact(), &script, request(Method::GET)).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!((script.times().len(), retried), (1, None));
}

#[tokio::test(start_paused = true)]
async fn an_openai_429_waits_for_the_limit_that_is_spent() {
    let refusal = Answer::Status(
        429,
        vec![
            ("x-ratelimit-limit-requests", "60".into()),
            ("x-ratelimit-remaining-requests", "0".into()),
            ("x-ratelimit-reset-requests", "6s".into()),
            ("x-ratelimit-limit-tokens", "150000".into()),
            ("x-ratelimit-remaining-tokens", "149984".into()),
            ("x-ratelimit-reset-tokens", "6m0s".into()),
        ],
        String::new(),
    );
    let script = Script::new([refusal, ok()]);
    send(exact(), &script, request(Method::GET)).await.unwrap();
    assert_eq!(script.times(), [0.0, 6.0]);
}

#[tokio::test(start_paused = true)]
async fn a_reset_on_a_failure_that_leaves_requests_does_not_stretch_the_retry() {
    // A 503 stating an hour-long window with room in it says nothing of when to come back.
    let overloaded = Answer::Status(
        503,
        vec![
            ("x-ratelimit-remaining", "100".into()),
            ("x-ratelimit-reset", "3600".into()),
        ],
        String::new(),
    );
    let script = Script::new([overloaded, ok()]);
    let (status, _, _) = send(exact().retry_transient(), &script, request(Method::GET))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(script.times(), [0.0, 1.0], "the schedule's first wait");
    // One whose limit is spent is retried at its reset.
    let spent = Answer::Status(
        503,
        vec![
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", "30".into()),
        ],
        String::new(),
    );
    let script = Script::new([spent, ok()]);
    send(exact().retry_transient(), &script, request(Method::GET))
        .await
        .unwrap();
    assert_eq!(script.times(), [0.0, 30.0]);
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_503_is_retried_when_its_retry_after_says() {
    let overloaded = Answer::Status(503, vec![("retry-after", "7".into())], String::new());
    let script = Script::new([overloaded, ok()]);
    let (status, _, _) = send(exact().retry_transient(), &script, request(Method::GET))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(script.times(), [0.0, 7.0]);
}
