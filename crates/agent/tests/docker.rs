//! The real agent against the real Docker engine, driven by a fake control
//! plane in the test process: commands, idempotency, reports, events and
//! state files.

use boilerhouse_core::container::StateFile;
use boilerhouse_core::{TenantId, Timestamp};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::connect_request::Message;
use boilerhouse_testkit::docker::{remove_node_containers, require_docker, unique_node};
use boilerhouse_testkit::fake::FakeControlPlane;
use boilerhouse_testkit::{AgentOptions, AgentProcess, eventually};

mod harness;
use harness::{Harness, WAIT, command, create, local_sync, run_sync};

#[tokio::test]
async fn hello_carries_identity_capacity_and_engine_version() {
    let Some(h) = Harness::start().await else {
        return;
    };
    let hello = h.wait_connected(0).await;
    assert_eq!(hello.node_id, h.node);
    let capacity = hello.capacity.unwrap();
    assert!(capacity.cpus >= 1.0, "{capacity:?}");
    assert!(capacity.memory_bytes > 64 << 20, "{capacity:?}");
    assert!(!hello.engine_version.is_empty());
    assert_eq!(hello.boot_id.len(), 36);
    let report = h.next_report(0).await;
    assert!(
        report.containers.is_empty(),
        "a fresh node has no containers: {report:?}"
    );
}

