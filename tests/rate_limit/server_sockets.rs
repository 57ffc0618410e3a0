//! Server mode over real sockets on 127.0.0.1, as a client or an attacker meets it: axum's
//! own routing (`HEAD`, nested routers, every form of a path), client keys (missing, peer
//! addresses, forwarded addresses), and the rate-limit fields of every response.
//!
//! Requests are written by hand on a raw TCP connection, so that no client library tidies
//! the request line an attacker would send.

#![cfg(feature = "axum")]

use std::sync::{Arc, Mutex};

use crate::common::{raw, serve, serve_with_peer, Answer};
use axum::routing::{get, post};
use axum::Router;
use http::HeaderName;
use tower_quota::rate_limit::{ForwardedHeader, MissingKey, Rejection};
use tower_quota::{Quota, RateLimitByRoute};

/// The body every handler answers with, so that a response from a handler is known as such.
const HANDLED: &str = "handled";

impl Answer {
    fn handled(&self) -> bool {
        self.status == 200 && self.body == HANDLED
    }
}

fn one_a_minute() -> tower_quota::rate_limit::Builder<tower_quota::rate_limit::RejectConfig> {
    RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .route("GET /v2/generate/{id}", Quota::per_minute(1))
        .route("GET /v2/assets/{id}", Quota::per_minute(1))
        .route("GET /v2/files/{*path}", Quota::per_minute(1))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
}

/// An app whose handlers are all limited: every route a handler serves has a pattern, and no
/// default quota, so a form of a request that reached a handler without matching its pattern
/// would pass uncounted.
fn app() -> Router {
    let limits = one_a_minute().build().unwrap();
    let assets = Router::new().route("/{id}", get(|| async { HANDLED }));
    Router::new()
        .route("/v2/generate", post(|| async { HANDLED }))
        .route("/v2/generate/{id}", get(|| async { HANDLED }))
        .route("/v2/files/{*path}", get(|| async { HANDLED }))
        .nest("/v2/assets", assets)
        .layer(limits)
}

#[tokio::test]
async fn no_form_of_a_request_that_reaches_a_handler_escapes_its_quota() {
    let addr = serve(app()).await;
    // Each route's path, and other methods that reach its handler.
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: &[Case<'_>] = &[
        ("POST", "/v2/generate", &[]),
        (
            "GET",
            "/v2/generate/gen_1",
            &[("HEAD", "/v2/generate/gen_1")],
        ),
        ("GET", "/v2/files/a/b", &[("HEAD", "/v2/files/a/b")]),
    ];
    let variants = |path: &str| -> Vec<String> {
        let upper = path.to_uppercase();
        let last = path.rfind('/').unwrap();
        let encoded = format!("{}%2F{}", &path[..last], &path[last + 1..]);
        // The first letter after `/v2/`, percent-encoded.
        let letters = format!("/v2/%{:02X}{}", path.as_bytes()[4], &path[5..]);
        vec![
            path.to_owned(),
            format!("/{path}"),
            path.replacen("/v2/", "/v2//", 1),
            format!("{path}/"),
            upper,
            encoded,
            letters,
            format!("{path}?limit=1"),
            path.replacen("/v2/", "/v2/./", 1),
            path.replacen("/v2/", "/x/../v2/", 1),
            format!("http://{addr}{path}"),
            format!("http://other.example{path}"),
        ]
    };
    let mut key = 0;
    for (method, path, extra) in cases {
        let mut forms: Vec<(String, String)> = variants(path)
            .into_iter()
            .map(|target| (method.to_string(), target))
            .collect();
        forms.push((method.to_lowercase(), path.to_string()));
        forms.extend(extra.iter().map(|(m, p)| (m.to_string(), p.to_string())));
        for (form_method, target) in forms {
            key += 1;
            let api_key = format!("key-{key}");
            let first = raw(addr, method, path, &[("x-api-key", &api_key)]).await;
            assert!(first.handled(), "{method} {path}: {first:?}");
            let again = raw(addr, &form_method, &target, &[("x-api-key", &api_key)]).await;
            // A `HEAD` answer has no body: any 200 is the handler's.
            let reached = again.handled() || (again.status == 200 && form_method == "HEAD");
            assert!(
                !reached,
                "{form_method} {target} reached a handler uncounted: {again:?}"
            );
            if again.status == 429 {
                assert!(again.header("retry-after").is_some());
            }
        }
    }
}

