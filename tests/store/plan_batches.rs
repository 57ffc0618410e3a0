//! A plan's slots in Redis taken by creates that start several jobs (a batch API): all of a
//! batch's slots in one step or none, each job's slot given back on its own, and the slots a
//! batch's response shows no job for settled as a single create's.
//!
//! Redis keeps time with its own clock, so this runs in real time; nothing waits on a sleep
//! to order events (it waits until Redis shows what it must, for at most five seconds).

#![cfg(feature = "redis")]

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Layer, ServiceExt};
use tower_quota::concurrency::Job;
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{ConcurrencyLimitByPlan, RequestHead};

use crate::common::redis::{shared_redis, unique_prefix};
use crate::common::redis_query;

/// How many jobs a create starts, as its caller says.
#[derive(Clone, Copy)]
struct Batch(u32);

/// One process's layer over the shared plan of 4 slots.
fn process(url: &str, prefix: &str) -> ConcurrencyLimitByPlan {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .poll_interval(Duration::from_millis(50))
        .timeout(Duration::from_secs(5))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    ConcurrencyLimitByPlan::custom(4)
        .job_route("POST /batch")
        .active_statuses(["running"])
        .jobs_per_create(|head: &RequestHead<'_>| {
            head.extensions().get::<Batch>().map_or(1, |batch| batch.0)
        })
        .store(store)
        .build()
        .unwrap()
}

/// A batch of `jobs` through `plan`, which the API answers with `body`: the ids it showed.
async fn batch(
    plan: &ConcurrencyLimitByPlan,
    jobs: u32,
    body: &str,
) -> Result<Vec<String>, BoxError> {
    let api = tower::service_fn(|request: Request<String>| async move {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(request.into_body()))))
    });
    let mut request = Request::post("http://api.test/batch")
        .body(body.to_owned())
        .unwrap();
    request.extensions_mut().insert(Batch(jobs));
    let response = plan.layer(api).oneshot(request).await?;
    let job = response.extensions().get::<Job>().cloned();
    response.into_body().collect().await?;
    Ok(job
        .map(|job| job.ids().map(str::to_owned).collect())
        .unwrap_or_default())
}

/// The members of the plan's held set in Redis, sorted.
async fn held(url: &str, prefix: &str) -> Vec<String> {
    let key = format!("{{{prefix}:slots}}:held");
    let mut held: Vec<String> =
        redis_query(url, redis::cmd("ZRANGE").arg(key).arg(0).arg(-1)).await;
    held.sort();
    held
}

/// Waits until Redis holds what `done` expects.
async fn eventually_held(url: &str, prefix: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let started = Instant::now();
    loop {
        let members = held(url, prefix).await;
        if done(&members) {
            return members;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "held in Redis not as expected within 5 s: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_takes_its_slots_in_redis_at_once_and_each_job_gives_its_own_back() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("plan-batches");
    let (a, b) = (process(&url, &prefix), process(&url, &prefix));

    assert_eq!(
        batch(&a, 3, r#"["a1","a2","a3"]"#).await.unwrap(),
        ["a1", "a2", "a3"]
    );
    eventually_held(&url, &prefix, |h| h == ["j:a1", "j:a2", "j:a3"]).await;

    // Another process's batch of 2 finds 1 free: it takes none, and waits.
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { batch(&b, 2, r#"[{"id":"b1"},{"id":"b2"}]"#).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    assert_eq!(held(&url, &prefix).await, ["j:a1", "j:a2", "j:a3"]);

    // A job of the first batch ends: the second takes its two slots together.
    a.complete("a1");
    let ids = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting batch gets its slots")
        .unwrap()
        .unwrap();
    assert_eq!(ids, ["b1", "b2"]);
    eventually_held(&url, &prefix, |h| h == ["j:a2", "j:a3", "j:b1", "j:b2"]).await;

    // Each job is given back on its own, from either process.
    b.complete("a2");
    a.complete("b1");
    eventually_held(&url, &prefix, |h| h == ["j:a3", "j:b2"]).await;
    a.complete("a3");
    b.complete("b2");
    eventually_held(&url, &prefix, <[String]>::is_empty).await;

    // A whole answer with fewer ids than jobs: what the server made holds; the rest go back.
    assert_eq!(batch(&a, 3, r#"["c1"]"#).await.unwrap(), ["c1"]);
    eventually_held(&url, &prefix, |h| h == ["j:c1"]).await;
    assert_eq!(a.in_use(), 1);

    // An answer that is not JSON: the server may have made them, held as unknown outcomes
    // in Redis (for the whole fleet), one per slot.
    assert!(batch(&b, 2, "oops").await.unwrap().is_empty());
    // (Until both are held as unknown: the creates' own places count 3 too, for a moment.)
    let members = eventually_held(&url, &prefix, |h| {
        h.len() == 3 && h.iter().filter(|m| m.starts_with("u:")).count() == 2
    })
    .await;
    let unknown: Vec<&String> = members.iter().filter(|m| m.starts_with("u:")).collect();
    assert_eq!(unknown.len(), 2, "{members:?}");
    assert!(unknown[1].ends_with("/2"), "{members:?}");

    // A batch over the plan is refused at once, and nothing is asked of Redis.
    assert!(batch(&a, 5, "[]").await.is_err());
    assert_eq!(held(&url, &prefix).await.len(), 3);
}
