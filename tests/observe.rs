//! What the layers report: each event as it happens (`on_event`), the cumulative counters of
//! the snapshots, and (feature `metrics`) the same counts through the `metrics` facade, read
//! by `metrics-util`'s debugging recorder. One scenario per layer drives every counter; the
//! event listener, the snapshot and the recorder must all agree on it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_quota::event::{Event, Freed, Learnt, NoRetry, Refusal};
use tower_quota::rate_limit::MissingKey;
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

#[path = "common/mod.rs"]
mod common;

/// The events a listener saw, written out (they borrow from the layer).
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn listener(&self) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
        let seen = self.0.clone();
        move |event: &Event<'_>| seen.lock().unwrap().push(format!("{event:?}"))
    }

    fn count(&self, prefix: &str) -> usize {
        let seen = self.0.lock().unwrap();
        seen.iter().filter(|e| e.starts_with(prefix)).count()
    }
}

fn body(text: &str) -> Full<Bytes> {
    Full::new(Bytes::from(text.to_owned()))
}

/// The client-mode scenario: requests sent at once, one that waits, a full queue, a wait
/// too long, a caller that gives up waiting, a request abandoned after its send, a 429 and
/// rate-limit header fields learnt from.
async fn client_scenario(seen: &Seen) -> RateLimitByRoute {
    let limits = RateLimitByRoute::builder()
        .name("api")
        .route("POST /v2/generate", Quota::per_minute(2))
        .route("POST /v2/slow", Quota::per_hour(1))
        .default_quota(Quota::per_minute(600))
        .max_queue(1)
        .max_wait(Duration::from_secs(90))
        .on_event(seen.listener())
        .build()
        .unwrap();
    let api = service_fn(|req: Request<Full<Bytes>>| async move {
        let mut response = Response::new(body("{}"));
        match req.uri().path() {
            "/v2/hang" => std::future::pending::<()>().await,
            "/v2/limited" => {
                *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                response
                    .headers_mut()
                    .insert("retry-after", "1".parse().unwrap());
            }
            "/v2/stated" => {
                let h = response.headers_mut();
                h.insert("x-ratelimit-remaining", "5".parse().unwrap());
                h.insert("x-ratelimit-reset", "30".parse().unwrap());
            }
            _ => {}
        }
        Ok::<_, Infallible>(response)
    });
    let svc = ServiceBuilder::new().layer(limits.clone()).service(api);
    let post = |path: &str| Request::post(path).body(body("")).unwrap();

    // Two at once; the third waits a minute, while a fourth finds the queue full.
    for _ in 0..2 {
        svc.clone().oneshot(post("/v2/generate")).await.unwrap();
    }
    let waiting = tokio::spawn(svc.clone().oneshot(post("/v2/generate")));
    tokio::task::yield_now().await;
    let full = svc.clone().oneshot(post("/v2/generate")).await.unwrap_err();
    assert!(full.to_string().contains("queue"), "{full}");
    waiting.await.unwrap().unwrap();

    // One of a route allowing one an hour goes; the next would wait past 90 s.
    svc.clone().oneshot(post("/v2/slow")).await.unwrap();
    let late = svc.clone().oneshot(post("/v2/slow")).await.unwrap_err();
    assert!(late.to_string().contains("maximum"), "{late}");

    // A caller gives up waiting (the route is spent until the window moves).
    svc.clone().oneshot(post("/v2/generate")).await.unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        svc.clone().oneshot(post("/v2/generate")),
    )
    .await;
    assert!(gave_up.is_err(), "it waits");

    // A request given up on after its send.
    let abandoned = tokio::time::timeout(
        Duration::from_secs(1),
        svc.clone().oneshot(post("/v2/hang")),
    )
    .await;
    assert!(abandoned.is_err(), "it hangs");

    // A 429, and fields stating what is left.
    let limited = svc.clone().oneshot(post("/v2/limited")).await.unwrap();
    assert_eq!(limited.status(), 429);
    svc.clone().oneshot(post("/v2/stated")).await.unwrap();
    limits
}

