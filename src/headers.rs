//! Reading and writing the header fields by which servers state their limits.
//!
//! Read: `Retry-After` (delta-seconds or HTTP-date), `retry-after-ms`, and every dialect of
//! [`Dialect`] ([`read`]): the IETF draft's structured fields (parsed by `sfv`, RFC 9651) and
//! its older forms, `X-RateLimit-*`, OpenAI's, Anthropic's and GitHub's. Written:
//! `Retry-After`, `RateLimit-Policy` and `RateLimit`.
//!
//! Every parser takes any bytes a server can send: a malformed value is an
//! [`InvalidHeader`], never a panic.

use std::fmt;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `RateLimit` field of the IETF draft.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// The `RateLimit-Policy` field of the IETF draft.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `retry-after-ms`: a retry delay in milliseconds, as some APIs send beside `Retry-After`.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// A header field that is present but cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidHeader {
    /// The field's name.
    pub name: &'static str,
}

impl fmt::Display for InvalidHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed `{}` header field", self.name)
    }
}

impl std::error::Error for InvalidHeader {}

/// What the server asks: how long to wait before the next request.
///
/// `retry-after-ms` wins over `Retry-After` when both are valid, as it is the more precise. A
/// date in the past gives a zero wait; `now` is the wall-clock time the date is measured from.
pub fn retry_after(
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Option<Duration>, InvalidHeader> {
    if let Some(value) = headers.get(RETRY_AFTER_MS) {
        if let Some(ms) = text(value).and_then(parse_seconds) {
            return Ok(Some(ms_to_duration(ms)));
        }
        if headers.get(http::header::RETRY_AFTER).is_none() {
            return Err(InvalidHeader {
                name: "retry-after-ms",
            });
        }
    }
    let Some(value) = headers.get(http::header::RETRY_AFTER) else {
        return Ok(None);
    };
    let invalid = InvalidHeader {
        name: "retry-after",
    };
    let text = text(value).ok_or(invalid.clone())?;
    if let Some(seconds) = parse_seconds(text) {
        return Ok(Some(secs_to_duration(seconds)));
    }
    let date = httpdate::parse_http_date(text).map_err(|_| invalid)?;
    Ok(Some(date.duration_since(now).unwrap_or(Duration::ZERO)))
}

/// What the server says is left: `(remaining requests, time until the count resets)`, from
/// every dialect [`read`] knows.
///
/// The most restrictive statement about requests that says when it resets wins (the fewest
/// left); one without a reset cannot be placed in time and is passed over. A malformed field
/// is an error only when no other field states a limit.
pub fn remaining(
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Option<(u32, Duration)>, InvalidHeader> {
    let stated = read(headers, now, Dialects::all());
    let tightest = stated
        .statements
        .iter()
        .filter(|s| s.unit == Unit::Requests)
        .filter_map(|s| Some((s.remaining, s.reset_after(now)?)))
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
    match (tightest, stated.malformed.into_iter().next()) {
        (Some((remaining, reset)), _) => {
            Ok(Some((u32::try_from(remaining).unwrap_or(u32::MAX), reset)))
        }
        (None, Some(error)) => Err(error),
        (None, None) => Ok(None),
    }
}

/// Whether a response refuses a request for a rate limit: a 429, or a 403 that says so as
/// GitHub's do (a `Retry-After`, or `X-RateLimit-Remaining: 0`).
pub fn is_rate_limit_refusal(status: http::StatusCode, headers: &HeaderMap) -> bool {
    refused_in(status, headers, Dialects::all())
}

/// [`is_rate_limit_refusal`], a 403 counting only while GitHub's dialect is read.
pub(crate) fn refused_in(
    status: http::StatusCode,
    headers: &HeaderMap,
    dialects: Dialects,
) -> bool {
    status == http::StatusCode::TOO_MANY_REQUESTS
        || (status == http::StatusCode::FORBIDDEN
            && dialects.contains(Dialect::GitHub)
            && github_refusal(headers))
}

#[cold]
fn github_refusal(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::RETRY_AFTER)
        || headers
            .get("x-ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "0")
}

fn ms_to_duration(ms: f64) -> Duration {
    secs_to_duration(ms / 1000.0)
}

/// `Retry-After` for a wait: whole seconds rounded up, and never 0 (a client that sees 0
/// would retry in a tight loop).
pub(crate) fn retry_after_value(wait: Duration) -> HeaderValue {
    HeaderValue::from(retry_after_secs(wait))
}

pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    secs.max(1)
}

/// Writes a policy name as a structured-field string: the route's pattern, or `"default"`.
/// Characters a structured string cannot hold are replaced.
fn write_policy_name(out: &mut dyn fmt::Write, name: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.write_char('\\')?;
                out.write_char(c)?;
            }
            ' '..='~' => out.write_char(c)?,
            _ => out.write_char('_')?,
        }
    }
    out.write_char('"')
}

