//! Sync's webhook signature: `Sync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>` (feature `sync-webhook`).

use std::fmt::{self, Write as _};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries a webhook's signature.
pub const SIGNATURE_HEADER: &str = "sync-signature";

fn mac(secret: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC accepts keys of any length");
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Sync-Signature` value for `body` sent at `timestamp` (Unix seconds), as Sync signs
/// its webhooks: for tests, and for a server that speaks Sync's dialect.
pub fn sign_webhook(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    let mut value = format!("t={timestamp},v1=");
    for byte in digest {
        let _ = write!(value, "{byte:02x}");
    }
    value
}

/// Why a webhook's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    /// The header is not `t=<digits>,v1=<64 hex digits>`.
    Malformed,
    /// The timestamp is further than the tolerance from now (a replay, or a wrong clock).
    Stale,
    /// The HMAC does not match: another secret, or a changed body.
    Mismatch,
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed Sync-Signature header",
            Self::Stale => "Sync-Signature timestamp outside the tolerance",
            Self::Mismatch => "Sync-Signature does not match the body",
        })
    }
}

impl std::error::Error for SignatureError {}

/// Checks a `Sync-Signature` header value against the webhook's raw `body`, in constant time,
/// accepting timestamps within `tolerance` of `now` (Unix seconds). Check it before trusting
/// the body, for example before calling
/// [`ConcurrencyLimitByPlan::complete`](crate::ConcurrencyLimitByPlan::complete) with the id
/// it names.
pub fn verify_webhook(
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
            Some(("t", t)) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
                timestamp = t.parse::<u64>().ok();
            }
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

/// 32 bytes from 64 hex digits (nothing else: `from_str_radix` alone would take a `+`), or
/// `None`.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_abc";
    const BODY: &[u8] = br#"{"id":"gen_1","status":"COMPLETED"}"#;

    #[test]
    fn a_signature_verifies_only_as_it_was_made() {
        let header = sign_webhook(SECRET, 1_700_000_000, BODY);
        let tolerance = Duration::from_secs(300);
        assert_eq!(
            verify_webhook(SECRET, &header, BODY, 1_700_000_100, tolerance),
            Ok(())
        );
        // A `+` where a digit was: the same number to `from_str_radix`, not the same header.
        let (head, digest) = header.split_once(",v1=").unwrap();
        let plus = format!("{head},v1=+{}", &digest[1..]);
        assert_eq!(
            verify_webhook(SECRET, &plus, BODY, 1_700_000_100, tolerance),
            Err(SignatureError::Malformed)
        );
        let plus_time = header.replacen("t=", "t=+", 1);
        assert_eq!(
            verify_webhook(SECRET, &plus_time, BODY, 1_700_000_100, tolerance),
            Err(SignatureError::Malformed)
        );
    }
}
