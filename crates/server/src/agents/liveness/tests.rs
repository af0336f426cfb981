//! The liveness task over a real store, stepped at chosen instants.

use std::time::Duration;

use boilerhouse_core::liveness::LivenessConfig;
use boilerhouse_core::node::NodeStatus;
use boilerhouse_core::{NodeId, Timestamp};

use super::LivenessTask;
use crate::agents::Registry;
use crate::store::{NodeHello, Store, StoreOptions};

fn at(s: i64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + s * 1000)
}

struct Fleet {
    task: LivenessTask,
    nodes: Vec<NodeId>,
    // Kept so the sessions' channels stay open.
    outbound: Vec<tokio::sync::mpsc::Receiver<Box<boilerhouse_proto::pb::ConnectResponse>>>,
}

impl Fleet {
    async fn new(dir: &std::path::Path) -> Fleet {
        let store = Store::open(&dir.join("t.db"), StoreOptions::default())
            .await
            .unwrap();
        let nodes: Vec<NodeId> = ["a", "b", "c"]
            .iter()
            .map(|n| NodeId::new(*n).unwrap())
            .collect();
        for n in &nodes {
            store
                .register_node(NodeHello::for_tests(n.clone()), at(0))
                .await
                .unwrap();
        }
        let task = LivenessTask {
            store,
            registry: Registry::default(),
            config: LivenessConfig {
                suspect_after: Duration::from_secs(3),
                lost_grace: Duration::from_secs(2),
                restart_grace: Duration::from_secs(20),
                partition_threshold: 0.5,
            },
            // Long before: the restart's own grace is over.
            started_at: at(-600),
            persisted: Default::default(),
            holding: false,
            hold_ended_at: Timestamp::EPOCH,
            held: Default::default(),
            spared: Default::default(),
        };
        Fleet {
            task,
            nodes,
            outbound: Vec::new(),
        }
    }

    /// A session for node `i` opens at `t` (its connection counts as a
    /// heartbeat).
    fn connect(&mut self, i: usize, t: i64) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        self.task
            .registry
            .attach(&self.nodes[i], format!("s{i}-{t}"), tx, at(t));
        self.outbound.push(rx);
    }

    fn beat(&self, i: usize, t: i64) {
        self.task
            .registry
            .heartbeat(&self.nodes[i], at(t), Default::default(), 0);
    }

    fn drop_session(&self, i: usize, t: i64) {
        self.task
            .registry
            .detach(&self.nodes[i], &format!("s{i}-{t}"));
    }

    async fn statuses(&mut self, t: i64) -> Vec<NodeStatus> {
        self.task.step(at(t)).await.unwrap();
        let nodes = self.task.store.list_nodes().await.unwrap();
        self.nodes
            .iter()
            .map(|id| nodes.iter().find(|n| &n.id == id).unwrap().status)
            .collect()
    }
}

use NodeStatus::{Lost, Ready, Suspect};

#[tokio::test]
async fn a_node_heard_once_as_a_partition_heals_keeps_its_grace_while_it_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fleet::new(dir.path()).await;
    f.connect(0, 0);
    // b and c are cut off from the start; a keeps beating.
    for t in 1..=8 {
        f.beat(0, t);
        let s = f.statuses(t).await;
        assert_ne!(s[1], Lost, "two of three silent: held, at {t}s");
        assert_ne!(s[2], Lost, "two of three silent: held, at {t}s");
    }
    assert!(f.task.holding, "the loss was held");

    // The partition heals: b returns first, which ends the hold.
    f.connect(1, 10);
    f.beat(0, 10);
    assert_eq!(f.statuses(10).await, [Ready, Ready, Suspect]);
    assert!(!f.task.holding);
    assert!(f.task.held.is_empty(), "{:?}", f.task.held);

    // c's stalled connection delivers one heartbeat, then its agent gives
    // up on it and takes a while to reconnect.
    f.connect(2, 11);
    f.beat(0, 11);
    f.beat(1, 11);
    assert_eq!(f.statuses(11).await, [Ready, Ready, Ready]);
    f.drop_session(2, 11);
    for t in 12..30 {
        f.beat(0, t);
        f.beat(1, t);
        let s = f.statuses(t).await;
        assert_ne!(
            s[2], Lost,
            "c was held in the partition: spared until 30s, at {t}s"
        );
    }
    // The grace is a restart's, not forever: silent past it, c is Lost.
    f.beat(0, 30);
    f.beat(1, 30);
    assert_eq!(f.statuses(30).await, [Ready, Ready, Lost]);
    assert!(f.task.spared.is_empty(), "{:?}", f.task.spared);
}

#[tokio::test]
async fn a_node_still_spared_when_a_second_hold_begins_is_spared_from_that_holds_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fleet::new(dir.path()).await;
    f.connect(0, 0);
    for t in 1..=8 {
        f.beat(0, t);
        f.statuses(t).await;
    }
    // The first hold ends at 10: c is spared until 30.
    f.connect(1, 10);
    f.beat(0, 10);
    assert_eq!(f.statuses(10).await, [Ready, Ready, Suspect]);
    // Now a goes quiet after one more heartbeat (b, spared itself, is
    // back): with c, two of three are silent, and a is due at 16, which
    // begins a second hold.
    f.beat(0, 11);
    f.beat(1, 11);
    f.statuses(11).await;
    f.drop_session(0, 0);
    for t in 12..20 {
        f.beat(1, t);
        let s = f.statuses(t).await;
        assert_ne!(s[0], Lost, "at {t}s");
        assert_ne!(s[2], Lost, "at {t}s");
    }
    assert!(f.task.holding, "a second hold");
    // It ends at 20 when a is back; c, silent all along, is spared
    // until 40, even after being heard once at 21.
    f.connect(0, 20);
    f.beat(1, 20);
    assert_eq!(f.statuses(20).await, [Ready, Ready, Suspect]);
    f.connect(2, 21);
    f.beat(0, 21);
    f.beat(1, 21);
    assert_eq!(f.statuses(21).await, [Ready, Ready, Ready]);
    f.drop_session(2, 21);
    for t in 22..40 {
        f.beat(0, t);
        f.beat(1, t);
        assert_ne!(f.statuses(t).await[2], Lost, "spared until 40, at {t}s");
    }
    f.beat(0, 40);
    f.beat(1, 40);
    assert_eq!(f.statuses(40).await, [Ready, Ready, Lost]);
}

#[tokio::test]
async fn a_node_never_held_is_lost_on_the_normal_windows() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fleet::new(dir.path()).await;
    f.connect(0, 0);
    f.connect(1, 0);
    f.connect(2, 0);
    f.drop_session(2, 0);
    for t in 1..5 {
        f.beat(0, t);
        f.beat(1, t);
        assert_ne!(f.statuses(t).await[2], Lost, "at {t}s");
    }
    f.beat(0, 5);
    f.beat(1, 5);
    assert_eq!(f.statuses(5).await, [Ready, Ready, Lost]);
    assert!(f.task.spared.is_empty());
}
