//! Learnt quotas that the server names, shared by the routes that name them, under a hostile
//! or odd server: requests in flight where a route counted before, renamed quotas, statements
//! that cannot be placed, quotas set at run time, moves between queues, hostile names.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tokio::time::{sleep, Instant};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::{BoxError, Quota, RateLimitByRoute};

type Log = Arc<Mutex<Vec<(Duration, String)>>>;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A fake API stating whatever each request asks for: `x-name` (policy name; absent: an
/// unnamed x-ratelimit statement with nothing left for 30 s), `x-r` (remaining, default 5),
/// `x-t` (reset, default 60), `x-q` (limit, default 10), `x-w` (window, optional), `x-delay`
/// (seconds before the answer, default 1).
fn naming_api(
    start: Instant,
) -> (
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
    Log,
) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let svc = service_fn(move |req: Request<()>| {
        let log = seen.clone();
        async move {
            let field = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            log.lock()
                .unwrap()
                .push((start.elapsed(), field("x-id").unwrap()));
            let delay: f64 = field("x-delay").map_or(1.0, |d| d.parse().unwrap());
            let mut response = Response::new(());
            let headers = response.headers_mut();
            if let Some(name) = field("x-name") {
                let r = field("x-r").unwrap_or_else(|| "5".into());
                let t = field("x-t").unwrap_or_else(|| "60".into());
                let q = field("x-q").unwrap_or_else(|| "10".into());
                let w = field("x-w").map_or(String::new(), |w| format!(";w={w}"));
                let policy = format!(r#""{name}";q={q}{w}"#);
                headers.insert("ratelimit-policy", policy.parse().unwrap());
                let value = format!(r#""{name}";r={r};t={t}"#);
                headers.insert("ratelimit", value.parse().unwrap());
            } else {
                headers.insert("x-ratelimit-limit", "5".parse().unwrap());
                headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
                headers.insert("x-ratelimit-reset", "30".parse().unwrap());
            }
            sleep(secs(delay)).await;
            Ok::<_, Infallible>(response)
        }
    });
    (svc, log)
}

fn ask(path: &str, id: &str, fields: &[(&str, &str)]) -> Request<()> {
    let mut r = Request::builder()
        .method(Method::GET)
        .uri(format!("http://api.test{path}"))
        .body(())
        .unwrap();
    r.headers_mut().insert("x-id", id.parse().unwrap());
    for (k, v) in fields {
        r.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

fn at(log: &Log, id: &str) -> Duration {
    log.lock()
        .unwrap()
        .iter()
        .find(|(_, i)| i == id)
        .unwrap_or_else(|| panic!("{id} never sent"))
        .0
}

/// A server with one quota, `x`: `limit` requests per fixed window of `window` s from
/// `start`, counted when a request arrives; every answer states truthfully what was left
/// when it was counted, named `x`, and comes `x-delay` s later. Refusals are counted.
fn counting_api(
    start: Instant,
    limit: u64,
    window: u64,
) -> (
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    let refused = Arc::new(AtomicUsize::new(0));
    let counts = Arc::new(Mutex::new((u64::MAX, 0u64)));
    let seen = refused.clone();
    let svc = service_fn(move |req: Request<()>| {
        let (refused, counts) = (seen.clone(), counts.clone());
        async move {
            let elapsed = start.elapsed().as_secs_f64();
            let this = (elapsed / window as f64) as u64;
            let reset = ((this + 1) * window) as f64 - elapsed;
            let (status, left) = {
                let mut c = counts.lock().unwrap();
                if c.0 != this {
                    *c = (this, 0);
                }
                if c.1 >= limit {
                    refused.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::TOO_MANY_REQUESTS, 0)
                } else {
                    c.1 += 1;
                    (StatusCode::OK, limit - c.1)
                }
            };
            let mut response = Response::new(());
            *response.status_mut() = status;
            let h = response.headers_mut();
            let policy = format!(r#""x";q={limit};w={window}"#);
            h.insert("ratelimit-policy", policy.parse().unwrap());
            let value = format!(r#""x";r={left};t={}"#, reset.ceil() as u64);
            h.insert("ratelimit", value.parse().unwrap());
            let delay: f64 = req
                .headers()
                .get("x-delay")
                .map_or(1.0, |d| d.to_str().unwrap().parse().unwrap());
            sleep(secs(delay)).await;
            Ok::<_, Infallible>(response)
        }
    });
    (svc, refused)
}

/// Requests on `/a` and `/b` against one server quota of 3 per 100 s, every statement true:
/// `/b`'s second request is still in flight (counted at `/b`'s old state) when `/b` starts
/// counting in `/a`'s state, which takes no account of it.
async fn one_quota_two_paths(limits: RateLimitByRoute) -> usize {
    let start = Instant::now();
    let (api, refused) = counting_api(start, 3, 100);
    let svc = limits.layer(api);
    let send = |path: &str, delay: &str| {
        let svc = svc.clone();
        let request = ask(path, "-", &[("x-delay", delay)]);
        tokio::spawn(async move { svc.oneshot(request).await.unwrap() })
    };
    send("/a", "1").await.unwrap(); // t=1: 2 left of x
    let b1 = send("/b", "1"); // counted: 1 left, answered at t=2
    let b2 = send("/b", "5"); // counted: 0 left, answered at t=6
    sleep(secs(1.5)).await;
    // t=2.5: /b's answer said "x, 1 left" (true when it was counted).
    let a2 = send("/a", "1");
    for call in [b1, b2, a2] {
        call.await.unwrap();
    }
    refused.load(Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn requests_in_flight_where_a_route_counted_before_count_in_the_quota_it_moves_to() {
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .build()
        .unwrap();
    assert_eq!(
        one_quota_two_paths(limits).await,
        0,
        "429s though every statement was true"
    );
}

#[tokio::test(start_paused = true)]
async fn one_learnt_route_for_both_paths_gets_no_429() {
    // Control: the same traffic through one learnt route subtracts /b's request in flight.
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /{p}")
        .build()
        .unwrap();
    assert_eq!(one_quota_two_paths(limits).await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_route_renamed_by_the_server_stays_behind_the_quota_it_counts_in() {
    let start = Instant::now();
    let (api, log) = naming_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let send = |request| {
        let svc = svc.clone();
        tokio::spawn(async move { svc.oneshot(request).await.unwrap() })
    };
    send(ask("/a", "a1", &[("x-name", "x"), ("x-r", "5")]))
        .await
        .unwrap();
    send(ask("/b", "b1", &[("x-name", "x"), ("x-r", "4")]))
        .await
        .unwrap();
    assert_eq!(limits.snapshot()[1].counted_in.as_deref(), Some("GET /a"));
    // t=2: /b's slow request, whose answer (t=12) names a new quota `y` with 9 left.
    let b2 = send(ask(
        "/b",
        "b2",
        &[("x-name", "y"), ("x-r", "9"), ("x-delay", "10")],
    ));
    tokio::task::yield_now().await;
    // `x` is spent until t=63.
    send(ask("/a", "a2", &[("x-name", "x"), ("x-r", "0")]))
        .await
        .unwrap();
    let a3 = send(ask("/a", "a3", &[("x-name", "x")]));
    tokio::task::yield_now().await;
    let b3 = send(ask("/b", "b3", &[("x-name", "y")]));
    tokio::task::yield_now().await;
    assert_eq!(
        limits.snapshot()[0].waiters,
        2,
        "a3 then b3 wait in x's queue"
    );
    b2.await.unwrap();
    // `y` cannot move /b out of `x`, where its request b2 was counted: it stays there, and
    // `y`'s 9 left loosen nothing.
    assert_eq!(limits.snapshot()[1].counted_in.as_deref(), Some("GET /a"));
    let b4 = send(ask("/b", "b4", &[("x-name", "y")]));
    for call in [a3, b3, b4] {
        call.await.unwrap();
    }
    let (a3, b3, b4) = (at(&log, "a3"), at(&log, "b3"), at(&log, "b4"));
    assert!(a3 >= secs(62.0), "x is spent until its reset: a3 at {a3:?}");
    assert!(
        a3 <= b3 && b3 <= b4,
        "first come, first served: {a3:?}, {b3:?}, {b4:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_route_keeps_the_quota_it_was_first_placed_under() {
    let start = Instant::now();
    let (api, _log) = naming_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .learn_route("GET /c")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let call = |path: &str, name: &str| svc.clone().oneshot(ask(path, "-", &[("x-name", name)]));
    call("/a", "x").await.unwrap(); // /a holds x
    call("/b", "y").await.unwrap(); // /b holds y
    call("/c", "y").await.unwrap(); // /c counts in /b's state
    call("/b", "x").await.unwrap(); // renamed: it stays where it counts
    let s = limits.snapshot();
    let flipped = (s[1].counted_in.clone(), s[2].counted_in.clone());
    call("/b", "y").await.unwrap(); // and back again
    let back = limits.snapshot()[1].counted_in.clone();
    assert_eq!(
        (flipped.0.as_deref(), back.as_deref()),
        (None, None),
        "docs: a route keeps the first quota it shares (saw {flipped:?}, then {back:?})"
    );
}

#[tokio::test(start_paused = true)]
async fn a_statement_about_another_quota_never_loosens_a_shared_one() {
    let start = Instant::now();
    let (api, log) = naming_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let call = |request| svc.clone().oneshot(request);
    call(ask("/a", "a1", &[("x-name", "x"), ("x-r", "2")]))
        .await
        .unwrap();
    // x: 1 left until t≈62, and /b counts in it.
    call(ask("/b", "b1", &[("x-name", "x"), ("x-r", "1")]))
        .await
        .unwrap();
    // /a (a broad route) hits an endpoint of another quota `z`: /a's state holds `x`, so the
    // statement cannot be placed, and may only tighten x's bound, never replace it.
    call(ask(
        "/a",
        "a2",
        &[("x-name", "z"), ("x-r", "50"), ("x-t", "10")],
    ))
    .await
    .unwrap();
    let early = three_at_once(&svc, &log, start, "0").await;
    assert!(
        early <= 1,
        "x said 1 left, yet {early} of /b's requests went at once"
    );
}

#[tokio::test(start_paused = true)]
async fn set_quota_on_a_route_that_counts_elsewhere_is_refused() {
    let start = Instant::now();
    let (api, log) = naming_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let call = |request| svc.clone().oneshot(request);
    call(ask(
        "/a",
        "a1",
        &[("x-name", "x"), ("x-r", "100"), ("x-q", "200")],
    ))
    .await
    .unwrap();
    call(ask(
        "/b",
        "b1",
        &[("x-name", "x"), ("x-r", "99"), ("x-q", "200")],
    ))
    .await
    .unwrap();
    // /b counts in /a's state: a quota set on /b would bound nothing, so it is refused ...
    let error = limits
        .set_quota("GET /b", Quota::new(1, Duration::from_secs(60)))
        .unwrap_err();
    assert!(error.to_string().contains("counted_in"), "{error}");
    // ... and one set on /a bounds both.
    limits
        .set_quota("GET /a", Quota::new(1, Duration::from_secs(60)))
        .unwrap();
    let early = three_at_once(&svc, &log, start, "90").await;
    assert!(
        early <= 1,
        "1 per minute set on /a, yet {early} of /b's went at once"
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_move_in_order_when_the_head_is_dropped_during_the_move() {
    let start = Instant::now();
    let (api, log) = naming_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let send = |request| {
        let svc = svc.clone();
        tokio::spawn(async move { svc.oneshot(request).await.unwrap() })
    };
    send(ask("/a", "a1", &[("x-name", "q"), ("x-r", "8")]))
        .await
        .unwrap();
    let b1 = send(ask("/b", "b1", &[]));
    let b2 = send(ask(
        "/b",
        "b2",
        &[("x-name", "q"), ("x-r", "7"), ("x-delay", "3")],
    ));
    b1.await.unwrap(); // /b closed for 30 s
    let waiting: Vec<_> = (3..7)
        .map(|i| {
            let id = format!("b{i}");
            send(ask("/b", &id, &[("x-name", "q"), ("x-r", "6")]))
        })
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(limits.snapshot()[1].waiters, 4);
    // Cancel the head (b3) at the instant b2's answer moves the queue.
    sleep(secs(1.999_999)).await;
    waiting[0].abort();
    b2.await.unwrap();
    let moved = start.elapsed();
    for w in waiting.into_iter().skip(1) {
        w.await.unwrap();
    }
    for id in ["b4", "b5", "b6"] {
        assert_eq!(at(&log, id), moved, "{id} moved and went at once");
    }
    let s = limits.snapshot();
    assert_eq!((s[0].waiters, s[1].waiters), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_learnt_route_shares_with_the_learnt_default() {
    let start = Instant::now();
    let (api, _log) = naming_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_quota()
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let call = |path: &str| svc.clone().oneshot(ask(path, "-", &[("x-name", "core")]));
    call("/elsewhere").await.unwrap();
    call("/a").await.unwrap();
    let s = limits.snapshot();
    assert_eq!(s[0].counted_in.as_deref(), Some("default"));
    assert_eq!(s[1].counted_in, None);
}

#[tokio::test(start_paused = true)]
async fn hostile_names_and_windows() {
    let start = Instant::now();
    let (api, _log) = naming_api(start);
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /a")
        .learn_route("GET /b")
        .build()
        .unwrap();
    let svc = limits.layer(api);
    let huge = "n".repeat(16 * 1024);
    // A new name on every answer, huge names, windows of 0 and of 10^15 s.
    for i in 0..300 {
        let name = if i % 50 == 0 {
            huge.clone()
        } else {
            format!("n{i}")
        };
        let w = ["0", "999999999999999", "60"][i % 3];
        let path = ["/a", "/b"][i % 2];
        let r = ask(path, "-", &[("x-name", &name), ("x-w", w), ("x-r", "1000")]);
        svc.clone().oneshot(r).await.unwrap();
    }
    let s = limits.snapshot();
    assert_eq!(
        (s[0].counted_in.clone(), s[1].counted_in.clone()),
        (None, None)
    );
}

#[test]
fn route_count_limit() {
    let mut b = RateLimitByRoute::builder();
    for i in 0..65_535 {
        b = b.learn_route(format!("GET /r{i}"));
    }
    assert!(b.build().is_err(), "65,535 routes refused");
    let mut b = RateLimitByRoute::builder().learn_quota();
    for i in 0..65_534 {
        b = b.learn_route(format!("GET /r{i}"));
    }
    let limits = b.build().expect("65,534 routes and the default");
    assert_eq!(limits.snapshot().len(), 65_535);
}

#[tokio::test(start_paused = true)]
async fn last_of_65535_routes_shares_without_panic() {
    let start = Instant::now();
    let (api, _log) = naming_api(start);
    let mut b = RateLimitByRoute::builder().learn_quota();
    for i in 0..65_534 {
        b = b.learn_route(format!("GET /r{i}"));
    }
    let limits = b.build().unwrap();
    let svc = limits.layer(api);
    let call = |path: &str| svc.clone().oneshot(ask(path, "-", &[("x-name", "x")]));
    call("/zzz").await.unwrap(); // the default (index 65,534) holds x
    call("/r65533").await.unwrap();
    call("/r0").await.unwrap();
    let s = limits.snapshot();
    assert_eq!(s[65_533].counted_in.as_deref(), Some("default"));
    assert_eq!(s[0].counted_in.as_deref(), Some("default"));
}

/// Sends three requests on `/b` at once, each stating `left` of `x`; how many went within a
/// second.
async fn three_at_once<S>(svc: &S, log: &Log, start: Instant, left: &str) -> usize
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let sent = start.elapsed();
    let calls: Vec<_> = (2..5)
        .map(|i| {
            let svc = svc.clone();
            let r = ask("/b", &format!("b{i}"), &[("x-name", "x"), ("x-r", left)]);
            tokio::spawn(async move { svc.oneshot(r).await.unwrap() })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    ["b2", "b3", "b4"]
        .iter()
        .filter(|id| at(log, id) <= sent + secs(1.0))
        .count()
}
