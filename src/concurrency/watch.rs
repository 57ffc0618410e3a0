//! The active watch: the layer polls its held jobs' status itself.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use super::body::PlanBody;
use super::layer::ConcurrencyLimitByPlan;
use super::observe::{Observe, Observer};
use super::slots::ReleaseReason;
use crate::clock::{nanos, Nanos};
use crate::BoxError;

/// Polls held jobs' status and gives back the slots of those that ended; from
/// [`ConcurrencyLimitByPlan::watch`]. Nothing happens until [`Watch::run`] is awaited (or
/// spawned).
#[derive(Debug, Clone)]
#[must_use = "a watch does nothing until `.run()` is awaited or spawned"]
pub struct Watch<S> {
    plan: ConcurrencyLimitByPlan,
    service: S,
    origin: String,
    interval: Duration,
    /// Added to each status URI: a long poll's query, or nothing.
    query: String,
}

impl<S> Watch<S> {
    pub(crate) fn new(plan: ConcurrencyLimitByPlan, service: S, origin: String) -> Self {
        Self {
            plan,
            service,
            origin: origin.trim_end_matches('/').to_owned(),
            interval: Duration::from_secs(5),
            query: String::new(),
        }
    }

    /// The least time between two polls of one job (default 5 s).
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = every;
        self
    }

    /// A query added to each status URI (`?wait=1`, or `wait=1`: the `?` is added if
    /// missing), for example an API's long poll: the server then answers when the job ends,
    /// and a job's end is seen the moment it happens.
    pub fn query(mut self, query: impl Into<String>) -> Self {
        let query = query.into();
        self.query = match query.as_str() {
            "" => query,
            q if q.starts_with('?') => query,
            q => format!("?{q}"),
        };
        self
    }

    /// Sync's long poll: each poll asks the server to answer when the job ends or after
    /// `timeout` ([`presets::sync::long_poll`](crate::presets::sync::long_poll)), with one
    /// request per job per `timeout`.
    pub fn long_poll(self, timeout: Duration) -> Self {
        self.query(crate::presets::sync::long_poll(timeout))
    }

    /// Watches the held jobs. Never ends: drop the future, or abort its task, to stop.
    pub async fn run<B, ResBody>(self)
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
        S::Error: Into<BoxError>,
        B: Default,
        ResBody: Body,
    {
        let shared = self.plan.shared.clone();
        let (before, after) = match &shared.watch_path {
            Ok(path) => path.clone(),
            Err(why) => {
                tracing::error!("the watch cannot poll jobs and stops: {why}");
                return;
            }
        };
        let query = &self.query;
        let interval = nanos(self.interval);
        shared.watches.fetch_add(1, Ordering::Relaxed);
        let _running = Running(&shared.watches);
        let mut polling: HashSet<Box<str>> = HashSet::new();
        let mut started: HashMap<Box<str>, Nanos> = HashMap::new();
        // Ids the watch cannot poll, warned of once.
        let mut skipped: HashSet<Box<str>> = HashSet::new();
        let mut calls = FuturesUnordered::new();
        loop {
            let changed = shared.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();

            let now = shared.clock.now();
            let held: Vec<Box<str>> = shared.slots().jobs().map(|(id, _)| id.into()).collect();
            started.retain(|id, _| held.contains(id));
            skipped.retain(|id| held.contains(id));
            let mut next_due: Option<Nanos> = None;
            for id in held {
                if polling.contains(&id) || skipped.contains(&id) {
                    continue;
                }
                if !fits_a_path(&id) {
                    tracing::warn!(job = %id.escape_debug(), "a held job's id cannot stand in a status URI: the watch does not poll it (its slot comes back with a status read through the layer, complete, a reconcile or its lease)");
                    skipped.insert(id);
                    continue;
                }
                let due = started
                    .get(&id)
                    .map_or(now, |&t| t.saturating_add(interval));
                if due > now {
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                    continue;
                }
                let uri = format!("{}{before}{id}{after}{query}", self.origin);
                let request = match Request::get(&uri).body(B::default()) {
                    Ok(request) => request,
                    Err(error) => {
                        tracing::warn!(uri = %uri.escape_debug(), %error, "cannot build a status request: the watch does not poll this job");
                        skipped.insert(id);
                        continue;
                    }
                };
                started.insert(id.clone(), now);
                polling.insert(id.clone());
                let mut service = self.service.clone();
                let shared = shared.clone();
                calls.push(async move {
                    let answer = match std::future::poll_fn(|cx| service.poll_ready(cx)).await {
                        Ok(()) => service.call(request).await,
                        Err(error) => Err(error),
                    };
                    match answer {
                        Ok(response) if response.status() == StatusCode::NOT_FOUND => {
                            shared.end_job(&id, ReleaseReason::Finished);
                        }
                        Ok(response) if response.status().is_success() => {
                            let observer = Observer::new(
                                shared.clone(),
                                Observe::Status { id: id.clone() },
                            );
                            let mut body = Box::pin(PlanBody::new(response.into_body(), Some(observer)));
                            drain(body.as_mut()).await;
                        }
                        Ok(response) => {
                            tracing::debug!(job = %id, status = %response.status(), "status poll answered with an error");
                        }
                        Err(error) => {
                            let error: BoxError = error.into();
                            tracing::debug!(job = %id, %error, "status poll failed");
                        }
                    }
                    id
                });
            }
            let sleep = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(shared.clock.instant(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(id) = calls.next(), if !calls.is_empty() => {
                    polling.remove(&id);
                }
                () = changed => {}
                () = sleep => {}
            }
        }
    }
}

/// Counts a running watch while it lives.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `id` can stand in a URI path as one segment as it is: RFC 3986's `pchar` without
/// `%` (so no space, no non-ASCII, no `/`, `?` or `#` that would change the URI's meaning).
fn fits_a_path(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b))
}

/// Reads a body to its end (or its first error), dropping the data.
async fn drain<B: Body>(mut body: Pin<&mut B>) {
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if frame.is_err() {
            break;
        }
    }
}
