//! The layers' events recorded through the [`metrics`] facade (feature `metrics`).
//!
//! Each scope (a route of a rate limiter, a plan, a retrier) registers its handles with the
//! recorder installed when its first event comes, then records through them: an atomic add
//! or a store per event, no lookup. Install the recorder before the first request.

use std::sync::{Arc, Once, OnceLock};

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::backoff::LimitKind;

use crate::event::{Event, Figures, Freed, LayerKind as Kind, Learnt, NoRetry, Refusal, KINDS};

/// One scope's metrics, registered at its first event.
pub(crate) struct Metrics {
    layer: Arc<str>,
    label: Arc<str>,
    kind: Kind,
    handles: OnceLock<Handles>,
}

enum Handles {
    Route(Box<RouteHandles>),
    Plan(Box<PlanHandles>),
    Backoff(Box<BackoffHandles>),
}

/// A route's handles; those of the other mode are not registered (no empty series).
struct RouteHandles {
    admitted: Counter,
    refused: Refused,
    client: Option<ClientHandles>,
    server: Option<ServerHandles>,
}

struct ClientHandles {
    waited: Counter,
    gave_up: Counter,
    abandoned: Counter,
    learnt: [Counter; 2],
    wait: Histogram,
    in_flight: Gauge,
    queue: Gauge,
}

struct ServerHandles {
    keys_forgotten: Counter,
    tracked: Gauge,
}

/// A counter per reason of refusal, registered for the reasons the layer can give.
type Refused = [Option<Counter>; Refusal::ALL.len()];

/// The reasons a layer of `kind` refuses for.
fn reasons(kind: Kind) -> &'static [Refusal] {
    use Refusal::*;
    match kind {
        Kind::Client => &[QueueFull, WaitTooLong, StoreUnavailable, CostTooHigh],
        Kind::Server => &[
            Quota,
            StoreUnavailable,
            MissingKey,
            NoPeerAddress,
            CostTooHigh,
            UnknownTier,
        ],
        Kind::Plan => &[
            QueueFull,
            WaitTooLong,
            StoreUnavailable,
            NoSlots,
            JobCount,
            PlanFull,
            MissingKey,
            NoPeerAddress,
        ],
        Kind::Backoff => &[],
    }
}

fn refused(kind: Kind, counter: impl Fn(Refusal) -> Counter) -> Refused {
    Refusal::ALL.map(|reason| reasons(kind).contains(&reason).then(|| counter(reason)))
}

fn count(refused: &Refused, reason: Refusal) {
    if let Some(counter) = &refused[index(&Refusal::ALL, &reason)] {
        counter.increment(1);
    }
}

struct PlanHandles {
    taken: Counter,
    waited: Counter,
    refused: Refused,
    gave_up: Counter,
    bound: Counter,
    freed: [Counter; Freed::ALL.len()],
    wait: Histogram,
    held: Gauge,
    queue: Gauge,
    limit: Gauge,
}

struct BackoffHandles {
    retries: [Counter; KINDS.len()],
    no_retry: [Counter; NoRetry::ALL.len()],
    backoff: Histogram,
}

