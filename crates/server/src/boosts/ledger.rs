//! The live-boost ledger placement and metrics read.
//!
//! Kept apart from the boost machinery because it is shared more widely:
//! placement counts it as capacity, the expiry waker sleeps on it and
//! /metrics drains its expiry lags, none of which need the rest of
//! [`Boosts`](super::Boosts).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use boilerhouse_core::boost::{self, Boost};
use boilerhouse_core::{BoostId, Timestamp};

/// The live (pending and active) boosts, shared with placement. Cheap to
/// clone.
#[derive(Clone, Default)]
pub struct BoostLedger {
    live: Arc<RwLock<BTreeMap<BoostId, Boost>>>,
    changed: Arc<Notify>,
    /// How late each expiry was enforced, until /metrics takes them.
    expiry_lags: Arc<Mutex<Vec<std::time::Duration>>>,
}

/// Placement counts what node boosts move between nodes.
impl crate::pools::CapacityView for BoostLedger {
    fn effective(
        &self,
        node: &boilerhouse_core::NodeId,
        base: boilerhouse_core::node::Resources,
    ) -> boilerhouse_core::node::Resources {
        boost::effective_capacity(node, base, &self.live())
    }
}

impl BoostLedger {
    /// Every live boost.
    pub fn live(&self) -> Vec<Boost> {
        self.read().values().cloned().collect()
    }

    /// One live boost.
    pub fn get(&self, id: &BoostId) -> Option<Boost> {
        self.read().get(id).cloned()
    }

    /// Records `boost`'s new state: kept while live, dropped once ended.
    pub fn put(&self, boost: Boost) {
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            if boost.status.is_live() {
                live.insert(boost.id, boost);
            } else {
                live.remove(&boost.id);
            }
        }
        self.changed.notify_one();
    }

    /// When the next active boost expires.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        boost::next_expiry(&self.live())
    }

    /// Expiry lags recorded since the last call (metrics pull them).
    pub fn take_expiry_lags(&self) -> Vec<std::time::Duration> {
        std::mem::take(&mut *self.expiry_lags.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn record_expiry_lags(&self, lags: impl IntoIterator<Item = std::time::Duration>) {
        let mut kept = self.expiry_lags.lock().unwrap_or_else(|e| e.into_inner());
        kept.extend(lags);
        // Unscraped, keep the newest only: a histogram, not a log.
        let excess = kept.len().saturating_sub(10_000);
        kept.drain(..excess);
    }

    /// Notified whenever a boost changes.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<BoostId, Boost>> {
        self.live.read().unwrap_or_else(|e| e.into_inner())
    }
}
