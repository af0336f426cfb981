//! The registry: commands across sessions, reports and removals.

use super::*;

fn node() -> NodeId {
    NodeId::new("n1").unwrap()
}

fn command(id: &str) -> pb::Command {
    pb::Command {
        command_id: id.into(),
        generation: 1,
        command: Some(pb::command::Command::RequestFullReport(
            pb::RequestFullReport {},
        )),
    }
}

async fn next_command(rx: &mut mpsc::Receiver<Box<pb::ConnectResponse>>) -> pb::Command {
    match rx.recv().await.unwrap().message {
        Some(pb::connect_response::Message::Command(c)) => c,
        other => panic!("expected a command, got {other:?}"),
    }
}

#[tokio::test]
async fn unanswered_commands_are_resent_to_the_next_session() {
    let registry = Registry::default();
    let (tx_a, mut rx_a) = mpsc::channel(16);
    registry.attach(&node(), "a".into(), tx_a, Timestamp::from_millis(1));

    let sender = registry.clone();
    let pending = tokio::spawn(async move {
        sender
            .send(&node(), command("c1"), Duration::from_secs(30))
            .await
    });
    assert_eq!(next_command(&mut rx_a).await.command_id, "c1");

    // Session a dies without answering; session b takes over.
    registry.detach(&node(), "a");
    let (tx_b, mut rx_b) = mpsc::channel(16);
    registry.attach(&node(), "b".into(), tx_b, Timestamp::from_millis(2));
    assert_eq!(
        next_command(&mut rx_b).await.command_id,
        "c1",
        "resent on reconnect"
    );

    registry.complete(
        &node(),
        pb::CommandResult {
            command_id: "c1".into(),
            ok: true,
            error: String::new(),
            container: None,
            sync: None,
        },
    );
    let result = pending.await.unwrap().unwrap();
    assert!(result.ok);

    // Answered commands are not resent again.
    let (tx_c, mut rx_c) = mpsc::channel(16);
    registry.attach(&node(), "c".into(), tx_c, Timestamp::from_millis(3));
    assert!(rx_c.try_recv().is_err());
}

#[tokio::test]
async fn a_newer_session_replaces_and_cancels_the_old_one() {
    let registry = Registry::default();
    let (tx_a, _rx_a) = mpsc::channel(16);
    let cancel_a = registry.attach(&node(), "a".into(), tx_a, Timestamp::from_millis(1));
    let (tx_b, _rx_b) = mpsc::channel(16);
    registry.attach(&node(), "b".into(), tx_b, Timestamp::from_millis(2));
    assert!(cancel_a.is_cancelled());
    // The old session's late detach must not remove the new one.
    registry.detach(&node(), "a");
    assert_eq!(registry.session(&node()).unwrap().session_id, "b");
    assert_eq!(registry.connected(), 1);
}

/// A removal the agent confirms takes the container out of the node's
/// report at once, before the engine's destroy event: otherwise a
/// reconcile pass between the row's deletion and that event would
/// adopt a container that is gone. A failed removal leaves it.
#[tokio::test]
async fn a_confirmed_removal_leaves_the_report_before_the_engines_event() {
    let registry = Registry::default();
    let (tx, mut rx) = mpsc::channel(16);
    registry.attach(&node(), "a".into(), tx, Timestamp::from_millis(1));
    let observed = |n: u128| ObservedContainer {
        docker_id: format!("docker-{n}"),
        name: ContainerId::from_uuid(boilerhouse_core::ids::Uuid::from_u128(n)).docker_name(),
        labels: [(
            boilerhouse_core::container::labels::CONTAINER_ID.to_owned(),
            ContainerId::from_uuid(boilerhouse_core::ids::Uuid::from_u128(n)).to_string(),
        )]
        .into_iter()
        .collect(),
        docker_state: "running".into(),
        health: None,
        health_output: None,
        exit_code: 0,
        started_at: None,
        oom_killed: false,
        limits: Default::default(),
        state_file: None,
    };
    registry.full_report(
        &node(),
        Timestamp::from_millis(2),
        vec![observed(1), observed(2)],
    );
    let remove = |n: u128, id: &str| pb::Command {
        command_id: id.into(),
        generation: 0,
        command: Some(pb::command::Command::Remove(pb::RemoveContainer {
            container_id: ContainerId::from_uuid(boilerhouse_core::ids::Uuid::from_u128(n))
                .to_string(),
            remove_volumes: true,
        })),
    };
    let answer = |id: &str, ok: bool| pb::CommandResult {
        command_id: id.into(),
        ok,
        error: if ok {
            String::new()
        } else {
            "engine said no".into()
        },
        container: None,
        sync: None,
    };
    let listed = |r: &Registry| {
        r.report(&node())
            .unwrap()
            .containers
            .keys()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    for (n, id, ok) in [(2, "r2", false), (1, "r1", true)] {
        let sender = registry.clone();
        let command = remove(n, id);
        let pending =
            tokio::spawn(
                async move { sender.send(&node(), command, Duration::from_secs(5)).await },
            );
        assert_eq!(next_command(&mut rx).await.command_id, id);
        registry.complete(&node(), answer(id, ok));
        let _ = pending.await.unwrap();
    }
    assert_eq!(listed(&registry), vec!["docker-2".to_owned()]);
}

#[tokio::test]
async fn commands_to_a_node_without_an_agent_fail_at_once() {
    let registry = Registry::default();
    let err = registry
        .send(&node(), command("c1"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err, CommandError::NotConnected(node()));
}

/// A pass marks only the report it planned on: a new session's first
/// report, arrived while the pass ran on the old session's, stays
/// unreconciled until a pass plans on it.
#[test]
fn a_pass_on_an_old_report_does_not_mark_the_new_sessions_first_report() {
    let registry = Registry::default();
    let (tx, _rx) = mpsc::channel(16);
    registry.attach(&node(), "a".into(), tx, Timestamp::from_millis(1));
    registry.full_report(&node(), Timestamp::from_millis(10), vec![]);
    // A pass reads that report; meanwhile the agent reconnects and
    // reports again.
    let (tx, _rx2) = mpsc::channel(16);
    registry.attach(&node(), "b".into(), tx, Timestamp::from_millis(20));
    registry.full_report(&node(), Timestamp::from_millis(30), vec![]);
    registry.mark_reconciled(&node(), Timestamp::from_millis(10));
    assert_eq!(registry.unreconciled(), vec![node()]);
    registry.mark_reconciled(&node(), Timestamp::from_millis(30));
    assert!(registry.unreconciled().is_empty());
}
