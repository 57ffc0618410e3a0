//! Webhooks: Sync POSTs a finished generation to the create's `webhookUrl`, signed with
//! `Sync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

// The signature is the library's (feature `sync-webhook`): the mock signs what it sends as
// users' handlers verify it.
pub use tower_quota::presets::sync::{
    sign_webhook as sign, verify_webhook as verify, SignatureError, SIGNATURE_HEADER,
};

/// Delivers webhooks over plain HTTP.
#[derive(Clone, Debug)]
pub(crate) struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Sender {
    pub(crate) fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// POSTs `body` to `url`; true when answered with a 2xx within 10 s.
    pub(crate) async fn send(&self, url: &str, secret: &str, body: Bytes) -> bool {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let request = axum::http::Request::post(url)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sign(secret, timestamp, &body))
            .body(Full::new(body));
        let request = match request {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(url, %error, "webhook URL is not a valid URI");
                return false;
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), self.client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => true,
            Ok(Ok(response)) => {
                tracing::warn!(url, status = %response.status(), "webhook refused");
                false
            }
            Ok(Err(error)) => {
                tracing::warn!(url, %error, "webhook not delivered");
                false
            }
            Err(_) => {
                tracing::warn!(url, "webhook timed out");
                false
            }
        }
    }
}
