//! Reading and writing the header fields by which servers state their limits.
//!
//! Read: `Retry-After` (delta-seconds or HTTP-date), `retry-after-ms`, the IETF draft
//! `RateLimit` field (both the structured-list form, `"default";r=5;t=30`, and the older
//! dictionary form, `limit=100, remaining=5, reset=30`), `RateLimit-Remaining` /
//! `RateLimit-Reset`, and `X-RateLimit-Remaining` / `X-RateLimit-Reset` (delta-seconds, or
//! a Unix time in seconds or milliseconds). Written: `Retry-After`, `RateLimit-Policy` and
//! `RateLimit`.
//!
//! Every parser takes any bytes a server can send: a malformed value is an
//! [`InvalidHeader`], never a panic.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `RateLimit` field of the IETF draft.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// The `RateLimit-Policy` field of the IETF draft.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `retry-after-ms`: a retry delay in milliseconds, as some APIs send beside `Retry-After`.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// A header field that is present but cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// What the server says is left: `(remaining requests, time until the count resets)`.
///
/// Looks at the draft `RateLimit` field first, then `RateLimit-Remaining`/`-Reset`, then
/// `X-RateLimit-Remaining`/`-Reset`. A field that gives a count with no reset time is of no
/// use (the count cannot be placed in time) and is passed over. Where `RateLimit` names
/// several policies, the one with the fewest requests left is returned.
pub fn remaining(
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Option<(u32, Duration)>, InvalidHeader> {
    if let Some(value) = headers.get(RATELIMIT) {
        let text = text(value).ok_or(InvalidHeader { name: "ratelimit" })?;
        return parse_ratelimit(text)
            .map(Some)
            .ok_or(InvalidHeader { name: "ratelimit" });
    }
    for (remaining, reset) in [
        ("ratelimit-remaining", "ratelimit-reset"),
        ("x-ratelimit-remaining", "x-ratelimit-reset"),
    ] {
        let (Some(count), Some(until)) = (headers.get(remaining), headers.get(reset)) else {
            continue;
        };
        let count = text(count)
            .and_then(parse_count)
            .ok_or(InvalidHeader { name: remaining })?;
        let until = text(until)
            .and_then(|t| parse_reset(t, now))
            .ok_or(InvalidHeader { name: reset })?;
        return Ok(Some((count, until)));
    }
    Ok(None)
}

fn text(value: &HeaderValue) -> Option<&str> {
    value.to_str().ok().map(str::trim)
}

/// Non-negative seconds, whole (`120`, the standard form) or fractional (`1.5`, tolerated).
fn parse_seconds(text: &str) -> Option<f64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    text.parse::<f64>().ok().filter(|s| s.is_finite())
}

fn parse_count(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // A count larger than u32 is as good as unlimited.
    Some(
        text.parse::<u64>()
            .map_or(u32::MAX, |n| n.min(u64::from(u32::MAX)) as u32),
    )
}

/// Seconds beyond what any limit means (about 31 years) are capped there, so that arithmetic
/// on them cannot overflow.
const MAX_SECONDS: f64 = 1e9;

fn secs_to_duration(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.min(MAX_SECONDS))
}

fn ms_to_duration(ms: f64) -> Duration {
    Duration::from_secs_f64((ms / 1000.0).min(MAX_SECONDS))
}

/// A reset time: delta-seconds, or a Unix time in seconds (above 10⁹) or milliseconds (above
/// 10¹²), as various `X-RateLimit-Reset` fields carry.
fn parse_reset(text: &str, now: SystemTime) -> Option<Duration> {
    let value = parse_seconds(text)?;
    let since_epoch = |s: f64| {
        let at = UNIX_EPOCH + Duration::from_secs_f64(s.min(1e11));
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(if value >= 1e12 {
        since_epoch(value / 1000.0)
    } else if value >= 1e9 {
        since_epoch(value)
    } else {
        secs_to_duration(value)
    })
}

/// The draft `RateLimit` field: a list of `"policy";r=<remaining>;t=<reset>` items, or the
/// older dictionary `limit=.., remaining=.., reset=..`.
fn parse_ratelimit(text: &str) -> Option<(u32, Duration)> {
    let mut tightest: Option<(u32, Duration)> = None;
    if text.contains("remaining") {
        let (mut remaining, mut reset) = (None, None);
        for member in text.split(',') {
            let (key, value) = member.split_once('=')?;
            match key.trim() {
                "remaining" => remaining = Some(parse_count(value.trim())?),
                "reset" => reset = Some(secs_to_duration(parse_seconds(value.trim())?)),
                _ => {}
            }
        }
        return remaining.zip(reset);
    }
    for item in split_items(text) {
        let mut params = item.split(';');
        params.next()?; // the policy's name
        let (mut remaining, mut reset) = (None, None);
        for param in params {
            let (key, value) = param.split_once('=')?;
            match key.trim() {
                "r" => remaining = Some(parse_count(value.trim())?),
                "t" => reset = Some(secs_to_duration(parse_seconds(value.trim())?)),
                _ => {}
            }
        }
        let (Some(remaining), Some(reset)) = (remaining, reset) else {
            continue;
        };
        if tightest.is_none_or(|(r, _)| remaining < r) {
            tightest = Some((remaining, reset));
        }
    }
    tightest
}

/// Splits a structured-field list on commas outside quoted strings.
fn split_items(text: &str) -> impl Iterator<Item = &str> {
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            ',' if !in_string => {
                items.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(text[start..].trim());
    items.into_iter()
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
    let reset = if remaining == 0 {
        retry_after_secs(reset)
    } else {
        reset
            .as_secs()
            .saturating_add(u64::from(reset.subsec_nanos() > 0))
    };
    named_field(name, [(";r=", u64::from(remaining)), (";t=", reset)])
}

/// `"<name>"` and two parameters. Written byte by byte when the name needs no escaping (every
/// response of server mode carries one), through `fmt` otherwise.
fn named_field(name: &str, params: [(&str, u64); 2]) -> HeaderValue {
    let plain = |b: &u8| (b' '..=b'~').contains(b) && *b != b'"' && *b != b'\\';
    let mut out = StackText {
        bytes: [0; 192],
        len: 0,
    };
    if name.as_bytes().iter().all(plain) && name.len() < 100 {
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
    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

#[cfg(test)]
mod tests;
