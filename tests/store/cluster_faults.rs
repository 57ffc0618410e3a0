//! Faults and paths of the store on a Redis Cluster beyond the plain rate limit (tests found
//! by an outside test): a node hung when a process first uses its store, job slots, several
//! quotas and weighted costs, a cluster over TLS, a password with URL-special characters and
//! an empty one.

#![cfg(feature = "redis")]

use std::time::{Duration, Instant};

use http::Request;
use tower::{Layer, ServiceExt};
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{Quota, RateLimitByRoute};

use super::rate_limits::at_once;
use super::servers::RedisCluster;
use crate::common::redis::unique_prefix;

fn request(path: &str) -> Request<()> {
    Request::get(format!("http://api.test{path}"))
        .body(())
        .unwrap()
}

/// A prefix whose limit `GET /r/0` lies on master `port`.
fn prefix_on(cluster: &RedisCluster, port: u16, what: &str) -> String {
    loop {
        let prefix = unique_prefix(what);
        if cluster.master_of(&format!("{{{prefix}:rate:GET /r/0}}")) == port {
            return prefix;
        }
    }
}

fn layer(store: RedisStore) -> RateLimitByRoute {
    RateLimitByRoute::builder()
        .route("GET /r/0", Quota::per_second(1_000))
        .store(store)
        .build()
        .unwrap()
}

/// Sends one request a 50 ms for `during`: (ok, failed, slowest).
async fn send_for(limits: &RateLimitByRoute, during: Duration) -> (usize, Vec<String>, Duration) {
    let (mut ok, mut failed, mut slowest) = (0, Vec::new(), Duration::ZERO);
    let started = Instant::now();
    while started.elapsed() < during {
        let sent = Instant::now();
        match limits.layer(at_once()).oneshot(request("/r/0")).await {
            Ok(_) => ok += 1,
            Err(error) => failed.push(error.to_string()),
        }
        slowest = slowest.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (ok, failed, slowest)
}

/// `CLUSTER INFO` of the node on `port` says the cluster is ok, and `hung` serves no slot.
fn failed_over(port: u16, hung: u16) -> bool {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return false;
    };
    connection
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut connection)
        .unwrap();
    let slots: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut connection)
        .unwrap();
    info.contains("cluster_state:ok")
        && slots
            .lines()
            .all(|line| !line.contains(&format!("127.0.0.1:{hung}@")) || line.contains(",fail "))
}

/// Hangs master `hung` (SIGSTOP), and waits until its replica has taken over.
fn hang_and_fail_over(cluster: &RedisCluster, healthy: u16, hung: u16) -> Duration {
    cluster.signal(hung, true);
    let started = Instant::now();
    while !failed_over(healthy, hung) {
        assert!(started.elapsed() < Duration::from_secs(30), "no failover");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// One master hung (SIGSTOP: its port accepts, it never answers) and already failed over to
/// its replica, so the cluster is whole again, when a process first uses its store (a pod
/// started during a partition of one node: the URL list still names it). The cluster serves
/// every slot, so the store works. Before: each operation's timeout cut the connection's
/// making short (it takes about two connection timeouts with a node hung), so it failed for
/// as long as the node hung: 0 of 33 requests in 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_first_used_while_a_failed_over_node_hangs_reaches_the_cluster() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let masters = cluster.master_ports();
    let (healthy, hung) = (masters[0], masters[1]);
    let prefix = prefix_on(&cluster, healthy, "test-hung-first");
    let took = tokio::task::block_in_place(|| hang_and_fail_over(&cluster, healthy, hung));
    println!("the hung master's replica took over in {took:?}");
    let store = RedisStore::cluster(cluster.urls())
        .prefix(&prefix)
        .fail_mode(FailMode::Closed) // default timeout: 250 ms
        .build()
        .unwrap();
    let limits = layer(store);
    let (ok, failed, slowest) = send_for(&limits, Duration::from_secs(10)).await;
    println!(
        "hung node at first use: {ok} ok, {} failed (first: {:?}), slowest {slowest:?}",
        failed.len(),
        failed.first()
    );
    cluster.signal(hung, false);
    // The first second or so, while the connection is made, fails closed.
    assert!(
        failed.len() <= 8,
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        ok > 0,
        "10 s of requests on a whole cluster all failed while one (failed-over) node hung: {:?}",
        failed.first()
    );
}

/// Several quotas, one weighted and one paced (GCRA), client and server mode, on a cluster:
/// every script path touches only its declared keys, in one slot (no CROSSSLOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_quotas_weighted_costs_and_corrections_on_a_cluster() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let prefix = unique_prefix("cluster-multi");
    let store = RedisStore::cluster(cluster.urls())
        .prefix(&prefix)
        .timeout(Duration::from_secs(2))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let quotas = [
        Quota::per_second(100),
        Quota::per_minute(10_000).counting("tokens"),
        Quota::per_second(50).with_burst(20).counting("tokens"),
    ];
    let cost = |head: &tower_quota::rate_limit::RequestHead<'_>| {
        head.headers()
            .get("x-cost")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(1)
    };
    let used = |head: &tower_quota::rate_limit::ResponseHead<'_>| {
        head.headers()
            .get("x-used")
            .and_then(|v| v.to_str().ok()?.parse().ok())
    };
    let client = RateLimitByRoute::builder()
        .route("POST /chat", quotas)
        .cost("tokens", cost)
        .cost_after("tokens", used)
        .store(store.clone())
        .build()
        .unwrap();
    let server = RateLimitByRoute::builder()
        .route("POST /chat", quotas)
        .cost("tokens", cost)
        .cost_after("tokens", used)
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .store(store.clone())
        .build()
        .unwrap();
    let api = tower::service_fn(|_: Request<()>| async {
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .header("x-used", "3")
                .body(())
                .unwrap(),
        )
    });
    for i in 0..10 {
        let request = || {
            Request::post("http://api.test/chat")
                .header("x-cost", 5 + i)
                .header("x-api-key", format!("k{}", i % 3))
                .body(())
                .unwrap()
        };
        let response = client.layer(api).oneshot(request()).await;
        assert!(
            response.is_ok(),
            "client mode: {:?}",
            response.err().map(|e| e.to_string())
        );
        let response = server.layer(api).oneshot(request()).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
    }
    store.flush().await;
}

