//! Subscription plans and their concurrency limits.

use std::fmt;
use std::str::FromStr;

use crate::error::ConfigError;

/// A subscription plan: how many jobs may be `PENDING` or `PROCESSING` at once.
///
/// The named plans are Sync's: Hobbyist 1, Creator 3, Growth 6, Scale 15, and Enterprise with a
/// custom limit. For an API with other plan names, use
/// [`ConcurrencyLimitByPlan::with_limit`](super::ConcurrencyLimitByPlan::with_limit).
///
/// Parsed case-insensitively from `"creator"`, `"Scale"`, `"enterprise:40"` or
/// `"Enterprise(40)"`; displayed as `Creator` or `Enterprise(40)`, which parse back.
///
/// ```
/// use tower_quota::Plan;
/// assert_eq!("creator".parse::<Plan>(), Ok(Plan::Creator));
/// assert_eq!("Enterprise(40)".parse::<Plan>().unwrap().limit(), 40);
/// assert!("enterprise:0".parse::<Plan>().is_err());
/// assert_eq!(Plan::Growth.to_string(), "Growth");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Plan {
    /// 1 job at once.
    Hobbyist,
    /// 3 jobs at once.
    Creator,
    /// 6 jobs at once.
    Growth,
    /// 15 jobs at once.
    Scale,
    /// A custom number of jobs at once (at least 1).
    Enterprise(usize),
}

impl Plan {
    /// How many jobs the plan allows at once.
    pub const fn limit(self) -> usize {
        match self {
            Self::Hobbyist => 1,
            Self::Creator => 3,
            Self::Growth => 6,
            Self::Scale => 15,
            Self::Enterprise(n) => n,
        }
    }

    /// The plan's limit, or a typed error for `Enterprise(0)`.
    pub(crate) fn checked_limit(self) -> Result<usize, ConfigError> {
        match self.limit() {
            0 => Err(ConfigError::InvalidSetting {
                name: "plan",
                reason: "a plan must allow at least one job",
            }),
            n => Ok(n),
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hobbyist => f.write_str("Hobbyist"),
            Self::Creator => f.write_str("Creator"),
            Self::Growth => f.write_str("Growth"),
            Self::Scale => f.write_str("Scale"),
            Self::Enterprise(n) => write!(f, "Enterprise({n})"),
        }
    }
}

/// Text that names no plan, or an Enterprise plan without a usable limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsePlanError {
    text: String,
}

impl fmt::Display for ParsePlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a plan: expected hobbyist, creator, growth, scale, or enterprise:N with N at least 1",
            self.text
        )
    }
}

impl std::error::Error for ParsePlanError {}

impl FromStr for Plan {
    type Err = ParsePlanError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParsePlanError {
            text: text.to_owned(),
        };
        let lower = text.trim().to_ascii_lowercase();
        Ok(match lower.as_str() {
            "hobbyist" => Self::Hobbyist,
            "creator" => Self::Creator,
            "growth" => Self::Growth,
            "scale" => Self::Scale,
            other => {
                let rest = other.strip_prefix("enterprise").ok_or_else(error)?;
                let n = rest
                    .strip_prefix(':')
                    .or_else(|| rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')))
                    .ok_or_else(error)?;
                match n.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Self::Enterprise(n),
                    _ => return Err(error()),
                }
            }
        })
    }
}

#[cfg(feature = "serde")]
mod serde_impl {
    use super::Plan;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// As its text: `"Creator"`, `"Enterprise(40)"`.
    impl Serialize for Plan {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_str(self)
        }
    }

    /// From its text, case-insensitively (`"creator"`, `"enterprise:40"`).
    impl<'de> Deserialize<'de> for Plan {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            text.parse().map_err(D::Error::custom)
        }
    }
}
