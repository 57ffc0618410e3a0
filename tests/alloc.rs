//! Allocation on the fast path, and memory under a flood of keys, counted by a global
//! allocator. Counts are per thread: each test runs its runtime on its own thread.

// Counting allocations takes a global allocator, which is unsafe to implement.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::ready;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use tower::{service_fn, Layer, Service};
use tower_quota::{Quota, RateLimitByRoute};

#[path = "common/mod.rs"]
mod common;

use common::now;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static LIVE_BYTES: Cell<i64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        let _ = LIVE_BYTES.try_with(|n| n.set(n.get() + layout.size() as i64));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE_BYTES.try_with(|n| n.set(n.get() - layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn live_bytes() -> i64 {
    LIVE_BYTES.with(Cell::get)
}

fn request(method: Method, uri: &'static str) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from_static(uri);
    request
}

#[tokio::test(start_paused = true)]
async fn the_fast_path_allocates_nothing() {
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));

    let client = RateLimitByRoute::builder()
        .route(
            "POST /v2/generate",
            Quota::new(10_000, Duration::from_millis(10)),
        )
        .route(
            "GET /v2/generate/{id}",
            Quota::new(10_000, Duration::from_millis(10)).with_burst(1_000),
        )
        .default_quota(Quota::new(10_000, Duration::from_millis(10)))
        .build()
        .unwrap();
    let mut client = client.layer(inner);

    let key = HeaderName::from_static("x-api-key");
    let server = RateLimitByRoute::builder()
        .route(
            "POST /v2/generate",
            Quota::new(10_000, Duration::from_millis(10)),
        )
        .default_quota(Quota::new(10_000, Duration::from_millis(10)))
        .reject()
        .key_header(key.clone())
        .rate_limit_headers(false)
        .build()
        .unwrap();
    let mut server = server.layer(inner);

    let paths = [
        (Method::POST, "http://api.test/v2/generate"),
        (
            Method::GET,
            "http://api.test/v2/generate/0b6b8f2e-5a41-4f5e",
        ),
        (Method::GET, "http://api.test/v2/generations"),
    ];
    for round in 0..3 {
        // Build the requests first: only the layer's own work is counted.
        let mut requests: Vec<_> = (0..3_000)
            .map(|i| {
                let (method, uri) = &paths[i % 3];
                let mut r = request(method.clone(), uri);
                r.headers_mut()
                    .insert(key.clone(), HeaderValue::from_static("sk-test-key"));
                r
            })
            .collect();
        let before = allocations();
        for r in requests.drain(..1_500) {
            now(client.call(r)).unwrap();
        }
        for r in requests.drain(..) {
            assert_eq!(now(server.call(r)).unwrap().status(), 200);
        }
        let made = allocations() - before;
        // The first round grows the window buffers and the key table; after that, nothing.
        if round > 0 {
            assert_eq!(
                made, 0,
                "round {round}: {made} allocations for 3,000 requests"
            );
        }
        tokio::time::advance(Duration::from_millis(20)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_plan_in_in_flight_mode_allocates_nothing_per_request() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let inner = service_fn(|_: Request<()>| {
        ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))))
    });
    // Events are counted (and reported once the slots are let go) on this path too.
    let plan = tower_quota::ConcurrencyLimitByPlan::custom(1_000)
        .job_route("POST /v2/generate")
        .in_flight()
        .build()
        .unwrap();
    let mut svc = plan.layer(inner);
    for round in 0..3 {
        let requests: Vec<_> = (0..1_000)
            .map(|_| request(Method::POST, "http://api.test/v2/generate"))
            .collect();
        let before = allocations();
        for r in requests {
            let response = now(svc.call(r)).unwrap();
            let body = response.into_body();
            drop(now(body.collect()));
        }
        let made = allocations() - before;
        if round > 0 {
            assert_eq!(
                made, 0,
                "round {round}: {made} allocations for 1,000 creates"
            );
        }
    }
    assert_eq!(plan.in_use(), 0);
    assert_eq!(plan.snapshot().counters.freed.answered, 3_000);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_fields_cost_one_allocation_per_response() {
    // A response with header fields of its own, as every real one has (its map is made by
    // the inner service, and counted the same with the fields on or off).
    let inner = service_fn(|_: Request<()>| {
        let mut response = Response::new(());
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        ready(Ok::<_, Infallible>(response))
    });
    let key = HeaderName::from_static("x-api-key");
    let mut made = Vec::new();
    for fields in [false, true] {
        let server = RateLimitByRoute::builder()
            .route("POST /v2/generate", Quota::per_minute(10_000))
            .reject()
            .key_header(key.clone())
            .rate_limit_headers(fields)
            .build()
            .unwrap();
        let mut server = server.layer(inner);
        for round in 0..2 {
            let requests: Vec<_> = (0..1_000)
                .map(|_| {
                    let mut r = request(Method::POST, "http://api.test/v2/generate");
                    r.headers_mut()
                        .insert(key.clone(), HeaderValue::from_static("sk-test-key"));
                    r
                })
                .collect();
            let mut responses = Vec::with_capacity(1_000);
            let before = allocations();
            for r in requests {
                responses.push(now(server.call(r)).unwrap());
            }
            if round > 0 {
                made.push(allocations() - before);
            }
            assert_eq!(responses[999].headers().contains_key("ratelimit"), fields);
        }
    }
    // The `RateLimit` field's value; `RateLimit-Policy` shares the route's bytes.
    assert_eq!(
        made[1] - made[0],
        1_000,
        "{made:?} allocations for 1,000 responses"
    );
}

