//! Webhooks: a finished generation is POSTed to its `webhookUrl`, signed.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use common::{create_body, Api};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sync_mock::webhook::{self, SignatureError};
use sync_mock::{Config, MockServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Starts a receiver on 127.0.0.1 that passes each webhook's signature and body on.
async fn receiver() -> (String, mpsc::UnboundedReceiver<(String, Bytes)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/hooks/sync",
        post(move |headers: HeaderMap, body: Bytes| async move {
            let signature = headers
                .get(webhook::SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let _ = tx.send((signature, body));
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(start_paused = true)]
async fn a_finished_generation_is_posted_with_a_signature_that_verifies() {
    let (url, mut hooks) = receiver().await;
    let config = Config::default()
        .webhook_secret("whsec_abc")
        .job_durations(Duration::from_secs(1), Duration::from_secs(2));
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    let created = api.create_with(&[], create_body(Some(&url))).await;
    let id = created.json["id"].as_str().unwrap().to_owned();

    let (signature, body) = hooks.recv().await.unwrap();
    let generation: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(generation["id"], id.as_str());
    assert_eq!(generation["status"], "COMPLETED");

    // `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, checked by hand.
    let (t, v1) = signature.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let v1 = v1.strip_prefix("v1=").unwrap();
    assert!(unix_now().abs_diff(t.parse().unwrap()) <= 5);
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_abc").unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected);

    // The helper agrees, and refuses what it should.
    let tolerance = Duration::from_secs(300);
    let now = unix_now();
    assert_eq!(
        webhook::verify("whsec_abc", &signature, &body, now, tolerance),
        Ok(())
    );
    assert_eq!(
        webhook::verify("whsec_other", &signature, &body, now, tolerance),
        Err(SignatureError::Mismatch)
    );
    let mut tampered = body.to_vec();
    tampered.push(b' ');
    assert_eq!(
        webhook::verify("whsec_abc", &signature, &tampered, now, tolerance),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        webhook::verify("whsec_abc", &signature, &body, now + 3600, tolerance),
        Err(SignatureError::Stale)
    );
    for garbage in ["", "t=1", "v1=00", "t=x,v1=zz", "t=1,v1=abc"] {
        assert_eq!(
            webhook::verify("whsec_abc", garbage, &body, now, tolerance),
            Err(SignatureError::Malformed),
            "{garbage:?}"
        );
    }

    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(server.stats().webhooks_delivered, 1);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_webhook_is_counted_and_nothing_breaks() {
    // A port that was free a moment ago: nobody listens.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = Config::default().job_durations(Duration::from_secs(1), Duration::from_secs(1));
    let server = MockServer::start(config).await.unwrap();
    let api = Api::new(&server);
    let url = format!("http://127.0.0.1:{port}/gone");
    api.create_with(&[], create_body(Some(&url))).await;
    api.create_with(&[], create_body(Some("not a url"))).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let stats = server.stats();
    assert_eq!((stats.completed, stats.webhooks_failed), (2, 2));
}