fn describe() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            "tower_quota_requests_admitted_total",
            "Requests that took their place on a route (sent; in server mode, let through)"
        );
        describe_counter!(
            "tower_quota_requests_waited_total",
            "Requests admitted after waiting for their turn"
        );
        describe_counter!(
            "tower_quota_requests_refused_total",
            "Requests refused unsent, by reason"
        );
        describe_counter!(
            "tower_quota_requests_gave_up_total",
            "Waiting requests dropped by their caller"
        );
        describe_counter!(
            "tower_quota_requests_abandoned_total",
            "Requests given up on after their send"
        );
        describe_counter!(
            "tower_quota_learnt_total",
            "Responses a client-mode route learnt its limit from"
        );
        describe_counter!(
            "tower_quota_keys_forgotten_total",
            "Server mode: clients forgotten at a full key table"
        );
        describe_histogram!(
            "tower_quota_wait_seconds",
            Unit::Seconds,
            "How long each admitted request waited for its turn"
        );
        describe_gauge!(
            "tower_quota_in_flight",
            "Requests holding a place, unanswered"
        );
        describe_gauge!("tower_quota_queue_depth", "Requests waiting for their turn");
        describe_gauge!(
            "tower_quota_tracked_keys",
            "Server mode: client keys tracked"
        );
        describe_counter!(
            "tower_quota_plan_slots_taken_total",
            "Job slots taken by creates"
        );
        describe_counter!(
            "tower_quota_plan_waited_total",
            "Creates that waited for their slot"
        );
        describe_counter!(
            "tower_quota_plan_refused_total",
            "Creates returned unsent, by reason"
        );
        describe_counter!(
            "tower_quota_plan_gave_up_total",
            "Waiting creates dropped by their caller"
        );
        describe_counter!(
            "tower_quota_jobs_bound_total",
            "Jobs bound to their create's slot"
        );
        describe_counter!(
            "tower_quota_plan_slots_freed_total",
            "Job slots given back, by what gave them back"
        );
        describe_histogram!(
            "tower_quota_plan_wait_seconds",
            Unit::Seconds,
            "How long each create waited for its slot"
        );
        describe_gauge!("tower_quota_plan_slots_held", "Job slots held");
        describe_gauge!(
            "tower_quota_plan_slots_limit",
            "The plan's limit of jobs at once"
        );
        describe_gauge!("tower_quota_plan_queue_depth", "Creates waiting for a slot");
        describe_counter!(
            "tower_quota_retries_total",
            "Requests sent again after a refusal, by kind"
        );
        describe_counter!(
            "tower_quota_retries_refused_total",
            "Refusals not retried, by why"
        );
        describe_histogram!(
            "tower_quota_backoff_seconds",
            Unit::Seconds,
            "Each wait before a retry"
        );
    });
}

impl Metrics {
    pub(crate) fn new(layer: Arc<str>, label: Arc<str>, kind: Kind) -> Self {
        Self {
            layer,
            label,
            kind,
            handles: OnceLock::new(),
        }
    }

    fn handles(&self) -> &Handles {
        self.handles.get_or_init(|| self.register())
    }

    #[cold]
    fn register(&self) -> Handles {
        describe();
        let layer = self.layer.to_string();
        match self.kind {
            Kind::Client | Kind::Server => {
                let route = self.label.to_string();
                let labels = [("layer", layer), ("route", route)];
                let counter = |name: &'static str| metrics::counter!(name, &labels);
                let gauge = |name: &'static str| metrics::gauge!(name, &labels);
                let refused = refused(self.kind, |reason| {
                    metrics::counter!("tower_quota_requests_refused_total",
                        "layer" => labels[0].1.clone(), "route" => labels[1].1.clone(),
                        "reason" => reason.as_str())
                });
                let client = (self.kind == Kind::Client).then(|| ClientHandles {
                    waited: counter("tower_quota_requests_waited_total"),
                    gave_up: counter("tower_quota_requests_gave_up_total"),
                    abandoned: counter("tower_quota_requests_abandoned_total"),
                    learnt: [Learnt::TooManyRequests, Learnt::Headers].map(|from| {
                        metrics::counter!("tower_quota_learnt_total",
                            "layer" => labels[0].1.clone(), "route" => labels[1].1.clone(),
                            "from" => from.as_str())
                    }),
                    wait: metrics::histogram!("tower_quota_wait_seconds", &labels),
                    in_flight: gauge("tower_quota_in_flight"),
                    queue: gauge("tower_quota_queue_depth"),
                });
                let server = (self.kind == Kind::Server).then(|| ServerHandles {
                    keys_forgotten: counter("tower_quota_keys_forgotten_total"),
                    tracked: gauge("tower_quota_tracked_keys"),
                });
                Handles::Route(Box::new(RouteHandles {
                    admitted: counter("tower_quota_requests_admitted_total"),
                    refused,
                    client,
                    server,
                }))
            }
            Kind::Plan => {
                let labels = [("layer", layer)];
                let counter = |name: &'static str| metrics::counter!(name, &labels);
                let gauge = |name: &'static str| metrics::gauge!(name, &labels);
                let refused = refused(Kind::Plan, |reason| {
                    metrics::counter!("tower_quota_plan_refused_total",
                        "layer" => labels[0].1.clone(), "reason" => reason.as_str())
                });
                let freed = Freed::ALL.map(|by| {
                    metrics::counter!("tower_quota_plan_slots_freed_total",
                        "layer" => labels[0].1.clone(), "by" => by.as_str())
                });
                Handles::Plan(Box::new(PlanHandles {
                    taken: counter("tower_quota_plan_slots_taken_total"),
                    waited: counter("tower_quota_plan_waited_total"),
                    refused,
                    gave_up: counter("tower_quota_plan_gave_up_total"),
                    bound: counter("tower_quota_jobs_bound_total"),
                    freed,
                    wait: metrics::histogram!("tower_quota_plan_wait_seconds", &labels),
                    held: gauge("tower_quota_plan_slots_held"),
                    queue: gauge("tower_quota_plan_queue_depth"),
                    limit: gauge("tower_quota_plan_slots_limit"),
                }))
            }
            Kind::Backoff => {
                let retries = KINDS.map(|kind| {
                    metrics::counter!("tower_quota_retries_total",
                        "layer" => layer.clone(), "kind" => kind_label(kind))
                });
                let no_retry = NoRetry::ALL.map(|why| {
                    metrics::counter!("tower_quota_retries_refused_total",
                        "layer" => layer.clone(), "why" => why.as_str())
                });
                Handles::Backoff(Box::new(BackoffHandles {
                    retries,
                    no_retry,
                    backoff: metrics::histogram!("tower_quota_backoff_seconds", "layer" => layer),
                }))
            }
        }
    }

