//! What a request that cannot be sent now does with the service its caller drove ready: it
//! gives that readiness back (a `Buffer` slot, a `ConcurrencyLimit` permit) and, if it will
//! wait, keeps a clone of its own that it drives ready only when its turn comes.

/// Gives back what the caller's `poll_ready` reserved, for a call that sends nothing now:
/// swaps the service for a clone, which has not been driven ready. The caller's next
/// `poll_ready` reserves again.
pub(crate) fn unready<S: Clone>(inner: &mut S) {
    *inner = inner.clone();
}

/// The service a request that waits will call: a clone of its own, not driven ready; the
/// caller's service gives its readiness back for the wait (see [`unready`]).
pub(crate) fn waiting_clone<S: Clone>(inner: &mut S) -> S {
    let waiting = inner.clone();
    unready(inner);
    waiting
}