#[tokio::test(start_paused = true)]
async fn client_mode_reports_each_request_as_an_event_and_a_count() {
    let seen = Seen::default();
    let limits = client_scenario(&seen).await;
    let snapshot = limits.snapshot();
    let generate = snapshot[0].counters;
    assert_eq!(generate.admitted, 4, "{generate:?}");
    assert_eq!(generate.waited, 1);
    assert!(
        (Duration::from_secs(60)..Duration::from_secs(61)).contains(&generate.wait_time),
        "{:?}: a minute and the safety margin",
        generate.wait_time
    );
    assert_eq!(generate.queued, 2, "the waiter and the one that gave up");
    assert_eq!(generate.refused.queue_full, 1);
    assert_eq!(generate.gave_up, 1);
    let slow = snapshot[1].counters;
    assert_eq!((slow.admitted, slow.refused.wait_too_long), (1, 1));
    assert_eq!(slow.refused.total(), 1);
    let default = snapshot[2].counters;
    assert_eq!(default.admitted, 3, "hang, limited, stated");
    assert_eq!(default.abandoned, 1);
    assert_eq!((default.learnt_429, default.learnt_headers), (1, 1));

    // The listener saw the same, each event naming the layer and the route.
    assert_eq!(
        seen.count("Admitted { layer: \"api\", route: \"POST /v2/generate\""),
        4
    );
    assert_eq!(seen.count("Admitted"), 8);
    assert_eq!(seen.count("Refused"), 2);
    assert_eq!(seen.count("GaveUp"), 1);
    assert_eq!(seen.count("Abandoned"), 1);
    assert_eq!(seen.count("Learnt"), 2);
    let events = seen.0.lock().unwrap().join("\n");
    assert!(events.contains("waited: 60.05s"), "{events}");
    assert!(events.contains(&format!("{:?}", Refusal::QueueFull)));
    assert!(events.contains(&format!("{:?}", Learnt::TooManyRequests)));
}

#[tokio::test(start_paused = true)]
async fn a_listener_may_look_at_the_layer_it_listens_to() {
    // Events are reported once the layer's locks are let go: a listener that takes a
    // snapshot of its own layer does not deadlock.
    let slot: Arc<Mutex<Option<RateLimitByRoute>>> = Arc::default();
    let looked = Arc::new(Mutex::new(Vec::new()));
    let (slot2, looked2) = (slot.clone(), looked.clone());
    let limits = RateLimitByRoute::builder()
        .route("GET /x", Quota::per_second(10))
        .on_event(move |_: &Event<'_>| {
            if let Some(layer) = &*slot2.lock().unwrap() {
                looked2.lock().unwrap().push(layer.snapshot()[0].in_flight);
            }
        })
        .build()
        .unwrap();
    *slot.lock().unwrap() = Some(limits.clone());
    let api = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let svc = ServiceBuilder::new().layer(limits.clone()).service(api);
    for _ in 0..2 {
        let request = Request::get("/x").body(()).unwrap();
        svc.clone().oneshot(request).await.unwrap();
    }
    assert_eq!(*looked.lock().unwrap(), [1, 1], "seen with its place held");
    slot.lock().unwrap().take();
}

#[tokio::test(start_paused = true)]
async fn a_listener_that_panics_costs_the_layer_nothing() {
    // Events are reported where a request gives back what it holds (some in a `Drop`): a
    // panicking listener is caught there, and every place and slot is still given back.
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .on_event(|_: &Event<'_>| panic!("a listener's bug"))
        .build()
        .unwrap();
    let plan = ConcurrencyLimitByPlan::custom(1)
        .job_route("POST /v2/generate")
        .in_flight()
        .on_event(|_: &Event<'_>| panic!("a listener's bug"))
        .build()
        .unwrap();
    let api = service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(body("{}")))
    });
    let svc = ServiceBuilder::new()
        .layer(plan.clone())
        .layer(limits.clone())
        .service(api);
    let post = || Request::post("/v2/generate").body(body("")).unwrap();
    let response = svc.clone().oneshot(post()).await.unwrap();
    response.into_body().collect().await.unwrap();
    // The second waits a minute for its turn, then is dropped by its caller.
    let gave_up = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(post())).await;
    assert!(gave_up.is_err());
    let route = &limits.snapshot()[0];
    assert_eq!((route.in_flight, route.waiters), (0, 0));
    assert_eq!((route.counters.admitted, route.counters.gave_up), (1, 1));
    assert_eq!(plan.in_use(), 0, "both slots given back");
    assert_eq!(plan.snapshot().counters.taken, 2);
}

