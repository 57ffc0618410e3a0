//! Where limiter state lives: in this process (the default), or in a Redis server or Redis
//! Cluster that several processes share (feature `redis`; `redis-tls` for `rediss://`).
//!
//! The in-memory store is the layers' own state, untouched by this module: a layer built
//! without a store costs what it cost before. A layer given a `RedisStore` keeps its local
//! state too, as the fallback of [`FailMode::Open`].
//!
//! # Quotas shared across processes
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower_quota::store::{FailMode, RedisStore};
//! use tower_quota::{Quota, RateLimitByRoute};
//!
//! let store = RedisStore::builder("redis://127.0.0.1/")
//!     .prefix("sync:acct-42")                 // one namespace per API key
//!     .timeout(Duration::from_millis(200))    // per Redis operation
//!     .fail_mode(FailMode::Closed)            // Redis down: requests fail, typed
//!     .build()?;
//! let limits = RateLimitByRoute::builder()
//!     .route("POST /v2/generate", Quota::per_minute(60))
//!     .default_quota(Quota::per_minute(600))
//!     .store(store)
//!     .build()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;
#[cfg(feature = "redis")]
use std::{future::Future, pin::Pin};

#[cfg(feature = "redis")]
use sync_wrapper::SyncFuture;

#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub(crate) use self::redis::KeyedCall;
#[cfg(feature = "redis")]
pub(crate) use self::redis::StoreQuotas;
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};

/// What a layer does when its shared store does not answer in time (down, unreachable, or
/// slower than the store's timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum FailMode {
    /// Fall back to the layer's own limit in this process (the default): requests keep
    /// flowing, each process within the quota, so a fleet of `n` may send up to `n` times it
    /// while the store is away. Logged as a warning.
    #[default]
    Open,
    /// Return the request to its caller with a [`StoreError`] (client mode), or refuse it
    /// with a 429 (server mode): the shared quota is never exceeded.
    Closed,
}

/// A fail mode by its name: `open` or `closed` (any case).
impl std::str::FromStr for FailMode {
    type Err = crate::ConfigError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.to_ascii_lowercase().as_str() {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            _ => Err(crate::ConfigError::InvalidSetting {
                name: "fail_mode",
                reason: "must be open or closed",
            }),
        }
    }
}

/// A shared store failed an operation, and the layer fails closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within its timeout.
    Timeout(Duration),
    /// The store answered with an error, or the connection failed.
    Unavailable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(timeout) => {
                write!(
                    f,
                    "the shared limit store did not answer within {timeout:?}"
                )
            }
            Self::Unavailable(reason) => write!(f, "the shared limit store failed: {reason}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// What the store decided about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg(feature = "redis")]
pub(crate) enum Decision {
    /// Admitted: it holds a place until released.
    Admitted,
    /// A server's request, admitted and counted at once: `remaining` more may go, and `reset`
    /// is when all counted are gone (with none remaining: when a place frees); `at` is when it
    /// was counted, in microseconds on the store's clock (for a cost corrected later).
    Counted {
        remaining: u32,
        reset: Duration,
        at: u64,
    },
    /// Not now; at the earliest after this long (`None`: once a request in flight is
    /// answered, which a release notification tells).
    Wait(Option<Duration>),
}

/// A store operation in progress: owns everything it needs, so it outlives the call that
/// made it. `Sync` (it is only ever polled through `&mut`), so that the layers' futures stay
/// `Send + Sync` as they are without a store.
#[cfg(feature = "redis")]
pub(crate) type StoreCall =
    SyncFuture<Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>>;

/// The store a layer shares with other processes, if any.
#[cfg(feature = "redis")]
pub(crate) type StoreHandle = RedisStore;

/// Without the `redis` feature there is no shared store: where a future has a place for its
/// store path, it holds this uninhabited type, and the code that would make one is not
/// compiled.
#[cfg(not(feature = "redis"))]
pub(crate) struct NoStore<T>(
    std::convert::Infallible,
    std::marker::PhantomData<fn() -> T>,
);

#[cfg(not(feature = "redis"))]
impl<T> NoStore<T> {
    pub(crate) fn never(&self) -> ! {
        match self.0 {}
    }
}

#[cfg(feature = "redis")]
/// Questions to a shared store, asked again until one is answered with a place. Between
/// questions it sleeps until the time the store named, a release anywhere, or the poll
/// interval, whichever comes first: no tight loop, and a lost release message costs at most
/// one poll interval.
pub(crate) struct StorePoll {
    call: Option<StoreCall>,
    released: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[cfg(feature = "redis")]
impl StorePoll {
    /// Listens for releases, then asks the first question (so that a release while it is
    /// asked is not missed).
    pub(crate) fn new(store: &StoreHandle, ask: impl FnOnce() -> StoreCall) -> Self {
        let released = Box::pin(store.released());
        Self {
            call: Some(ask()),
            released,
            sleep: None,
        }
    }

    /// The answer to the question in flight, or `None` when none is (it is between two).
    pub(crate) fn poll_answer(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Decision, StoreError>>> {
        let Some(call) = self.call.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let answer = std::task::ready!(Pin::new(call).poll(cx));
        self.call = None;
        std::task::Poll::Ready(Some(answer))
    }

    /// Asks again at `at` at the latest: sooner after `wait` (what the store named), the
    /// poll interval, or `deadline`.
    pub(crate) fn again_by(
        &mut self,
        store: &StoreHandle,
        now: tokio::time::Instant,
        wait: Option<Duration>,
        deadline: Option<tokio::time::Instant>,
    ) {
        let mut at = now + store.poll_interval().min(wait.unwrap_or(Duration::MAX));
        if let Some(deadline) = deadline {
            at = at.min(deadline);
        }
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Ready when it is time to ask again: `ask` is then in flight.
    pub(crate) fn poll_again(
        &mut self,
        store: &StoreHandle,
        cx: &mut std::task::Context<'_>,
        ask: impl FnOnce() -> StoreCall,
    ) -> std::task::Poll<()> {
        let released = self.released.as_mut().poll(cx).is_ready();
        let slept = self
            .sleep
            .as_mut()
            .is_none_or(|sleep| sleep.as_mut().poll(cx).is_ready());
        if !released && !slept {
            return std::task::Poll::Pending;
        }
        if released {
            self.released = Box::pin(store.released());
        }
        self.call = Some(ask());
        std::task::Poll::Ready(())
    }
}
