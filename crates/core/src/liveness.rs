//! Node liveness: Ready → Suspect → Lost on missed heartbeats.
//!
//! A node is Suspect once no heartbeat arrived for `suspect_after`
//! (3 × the heartbeat interval by default) and Lost once it stayed silent
//! for a further `lost_grace`. Right after a server restart no agent has
//! had a chance to reconnect, so silence is measured from the restart and
//! a longer `restart_grace` must pass before anything is declared Lost.
//! Lost is what freezes a node's share of the pools; it must never come
//! from the server's own absence.

use std::time::Duration;

use crate::node::NodeStatus;
use crate::time::Timestamp;

/// The liveness windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Silence before Suspect.
    pub suspect_after: Duration,
    /// Further silence before Lost.
    pub lost_grace: Duration,
    /// After a server restart, how long before any node can be Lost.
    pub restart_grace: Duration,
}

/// What liveness knows about one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLiveness {
    /// Its recorded status.
    pub status: NodeStatus,
    /// Its last heartbeat (or connection).
    pub last_heartbeat_at: Timestamp,
}

/// The status a node should have at `now`. Pure: the caller records any
/// change and its event.
pub fn next_status(
    node: NodeLiveness,
    now: Timestamp,
    server_started_at: Timestamp,
    config: &LivenessConfig,
) -> NodeStatus {
    // Only a real heartbeat makes a node Ready.
    if now.saturating_since(node.last_heartbeat_at) < config.suspect_after {
        return NodeStatus::Ready;
    }
    // Lost stays Lost until the node speaks again.
    if node.status == NodeStatus::Lost {
        return NodeStatus::Lost;
    }
    // Silence during the server's own downtime is not the node's fault:
    // measure it from the restart, and leave the status alone until the
    // node has had a full window to reconnect.
    let silent_for = now.saturating_since(node.last_heartbeat_at.max(server_started_at));
    if silent_for < config.suspect_after {
        return node.status;
    }
    let lost_after = config.suspect_after + config.lost_grace;
    let heard_since_restart = node.last_heartbeat_at > server_started_at;
    let restart_grace_over = now.saturating_since(server_started_at) >= config.restart_grace;
    if silent_for >= lost_after && (heard_since_restart || restart_grace_over) {
        NodeStatus::Lost
    } else {
        NodeStatus::Suspect
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CONFIG: LivenessConfig = LivenessConfig {
        suspect_after: Duration::from_secs(6),
        lost_grace: Duration::from_secs(10),
        restart_grace: Duration::from_secs(60),
    };

    fn at(s: i64) -> Timestamp {
        Timestamp::from_millis(s * 1000)
    }

    fn node(status: NodeStatus, last: i64) -> NodeLiveness {
        NodeLiveness {
            status,
            last_heartbeat_at: at(last),
        }
    }

    #[test]
    fn ready_then_suspect_then_lost() {
        let start = at(0);
        let n = node(NodeStatus::Ready, 100);
        assert_eq!(next_status(n, at(105), start, &CONFIG), NodeStatus::Ready);
        assert_eq!(next_status(n, at(106), start, &CONFIG), NodeStatus::Suspect);
        assert_eq!(next_status(n, at(115), start, &CONFIG), NodeStatus::Suspect);
        assert_eq!(next_status(n, at(116), start, &CONFIG), NodeStatus::Lost);
    }

    #[test]
    fn a_server_restart_buys_every_node_the_longer_grace() {
        // The node was last heard long before the server restarted at 1000.
        let n = node(NodeStatus::Ready, 100);
        let start = at(1000);
        assert_eq!(next_status(n, at(1005), start, &CONFIG), NodeStatus::Ready);
        assert_eq!(
            next_status(n, at(1020), start, &CONFIG),
            NodeStatus::Suspect
        );
        assert_eq!(
            next_status(n, at(1059), start, &CONFIG),
            NodeStatus::Suspect,
            "restart grace"
        );
        assert_eq!(next_status(n, at(1060), start, &CONFIG), NodeStatus::Lost);
        // A node lost before the restart stays lost until it speaks.
        assert_eq!(
            next_status(node(NodeStatus::Lost, 100), at(1001), start, &CONFIG),
            NodeStatus::Lost
        );
        // A node heard after the restart follows the normal windows.
        let fresh = node(NodeStatus::Ready, 1001);
        assert_eq!(
            next_status(fresh, at(1017), start, &CONFIG),
            NodeStatus::Lost
        );
    }

    #[test]
    fn a_heartbeat_brings_any_node_back() {
        for status in [NodeStatus::Suspect, NodeStatus::Lost] {
            assert_eq!(
                next_status(node(status, 200), at(201), at(0), &CONFIG),
                NodeStatus::Ready
            );
        }
    }

    proptest! {
        /// Nothing is Lost within restart_grace of a restart unless it was
        /// heard from after the restart.
        #[test]
        fn never_lost_on_the_servers_own_downtime(last in 0i64..10_000, start in 0i64..10_000, dt in 0i64..59) {
            let n = node(NodeStatus::Ready, last.min(start));
            prop_assert_ne!(next_status(n, at(start + dt), at(start), &CONFIG), NodeStatus::Lost);
        }

        /// Status never improves without a newer heartbeat.
        #[test]
        fn silence_is_monotonic(last in 0i64..1000, t1 in 0i64..100, t2 in 0i64..100) {
            let (a, b) = (t1.min(t2), t1.max(t2));
            let rank = |s: NodeStatus| match s { NodeStatus::Ready => 0, NodeStatus::Suspect => 1, NodeStatus::Lost => 2 };
            let n = node(NodeStatus::Ready, last);
            let early = next_status(n, at(last + a), at(0), &CONFIG);
            let late = next_status(n, at(last + b), at(0), &CONFIG);
            prop_assert!(rank(early) <= rank(late));
        }
    }
}
