//! Reading what a response states about its limits, in every dialect servers speak: one
//! pass over the response's fields, then one statement ([`RateLimitInfo`]) per limit stated.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

use super::InvalidHeader;

/// The family of header fields a statement was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// The IETF draft's structured fields: `RateLimit-Policy: "default";q=100;w=60` and
    /// `RateLimit: "default";r=50;t=30` (also the draft's older dictionary form,
    /// `RateLimit: limit=100, remaining=50, reset=30`).
    Ietf,
    /// The IETF draft's older triple: `RateLimit-Limit`, `RateLimit-Remaining`,
    /// `RateLimit-Reset` (delta seconds).
    IetfTriple,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`, the reset as delta
    /// seconds, or as a Unix time in seconds (from 10⁹) or milliseconds (from 10¹²).
    XRateLimit,
    /// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, the reset as a Go
    /// duration (`1s`, `6m0s`, `17ms`).
    OpenAi,
    /// Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
    /// remaining,reset}`, the reset as an RFC 3339 time.
    Anthropic,
    /// GitHub's `x-ratelimit-{limit,remaining,reset,used,resource}`, the reset as a Unix time
    /// in seconds, the quota named by `x-ratelimit-resource`.
    GitHub,
}

impl Dialect {
    const ALL: [Dialect; 6] = [
        Dialect::Ietf,
        Dialect::IetfTriple,
        Dialect::XRateLimit,
        Dialect::OpenAi,
        Dialect::Anthropic,
        Dialect::GitHub,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ietf => "IETF RateLimit",
            Self::IetfTriple => "IETF RateLimit-Limit/-Remaining/-Reset",
            Self::XRateLimit => "X-RateLimit",
            Self::OpenAi => "OpenAI x-ratelimit-*-requests/-tokens",
            Self::Anthropic => "Anthropic anthropic-ratelimit-*",
            Self::GitHub => "GitHub x-ratelimit-*",
        })
    }
}

/// The dialects read: all of them by default; each can be turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialects(u8);

impl Default for Dialects {
    fn default() -> Self {
        Self::all()
    }
}

impl Dialects {
    /// Every dialect.
    pub fn all() -> Self {
        Self(Dialect::ALL.iter().fold(0, |bits, d| bits | d.bit()))
    }

    /// None.
    pub fn none() -> Self {
        Self(0)
    }

    /// These, and `dialect`.
    #[must_use]
    pub fn with(self, dialect: Dialect) -> Self {
        Self(self.0 | dialect.bit())
    }

    /// These, without `dialect`.
    #[must_use]
    pub fn without(self, dialect: Dialect) -> Self {
        Self(self.0 & !dialect.bit())
    }

    /// Whether `dialect` is read.
    pub fn contains(self, dialect: Dialect) -> bool {
        self.0 & dialect.bit() != 0
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unit {
    /// Requests (or a dialect that does not say).
    Requests,
    /// Tokens, input and output together.
    Tokens,
    /// Input tokens.
    InputTokens,
    /// Output tokens.
    OutputTokens,
}

/// One limit a response states: what is left of it, and when it resets.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitInfo {
    /// The limit, if stated.
    pub limit: Option<u64>,
    /// What is left of it.
    pub remaining: u64,
    /// When what was counted is gone (the wall-clock time given to [`read`], plus what the
    /// server said); `None` where a dialect states no reset (the draft's `t` is optional).
    pub reset: Option<SystemTime>,
    /// The name the server gives the limit, if any: the draft's policy, GitHub's
    /// `x-ratelimit-resource`.
    pub policy: Option<String>,
    /// How long each window of the limit is, where the server says (the draft's `w`).
    pub window: Option<Duration>,
    /// What it counts.
    pub unit: Unit,
    /// Where it was read.
    pub dialect: Dialect,
}

impl RateLimitInfo {
    /// How long from `now` until it resets, if it says.
    pub fn reset_after(&self, now: SystemTime) -> Option<Duration> {
        self.reset
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// Everything a response states about its limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitHeaders {
    /// One statement per limit, in the order of [`Dialect`].
    pub statements: Vec<RateLimitInfo>,
    /// Fields present but not understood, each ignored (the draft's rule for a malformed
    /// field), without hiding the other fields.
    pub malformed: Vec<InvalidHeader>,
}

impl RateLimitHeaders {
    /// The most restrictive statement about requests that says when it resets: the fewest
    /// left (then the latest reset). One without a reset cannot be placed in time; limits on
    /// tokens are left out, their counts not being requests.
    pub fn tightest_requests(&self) -> Option<&RateLimitInfo> {
        self.statements
            .iter()
            .filter(|s| s.unit == Unit::Requests && s.reset.is_some())
            .min_by(|a, b| {
                a.remaining
                    .cmp(&b.remaining)
                    .then_with(|| b.reset.cmp(&a.reset))
            })
    }

