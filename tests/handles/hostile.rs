//! Hostile input and odd use of the handles, the middlewares and the config: no panic, no
//! hang, nothing leaked, and the layers' own rules whichever way a request comes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

fn head(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, *value);
    }
    response.body(()).unwrap().into_parts().0
}

fn is_send<T: Send>(_: &T) {}

#[tokio::test(start_paused = true)]
async fn permits_and_acquire_futures_are_send() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .build()
        .unwrap();
    let fut = limits.acquire(&Method::POST, "/v2/generate");
    is_send(&fut);
    let permit = fut.await.unwrap();
    is_send(&permit);
    let h = head(200, &[]);
    let fin = permit.finish(&h);
    is_send(&fin);
    fin.await;
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let fut = plan.acquire::<Full<bytes::Bytes>>(&Method::POST, "/v2/generate");
    is_send(&fut);
    let permit = fut.await.unwrap();
    is_send(&permit);
    // Spawnable.
    let l2 = limits.clone();
    tokio::spawn(async move { l2.acquire(&Method::GET, "/x").await.map(drop) })
        .await
        .unwrap()
        .unwrap();
}

/// Many waiters, a tiny quota: FIFO, never more than the quota in any window, and a waiter
/// dropped in the middle leaves no trace.
#[tokio::test(start_paused = true)]
async fn many_acquires_tiny_quota_fifo_and_never_over() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(2))
        .build()
        .unwrap();
    let admitted = Arc::new(Mutex::new(Vec::<(usize, Instant)>::new()));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (limits, admitted) = (limits.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
            admitted.lock().unwrap().push((i, Instant::now()));
            tokio::time::sleep(Duration::from_millis(100)).await;
            permit.finish(&head(200, &[])).await;
        }));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(limits.snapshot()[0].waiters, 8);
    // Drop waiter #5 in the middle.
    tasks[5].abort();
    let _ = (&mut tasks[5]).await;
    assert_eq!(limits.snapshot()[0].waiters, 7);
    for (i, t) in tasks.into_iter().enumerate() {
        if i != 5 {
            t.await.unwrap();
        }
    }
    let admitted = admitted.lock().unwrap().clone();
    let order: Vec<usize> = admitted.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, [0, 1, 2, 3, 4, 6, 7, 8, 9], "FIFO");
    for (i, (_, first)) in admitted.iter().enumerate() {
        let n = admitted[i..]
            .iter()
            .filter(|(_, t)| t.duration_since(*first) < Duration::from_secs(60))
            .count();
        assert!(n <= 2, "{n} within a minute: {admitted:?}");
    }
    let s = &limits.snapshot()[0];
    assert_eq!((s.in_flight, s.waiters, s.abandoned), (0, 0, 0));
}

/// `finish` polled once then dropped: nothing stays in flight for ever.
#[tokio::test(start_paused = true)]
async fn finish_dropped_midway() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(10))
        .abandoned_hold(Duration::from_secs(5))
        .build()
        .unwrap();
    let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let h = head(200, &[]);
    let mut fin = Box::pin(permit.finish(&h));
    let _ = futures::poll!(fin.as_mut());
    drop(fin);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = &limits.snapshot()[0];
    assert_eq!((s.in_flight, s.abandoned, s.waiters), (0, 0, 0), "{s:?}");

    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let permit = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let mut fin = Box::pin(
        permit.finish(Response::new(Full::new(bytes::Bytes::from_static(
            br#"{"id":"gen_1","status":"PENDING"}"#,
        )))),
    );
    let polled = futures::poll!(fin.as_mut());
    assert!(polled.is_ready(), "finish answers at once");
}

