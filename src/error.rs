//! Configuration errors, shared by every layer's builder.

use std::fmt;

/// A layer's configuration is unusable. Returned by `build()` (and by run-time changes such as
/// [`RateLimitByRoute::set_quota`](crate::RateLimitByRoute::set_quota)), never a panic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A quota is unusable: zero count, zero period or zero burst.
    InvalidQuota {
        /// The route pattern the quota was given for (`"default"` for the default quota).
        route: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A route pattern is malformed.
    InvalidRoute {
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two route patterns match the same requests.
    DuplicateRoute {
        /// The pattern given second.
        pattern: String,
        /// The pattern given before, which it collides with.
        existing: String,
    },
    /// A run-time change names a route the layer does not have.
    UnknownRoute {
        /// The pattern as given.
        pattern: String,
    },
    /// A value given to a setting cannot be used.
    InvalidValue {
        /// The setting's name.
        name: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Another setting is out of range.
    InvalidSetting {
        /// The setting's name.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidQuota { route, reason } => {
                write!(f, "invalid quota for route `{route}`: {reason}")
            }
            Self::InvalidRoute { pattern, reason } => {
                write!(f, "invalid route pattern `{pattern}`: {reason}")
            }
            Self::DuplicateRoute { pattern, existing } => write!(
                f,
                "route pattern `{pattern}` collides with `{existing}` given before"
            ),
            Self::UnknownRoute { pattern } => write!(f, "no route `{pattern}` in this layer"),
            Self::InvalidValue {
                name,
                value,
                reason,
            } => write!(f, "invalid {name} `{value}`: {reason}"),
            Self::InvalidSetting { name, reason } => write!(f, "invalid `{name}`: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}