    /// The statement, of any unit, with nothing left that resets last: until then no request
    /// can go.
    pub fn exhausted(&self) -> Option<&RateLimitInfo> {
        self.statements
            .iter()
            .filter(|s| s.remaining == 0)
            .max_by_key(|s| s.reset)
    }

    /// The name of the quota that requests count against, as the server gives it: the policy
    /// names (the draft's policies, GitHub's `x-ratelimit-resource`) of every statement about
    /// requests, in order, one per line; `None` unless each has one. Routes whose responses
    /// give the same name share one quota.
    pub(crate) fn quota_name(&self) -> Option<String> {
        let mut name = String::new();
        for statement in self.statements.iter().filter(|s| s.unit == Unit::Requests) {
            if !name.is_empty() {
                // No field value holds a line break, so names stay apart.
                name.push('\n');
            }
            name.push_str(statement.policy.as_deref()?);
        }
        (!name.is_empty()).then_some(name)
    }
}

/// Reads every statement of the `dialects` in `headers`. `now` is the wall-clock time that
/// relative resets are counted from. Any bytes are taken: a field that cannot be understood is
/// listed in [`RateLimitHeaders::malformed`] and ignored, never a panic.
pub fn read(headers: &HeaderMap, now: SystemTime, dialects: Dialects) -> RateLimitHeaders {
    let fields = Fields::collect(headers);
    let mut out = RateLimitHeaders::default();
    if fields.is_empty() {
        return out;
    }
    if dialects.contains(Dialect::Ietf) {
        fields.ietf(now, &mut out);
    }
    if dialects.contains(Dialect::IetfTriple) {
        let [limit, remaining, reset] = &fields.ietf_triple;
        triple(
            [limit, remaining, reset],
            ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"],
            |t| parse_seconds(t).and_then(|s| now.checked_add(secs_to_duration(s))),
            (None, Unit::Requests, Dialect::IetfTriple),
            &mut out,
        );
    }
    let github = fields.github_resource.is_some() || fields.github_used.is_some();
    let x_dialect = if github && dialects.contains(Dialect::GitHub) {
        Some(Dialect::GitHub)
    } else if dialects.contains(Dialect::XRateLimit) {
        Some(Dialect::XRateLimit)
    } else {
        None
    };
    if let Some(dialect) = x_dialect {
        let policy = (dialect == Dialect::GitHub)
            .then(|| fields.github_resource.and_then(text).map(str::to_owned))
            .flatten();
        let [limit, remaining, reset] = &fields.x;
        triple(
            [limit, remaining, reset],
            [
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ],
            |t| parse_reset(t, now),
            (policy, Unit::Requests, dialect),
            &mut out,
        );
    }
    if dialects.contains(Dialect::OpenAi) {
        for (unit, [limit, remaining, reset], names) in [
            (
                Unit::Requests,
                &fields.openai_requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                Unit::Tokens,
                &fields.openai_tokens,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ] {
            triple(
                [limit, remaining, reset],
                names,
                |t| parse_go_duration(t).and_then(|d| now.checked_add(d)),
                (None, unit, Dialect::OpenAi),
                &mut out,
            );
        }
    }
    if dialects.contains(Dialect::Anthropic) {
        for (i, (unit, names)) in ANTHROPIC.iter().enumerate() {
            let [limit, remaining, reset] = &fields.anthropic[i];
            triple(
                [limit, remaining, reset],
                *names,
                |t| humantime::parse_rfc3339(t).ok(),
                (None, *unit, Dialect::Anthropic),
                &mut out,
            );
        }
    }
    out
}

const ANTHROPIC: [(Unit, [&str; 3]); 4] = [
    (
        Unit::Requests,
        [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
    ),
    (
        Unit::Tokens,
        [
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset",
        ],
    ),
    (
        Unit::InputTokens,
        [
            "anthropic-ratelimit-input-tokens-limit",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-input-tokens-reset",
        ],
    ),
    (
        Unit::OutputTokens,
        [
            "anthropic-ratelimit-output-tokens-limit",
            "anthropic-ratelimit-output-tokens-remaining",
            "anthropic-ratelimit-output-tokens-reset",
        ],
    ),
];

type Slot<'a> = Option<&'a HeaderValue>;

/// The fields of every dialect, found in one pass over the response's fields.
#[derive(Default)]
struct Fields<'a> {
    /// Every `RateLimit` and `RateLimit-Policy` field line.
    ratelimit: Vec<&'a HeaderValue>,
    policy: Vec<&'a HeaderValue>,
    ietf_triple: [Slot<'a>; 3],
    x: [Slot<'a>; 3],
    github_resource: Slot<'a>,
    github_used: Slot<'a>,
    openai_requests: [Slot<'a>; 3],
    openai_tokens: [Slot<'a>; 3],
    anthropic: [[Slot<'a>; 3]; 4],
    any: bool,
}

impl<'a> Fields<'a> {
    fn collect(headers: &'a HeaderMap) -> Self {
        let mut fields = Self::default();
        for (name, value) in headers {
            let name = name.as_str();
            // Header names are lower case: every field read here starts with one of these.
            let slot: &mut Slot<'a> = if let Some(rest) = name.strip_prefix("ratelimit") {
                match rest {
                    "" => {
                        fields.ratelimit.push(value);
                        fields.any = true;
                        continue;
                    }
                    "-policy" => {
                        fields.policy.push(value);
                        fields.any = true;
                        continue;
                    }
                    "-limit" => &mut fields.ietf_triple[0],
                    "-remaining" => &mut fields.ietf_triple[1],
                    "-reset" => &mut fields.ietf_triple[2],
                    _ => continue,
                }
            } else if let Some(rest) = name.strip_prefix("x-ratelimit-") {
                match rest {
                    "limit" => &mut fields.x[0],
                    "remaining" => &mut fields.x[1],
                    "reset" => &mut fields.x[2],
                    "resource" => &mut fields.github_resource,
                    "used" => &mut fields.github_used,
                    "limit-requests" => &mut fields.openai_requests[0],
                    "remaining-requests" => &mut fields.openai_requests[1],
                    "reset-requests" => &mut fields.openai_requests[2],
                    "limit-tokens" => &mut fields.openai_tokens[0],
                    "remaining-tokens" => &mut fields.openai_tokens[1],
                    "reset-tokens" => &mut fields.openai_tokens[2],
                    _ => continue,
                }
            } else if name.starts_with("anthropic-ratelimit-") {
                let Some((unit, part)) =
                    ANTHROPIC.iter().enumerate().find_map(|(i, (_, names))| {
                        names.iter().position(|n| *n == name).map(|p| (i, p))
                    })
                else {
                    continue;
                };
                &mut fields.anthropic[unit][part]
            } else {
                continue;
            };
            // The first line of a single-valued field counts.
            slot.get_or_insert(value);
            fields.any = true;
        }
        fields
    }

    fn is_empty(&self) -> bool {
        !self.any
    }

    /// The draft's `RateLimit` (and its policies' quotas from `RateLimit-Policy`).
    fn ietf(&self, now: SystemTime, out: &mut RateLimitHeaders) {
        if self.ratelimit.is_empty() {
            return;
        }
        let Some(text) = joined(&self.ratelimit) else {
            out.malformed.push(InvalidHeader { name: "ratelimit" });
            return;
        };
        let quotas = joined(&self.policy)
            .and_then(|t| sfv::Parser::new(&t).parse::<sfv::List>().ok())
            .unwrap_or_default();
        // A policy's quota `q` and window `w`, in seconds.
        let policy_of = |name: &str| {
            quotas.iter().find_map(|entry| match entry {
                sfv::ListEntry::Item(item)
                    if item_name(&item.bare_item).as_deref() == Some(name) =>
                {
                    let window = count_param(&item.params, "w").map(Duration::from_secs);
                    Some((count_param(&item.params, "q"), window))
                }
                _ => None,
            })
        };
        if let Ok(list) = sfv::Parser::new(&text).parse::<sfv::List>() {
            let mut read = 0;
            for entry in &list {
                let sfv::ListEntry::Item(item) = entry else {
                    continue;
                };
                let Some(remaining) = count_param(&item.params, "r") else {
                    continue;
                };
                let policy = item_name(&item.bare_item);
                let reset = count_param(&item.params, "t")
                    .and_then(|t| now.checked_add(secs_to_duration(t as f64)));
                let (limit, window) = policy.as_deref().and_then(policy_of).unwrap_or_default();
                out.statements.push(RateLimitInfo {
                    limit,
                    remaining,
                    reset,
                    window,
                    policy,
                    unit: Unit::Requests,
                    dialect: Dialect::Ietf,
                });
                read += 1;
            }
            if read > 0 || list.is_empty() {
                return;
            }
        }
        // The draft's older dictionary form: `limit=100, remaining=50, reset=30`.
        if let Ok(dict) = sfv::Parser::new(&text).parse::<sfv::Dictionary>() {
            let member = |key: &str| match dict.get(key) {
                Some(sfv::ListEntry::Item(item)) => item
                    .bare_item
                    .as_integer()
                    .and_then(|n| u64::try_from(i64::from(n)).ok()),
                _ => None,
            };
            if let Some(remaining) = member("remaining") {
                out.statements.push(RateLimitInfo {
                    limit: member("limit"),
                    remaining,
                    reset: member("reset")
                        .and_then(|t| now.checked_add(secs_to_duration(t as f64))),
                    policy: None,
                    window: None,
                    unit: Unit::Requests,
                    dialect: Dialect::Ietf,
                });
                return;
            }
        }
        out.malformed.push(InvalidHeader { name: "ratelimit" });
    }
}

/// A field's lines as one value (RFC 9110's rule for a list field), or `None` if a line is
/// not text.
fn joined(lines: &[&HeaderValue]) -> Option<String> {
    let mut text = String::new();
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(line.to_str().ok()?);
    }
    Some(text)
}

/// A policy's name: the draft writes it as a string or a token.
fn item_name(item: &sfv::BareItem) -> Option<String> {
    if let Some(s) = item.as_string() {
        return Some(s.as_str().to_owned());
    }
    item.as_token().map(|t| t.as_str().to_owned())
}

/// A non-negative integer parameter.
fn count_param(params: &sfv::Parameters, key: &str) -> Option<u64> {
    let value = params.get(key)?.as_integer()?;
    u64::try_from(i64::from(value)).ok()
}

/// One statement from a dialect's limit / remaining / reset fields; `remaining` is needed,
/// the others are taken when present and understood.
fn triple(
    [limit, remaining, reset]: [&Slot<'_>; 3],
    names: [&'static str; 3],
    parse_reset: impl Fn(&str) -> Option<SystemTime>,
    (policy, unit, dialect): (Option<String>, Unit, Dialect),
    out: &mut RateLimitHeaders,
) {
    let Some(remaining_value) = remaining else {
        return;
    };
    let Some(remaining) = text(remaining_value).and_then(parse_count) else {
        out.malformed.push(InvalidHeader { name: names[1] });
        return;
    };
    let limit = limit.and_then(|v| {
        let count = text(v).and_then(parse_count);
        if count.is_none() {
            out.malformed.push(InvalidHeader { name: names[0] });
        }
        count
    });
    let reset = reset.and_then(|v| {
        let at = text(v).and_then(&parse_reset);
        if at.is_none() {
            out.malformed.push(InvalidHeader { name: names[2] });
        }
        at
    });
    out.statements.push(RateLimitInfo {
        limit,
        remaining,
        reset,
        policy,
        window: None,
        unit,
        dialect,
    });
}

pub(super) fn text(value: &HeaderValue) -> Option<&str> {
    value.to_str().ok().map(str::trim)
}

/// Non-negative seconds, whole (`120`, the standard form) or fractional (`1.5`, tolerated).
pub(super) fn parse_seconds(text: &str) -> Option<f64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    text.parse::<f64>().ok().filter(|s| s.is_finite())
}

/// A count; one too large for `u64` is as good as unlimited.
fn parse_count(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<u64>().unwrap_or(u64::MAX))
}

/// Seconds beyond what any limit means (about 31 years) are capped there, so that arithmetic
/// on them cannot overflow.
const MAX_SECONDS: f64 = 1e9;

pub(super) fn secs_to_duration(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.clamp(0.0, MAX_SECONDS))
}

/// `X-RateLimit-Reset`: delta seconds, or a Unix time in seconds (from 10⁹, September 2001)
/// or milliseconds (from 10¹²), as the APIs that send it differ. A delta is never that large:
/// 10⁹ seconds is 31 years.
fn parse_reset(text: &str, now: SystemTime) -> Option<SystemTime> {
    let value = parse_seconds(text)?;
    let since_epoch = |s: f64| UNIX_EPOCH + Duration::from_secs_f64(s.min(1e11));
    Some(if value >= 1e12 {
        since_epoch(value / 1000.0)
    } else if value >= 1e9 {
        since_epoch(value)
    } else {
        now.checked_add(secs_to_duration(value))?
    })
}

/// A Go duration as OpenAI writes resets: `1s`, `6m0s`, `1.5s`, `17ms`, `1h2m3.5s` (units
/// `h`, `m`, `s`, `ms`, `us` / `µs`, `ns`).
pub(super) fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut seconds = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let (scale, unit_len) = if rest.starts_with("ms") {
            (1e-3, 2)
        } else if rest.starts_with("us") {
            (1e-6, 2)
        } else if rest.starts_with("µs") {
            (1e-6, "µs".len())
        } else if rest.starts_with("ns") {
            (1e-9, 2)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else {
            return None;
        };
        seconds += number * scale;
        rest = &rest[unit_len..];
    }
    seconds.is_finite().then(|| secs_to_duration(seconds))
}
