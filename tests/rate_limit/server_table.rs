//! Server mode's bounded key table as an outsider tries it: clients told to come back, forgotten
//! meanwhile; `set_quota` at run time; paths with empty segments, against axum's own routing.

use std::convert::Infallible;
use std::future::ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{now, retry_after};
use crate::keyed::{send, server, KEY};
use axum::routing::post;
use axum::Router;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use tokio::time::advance;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::rate_limit::Reject;
use tower_quota::{Quota, RateLimitByRoute};

const ROUTE: &str = "POST /v2/generate";

fn limits(quota: Quota, max_keys: usize) -> RateLimitByRoute<Reject> {
    RateLimitByRoute::builder()
        .route(ROUTE, quota)
        .reject()
        .key_header(KEY)
        .rate_limit_headers(false)
        .max_keys(max_keys)
        .build()
        .unwrap()
}

// ===== (3) a refused client that comes back when told =====

/// GCRA: a client at its quota, refused with `Retry-After: 900`, comes back after 900 s and
/// is admitted, whether it stayed tracked or was forgotten meanwhile (a few hundred fresh keys
/// through a small table). Before: restored as if its whole burst had been sent at the moment
/// it came back, it was refused again, for another 900 s.
#[tokio::test(start_paused = true)]
async fn a_paced_client_told_to_come_back_is_admitted_then_though_forgotten() {
    let quota = Quota::per_hour(4).with_burst(4);
    for forget in [false, true] {
        let limits = limits(quota, 16);
        let mut server = server(&limits);
        for _ in 0..4 {
            assert_eq!(send(&mut server, "victim").status(), StatusCode::OK);
        }
        let refused = send(&mut server, "victim");
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let told = retry_after(&refused);
        assert_eq!(told, Duration::from_secs(900));
        if forget {
            // One place per shard: any fresh key of the victim's shard displaces it.
            for i in 0..400 {
                advance(Duration::from_millis(100)).await;
                send(&mut server, &format!("passer-by-{i}"));
            }
            advance(told - Duration::from_secs(40)).await;
        } else {
            advance(told).await;
        }
        let back = send(&mut server, "victim");
        let again = back
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        println!(
            "forgotten meanwhile: {forget}; told {told:?}, came back then: {} (Retry-After {again:?})",
            back.status()
        );
        assert_eq!(
            back.status(),
            StatusCode::OK,
            "forgotten meanwhile: {forget}: refused again at the time it was told, Retry-After {again:?}"
        );
    }
}