#[tokio::test]
async fn create_is_idempotent_hardened_and_reported() {
    let Some(h) = Harness::start().await else {
        return;
    };
    h.wait_connected(0).await;
    let spec = h.spec(
        "deploy: {resources: {limits: {cpus: 0.5, memory: 64M}}}\nsecurity: {pids_limit: 64}\n",
    );

    let first = h
        .fake
        .run(&h.node, command("c1", create(&spec)), WAIT)
        .await
        .unwrap();
    assert!(first.ok, "{first:?}\n{}", h.agent.log());
    let container = first.container.clone().unwrap();
    assert_eq!(container.docker_state, "running");
    assert_eq!(container.name, spec.container_id.docker_name());

    // The same command id: answered from memory, the same container.
    let again = h
        .fake
        .run(&h.node, command("c1", create(&spec)), WAIT)
        .await
        .unwrap();
    assert_eq!(again.container.unwrap().docker_id, container.docker_id);
    // A new command id for the same container: finds its twin by name.
    let twin = h
        .fake
        .run(&h.node, command("c2", create(&spec)), WAIT)
        .await
        .unwrap();
    assert!(twin.ok);
    assert_eq!(twin.container.unwrap().docker_id, container.docker_id);
    let all =
        boilerhouse_testkit::docker::containers_with(&h.docker, "boilerhouse.node-id", &h.node)
            .await
            .unwrap();
    assert_eq!(all.len(), 1, "exactly one container exists");

    // What Docker really applied.
    let inspect = h
        .docker
        .inspect_container(&container.docker_id, None)
        .await
        .unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(64 << 20));
    assert_eq!(host.pids_limit, Some(64));
    assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
    assert!(
        host.security_opt
            .unwrap()
            .contains(&"no-new-privileges".to_owned())
    );
    let binds = host.binds.unwrap();
    assert!(binds.iter().any(|b| b.ends_with(":/state:rw")), "{binds:?}");
    assert!(
        binds.iter().any(|b| b.ends_with(":/secrets:ro")),
        "{binds:?}"
    );
    let config = inspect.config.unwrap();
    assert_eq!(
        config.user.as_deref(),
        Some("65534:65534"),
        "non-root by default"
    );
    let labels = config.labels.unwrap();
    for label in [
        "boilerhouse.managed",
        "boilerhouse.container-id",
        "boilerhouse.pool-id",
        "boilerhouse.workload-id",
        "boilerhouse.node-id",
        "boilerhouse.created-at",
        "boilerhouse.spec-hash",
    ] {
        assert!(labels.contains_key(label), "missing {label}");
    }
    assert_eq!(
        labels["boilerhouse.test-run"],
        boilerhouse_testkit::docker::test_run_id(),
        "test hygiene label"
    );

    // The non-root container can write its state volume.
    let exec = h
        .docker
        .create_exec(
            &container.docker_id,
            bollard::models::ExecConfig {
                cmd: Some(vec![
                    "sh".into(),
                    "-c".into(),
                    "echo hello > /state/f && cat /state/f".into(),
                ]),
                attach_stdout: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let output = h.docker.start_exec(&exec.id, None).await.unwrap();
    if let bollard::exec::StartExecResults::Attached { mut output, .. } = output {
        use futures::StreamExt as _;
        let mut text = String::new();
        while let Some(Ok(chunk)) = output.next().await {
            text.push_str(&chunk.to_string());
        }
        assert!(text.contains("hello"), "{text}");
    }
    let inspect_exec = h.docker.inspect_exec(&exec.id).await.unwrap();
    assert_eq!(inspect_exec.exit_code, Some(0));
}

#[tokio::test]
async fn state_files_limits_and_removal() {
    let Some(h) = Harness::start().await else {
        return;
    };
    let hello = h.wait_connected(0).await;
    assert!(hello.state_file_batches, "the agent says it takes batches");
    let spec = h.spec("deploy: {resources: {limits: {cpus: 0.5, memory: 64M}}}\n");
    let id = spec.container_id.to_string();
    let created = h
        .fake
        .run(&h.node, command("c1", create(&spec)), WAIT)
        .await
        .unwrap();
    assert!(created.ok, "{created:?}");

    // The state file is written and reported.
    let state = StateFile {
        tenant_id: Some(TenantId::new("t1").unwrap()),
        claimed_at: Some(Timestamp::from_millis(10)),
        claim_generation: 7,
        ..Default::default()
    };
    let write = pb::command::Command::WriteStateFile(pb::WriteStateFile {
        container_id: id.clone(),
        state: Some(pb::ContainerStateFile::from(&state)),
    });
    let result = h
        .fake
        .run(&h.node, command("c2", write), WAIT)
        .await
        .unwrap();
    assert!(result.ok, "{result:?}");

    // A batch: this container's next state is written though another
    // file of the batch cannot be (no such container), and the answer
    // fails naming that one only.
    let state = StateFile {
        claim_generation: 8,
        last_tenant_id: Some(TenantId::new("t1").unwrap()),
        ..state
    };
    let missing =
        boilerhouse_core::ContainerId::from_uuid(boilerhouse_core::ids::Uuid::now_v7()).to_string();
    let batch = pb::command::Command::WriteStateFiles(pb::WriteStateFiles {
        files: [&id, &missing]
            .into_iter()
            .map(|c| pb::WriteStateFile {
                container_id: c.clone(),
                state: Some(pb::ContainerStateFile::from(&state)),
            })
            .collect(),
    });
    let result = h
        .fake
        .run(&h.node, command("c2b", batch), WAIT)
        .await
        .unwrap();
    assert!(!result.ok, "{result:?}");
    assert!(
        result.error.contains("1 of 2")
            && result.error.contains(&missing)
            && !result.error.contains(&id),
        "{}",
        result.error
    );
    let cursor = h.fake.cursor();
    h.fake
        .send(
            &h.node,
            command(
                "c3",
                pb::command::Command::RequestFullReport(pb::RequestFullReport {}),
            ),
        )
        .unwrap();
    let report = h
        .fake
        .wait_for_after(cursor, WAIT, "the requested report", |_, m| match m {
            Message::FullReport(r) if r.command_id == "c3" => Some(r.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(report.containers.len(), 1);
    let reported = StateFile::try_from(report.containers[0].state_file.as_ref().unwrap()).unwrap();
    assert_eq!(reported, state);

    // Limits change in place and are confirmed by inspection.
    let update = pb::command::Command::UpdateResources(pb::UpdateResources {
        container_id: id.clone(),
        limits: Some(pb::Resources {
            cpus: 1.5,
            memory_bytes: 128 << 20,
            gpus: 0,
        }),
    });
    let result = h
        .fake
        .run(&h.node, command("c4", update), WAIT)
        .await
        .unwrap();
    assert!(result.ok, "{result:?}");
    let limits = result.container.unwrap().limits.unwrap();
    assert_eq!((limits.cpus, limits.memory_bytes), (1.5, 128 << 20));
    let host = h
        .docker
        .inspect_container(&spec.container_id.docker_name(), None)
        .await
        .unwrap()
        .host_config
        .unwrap();
    assert_eq!(host.nano_cpus, Some(1_500_000_000));
    assert_eq!(host.memory, Some(128 << 20));

    // Remove: gone from Docker, a destroy event arrives, directories go.
    let remove = pb::command::Command::Remove(pb::RemoveContainer {
        container_id: id.clone(),
        remove_volumes: true,
    });
    let result = h
        .fake
        .run(&h.node, command("c5", remove), WAIT)
        .await
        .unwrap();
    assert!(result.ok, "{result:?}");
    h.fake
        .wait_for(WAIT, "the destroy event", |_, m| match m {
            Message::ContainerEvent(e)
                if e.container_id == id && e.kind == pb::ContainerEventKind::Destroy as i32 =>
            {
                Some(())
            }
            _ => None,
        })
        .await
        .unwrap();
    assert!(
        h.docker
            .inspect_container(&spec.container_id.docker_name(), None)
            .await
            .is_err()
    );
    assert!(
        !h.agent
            .options
            .state_root
            .join("containers")
            .join(&id)
            .exists()
    );
}

#[tokio::test]
async fn an_agent_reports_only_its_own_nodes_containers_and_restarts_without_recreating_or_leaving_one_paused()
 {
    let Some(mut h) = Harness::start().await else {
        return;
    };
    h.wait_connected(0).await;
    let mine = h.spec("");
    let created = h
        .fake
        .run(&h.node, command("c1", create(&mine)), WAIT)
        .await
        .unwrap();
    let docker_id = created.container.unwrap().docker_id;

    // A managed container of another node on the same engine.
    let other_node = unique_node("other");
    let other = boilerhouse_testkit::docker::managed_spec(
        &h.image,
        &other_node,
        "o",
        Timestamp::from_millis(1),
    );
    let runtime = boilerhouse_agent::docker::DockerRuntime::connect(None)
        .await
        .unwrap();
    use boilerhouse_agent::runtime::ContainerRuntime as _;
    runtime.create(&other, &[]).await.unwrap();

    // kill -9 the agent and start it again: it re-attaches, reports the same
    // Docker id, and recreates nothing.
    let started_before = h
        .docker
        .inspect_container(&docker_id, None)
        .await
        .unwrap()
        .state
        .unwrap()
        .started_at;
    // As if the agent died in the middle of a paused sync.
    h.docker.pause_container(&docker_id).await.unwrap();
    let cursor = h.fake.cursor();
    h.agent.restart().unwrap();
    h.wait_connected(cursor).await;
    let report = h.next_report(cursor).await;
    let state = h
        .docker
        .inspect_container(&docker_id, None)
        .await
        .unwrap()
        .state
        .unwrap();
    assert_eq!(
        (state.paused, state.running),
        (Some(false), Some(true)),
        "a container an interrupted sync left paused is thawed at start"
    );
    let ids: Vec<&str> = report
        .containers
        .iter()
        .map(|c| c.docker_id.as_str())
        .collect();
    assert_eq!(
        ids,
        [docker_id.as_str()],
        "only this node's container, same Docker id"
    );
    let started_after = h
        .docker
        .inspect_container(&docker_id, None)
        .await
        .unwrap()
        .state
        .unwrap()
        .started_at;
    assert_eq!(started_before, started_after, "not restarted either");
    remove_node_containers(&h.docker, &other_node).await;
}

#[tokio::test]
async fn an_agent_without_docker_says_so_and_keeps_trying() {
    let Some(docker) = require_docker().await else {
        return;
    };
    let fake = FakeControlPlane::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let node = unique_node("nodocker");
    let mut options = AgentOptions::new(&node, fake.url(), dir.path().join("state"));
    options.docker_host = Some(format!("unix://{}", socket.display()));
    let mut agent = AgentProcess::start(options).unwrap();

    eventually(WAIT, "a clear log line about the engine", || {
        let log = agent.log();
        async move { (log.matches("docker engine unreachable").count() >= 2).then_some(()) }
    })
    .await
    .unwrap();
    assert!(agent.is_running(), "it must not crash:\n{}", agent.log());

    // Make the engine reachable at that path: the agent connects by itself.
    std::os::unix::fs::symlink("/var/run/docker.sock", &socket).unwrap();
    let hello = fake
        .wait_for(WAIT, "Hello once Docker is reachable", |n, m| match m {
            Message::Hello(h) if n == node => Some(h.clone()),
            _ => None,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(!hello.engine_version.is_empty());
    drop(docker);
}

#[tokio::test]
async fn the_agent_refuses_what_its_own_policy_does_not_allow_whatever_the_server_sends() {
    let Some(h) = Harness::start().await else {
        return;
    };
    h.wait_connected(0).await;

    // Creates the server should never have sent: refused, naming the field
    // and the flag, and nothing reaches the engine.
    let cases = [
        (
            "network_mode: host\n",
            "network_mode",
            "--allow-host-network",
        ),
        (
            "security: {cap_add: [NET_ADMIN]}\n",
            "cap_add",
            "--allow-cap-add NET_ADMIN",
        ),
    ];
    for (i, (yaml, field, flag)) in cases.into_iter().enumerate() {
        let spec = h.spec(yaml);
        let result = h
            .fake
            .run(
                &h.node,
                command(&format!("refused-{i}"), create(&spec)),
                WAIT,
            )
            .await
            .unwrap();
        assert!(!result.ok, "{yaml}: {result:?}");
        assert!(
            result.error.contains(&format!("field {field}:")) && result.error.contains(flag),
            "{yaml}: {}",
            result.error
        );
        assert!(
            !h.agent
                .options
                .state_root
                .join("containers")
                .join(spec.container_id.to_string())
                .exists(),
            "no host directories either"
        );
    }
    let created =
        boilerhouse_testkit::docker::containers_with(&h.docker, "boilerhouse.node-id", &h.node)
            .await
            .unwrap();
    assert!(created.is_empty(), "nothing was created: {created:?}");

    // A sync to a sink outside the agent's roots fails loudly and writes
    // nothing; the default root under the state root works.
    let spec = h.spec("");
    let result = h
        .fake
        .run(&h.node, command("allowed", create(&spec)), WAIT)
        .await
        .unwrap();
    assert!(result.ok, "{result:?}\n{}", h.agent.log());
    let state_root = &h.agent.options.state_root;
    std::fs::write(
        state_root
            .join("containers")
            .join(spec.container_id.to_string())
            .join("state/job"),
        "x",
    )
    .unwrap();
    let outside = state_root.parent().unwrap().join("etc");
    let result = h
        .fake
        .run(
            &h.node,
            command(
                "sync-outside",
                run_sync(&spec, &local_sync(&outside), "upload"),
            ),
            WAIT,
        )
        .await
        .unwrap();
    assert!(!result.ok, "{result:?}");
    assert!(
        result.error.contains("outside the agent's sink roots")
            && result.error.contains("--allow-sink-root"),
        "{}",
        result.error
    );
    assert!(!outside.exists(), "the refused sink was not even created");

    let inside = state_root.join("sinks/tenants");
    let result = h
        .fake
        .run(
            &h.node,
            command(
                "sync-inside",
                run_sync(&spec, &local_sync(&inside), "upload"),
            ),
            WAIT,
        )
        .await
        .unwrap();
    assert!(result.ok, "{result:?}\n{}", h.agent.log());
    assert_eq!(
        std::fs::read_to_string(inside.join("cron.d/job")).unwrap(),
        "x"
    );
}