/// The slot a dropped waiter was about to be given goes to the next one.
#[tokio::test(start_paused = true)]
async fn plan_waiter_dropped_after_being_woken_passes_the_slot_on() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let first = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let response = first
        .finish(Response::new(Full::new(bytes::Bytes::from_static(
            br#"{"id":"gen_1","status":"PENDING"}"#,
        ))))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    let mut second = Box::pin(plan.acquire::<Full<bytes::Bytes>>(&Method::POST, "/v2/generate"));
    assert!(futures::poll!(second.as_mut()).is_pending());
    let third = tokio::spawn({
        let plan = plan.clone();
        async move {
            plan.acquire::<Full<bytes::Bytes>>(&Method::POST, "/v2/generate")
                .await
                .map(drop)
        }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(plan.queue_len(), 2);
    assert!(plan.complete("gen_1"));
    // The second was woken, never polled again: dropped.
    drop(second);
    tokio::time::timeout(Duration::from_secs(1), third)
        .await
        .expect("the third gets the slot")
        .unwrap()
        .unwrap();
    assert_eq!(plan.queue_len(), 0);
    // The third's permit was dropped unfinished: held as unknown (documented).
    assert_eq!(plan.in_use(), 1);
}

/// A plan acquire dropped while waiting leaves the queue; a full plan with many waiters is
/// FIFO and never over its limit.
#[tokio::test(start_paused = true)]
async fn plan_many_waiters_fifo_never_over() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator); // 3
    let order = Arc::new(Mutex::new(Vec::new()));
    let peak = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (plan, order, peak) = (plan.clone(), order.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            let permit = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
            order.lock().unwrap().push(i);
            {
                let mut p = peak.lock().unwrap();
                *p = (*p).max(plan.in_use());
            }
            let body = format!(r#"{{"id":"gen_{i}","status":"PENDING"}}"#);
            let response = permit
                .finish(Response::new(Full::new(bytes::Bytes::from(body))))
                .await
                .unwrap();
            response.into_body().collect().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(plan.complete(&format!("gen_{i}")));
        }));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(plan.queue_len(), 9);
    tasks[7].abort();
    let _ = (&mut tasks[7]).await;
    assert_eq!(plan.queue_len(), 8);
    for (i, t) in tasks.into_iter().enumerate() {
        if i != 7 {
            t.await.unwrap();
        }
    }
    assert_eq!(*peak.lock().unwrap(), 3);
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]);
    assert_eq!((plan.in_use(), plan.queue_len()), (0, 0));
}

/// Create outcomes through a plan permit.
#[tokio::test(start_paused = true)]
async fn plan_create_outcomes() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let body = |s: &'static str| Full::new(bytes::Bytes::from_static(s.as_bytes()));
    // 429: nothing created, slot back.
    let p = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let r = p
        .finish(Response::builder().status(429).body(body("{}")).unwrap())
        .await
        .unwrap();
    r.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 0, "429 frees");
    // 500: unknown outcome, held.
    let p = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let r = p
        .finish(Response::builder().status(500).body(body("{}")).unwrap())
        .await
        .unwrap();
    r.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 1, "a 500 leaves the outcome unknown: held");
    // 200, not JSON.
    let p = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let r = p
        .finish(Response::new(body("not json at all")))
        .await
        .unwrap();
    r.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 2, "a 2xx without an id: held");
    // 200, body dropped unread.
    let p = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let r = p
        .finish(Response::new(body(r#"{"id":"gen_x","status":"PENDING"}"#)))
        .await
        .unwrap();
    drop(r);
    assert_eq!(
        plan.in_use(),
        3,
        "a body dropped before it showed the id: held"
    );
    // A hostile status body: huge garbage, unicode ids.
    let p = plan
        .acquire(&Method::GET, "/v2/generate/%F0%9F%98%80")
        .await
        .unwrap();
    let big = "x".repeat(10 << 20);
    let r = p
        .finish(Response::new(Full::new(bytes::Bytes::from(big))))
        .await
        .unwrap();
    r.into_body().collect().await.unwrap();
    assert_eq!(plan.snapshot().unknown, 3);
}

/// Hostile paths: no panic; what each maps to.
#[tokio::test(start_paused = true)]
async fn hostile_paths() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1000))
        .build()
        .unwrap();
    let plan = ConcurrencyLimitByPlan::new(Plan::Scale);
    let long = format!("/{}", "a".repeat(70_000));
    let long_unicode = format!("/{}", "é".repeat(20_000));
    let paths: Vec<&str> = vec![
        "",
        "*",
        "/",
        "//",
        "///",
        "//v2/generate",
        "//evil.com/v2/generate",
        "/v2//generate",
        "/v2/generate/",
        "/v2/generate?",
        "/v2/generate#frag",
        "/v2/generate%2F",
        "/v2/%67enerate",
        "/v2/generate\0",
        "/\0",
        "/%",
        "/%zz",
        "/%00",
        "http://x/y",
        "https://api.sync.so/v2/generate",
        "/v2/generate\r\nx-evil: 1",
        "/v2/generate\n",
        "/ space",
        "/😀",
        "/\u{202e}",
        "/v2/generate?a=é&b=😀",
        "/?",
        "/??",
        "/#",
        "/v2/generate\\..\\x",
        "/../../etc/passwd",
        &long,
        &long_unicode,
    ];
    for path in paths {
        let before = limits.snapshot()[0].remaining;
        let r = tokio::time::timeout(Duration::from_secs(1), limits.acquire(&Method::POST, path))
            .await
            .expect("acquire did not hang");
        match r {
            Ok(permit) => {
                permit.finish(&head(200, &[])).await;
                assert!(limits.snapshot()[0].remaining + 1 >= before);
            }
            Err(error) => assert!(error.to_string().len() < 300, "a short error: {error}"),
        }
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            plan.acquire::<Full<bytes::Bytes>>(&Method::POST, path),
        )
        .await
        .expect("plan acquire did not hang");
        if let Ok(permit) = r {
            drop(permit);
        }
    }
    // Weird methods.
    for m in ["CONNECT", "X-CUSTOM", "get"] {
        let method = Method::from_bytes(m.as_bytes()).unwrap();
        let r = limits.acquire(&method, "/v2/generate").await;
        if let Ok(p) = r {
            p.finish(&head(200, &[])).await;
        }
    }
}

