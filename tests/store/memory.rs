//! What the store costs Redis: `used_memory` per client key a server tracks, per limit a
//! client fleet shares, and under a flood of fresh keys through a fleet of two servers. Each
//! test runs a `redis-server` of its own, so that nothing else moves its memory.

#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use futures::stream::{self, StreamExt};
use http::{Request, Response};
use tower::{Layer, ServiceExt};
use tower_quota::rate_limit::Reject;
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{Quota, RateLimitByRoute};

use super::rate_limits::{at_once, http_client, send_keyed, server_on, work};
use crate::common::redis::{unique_prefix, RedisServer};
use crate::common::redis_query;

fn info_field(info: &str, field: &str) -> i64 {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn used_memory(url: &str) -> i64 {
    let info: String = redis_query(url, redis::cmd("INFO").arg("memory")).await;
    info_field(&info, "used_memory")
}

/// The memory that deleting `keys` frees: `used_memory` before and after, less what the
/// clients' buffers (the test's own connections) took or gave back meanwhile.
async fn held_by(url: &str, keys: &[String]) -> i64 {
    let without_clients =
        |info: &str| info_field(info, "used_memory") - info_field(info, "mem_clients_normal");
    // One connection for the three, opened before (the others' closing settled meanwhile).
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Redis allocates a command's latency histogram after its first run: INFO's and DEL's
    // are made here.
    let info = || redis::cmd("INFO").arg("memory").to_owned();
    let _: String = info().query_async(&mut connection).await.unwrap();
    let () = redis::cmd("DEL")
        .arg("{none}")
        .query_async(&mut connection)
        .await
        .unwrap();
    let before: String = info().query_async(&mut connection).await.unwrap();
    let () = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut connection)
        .await
        .unwrap();
    let after: String = info().query_async(&mut connection).await.unwrap();
    without_clients(&before) - without_clients(&after)
}

fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap()
}

/// A server-mode layer on `quota` per `x-api-key` (costing `cost` units a request, if the
/// quota counts units), over a service that answers at once.
fn server(url: &str, prefix: &str, quota: Quota, cost: u32) -> RateLimitByRoute<Reject> {
    let mut limits = RateLimitByRoute::builder().route("GET /work", quota);
    if let Some(unit) = quota.unit() {
        limits = limits.cost(unit, move |_| cost);
    }
    limits
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .store(store(url, prefix))
        .build()
        .unwrap()
}

fn keyed(key: &str) -> Request<()> {
    let mut request = work();
    request
        .headers_mut()
        .insert("x-api-key", http::HeaderValue::from_str(key).unwrap());
    request
}

