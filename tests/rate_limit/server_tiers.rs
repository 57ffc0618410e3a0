//! Server mode with tiers, over real sockets on 127.0.0.1: a hyper client against an axum
//! server whose quotas come from each request's tier (named by a closure over the request),
//! upgrades at run time, unknown tiers, and a flood of fresh keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::HeaderName;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_quota::rate_limit::{Builder, RejectConfig, RejectReason, Rejection, UnknownTier};
use tower_quota::{ConfigError, Quota, RateLimitByRoute};

use crate::common::serve;

/// Which tier each API key is on: the account store an authentication layer reads.
type Accounts = Arc<Mutex<HashMap<String, &'static str>>>;

fn accounts(pairs: &[(&str, &'static str)]) -> Accounts {
    let map = pairs.iter().map(|(k, t)| ((*k).to_owned(), *t)).collect();
    Arc::new(Mutex::new(map))
}

/// Hobbyist 2 creates an hour, Scale 5; every other request 100 an hour, whatever the tier.
fn tiered(accounts: Accounts) -> Builder<RejectConfig> {
    RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_hour(2))
        .default_quota(Quota::per_hour(100))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .tier_by(
            move |head| {
                let key = head.headers().get("x-api-key")?.to_str().ok()?;
                accounts.lock().unwrap().get(key).copied()
            },
            UnknownTier::Refuse,
        )
        .tier("hobbyist", [("POST /v2/generate", Quota::per_hour(2))])
        .tier("scale", [("POST /v2/generate", Quota::per_hour(5))])
}

fn app<F>(limits: RateLimitByRoute<tower_quota::rate_limit::Reject<F>>) -> Router
where
    F: tower_quota::rate_limit::RejectResponse<axum::body::Body> + Send + Sync + 'static,
{
    Router::new()
        .route("/v2/generate", post(|| async { "created" }))
        .route("/v2/generations", get(|| async { "[]" }))
        .layer(limits)
}

struct Caller {
    client: Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
}

impl Caller {
    fn new(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { client, addr }
    }

    /// Sends `method path` as `key`: the status, `Retry-After` and body.
    async fn send(&self, method: &str, path: &str, key: &str) -> (u16, Option<u64>, String) {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("x-api-key", key)
            .body(Empty::new())
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse().unwrap());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            retry_after,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// How many of `n` creates as `key` pass.
    async fn creates(&self, key: &str, n: usize) -> usize {
        let mut passed = 0;
        for _ in 0..n {
            if self.send("POST", "/v2/generate", key).await.0 == 200 {
                passed += 1;
            }
        }
        passed
    }
}

#[tokio::test(start_paused = true)]
async fn two_keys_on_different_tiers_get_their_own_quotas() {
    let accounts = accounts(&[("sk-hobby", "hobbyist"), ("sk-scale", "scale")]);
    let limits = tiered(accounts).build().unwrap();
    let caller = Caller::new(serve(app(limits.clone())).await);

    assert_eq!(caller.creates("sk-hobby", 4).await, 2);
    assert_eq!(caller.creates("sk-scale", 8).await, 5);
    let (status, retry_after, _) = caller.send("POST", "/v2/generate", "sk-hobby").await;
    assert_eq!((status, retry_after.is_some()), (429, true));
    // A route no tier names keeps its own quota, for every tier.
    assert_eq!(
        caller.send("GET", "/v2/generations", "sk-hobby").await.0,
        200
    );

    // Once the Retry-After has passed (an hour and a sixteenth: the window's buckets), both
    // tiers' windows are clear.
    tokio::time::advance(Duration::from_secs(retry_after.unwrap() + 1)).await;
    assert_eq!(caller.creates("sk-hobby", 3).await, 2);
    assert_eq!(caller.creates("sk-scale", 6).await, 5);
    let counters = limits.snapshot()[0].counters;
    assert_eq!(counters.admitted, 14);
    assert_eq!(counters.refused.quota, 8);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_at_run_time_takes_effect_on_the_next_request() {
    let accounts = accounts(&[("sk-1", "hobbyist")]);
    let limits = tiered(accounts.clone()).build().unwrap();
    let caller = Caller::new(serve(app(limits.clone())).await);

    assert_eq!(caller.creates("sk-1", 2).await, 2);
    assert_eq!(caller.send("POST", "/v2/generate", "sk-1").await.0, 429);

    // The customer upgrades: the next request counts under Scale's quota.
    accounts.lock().unwrap().insert("sk-1".into(), "scale");
    assert_eq!(caller.creates("sk-1", 7).await, 5);

    // A tier's quota raised on the live handle: what each client counted is kept.
    limits
        .set_tier_quota("scale", "POST /v2/generate", Quota::per_hour(7))
        .unwrap();
    assert_eq!(caller.creates("sk-1", 3).await, 2);
    // A downgrade: Hobbyist's count of two is still there, its quota spent.
    accounts.lock().unwrap().insert("sk-1".into(), "hobbyist");
    assert_eq!(caller.send("POST", "/v2/generate", "sk-1").await.0, 429);

    // Run-time changes name what exists.
    let error = limits
        .set_tier_quota("gold", "POST /v2/generate", Quota::per_hour(1))
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidValue { .. }), "{error}");
    let error = limits
        .set_tier_quota("scale", "default", Quota::per_hour(1))
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { .. }),
        "{error}"
    );
    let zero = limits.set_tier_quota("scale", "POST /v2/generate", Quota::per_hour(0));
    assert!(matches!(zero, Err(ConfigError::InvalidQuota { .. })));
}

