//! The store over TLS (`rediss://`, feature `redis-tls`) with a password, against a
//! `redis-server --tls-port` started on certificates the test makes; and the password kept
//! out of every `Debug` output, error and log line.

#![cfg(feature = "redis-tls")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use http::{Request, Response};
use tower::{service_fn, BoxError, Layer, ServiceExt};
use tower_quota::store::{FailMode, RedisStore};
use tower_quota::{Quota, RateLimitByRoute};

use super::rate_limits::{http_client, send_keyed, server_on};
use super::servers::TlsRedis;
use crate::common::redis::unique_prefix;

const PASSWORD: &str = "tls-Secret-6f1c2a";

fn tls_store(redis: &TlsRedis, prefix: &str) -> RedisStore {
    RedisStore::builder(redis.url())
        .password(PASSWORD)
        .ca_certificate(redis.certificates.ca.clone())
        .prefix(prefix)
        .timeout(Duration::from_secs(1))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_quota_over_tls_with_a_password_and_a_ca_of_their_own() {
    let Some(redis) = TlsRedis::start(PASSWORD, false) else {
        return;
    };
    let prefix = unique_prefix("tls");
    let quota = Quota::per_minute(5);
    let fleet = [
        server_on(tls_store(&redis, &prefix), quota).await,
        server_on(tls_store(&redis, &prefix), quota).await,
    ];
    let client = http_client();
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(send_keyed(&client, fleet[i % 2], "tls-key").await.status());
    }
    let passed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(passed, 5, "{statuses:?}");
}

/// A client-mode layer over a service that answers at once: what a request through it gets.
async fn through(store: RedisStore) -> Result<Response<()>, BoxError> {
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::per_minute(5))
        .store(store)
        .build()
        .unwrap();
    let service = limits.layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let request = Request::get("http://api.test/work").body(()).unwrap();
    service.oneshot(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_where_the_server_asks_for_one() {
    let Some(redis) = TlsRedis::start(PASSWORD, true) else {
        return;
    };
    let prefix = unique_prefix("mtls");
    let (certificate, key) = redis.certificates.client.clone();
    let with = RedisStore::builder(redis.url())
        .password(PASSWORD)
        .ca_certificate(redis.certificates.ca.clone())
        .client_certificate(certificate, key)
        .prefix(&prefix)
        .timeout(Duration::from_secs(1))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    if let Err(error) = through(with).await {
        panic!("with a client certificate: {error}");
    }
    // Without one, the handshake fails: a store error, the request returned (closed).
    let without = tls_store(&redis, &prefix);
    let error = through(without).await.unwrap_err();
    println!("without a client certificate: {error}");
    assert!(error.to_string().contains("Certificate"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_an_unknown_ca_is_refused() {
    let Some(redis) = TlsRedis::start(PASSWORD, false) else {
        return;
    };
    // The OS's roots: they do not know the test's CA.
    let store = RedisStore::builder(redis.url())
        .password(PASSWORD)
        .timeout(Duration::from_secs(1))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let error = through(store).await.unwrap_err();
    println!("with the OS's roots: {error}");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
}

/// Log lines, as a `fmt` subscriber writes them.
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

#[tokio::test(flavor = "current_thread")]
async fn the_password_is_in_no_debug_output_error_or_log_line() {
    let Some(redis) = TlsRedis::start(PASSWORD, false) else {
        return;
    };
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut shown = Vec::new();
    // A wrong password, given to the builder and in the URL, and the right one in the URL.
    let wrong = format!("{PASSWORD}-wrong");
    let url_with = |password: &str| format!("rediss://:{password}@127.0.0.1:{}/", redis.port);
    let builders = [
        RedisStore::builder(redis.url()).password(&wrong),
        RedisStore::builder(url_with(&wrong)),
        RedisStore::builder(url_with(PASSWORD)),
        RedisStore::cluster([url_with(&wrong)]),
    ];
    for (i, builder) in builders.into_iter().enumerate() {
        let builder = builder
            .ca_certificate(redis.certificates.ca.clone())
            .prefix(unique_prefix("secret"))
            .timeout(Duration::from_secs(1))
            .fail_mode(FailMode::Closed);
        shown.push(format!("{builder:?}"));
        let store = builder.build().unwrap();
        shown.push(format!("{store:?}"));
        match through(store).await {
            Ok(_) => assert_eq!(i, 2, "only the right password gets through"),
            Err(error) => {
                println!("{i}: {error}");
                assert!(
                    error.to_string().contains("authentication failed"),
                    "{error}"
                );
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
                while let Some(error) = source {
                    shown.push(format!("{error} / {error:?}"));
                    source = error.source();
                }
            }
        }
    }
    // Errors logged in the background (release notifications) have had time to come.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logged = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    shown.push(logged);
    for text in &shown {
        assert!(!text.contains(PASSWORD), "the password is shown in: {text}");
    }
    println!("{}", shown[..2].join("\n"));
}
