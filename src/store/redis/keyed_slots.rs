//! One client's job slots in Redis, for a plan a fleet of servers enforces (server mode of
//! `ConcurrencyLimitByPlan`): `keyed_slots.lua`, apart from the client's own `slots.lua`.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use redis::Script;
use sync_wrapper::SyncFuture;

use super::{health, micros, RedisStore};
use crate::store::{Decision, StoreCall, StoreError};

/// A per-client slot operation in progress: the script's two integers.
pub(crate) type KeyedCall =
    SyncFuture<Pin<Box<dyn Future<Output = Result<[i64; 2], StoreError>> + Send>>>;

fn script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(include_str!("../keyed_slots.lua")))
}

impl RedisStore {
    /// Runs `op` with `args` on client `client`'s slots (its key hashed the same way in every
    /// process).
    pub(crate) fn keyed_slots(&self, client: u64, op: &str, args: Vec<String>) -> KeyedCall {
        let name = self.key(&format!("plan:{client:016x}"));
        let keys = vec![format!("{name}:held"), format!("{name}:early")];
        let mut all = Vec::with_capacity(args.len() + 1);
        all.push(op.to_owned());
        all.extend(args);
        let connection = self.inner.connection.clone();
        let secrets = self.inner.secrets.clone();
        let timeout = self.inner.timeout;
        let (failing, fail_mode) = (self.inner.failing.clone(), self.inner.fail_mode);
        SyncFuture::new(Box::pin(async move {
            let mut invocation = script().prepare_invoke();
            invocation.key(keys).arg(all);
            let reply =
                tokio::time::timeout(timeout, connection.invoke::<Vec<i64>>(&invocation)).await;
            let answer = match reply {
                Err(_) => Err(StoreError::Timeout(timeout)),
                Ok(Err(error)) => Err(StoreError::Unavailable(secrets.scrub(error.to_string()))),
                Ok(Ok(reply)) => match reply[..] {
                    [a, b] => Ok([a, b]),
                    _ => Err(StoreError::Unavailable(format!(
                        "unexpected reply from the store's script: {reply:?}"
                    ))),
                },
            };
            let outcome = answer
                .as_ref()
                .map(|_| Decision::Admitted)
                .map_err(Clone::clone);
            health(&failing, fail_mode, &outcome);
            answer
        }))
    }

    /// Takes one of `limit` slots for client `client`'s create, held as `member` for at
    /// most `lease`: `[1, 0]`, or `[0, held]` when it holds its plan already.
    pub(crate) fn keyed_take(
        &self,
        client: u64,
        limit: usize,
        lease: Duration,
        member: &str,
    ) -> KeyedCall {
        let args = vec![limit.to_string(), micros(lease), member.to_owned()];
        self.keyed_slots(client, "take", args)
    }

    /// Runs a change of client `client`'s slots in the background, never dropped: with the
    /// places given back, many at once (a flood of status answers must not delay or drop
    /// another client's completion). Their order does not matter: a job ended before its
    /// create is bound is remembered (`early`), and a create's bind and failure exclude each
    /// other.
    pub(crate) fn keyed_change(&self, client: u64, op: &str, args: Vec<String>) {
        let call = self.keyed_slots(client, op, args);
        let change: StoreCall =
            SyncFuture::new(Box::pin(
                async move { call.await.map(|_| Decision::Admitted) },
            ));
        self.give_back(change);
    }
}
