//! Server mode of `RateLimitByRoute`, on tokio's paused clock.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{HeaderName, Method, Request, Response, StatusCode};
use tokio::time::advance;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::rate_limit::Rejection;
use tower_quota::{ConfigError, Quota, RateLimitByRoute};

fn ok_service() -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> + Clone
{
    service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new("ok".to_owned())) })
}

fn req(path: &str, key: Option<&str>) -> Request<()> {
    let mut builder = Request::builder().method(Method::POST).uri(path);
    if let Some(key) = key {
        builder = builder.header("x-api-key", key);
    }
    builder.body(()).unwrap()
}

async fn send<S>(svc: &mut S, request: Request<()>) -> Response<String>
where
    S: Service<Request<()>, Response = Response<String>, Error = Infallible>,
{
    svc.ready().await.unwrap().call(request).await.unwrap()
}

fn header<'a, B>(response: &'a Response<B>, name: &str) -> &'a str {
    response.headers()[name].to_str().unwrap()
}

#[tokio::test(start_paused = true)]
async fn answers_excess_with_429_and_the_rate_limit_fields() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(2))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    for _ in 0..2 {
        let response = send(&mut svc, req("/v2/generate", Some("alice"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body(), "ok");
    }
    advance(Duration::from_millis(400)).await;
    let refused = send(&mut svc, req("/v2/generate", Some("alice"))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body(), "", "the default body is empty");
    // The two went in the first of the window's 16 buckets of 3.75 s, which stops counting
    // 17 buckets later, at 63.75 s: 63.35 s from now, rounded up to whole seconds.
    assert_eq!(header(&refused, "retry-after"), "64");
    assert_eq!(
        header(&refused, "ratelimit-policy"),
        "\"POST /v2/generate\";q=2;w=60"
    );
    assert_eq!(
        header(&refused, "ratelimit"),
        "\"POST /v2/generate\";r=0;t=64"
    );

    // Another key has its own quota; requests with no key share one anonymous quota.
    assert_eq!(
        send(&mut svc, req("/v2/generate", Some("bob")))
            .await
            .status(),
        200
    );
    assert_eq!(
        send(&mut svc, req("/v2/generate", None)).await.status(),
        200
    );
    assert_eq!(
        send(&mut svc, req("/v2/generate", None)).await.status(),
        200
    );
    assert_eq!(
        send(&mut svc, req("/v2/generate", None)).await.status(),
        429
    );
    // Unmatched routes pass, with no default quota.
    for _ in 0..10 {
        assert_eq!(
            send(&mut svc, req("/v2/other", Some("alice")))
                .await
                .status(),
            200
        );
    }
    // The window slides: alice may go again when told.
    advance(Duration::from_millis(63_349)).await;
    assert_eq!(
        send(&mut svc, req("/v2/generate", Some("alice")))
            .await
            .status(),
        429
    );
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        send(&mut svc, req("/v2/generate", Some("alice")))
            .await
            .status(),
        200
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_whole_seconds_rounded_up_never_zero() {
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_second(5).with_burst(1))
        .reject()
        .rate_limit_headers(false)
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    assert_eq!(send(&mut svc, req("/", None)).await.status(), 200);
    let refused = send(&mut svc, req("/", None)).await;
    assert_eq!(refused.status(), 429);
    // 200 ms to wait is sent as 1 s, not 0.
    assert_eq!(header(&refused, "retry-after"), "1");
    assert!(refused.headers().get("ratelimit").is_none());
    assert!(refused.headers().get("ratelimit-policy").is_none());
    advance(Duration::from_millis(200)).await;
    assert_eq!(send(&mut svc, req("/", None)).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn the_429_response_is_pluggable() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .reject()
        .reject_with(|rejection: &Rejection| {
            let body = format!(
                r#"{{"statusCode":429,"errorCode":"rate_limit_exceeded","message":"{} allows {} requests per minute","error":"Too Many Requests"}}"#,
                rejection.route,
                rejection.quota.count()
            );
            Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .unwrap()
        })
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    send(&mut svc, req("/v2/generate", None)).await;
    let refused = send(&mut svc, req("/v2/generate", None)).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "content-type"), "application/json");
    assert_eq!(header(&refused, "retry-after"), "64");
    let body: serde_json_lite::Value = serde_json_lite::parse(refused.body());
    assert_eq!(body.get("errorCode"), Some("rate_limit_exceeded"));
    assert!(refused
        .body()
        .contains("POST /v2/generate allows 1 requests per minute"));
}

/// Just enough JSON reading for the assertion above, without a dependency for it.
mod serde_json_lite {
    pub(super) struct Value(String);
    pub(super) fn parse(text: &str) -> Value {
        assert!(text.starts_with('{') && text.ends_with('}'), "{text}");
        Value(text.to_owned())
    }
    impl Value {
        pub(super) fn get(&self, key: &str) -> Option<&str> {
            let needle = format!("\"{key}\":\"");
            let start = self.0.find(&needle)? + needle.len();
            let end = self.0[start..].find('"')? + start;
            Some(&self.0[start..end])
        }
    }
}

