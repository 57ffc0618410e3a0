//! The layers' settings as data (feature `serde`): limits from a TOML or JSON file, or any
//! other serde source, checked by the same builders as in code.
//!
//! [`Config`] holds a section per layer, each optional; each section's `build` makes its
//! layer through its builder, so a setting that makes no sense is the builder's
//! [`ConfigError`], naming the route or setting. What does not read at all (a misspelt key,
//! a quota that is not one) is the format's own error, which names the key:
//!
//! ```toml
//! [rate_limit]
//! default = "600/min"                   # every route not named below
//! max_wait = "2m"                       # durations as humantime reads them
//! routes = { "POST /v2/generate" = "60/min" }
//!
//! [plan]
//! plan = "Creator"                      # or "enterprise:40"
//! preset = "sync"                       # Sync's job, status and list routes and statuses
//!
//! [backoff]
//! preset = "sync"                       # Sync's classifier of 429s
//! max_retries = 5
//! base_delay = "1s"
//! jitter = "equal"                      # none, full, equal, decorrelated
//! ```
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let text = r#"{ "rate_limit": { "routes": { "POST /v2/generate": "60/min" } } }"#;
//! let config: tower_quota::config::Config = serde_json::from_str(text)?;
//! let limits = config.rate_limit.unwrap_or_default().build()?;
//! assert_eq!(limits.snapshot()[0].remaining, 60);
//! # Ok(())
//! # }
//! ```
//!
//! From the environment: every value reads from a string (a [`Quota`] from `"60/min"`, a
//! [`Plan`] from `"creator"`, a duration from `"90s"`, [`Jitter`] and
//! [`FailMode`](crate::store::FailMode) from their names), so crates that merge environment
//! variables into a serde structure (`figment`, `config`) fill a [`Config`] as they do any
//! other, and a single value parses with `str::parse`.

use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::backoff::{Jitter, Schedule};
use crate::error::ConfigError;
use crate::rate_limit::Wait;
use crate::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

/// The settings of the three layers, each optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// [`RateLimitByRoute`], client mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// [`ConcurrencyLimitByPlan`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanConfig>,
    /// [`Backoff429`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffConfig>,
}

/// A vendor whose routes and rules the crate knows ([`presets`](crate::presets)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Preset {
    /// Sync's lip-sync API ([`presets::sync`](crate::presets::sync)).
    Sync,
}

/// [`RateLimitByRoute`]'s settings (client mode); each unset one keeps the builder's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimitConfig {
    /// Sync's quotas ([`presets::sync::rate_limits`](crate::presets::sync::rate_limits)),
    /// under the routes and default given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Quotas by route pattern (`"POST /v2/generate" = "60/min"`), in order.
    #[serde(
        default,
        deserialize_with = "routes::deserialize",
        skip_serializing_if = "IndexMap::is_empty"
    )]
    pub routes: IndexMap<String, Quota>,
    /// The quota of every other route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Quota>,
    /// Routes whose quota is learnt from the server's responses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learn_routes: Vec<String>,
    /// Learn the default quota from the server's responses.
    #[serde(default, skip_serializing_if = "is_false")]
    pub learn_quota: bool,
    /// See [`Builder::max_wait`](crate::rate_limit::Builder::max_wait).
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_wait: Option<Duration>,
    /// See [`Builder::max_queue`](crate::rate_limit::Builder::max_queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    /// See [`Builder::abandoned_hold`](crate::rate_limit::Builder::abandoned_hold).
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub abandoned_hold: Option<Duration>,
}

fn is_false(value: &bool) -> bool {
    !value
}

impl RateLimitConfig {
    /// The layer, through its builder.
    pub fn build(self) -> Result<RateLimitByRoute<Wait>, ConfigError> {
        let mut builder = match self.preset {
            Some(Preset::Sync) => crate::presets::sync::rate_limits(),
            None => RateLimitByRoute::builder(),
        };
        for (pattern, quota) in self.routes {
            builder = builder.route(pattern, quota);
        }
        if let Some(quota) = self.default {
            builder = builder.default_quota(quota);
        }
        for pattern in self.learn_routes {
            builder = builder.learn_route(pattern);
        }
        if self.learn_quota {
            builder = builder.learn_quota();
        }
        if let Some(wait) = self.max_wait {
            builder = builder.max_wait(wait);
        }
        if let Some(len) = self.max_queue {
            builder = builder.max_queue(len);
        }
        if let Some(hold) = self.abandoned_hold {
            builder = builder.abandoned_hold(hold);
        }
        builder.build()
    }
}

