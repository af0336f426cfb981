//! A node's state files: batched while one is in flight, coalesced, and
//! never dropped across sessions, stalls or older agents.

use std::time::Duration;

use boilerhouse_core::container::StateFile;
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp};
use boilerhouse_proto::pb;
use tokio::sync::mpsc;

use super::super::{AgentFeatures, Registry};

const PATIENT: Duration = Duration::from_secs(3600);

fn node() -> NodeId {
    NodeId::new("n1").unwrap()
}

fn container(n: u128) -> ContainerId {
    ContainerId::from_uuid(boilerhouse_core::ids::Uuid::from_u128(n))
}

fn claimed(tenant: &str, generation: u64) -> StateFile {
    StateFile {
        tenant_id: Some(TenantId::new(tenant).unwrap()),
        claim_generation: generation,
        ..Default::default()
    }
}

fn released(tenant: &str, generation: u64) -> StateFile {
    StateFile {
        last_tenant_id: Some(TenantId::new(tenant).unwrap()),
        claim_generation: generation,
        ..Default::default()
    }
}

type Inbox = mpsc::Receiver<Box<pb::ConnectResponse>>;

fn attach(registry: &Registry, session: &str, batches: bool) -> Inbox {
    let (tx, rx) = mpsc::channel(64);
    registry.attach_agent(
        &node(),
        session.into(),
        tx,
        Timestamp::from_millis(1),
        AgentFeatures {
            state_file_batches: batches,
        },
    );
    rx
}

/// A file as sent: container, tenant, generation.
type Sent = (ContainerId, Option<String>, u64);

/// The commands the session has been sent so far, each with its files.
fn sent(rx: &mut Inbox) -> Vec<(String, Vec<Sent>)> {
    let mut commands = Vec::new();
    while let Ok(message) = rx.try_recv() {
        let Some(pb::connect_response::Message::Command(c)) = message.message else {
            panic!("expected a command, got {message:?}");
        };
        let files = match c.command {
            Some(pb::command::Command::WriteStateFiles(b)) => b.files,
            Some(pb::command::Command::WriteStateFile(w)) => vec![w],
            other => panic!("expected state files, got {other:?}"),
        };
        let files = files
            .into_iter()
            .map(|w| {
                let state = w.state.unwrap();
                (
                    w.container_id.parse().unwrap(),
                    Some(state.tenant_id).filter(|t| !t.is_empty()),
                    state.claim_generation,
                )
            })
            .collect();
        commands.push((c.command_id, files));
    }
    commands
}

fn answer(registry: &Registry, command_id: &str, ok: bool) {
    registry.complete(
        &node(),
        pb::CommandResult {
            command_id: command_id.into(),
            ok,
            error: if ok {
                String::new()
            } else {
                "disk full".into()
            },
            container: None,
            sync: None,
        },
    );
}

#[tokio::test]
async fn writes_that_arrive_while_a_batch_is_in_flight_go_together_when_it_is_answered() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", true);
    registry.write_state_file(&node(), container(1), claimed("t1", 1), PATIENT);
    let first = sent(&mut rx);
    assert_eq!(first.len(), 1, "nothing in flight: sent at once");
    assert_eq!(first[0].1, vec![(container(1), Some("t1".into()), 1)]);

    for n in 2..=4 {
        registry.write_state_file(&node(), container(n), claimed("t2", 1), PATIENT);
    }
    // The same container twice: only its newer state goes.
    registry.write_state_file(&node(), container(2), released("t2", 1), PATIENT);
    assert!(
        sent(&mut rx).is_empty(),
        "they wait for the batch in flight"
    );
    assert_eq!(registry.state_files_unacknowledged(&node()), 4);

    answer(&registry, &first[0].0, true);
    let mut second = sent(&mut rx);
    assert_eq!(second.len(), 1, "one command for all that waited");
    second[0].1.sort();
    assert_eq!(
        second[0].1,
        vec![
            (container(2), None, 1),
            (container(3), Some("t2".into()), 1),
            (container(4), Some("t2".into()), 1),
        ]
    );
    answer(&registry, &second[0].0, true);
    assert_eq!(registry.state_files_unacknowledged(&node()), 0);
    assert!(sent(&mut rx).is_empty());
}

#[tokio::test]
async fn a_late_claim_never_replaces_the_queued_release_after_it() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", true);
    registry.write_state_file(&node(), container(9), claimed("t0", 1), PATIENT);
    let first = sent(&mut rx);
    // Queued out of order: generation 3's release, then its claim, then
    // generation 2's claim.
    registry.write_state_file(&node(), container(1), released("t1", 3), PATIENT);
    registry.write_state_file(&node(), container(1), claimed("t1", 3), PATIENT);
    registry.write_state_file(&node(), container(1), claimed("t1", 2), PATIENT);
    answer(&registry, &first[0].0, true);
    assert_eq!(sent(&mut rx)[0].1, vec![(container(1), None, 3)]);
}