/// `.password(std::env::var("REDIS_PASSWORD").unwrap_or_default())` on a Redis without a
/// password: the empty password is none (before: `AUTH ""`, refused, every request failed).
/// And a server-mode key expires a period and a sixteenth after its last count, and a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_password_is_none_and_a_key_expires_a_period_and_a_sixteenth_after_its_count() {
    let Some((url, _server)) = crate::common::redis::shared_redis() else {
        return;
    };
    let store = RedisStore::builder(&url)
        .password(std::env::var("TOWER_QUOTA_UNSET_VARIABLE").unwrap_or_default())
        .prefix(unique_prefix("empty-password"))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let outcome = layer(store).layer(at_once()).oneshot(request("/r/0")).await;
    println!(
        "empty password: {:?}",
        outcome.as_ref().map(|_| ()).map_err(|e| e.to_string())
    );

    let prefix = unique_prefix("key-ttl");
    let store = RedisStore::builder(&url).prefix(&prefix).build().unwrap();
    let limits = RateLimitByRoute::builder()
        .route("GET /r/0", Quota::per_minute(600))
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .store(store)
        .build()
        .unwrap();
    let keyed = Request::get("http://api.test/r/0")
        .header("x-api-key", "k")
        .body(())
        .unwrap();
    limits.layer(at_once()).oneshot(keyed).await.unwrap();
    let keys: Vec<String> =
        crate::common::redis_query(&url, redis::cmd("KEYS").arg(format!("{{{prefix}*"))).await;
    let ttl: i64 = crate::common::redis_query(&url, redis::cmd("PTTL").arg(&keys[0])).await;
    println!("per_minute(600): the client's key expires in {ttl} ms");
    assert!(
        outcome.is_ok(),
        "an unset password variable breaks the store"
    );
    assert!(
        (60_000..=60_000 * 17 / 16 + 1_000).contains(&ttl),
        "a period and a sixteenth, and a second: {ttl} ms"
    );
}

/// A password with URL-special characters, in the URL (percent-encoded) and in the builder;
/// the wrong one's errors and every Debug output must not show it, in either spelling.
#[cfg(feature = "redis-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_with_url_special_characters_is_used_and_never_shown() {
    const PASSWORD: &str = "p@ss:w/rd%4#x";
    const ENCODED: &str = "p%40ss%3Aw%2Frd%254%23x";
    let Some(redis) = super::servers::TlsRedis::start(PASSWORD, false) else {
        return;
    };
    let url = format!("rediss://:{ENCODED}@127.0.0.1:{}/", redis.port);
    let wrong = format!("rediss://:{ENCODED}Z@127.0.0.1:{}/", redis.port);
    let mut shown = Vec::new();
    for (i, builder) in [
        RedisStore::builder(&url),
        RedisStore::builder(redis.url()).password(PASSWORD),
        RedisStore::builder(&wrong),
        RedisStore::cluster([wrong.clone()]),
    ]
    .into_iter()
    .enumerate()
    {
        let builder = builder
            .ca_certificate(redis.certificates.ca.clone())
            .prefix(unique_prefix("special-password"))
            .timeout(Duration::from_secs(1))
            .fail_mode(FailMode::Closed);
        shown.push(format!("{builder:?}"));
        let store = builder.build().unwrap();
        shown.push(format!("{store:?}"));
        let outcome = layer(store).layer(at_once()).oneshot(request("/r/0")).await;
        assert_eq!(
            outcome.is_ok(),
            i < 2,
            "{i}: only the right password gets through"
        );
        match outcome {
            Ok(_) => println!("{i}: ok"),
            Err(error) => {
                println!("{i}: {error} / {error:?}");
                shown.push(format!("{error} / {error:?}"));
            }
        }
    }
    println!("{}", shown[..2].join("\n"));
    for text in &shown {
        assert!(
            !text.contains(PASSWORD) && !text.contains(ENCODED),
            "shown: {text}"
        );
    }
}