/// The same at a sliding window, through the same churn: not admitted a second early.
#[tokio::test(start_paused = true)]
async fn a_client_told_to_come_back_is_admitted_then_though_forgotten() {
    let quota = Quota::per_hour(4);
    let limits = limits(quota, 16);
    let mut server = server(&limits);
    for _ in 0..4 {
        assert_eq!(send(&mut server, "victim").status(), StatusCode::OK);
        advance(Duration::from_secs(300)).await;
    }
    let refused = send(&mut server, "victim");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let told = retry_after(&refused);
    for i in 0..400 {
        advance(Duration::from_millis(100)).await;
        send(&mut server, &format!("passer-by-{i}"));
    }
    advance(told - Duration::from_secs(40) - Duration::from_secs(1)).await;
    assert_eq!(
        send(&mut server, "victim").status(),
        StatusCode::TOO_MANY_REQUESTS,
        "admitted before its time"
    );
    advance(Duration::from_secs(1)).await;
    assert_eq!(send(&mut server, "victim").status(), StatusCode::OK);
    assert_eq!(
        send(&mut server, "victim").status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

// ===== (4) set_quota =====

/// A route switched at run time from a sliding window to GCRA keeps what each client has used:
/// a client that sent one request under `per_hour(100)` has nine more at once under
/// `per_second(10)` with a burst of 10. Before: its TAT was set to the end of the old window,
/// and it was refused for about an hour, as was every client seen in the last period.
#[tokio::test(start_paused = true)]
async fn a_quota_changed_from_a_window_to_gcra_keeps_what_a_client_used() {
    let limits = limits(Quota::per_hour(100), 1024);
    let mut server = server(&limits);
    assert_eq!(send(&mut server, "light").status(), StatusCode::OK);
    advance(Duration::from_secs(60)).await;
    limits
        .set_quota(ROUTE, Quota::per_second(10).with_burst(10))
        .unwrap();
    advance(Duration::from_secs(1)).await;
    let after = send(&mut server, "light");
    let wait = after
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    println!(
        "one request under per_hour(100), then per_second(10) burst 10: {} (Retry-After {wait:?})",
        after.status()
    );
    assert_eq!(
        after.status(),
        StatusCode::OK,
        "1 request used, 10 allowed at once: refused, Retry-After {wait:?}"
    );
}

/// GCRA to GCRA and window to window (same and other width): what was used is kept, neither
/// more nor less.
#[tokio::test(start_paused = true)]
async fn set_quota_keeps_what_was_used_between_like_algorithms() {
    // GCRA to GCRA: 2 of a burst of 4 used; the new burst is 4 too: 2 more go at once.
    let limits_g = limits(Quota::per_minute(60).with_burst(4), 1024);
    let mut server_g = server(&limits_g);
    for _ in 0..2 {
        assert_eq!(send(&mut server_g, "c").status(), StatusCode::OK);
    }
    limits_g
        .set_quota(ROUTE, Quota::per_minute(120).with_burst(4))
        .unwrap();
    for _ in 0..2 {
        assert_eq!(send(&mut server_g, "c").status(), StatusCode::OK);
    }
    assert_eq!(
        send(&mut server_g, "c").status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Window to a longer window: 3 used of 10, 5 allowed now: 2 go.
    let limits_w = limits(Quota::per_minute(10), 1024);
    let mut server_w = server(&limits_w);
    for _ in 0..3 {
        assert_eq!(send(&mut server_w, "c").status(), StatusCode::OK);
    }
    limits_w.set_quota(ROUTE, Quota::per_hour(5)).unwrap();
    for _ in 0..2 {
        assert_eq!(send(&mut server_w, "c").status(), StatusCode::OK);
    }
    assert_eq!(
        send(&mut server_w, "c").status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// `set_quota` under a flood (each change costs one scan of the table, at the operator's
/// hand): a client at its quota stays refused across the changes and the flood.
#[tokio::test(start_paused = true)]
async fn set_quota_during_a_flood_frees_no_client_at_its_quota() {
    let limits = limits(Quota::per_hour(5), 1024);
    let mut server = server(&limits);
    for _ in 0..5 {
        send(&mut server, "heavy");
    }
    for round in 0..20 {
        for i in 0..1_000 {
            for _ in 0..5 {
                send(&mut server, &format!("flood-{round}-{i}"));
            }
        }
        let quota = if round % 2 == 0 {
            Quota::per_hour(6)
        } else {
            Quota::per_hour(5)
        };
        limits.set_quota(ROUTE, quota).unwrap();
        let heavy = send(&mut server, "heavy");
        if round % 2 == 1 {
            assert_eq!(
                heavy.status(),
                StatusCode::TOO_MANY_REQUESTS,
                "round {round}: let through"
            );
        }
        advance(Duration::from_secs(1)).await;
    }
}

// ===== (6) `//` =====

/// axum (matchit) matches an empty segment to a parameter: `POST /v2/jobs//cancel` reaches
/// the handler of `/v2/jobs/{id}/cancel` (with `id = ""`), and is counted there. Before: the
/// layer read runs of `/` as one first, counted it as `/v2/jobs/cancel`, no route here, and
/// five of five reached the handler on a quota of one.
#[tokio::test]
async fn an_empty_parameter_is_counted_under_the_route_axum_gives_it() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/jobs/{id}/cancel", Quota::per_hour(1))
        .reject()
        .key_header(KEY)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/v2/jobs/{id}/cancel",
            post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                ready("cancelled")
            }),
        )
        .layer(limits);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let mut r = Request::post("/v2/jobs//cancel")
            .body(axum::body::Body::empty())
            .unwrap();
        r.headers_mut()
            .insert(KEY, HeaderValue::from_static("attacker"));
        statuses.push(app.clone().oneshot(r).await.unwrap().status());
    }
    let handled = hits.load(Ordering::SeqCst);
    println!("/v2/jobs//cancel x5 on a quota of 1: {statuses:?}, handled {handled}");
    assert!(
        handled <= 1,
        "{handled} handled on a quota of 1: {statuses:?}"
    );
}

/// Client mode: an API routed by axum takes `/v2/jobs//cancel` for its cancel route, and the
/// client counts it there. Before: under the `{id}` route.
#[tokio::test(start_paused = true)]
async fn a_client_counts_an_empty_parameter_under_the_route_axum_gives_it() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/jobs/{id}/cancel", Quota::per_hour(1))
        .route("POST /v2/jobs/{id}", Quota::per_hour(100))
        .build()
        .unwrap();
    let api = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let mut client = limits.layer(api);
    let call = |path: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://api.test{path}"))
            .body(())
            .unwrap()
    };
    now(client.call(call("/v2/jobs//cancel"))).unwrap();
    let snapshot = limits.snapshot();
    let remaining = |route: &str| {
        snapshot
            .iter()
            .find(|s| &*s.route == route)
            .map(|s| s.remaining)
            .unwrap()
    };
    let cancel = remaining("POST /v2/jobs/{id}/cancel");
    let jobs = remaining("POST /v2/jobs/{id}");
    println!("after POST /v2/jobs//cancel: cancel route remaining {cancel}, {{id}} route remaining {jobs}");
    assert_eq!(
        (cancel, jobs),
        (0, 100),
        "counted under the route the API does not route it to"
    );
}
