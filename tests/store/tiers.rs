//! Server-mode tiers counted in Redis: a fleet of axum servers gives each client the quotas
//! of its tier, and a client's count follows it across a change of tier.

#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use http::HeaderName;
use tower_quota::rate_limit::UnknownTier;
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{ConfigError, Quota, RateLimitByRoute};

use super::rate_limits::{get_request, http_client, HttpClient};
use crate::common::redis::{shared_redis, unique_prefix};
use crate::common::serve;

type Accounts = Arc<Mutex<HashMap<&'static str, &'static str>>>;

/// A server of the fleet: Hobbyist 2 creates a minute, Scale 5, counted in Redis.
async fn server(url: &str, prefix: &str, accounts: Accounts) -> std::net::SocketAddr {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(1))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(2))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .tier_by(
            move |head| {
                let key = head.headers().get("x-api-key")?.to_str().ok()?;
                accounts.lock().unwrap().get(key).copied()
            },
            UnknownTier::Refuse,
        )
        .tier("hobbyist", [("POST /v2/generate", Quota::per_minute(2))])
        .tier("scale", [("POST /v2/generate", Quota::per_minute(5))])
        .store(store)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v2/generate", post(|| async { "created" }))
        .layer(limits);
    serve(app).await
}

/// Sends a create as `key` to `addr`: its status and `RateLimit-Policy`.
async fn create(
    client: &HttpClient,
    addr: std::net::SocketAddr,
    key: &str,
) -> (StatusCode, String) {
    let mut request = get_request(addr, "/v2/generate");
    *request.method_mut() = http::Method::POST;
    request
        .headers_mut()
        .insert("x-api-key", http::HeaderValue::from_str(key).unwrap());
    let response = client.request(request).await.unwrap();
    let policy = response
        .headers()
        .get("ratelimit-policy")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (response.status(), policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_gives_each_tier_its_quota_and_a_client_its_count_across_an_upgrade() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("tiers");
    let accounts: Accounts = Arc::new(Mutex::new(HashMap::from([
        ("sk-hobby", "hobbyist"),
        ("sk-scale", "scale"),
    ])));
    let fleet = [
        server(&url, &prefix, accounts.clone()).await,
        server(&url, &prefix, accounts.clone()).await,
    ];
    let client = http_client();
    let passed = |statuses: &[(StatusCode, String)]| {
        statuses
            .iter()
            .filter(|(s, _)| *s == StatusCode::OK)
            .count()
    };

    let mut hobby = Vec::new();
    let mut scale = Vec::new();
    for i in 0..8 {
        hobby.push(create(&client, fleet[i % 2], "sk-hobby").await);
        scale.push(create(&client, fleet[i % 2], "sk-scale").await);
    }
    assert_eq!(passed(&hobby), 2, "{hobby:?}");
    assert_eq!(passed(&scale), 5, "{scale:?}");
    // Each tier's policy on its responses.
    assert!(hobby[0].1.contains("q=2"), "{:?}", hobby[0]);
    assert!(scale[0].1.contains("q=5"), "{:?}", scale[0]);
    // An unknown key is refused.
    assert_eq!(
        create(&client, fleet[0], "sk-nobody").await.0,
        StatusCode::FORBIDDEN
    );

    // The upgrade takes effect on the next request, on every server, with the two creates
    // the client already made counted: three more, not five.
    accounts.lock().unwrap().insert("sk-hobby", "scale");
    let mut upgraded = Vec::new();
    for i in 0..6 {
        upgraded.push(create(&client, fleet[i % 2], "sk-hobby").await);
    }
    assert_eq!(passed(&upgraded), 3, "{upgraded:?}");
    assert!(upgraded[0].1.contains("q=5"), "{:?}", upgraded[0]);
}

/// Tiers of different periods on one route cannot share a store's count. In Redis a client's
/// buckets lie under one key whatever its tier, indexed by `now / (period / 16)`: before, a
/// Hobbyist's buckets of 200 ms, once upgraded to 5 per 2 s, were never stale to the Scale
/// window and counted against the client for as long as it stayed active (3 of 5 creates back
/// every 2.4 s, found by an outside review). Now `build` refuses such tiers with a store, and
/// `set_tier_quota` / `set_quota` refuse a change of period or algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_store_tiers_of_another_period_or_algorithm_are_a_typed_error() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let store = || {
        RedisStore::builder(url.as_str())
            .prefix(unique_prefix("tier-periods"))
            .build()
            .unwrap()
    };
    let tiered = |scale: Quota| {
        RateLimitByRoute::builder()
            .route(
                "POST /v2/generate",
                Quota::new(2, Duration::from_millis(200)),
            )
            .reject()
            .key_header(HeaderName::from_static("x-api-key"))
            .tier_by(|_| Some("scale"), UnknownTier::Refuse)
            .tier("scale", [("POST /v2/generate", scale)])
    };
    for scale in [
        Quota::new(5, Duration::from_secs(2)),
        Quota::new(5, Duration::from_millis(200)).with_burst(2),
    ] {
        let error = tiered(scale).store(store()).build().unwrap_err();
        assert!(matches!(error, ConfigError::InvalidQuota { .. }), "{error}");
        // In this process alone, each tier keeps its own table: allowed.
        assert!(tiered(scale).build().is_ok());
    }
    let limits = tiered(Quota::new(5, Duration::from_millis(200)))
        .store(store())
        .build()
        .unwrap();
    for quota in [
        Quota::new(5, Duration::from_secs(2)),
        Quota::new(5, Duration::from_millis(200)).with_burst(2),
    ] {
        assert!(limits
            .set_tier_quota("scale", "POST /v2/generate", quota)
            .is_err());
        assert!(limits.set_quota("POST /v2/generate", quota).is_err());
    }
    // A new count is fine.
    let quota = Quota::new(9, Duration::from_millis(200));
    limits
        .set_tier_quota("scale", "POST /v2/generate", quota)
        .unwrap();
    limits.set_quota("POST /v2/generate", quota).unwrap();
}