/// The README's second snippet: a cluster over TLS with a password and a CA of one's own,
/// three TLS-only masters.
#[cfg(feature = "redis-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_with_a_password_and_a_ca_of_its_own() {
    use std::process::{Command, Stdio};
    const PASSWORD: &str = "cluster-Secret-1";
    if !crate::common::redis::redis_available() {
        return;
    }
    let certificates = super::servers::Certificates::generate();
    let dir = std::env::temp_dir().join(format!("tower-quota-tls-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca = write("ca.pem", &certificates.ca);
    let cert = write("server.pem", &certificates.server.0);
    let key = write("server.key", &certificates.server.1);
    let ports: Vec<u16> = (0..3)
        .map(|_| loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                break port;
            }
        })
        .collect();
    let mut children: Vec<_> = ports
        .iter()
        .map(|port| {
            Command::new("redis-server")
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                ])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&ca)
                .args([
                    "--tls-auth-clients",
                    "no",
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                ])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                ])
                .args(["--requirepass", PASSWORD, "--masterauth", PASSWORD])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let created = Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(&ca)
        .args(["-a", PASSWORD, "--no-auth-warning", "--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-yes"])
        .output()
        .unwrap();
    println!(
        "create: {}",
        String::from_utf8_lossy(&created.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
    std::thread::sleep(Duration::from_secs(3));
    let store = RedisStore::cluster(ports.iter().map(|p| format!("rediss://127.0.0.1:{p}/")))
        .password(PASSWORD)
        .ca_certificate(certificates.ca.clone())
        .prefix(unique_prefix("tls-cluster"))
        .timeout(Duration::from_secs(1))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let limits = layer(store);
    let (ok, failed, _) = send_for(&limits, Duration::from_secs(2)).await;
    println!(
        "a TLS cluster: {ok} ok, {} failed: {:?}",
        failed.len(),
        failed.first()
    );
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failed.is_empty() && ok > 0, "{failed:?}");
}

mod slots {
    use std::convert::Infallible;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt};
    use tower_quota::concurrency::Job;
    use tower_quota::store::{FailMode, RedisStore};
    use tower_quota::ConcurrencyLimitByPlan;

    use super::RedisCluster;
    use crate::common::redis::unique_prefix;

    fn process(cluster: &RedisCluster, prefix: &str) -> ConcurrencyLimitByPlan {
        let store = RedisStore::cluster(cluster.urls())
            .prefix(prefix)
            // Only a release notification can wake a waiter within the test.
            .poll_interval(Duration::from_secs(20))
            .timeout(Duration::from_secs(2))
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap();
        ConcurrencyLimitByPlan::custom(4)
            .job_route("POST /batch")
            .active_statuses(["running"])
            .store(store)
            .build()
            .unwrap()
    }

    async fn create(plan: &ConcurrencyLimitByPlan, id: &str) -> Vec<String> {
        let api = tower::service_fn(|request: Request<String>| async move {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(request.into_body()))))
        });
        let request = Request::post("http://api.test/batch")
            .body(format!(r#"{{"id":"{id}"}}"#))
            .unwrap();
        let response = plan.layer(api).oneshot(request).await.unwrap();
        let job = response.extensions().get::<Job>().cloned();
        response.into_body().collect().await.unwrap();
        job.map(|job| job.ids().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Job slots on a cluster: a job completed in a third process wakes a waiter in a second
    /// and is let go by the first, which holds it locally (`done:` across the cluster).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn job_slots_on_a_cluster_wake_and_let_go_across_processes() {
        let Some(cluster) = RedisCluster::start(3, 0) else {
            return;
        };
        let prefix = unique_prefix("test-slots");
        let (a, b, c) = (
            process(&cluster, &prefix),
            process(&cluster, &prefix),
            process(&cluster, &prefix),
        );
        // Each subscribes before the test.
        for p in [&a, &b, &c] {
            let _ = p.in_use();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for n in 1..=4 {
            assert_eq!(create(&a, &format!("a{n}")).await, [format!("a{n}")]);
        }
        assert_eq!(a.in_use(), 4);
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { create(&b, "b1").await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "b got a fifth slot");
        let started = Instant::now();
        c.complete("a1");
        let ids = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter in b is woken by the release")
            .unwrap();
        println!(
            "b's create went through {:?} after c completed a1",
            started.elapsed()
        );
        assert_eq!(ids, ["b1"]);
        let started = Instant::now();
        while a.in_use() != 3 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a never let go of a1: in use {}",
                a.in_use()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("a let go of a1 within {:?}", started.elapsed());
    }
}
