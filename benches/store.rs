//! The cost of a shared store: the same layers in memory and over Redis on loopback, with a
//! bare Redis round trip (`PING`) as the floor.
//!
//! Needs `redis-server` on the `PATH` (started here on a free port of 127.0.0.1), or
//! `TOWER_QUOTA_REDIS_URL` naming a running one.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use http::{Method, Request, Response, Uri};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

use crate::redis_server::redis;

type Inner = tower::util::ServiceFn<fn(Request<()>) -> Ready<Result<Response<()>, Infallible>>>;

fn inner() -> Inner {
    service_fn(|_| ready(Ok(Response::new(()))))
}

fn request(method: Method, uri: &'static str) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from_static(uri);
    request
}

fn status() -> Request<()> {
    request(Method::GET, "http://api.test/v2/generate/0b6b8f2e")
}

fn create() -> Request<()> {
    request(Method::POST, "http://api.test/v2/generate")
}

/// One row: `layer` over a ready inner service, one request of `make` through it.
fn layered<L>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    layer: &L,
    make: fn() -> Request<()>,
) where
    L: Layer<Inner>,
    L::Service: Service<Request<()>> + Clone,
{
    group.bench_function(name, |b| {
        let service = layer.layer(inner());
        b.to_async(runtime)
            .iter(|| black_box(service.clone().oneshot(make())))
    });
}

fn huge() -> Quota {
    Quota::new(u32::MAX, Duration::from_millis(1))
}

pub(crate) fn overhead(c: &mut Criterion) {
    let Some(server) = redis() else {
        eprintln!(
            "store benches skipped: no redis-server on the PATH and no TOWER_QUOTA_REDIS_URL"
        );
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(async {
        RedisStore::builder(&server.1)
            .prefix("bench")
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap()
    });
    let client = |store: Option<RedisStore>| {
        let builder = RateLimitByRoute::builder().route("GET /v2/generate/{id}", huge());
        match store {
            Some(store) => builder.store(store),
            None => builder,
        }
        .build()
        .unwrap()
    };
    let server_mode = |store: Option<RedisStore>| {
        let builder = RateLimitByRoute::builder()
            .route("GET /v2/generate/{id}", huge())
            .reject();
        match store {
            Some(store) => builder.store(store),
            None => builder,
        }
        .build()
        .unwrap()
    };
    let plan = |store: Option<RedisStore>| {
        let builder = ConcurrencyLimitByPlan::builder(Plan::Enterprise(1 << 30)).in_flight();
        match store {
            Some(store) => builder.store(store),
            None => builder,
        }
        .build()
        .unwrap()
    };
    let (mem_client, redis_client) = (client(None), client(Some(store.clone())));
    let (mem_server, redis_server) = (server_mode(None), server_mode(Some(store.clone())));
    let (mem_plan, redis_plan) =
        runtime.block_on(async { (plan(None), plan(Some(store.clone()))) });
    let ping = runtime.block_on(async {
        let client = redis::Client::open(server.1.as_str()).unwrap();
        redis::aio::ConnectionManager::new(client).await.unwrap()
    });

    let mut group = c.benchmark_group("shared_store");
    group.bench_function("Redis PING round trip (the floor)", |b| {
        b.to_async(&runtime).iter(|| {
            let mut ping = ping.clone();
            async move {
                let _: () = redis::cmd("PING").query_async(&mut ping).await.unwrap();
            }
        })
    });
    let runtime = &runtime;
    layered(
        &mut group,
        runtime,
        "client mode, in memory",
        &mem_client,
        status,
    );
    layered(
        &mut group,
        runtime,
        "client mode, Redis (take; give back queued)",
        &redis_client,
        status,
    );
    layered(
        &mut group,
        runtime,
        "server mode, in memory",
        &mem_server,
        status,
    );
    layered(
        &mut group,
        runtime,
        "server mode, Redis (one hit)",
        &redis_server,
        status,
    );
    layered(
        &mut group,
        runtime,
        "job slot in flight, in memory",
        &mem_plan,
        create,
    );
    let name = "job slot in flight, Redis (take; give back queued)";
    layered(&mut group, runtime, name, &redis_plan, create);
    group.finish();
}