#[tokio::test]
async fn head_counts_against_the_get_route() {
    let addr = serve(app()).await;
    let key = [("x-api-key", "k")];
    let head = raw(addr, "HEAD", "/v2/generate/gen_1", &key).await;
    assert_eq!(head.status, 200);
    assert!(head.header("ratelimit").is_some());
    let get = raw(addr, "GET", "/v2/generate/gen_1", &key).await;
    assert_eq!(get.status, 429, "{get:?}");
}

#[tokio::test]
async fn a_layer_inside_a_nested_router_matches_the_path_the_client_sent() {
    let limits = one_a_minute().build().unwrap();
    let assets = Router::new()
        .route("/{id}", get(|| async { HANDLED }))
        .layer(limits.clone());
    let files = Router::new()
        .route("/{*path}", get(|| async { HANDLED }))
        .layer(limits);
    let app = Router::new()
        .nest("/v2/assets", assets)
        .nest_service("/v2/files", files);
    let addr = serve(app).await;
    for path in ["/v2/assets/a1", "/v2/files/x/y.mp4"] {
        let key = [("x-api-key", "k")];
        assert!(raw(addr, "GET", path, &key).await.handled());
        let again = raw(addr, "GET", path, &key).await;
        assert_eq!(again.status, 429, "{path}: {again:?}");
    }
}

#[tokio::test]
async fn every_response_of_a_limited_route_states_the_limit() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(3))
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let quiet = RateLimitByRoute::builder()
        .route("POST /v2/quiet", Quota::per_minute(3))
        .reject()
        .rate_limit_headers(false)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v2/generate", post(|| async { HANDLED }))
        .route("/v2/other", post(|| async { HANDLED }))
        .layer(limits)
        .merge(
            Router::new()
                .route("/v2/quiet", post(|| async { HANDLED }))
                .layer(quiet),
        );
    let addr = serve(app).await;
    let key = [("x-api-key", "k")];
    for left in [2, 1, 0] {
        let answer = raw(addr, "POST", "/v2/generate", &key).await;
        assert!(answer.handled());
        assert_eq!(
            answer.header("ratelimit-policy"),
            Some("\"POST /v2/generate\";q=3;w=60")
        );
        assert_eq!(
            answer.header("ratelimit"),
            Some(format!("\"POST /v2/generate\";r={left};t=64").as_str())
        );
    }
    let refused = raw(addr, "POST", "/v2/generate", &key).await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("ratelimit"),
        Some("\"POST /v2/generate\";r=0;t=64")
    );
    // Unlimited routes, and a layer told not to, add nothing.
    assert_eq!(
        raw(addr, "POST", "/v2/other", &key)
            .await
            .header("ratelimit"),
        None
    );
    let quiet = raw(addr, "POST", "/v2/quiet", &key).await;
    assert!(quiet.handled());
    assert_eq!(quiet.header("ratelimit"), None);
    assert_eq!(quiet.header("ratelimit-policy"), None);
}

/// Captures the log lines written while it is the default subscriber.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn keyed_by_peer_address_without_one_is_a_loud_500_not_a_shared_quota() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .reject()
        .key_peer_ip()
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v2/generate", post(|| async { HANDLED }))
        .layer(limits);
    // Served without `into_make_service_with_connect_info`: no peer address.
    let addr = serve(app.clone()).await;
    for _ in 0..3 {
        let answer = raw(addr, "POST", "/v2/generate", &[]).await;
        assert_eq!(answer.status, 500, "{answer:?}");
    }
    let text = log.text();
    assert_eq!(text.matches("WARN").count(), 1, "{text}");
    assert!(
        text.contains("into_make_service_with_connect_info"),
        "{text}"
    );

    // With the peer's address, each address has its quota.
    let addr = serve_with_peer(app).await;
    assert!(raw(addr, "POST", "/v2/generate", &[]).await.handled());
    assert_eq!(raw(addr, "POST", "/v2/generate", &[]).await.status, 429);
}