/// Sends `requests` requests for each of `keys` keys (the keys at once, each key's in turn),
/// pausing `between` between rounds; how many were admitted.
async fn hit(
    limits: &RateLimitByRoute<Reject>,
    keys: usize,
    requests: usize,
    between: Duration,
) -> usize {
    let admitted = Arc::new(AtomicUsize::new(0));
    for _ in 0..requests {
        stream::iter(0..keys)
            .for_each_concurrent(64, |k| {
                let (limits, admitted) = (limits.clone(), admitted.clone());
                async move {
                    let response: Response<_> = limits
                        .layer(at_once())
                        .oneshot(keyed(&format!("client-{k}")))
                        .await
                        .unwrap();
                    if response.status() == StatusCode::OK {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        tokio::time::sleep(between).await;
    }
    admitted.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_a_server_tracks_takes_under_a_kilobyte_of_redis_at_any_quota() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    const KEYS: usize = 100;
    // (what, quota, cost of a request, requests per key, pause between rounds)
    let cases = [
        // The whole quota, in the current bucket or two.
        (
            "per_minute(600)",
            Quota::per_minute(600),
            1,
            601,
            Duration::ZERO,
        ),
        // 100 units a request: the whole quota in 100 requests, as 10,000 requests leave it.
        (
            "per_hour(10_000)",
            Quota::per_hour(10_000).counting("units"),
            100,
            101,
            Duration::ZERO,
        ),
        // The most a key ever holds: a count in each of its 17 buckets. A short period, so
        // that the test spans it (its bucket numbers are longer than a minute's or an hour's),
        // with a request every 300 ms and buckets of 425 ms: each gets one or two, whatever
        // the machine's load, and 17 x 2 x 15 units fit in the quota.
        (
            "600 per 6.8 s, every bucket",
            Quota::new(600, Duration::from_millis(6_800)).counting("units"),
            15,
            0,
            Duration::from_millis(300),
        ),
    ];
    for (what, quota, cost, requests, between) in cases {
        let prefix = unique_prefix("memory");
        let limits = server(&url, &prefix, quota, cost);
        let (admitted, sent) = if requests > 0 {
            let admitted = hit(&limits, KEYS, requests, between).await;
            let full = quota.count() as usize / cost as usize;
            assert_eq!(admitted, KEYS * full.min(requests), "{what}");
            (admitted, requests)
        } else {
            // Until the first key holds a count in all 17 buckets.
            let (mut admitted, mut rounds) = (0, 0);
            loop {
                admitted += hit(&limits, KEYS, 1, between).await;
                rounds += 1;
                let first: Vec<String> =
                    redis_query(&url, redis::cmd("KEYS").arg(format!("{{{prefix}*"))).await;
                let buckets: usize = redis_query(&url, redis::cmd("HLEN").arg(&first[0])).await;
                if buckets == 17 || rounds == 60 {
                    break;
                }
            }
            assert_eq!(admitted, KEYS * rounds, "{what}");
            (admitted, rounds)
        };
        let keys: Vec<String> =
            redis_query(&url, redis::cmd("KEYS").arg(format!("{{{prefix}*"))).await;
        assert_eq!(keys.len(), KEYS, "{what}: one key per client");
        let buckets: usize = redis_query(&url, redis::cmd("HLEN").arg(&keys[0])).await;
        let one: Option<i64> =
            redis_query(&url, redis::cmd("MEMORY").arg("USAGE").arg(&keys[0])).await;
        // What the keys hold: the memory that deleting them frees.
        let per_key = held_by(&url, &keys).await / KEYS as i64;
        println!(
            "{what}: {admitted} of {} requests admitted, {per_key} bytes of used_memory per client key \
             ({buckets} buckets; MEMORY USAGE of one: {one:?} bytes)",
            KEYS * sent
        );
        assert!(per_key <= 1024, "{what}: {per_key} bytes per key");
        if requests == 0 {
            assert_eq!(buckets, 17, "{what}: after {sent} requests a key");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_servers_client_expires_once_idle() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    for quota in [Quota::per_minute(600), Quota::per_hour(10_000)] {
        let prefix = unique_prefix("memory-ttl");
        hit(&server(&url, &prefix, quota, 1), 10, 3, Duration::ZERO).await;
        let keys: Vec<String> =
            redis_query(&url, redis::cmd("KEYS").arg(format!("{{{prefix}*"))).await;
        assert_eq!(keys.len(), 10);
        // Once its newest bucket leaves the window (17 sixteenths of a period at most), and a
        // second.
        for key in &keys {
            let ttl: i64 = redis_query(&url, redis::cmd("PTTL").arg(key)).await;
            let most = (quota.period().as_millis() as i64) * 17 / 16 + 1_000;
            assert!((0..=most).contains(&ttl), "{key} expires in {ttl} ms");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_fleets_limit_takes_redis_in_proportion_to_its_count_not_its_clients() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    let mut per_place = Vec::new();
    for count in [60, 600] {
        let prefix = unique_prefix("memory-client");
        // Five limits, each taken whole: its window holds one place per request.
        let mut limits = RateLimitByRoute::builder();
        for n in 0..5 {
            limits = limits.route(format!("GET /r/{n}"), Quota::per_minute(count));
        }
        let store = store(&url, &prefix);
        let limits = limits.store(store.clone()).build().unwrap();
        let service = limits.layer(at_once());
        let request = |n: u32| {
            Request::get(format!("http://api.test/r/{n}"))
                .body(())
                .unwrap()
        };
        stream::iter((0..5).flat_map(|n| std::iter::repeat_n(n, count as usize)))
            .for_each_concurrent(64, |n| {
                let service = service.clone();
                async move {
                    service.oneshot(request(n)).await.unwrap();
                }
            })
            .await;
        store.flush().await;
        let keys: Vec<String> =
            redis_query(&url, redis::cmd("KEYS").arg(format!("{{{prefix}*:held"))).await;
        assert_eq!(keys.len(), 5);
        let mut places = 0;
        for key in &keys {
            places += redis_query::<usize>(&url, redis::cmd("ZCARD").arg(key)).await;
        }
        assert_eq!(
            places,
            5 * count as usize,
            "one place per request in the window"
        );
        let per_limit = held_by(&url, &keys).await / 5;
        println!(
            "per_minute({count}): {per_limit} bytes of used_memory per limit, {} per place",
            per_limit / i64::from(count)
        );
        per_place.push(per_limit / i64::from(count));
    }
    // Linear in the count: a bounded cost per place, whatever the count.
    assert!(per_place.iter().all(|&bytes| bytes <= 256), "{per_place:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_keys_through_two_servers_stays_within_maxmemory_and_locks_no_one_out() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    let prefix = unique_prefix("flood");
    let quota = Quota::per_minute(600);
    let fleet = [
        server_on(store(&url, &prefix), quota).await,
        server_on(store(&url, &prefix), quota).await,
    ];
    let client = http_client();
    // A client that used its whole quota, and the flood of fresh keys sent after it.
    for i in 0..600 {
        let status = send_keyed(&client, fleet[i % 2], "heavy").await.status();
        assert_eq!(status, StatusCode::OK);
    }
    // Redis as the README advises for server mode: a memory limit and an eviction policy that
    // drops the least frequently used keys, all of which expire anyway.
    let baseline = used_memory(&url).await;
    let maxmemory = baseline + 8 * 1024 * 1024;
    let _: () = redis_query(
        &url,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(maxmemory)
            .arg("maxmemory-policy")
            .arg("volatile-lfu"),
    )
    .await;

    const FLOOD: usize = 100_000;
    let refused = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicI64::new(0));
    for round in 0..FLOOD / 2_000 {
        stream::iter(0..2_000)
            .for_each_concurrent(128, |i| {
                let (client, refused) = (client.clone(), refused.clone());
                async move {
                    let key = format!("fresh-{round}-{i}");
                    let status = send_keyed(&client, fleet[i % 2], &key).await.status();
                    if status != StatusCode::OK {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        // Between rounds: a newcomer is admitted, the heavy client still refused.
        let newcomer = format!("newcomer-{round}");
        assert_eq!(
            send_keyed(&client, fleet[round % 2], &newcomer)
                .await
                .status(),
            StatusCode::OK,
            "a newcomer locked out after {} fresh keys",
            (round + 1) * 2_000
        );
        assert_eq!(
            send_keyed(&client, fleet[round % 2], "heavy")
                .await
                .status(),
            StatusCode::TOO_MANY_REQUESTS,
            "the heavy client let through after {} fresh keys",
            (round + 1) * 2_000
        );
        most.fetch_max(used_memory(&url).await, Ordering::Relaxed);
    }
    let info: String = redis_query(&url, redis::cmd("INFO").arg("stats")).await;
    let evicted = info_field(&info, "evicted_keys");
    let keys: usize = redis_query(&url, &mut redis::cmd("DBSIZE")).await;
    let most = most.load(Ordering::Relaxed);
    println!(
        "{FLOOD} fresh keys: {} refused, {keys} keys kept, {evicted} evicted, used_memory at \
         most {} KiB over a baseline of {} KiB (maxmemory {} KiB)",
        refused.load(Ordering::Relaxed),
        (most - baseline) / 1024,
        baseline / 1024,
        maxmemory / 1024
    );
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "every fresh key admitted"
    );
    assert!(evicted > 0, "the flood never reached maxmemory");
    assert!(most <= maxmemory + 1024 * 1024, "{most} bytes used");
}
