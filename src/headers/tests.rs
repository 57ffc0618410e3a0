//! Rate-limit headers as real servers send them, and garbage.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
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

#[test]
fn retry_after_in_both_forms() {
    let secs = |v: &str| retry_after(&map(&[("retry-after", v)]), now());
    assert_eq!(secs("120"), Ok(Some(Duration::from_secs(120))));
    assert_eq!(secs(" 7 "), Ok(Some(Duration::from_secs(7))));
    assert_eq!(secs("1.5"), Ok(Some(Duration::from_millis(1500))));
    assert_eq!(secs("0"), Ok(Some(Duration::ZERO)));
    let date = httpdate::fmt_http_date(now() + Duration::from_secs(30));
    assert_eq!(secs(&date), Ok(Some(Duration::from_secs(30))));
    let past = httpdate::fmt_http_date(now() - Duration::from_secs(30));
    assert_eq!(secs(&past), Ok(Some(Duration::ZERO)));
    // Huge values are capped, not overflowed.
    assert_eq!(
        secs("99999999999999999999999"),
        Ok(Some(Duration::from_secs(1_000_000_000)))
    );
    for garbage in ["-5", "soon", "", "1e3", "Mon, 99 Foo 2024", "NaN", "inf"] {
        assert!(secs(garbage).is_err(), "{garbage:?}");
    }
    assert_eq!(retry_after(&HeaderMap::new(), now()), Ok(None));
}

#[test]
fn retry_after_ms_wins_when_valid() {
    let both = map(&[("retry-after", "2"), ("retry-after-ms", "1500")]);
    assert_eq!(
        retry_after(&both, now()),
        Ok(Some(Duration::from_millis(1500)))
    );
    let bad_ms = map(&[("retry-after", "2"), ("retry-after-ms", "x")]);
    assert_eq!(
        retry_after(&bad_ms, now()),
        Ok(Some(Duration::from_secs(2)))
    );
    let only_bad_ms = map(&[("retry-after-ms", "x")]);
    assert!(retry_after(&only_bad_ms, now()).is_err());
}

#[test]
fn remaining_from_every_field_family() {
    let r = |fields: &[(&'static str, &str)]| remaining(&map(fields), now());
    assert_eq!(
        r(&[("ratelimit", "\"default\";r=5;t=30")]),
        Ok(Some((5, Duration::from_secs(30))))
    );
    assert_eq!(
        r(&[("ratelimit", "\"a, b\";r=50;t=3, \"daily\";r=2;t=600")]),
        Ok(Some((2, Duration::from_secs(600))))
    );
    assert_eq!(
        r(&[("ratelimit", "limit=100, remaining=4, reset=9")]),
        Ok(Some((4, Duration::from_secs(9))))
    );
    assert_eq!(
        r(&[("ratelimit-remaining", "7"), ("ratelimit-reset", "12")]),
        Ok(Some((7, Duration::from_secs(12))))
    );
    assert_eq!(
        r(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "20")]),
        Ok(Some((0, Duration::from_secs(20))))
    );
    // A Unix time, in seconds and in milliseconds.
    assert_eq!(
        r(&[
            ("x-ratelimit-remaining", "1"),
            ("x-ratelimit-reset", "1700000045")
        ]),
        Ok(Some((1, Duration::from_secs(45))))
    );
    assert_eq!(
        r(&[
            ("x-ratelimit-remaining", "1"),
            ("x-ratelimit-reset", "1700000045000")
        ]),
        Ok(Some((1, Duration::from_secs(45))))
    );
    // A count with no reset cannot be placed in time.
    assert_eq!(r(&[("x-ratelimit-remaining", "3")]), Ok(None));
    assert_eq!(r(&[]), Ok(None));
    for garbage in [
        &[("ratelimit", "r=;t=")][..],
        &[("ratelimit", "\"x\";r=-1;t=3")],
        &[("ratelimit-remaining", "lots"), ("ratelimit-reset", "3")],
        &[
            ("x-ratelimit-remaining", "3"),
            ("x-ratelimit-reset", "later"),
        ],
    ] {
        assert!(r(garbage).is_err(), "{garbage:?}");
    }
}

#[test]
fn written_fields() {
    assert_eq!(retry_after_secs(Duration::ZERO), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
    assert_eq!(
        policy_value("POST /v2/generate", 60, Duration::from_secs(60)),
        "\"POST /v2/generate\";q=60;w=60"
    );
    assert_eq!(
        ratelimit_value("default", 0, Duration::from_millis(2500)),
        "\"default\";r=0;t=3"
    );
    let prefix = ratelimit_prefix("POST /v2/generate").unwrap();
    assert_eq!(
        ratelimit_value_after(&prefix, 59, Duration::from_millis(63_200)),
        "\"POST /v2/generate\";r=59;t=64"
    );
    assert_eq!(
        ratelimit_value("a\"b\\c\u{e9}", 5, Duration::from_millis(100)),
        "\"a\\\"b\\\\c_\";r=5;t=1"
    );
}

proptest! {
    #[test]
    fn no_header_value_makes_a_parser_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        text in "\\PC{0,40}",
        name in prop::sample::select(vec![
            "retry-after", "retry-after-ms", "ratelimit", "ratelimit-remaining",
            "ratelimit-reset", "x-ratelimit-remaining", "x-ratelimit-reset",
        ]),
    ) {
        for value in [HeaderValue::from_bytes(&bytes), HeaderValue::from_str(&text)]
            .into_iter()
            .flatten()
        {
            let mut fields = HeaderMap::new();
            fields.insert(name, value.clone());
            fields.insert("ratelimit-reset", value.clone());
            fields.insert("x-ratelimit-reset", value);
            let _ = retry_after(&fields, now());
            let _ = remaining(&fields, now());
            let _ = retry_after(&fields, UNIX_EPOCH);
            let _ = remaining(&fields, UNIX_EPOCH);
        }
        let _ = policy_value(&text, 1, Duration::from_secs(1));
        let _ = ratelimit_value(&text, 0, Duration::MAX);
    }

    /// A route's `RateLimit` field written after its prefix made once is the field written
    /// whole, for any name that needs no escaping; a name that does has no prefix.
    #[test]
    fn a_field_after_its_prefix_is_the_field_written_whole(
        name in prop_oneof!["[ -~]{0,40}", "\\PC{0,40}"],
        remaining in any::<u32>(),
        reset in any::<u64>(),
        nanos in 0u32..1_000_000_000,
    ) {
        let reset = Duration::new(reset, nanos);
        let whole = ratelimit_value(&name, remaining, reset);
        match ratelimit_prefix(&name) {
            Some(prefix) => {
                prop_assert_eq!(ratelimit_value_after(&prefix, remaining, reset), whole);
            }
            None => prop_assert!(name.bytes().any(|b| !(b' '..=b'~').contains(&b) || b == b'"' || b == b'\\')),
        }
    }
}