/// The same 503-then-retry of a create, through the tower layers (no middleware).
#[tokio::test(start_paused = true)]
async fn a_503_create_retried_under_a_one_slot_plan_through_the_layers() {
    use tower::{service_fn, ServiceBuilder, ServiceExt};
    let calls = Arc::new(Mutex::new(0u32));
    let api = service_fn({
        let calls = calls.clone();
        move |_: http::Request<String>| {
            let calls = calls.clone();
            async move {
                let mut n = calls.lock().unwrap();
                *n += 1;
                let (status, body) = if *n == 1 {
                    (503, "unavailable".to_string())
                } else {
                    (200, r#"{"id":"gen_1","status":"PENDING"}"#.to_string())
                };
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(bytes::Bytes::from(body)))
                        .unwrap(),
                )
            }
        }
    });
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let backoff = Backoff429::builder()
        .retry_transient()
        .idempotency_keys()
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(backoff)
        .layer(plan.clone())
        .service(api);
    let request = http::Request::post("/v2/generate")
        .body(String::from("{}"))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(600), svc.oneshot(request)).await;
    let response = r.expect("the retry waited on the slot its own first attempt left held");
    response.unwrap().into_body().collect().await.unwrap();
    assert_eq!(*calls.lock().unwrap(), 2);
    assert_eq!(
        plan.jobs()[0].id,
        "gen_1",
        "the retry's job holds the one slot"
    );
    assert_eq!(plan.snapshot().unknown, 0);
}

/// A rate-limit waiter woken for its turn but dropped before it is polled: the next gets it.
#[tokio::test(start_paused = true)]
async fn rate_waiter_dropped_unpolled_passes_the_turn_on() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .build()
        .unwrap();
    limits
        .acquire(&Method::POST, "/v2/generate")
        .await
        .unwrap()
        .finish(&head(200, &[]))
        .await;
    let mut b = Box::pin(limits.acquire(&Method::POST, "/v2/generate"));
    assert!(futures::poll!(b.as_mut()).is_pending());
    let c = tokio::spawn({
        let limits = limits.clone();
        async move {
            let p = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
            let at = Instant::now();
            p.finish(&head(200, &[])).await;
            at
        }
    });
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(!c.is_finished(), "FIFO: C waits behind B");
    drop(b);
    let at = tokio::time::timeout(Duration::from_secs(1), c)
        .await
        .expect("C goes once B is dropped")
        .unwrap();
    assert!(at.duration_since(start) <= Duration::from_secs(62));
    let s = &limits.snapshot()[0];
    assert_eq!((s.waiters, s.in_flight), (0, 0), "{s:?}");
}

