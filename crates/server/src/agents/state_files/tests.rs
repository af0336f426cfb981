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
type File = (ContainerId, Option<String>, u64);

/// A state-file command as sent.
#[derive(Debug)]
struct Sent {
    id: String,
    /// A `WriteStateFiles`, not a `WriteStateFile`.
    batch: bool,
    /// Sorted.
    files: Vec<File>,
}

fn decode(message: Box<pb::ConnectResponse>) -> Sent {
    let Some(pb::connect_response::Message::Command(c)) = message.message else {
        panic!("expected a command, got {message:?}");
    };
    let (batch, files) = match c.command {
        Some(pb::command::Command::WriteStateFiles(b)) => (true, b.files),
        Some(pb::command::Command::WriteStateFile(w)) => (false, vec![w]),
        other => panic!("expected state files, got {other:?}"),
    };
    let mut files: Vec<File> = files
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
    files.sort();
    Sent {
        id: c.command_id,
        batch,
        files,
    }
}

/// The commands the session has been sent so far.
fn sent(rx: &mut Inbox) -> Vec<Sent> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(decode)
        .collect()
}

/// Whether `commands` are all batches (`batch`) or all single files.
fn all(commands: &[Sent], batch: bool) -> bool {
    commands.iter().all(|c| c.batch == batch)
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
    assert!(all(&first, true));
    assert_eq!(first[0].files, vec![(container(1), Some("t1".into()), 1)]);

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

    answer(&registry, &first[0].id, true);
    let second = sent(&mut rx);
    assert_eq!(second.len(), 1, "one command for all that waited");
    assert!(all(&second, true));
    assert_eq!(
        second[0].files,
        vec![
            (container(2), None, 1),
            (container(3), Some("t2".into()), 1),
            (container(4), Some("t2".into()), 1),
        ]
    );
    answer(&registry, &second[0].id, true);
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
    answer(&registry, &first[0].id, true);
    assert_eq!(sent(&mut rx)[0].files, vec![(container(1), None, 3)]);
}

#[tokio::test]
async fn an_older_agent_gets_one_command_per_file() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", false);
    registry.write_state_file(&node(), container(1), claimed("t1", 1), PATIENT);
    let first = sent(&mut rx);
    assert!(all(&first, false), "{first:?}");
    registry.write_state_file(&node(), container(2), claimed("t1", 1), PATIENT);
    registry.write_state_file(&node(), container(3), claimed("t1", 1), PATIENT);
    answer(&registry, &first[0].id, true);
    let next = sent(&mut rx);
    assert_eq!(next.len(), 2, "each file its own WriteStateFile");
    assert!(all(&next, false), "{next:?}");
    // What waits goes only when all of those are answered.
    registry.write_state_file(&node(), container(4), claimed("t1", 1), PATIENT);
    answer(&registry, &next[0].id, true);
    assert!(sent(&mut rx).is_empty());
    answer(&registry, &next[1].id, true);
    let last = sent(&mut rx);
    assert!(all(&last, false));
    assert_eq!(last[0].files, vec![(container(4), Some("t1".into()), 1)]);
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
    answer(&registry, &first[0].id, true);
    let next = sent(&mut rx);
    let mut sizes: Vec<usize> = next.iter().map(|c| c.files.len()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![5, super::BATCH_MAX]);
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
    assert!(all(&first, true));
    assert_eq!(first[0].files, vec![(container(1), Some("t1".into()), 1)]);
    registry.write_state_file(&node(), container(2), claimed("t2", 1), PATIENT);

    // An older agent now, replacing the session without a detach: the
    // same files, one command each.
    let mut b = attach(&registry, "b", false);
    let mut again = sent(&mut b);
    again.sort_by_key(|c| c.files[0].0);
    assert_eq!(again.len(), 2);
    assert!(all(&again, false), "{again:?}");
    assert_eq!(again[0].files, vec![(container(1), Some("t1".into()), 1)]);
    assert_eq!(again[1].files, vec![(container(2), Some("t2".into()), 1)]);
    assert_ne!(again[0].id, first[0].id, "a new command id");
    assert!(sent(&mut a).is_empty(), "nothing more to the old session");

    answer(&registry, &first[0].id, true);
    assert_eq!(
        registry.state_files_unacknowledged(&node()),
        2,
        "a stale answer counts for nothing"
    );
    answer(&registry, &again[0].id, true);
    answer(&registry, &again[1].id, true);
    assert_eq!(registry.state_files_unacknowledged(&node()), 0);
}

#[tokio::test]
async fn a_batch_unanswered_too_long_goes_again_with_the_next_write_or_heartbeat() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", true);
    registry.write_state_file(&node(), container(1), claimed("t1", 1), Duration::ZERO);
    let first = sent(&mut rx);
    registry.write_state_file(&node(), container(2), claimed("t1", 1), Duration::ZERO);
    let again = sent(&mut rx);
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].files,
        vec![
            (container(1), Some("t1".into()), 1),
            (container(2), Some("t1".into()), 1)
        ]
    );
    answer(&registry, &first[0].id, true);
    assert_eq!(registry.state_files_unacknowledged(&node()), 2);
    // With no write to carry it, the node's heartbeat sends it again.
    registry.heartbeat(&node(), Timestamp::from_millis(2), Default::default(), 0);
    let third = sent(&mut rx);
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].files, again[0].files);
    assert_ne!(third[0].id, again[0].id);
}

#[tokio::test]
async fn a_failed_batch_is_not_held_against_the_next() {
    let registry = Registry::default();
    let mut rx = attach(&registry, "a", true);
    registry.write_state_file(&node(), container(1), claimed("t1", 1), PATIENT);
    let first = sent(&mut rx);
    registry.write_state_file(&node(), container(2), claimed("t1", 1), PATIENT);
    answer(&registry, &first[0].id, false);
    assert_eq!(
        sent(&mut rx)[0].files,
        vec![(container(2), Some("t1".into()), 1)]
    );
    assert_eq!(
        registry.state_files_unacknowledged(&node()),
        1,
        "the failed file is not kept"
    );
}

/// A session whose channel is full (its agent reads slowly) gets the rest
/// once there is room; nothing is dropped and no caller waits.
#[tokio::test]
async fn a_full_channel_gets_the_rest_when_the_agent_reads_again() {
    let registry = Registry::default();
    let (tx, mut rx) = mpsc::channel(2);
    registry.attach_agent(
        &node(),
        "a".into(),
        tx,
        Timestamp::from_millis(1),
        AgentFeatures::default(),
    );
    registry.write_state_file(&node(), container(0), claimed("t1", 1), PATIENT);
    let first = sent(&mut rx);
    for n in 1..=10 {
        registry.write_state_file(&node(), container(n), claimed("t1", 1), PATIENT);
    }
    answer(&registry, &first[0].id, true);
    let mut got = Vec::new();
    while got.len() < 10 {
        let message = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the rest arrives")
            .unwrap();
        let command = decode(message);
        assert!(!command.batch, "an older agent gets single files");
        got.extend(command.files.into_iter().map(|f| f.0));
    }
    got.sort();
    assert_eq!(got, (1..=10).map(container).collect::<Vec<_>>());
}
