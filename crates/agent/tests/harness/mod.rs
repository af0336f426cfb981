//! The agent test harness: a real agent against the real engine, driven by
//! a fake control plane, and the commands the tests send it.

use std::time::Duration;

use bollard::Docker;

use boilerhouse_core::container::ContainerSpec;
use boilerhouse_core::workload::{SyncSpec, parse_workload};
use boilerhouse_core::{ContainerId, NodeId, Timestamp};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::connect_request::Message;
use boilerhouse_testkit::docker::{
    remove_node_containers_blocking, require_docker, test_image, unique_node,
};
use boilerhouse_testkit::fake::FakeControlPlane;
use boilerhouse_testkit::{AgentOptions, AgentProcess};

/// How long any one wait may take.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Harness {
    pub docker: Docker,
    pub fake: FakeControlPlane,
    pub node: String,
    pub agent: AgentProcess,
    pub image: String,
    pub _dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Option<Self> {
        let docker = require_docker().await?;
        let image = test_image(&docker).await.unwrap();
        let fake = FakeControlPlane::start().await.unwrap();
        let node = unique_node("agent-test");
        let dir = tempfile::tempdir().unwrap();
        let agent = AgentProcess::start(AgentOptions::new(
            &node,
            fake.url(),
            dir.path().join("state"),
        ))
        .unwrap();
        Some(Self {
            docker,
            fake,
            node,
            agent,
            image,
            _dir: dir,
        })
    }

    pub fn spec(&self, yaml_extra: &str) -> ContainerSpec {
        let yaml = format!(
            "id: t\nimage: {}\ncommand: [sleep, infinity]\nvolumes:\n  state: {{target: /state}}\n  secrets: {{target: /secrets}}\n{yaml_extra}",
            self.image
        );
        let workload = parse_workload("t.yaml", &yaml).unwrap();
        ContainerSpec::for_workload(
            &workload,
            ContainerId::from_uuid(uuid::Uuid::now_v7()),
            &NodeId::new(self.node.clone()).unwrap(),
            Timestamp::from_millis(1),
        )
    }

    pub async fn wait_connected(&self, after: usize) -> pb::Hello {
        self.fake
            .wait_for_after(after, WAIT, "Hello", |node, m| match m {
                Message::Hello(h) if node == self.node => Some(h.clone()),
                _ => None,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.log()))
    }

    pub async fn next_report(&self, after: usize) -> pb::FullReport {
        self.fake
            .wait_for_after(after, WAIT, "a full report", |_, m| match m {
                Message::FullReport(r) => Some(r.clone()),
                _ => None,
            })
            .await
            .unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.agent.kill();
        // Remove this test's containers even when an assertion failed.
        remove_node_containers_blocking(&self.docker, std::slice::from_ref(&self.node));
    }
}

pub fn command(id: &str, c: pb::command::Command) -> pb::Command {
    pb::Command {
        command_id: id.to_owned(),
        generation: 1,
        command: Some(c),
    }
}

pub fn create(spec: &ContainerSpec) -> pb::command::Command {
    pb::command::Command::Create(pb::CreateContainer {
        spec: Some(pb::ContainerSpec::from(spec)),
        start: true,
    })
}

pub fn run_sync(spec: &ContainerSpec, sync: &SyncSpec, direction: &str) -> pb::command::Command {
    pb::command::Command::RunSync(pb::RunSync {
        container_id: spec.container_id.to_string(),
        tenant_id: "cron.d".into(),
        workload_id: "t".into(),
        sync_spec_json: serde_json::to_string(sync).unwrap(),
        direction: direction.into(),
        force_direction: pb::SyncDirection::Unspecified as i32,
        pause: false,
    })
}

/// The sync section of a workload whose local sink is at `path`.
pub fn local_sync(path: &std::path::Path) -> SyncSpec {
    let yaml = format!(
        "id: t\nimage: x\nvolumes: {{state: {{target: /state}}}}\nsync:\n  sink: {{type: local, path: {:?}}}\n  mappings: [{{path: .}}]\n",
        path.display().to_string()
    );
    parse_workload("t.yaml", &yaml).unwrap().sync.unwrap()
}