/// In-flight mode through the handle: a dropped permit and a dropped body give the slot back.
#[tokio::test(start_paused = true)]
async fn in_flight_mode_through_the_handle() {
    let plan = ConcurrencyLimitByPlan::custom(1)
        .job_route("POST /jobs")
        .in_flight()
        .build()
        .unwrap();
    let p = plan
        .acquire::<Full<bytes::Bytes>>(&Method::POST, "/jobs")
        .await
        .unwrap();
    drop(p);
    assert_eq!(
        plan.in_use(),
        0,
        "in-flight mode: a dropped request gives its slot back"
    );
    let p = plan
        .acquire::<Full<bytes::Bytes>>(&Method::POST, "/jobs")
        .await
        .unwrap();
    let response = p
        .finish(Response::new(Full::new(bytes::Bytes::new())))
        .await
        .unwrap();
    assert_eq!(plan.in_use(), 1, "held through the body");
    drop(response);
    assert_eq!(plan.in_use(), 0);
}

/// Real threads, many tasks, a small plan: never over the limit, nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_stress() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let inside = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let outer = plan.clone();
    for i in 0..300 {
        let plan = outer.clone();
        let (inside, peak) = (inside.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            let permit = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
            let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            tokio::task::yield_now().await;
            let body = format!(r#"{{"id":"gen_{i}","status":"PENDING"}}"#);
            let response = permit
                .finish(Response::new(Full::new(bytes::Bytes::from(body))))
                .await
                .unwrap();
            response.into_body().collect().await.unwrap();
            inside.fetch_sub(1, Ordering::SeqCst);
            assert!(plan.complete(&format!("gen_{i}")));
        }));
        if i % 7 == 0 {
            // Some give up while waiting.
            let plan = outer.clone();
            tasks.push(tokio::spawn(async move {
                let f = plan.acquire::<Full<bytes::Bytes>>(&Method::POST, "/v2/generate");
                let mut f = Box::pin(f);
                let _ = futures::poll!(f.as_mut());
                tokio::task::yield_now().await;
                drop(f);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 3,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    // A give-up that got its slot at once dropped an unsent-for-all-it-knows permit: held as
    // an unknown outcome, never more than the plan.
    let s = outer.snapshot();
    assert_eq!((s.in_flight, s.queued), (0, 0), "{s:?}");
    assert!(s.in_use <= 3, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_rate_stress() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(500))
        .max_wait(Duration::from_millis(1))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..600 {
        let limits = limits.clone();
        tasks.push(tokio::spawn(async move {
            match limits.acquire(&Method::POST, "/v2/generate").await {
                Ok(p) => {
                    tokio::task::yield_now().await;
                    p.finish(&head(200, &[])).await;
                    true
                }
                Err(_) => false,
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    let s = &limits.snapshot()[0];
    assert_eq!(ok, 500, "{s:?}");
    assert_eq!((s.in_flight, s.waiters, s.remaining), (0, 0, 0), "{s:?}");
}

/// A create that never left the machine (connection refused): its slot and place come back,
/// and a retry of it holds nothing either.
#[cfg(feature = "reqwest-middleware")]
#[tokio::test(start_paused = true)]
async fn connection_refused_create_through_the_middlewares() {
    use reqwest_middleware::ClientBuilder;
    use tower_quota::middleware::{BackoffMiddleware, PlanMiddleware, RateLimitMiddleware};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .build()
        .unwrap();
    let c = ClientBuilder::new(reqwest::Client::new())
        .with(PlanMiddleware::new(plan.clone()))
        .with(RateLimitMiddleware::new(limits.clone()))
        .build();
    let error = c
        .post(format!("http://{addr}/v2/generate"))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error}");
    assert_eq!(plan.in_use(), 0, "a create that never left holds no slot");
    let route = &limits.snapshot()[0];
    assert_eq!((route.in_flight, route.remaining), (0, 1), "nor a place");

    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let backoff = Backoff429::builder()
        .retry_transient()
        .idempotency_keys()
        .build()
        .unwrap();
    let c = ClientBuilder::new(reqwest::Client::new())
        .with(BackoffMiddleware::new(backoff))
        .with(PlanMiddleware::new(plan.clone()))
        .build();
    let sent = c
        .post(format!("http://{addr}/v2/generate"))
        .body("{}")
        .send();
    let error = tokio::time::timeout(Duration::from_secs(7200), sent)
        .await
        .expect("retries of a refused connection end")
        .unwrap_err();
    assert!(error.is_connect(), "{error}");
    assert_eq!(plan.in_use(), 0);
}
