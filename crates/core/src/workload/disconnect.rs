//! `disconnect`: what happens to a tenant's claim while the node that runs
//! its container cannot be reached, in the manner of Nomad's `disconnect`
//! block.
//!
//! A node's agent can be cut off from the server while the node itself,
//! and the tenant's container on it, run on: a partition is not a crash.
//! The safe default keeps the claim where it is (`replace: false`): the
//! tenant is never handed a second container whose files are older than
//! the ones it is still writing, and nothing is destroyed on the word of a
//! silence. A workload whose tenants would rather have a container now
//! than their newest files sets `replace: true`: once the node has been
//! silent for `lost_after` (and is Lost), the claim is LOST, the tenant's
//! next claim gets a new container with the files as last synced, and the
//! original is destroyed when its node returns.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Checker, WorkloadError, raw};

/// The validated `disconnect` block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnect {
    /// Give claims on a lost node up, so their tenants can claim
    /// elsewhere. `false` (the default) keeps them until the node returns.
    pub replace: bool,
    /// With `replace`, how long the node must have been silent (since its
    /// last heartbeat) before its claims are given up; never before the
    /// node is Lost. Zero: as soon as it is Lost.
    #[serde(with = "humantime_serde")]
    pub lost_after: Duration,
}

impl Disconnect {
    /// Whether this is the default, which the spec hash leaves out.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether a claim on a Lost node, silent for `silent`, is given up.
    pub fn gives_up(&self, silent: Duration) -> bool {
        self.replace && silent >= self.lost_after
    }
}

pub(super) fn validate(c: &Checker<'_>, raw: raw::Disconnect) -> Result<Disconnect, WorkloadError> {
    let replace = raw.replace.unwrap_or(false);
    let lost_after = raw
        .lost_after
        .map(|t| c.duration("disconnect.lost_after", &t))
        .transpose()?;
    if lost_after.is_some() && !replace {
        return Err(c.err(
            "disconnect.lost_after",
            "only applies with disconnect.replace: true (without it a claim is kept until its node returns)",
        ));
    }
    if let Some(reconcile) = raw.reconcile
        && reconcile != "keep_replacement"
    {
        return Err(c.err(
            "disconnect.reconcile",
            format!(
                "{reconcile:?} is not supported: the only strategy is keep_replacement (the original container is destroyed when its node returns, if its tenant holds a replacement)"
            ),
        ));
    }
    Ok(Disconnect {
        replace,
        lost_after: lost_after.unwrap_or_default(),
    })
}