/// The server-mode scenario: a client within its quota, then over it, one without a key,
/// and a flood of fresh keys through a table of 16.
fn server_scenario(seen: &Seen) -> RateLimitByRoute<tower_quota::rate_limit::Reject> {
    let limits = RateLimitByRoute::builder()
        .name("edge")
        .route("GET /v1/items", Quota::per_minute(1))
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .on_missing_key(MissingKey::Refuse)
        .max_keys(16)
        .on_event(seen.listener())
        .build()
        .unwrap();
    let api = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let mut svc = ServiceBuilder::new().layer(limits.clone()).service(api);
    let get = |key: Option<&str>| {
        let mut request = Request::get("/v1/items");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        request.body(()).unwrap()
    };
    let mut statuses = Vec::new();
    for key in [Some("a"), Some("a"), None] {
        statuses.push(common::now(svc.call(get(key))).unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 429, 400]);
    for n in 0..100 {
        let key = format!("fresh-{n}");
        let response = common::now(svc.call(get(Some(&key)))).unwrap();
        assert_eq!(response.status(), 200, "a newcomer is never locked out");
    }
    limits
}

#[test]
fn server_mode_counts_refusals_by_reason_and_the_clients_a_full_table_forgets() {
    let seen = Seen::default();
    let limits = server_scenario(&seen);
    let route = &limits.snapshot()[0];
    let counters = route.counters;
    assert_eq!(counters.admitted, 101, "{counters:?}");
    assert_eq!(counters.refused.quota, 1);
    assert_eq!(counters.refused.missing_key, 1);
    assert!(route.tracked_keys <= 16, "{}", route.tracked_keys);
    assert_eq!(
        route.tracked_keys as u64 + counters.keys_forgotten,
        101,
        "every distinct key is tracked or was forgotten for a newcomer"
    );
    assert_eq!(seen.count("KeyForgotten"), counters.keys_forgotten as usize);
    assert_eq!(seen.count("Refused"), 2);
}

/// A job API: creates make `job-N` (PENDING), or fail with a 422 when asked to; the status
/// route shows a job's status, set by the test.
#[derive(Clone, Default)]
struct Jobs {
    statuses: Arc<Mutex<Vec<String>>>,
}