#[tokio::test(start_paused = true)]
async fn unknown_tiers_follow_the_policy_written_down() {
    // Refused: 403, no Retry-After, a body of the layer's builder.
    let limits = tiered(accounts(&[("sk-1", "hobbyist"), ("sk-odd", "platinum")]))
        .reject_with(|rejection: &Rejection| {
            let body = match rejection.reason {
                RejectReason::UnknownTier => "unknown tier",
                _ => "slow down",
            };
            http::Response::new(axum::body::Body::from(body))
        })
        .build()
        .unwrap();
    let caller = Caller::new(serve(app(limits.clone())).await);
    for key in ["sk-nobody", "sk-odd"] {
        let (status, retry_after, body) = caller.send("POST", "/v2/generate", key).await;
        assert_eq!(
            (status, retry_after, body.as_str()),
            (403, None, "unknown tier")
        );
    }
    assert_eq!(caller.send("POST", "/v2/generate", "sk-1").await.0, 200);
    assert_eq!(limits.snapshot()[0].counters.refused.unknown_tier, 2);

    // Counted as a named tier: every unknown key gets Hobbyist's quota of its own.
    let accounts = accounts(&[]);
    let named = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_hour(9))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .tier_by(
            move |head| {
                let key = head.headers().get("x-api-key")?.to_str().ok()?;
                accounts.lock().unwrap().get(key).copied()
            },
            UnknownTier::Use("hobbyist".into()),
        )
        .tier("hobbyist", [("POST /v2/generate", Quota::per_hour(2))])
        .build()
        .unwrap();
    let caller = Caller::new(serve(app(named)).await);
    assert_eq!(caller.creates("sk-a", 3).await, 2);
    assert_eq!(caller.creates("sk-b", 3).await, 2);

    // Counted under the routes' own quotas.
    let own = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_hour(1))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .tier_by(|_| None::<&str>, UnknownTier::RouteQuotas)
        .tier("scale", [("POST /v2/generate", Quota::per_hour(5))])
        .build()
        .unwrap();
    let caller = Caller::new(serve(app(own)).await);
    assert_eq!(caller.creates("sk-a", 3).await, 1);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_fresh_keys_stays_bounded_and_locks_nobody_out() {
    // Every fresh key is a Scale customer (a lookup that says so for any key).
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_hour(1))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .max_keys(64)
        .tier_by(
            |head| {
                let key = head.headers().get("x-api-key")?.to_str().ok()?;
                Some(if key == "sk-hobby" {
                    "hobbyist"
                } else {
                    "scale"
                })
            },
            UnknownTier::Refuse,
        )
        .tier("hobbyist", [("POST /v2/generate", Quota::per_hour(2))])
        .tier("scale", [("POST /v2/generate", Quota::per_hour(3))])
        .build()
        .unwrap();
    let caller = Caller::new(serve(app(limits.clone())).await);
    assert_eq!(caller.creates("sk-hobby", 3).await, 2);
    for i in 0..3_000 {
        // Each fresh key sends its whole quota and one more.
        let key = format!("sk-flood-{i}");
        assert_eq!(caller.creates(&key, 4).await, 3, "{key}");
    }
    // A newcomer is admitted at once; the client at its quota in another tier stays refused.
    assert_eq!(caller.send("POST", "/v2/generate", "sk-new").await.0, 200);
    assert_eq!(caller.send("POST", "/v2/generate", "sk-hobby").await.0, 429);
    let snapshot = &limits.snapshot()[0];
    // 64 clients a table (rounded to the 16 shards), one table per tier that names the route.
    assert!(snapshot.tracked_keys <= 2 * 64, "{}", snapshot.tracked_keys);
    assert!(snapshot.counters.keys_forgotten >= 2_900);
}

