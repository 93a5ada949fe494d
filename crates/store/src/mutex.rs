//! Locking that carries on after a panic: the store's mutexes guard indexes
//! of durable records and bookkeeping that a panicking holder leaves
//! consistent, so a poisoned lock is taken as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, ignoring poisoning.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a store lock is a bug in this crate; the data it guards
    // (an index of durable records) stays consistent, so carry on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
