//! Webhooks: Sync POSTs a finished generation to the create's `webhookUrl`, signed with
//! `Sync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

/// The header that carries a webhook's signature.
pub const SIGNATURE_HEADER: &str = "sync-signature";

fn mac(secret: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Sync-Signature` value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    let mut value = format!("t={timestamp},v1=");
    for byte in digest {
        let _ = write!(value, "{byte:02x}");
    }
    value
}

/// Why a signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// The header is not `t=<digits>,v1=<64 hex digits>`.
    Malformed,
    /// The timestamp is further than the tolerance from now (a replay, or a wrong clock).
    Stale,
    /// The HMAC does not match: another secret, or a changed body.
    Mismatch,
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed Sync-Signature header",
            Self::Stale => "Sync-Signature timestamp outside the tolerance",
            Self::Mismatch => "Sync-Signature does not match the body",
        })
    }
}

impl std::error::Error for SignatureError {}

/// Checks a `Sync-Signature` header value against `body`, in constant time, accepting
/// timestamps within `tolerance` of `now` (Unix seconds).
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
            Some(("v1", v)) => signature = decode_hex(v),
            _ => {}
        }
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(SignatureError::Malformed);
    };
    if now.abs_diff(timestamp) > tolerance.as_secs() {
        return Err(SignatureError::Stale);
    }
    mac(secret, timestamp, body)
        .verify_slice(&signature)
        .map_err(|_| SignatureError::Mismatch)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

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