/// [`ConcurrencyLimitByPlan`]'s settings; each unset one keeps the builder's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PlanConfig {
    /// The plan: `"Creator"`, `"enterprise:40"`.
    pub plan: Plan,
    /// A vendor's job, status and list routes and active statuses; without one nothing is
    /// assumed of the API (as [`ConcurrencyLimitByPlan::custom`]): name its routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Routes that create a job (replacing a preset's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_routes: Vec<String>,
    /// Routes that show one job's status (replacing a preset's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_routes: Vec<String>,
    /// Routes that list active jobs (replacing a preset's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub list_routes: Vec<String>,
    /// The statuses in which a job holds a slot (replacing a preset's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active_statuses: Vec<String>,
    /// See [`Builder::max_job_life`](crate::concurrency::Builder::max_job_life).
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_job_life: Option<Duration>,
    /// See [`Builder::max_queue`](crate::concurrency::Builder::max_queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    /// See [`Builder::max_wait`](crate::concurrency::Builder::max_wait).
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_wait: Option<Duration>,
}

impl PlanConfig {
    /// `plan`, every other setting unset (nothing assumed of the API without a preset).
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            preset: None,
            job_routes: Vec::new(),
            status_routes: Vec::new(),
            list_routes: Vec::new(),
            active_statuses: Vec::new(),
            max_job_life: None,
            max_queue: None,
            max_wait: None,
        }
    }

    /// The layer, through its builder.
    pub fn build(self) -> Result<ConcurrencyLimitByPlan, ConfigError> {
        let mut builder = match self.preset {
            Some(Preset::Sync) => crate::presets::sync::plan(self.plan),
            None => crate::concurrency::Builder::new(self.plan),
        };
        for pattern in self.job_routes {
            builder = builder.job_route(pattern);
        }
        for pattern in self.status_routes {
            builder = builder.status_route(pattern);
        }
        for pattern in self.list_routes {
            builder = builder.list_route(pattern);
        }
        if !self.active_statuses.is_empty() {
            builder = builder.active_statuses(self.active_statuses);
        }
        if let Some(life) = self.max_job_life {
            builder = builder.max_job_life(life);
        }
        if let Some(len) = self.max_queue {
            builder = builder.max_queue(len);
        }
        if let Some(wait) = self.max_wait {
            builder = builder.max_wait(wait);
        }
        builder.build()
    }
}

/// [`Backoff429`]'s settings; each unset one keeps the layer's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// A vendor's classifier of 429s (Sync's tells a concurrency refusal apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// The first retry's nominal delay.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_delay: Option<Duration>,
    /// Each retry's delay over the one before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// The longest wait.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_delay: Option<Duration>,
    /// How waits are spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Jitter>,
    /// The schedule of concurrency refusals, when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_schedule: Option<Schedule>,
    /// See [`Backoff429::deadline`].
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub deadline: Option<Duration>,
    /// See [`Backoff429::retry_transient`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub retry_transient: bool,
    /// See [`Backoff429::idempotency_keys`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub idempotency_keys: bool,
    /// See [`Backoff429::error_on_exhaustion`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub error_on_exhaustion: bool,
}

impl BackoffConfig {
    /// The layer, its settings checked.
    pub fn build(self) -> Result<Backoff429, ConfigError> {
        let mut backoff = match self.preset {
            Some(Preset::Sync) => crate::presets::sync::backoff(),
            None => Backoff429::new(),
        };
        if let Some(n) = self.max_retries {
            backoff = backoff.max_retries(n);
        }
        if let Some(delay) = self.base_delay {
            backoff = backoff.base_delay(delay);
        }
        if let Some(factor) = self.factor {
            backoff = backoff.factor(factor);
        }
        if let Some(cap) = self.max_delay {
            backoff = backoff.max_delay(cap);
        }
        if let Some(jitter) = self.jitter {
            backoff = backoff.jitter(jitter);
        }
        if let Some(schedule) = self.concurrency_schedule {
            backoff = backoff.concurrency_schedule(schedule);
        }
        if let Some(deadline) = self.deadline {
            backoff = backoff.deadline(deadline);
        }
        if self.retry_transient {
            backoff = backoff.retry_transient();
        }
        if self.idempotency_keys {
            backoff = backoff.idempotency_keys();
        }
        if self.error_on_exhaustion {
            backoff = backoff.error_on_exhaustion();
        }
        backoff.build()
    }
}

