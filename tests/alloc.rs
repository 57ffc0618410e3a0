//! Allocation on the fast path, and memory under a flood of keys, counted by a global
//! allocator. Counts are per thread: each test runs its runtime on its own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::{ready, Future};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use tower::{service_fn, Layer, Service};
use tower_quota::{Quota, RateLimitByRoute};

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

/// Polls a future that must be ready at once.
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the fast path must not wait"),
    }
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
async fn memory_stays_bounded_under_a_million_distinct_keys() {
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let key = HeaderName::from_static("x-api-key");
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
        .reject()
        .key_header(key.clone())
        .max_keys(10_000)
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
            // A thousand new clients a second: some minutes the table fills, and is swept.
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
    // The table is full of active clients a few times (60 s x 1,000 keys/s > 10,000) ...
    assert!(refused > 0);
    // ... yet memory does not grow with the number of keys seen: it levels off once the key
    // tables have reached their size (about 300 bytes a tracked key), far below the 24 MB
    // that a million keys would take at 24 bytes each.
    assert!(peak < 4 << 20, "peak {peak} bytes");
    assert!(end <= peak && at_half > 0);
}