#[tokio::test]
async fn a_missing_key_follows_the_policy_set() {
    let handler = || async { HANDLED };
    let app = |policy: Option<MissingKey>| {
        let mut builder = RateLimitByRoute::builder()
            .route("POST /v2/generate", Quota::per_minute(1))
            .reject()
            .key_header(HeaderName::from_static("x-api-key"))
            .reject_with(|rejection: &Rejection| {
                http::Response::new(axum::body::Body::from(format!("{:?}", rejection.reason)))
            });
        if let Some(policy) = policy {
            builder = builder.on_missing_key(policy);
        }
        Router::new()
            .route("/v2/generate", post(handler))
            .layer(builder.build().unwrap())
    };
    // Shared (the default): one anonymous quota.
    let addr = serve(app(None)).await;
    assert!(raw(addr, "POST", "/v2/generate", &[]).await.handled());
    assert_eq!(raw(addr, "POST", "/v2/generate", &[]).await.status, 429);
    assert!(raw(addr, "POST", "/v2/generate", &[("x-api-key", "a")])
        .await
        .handled());
    // Refuse: 400, and the response builder is told why.
    let addr = serve(app(Some(MissingKey::Refuse))).await;
    let refused = raw(addr, "POST", "/v2/generate", &[]).await;
    assert_eq!((refused.status, refused.body.as_str()), (400, "MissingKey"));
    assert_eq!(refused.header("retry-after"), None);
    // Pass: uncounted.
    let addr = serve(app(Some(MissingKey::Pass))).await;
    for _ in 0..3 {
        assert!(raw(addr, "POST", "/v2/generate", &[]).await.handled());
    }
}

#[tokio::test]
async fn forwarded_addresses_count_only_through_trusted_proxies() {
    let app = |trusted: &[&str]| {
        let limits = RateLimitByRoute::builder()
            .route("POST /v2/generate", Quota::per_minute(1))
            .reject()
            .key_forwarded_ip(ForwardedHeader::XForwardedFor, trusted)
            .build()
            .unwrap();
        Router::new()
            .route("/v2/generate", post(|| async { HANDLED }))
            .layer(limits)
    };
    // The test client connects from 127.0.0.1, here a trusted proxy: each forwarded client
    // has its own quota, read from the right of the list.
    let addr = serve_with_peer(app(&["127.0.0.1"])).await;
    for client in ["203.0.113.1", "203.0.113.2"] {
        let forwarded = format!("6.6.6.6, {client}");
        let via = [("x-forwarded-for", forwarded.as_str())];
        assert!(raw(addr, "POST", "/v2/generate", &via).await.handled());
        assert_eq!(raw(addr, "POST", "/v2/generate", &via).await.status, 429);
    }
    // A forged entry on the left does not buy a fresh quota.
    let forged = [("x-forwarded-for", "1.2.3.4, 203.0.113.1")];
    assert_eq!(raw(addr, "POST", "/v2/generate", &forged).await.status, 429);

    // Not a trusted proxy: the header is the client's own words, and ignored.
    let addr = serve_with_peer(app(&["10.0.0.0/8"])).await;
    let a = [("x-forwarded-for", "203.0.113.1")];
    let b = [("x-forwarded-for", "203.0.113.2")];
    assert!(raw(addr, "POST", "/v2/generate", &a).await.handled());
    assert_eq!(raw(addr, "POST", "/v2/generate", &b).await.status, 429);

    // A proxy list that is not one is a typed error.
    let error = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(1))
        .reject()
        .key_forwarded_ip(ForwardedHeader::Forwarded, ["10.0.0.0/8", "proxy.internal"])
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("proxy.internal"), "{error}");
}
