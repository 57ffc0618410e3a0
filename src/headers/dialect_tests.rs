//! Every dialect, read from header values as the vendors' public documentation shows them,
//! and random bytes in every field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;

use super::*;

fn map(fields: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        map.append(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn statements(fields: &[(&'static str, &str)]) -> RateLimitHeaders {
    read(&map(fields), now(), Dialects::all())
}

fn secs(s: u64) -> Option<SystemTime> {
    Some(now() + Duration::from_secs(s))
}

/// (limit, remaining, reset from now, policy, unit, dialect) of each statement.
type Row = (
    Option<u64>,
    u64,
    Option<SystemTime>,
    Option<String>,
    Unit,
    Dialect,
);

fn rows(stated: &RateLimitHeaders) -> Vec<Row> {
    stated
        .statements
        .iter()
        .map(|s| {
            (
                s.limit,
                s.remaining,
                s.reset,
                s.policy.clone(),
                s.unit,
                s.dialect,
            )
        })
        .collect()
}

#[test]
fn ietf_draft_structured_fields() {
    use Dialect::Ietf;
    use Unit::Requests;
    // draft-ietf-httpapi-ratelimit-headers: a policy and what is left of it.
    let stated = statements(&[
        ("ratelimit-policy", r#""default";q=100;w=10"#),
        ("ratelimit", r#""default";r=50;t=30"#),
    ]);
    assert_eq!(
        rows(&stated),
        [(
            Some(100),
            50,
            secs(30),
            Some("default".into()),
            Requests,
            Ietf
        )]
    );
    assert_eq!(stated.statements[0].window, Some(Duration::from_secs(10)));
    // `t` is optional; unknown parameters and `pk` are ignored.
    let stated = statements(&[("ratelimit", r#""day";r=1;pk=:cHJpdmF0ZQ==:;foo=bar"#)]);
    assert_eq!(
        rows(&stated),
        [(None, 1, None, Some("day".into()), Requests, Ietf)]
    );
    // A name with a quoted `;` and `,`, and a policy named "remaining": names, not syntax.
    let stated = statements(&[(
        "ratelimit",
        r#""a;b, c";r=4;t=2, "remaining";r=9;t=5, token_name;r=3;t=1"#,
    )]);
    assert_eq!(
        rows(&stated),
        [
            (None, 4, secs(2), Some("a;b, c".into()), Requests, Ietf),
            (None, 9, secs(5), Some("remaining".into()), Requests, Ietf),
            (None, 3, secs(1), Some("token_name".into()), Requests, Ietf),
        ]
    );
    // Several field lines are one list: the exhausted policy on the second line is seen.
    let stated = statements(&[
        ("ratelimit", r#""minute";r=10;t=5"#),
        ("ratelimit", r#""day";r=0;t=3600"#),
    ]);
    assert_eq!(stated.exhausted().unwrap().policy.as_deref(), Some("day"));
    assert_eq!(stated.tightest_requests().unwrap().remaining, 0);
    // The draft's older dictionary form.
    let stated = statements(&[("ratelimit", "limit=100, remaining=4, reset=9")]);
    assert_eq!(
        rows(&stated),
        [(Some(100), 4, secs(9), None, Requests, Ietf)]
    );
}

#[test]
fn a_malformed_draft_field_hides_no_other_family() {
    let fields = [
        ("ratelimit", "\"unterminated;r=1"),
        ("x-ratelimit-remaining", "3"),
        ("x-ratelimit-reset", "30"),
    ];
    let stated = statements(&fields);
    assert_eq!(
        stated.malformed,
        [InvalidHeader { name: "ratelimit" }],
        "ignored, as the draft says"
    );
    assert_eq!(
        rows(&stated),
        [(None, 3, secs(30), None, Unit::Requests, Dialect::XRateLimit)]
    );
    assert_eq!(
        remaining(&map(&fields), now()),
        Ok(Some((3, Duration::from_secs(30))))
    );
}

#[test]
fn ietf_draft_older_triple() {
    let stated = statements(&[
        ("ratelimit-limit", "100"),
        ("ratelimit-remaining", "0"),
        ("ratelimit-reset", "50"),
    ]);
    assert_eq!(
        rows(&stated),
        [(
            Some(100),
            0,
            secs(50),
            None,
            Unit::Requests,
            Dialect::IetfTriple
        )]
    );
}

#[test]
fn x_ratelimit_reset_by_magnitude() {
    let x = |reset: &str| {
        rows(&statements(&[
            ("x-ratelimit-limit", "5000"),
            ("x-ratelimit-remaining", "4999"),
            ("x-ratelimit-reset", reset),
        ]))[0]
            .2
    };
    // Delta seconds; a Unix time in seconds (from 10⁹); in milliseconds (from 10¹²).
    assert_eq!(x("30"), secs(30));
    assert_eq!(x("999999999"), secs(999_999_999));
    assert_eq!(x("1700000045"), secs(45));
    assert_eq!(x("1700000045000"), secs(45));
    assert_eq!(
        x("1700000045500"),
        Some(now() + Duration::from_millis(45_500))
    );
}

#[test]
fn openai_requests_and_tokens() {
    // platform.openai.com, "Rate limits in headers".
    let stated = statements(&[
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-limit-tokens", "150000"),
        ("x-ratelimit-remaining-requests", "59"),
        ("x-ratelimit-remaining-tokens", "149984"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ]);
    assert_eq!(
        rows(&stated),
        [
            (Some(60), 59, secs(1), None, Unit::Requests, Dialect::OpenAi),
            (
                Some(150_000),
                149_984,
                secs(360),
                None,
                Unit::Tokens,
                Dialect::OpenAi
            ),
        ]
    );
    assert_eq!(stated.tightest_requests().unwrap().remaining, 59);
    for (text, expected) in [
        ("1s", Duration::from_secs(1)),
        ("6m0s", Duration::from_secs(360)),
        ("1.5s", Duration::from_millis(1500)),
        ("17ms", Duration::from_millis(17)),
        ("1h2m3.5s", Duration::from_millis(3_723_500)),
        ("0s", Duration::ZERO),
        ("250us", Duration::from_micros(250)),
    ] {
        assert_eq!(read::parse_go_duration(text), Some(expected), "{text}");
    }
    for garbage in ["", "s", "1", "1x", "-1s", "1s2", "..5s", "1e3s"] {
        assert_eq!(read::parse_go_duration(garbage), None, "{garbage}");
    }
}

#[test]
fn anthropic_every_limit() {
    // docs.anthropic.com, "Rate limits": resets as RFC 3339 times.
    let stated = statements(&[
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:21Z"),
        ("anthropic-ratelimit-tokens-limit", "80000"),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:14:20Z"),
        ("anthropic-ratelimit-input-tokens-limit", "40000"),
        ("anthropic-ratelimit-input-tokens-remaining", "39000"),
        (
            "anthropic-ratelimit-input-tokens-reset",
            "2023-11-14T22:13:21Z",
        ),
        ("anthropic-ratelimit-output-tokens-limit", "8000"),
        ("anthropic-ratelimit-output-tokens-remaining", "7990"),
        (
            "anthropic-ratelimit-output-tokens-reset",
            "2023-11-14T22:13:21Z",
        ),
        ("retry-after", "60"),
    ]);
    use Dialect::Anthropic;
    assert_eq!(
        rows(&stated),
        [
            (Some(50), 49, secs(1), None, Unit::Requests, Anthropic),
            (Some(80_000), 0, secs(60), None, Unit::Tokens, Anthropic),
            (
                Some(40_000),
                39_000,
                secs(1),
                None,
                Unit::InputTokens,
                Anthropic
            ),
            (
                Some(8_000),
                7_990,
                secs(1),
                None,
                Unit::OutputTokens,
                Anthropic
            ),
        ]
    );
    // No token left: nothing can go until the tokens reset, though requests are left.
    assert_eq!(stated.exhausted().unwrap().unit, Unit::Tokens);
    assert_eq!(
        retry_after(&map(&[("retry-after", "60")]), now()),
        Ok(Some(Duration::from_secs(60)))
    );
}

#[test]
fn github_resources_and_refusals() {
    // docs.github.com, "Rate limits for the REST API".
    let fields = [
        ("x-ratelimit-limit", "60"),
        ("x-ratelimit-remaining", "56"),
        ("x-ratelimit-used", "4"),
        ("x-ratelimit-reset", "1700000600"),
        ("x-ratelimit-resource", "core"),
    ];
    assert_eq!(
        rows(&statements(&fields)),
        [(
            Some(60),
            56,
            secs(600),
            Some("core".into()),
            Unit::Requests,
            Dialect::GitHub
        )]
    );
    // Read as plain X-RateLimit when GitHub's dialect is off.
    let plain = read(
        &map(&fields),
        now(),
        Dialects::all().without(Dialect::GitHub),
    );
    assert_eq!(plain.statements[0].dialect, Dialect::XRateLimit);
    assert_eq!(plain.statements[0].policy, None);
    // Its refusals: 403 (or 429) with a `retry-after`, or with nothing remaining.
    let exhausted = map(&[
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-resource", "core"),
    ]);
    let told = map(&[("retry-after", "60")]);
    assert!(is_rate_limit_refusal(StatusCode::FORBIDDEN, &exhausted));
    assert!(is_rate_limit_refusal(StatusCode::FORBIDDEN, &told));
    assert!(is_rate_limit_refusal(
        StatusCode::TOO_MANY_REQUESTS,
        &HeaderMap::new()
    ));
    // A 403 that says nothing of a limit is a permission refusal.
    assert!(!is_rate_limit_refusal(StatusCode::FORBIDDEN, &map(&fields)));
    assert!(!is_rate_limit_refusal(
        StatusCode::FORBIDDEN,
        &HeaderMap::new()
    ));
}

#[test]
fn a_now_at_the_end_of_time_reads_no_reset_rather_than_panic() {
    let end = UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 - 10);
    let fields = map(&[
        ("ratelimit", r#""p";r=1;t=999999999"#),
        ("ratelimit-remaining", "1"),
        ("ratelimit-reset", "999999"),
        ("x-ratelimit-remaining-requests", "1"),
        ("x-ratelimit-reset-requests", "9999h"),
    ]);
    let stated = read(&fields, end, Dialects::all());
    assert_eq!(stated.statements.len(), 3);
    assert!(stated.statements.iter().all(|s| s.reset.is_none()));
}

#[test]
fn each_dialect_can_be_turned_off() {
    let fields = [
        ("ratelimit", r#""default";r=5;t=30"#),
        ("ratelimit-remaining", "6"),
        ("x-ratelimit-remaining", "7"),
        ("x-ratelimit-remaining-requests", "8"),
        ("anthropic-ratelimit-requests-remaining", "9"),
    ];
    let all = read(&map(&fields), now(), Dialects::all());
    assert_eq!(all.statements.len(), 5);
    for dialect in [
        Dialect::Ietf,
        Dialect::IetfTriple,
        Dialect::XRateLimit,
        Dialect::OpenAi,
        Dialect::Anthropic,
    ] {
        let some = read(&map(&fields), now(), Dialects::all().without(dialect));
        assert_eq!(some.statements.len(), 4, "{dialect}");
        assert!(some.statements.iter().all(|s| s.dialect != dialect));
    }
    assert!(read(&map(&fields), now(), Dialects::none())
        .statements
        .is_empty());
}

const FIELDS: [&str; 24] = [
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-used",
    "x-ratelimit-resource",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
    "retry-after",
    "retry-after-ms",
];

proptest! {
    /// Random bytes in every field never panic, and no reset is read further than the cap
    /// (about 31 years; the layers cap what they use further, see `Learn::cap`).
    #[test]
    fn random_bytes_in_every_field_never_panic_nor_reset_past_the_cap(
        values in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..48).prop_map(|b| HeaderValue::from_bytes(&b).ok()),
                "\\PC{0,40}".prop_map(|t| HeaderValue::from_str(&t).ok()),
                "[0-9a-z.;=\",: -]{0,40}".prop_map(|t| HeaderValue::from_str(&t).ok()),
            ],
            FIELDS.len(),
        ),
        lines in 1usize..3,
    ) {
        let mut fields = HeaderMap::new();
        for (name, value) in FIELDS.iter().zip(&values) {
            if let Some(value) = value {
                for _ in 0..lines {
                    fields.append(*name, value.clone());
                }
            }
        }
        for at in [now(), UNIX_EPOCH] {
            let stated = read(&fields, at, Dialects::all());
            for statement in &stated.statements {
                let after = statement.reset_after(at).unwrap_or_default();
                prop_assert!(after <= Duration::from_secs(100_000_000_000), "{after:?}");
            }
            let _ = stated.tightest_requests();
            let _ = stated.exhausted();
            let _ = remaining(&fields, at);
            let _ = retry_after(&fields, at);
            let _ = is_rate_limit_refusal(StatusCode::FORBIDDEN, &fields);
        }
    }
}
