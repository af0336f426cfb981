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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LivenessConfig {
    /// Silence before Suspect.
    pub suspect_after: Duration,
    /// Further silence before Lost.
    pub lost_grace: Duration,
    /// After a server restart, how long before any node can be Lost.
    pub restart_grace: Duration,
    /// The largest fraction of the nodes still up (three or more) that may
    /// go silent together and be declared Lost; beyond it the server holds
    /// off, since it is likelier the one cut off than they all died.
    pub partition_threshold: f64,
}

/// What liveness knows about one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLiveness {
    /// Its recorded status.
    pub status: NodeStatus,
    /// Its last heartbeat (or connection).
    pub last_heartbeat_at: Timestamp,
    /// Not to be declared Lost before this. A node kept from Lost while
    /// too much of the fleet was silent (see [`losses_allowed`]) is given
    /// a restart's grace once the hold ends, even if it is heard from in
    /// between: as a partition heals, a stalled connection may deliver a
    /// last heartbeat before its agent gives up on it and reconnects.
    pub spared_until: Option<Timestamp>,
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
    let spared = node.spared_until.is_some_and(|until| now < until);
    if silent_for >= lost_after && (heard_since_restart || restart_grace_over) && !spared {
        NodeStatus::Lost
    } else {
        NodeStatus::Suspect
    }
}

/// Whether nodes may be declared Lost now, when `silent` of the `up`
/// nodes (every node not already Lost) have gone silent (Suspect, or due
/// to be Lost). A server cut off from most of its fleet sees the same
/// silence as a fleet that died; the first is far likelier, and declaring
/// every node lost in one step would end claims on containers that are
/// still running. So when more than `partition_threshold` of three or more
/// nodes are silent together, none is declared Lost until some return.
/// Nodes Lost earlier do not count: a fleet that loses hosts one by one
/// still loses each of them.
pub fn losses_allowed(up: usize, silent: usize, config: &LivenessConfig) -> bool {
    up < 3 || (silent as f64) <= config.partition_threshold * up as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CONFIG: LivenessConfig = LivenessConfig {
        suspect_after: Duration::from_secs(6),
        lost_grace: Duration::from_secs(10),
        restart_grace: Duration::from_secs(60),
        partition_threshold: 0.5,
    };

    #[test]
    fn a_silent_majority_of_three_or_more_is_never_declared_lost() {
        // The server cut off from two of three agents.
        assert!(!losses_allowed(3, 2, &CONFIG));
        assert!(!losses_allowed(10, 6, &CONFIG));
        // One host of three, or half of ten, really going away.
        assert!(losses_allowed(3, 1, &CONFIG));
        assert!(losses_allowed(10, 5, &CONFIG));
        // A fleet of one or two cannot tell, and a lone agent's death must
        // still end its claims.
        assert!(losses_allowed(1, 1, &CONFIG));
        assert!(losses_allowed(2, 2, &CONFIG));
        let off = LivenessConfig {
            partition_threshold: 1.0,
            ..CONFIG
        };
        assert!(losses_allowed(3, 3, &off), "1.0 turns the guard off");
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_millis(s * 1000)
    }

    fn node(status: NodeStatus, last: i64) -> NodeLiveness {
        NodeLiveness {
            status,
            last_heartbeat_at: at(last),
            spared_until: None,
        }
    }

    #[test]
    fn a_node_spared_after_a_hold_is_not_lost_before_its_grace_ends_even_if_heard_in_between() {
        // The hold ended at 1000 with a 60 s grace; the node was heard once
        // at 1001 (a stalled connection's last heartbeat) and fell silent.
        let n = NodeLiveness {
            spared_until: Some(at(1060)),
            ..node(NodeStatus::Suspect, 1001)
        };
        let start = at(0);
        assert_eq!(
            next_status(n, at(1017), start, &CONFIG),
            NodeStatus::Suspect
        );
        assert_eq!(
            next_status(n, at(1059), start, &CONFIG),
            NodeStatus::Suspect
        );
        assert_eq!(next_status(n, at(1060), start, &CONFIG), NodeStatus::Lost);
        // Unspared, the same node follows the normal windows.
        let plain = node(NodeStatus::Suspect, 1001);
        assert_eq!(
            next_status(plain, at(1017), start, &CONFIG),
            NodeStatus::Lost
        );
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