const KEYS: u64 = 4_096;

/// Live bytes per tracked client, after `keys` clients sent one request each, and after some
/// of them used their whole quota.
async fn bytes_per_key(quota: Quota) -> (i64, i64) {
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let key = HeaderName::from_static("x-api-key");
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", quota)
        .reject()
        .key_header(key.clone())
        .max_keys(KEYS as usize)
        .rate_limit_headers(false)
        .build()
        .unwrap();
    let mut svc = limits.layer(inner);
    let mut send = |client: u64| {
        let mut r = request(Method::POST, "http://api.test/v2/generate");
        r.headers_mut()
            .insert(key.clone(), HeaderValue::from(client));
        now(svc.call(r)).unwrap().status()
    };
    let base = live_bytes();
    // Twice as many clients as the table tracks: the table, its shadow of forgotten clients
    // and its candidates are all counted.
    for client in 0..2 * KEYS {
        assert_eq!(send(client), 200);
    }
    let one_each = live_bytes() - base;
    // Sixteen clients use their whole quota: memory stays within the bound (the table's index
    // may be rehashed into a larger one by the churn of clients forgotten and restored). A
    // client whose count the churn dropped from the shadow table (as the module docs allow:
    // its cells all held heavier counts) starts afresh, so each is refused within two quotas,
    // and most exactly at its quota.
    let mut exact = 0;
    for client in 2 * KEYS - 16..2 * KEYS {
        let mut sent = 1;
        while send(client) == 200 {
            sent += 1;
            assert!(sent <= 2 * quota.count(), "client {client} never refused");
        }
        exact += u32::from(sent == quota.count());
    }
    assert!(exact >= 8, "{exact} of 16 refused at their quota");
    let at_quota = live_bytes() - base;
    assert_eq!(limits.snapshot()[0].tracked_keys, KEYS as usize);
    (one_each / KEYS as i64, at_quota / KEYS as i64)
}

#[tokio::test(start_paused = true)]
async fn a_tracked_client_costs_the_same_at_any_quota() {
    for quota in [Quota::per_minute(600), Quota::per_hour(10_000)] {
        let (one_each, at_quota) = bytes_per_key(quota).await;
        println!("{quota}: {one_each} bytes per tracked client, {at_quota} with some at quota");
        assert!(one_each <= 256, "{one_each} bytes per client");
        assert!(
            at_quota <= 256,
            "{at_quota} bytes per client with some at quota"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn memory_stays_bounded_under_a_million_distinct_keys() {
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let key = HeaderName::from_static("x-api-key");
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
        .reject()
        .key_header(key.clone())
        .max_keys(10_000)
        .rate_limit_headers(false)
        .build()
        .unwrap();
    let mut svc = limits.layer(inner);
    let base = live_bytes();
    let mut peak = 0;
    let mut at_half = 0;
    let mut refused = 0u64;
    for i in 0..1_000_000u64 {
        let mut r = request(Method::POST, "http://api.test/v2/generate");
        r.headers_mut()
            .insert(key.clone(), HeaderValue::from(i ^ 0x5bd1_e995));
        if now(svc.call(r)).unwrap().status() == 429 {
            refused += 1;
        }
        if i % 1_000 == 999 {
            // A thousand new clients a second: the table is full after ten seconds.
            tokio::time::advance(Duration::from_secs(1)).await;
            peak = peak.max(live_bytes() - base);
            assert!(limits.snapshot()[0].tracked_keys <= 10_000);
        }
        if i == 499_999 {
            at_half = live_bytes() - base;
        }
    }
    let end = live_bytes() - base;
    println!(
        "live bytes: {at_half} at 500k keys, {end} at 1M, peak {peak}; {refused} requests refused"
    );
    // Every new client is let in: the table forgets the little-used ...
    assert_eq!(refused, 0);
    // ... and memory does not grow with the number of keys seen: it levels off once the
    // table and its shadow have reached their size, far below the 24 MB that a million keys
    // would take at 24 bytes each.
    assert!(peak < 3 << 20, "peak {peak} bytes");
    assert!(end <= peak && at_half > 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_costs_a_few_bytes_beyond_the_request_itself() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_hour(1))
        .build()
        .unwrap();
    let mut svc = limits.layer(inner);
    now(svc.call(request(Method::POST, "http://api.test/v2/generate"))).unwrap();
    // 100,000 requests wait on one route, each polled once (so registered in the queue) and
    // kept by its caller in a box: what the layer adds is the whole of the live bytes but the
    // requests' own (built, with their URIs, before counting).
    const N: usize = 100_000;
    let requests: Vec<_> = (0..N)
        .map(|_| request(Method::POST, "http://api.test/v2/generate"))
        .collect();
    let mut waiting = Vec::with_capacity(N);
    let mut cx = Context::from_waker(Waker::noop());
    let before = live_bytes();
    for r in requests {
        let mut future = Box::pin(svc.call(r));
        assert!(future.as_mut().poll(&mut cx).is_pending());
        waiting.push(future);
    }
    let per_request = (live_bytes() - before) / N as i64;
    let beyond = per_request - std::mem::size_of::<Request<()>>() as i64;
    assert_eq!(limits.snapshot()[0].waiters, N);
    assert!(
        beyond <= 512,
        "{per_request} bytes per waiting request, {beyond} beyond the request"
    );
    eprintln!("{per_request} bytes per waiting request, {beyond} beyond the request");
}
