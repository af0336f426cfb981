//! What each node's containers hold, kept by the index with every put and
//! remove, so that placing a container reads one node's sums instead of
//! every container (at 100,000 containers, summing them per placement made
//! filling pools quadratic).

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::{ContainerId, NodeId};
use crate::node::Resources;
use crate::pool::ContainerRecord;

/// One node's containers and the limits they sum to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct NodeLoad {
    pub(super) containers: BTreeSet<ContainerId>,
    /// CPUs in billionths, so that adding and taking away is exact and the
    /// sums equal a recount whatever the order.
    nano_cpus: i64,
    memory_bytes: u64,
}

fn nano_cpus(c: &ContainerRecord) -> i64 {
    (c.limits.cpus.unwrap_or(0.0) * 1e9).round() as i64
}

impl NodeLoad {
    pub(super) fn add(&mut self, c: &ContainerRecord) {
        self.containers.insert(c.id);
        self.nano_cpus += nano_cpus(c);
        self.memory_bytes += c.limits.memory_bytes.unwrap_or(0);
    }

    /// Takes `c` away; true when nothing is left.
    pub(super) fn remove(&mut self, c: &ContainerRecord) -> bool {
        self.containers.remove(&c.id);
        self.nano_cpus -= nano_cpus(c);
        self.memory_bytes = self
            .memory_bytes
            .saturating_sub(c.limits.memory_bytes.unwrap_or(0));
        self.containers.is_empty()
    }

    pub(super) fn resources(&self) -> Resources {
        Resources {
            cpus: self.nano_cpus as f64 / 1e9,
            memory_bytes: self.memory_bytes,
            gpus: 0,
        }
    }
}

/// The loads as a recount of `containers` gives them: what
/// [`super::Index::check`] compares the kept ones with.
pub(super) fn recount<'a>(
    containers: impl Iterator<Item = &'a ContainerRecord>,
) -> BTreeMap<NodeId, NodeLoad> {
    let mut loads: BTreeMap<NodeId, NodeLoad> = BTreeMap::new();
    for c in containers {
        loads.entry(c.node_id.clone()).or_default().add(c);
    }
    loads
}