#[tokio::test]
async fn an_older_agent_gets_one_command_per_file() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", false);
    registry.write_state_file(&node(), container(1), claimed("t1", 1), PATIENT);
    let first = sent(&mut rx);
    registry.write_state_file(&node(), container(2), claimed("t1", 1), PATIENT);
    registry.write_state_file(&node(), container(3), claimed("t1", 1), PATIENT);
    answer(&registry, &first[0].0, true);
    let next = sent(&mut rx);
    assert_eq!(next.len(), 2, "each file its own WriteStateFile");
    assert!(next.iter().all(|(_, files)| files.len() == 1));
    // What waits goes only when all of those are answered.
    registry.write_state_file(&node(), container(4), claimed("t1", 1), PATIENT);
    answer(&registry, &next[0].0, true);
    assert!(sent(&mut rx).is_empty());
    answer(&registry, &next[1].0, true);
    assert_eq!(
        sent(&mut rx)[0].1,
        vec![(container(4), Some("t1".into()), 1)]
    );
}

#[tokio::test]
async fn a_batch_is_at_most_batch_max_files() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", true);
    registry.write_state_file(&node(), container(0), claimed("t1", 1), PATIENT);
    let first = sent(&mut rx);
    let many = super::BATCH_MAX as u128 + 5;
    for n in 1..=many {
        registry.write_state_file(&node(), container(n), claimed("t1", 1), PATIENT);
    }
    answer(&registry, &first[0].0, true);
    let next = sent(&mut rx);
    let sizes: Vec<usize> = next.iter().map(|(_, f)| f.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), many as usize);
    assert!(sizes.iter().all(|&s| s <= super::BATCH_MAX), "{sizes:?}");
}

/// Nothing is dropped: writes for a node with no session wait for it, and
/// what a session left unanswered goes to the next as new commands (an
/// agent answers a known command id from memory; the late answer to the
/// old one changes nothing).
#[tokio::test]
async fn unanswered_and_unsent_state_files_go_to_the_next_session() {
    let registry = Registry::default();
    registry.write_state_file(&node(), container(1), claimed("t1", 1), PATIENT);
    assert_eq!(registry.state_files_unacknowledged(&node()), 1);

    let mut a = attach(&registry, "a", true);
    let first = sent(&mut a);
    assert_eq!(first[0].1, vec![(container(1), Some("t1".into()), 1)]);
    registry.write_state_file(&node(), container(2), claimed("t2", 1), PATIENT);
    registry.detach(&node(), "a");

    // An older agent now: the same files, one command each.
    let mut b = attach(&registry, "b", false);
    let mut again = sent(&mut b);
    again.sort_by_key(|(_, f)| f[0].0);
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].1, vec![(container(1), Some("t1".into()), 1)]);
    assert_eq!(again[1].1, vec![(container(2), Some("t2".into()), 1)]);
    assert_ne!(again[0].0, first[0].0, "a new command id");

    answer(&registry, &first[0].0, true);
    assert_eq!(
        registry.state_files_unacknowledged(&node()),
        2,
        "a stale answer counts for nothing"
    );
    answer(&registry, &again[0].0, true);
    answer(&registry, &again[1].0, true);
    assert_eq!(registry.state_files_unacknowledged(&node()), 0);
}

#[tokio::test]
async fn a_batch_unanswered_too_long_goes_again_with_the_next_write() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", true);
    registry.write_state_file(&node(), container(1), claimed("t1", 1), Duration::ZERO);
    let first = sent(&mut rx);
    registry.write_state_file(&node(), container(2), claimed("t1", 1), Duration::ZERO);
    let mut again = sent(&mut rx);
    assert_eq!(again.len(), 1);
    again[0].1.sort();
    assert_eq!(
        again[0].1,
        vec![
            (container(1), Some("t1".into()), 1),
            (container(2), Some("t1".into()), 1)
        ]
    );
    answer(&registry, &first[0].0, true);
    assert_eq!(registry.state_files_unacknowledged(&node()), 2);
}

#[tokio::test]
async fn a_failed_batch_is_not_held_against_the_next() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", true);
    registry.write_state_file(&node(), container(1), claimed("t1", 1), PATIENT);
    let first = sent(&mut rx);
    registry.write_state_file(&node(), container(2), claimed("t1", 1), PATIENT);
    answer(&registry, &first[0].0, false);
    assert_eq!(
        sent(&mut rx)[0].1,
        vec![(container(2), Some("t1".into()), 1)]
    );
}