#[test]
fn bad_tier_settings_are_typed_errors() {
    let base = || {
        RateLimitByRoute::builder()
            .route("POST /v2/generate", Quota::per_hour(2))
            .reject()
    };
    let by = |b: Builder<RejectConfig>, unknown| b.tier_by(|_| Some("a"), unknown);
    let one = |quota| [("POST /v2/generate", quota)];

    // A zero quota, a route the layer does not have, a route named twice.
    let error = by(base(), UnknownTier::Refuse)
        .tier("a", one(Quota::per_hour(0)))
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidQuota { .. }), "{error}");
    let error = by(base(), UnknownTier::Refuse)
        .tier("a", [("GET /nowhere", Quota::per_hour(1))])
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::UnknownRoute { .. }), "{error}");
    let error = by(base(), UnknownTier::Refuse)
        .tier(
            "a",
            [
                ("POST /v2/generate", Quota::per_hour(1)),
                ("POST /v2/generate", Quota::per_hour(2)),
            ],
        )
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidValue { .. }), "{error}");
    // Another unit, or another number of quotas, than the route's.
    let error = by(base(), UnknownTier::Refuse)
        .tier("a", one(Quota::per_hour(5).counting("tokens")))
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidQuota { .. }), "{error}");
    // An unknown tier sent to a tier nobody named; a tier named twice.
    let error = by(base(), UnknownTier::Use("b".into()))
        .tier("a", one(Quota::per_hour(1)))
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidValue { .. }), "{error}");
    let error = by(base(), UnknownTier::Refuse)
        .tier("a", one(Quota::per_hour(1)))
        .tier("a", one(Quota::per_hour(1)))
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidValue { .. }), "{error}");
    // Tiers without the closure that names them, and the closure without tiers.
    let error = base()
        .tier("a", one(Quota::per_hour(1)))
        .build()
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { .. }),
        "{error}"
    );
    let error = by(base(), UnknownTier::Refuse).build().unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { .. }),
        "{error}"
    );
}

/// A service instance that refused a request (an unknown tier's 403, a quota's 429) gives
/// back what its caller reserved below it, so another instance gets the `ConcurrencyLimit`
/// permit while the refusing one idles. Before, it kept it (an outside attack found it).
#[tokio::test(start_paused = true)]
async fn a_refused_request_gives_back_the_permit_reserved_below() {
    use tower::{Service, ServiceBuilder, ServiceExt};

    let accounts = accounts(&[("sk-hobby", "hobbyist")]);
    let limits = tiered(accounts).build().unwrap();
    let api = tower::service_fn(|_: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(()))
    });
    let service = ServiceBuilder::new()
        .layer(limits)
        .concurrency_limit(1)
        .service(api);
    let create = |key: &str| {
        http::Request::post("http://api.test/v2/generate")
            .header("x-api-key", key)
            .body(())
            .unwrap()
    };
    for (key, status) in [
        ("sk-nobody", 403),
        ("sk-hobby", 200),
        ("sk-hobby", 200),
        ("sk-hobby", 429),
    ] {
        let mut idle = service.clone();
        let answer = idle.ready().await.unwrap().call(create(key)).await.unwrap();
        assert_eq!(answer.status(), status, "{key}");
        if status != 200 {
            let mut other = service.clone();
            let ready = tokio::time::timeout(Duration::from_secs(30), other.ready()).await;
            assert!(
                ready.is_ok(),
                "the instance that answered {status} kept the permit"
            );
        }
        drop(idle);
    }
}
