//! A million distinct client keys through server mode, with the process's resident memory
//! read before and after (Linux). Alone in its test binary, so that nothing else moves it.

use std::convert::Infallible;
use std::future::ready;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{service_fn, Layer, Service};
use tower_quota::{Quota, RateLimitByRoute};

#[path = "common/mod.rs"]
mod common;

use common::now;

/// Resident memory in bytes, from `/proc/self/statm`.
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::test(start_paused = true)]
async fn a_million_distinct_keys_leave_memory_bounded() {
    let key = HeaderName::from_static("x-api-key");
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_hour(10_000))
        .reject()
        .key_header(key.clone())
        .build()
        .unwrap();
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let mut svc = limits.layer(inner);
    let mut send = |client: u64| {
        let mut request = Request::post("http://api.test/v2/generate")
            .body(())
            .unwrap();
        request
            .headers_mut()
            .insert(key.clone(), HeaderValue::from(client));
        now(svc.call(request)).unwrap().status().as_u16()
    };
    let before = rss();
    let mut refused = 0;
    let mut at_100k = None;
    for client in 0..1_000_000u64 {
        if send(client) != 200 {
            refused += 1;
        }
        if client % 10_000 == 9_999 {
            // Ten thousand new clients a second.
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        if client == 99_999 {
            at_100k = rss();
        }
    }
    let after = rss();
    let tracked = limits.snapshot()[0].tracked_keys;
    let mib = |bytes: Option<u64>| bytes.map_or(f64::NAN, |b| b as f64 / f64::from(1 << 20));
    println!(
        "RSS {:.1} MiB before, {:.1} MiB after 100,000 keys, {:.1} MiB after 1,000,000; \
         {tracked} tracked, {refused} refused",
        mib(before),
        mib(at_100k),
        mib(after)
    );
    assert_eq!(refused, 0);
    assert!(tracked <= 65_536);
    if let (Some(before), Some(at_100k), Some(after)) = (before, at_100k, after) {
        // The table (65,536 clients of about 140 bytes, and its shadow) is full by 100,000
        // keys; the next 900,000 add nothing.
        assert!(
            after - before < 32 << 20,
            "grew by {} bytes",
            after - before
        );
        assert!(
            after.saturating_sub(at_100k) < 4 << 20,
            "grew by {} bytes after the table filled",
            after - at_100k
        );
    }
}
