//! Places given back in the background: many at a time behind a slow link, none lost when
//! the queue is full, a 429's block in place before the 429 is answered, and a place whose
//! end is known (abandoned) waited for by time, not by release.

#![cfg(feature = "redis")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_quota::rate_limit::RateLimitError;
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{Quota, RateLimitByRoute};

use crate::common::redis::{shared_redis, unique_prefix};
use crate::common::redis_query;
use crate::rate_limits::{at_once, work};

/// A TCP proxy to Redis adding `delay` each way (latency, not a throughput cap).
async fn delay_proxy(upstream: String, delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let up: SocketAddr = upstream
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(up).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, delay));
            tokio::spawn(pump(sr, cw, delay));
        }
    });
    format!("redis://{addr}/")
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 65536];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
            }
        }
    }
}

fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .in_flight_lease(Duration::from_secs(30))
        .timeout(Duration::from_secs(5))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap()
}

/// Places still held as in flight (score beyond now + period + margin + 1 s).
async fn held_in_flight(url: &str, prefix: &str) -> usize {
    let key = format!("{{{prefix}:rate:GET /work}}:held");
    let t: Vec<u64> = redis_query(url, &mut redis::cmd("TIME")).await;
    let now = t[0] * 1_000_000 + t[1];
    let min = now + 3_000_000;
    redis_query::<usize>(url, redis::cmd("ZCOUNT").arg(&key).arg(min).arg("+inf")).await
}

/// Behind a link of 2 ms a round trip, 500 places are given back many at a time: the fleet
/// sees them answered within a few round trips of their responses, not 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_are_given_back_many_at_a_time_behind_a_slow_link() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let proxied = delay_proxy(url.clone(), Duration::from_millis(1)).await;
    let prefix = unique_prefix("review-serial");
    let store = store(&proxied, &prefix);
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::new(100_000, Duration::from_secs(1)))
        .store(store.clone())
        .build()
        .unwrap();
    let service = limits.layer(at_once());
    let started = Instant::now();
    let mut calls: FuturesUnordered<_> =
        (0..500).map(|_| service.clone().oneshot(work())).collect();
    while let Some(r) = calls.next().await {
        r.unwrap();
    }
    let answered = started.elapsed();
    let held = held_in_flight(&url, &prefix).await;
    let f = Instant::now();
    store.flush().await;
    let flushed = f.elapsed();
    let held_after = held_in_flight(&url, &prefix).await;
    println!("500 answered in {answered:?}; held in flight just after: {held}; flush took {flushed:?}; held after flush: {held_after}");
    // One at a time, the 500 would take a second; 64 at a time, about 20 ms.
    assert!(flushed < Duration::from_millis(500), "{flushed:?}");
    assert_eq!(held_after, 0);
}

/// With the places' queue full of releases, an abandon (a request dropped after its send) is
/// still given back, not dropped to be held for the whole in-flight lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandon_is_not_lost_when_the_queue_is_full() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let proxied = delay_proxy(url.clone(), Duration::from_millis(1)).await;
    let prefix = unique_prefix("review-full");
    let store = store(&proxied, &prefix);
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::new(100_000, Duration::from_secs(1)))
        .abandoned_hold(Duration::ZERO)
        .store(store.clone())
        .build()
        .unwrap();
    let stall = Arc::new(tokio::sync::Notify::new());
    let stall2 = stall.clone();
    let service = limits.layer(tower::service_fn(move |r: Request<()>| {
        let stall = stall2.clone();
        async move {
            if r.headers().contains_key("x-stall") {
                stall.notified().await;
            }
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }
    }));
    // One request sent, its response stalled.
    let mut stalled = work();
    stalled
        .headers_mut()
        .insert("x-stall", http::HeaderValue::from_static("1"));
    let stalled = tokio::spawn(service.clone().oneshot(stalled));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 4,200 answered at once: their releases fill the background queue.
    let mut calls: FuturesUnordered<_> =
        (0..4200).map(|_| service.clone().oneshot(work())).collect();
    let mut n = 0;
    let mut stalled = Some(stalled);
    while let Some(r) = calls.next().await {
        r.unwrap();
        n += 1;
        if n == 4150 {
            // The stalled one is given up on now (dropped after its send): abandoned, hold 0.
            let s = stalled.take().unwrap();
            s.abort();
            let _ = s.await;
        }
    }
    store.flush().await;
    // Its place should be answered now (+period+margin), not held for the 30 s lease.
    let held = held_in_flight(&url, &prefix).await;
    println!("held in flight after flush: {held}");
    assert_eq!(
        held, 0,
        "the abandon was dropped: place held for the in-flight lease"
    );
}

/// A 429's release carries the fleet-wide block: it is awaited on the path, so a caller that
/// retries at once finds the route closed, even with earlier releases still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_closes_the_route_for_the_fleet_before_it_is_answered() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let proxied = delay_proxy(url.clone(), Duration::from_millis(1)).await;
    let prefix = unique_prefix("review-429");
    let store = store(&proxied, &prefix);
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::new(100_000, Duration::from_secs(1)))
        .max_wait(Duration::from_millis(100))
        .store(store.clone())
        .build()
        .unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let service = limits.layer(tower::service_fn(move |r: Request<()>| {
        let s = s.clone();
        async move {
            let mut resp = Response::new(());
            if r.headers().contains_key("x-429") {
                *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                resp.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("30"));
            } else if r.headers().contains_key("x-retry") {
                s.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    }));
    // 100 ordinary requests answered, then the 429.
    let mut calls: FuturesUnordered<_> =
        (0..100).map(|_| service.clone().oneshot(work())).collect();
    while let Some(r) = calls.next().await {
        r.unwrap();
    }
    let mut refused = work();
    refused
        .headers_mut()
        .insert("x-429", http::HeaderValue::from_static("1"));
    let r = service.clone().oneshot(refused).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // The caller retries at once.
    let mut retry = work();
    retry
        .headers_mut()
        .insert("x-retry", http::HeaderValue::from_static("1"));
    let outcome: Result<_, BoxError> = service.clone().oneshot(retry).await;
    println!("retry outcome: {:?}", outcome.as_ref().map(|r| r.status()));
    assert_eq!(
        sent.load(Ordering::SeqCst),
        0,
        "the retry reached the server after a 429 with Retry-After: 30"
    );
}

/// An abandoned place is held as if answered at the end of its hold, a known time: a request
/// that cannot have it within its `max_wait` is refused at once, not after waiting for a
/// release that will not come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_whose_end_is_known_is_waited_for_by_time() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("review-abandon");
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::new(1, Duration::from_secs(1)))
        .abandoned_hold(Duration::from_secs(10))
        .max_wait(Duration::from_secs(2))
        .store(store(&url, &prefix))
        .build()
        .unwrap();
    let mut first = true;
    let mut service = limits.layer(tower::service_fn(move |_: Request<()>| {
        let fail = std::mem::replace(&mut first, false);
        async move {
            if fail {
                Err::<Response<()>, BoxError>("connection reset".into())
            } else {
                Ok(Response::new(()))
            }
        }
    }));
    let _ = service.ready().await.unwrap().call(work()).await; // abandoned: held ~11 s
    let started = Instant::now();
    let second = service.ready().await.unwrap().call(work()).await;
    let took = started.elapsed();
    let too_long = second
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<RateLimitError>())
        .map(|e| e.to_string());
    println!("refused after {took:?}: {too_long:?}");
    assert!(
        took < Duration::from_millis(500),
        "a turn known to come ~11 s later was waited for {took:?}"
    );
}