    /// Records one event.
    pub(crate) fn record(&self, event: &Event<'_>) {
        match (self.handles(), *event) {
            (Handles::Route(h), Event::Admitted { waited, .. }) => {
                h.admitted.increment(1);
                if let Some(c) = &h.client {
                    if !waited.is_zero() {
                        c.waited.increment(1);
                    }
                    c.wait.record(waited.as_secs_f64());
                }
            }
            (Handles::Route(h), Event::Refused { reason, .. }) => count(&h.refused, reason),
            (Handles::Route(h), event) => match (&h.client, &h.server, event) {
                (Some(c), _, Event::GaveUp { .. }) => c.gave_up.increment(1),
                (Some(c), _, Event::Abandoned { .. }) => c.abandoned.increment(1),
                (Some(c), _, Event::Learnt { from, .. }) => {
                    c.learnt[usize::from(from == Learnt::Headers)].increment(1);
                }
                (_, Some(s), Event::KeyForgotten { .. }) => s.keys_forgotten.increment(1),
                _ => {}
            },
            (Handles::Plan(h), Event::SlotTaken { waited, .. }) => {
                h.taken.increment(1);
                if !waited.is_zero() {
                    h.waited.increment(1);
                }
                h.wait.record(waited.as_secs_f64());
            }
            (Handles::Plan(h), Event::SlotRefused { reason, .. }) => count(&h.refused, reason),
            (Handles::Plan(h), Event::SlotGaveUp { .. }) => h.gave_up.increment(1),
            (Handles::Plan(h), Event::JobBound { .. }) => h.bound.increment(1),
            (Handles::Plan(h), Event::SlotFreed { by, .. }) => {
                h.freed[index(&Freed::ALL, &by)].increment(1);
            }
            (Handles::Backoff(h), Event::Retry { kind, wait, .. }) => {
                h.retries[index(&KINDS, &kind)].increment(1);
                h.backoff.record(wait.as_secs_f64());
            }
            (Handles::Backoff(h), Event::NoRetry { why, .. }) => {
                h.no_retry[index(&NoRetry::ALL, &why)].increment(1);
            }
            _ => {}
        }
    }

    /// Server mode: one more client key tracked.
    pub(crate) fn tracked_one_more(&self) {
        if let Handles::Route(h) = self.handles() {
            if let Some(s) = &h.server {
                s.tracked.increment(1.0);
            }
        }
    }

    /// Sets the gauges.
    pub(crate) fn gauges(&self, figures: Figures) {
        let set = |gauge: &Gauge, value: Option<usize>| {
            if let Some(value) = value {
                gauge.set(value as f64);
            }
        };
        match self.handles() {
            Handles::Route(h) => {
                if let Some(c) = &h.client {
                    set(&c.in_flight, figures.held);
                    set(&c.queue, figures.waiting);
                }
            }
            Handles::Plan(h) => {
                set(&h.held, figures.held);
                set(&h.queue, figures.waiting);
                set(&h.limit, figures.limit);
            }
            Handles::Backoff(_) => {}
        }
    }
}

fn index<T: PartialEq>(all: &[T], one: &T) -> usize {
    all.iter().position(|x| x == one).unwrap_or(0)
}

/// The metric label of a kind of refusal: `rate`, `concurrency` or `transient`.
fn kind_label(kind: LimitKind) -> &'static str {
    match kind {
        LimitKind::Rate => "rate",
        LimitKind::Concurrency => "concurrency",
        LimitKind::Transient => "transient",
    }
}
