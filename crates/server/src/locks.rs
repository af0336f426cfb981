//! Keyed async locks: one mutex per key (a tenant's claims of a workload,
//! a request id, a container's limits), created on demand and dropped
//! when no one holds or waits for it. Shared by handlers and controllers,
//! so it lives below both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One async lock per key, created on demand and dropped when unused.
#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Holds the lock for `key` until the guard drops.
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key.to_owned()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        KeyGuard {
            owner: self,
            key: key.to_owned(),
            _guard: guard,
        }
    }
}

/// Holds one key's lock.
pub struct KeyGuard<'a> {
    owner: &'a KeyedLocks,
    key: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.owner.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Two references remain while only we hold it: the map's and ours.
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            locks.remove(&self.key);
        }
    }
}