impl Jobs {
    fn answer(&self, req: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let mut statuses = self.statuses.lock().unwrap();
        if req.method() == http::Method::POST {
            if req.headers().contains_key("x-fail") {
                let mut response = Response::new(body("{}"));
                *response.status_mut() = http::StatusCode::UNPROCESSABLE_ENTITY;
                return response;
            }
            statuses.push("PENDING".into());
            let id = statuses.len();
            return Response::new(body(&format!(r#"{{"id":"job-{id}","status":"PENDING"}}"#)));
        }
        let id = path.trim_start_matches("/v2/generate/job-");
        let n: usize = id.parse().unwrap();
        let status = &statuses[n - 1];
        Response::new(body(&format!(r#"{{"id":"job-{id}","status":"{status}"}}"#)))
    }

    fn set(&self, n: usize, status: &str) {
        self.statuses.lock().unwrap()[n - 1] = status.into();
    }
}

/// The plan scenario: a slot taken at once and one after a wait, a full queue, a caller
/// giving up, and a slot freed by each path: a webhook, a status, a reconcile, a lease, a
/// failed create.
async fn plan_scenario(seen: &Seen) -> ConcurrencyLimitByPlan {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .name("jobs")
        .max_queue(1)
        .max_job_life(Duration::from_secs(600))
        .on_event(seen.listener())
        .build()
        .unwrap();
    let jobs = Jobs::default();
    let api = {
        let jobs = jobs.clone();
        service_fn(move |req: Request<Full<Bytes>>| {
            let response = jobs.answer(req);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let svc = ServiceBuilder::new().layer(plan.clone()).service(api);
    let send = |req: Request<Full<Bytes>>| {
        let svc = svc.clone();
        async move {
            let response = svc.oneshot(req).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, tower::BoxError>(status)
        }
    };
    let create = || Request::post("/v2/generate").body(body("{}")).unwrap();
    let status = |n: usize| {
        Request::get(format!("/v2/generate/job-{n}"))
            .body(body(""))
            .unwrap()
    };

    // job-1 takes the slot; a second create waits, a third finds the queue full.
    send(create()).await.unwrap();
    let waiting = tokio::spawn(send(create()));
    tokio::task::yield_now().await;
    let full = send(create()).await.unwrap_err();
    assert!(full.to_string().contains("already wait"), "{full}");
    // A webhook ends job-1 after 5 s: job-2 takes its slot.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(plan.complete("job-1"));
    waiting.await.unwrap().unwrap();
    // A status shows job-2 ended.
    jobs.set(2, "COMPLETED");
    send(status(2)).await.unwrap();
    // job-3 is gone from the list.
    send(create()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    plan.reconcile(Vec::<String>::new());
    // job-4 outlives its lease: the next create finds its slot expired.
    send(create()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(601)).await;
    send(create()).await.unwrap();
    // A caller gives up waiting behind job-5.
    let gave_up = tokio::time::timeout(Duration::from_secs(1), send(create())).await;
    assert!(gave_up.is_err(), "it waits");
    // A failed create gives its slot back.
    plan.complete("job-5");
    let failed = Request::post("/v2/generate")
        .header("x-fail", "1")
        .body(body("{}"))
        .unwrap();
    assert_eq!(send(failed).await.unwrap(), 422);
    plan
}

#[tokio::test(start_paused = true)]
async fn plan_counts_each_slot_taken_and_what_freed_it() {
    let seen = Seen::default();
    let plan = plan_scenario(&seen).await;
    let snapshot = plan.snapshot();
    let c = snapshot.counters;
    assert_eq!(c.taken, 6, "{c:?}");
    assert_eq!(
        (c.waited, c.wait_time),
        (1, Duration::from_secs(5)),
        "{c:?}"
    );
    assert_eq!(c.queued, 2, "the waiter and the one that gave up");
    assert_eq!(c.refused.queue_full, 1);
    assert_eq!(c.gave_up, 1);
    assert_eq!(c.jobs_bound, 5);
    let freed = c.freed;
    assert_eq!(freed.completed, 2, "{freed:?}");
    assert_eq!(freed.status, 1);
    assert_eq!(freed.reconciled, 1);
    assert_eq!(freed.lease_expired, 1);
    assert_eq!(freed.create_failed, 1);
    assert_eq!(snapshot.in_use, 0);

    assert_eq!(seen.count("SlotTaken"), 6);
    assert_eq!(seen.count("JobBound { layer: \"jobs\", id: \"job-1\""), 1);
    let lease = format!(
        "SlotFreed {{ layer: \"jobs\", by: {:?} }}",
        Freed::LeaseExpired
    );
    assert_eq!(seen.count(&lease), 1);
    assert_eq!(seen.count("SlotFreed"), 6);
}

/// The backoff scenario: a request refused until its retries run out, and one whose retry
/// the budget refuses.
async fn backoff_scenario(seen: &Seen) -> (Backoff429, Backoff429) {
    let refusing = service_fn(|_: Request<String>| async {
        let mut response = Response::new(String::new());
        *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        Ok::<_, Infallible>(response)
    });
    let retries = Backoff429::builder()
        .name("retry")
        .max_retries(2)
        .base_delay(Duration::from_secs(1))
        .jitter(tower_quota::backoff::Jitter::None)
        .on_event(seen.listener())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(retries.clone())
        .service(refusing);
    let request = || Request::get("/a").body(String::new()).unwrap();
    let response = svc.oneshot(request()).await.unwrap();
    assert_eq!(response.status(), 429);

    let no_budget = Backoff429::builder()
        .name("thrifty")
        .budget(tower::retry::budget::TpsBudget::new(
            Duration::from_secs(10),
            0,
            0.0,
        ))
        .on_event(seen.listener())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(no_budget.clone())
        .service(refusing);
    svc.oneshot(request()).await.unwrap();
    (retries, no_budget)
}

#[tokio::test(start_paused = true)]
async fn backoff_counts_retries_their_waits_and_refusals_not_retried() {
    let seen = Seen::default();
    let (retries, no_budget) = backoff_scenario(&seen).await;
    let c = retries.counters();
    assert_eq!(c.retries_rate, 2, "{c:?}");
    assert_eq!(c.backoff_time, Duration::from_secs(3), "1 s, then 2 s");
    assert_eq!(c.no_retries_left, 1);
    assert_eq!(no_budget.counters().budget_spent, 1);
    assert_eq!(no_budget.counters().retries_rate, 0);
    assert_eq!(seen.count("Retry { layer: \"retry\", attempt: 2"), 1);
    assert_eq!(seen.count("Retry { layer: \"retry\", attempt: 3"), 1);
    let spent = format!("why: {:?}", NoRetry::BudgetSpent);
    assert_eq!(
        seen.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with("NoRetry { layer: \"thrifty\"") && e.contains(&spent))
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_counts_each_kind_of_retry_and_each_reason_not_to() {
    let seen = Seen::default();
    let calls = Arc::new(Mutex::new(0u32));
    let api = service_fn(move |req: Request<String>| {
        let calls = calls.clone();
        async move {
            let mut response = Response::new(String::new());
            let (status, retry_after) = match req.uri().path() {
                // A 503, then an answer.
                "/transient" => {
                    let mut calls = calls.lock().unwrap();
                    *calls += 1;
                    (if *calls == 1 { 503 } else { 200 }, None)
                }
                "/long" => (429, Some("100")),
                _ => (429, Some("5")),
            };
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            if let Some(after) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", after.parse().unwrap());
            }
            Ok::<_, Infallible>(response)
        }
    });
    let backoff = Backoff429::builder()
        .name("kinds")
        .retry_transient()
        .base_delay(Duration::from_secs(1))
        .max_delay(Duration::from_secs(10))
        .deadline(Duration::from_secs(2))
        .jitter(tower_quota::backoff::Jitter::None)
        .on_event(seen.listener())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(backoff.clone()).service(api);
    for (path, status) in [("/transient", 200), ("/long", 429), ("/deadline", 429)] {
        let request = Request::get(path).body(String::new()).unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
    }
    let c = backoff.counters();
    assert_eq!(c.retries_transient, 1, "{c:?}");
    assert_eq!(
        c.server_asks_too_long, 1,
        "Retry-After: 100, past the 10 s maximum"
    );
    assert_eq!(c.past_deadline, 1, "Retry-After: 5, past the 2 s deadline");
    assert_eq!(
        c.retries_rate + c.retries_concurrency + c.no_retries_left,
        0
    );
    assert_eq!(
        seen.count("Retry { layer: \"kinds\", attempt: 2, kind: Transient"),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn in_flight_mode_and_a_plan_without_jobs_are_counted_too() {
    let seen = Seen::default();
    let plan = ConcurrencyLimitByPlan::custom(1)
        .job_route("POST /jobs")
        .in_flight()
        .on_event(seen.listener())
        .build()
        .unwrap();
    plan.set_plan(Plan::Enterprise(0)).unwrap_err();
    // In-flight mode: the slot is the request's, given back with its answer.
    let api = service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(body("{}")))
    });
    let svc = ServiceBuilder::new().layer(plan.clone()).service(api);
    let response = svc
        .oneshot(Request::post("/jobs").body(body("")).unwrap())
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    let c = plan.snapshot().counters;
    assert_eq!((c.taken, c.freed.answered), (1, 1), "{c:?}");
    assert_eq!(seen.count("SlotFreed { layer: \"plan\", by: Answered }"), 1);

    // A plan allowing no job fails each create at once.
    let none = ConcurrencyLimitByPlan::new(Plan::Enterprise(0));
    let api = service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(body("{}")))
    });
    let svc = ServiceBuilder::new().layer(none.clone()).service(api);
    let create = Request::post("/v2/generate").body(body("")).unwrap();
    svc.oneshot(create).await.unwrap_err();
    let c = none.snapshot().counters;
    assert_eq!((c.refused.no_slots, c.taken), (1, 0), "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn a_leaked_slot_is_counted_when_its_lease_runs_out_not_once_the_plan_is_full() {
    let seen = Seen::default();
    let plan = ConcurrencyLimitByPlan::builder(Plan::Growth)
        .max_job_life(Duration::from_secs(600))
        .on_event(seen.listener())
        .build()
        .unwrap();
    let jobs = Jobs::default();
    let api = service_fn(move |req: Request<Full<Bytes>>| {
        let response = jobs.answer(req);
        async move { Ok::<_, Infallible>(response) }
    });
    let svc = ServiceBuilder::new().layer(plan.clone()).service(api);
    let create = || Request::post("/v2/generate").body(body("{}")).unwrap();
    let response = svc.clone().oneshot(create()).await.unwrap();
    response.into_body().collect().await.unwrap();
    // job-1 is never seen to end. Five of six slots are still free when its lease runs out.
    tokio::time::sleep(Duration::from_secs(601)).await;
    let response = svc.clone().oneshot(create()).await.unwrap();
    response.into_body().collect().await.unwrap();
    // Seen by the create itself (no snapshot was taken).
    assert_eq!(
        seen.count("SlotFreed { layer: \"plan\", by: LeaseExpired }"),
        1
    );
    assert_eq!(plan.in_use(), 1);
    let c = plan.snapshot().counters;
    assert_eq!(c.freed.lease_expired, 1, "{c:?}");

    // A snapshot does not show a hold whose lease ran out either.
    tokio::time::sleep(Duration::from_secs(601)).await;
    assert_eq!(plan.snapshot().in_use, 0);
    assert_eq!(plan.snapshot().counters.freed.lease_expired, 2);
}

#[cfg(feature = "metrics")]
mod recorded {
    //! The same scenarios through the `metrics` facade: each counter the recorder holds is
    //! the snapshot's, each gauge and histogram moves with its event.

    use std::collections::HashMap;
    use std::future::Future;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::MetricKind;

    use super::*;

    /// What the recorder holds after `scenario` ran on a paused clock, with this thread's
    /// recorder: (kind, name, sorted labels) to value.
    type Recorded = HashMap<(MetricKind, String, Vec<(String, String)>), DebugValue>;

    fn recorded<T, F: Future<Output = T>>(scenario: impl FnOnce() -> F) -> (T, Recorded) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let out = metrics::with_local_recorder(&recorder, || runtime.block_on(scenario()));
        let recorded = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (kind, key) = key.into_parts();
                let (name, labels) = key.into_parts();
                let mut labels: Vec<_> = labels
                    .into_iter()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                ((kind, name.as_str().to_owned(), labels), value)
            })
            .collect();
        (out, recorded)
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut labels: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        labels
    }

    fn counter(recorded: &Recorded, name: &str, pairs: &[(&str, &str)]) -> u64 {
        match recorded.get(&(MetricKind::Counter, name.to_owned(), labels(pairs))) {
            Some(DebugValue::Counter(n)) => *n,
            _ => panic!("no counter {name} {pairs:?}"),
        }
    }

    fn gauge(recorded: &Recorded, name: &str, pairs: &[(&str, &str)]) -> f64 {
        match recorded.get(&(MetricKind::Gauge, name.to_owned(), labels(pairs))) {
            Some(DebugValue::Gauge(value)) => value.0,
            _ => panic!("no gauge {name} {pairs:?}"),
        }
    }

    fn histogram(recorded: &Recorded, name: &str, pairs: &[(&str, &str)]) -> Vec<f64> {
        match recorded.get(&(MetricKind::Histogram, name.to_owned(), labels(pairs))) {
            Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.0).collect(),
            _ => panic!("no histogram {name} {pairs:?}"),
        }
    }

    #[test]
    fn client_mode_metrics_are_the_snapshots_counters() {
        let seen = Seen::default();
        let (limits, m) = recorded(|| async { client_scenario(&seen).await });
        for route in limits.snapshot() {
            let at = [("layer", "api"), ("route", &*route.route)];
            let c = route.counters;
            let count = |name| counter(&m, name, &at);
            assert_eq!(count("tower_quota_requests_admitted_total"), c.admitted);
            assert_eq!(count("tower_quota_requests_waited_total"), c.waited);
            assert_eq!(count("tower_quota_requests_gave_up_total"), c.gave_up);
            assert_eq!(count("tower_quota_requests_abandoned_total"), c.abandoned);
            for (reason, n) in [
                ("queue_full", c.refused.queue_full),
                ("wait_too_long", c.refused.wait_too_long),
            ] {
                let at = [at[0], at[1], ("reason", reason)];
                assert_eq!(counter(&m, "tower_quota_requests_refused_total", &at), n);
            }
            for (from, n) in [("429", c.learnt_429), ("headers", c.learnt_headers)] {
                let at = [at[0], at[1], ("from", from)];
                assert_eq!(counter(&m, "tower_quota_learnt_total", &at), n);
            }
            let waits = histogram(&m, "tower_quota_wait_seconds", &at);
            assert_eq!(waits.len() as u64, c.admitted, "one per admission");
            let total: f64 = waits.iter().sum();
            assert_eq!(total, c.wait_time.as_secs_f64());
        }
        let generate = [("layer", "api"), ("route", "POST /v2/generate")];
        assert_eq!(
            counter(&m, "tower_quota_requests_admitted_total", &generate),
            4
        );
        // The last event of the route: the one that gave up left an empty queue.
        assert_eq!(gauge(&m, "tower_quota_queue_depth", &generate), 0.0);
        let default = [("layer", "api"), ("route", "default")];
        assert_eq!(
            gauge(&m, "tower_quota_in_flight", &default),
            1.0,
            "the abandoned request is held"
        );
    }

    #[test]
    fn server_mode_metrics_count_refusals_and_forgotten_keys() {
        let seen = Seen::default();
        let (limits, m) = recorded(|| async { server_scenario(&seen) });
        let route = &limits.snapshot()[0];
        let at = [("layer", "edge"), ("route", "GET /v1/items")];
        assert_eq!(counter(&m, "tower_quota_requests_admitted_total", &at), 101);
        for (reason, n) in [("quota", 1), ("missing_key", 1), ("no_peer_address", 0)] {
            let at = [at[0], at[1], ("reason", reason)];
            assert_eq!(counter(&m, "tower_quota_requests_refused_total", &at), n);
        }
        assert_eq!(
            counter(&m, "tower_quota_keys_forgotten_total", &at),
            route.counters.keys_forgotten
        );
        assert!(route.counters.keys_forgotten >= 85);
        assert_eq!(
            gauge(&m, "tower_quota_tracked_keys", &at),
            route.tracked_keys as f64
        );
        let none = (
            MetricKind::Histogram,
            "tower_quota_wait_seconds".to_owned(),
            labels(&at),
        );
        let waits = match m.get(&none) {
            Some(DebugValue::Histogram(values)) => values.len(),
            _ => 0,
        };
        assert_eq!(waits, 0, "a server does not wait");
    }

    #[test]
    fn plan_metrics_count_slots_jobs_and_what_freed_them() {
        let seen = Seen::default();
        let (plan, m) = recorded(|| async { plan_scenario(&seen).await });
        let c = plan.snapshot().counters;
        let at = [("layer", "jobs")];
        assert_eq!(
            counter(&m, "tower_quota_plan_slots_taken_total", &at),
            c.taken
        );
        assert_eq!(counter(&m, "tower_quota_plan_waited_total", &at), 1);
        assert_eq!(counter(&m, "tower_quota_plan_gave_up_total", &at), 1);
        assert_eq!(counter(&m, "tower_quota_jobs_bound_total", &at), 5);
        let refused = [("layer", "jobs"), ("reason", "queue_full")];
        assert_eq!(counter(&m, "tower_quota_plan_refused_total", &refused), 1);
        for (by, n) in [
            ("completed", 2),
            ("status", 1),
            ("reconciled", 1),
            ("lease_expired", 1),
            ("create_failed", 1),
            ("abandoned", 0),
        ] {
            let at = [("layer", "jobs"), ("by", by)];
            assert_eq!(
                counter(&m, "tower_quota_plan_slots_freed_total", &at),
                n,
                "{by}"
            );
        }
        let waits = histogram(&m, "tower_quota_plan_wait_seconds", &at);
        assert_eq!(
            waits.iter().filter(|&&w| w > 0.0).collect::<Vec<_>>(),
            [&5.0]
        );
        assert_eq!(gauge(&m, "tower_quota_plan_slots_held", &at), 0.0);
        assert_eq!(gauge(&m, "tower_quota_plan_slots_limit", &at), 1.0);
    }

    #[test]
    fn backoff_metrics_count_retries_by_kind_and_their_waits() {
        let seen = Seen::default();
        let (_, m) = recorded(|| async { backoff_scenario(&seen).await });
        let rate = [("layer", "retry"), ("kind", "rate")];
        assert_eq!(counter(&m, "tower_quota_retries_total", &rate), 2);
        let waits = histogram(&m, "tower_quota_backoff_seconds", &[("layer", "retry")]);
        assert_eq!(waits, [1.0, 2.0]);
        let left = [("layer", "retry"), ("why", "no_retries_left")];
        assert_eq!(counter(&m, "tower_quota_retries_refused_total", &left), 1);
        let spent = [("layer", "thrifty"), ("why", "budget_spent")];
        assert_eq!(counter(&m, "tower_quota_retries_refused_total", &spent), 1);
    }

    #[test]
    fn gauges_follow_set_plan_and_learnt_routes_sharing_a_quota() {
        let (_, m) = recorded(|| async {
            let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
                .name("upgraded")
                .build()
                .unwrap();
            plan.set_plan(Plan::Scale).unwrap();

            // Two learnt routes whose responses name one quota: both count in the state of
            // the first, whose gauges show them; every gauge is back at 0 once all answered.
            let limits = RateLimitByRoute::builder()
                .name("learnt")
                .learn_route("GET /a")
                .learn_route("GET /b")
                .build()
                .unwrap();
            let api = service_fn(|_: Request<()>| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut response = Response::new(());
                let h = response.headers_mut();
                h.insert("ratelimit-policy", r#""core";q=100"#.parse().unwrap());
                h.insert("ratelimit", r#""core";r=90;t=60"#.parse().unwrap());
                Ok::<_, Infallible>(response)
            });
            let svc = ServiceBuilder::new().layer(limits.clone()).service(api);
            let get = |path: &str| Request::get(path).body(()).unwrap();
            svc.clone().oneshot(get("/a")).await.unwrap();
            svc.clone().oneshot(get("/b")).await.unwrap();
            let both = futures::future::join(
                svc.clone().oneshot(get("/a")),
                svc.clone().oneshot(get("/b")),
            );
            let (a, b) = both.await;
            a.unwrap();
            b.unwrap();
            assert_eq!(limits.snapshot()[1].counted_in.as_deref(), Some("GET /a"));
        });
        assert_eq!(
            gauge(&m, "tower_quota_plan_slots_limit", &[("layer", "upgraded")]),
            15.0,
            "Scale"
        );
        for route in ["GET /a", "GET /b"] {
            let at = [("layer", "learnt"), ("route", route)];
            assert_eq!(gauge(&m, "tower_quota_in_flight", &at), 0.0, "{route}");
        }
    }
}
