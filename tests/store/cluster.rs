//! The store on a Redis Cluster the tests start on 127.0.0.1 (three masters, made with
//! `redis-cli --cluster create`, with a replica each where a master is killed). Real time, as
//! every Redis test: Redis keeps its own clock.

#![cfg(feature = "redis")]

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use futures::stream::{FuturesUnordered, StreamExt};
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{Quota, RateLimitByRoute};

use super::rate_limits::{get_request, http_client, max_in_window, send_keyed, server_on};
use super::servers::RedisCluster;
use crate::common::redis::unique_prefix;
use crate::common::serve;

/// When each request reached the API, by path.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<HashMap<String, Vec<Instant>>>>);

/// An API answering `GET /r/{n}` at once and `GET /slow` after 300 ms, noting arrivals.
async fn api(arrivals: Arrivals) -> SocketAddr {
    let at_once = arrivals.clone();
    let app = Router::new()
        .route(
            "/r/{n}",
            get(move |Path(n): Path<String>| {
                let arrivals = at_once.clone();
                async move {
                    let mut arrivals = arrivals.0.lock().unwrap();
                    arrivals.entry(n).or_default().push(Instant::now());
                    "done"
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
    serve(app).await
}

fn cluster_store(cluster: &RedisCluster, prefix: &str) -> RedisStore {
    RedisStore::cluster(cluster.urls())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap()
}

const ROUTES: usize = 6;

/// A prefix under which the routes' limits lie on every master of the cluster.
fn spread_prefix(cluster: &RedisCluster, masters: usize) -> String {
    loop {
        let prefix = unique_prefix("cluster");
        let owners: BTreeSet<u16> = (0..ROUTES)
            .map(|n| cluster.master_of(&format!("{{{prefix}:rate:GET /r/{n}}}")))
            .collect();
        if owners.len() == masters {
            return prefix;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_a_cluster_keeps_each_routes_window_on_every_master() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let prefix = spread_prefix(&cluster, 3);
    let arrivals = Arrivals::default();
    let api = api(arrivals.clone()).await;
    let quota = Quota::per_second(5);

    // Two processes, each with its own connections to the cluster and its own layer.
    let processes: Vec<_> = (0..2)
        .map(|_| {
            let (urls, prefix) = (cluster.urls(), prefix.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let store = RedisStore::cluster(urls)
                        .prefix(prefix)
                        .timeout(Duration::from_millis(500))
                        .fail_mode(FailMode::Closed)
                        .build()
                        .unwrap();
                    let mut limits = RateLimitByRoute::builder();
                    for n in 0..ROUTES {
                        limits = limits.route(format!("GET /r/{n}"), quota);
                    }
                    let limits = limits.store(store.clone()).build().unwrap();
                    let service = ServiceBuilder::new().layer(limits).service(http_client());
                    let mut calls: FuturesUnordered<_> = (0..ROUTES * 8)
                        .map(|i| {
                            let request = get_request(api, &format!("/r/{}", i % ROUTES));
                            service.clone().oneshot(request)
                        })
                        .collect();
                    let mut statuses = Vec::new();
                    while let Some(response) = calls.next().await {
                        statuses.push(response.expect("every request is sent").status());
                    }
                    store.flush().await;
                    statuses
                })
            })
        })
        .collect();
    for process in processes {
        let statuses = process.join().unwrap();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
    }

    let arrivals = arrivals.0.lock().unwrap();
    for n in 0..ROUTES {
        let mut times = arrivals[&n.to_string()].clone();
        times.sort();
        assert_eq!(times.len(), 16, "route {n}");
        let most = max_in_window(&times, Duration::from_secs(1));
        println!("route {n}: at most {most} requests in a second");
        assert!(most <= 5, "route {n}: {most} requests in one second");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_in_another_process_whichever_node_it_listens_to() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let prefix = unique_prefix("cluster-wake");
    let api = api(Arrivals::default()).await;
    // Polls ten seconds apart: only the release's notification can wake the waiter sooner.
    let layer = |store: RedisStore| {
        RateLimitByRoute::builder()
            .route("GET /slow", Quota::per_second(1))
            .store(store)
            .build()
            .unwrap()
    };
    let store = |prefix: &str| {
        RedisStore::cluster(cluster.urls())
            .prefix(prefix)
            .timeout(Duration::from_millis(500))
            .poll_interval(Duration::from_secs(10))
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap()
    };
    let first = ServiceBuilder::new()
        .layer(layer(store(&prefix)))
        .service(http_client());
    let second = ServiceBuilder::new()
        .layer(layer(store(&prefix)))
        .service(http_client());
    // Both subscribe before the test begins.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let slow = tokio::spawn(first.oneshot(get_request(api, "/slow")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // In flight elsewhere: this one waits for its response, then for its second to pass.
    let waited = second.oneshot(get_request(api, "/slow")).await.unwrap();
    assert_eq!(waited.status(), StatusCode::OK);
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    let elapsed = started.elapsed();
    println!("the waiter was answered {elapsed:?} after the first request was sent");
    assert!(
        elapsed < Duration::from_secs(4),
        "woken by the poll, not the release: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_a_cluster_hold_each_key_to_its_quota() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let prefix = unique_prefix("cluster-servers");
    let quota = Quota::per_minute(5);
    let fleet = [
        server_on(cluster_store(&cluster, &prefix), quota).await,
        server_on(cluster_store(&cluster, &prefix), quota).await,
    ];
    let client = http_client();
    for k in 0..30 {
        let key = format!("key-{k}");
        let mut passed = 0;
        for i in 0..8 {
            let status = send_keyed(&client, fleet[i % 2], &key).await.status();
            match status {
                StatusCode::OK => passed += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("{key}: unexpected {other}"),
            }
        }
        assert_eq!(passed, 5, "{key}: one quota across both servers");
    }
    // The keys spread over the masters: one bucket count each, on the master of its slot.
    let held = cluster.keys_on_masters(&format!("{{{prefix}*"));
    assert_eq!(held.len(), 30, "{held:?}");
    let masters: BTreeSet<u16> = held.iter().map(|(port, _)| *port).collect();
    assert!(masters.len() >= 2, "all keys on one master: {masters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_test_fails_as_told_then_its_replica_holds_the_quotas() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let prefix = unique_prefix("cluster-failover");
    let store = RedisStore::cluster(cluster.urls())
        .prefix(&prefix)
        .timeout(Duration::from_millis(200))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let server_limits = RateLimitByRoute::builder()
        .route("GET /v2/generations", Quota::per_second(5))
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .store(store)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v2/generations", get(|| async { "[]" }))
        .layer(server_limits.clone());
    let server = serve(app).await;
    let client = http_client();
    assert_eq!(
        send_keyed(&client, server, "victim").await.status(),
        StatusCode::OK
    );
    let held = cluster.keys_on_masters(&format!("{{{prefix}*"));
    assert_eq!(held.len(), 1);
    let master = held[0].0;

    // And a client, failing open, whose limit lies on the same master.
    let client_prefix = loop {
        let prefix = unique_prefix("cluster-failover-client");
        if cluster.master_of(&format!("{{{prefix}:rate:GET /r/0}}")) == master {
            break prefix;
        }
    };
    let arrivals = Arrivals::default();
    let api = api(arrivals.clone()).await;
    let limits = RateLimitByRoute::builder()
        .route("GET /r/0", Quota::per_second(5))
        .store(
            RedisStore::cluster(cluster.urls())
                .prefix(client_prefix)
                .timeout(Duration::from_millis(200))
                .fail_mode(FailMode::Open)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let paced = ServiceBuilder::new().layer(limits).service(http_client());

    // A request every 20 ms throughout: when it was sent, what came back, how long it took.
    let log = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = Instant::now();
                let status = send_keyed(&client, server, "victim").await.status();
                log.lock().unwrap().push((sent, status, sent.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // The client's requests, one after another, each when the limit lets it.
    let failed = Arc::new(Mutex::new(Vec::new()));
    let client_sender = {
        let (failed, stop) = (failed.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let request = get_request(api, "/r/0");
                if let Err(error) = paced.clone().oneshot(request).await {
                    failed.lock().unwrap().push(error.to_string());
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    cluster.kill(master);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_until_whole(Duration::from_secs(30));
        cluster
    })
    .await
    .unwrap();
    let whole = Instant::now();
    println!("the replica took over {:?} after the kill", whole - killed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap();
    client_sender.await.unwrap();
    drop(cluster);

    let log = log.lock().unwrap();
    // No request hung past the store's timeout (and some slack), none failed otherwise.
    let slowest = log.iter().map(|(_, _, took)| *took).max().unwrap();
    println!(
        "{} requests, the slowest answered in {slowest:?}",
        log.len()
    );
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    assert!(log
        .iter()
        .all(|(_, status, _)| matches!(*status, StatusCode::OK | StatusCode::TOO_MANY_REQUESTS)));
    // While the slot had no master, closed: nothing admitted uncounted.
    let outage: Vec<_> = log
        .iter()
        .filter(|(sent, _, _)| {
            *sent > killed + Duration::from_millis(100)
                && *sent + Duration::from_millis(300) < whole
        })
        .collect();
    let admitted_in_outage = outage
        .iter()
        .filter(|(_, s, _)| *s == StatusCode::OK)
        .count();
    println!(
        "{} requests during the outage, {admitted_in_outage} admitted",
        outage.len()
    );
    // Once a second has passed on the promoted replica: the quota again, and requests admitted.
    let after: Vec<Instant> = log
        .iter()
        .filter(|(sent, status, _)| {
            *sent > whole + Duration::from_secs(1) && *status == StatusCode::OK
        })
        .map(|(sent, _, _)| *sent)
        .collect();
    let most = max_in_window(&after, Duration::from_secs(1));
    println!(
        "after the failover: {} admitted, at most {most} in a second",
        after.len()
    );
    assert!(after.len() >= 5, "the limits did not come back: {after:?}");
    assert!(
        most <= 5,
        "{most} admitted in one second after the failover"
    );
    // Refused for want of the store (failing closed) while the slot had no master.
    let counters = server_limits.snapshot()[0].counters;
    println!("the server: {counters:?}");
    assert!(counters.refused.store_unavailable > 0, "{counters:?}");

    // The client, failing open, was never failed, and paced by its quota again afterwards.
    let failed = failed.lock().unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let mut sent = arrivals.0.lock().unwrap()["0"].clone();
    sent.sort();
    let during = sent
        .iter()
        .filter(|at| (killed..whole).contains(*at))
        .count();
    sent.retain(|at| *at > whole + Duration::from_secs(1));
    let most = max_in_window(&sent, Duration::from_secs(1));
    println!(
        "the client: {during} requests sent during the outage, {} after, at most {most} in a second",
        sent.len()
    );
    assert!(
        sent.len() >= 5 && most <= 5,
        "{most} in a second of {sent:?}"
    );
}