/// A short text written on the stack, so that a field value costs one allocation: its own.
struct StackText {
    bytes: [u8; 192],
    len: usize,
}

impl fmt::Write for StackText {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.len + text.len();
        let room = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        room.copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A field value of our own making, written by `write`.
fn field_value(write: impl Fn(&mut dyn fmt::Write) -> fmt::Result) -> HeaderValue {
    let mut stack = StackText {
        bytes: [0; 192],
        len: 0,
    };
    let value = if write(&mut stack).is_ok() {
        HeaderValue::from_bytes(&stack.bytes[..stack.len])
    } else {
        let mut text = String::new();
        let _ = write(&mut text);
        HeaderValue::from_str(&text)
    };
    value.unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

/// `RateLimit-Policy: "<name>";q=<count>;w=<window seconds>`.
pub(crate) fn policy_value(name: &str, count: u32, period: Duration) -> HeaderValue {
    let window = retry_after_secs(period);
    named_field(name, [(";q=", u64::from(count)), (";w=", window)])
}

/// `RateLimit: "<name>";r=<remaining>;t=<seconds>`: with none remaining, `t` is the wait
/// until a request may go (at least 1); otherwise the time until everything counted is gone.
/// Both rounded up: a client that trusts them is never early.
pub(crate) fn ratelimit_value(name: &str, remaining: u32, reset: Duration) -> HeaderValue {
    let reset = ratelimit_reset(remaining, reset);
    named_field(name, [(";r=", u64::from(remaining)), (";t=", reset)])
}

/// `RateLimit`'s `t`, in seconds rounded up (see [`ratelimit_value`]).
fn ratelimit_reset(remaining: u32, reset: Duration) -> u64 {
    if remaining == 0 {
        retry_after_secs(reset)
    } else {
        reset
            .as_secs()
            .saturating_add(u64::from(reset.subsec_nanos() > 0))
    }
}

/// Whether `name` goes between quotes as it is: printable ASCII, no quote, no backslash.
fn is_plain(name: &str) -> bool {
    name.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// The start of a route's `RateLimit` field, `"<name>";r=`, made once per route, if its name
/// needs no escaping (every name a pattern can have but the oddest).
pub(crate) fn ratelimit_prefix(name: &str) -> Option<Box<[u8]>> {
    if !is_plain(name) {
        return None;
    }
    Some(
        [b"\"", name.as_bytes(), b"\";r="]
            .concat()
            .into_boxed_slice(),
    )
}

/// [`ratelimit_value`] for a route whose field starts with `prefix` (from
/// [`ratelimit_prefix`]): the value written once, into its own allocation of its exact size.
pub(crate) fn ratelimit_value_after(prefix: &[u8], remaining: u32, reset: Duration) -> HeaderValue {
    let reset = ratelimit_reset(remaining, reset);
    let (mut r, mut t) = ([0; 20], [0; 20]);
    let (r, t) = (
        decimal(u64::from(remaining), &mut r),
        decimal(reset, &mut t),
    );
    let mut value = Vec::with_capacity(prefix.len() + r.len() + 3 + t.len());
    value.extend_from_slice(prefix);
    value.extend_from_slice(r);
    value.extend_from_slice(b";t=");
    value.extend_from_slice(t);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
        .unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

/// `n` in decimal, written at the end of `out`.
fn decimal(mut n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut start = out.len();
    loop {
        start -= 1;
        out[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[start..];
        }
    }
}

/// `"<name>"` and two parameters. Written byte by byte when the name needs no escaping (every
/// response of server mode carries one), through `fmt` otherwise.
fn named_field(name: &str, params: [(&str, u64); 2]) -> HeaderValue {
    let mut out = StackText {
        bytes: [0; 192],
        len: 0,
    };
    if is_plain(name) && name.len() < 100 {
        out.push(b"\"");
        out.push(name.as_bytes());
        out.push(b"\"");
        for (key, value) in params {
            out.push(key.as_bytes());
            out.push_number(value);
        }
        if let Ok(value) = HeaderValue::from_bytes(&out.bytes[..out.len]) {
            return value;
        }
    }
    let [(k1, v1), (k2, v2)] = params;
    field_value(|out| {
        write_policy_name(out, name)?;
        write!(out, "{k1}{v1}{k2}{v2}")
    })
}

impl StackText {
    /// Appends `bytes`; the caller keeps the total within the buffer.
    fn push(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Appends `n` in decimal (at most 20 digits).
    fn push_number(&mut self, n: u64) {
        let mut digits = [0; 20];
        self.push(decimal(n, &mut digits));
    }
}

mod read;

use read::{parse_seconds, secs_to_duration, text};
pub use read::{read, Dialect, Dialects, RateLimitHeaders, RateLimitInfo, Unit};

#[cfg(test)]
mod dialect_tests;
#[cfg(test)]
mod tests;