#[tokio::test(start_paused = true)]
async fn keys_by_peer_ip() {
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(1))
        .reject()
        .key_peer_ip()
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    let from = |ip: [u8; 4], port: u16| {
        let mut r = req("/", None);
        r.extensions_mut()
            .insert(SocketAddr::from((IpAddr::from(ip), port)));
        r
    };
    assert_eq!(
        send(&mut svc, from([10, 0, 0, 1], 1000)).await.status(),
        200
    );
    // Another connection from the same address shares its quota.
    assert_eq!(
        send(&mut svc, from([10, 0, 0, 1], 2000)).await.status(),
        429
    );
    assert_eq!(
        send(&mut svc, from([10, 0, 0, 2], 1000)).await.status(),
        200
    );
}

#[tokio::test(start_paused = true)]
async fn keys_by_closure() {
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(1))
        .reject()
        .key_fn(|head| head.uri().query().map(str::to_owned))
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    assert_eq!(send(&mut svc, req("/?a", None)).await.status(), 200);
    assert_eq!(send(&mut svc, req("/?a", None)).await.status(), 429);
    assert_eq!(send(&mut svc, req("/?b", None)).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn an_ipv6_client_is_one_quota_per_network_not_per_address() {
    let from = |ip: &str| {
        let mut r = req("/", None);
        r.extensions_mut()
            .insert(SocketAddr::new(ip.parse().unwrap(), 443));
        r
    };
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(1))
        .reject()
        .key_peer_ip()
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    assert_eq!(send(&mut svc, from("2001:db8:1:2::1")).await.status(), 200);
    // A host rotating through its /64 gets no fresh quota.
    for host in ["2001:db8:1:2::2", "2001:db8:1:2:ffff:1:2:3"] {
        assert_eq!(send(&mut svc, from(host)).await.status(), 429, "{host}");
    }
    // Another /64 is another client; IPv4, mapped or not, is keyed in full.
    assert_eq!(send(&mut svc, from("2001:db8:1:3::1")).await.status(), 200);
    assert_eq!(send(&mut svc, from("192.0.2.1")).await.status(), 200);
    assert_eq!(send(&mut svc, from("::ffff:192.0.2.1")).await.status(), 429);
    assert_eq!(send(&mut svc, from("192.0.2.2")).await.status(), 200);

    // A /48 per customer, or the full address.
    let per_48 = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(1))
        .reject()
        .key_peer_ip()
        .ipv6_prefix(48)
        .build()
        .unwrap();
    let mut svc = per_48.layer(ok_service());
    assert_eq!(send(&mut svc, from("2001:db8:1:2::1")).await.status(), 200);
    assert_eq!(send(&mut svc, from("2001:db8:1:9::1")).await.status(), 429);
    let full = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(1))
        .reject()
        .key_peer_ip()
        .ipv6_prefix(128)
        .build()
        .unwrap();
    let mut svc = full.layer(ok_service());
    assert_eq!(send(&mut svc, from("2001:db8:1:2::1")).await.status(), 200);
    assert_eq!(send(&mut svc, from("2001:db8:1:2::2")).await.status(), 200);

    let error = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(1))
        .reject()
        .key_peer_ip()
        .ipv6_prefix(129)
        .build()
        .unwrap_err();
    assert!(matches!(
        error,
        ConfigError::InvalidSetting {
            name: "ipv6_prefix",
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_new_keys_neither_grows_the_table_nor_locks_newcomers_out() {
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(10))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .max_keys(1_600)
        .build()
        .unwrap();
    let mut svc = limits.layer(ok_service());
    // A client uses its whole quota before the flood.
    for _ in 0..10 {
        assert_eq!(send(&mut svc, req("/", Some("heavy"))).await.status(), 200);
    }
    for i in 0..5_000 {
        let status = send(&mut svc, req("/", Some(&format!("key-{i}"))))
            .await
            .status();
        assert_eq!(status, 200, "fresh key {i} refused");
    }
    let tracked = limits.snapshot()[0].tracked_keys;
    assert!(tracked <= 1_600, "{tracked}");
    // The flood did not free the client at its quota.
    assert_eq!(send(&mut svc, req("/", Some("heavy"))).await.status(), 429);
    advance(Duration::from_secs(64)).await;
    assert_eq!(send(&mut svc, req("/", Some("heavy"))).await.status(), 200);
}

#[test]
fn server_mode_keeps_the_inner_error_type() {
    fn error_is_infallible<S: Service<Request<()>, Error = Infallible>>(_: &S) {}
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_second(1))
        .reject()
        .build()
        .unwrap();
    error_is_infallible(&limits.layer(ok_service()));
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RateLimitByRoute<tower_quota::rate_limit::Reject>>();
    assert_send_sync::<
        tower_quota::rate_limit::RejectFuture<
            tower::util::ServiceFn<
                fn(Request<()>) -> std::future::Ready<Result<Response<String>, Infallible>>,
            >,
            (),
            tower_quota::rate_limit::EmptyBody,
        >,
    >();
}

#[test]
fn zero_keys_is_a_typed_error() {
    let error = RateLimitByRoute::builder()
        .default_quota(Quota::per_second(1))
        .reject()
        .max_keys(0)
        .build()
        .unwrap_err();
    assert!(matches!(
        error,
        ConfigError::InvalidSetting {
            name: "max_keys",
            ..
        }
    ));
}
