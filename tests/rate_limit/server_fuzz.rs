//! Server mode against random requests, in front of an axum router: whatever the method, the
//! path's bytes and the key's bytes, nothing panics, no request reaches a handler beyond its
//! client's quota for that handler's route, and the key tables stay within their bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{self, get, post};
use axum::Router;
use http::{HeaderName, HeaderValue, Method, Request};
use proptest::prelude::*;
use tower::{Layer, Service, ServiceExt};
use tower_quota::{Quota, RateLimitByRoute};

const QUOTA: u32 = 2;
const KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Requests each handler ran, by its route and the client's key (`None`: no key).
type Counts = Arc<Mutex<HashMap<(&'static str, Option<Vec<u8>>), u32>>>;

fn handler(
    route: &'static str,
) -> impl Fn(State<Counts>, HeaderMap) -> std::future::Ready<&'static str> + Clone {
    move |State(counts): State<Counts>, headers: HeaderMap| {
        let key = headers.get(KEY).map(|v| v.as_bytes().to_vec());
        *counts.lock().unwrap().entry((route, key)).or_default() += 1;
        std::future::ready("handled")
    }
}

fn app(counts: Counts) -> Router {
    let nested = Router::new().route("/{id}", get(handler("GET /v2/assets/{id}")));
    Router::new()
        .route("/v2/generate", post(handler("POST /v2/generate")))
        .route("/v2/generate/{id}", get(handler("GET /v2/generate/{id}")))
        .route(
            "/v2/generate/special",
            routing::any(handler("* /v2/generate/special")),
        )
        .route(
            "/v2/files/{*path}",
            routing::any(handler("* /v2/files/{*path}")),
        )
        .nest("/v2/assets", nested)
        .with_state(counts)
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::GET),
        4 => Just(Method::POST),
        4 => Just(Method::HEAD),
        1 => Just(Method::PUT),
        1 => Just(Method::DELETE),
        1 => Just(Method::OPTIONS),
        1 => Just(Method::PATCH),
        1 => "[A-Za-z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("v2".to_owned()),
        3 => Just("generate".to_owned()),
        2 => Just("assets".to_owned()),
        2 => Just("files".to_owned()),
        1 => Just(String::new()),
        1 => Just(".".to_owned()),
        1 => Just("..".to_owned()),
        1 => Just("%67enerate".to_owned()),
        1 => Just("GENERATE".to_owned()),
        2 => "[a-z0-9_%.~-]{1,6}",
    ]
}

/// A path of one of the routes, changed as an attacker would try, or random segments.
fn path() -> impl Strategy<Value = String> {
    let route = prop::sample::select(vec![
        "/v2/generate",
        "/v2/generate/gen_1",
        "/v2/generate/gen_2",
        "/v2/generate/special",
        "/v2/assets/a1",
        "/v2/files/a/b.mp4",
        "/v2/files/x",
    ]);
    let changed = (route, 0..9u8, any::<prop::sample::Index>()).prop_map(|(path, change, at)| {
        let at = 1 + at.index(path.len() - 1);
        let (head, tail) = path.split_at(at);
        match change {
            0 => format!("/{path}"),
            1 => format!("{head}/{tail}"),
            2 => format!("{path}/"),
            3 => path.to_uppercase(),
            4 => format!("{head}%{:02X}{}", tail.as_bytes()[0], &tail[1..]),
            5 => format!("{path}?a=1"),
            6 => path.replacen("/v2/", "/v2/./", 1),
            _ => path.to_owned(),
        }
    });
    let random =
        (prop::collection::vec(segment(), 0..5), any::<bool>()).prop_map(|(segments, slash)| {
            let path = format!("/{}", segments.join("/"));
            if slash {
                format!("{path}/")
            } else {
                path
            }
        });
    prop_oneof![3 => changed, 1 => random]
}

fn key() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        6 => prop::sample::select(vec!["alice", "bob", "carol"]).prop_map(|k| Some(k.as_bytes().to_vec())),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Some),
    ]
}

fn limits(max_keys: usize) -> RateLimitByRoute<tower_quota::rate_limit::Reject> {
    let quota = Quota::per_minute(QUOTA);
    RateLimitByRoute::builder()
        .route("POST /v2/generate", quota)
        .route("GET /v2/generate/{id}", quota)
        // axum routes `GET /v2/generate/special` here, path first: so must the layer.
        .route("* /v2/generate/special", quota)
        .route("GET /v2/assets/{id}", quota)
        .route("* /v2/files/{*path}", quota)
        .reject()
        .key_header(KEY)
        .max_keys(max_keys)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn no_request_passes_its_quota_or_panics(
        requests in prop::collection::vec((method(), path(), key()), 1..120),
        small_table in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        // A large table never forgets anyone here; a small one forgets all the time.
        let max_keys = if small_table { 16 } else { 4_096 };
        let counts = Counts::default();
        let limits = limits(max_keys);
        let mut svc = limits.layer(app(counts.clone()));
        runtime.block_on(async {
            for (method, path, key) in requests {
                let mut request = Request::builder().method(method).uri(path.as_str());
                if let Some(value) = key.as_deref().and_then(|k| HeaderValue::from_bytes(k).ok()) {
                    request = request.header(KEY, value);
                }
                let Ok(request) = request.body(Body::empty()) else {
                    continue;
                };
                let response = ServiceExt::<Request<Body>>::ready(&mut svc).await.unwrap().call(request).await.unwrap();
                let status = response.status().as_u16();
                assert!(matches!(status, 200 | 404 | 405 | 429), "{status}");
                if status == 429 {
                    assert!(response.headers().contains_key("retry-after"));
                }
            }
        });
        for snapshot in limits.snapshot() {
            prop_assert!(snapshot.tracked_keys <= max_keys);
        }
        if !small_table {
            for ((route, key), &ran) in counts.lock().unwrap().iter() {
                prop_assert!(ran <= QUOTA, "{route} ran {ran} times for {key:?}");
            }
        }
    }
}