impl Config {
    /// Each section's layer, for the sections given.
    #[allow(clippy::type_complexity)]
    pub fn build(
        self,
    ) -> Result<
        (
            Option<RateLimitByRoute<Wait>>,
            Option<ConcurrencyLimitByPlan>,
            Option<Backoff429>,
        ),
        ConfigError,
    > {
        Ok((
            self.rate_limit.map(RateLimitConfig::build).transpose()?,
            self.plan.map(PlanConfig::build).transpose()?,
            self.backoff.map(BackoffConfig::build).transpose()?,
        ))
    }
}

/// Durations as text, as humantime reads and writes them: `"90s"`, `"1m 30s"`, `"250ms"`.
pub(crate) mod duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format_args!(
                "{text:?} is not a duration ({error}): write \"90s\", \"2m\", \"250ms\""
            ))
        })
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(
            value: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(value) => super::serialize(value, serializer),
                None => serializer.serialize_none(),
            }
        }

        /// A duration, or none (`null` in JSON, as a config crate may give an unset value).
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Text(#[serde(with = "super")] Duration);
            Ok(Option::<Text>::deserialize(deserializer)?.map(|Text(duration)| duration))
        }
    }
}

/// A quota as its text (`"60/1m"`, `"10/1s, burst 1"`, as [`Quota`]'s `FromStr` reads it);
/// read from the text or a table (`{ count = 10, period = "1s", burst = 1 }`).
impl Serialize for Quota {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let period = humantime::format_duration(self.period());
        match self.burst() {
            None => serializer.collect_str(&format_args!("{}/{period}", self.count())),
            Some(burst) => {
                serializer.collect_str(&format_args!("{}/{period}, burst {burst}", self.count()))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Quota {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QuotaVisitor;

        impl<'de> serde::de::Visitor<'de> for QuotaVisitor {
            type Value = Quota;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a quota: \"60/min\", or { count = 60, period = \"1m\" }")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Quota, E> {
                text.parse().map_err(E::custom)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Quota, A::Error> {
                // The table's own errors (a misspelt or missing key) name the key.
                let table =
                    QuotaTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let quota = Quota::new(table.count, table.period);
                Ok(match table.burst {
                    Some(burst) => quota.with_burst(burst),
                    None => quota,
                })
            }
        }

        deserializer.deserialize_any(QuotaVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaTable {
    count: u32,
    #[serde(with = "duration")]
    period: Duration,
    #[serde(default)]
    burst: Option<u32>,
}

/// Routes by pattern, in order; a pattern given twice (JSON allows it) is an error, not the
/// last one silently winning.
mod routes {
    use super::*;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<IndexMap<String, Quota>, D::Error> {
        struct RoutesVisitor;

        impl<'de> serde::de::Visitor<'de> for RoutesVisitor {
            type Value = IndexMap<String, Quota>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("quotas by route pattern: { \"POST /v2/generate\" = \"60/min\" }")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut routes = IndexMap::new();
                while let Some((pattern, quota)) = map.next_entry::<String, Quota>()? {
                    if routes.contains_key(&pattern) {
                        return Err(serde::de::Error::custom(format_args!(
                            "route {pattern:?} is given twice"
                        )));
                    }
                    routes.insert(pattern, quota);
                }
                Ok(routes)
            }
        }

        deserializer.deserialize_map(RoutesVisitor)
    }
}

/// A schedule's settings, each unset one the default's.
impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ScheduleTable {
            max_retries: Some(self.max_retries),
            base_delay: Some(self.base_delay),
            factor: Some(self.factor),
            max_delay: Some(self.max_delay),
            jitter: Some(self.jitter),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = ScheduleTable::deserialize(deserializer)?;
        let mut schedule = Schedule::new();
        if let Some(n) = table.max_retries {
            schedule = schedule.max_retries(n);
        }
        if let Some(delay) = table.base_delay {
            schedule = schedule.base_delay(delay);
        }
        if let Some(factor) = table.factor {
            schedule = schedule.factor(factor);
        }
        if let Some(cap) = table.max_delay {
            schedule = schedule.max_delay(cap);
        }
        if let Some(jitter) = table.jitter {
            schedule = schedule.jitter(jitter);
        }
        Ok(schedule)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleTable {
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default, with = "duration::option")]
    base_delay: Option<Duration>,
    #[serde(default)]
    factor: Option<f64>,
    #[serde(default, with = "duration::option")]
    max_delay: Option<Duration>,
    #[serde(default)]
    jitter: Option<Jitter>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/limits.toml");

    #[test]
    fn the_example_file_builds_the_three_layers_and_reads_back_as_written() {
        let config: Config = toml::from_str(EXAMPLE).unwrap();
        let rate = config.rate_limit.as_ref().unwrap();
        assert_eq!(rate.routes["POST /v2/generate"], Quota::per_minute(60));
        assert_eq!(rate.max_wait, Some(Duration::from_secs(120)));
        assert_eq!(config.plan.as_ref().unwrap().plan, Plan::Creator);
        let backoff = config.backoff.as_ref().unwrap();
        assert_eq!(backoff.jitter, Some(Jitter::Equal));

        // Written out and read back, in TOML and JSON alike.
        let again: Config = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
        let again: Config = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);

        let (limits, plan, backoff) = config.build().unwrap();
        let limits = limits.unwrap();
        let routes: Vec<_> = limits
            .snapshot()
            .iter()
            .map(|r| r.route.to_string())
            .collect();
        assert_eq!(
            routes,
            ["POST /v2/generate", "GET /v2/generate/{id}", "default"]
        );
        assert_eq!(plan.unwrap().plan().limit(), 3);
        assert!(backoff.is_some());
    }

    #[test]
    fn a_misspelt_key_is_an_error_that_names_it() {
        let error = toml::from_str::<Config>("[rate_limit]\nmax_wiat = \"2m\"\n").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("unknown field `max_wiat`"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn a_value_that_does_not_read_is_an_error_that_names_its_key() {
        let text = "[rate_limit]\nroutes = { \"POST /v2/generate\" = \"sixty/min\" }\n";
        let message = toml::from_str::<Config>(text).unwrap_err().to_string();
        assert!(
            message.contains("\"sixty/min\" is not a quota"),
            "{message}"
        );
        assert!(message.contains("POST /v2/generate"), "{message}");

        let message = toml::from_str::<Config>("[backoff]\nbase_delay = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"soon\" is not a duration"), "{message}");
        assert!(message.contains("base_delay"), "{message}");

        let message = toml::from_str::<Config>("[plan]\nplan = \"platinum\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("platinum"), "{message}");

        let message = serde_json::from_str::<Config>(r#"{"backoff":{"jitter":"lots"}}"#)
            .unwrap_err()
            .to_string();
        assert!(message.contains("lots"), "{message}");
    }

    #[test]
    fn a_setting_that_makes_no_sense_is_the_builders_error_naming_it() {
        let text = "[rate_limit]\nroutes = { \"POST /v2/generate\" = \"0/min\" }\n";
        let config: Config = toml::from_str(text).unwrap();
        let error = config.build().unwrap_err();
        assert!(error.to_string().contains("POST /v2/generate"), "{error}");

        let config: Config = toml::from_str("[backoff]\nfactor = 0.5\n").unwrap();
        let error = config.build().unwrap_err();
        assert!(error.to_string().contains("factor"), "{error}");

        let config: Config = toml::from_str("[plan]\nplan = \"Creator\"\n").unwrap();
        let error = config.build().unwrap_err();
        assert!(error.to_string().contains("active_statuses"), "{error}");
    }

    #[test]
    fn quotas_read_from_text_or_a_table() {
        let cases = [
            ("60/min", Quota::per_minute(60)),
            ("60 / minute", Quota::per_minute(60)),
            ("600 per minute", Quota::per_minute(600)),
            ("10000/day", Quota::new(10_000, Duration::from_secs(86_400))),
            ("5/30s", Quota::new(5, Duration::from_secs(30))),
            ("2/1h 30m", Quota::new(2, Duration::from_secs(5400))),
            ("10/s, burst 1", Quota::per_second(10).with_burst(1)),
            ("60/Minutes", Quota::per_minute(60)),
            ("60/mins", Quota::per_minute(60)),
            ("60/hours", Quota::per_hour(60)),
            ("60/secs", Quota::per_second(60)),
            ("1/week", Quota::new(1, Duration::from_secs(604_800))),
            ("5/ms", Quota::new(5, Duration::from_millis(1))),
            ("5/10ms", Quota::new(5, Duration::from_millis(10))),
        ];
        for (text, quota) in cases {
            assert_eq!(text.parse::<Quota>(), Ok(quota), "{text}");
        }
        for text in [
            "",
            "60",
            "60/",
            "/min",
            "-1/min",
            "60/fortnightly",
            "60/min, 5",
        ] {
            assert!(text.parse::<Quota>().is_err(), "{text}");
        }
        let table: Quota = toml::from_str::<IndexMap<String, Quota>>(
            "q = { count = 10, period = \"1s\", burst = 2 }",
        )
        .unwrap()["q"];
        assert_eq!(table, Quota::per_second(10).with_burst(2));
        assert_eq!(
            serde_json::to_string(&Quota::per_minute(60)).unwrap(),
            "\"60/1m\""
        );
    }

    #[test]
    fn unset_values_and_tables_read_as_a_config_crate_gives_them() {
        // `null` is an unset value, for every optional setting.
        let text = r#"{"rate_limit":{"max_wait":null,"abandoned_hold":null,"max_queue":null},
                       "backoff":{"base_delay":null,"deadline":null}}"#;
        let config: Config = serde_json::from_str(text).unwrap();
        assert_eq!(config.rate_limit.unwrap().max_wait, None);

        // A table's own errors name its key.
        for (table, named) in [
            (
                r#"{ count = 1, period = "1s", brust = 2 }"#,
                "unknown field `brust`",
            ),
            (r#"{ count = 1 }"#, "missing field `period`"),
            (
                r#"{ count = 1, period = "soon" }"#,
                "\"soon\" is not a duration",
            ),
        ] {
            let text = format!("[rate_limit]\nroutes = {{ \"GET /a\" = {table} }}\n");
            let message = toml::from_str::<Config>(&text).unwrap_err().to_string();
            assert!(message.contains(named), "{table}: {message}");
        }

        // A route given twice is an error, not the last one winning.
        let text = r#"{"rate_limit":{"routes":{"GET /a":"1/s","GET /a":"2/s"}}}"#;
        let message = serde_json::from_str::<Config>(text)
            .unwrap_err()
            .to_string();
        assert!(message.contains("given twice"), "{message}");

        // Routes keep their order through TOML and JSON, paced ones included.
        let mut rate = RateLimitConfig::default();
        rate.routes
            .insert("GET /a".into(), Quota::per_second(10).with_burst(2));
        rate.routes.insert("GET /b".into(), Quota::per_minute(60));
        rate.routes
            .insert("GET /c".into(), Quota::per_hour(5).with_burst(1));
        let config = Config {
            rate_limit: Some(rate),
            ..Config::default()
        };
        let order = |config: &Config| -> Vec<String> {
            config
                .rate_limit
                .as_ref()
                .unwrap()
                .routes
                .keys()
                .cloned()
                .collect()
        };
        let toml_again: Config = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        let json_again: Config =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        for again in [toml_again, json_again] {
            assert_eq!(order(&again), order(&config));
            assert_eq!(again, config);
        }

        // A plan section made in code.
        let mut plan = PlanConfig::new(Plan::Growth);
        plan.preset = Some(Preset::Sync);
        assert_eq!(plan.build().unwrap().plan().limit(), 6);
    }

    #[test]
    fn names_read_from_the_environment() {
        assert_eq!("Decorrelated".parse(), Ok(Jitter::Decorrelated));
        assert!("lots".parse::<Jitter>().is_err());
        assert_eq!("closed".parse(), Ok(crate::store::FailMode::Closed));
        assert!("ajar".parse::<crate::store::FailMode>().is_err());
        assert_eq!(
            serde_json::from_str::<crate::store::FailMode>("\"open\"").unwrap(),
            crate::store::FailMode::Open
        );
        assert_eq!("enterprise:40".parse(), Ok(Plan::Enterprise(40)));
    }
}
