//! What a plan shares through a store beyond its slots: the jobs other processes gave back.

use std::sync::Arc;

use super::slots::ReleaseReason;
use super::state::PlanState;
use crate::error::ConfigError;

/// Lets go, in this process, of the jobs another process gave back.
#[cfg(feature = "redis")]
pub(super) fn listen(
    shared: &Arc<PlanState>,
    store: &crate::store::RedisStore,
) -> Result<(), ConfigError> {
    use tokio::sync::broadcast::error::RecvError;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Err(ConfigError::InvalidSetting {
            name: "store",
            reason: "a layer with a store must be built inside a Tokio runtime",
        });
    };
    let mut done = store.done_jobs();
    let shared = Arc::downgrade(shared);
    runtime.spawn(async move {
        loop {
            match done.recv().await {
                Ok(id) => {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    shared.end_job(&id, ReleaseReason::Elsewhere);
                }
                Err(RecvError::Lagged(missed)) => tracing::warn!(
                    missed,
                    "missed jobs given back elsewhere: their slots come back with a reconcile or their lease"
                ),
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(())
}
