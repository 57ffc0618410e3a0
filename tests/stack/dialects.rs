//! A quota nobody configured, learnt from a server that states its limits in one dialect: a
//! hyper client with `RateLimitByRoute::learn_quota()` against an axum server over real
//! sockets on 127.0.0.1, both on tokio's paused clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::headers::Dialect;
use tower_quota::{RateLimitByRoute, ServiceBuilderExt};

use crate::common::serve;

/// The server's limit: this many requests in each fixed window.
const LIMIT: u64 = 20;
const WINDOW: Duration = Duration::from_secs(60);

/// A server counting requests in fixed windows of its own, and stating its limit only through
/// the fields of one dialect.
#[derive(Clone)]
struct Stating {
    dialect: Dialect,
    start: Instant,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    window: u64,
    used: u64,
    served: u64,
    refused: u64,
}

impl Stating {
    fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            start: Instant::now(),
            counts: Arc::default(),
        }
    }

    /// The fields of this dialect, for `remaining` left until `reset` from now.
    fn fields(&self, remaining: u64, reset: Duration) -> HeaderMap {
        let mut fields = HeaderMap::new();
        let mut set = |name: &'static str, value: String| {
            fields.insert(name, HeaderValue::from_str(&value).unwrap());
        };
        // A time of the wall clock, rounded up to a whole second as those dialects write it.
        let wall_secs = || {
            let at = SystemTime::now() + reset;
            at.duration_since(UNIX_EPOCH).unwrap().as_secs() + 1
        };
        match self.dialect {
            Dialect::Ietf => {
                let window = WINDOW.as_secs();
                set(
                    "ratelimit-policy",
                    format!(r#""minute";q={LIMIT};w={window}"#),
                );
                let t = reset.as_secs_f64().ceil() as u64;
                set("ratelimit", format!(r#""minute";r={remaining};t={t}"#));
            }
            Dialect::IetfTriple => {
                set("ratelimit-limit", LIMIT.to_string());
                set("ratelimit-remaining", remaining.to_string());
                set("ratelimit-reset", format!("{:.3}", reset.as_secs_f64()));
            }
            Dialect::XRateLimit => {
                set("x-ratelimit-limit", LIMIT.to_string());
                set("x-ratelimit-remaining", remaining.to_string());
                set("x-ratelimit-reset", format!("{:.3}", reset.as_secs_f64()));
            }
            Dialect::OpenAi => {
                set("x-ratelimit-limit-requests", LIMIT.to_string());
                set("x-ratelimit-remaining-requests", remaining.to_string());
                set(
                    "x-ratelimit-reset-requests",
                    format!("{}ms", reset.as_millis() + 1),
                );
            }
            Dialect::Anthropic => {
                set("anthropic-ratelimit-requests-limit", LIMIT.to_string());
                set(
                    "anthropic-ratelimit-requests-remaining",
                    remaining.to_string(),
                );
                let at = UNIX_EPOCH + Duration::from_secs(wall_secs());
                set(
                    "anthropic-ratelimit-requests-reset",
                    humantime::format_rfc3339_seconds(at).to_string(),
                );
            }
            Dialect::GitHub => {
                set("x-ratelimit-limit", LIMIT.to_string());
                set("x-ratelimit-remaining", remaining.to_string());
                set("x-ratelimit-used", (LIMIT - remaining).to_string());
                set("x-ratelimit-reset", wall_secs().to_string());
                set("x-ratelimit-resource", "core".into());
            }
            _ => unreachable!("a dialect this test does not speak"),
        }
        fields
    }
}

async fn handle(State(server): State<Stating>) -> impl IntoResponse {
    let now = Instant::now();
    let elapsed = now - server.start;
    let window = elapsed.as_nanos() / WINDOW.as_nanos();
    let reset = WINDOW * (window as u32 + 1) - elapsed;
    let mut counts = server.counts.lock().unwrap();
    if counts.window != window as u64 {
        counts.window = window as u64;
        counts.used = 0;
    }
    if counts.used >= LIMIT {
        counts.refused += 1;
        let status = if server.dialect == Dialect::GitHub {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        return (status, server.fields(0, reset), "limited");
    }
    counts.used += 1;
    counts.served += 1;
    (
        StatusCode::OK,
        server.fields(LIMIT - counts.used, reset),
        "ok",
    )
}

type Svc = tower::util::BoxCloneService<
    http::Request<Empty<bytes::Bytes>>,
    http::Response<hyper::body::Incoming>,
    tower_quota::BoxError,
>;

async fn send(mut svc: Svc, base: &std::net::SocketAddr) -> Result<(), tower_quota::BoxError> {
    let request = http::Request::get(format!("http://{base}/items"))
        .body(Empty::new())
        .unwrap();
    let response = svc.ready().await?.call(request).await?;
    response.into_body().collect().await?;
    Ok(())
}

/// Sends `n` requests through a client that learns the quota; what the server refused, how
/// many it served, and how long it took.
async fn run(dialect: Dialect, n: usize) -> (u64, u64, Duration) {
    let server = Stating::new(dialect);
    let base = serve(
        Router::new()
            .route("/items", get(handle))
            .with_state(server.clone()),
    )
    .await;
    let limits = RateLimitByRoute::builder().learn_quota().build().unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let svc = ServiceBuilder::new()
        .rate_limit_by_route(limits)
        .service(client);
    let svc: Svc = tower::util::BoxCloneService::new(svc);
    let start = Instant::now();
    // The first response states the limit; everything after it is paced by what it says.
    send(svc.clone(), &base).await.unwrap();
    let mut calls: FuturesUnordered<_> = (1..n).map(|_| send(svc.clone(), &base)).collect();
    while let Some(result) = calls.next().await {
        result.unwrap();
    }
    let elapsed = start.elapsed();
    let counts = server.counts.lock().unwrap();
    (counts.refused, counts.served, elapsed)
}

async fn learns_in(dialect: Dialect) {
    let n = 200;
    let (refused, served, elapsed) = run(dialect, n).await;
    assert_eq!(
        refused, 0,
        "{dialect}: no refusal after the first statement"
    );
    assert_eq!(served, n as u64);
    // At least 95% of the stated quota used: the windows it sent in (the last one begun at
    // the end), each of `LIMIT`.
    let windows = (elapsed.as_secs_f64() / WINDOW.as_secs_f64()).floor() + 1.0;
    let used = n as f64 / (windows * LIMIT as f64);
    assert!(
        used >= 0.95,
        "{dialect}: {used:.3} of the quota in {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_quota_stated_in_the_ietf_draft_is_learnt() {
    learns_in(Dialect::Ietf).await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_stated_in_the_older_ietf_triple_is_learnt() {
    learns_in(Dialect::IetfTriple).await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_stated_in_x_ratelimit_is_learnt() {
    learns_in(Dialect::XRateLimit).await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_stated_in_openais_dialect_is_learnt() {
    learns_in(Dialect::OpenAi).await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_stated_in_anthropics_dialect_is_learnt() {
    learns_in(Dialect::Anthropic).await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_stated_in_githubs_dialect_is_learnt() {
    learns_in(Dialect::GitHub).await;
}

/// The local Sync API stating its limits in `dialect`: a client that learns the quota lists
/// generations 700 times (600 a minute allowed), with no 429 after the first response.
async fn the_local_api_states_its_limits_in(dialect: Dialect) {
    use sync_mock::{Config, Endpoint, MockServer};
    let server = MockServer::start(Config::default().state_limits(dialect))
        .await
        .unwrap();
    let (elapsed, first) = list_many(&server, dialect, 700).await;
    assert_eq!(
        (first.limit, first.remaining),
        (Some(600), 599),
        "{dialect}"
    );
    let stats = server.stats();
    assert_eq!(stats.rate_limited_total(), 0, "{dialect}");
    assert_eq!(stats.requests_to(Endpoint::List), 700);
    // The 100 past the first minute's 600 wait for it to clear, and no longer.
    assert!(
        (Duration::from_secs(59)..=Duration::from_secs(62)).contains(&elapsed),
        "{dialect}: {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leaky_bucket_states_what_it_truly_allows() {
    use sync_mock::{Algorithm, Config, Endpoint, MockServer};
    // 600 a minute drained evenly, two at once: its statements must keep a client that
    // trusts them from any 429.
    let config = Config::default()
        .algorithm(Algorithm::LeakyBucket { burst: 2 })
        .state_limits(Dialect::XRateLimit);
    let server = MockServer::start(config).await.unwrap();
    let (_, first) = list_many(&server, Dialect::XRateLimit, 60).await;
    assert_eq!(first.limit, Some(2), "a bucket of two states two");
    let stats = server.stats();
    assert_eq!(stats.rate_limited_total(), 0);
    assert_eq!(stats.requests_to(Endpoint::List), 60);
}

/// The crate's own server window states its limits (the layer's `RateLimit` fields, in the
/// mock's chosen dialect): a client that learns them and trusts them meets no 429, though the
/// window frees a place up to a sixteenth of a period later than an exact log (the 100 past
/// the first 600 wait 63.75 s, not 60: measured 64 s).
#[tokio::test(start_paused = true)]
async fn the_crates_own_window_states_what_it_truly_allows() {
    use sync_mock::{Algorithm, Config, Endpoint, MockServer};
    for dialect in [Dialect::Ietf, Dialect::XRateLimit, Dialect::OpenAi] {
        let config = Config::default()
            .algorithm(Algorithm::BucketedWindow)
            .state_limits(dialect);
        let server = MockServer::start(config).await.unwrap();
        let (elapsed, first) = list_many(&server, dialect, 700).await;
        assert_eq!(
            (first.limit, first.remaining),
            (Some(600), 599),
            "{dialect}"
        );
        let stats = server.stats();
        assert_eq!(stats.rate_limited_total(), 0, "{dialect}");
        assert_eq!(stats.requests_to(Endpoint::List), 700);
        assert!(
            (Duration::from_secs(63)..=Duration::from_secs(66)).contains(&elapsed),
            "{dialect}: {elapsed:?}"
        );
    }
}

/// Lists generations `n` times through a client that learns the quota, the first alone; how
/// long the rest took. The first answer must state the limit in `dialect`.
async fn list_many(
    server: &sync_mock::MockServer,
    dialect: Dialect,
    n: usize,
) -> (Duration, tower_quota::headers::RateLimitInfo) {
    let limits = RateLimitByRoute::builder().learn_quota().build().unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let svc: Svc = tower::util::BoxCloneService::new(
        ServiceBuilder::new()
            .rate_limit_by_route(limits)
            .map_request(|mut request: http::Request<Empty<bytes::Bytes>>| {
                let key = HeaderValue::from_static(sync_mock::DEFAULT_KEY);
                request.headers_mut().insert("x-api-key", key);
                request
            })
            .service(client),
    );
    let list = |svc: Svc| {
        let uri = server.url("/v2/generations");
        async move {
            let mut svc = svc;
            let request = http::Request::get(uri).body(Empty::new()).unwrap();
            let response = svc.ready().await?.call(request).await?;
            let fields = response.headers().clone();
            response.into_body().collect().await?;
            Ok::<_, tower_quota::BoxError>(fields)
        }
    };
    // The first answer states the limit, in the dialect asked for.
    let fields = list(svc.clone()).await.unwrap();
    let stated = tower_quota::headers::read(
        &fields,
        SystemTime::now(),
        tower_quota::headers::Dialects::all(),
    );
    let first = stated.statements[0].clone();
    assert_eq!(first.dialect, dialect);
    let start = Instant::now();
    let mut calls: FuturesUnordered<_> = (1..n).map(|_| list(svc.clone())).collect();
    while let Some(result) = calls.next().await {
        result.unwrap();
    }
    (start.elapsed(), first)
}

#[tokio::test(start_paused = true)]
async fn the_local_api_can_state_its_limits_in_each_dialect() {
    for dialect in [
        Dialect::Ietf,
        Dialect::IetfTriple,
        Dialect::XRateLimit,
        Dialect::OpenAi,
        Dialect::Anthropic,
        Dialect::GitHub,
    ] {
        the_local_api_states_its_limits_in(dialect).await;
    }
}

/// GitHub's resources as a server counts them: `core` for `/repos/..` and `/users/..`,
/// `search` for `/search/..`, each with its own limit in fixed windows.
#[derive(Clone)]
struct Resources {
    start: Instant,
    /// Per resource, `core` then `search`.
    counts: Arc<Mutex<[Counts; 2]>>,
}

const CORE_LIMIT: u64 = 20;
const SEARCH_LIMIT: u64 = 5;

async fn resource(
    State(server): State<Resources>,
    axum::extract::Path((kind, _)): axum::extract::Path<(String, String)>,
) -> impl IntoResponse {
    let (index, name, limit) = match kind.as_str() {
        "search" => (1, "search", SEARCH_LIMIT),
        _ => (0, "core", CORE_LIMIT),
    };
    let elapsed = server.start.elapsed();
    let window = (elapsed.as_nanos() / WINDOW.as_nanos()) as u64;
    let reset = WINDOW * (window as u32 + 1) - elapsed;
    let mut counts = server.counts.lock().unwrap();
    let count = &mut counts[index];
    if count.window != window {
        count.window = window;
        count.used = 0;
    }
    let refused = count.used >= limit;
    if refused {
        count.refused += 1;
    } else {
        count.used += 1;
        count.served += 1;
    }
    let at = SystemTime::now() + reset;
    let reset_secs = at.duration_since(UNIX_EPOCH).unwrap().as_secs() + 1;
    let mut fields = HeaderMap::new();
    let mut set = |field: &'static str, value: String| {
        fields.insert(field, HeaderValue::from_str(&value).unwrap());
    };
    set("x-ratelimit-limit", limit.to_string());
    set("x-ratelimit-remaining", (limit - count.used).to_string());
    set("x-ratelimit-used", count.used.to_string());
    set("x-ratelimit-reset", reset_secs.to_string());
    set("x-ratelimit-resource", name.to_owned());
    let status = if refused {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::OK
    };
    (status, fields, "")
}

#[tokio::test(start_paused = true)]
async fn routes_that_the_server_says_share_a_quota_share_the_learnt_one() {
    let server = Resources {
        start: Instant::now(),
        counts: Arc::default(),
    };
    let base = serve(
        Router::new()
            .route("/{kind}/{name}", get(resource))
            .with_state(server.clone()),
    )
    .await;
    // Nobody configured a quota: three learnt routes, two of which GitHub counts as `core`.
    let limits = RateLimitByRoute::builder()
        .learn_route("GET /repos/{name}")
        .learn_route("GET /users/{name}")
        .learn_route("GET /search/{name}")
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let svc: Svc = tower::util::BoxCloneService::new(
        ServiceBuilder::new()
            .rate_limit_by_route(limits.clone())
            .service(client),
    );
    let get = |path: String| {
        let mut svc = svc.clone();
        async move {
            let request = http::Request::get(format!("http://{base}{path}"))
                .body(Empty::new())
                .unwrap();
            let response = svc.ready().await?.call(request).await?;
            response.into_body().collect().await?;
            Ok::<_, tower_quota::BoxError>(())
        }
    };
    // One request on each route first: each learns what its quota is called.
    for kind in ["repos", "users", "search"] {
        get(format!("/{kind}/first")).await.unwrap();
    }
    let snapshot = limits.snapshot();
    assert_eq!(snapshot[1].counted_in.as_deref(), Some("GET /repos/{name}"));
    assert_eq!(snapshot[2].counted_in, None, "search is a quota of its own");
    // Then 198 on `core`'s two routes (ten windows' worth with the first two) and 30 on
    // `search`, all at once.
    let start = Instant::now();
    let paths = (0..198)
        .map(|i| format!("/{}/{i}", ["repos", "users"][i % 2]))
        .chain((0..30).map(|i| format!("/search/{i}")));
    let mut calls: FuturesUnordered<_> = paths.map(get).collect();
    while let Some(result) = calls.next().await {
        result.unwrap();
    }
    let elapsed = start.elapsed();
    let counts = server.counts.lock().unwrap();
    let [core, search] = &*counts;
    assert_eq!(
        (core.refused, search.refused),
        (0, 0),
        "no refusal on either"
    );
    assert_eq!((core.served, search.served), (200, 31));
    // `core` was the longer to get through: at least 95% of it used over its windows.
    let windows = (elapsed.as_secs_f64() / WINDOW.as_secs_f64()).floor() + 1.0;
    let used = 198.0 / (windows * CORE_LIMIT as f64);
    assert!(used >= 0.95, "{used:.3} of core's quota in {elapsed:?}");
}
